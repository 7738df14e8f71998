//! The one integration-test binary: the bridge against a fake Mattermost and a real OpenCode, and the
//! binary's command line.

#[path = "../support/mod.rs"]
mod support;

mod check;
mod cli;
mod e2e;
mod status;
mod tls;
