//! The one integration-test binary: the bridge against a fake Mattermost and a real OpenCode, and the
//! binary's command line.

#[path = "../support/mod.rs"]
mod support;

mod check;
mod cli;
mod e2e;
mod static_binary;
mod status;
mod tls;
