//! The one integration-test binary: the bridge against a fake Mattermost and a real OpenCode, and the
//! binary's command line.

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod control;
mod e2e;
mod mattermost_api;
mod opencode_api;
mod properties;
