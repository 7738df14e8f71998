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

/// Kills the server when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn finds_a_real_opencode_serve_listening_only_on_ipv6_loopback() {
    use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    let Ok(probe) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
        eprintln!("no IPv6 loopback on this machine; nothing to test");
        return;
    };
    let port = probe.local_addr().expect("local_addr").port();
    drop(probe);
    let home = crate::support::TempDir::new("ipv6-home");
    let log = std::fs::File::create(home.path().join("serve.log")).expect("create serve.log");
    let mut command = std::process::Command::new(crate::support::opencode::opencode_binary());
    command
        .args(["serve", "--port", &port.to_string(), "--hostname", "::1"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log);
    let _server = Killed(command.spawn().expect("spawn opencode serve"));
    let address = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "opencode serve did not listen on [::1]:{port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let uid = own_uid(Path::new("/proc")).expect("/proc/self/status names our uid");
    let found = loopback_listeners(Path::new("/proc"), uid);
    let listener = found
        .listeners
        .iter()
        .find(|l| l.port == port)
        .unwrap_or_else(|| panic!("port {port} not among {:?}", found.listeners));
    assert_eq!(listener.address.to_string(), "::1");
    // The URL discovery gives it reaches the server.
    let url = opencode_mattermost::discovery::url_of(SocketAddr::new(listener.address, port));
    assert_eq!(url, format!("http://[::1]:{port}"));
    let client = opencode_mattermost::opencode::rest::OpenCodeClient::new(&url, "opencode", None);
    // A server that has just begun listening may take a while to answer its first request.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.health() {
            Ok(version) => break assert!(!version.is_empty()),
            Err(e) if Instant::now() < deadline => eprintln!("not answering yet: {e}"),
            Err(e) => panic!("{url} found but not answering: {e}"),
        }
    }
}
