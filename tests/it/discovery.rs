//! Discovery of local OpenCode servers from the real `/proc` (issue 13): a real `opencode serve` of our own
//! uid, listening on 127.0.0.1, is found with its port and command line.

use std::path::Path;

use opencode_mattermost::opencode::discover::{loopback_listeners, own_uid};
use serde_json::json;

use crate::support::llm::FakeLlm;
use crate::support::opencode::OpenCode;

#[test]
fn finds_a_real_opencode_serve_of_our_uid() {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, json!({}));
    let port: u16 = opencode
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .expect("url ends in a port");
    let uid = own_uid(Path::new("/proc")).expect("/proc/self/status names our uid");
    // The helper returns once the server answers HTTP, so its socket is listening already.
    let found = loopback_listeners(Path::new("/proc"), uid);
    let listener = found
        .listeners
        .iter()
        .find(|l| l.port == port)
        .unwrap_or_else(|| panic!("port {port} not among {:?}", found.listeners));
    assert!(
        listener.command.contains("opencode serve --port"),
        "command: {}",
        listener.command
    );
}
