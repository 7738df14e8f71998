//! The one integration-test binary: the bridge against a fake Mattermost and a real OpenCode, and the
//! binary's command line.

#[path = "../support/mod.rs"]
mod support;

mod attention;
mod bad_input;
mod budget;
mod check;
mod cli;
mod control;
mod delivery;
mod discovery;
mod e2e;
mod faults;
mod links;
mod mattermost_api;
mod opencode_api;
mod opencode_api_v2;
mod properties;
mod router_io;
mod servers;
mod static_binary;
mod status;
mod terminal;
mod tls;
