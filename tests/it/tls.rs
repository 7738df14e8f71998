//! https:// and wss:// with a private CA: the fake Mattermost behind a TLS proxy whose certificate a
//! test CA issued. Trusted through OPENCODE_MM_CA_FILE or SSL_CERT_FILE it works end to end; not
//! trusted, it fails with a message that says what to set.

use std::net::SocketAddr;

use serde_json::json;

use crate::check::{assert_line, check_command, stdout_lines};
use crate::cli::{Finish, Running, bridge_env, command};
use crate::support::llm::FakeLlm;
use crate::support::mattermost::FakeMattermost;
use crate::support::opencode::OpenCode;
use crate::support::tls::{TestCa, TlsProxy};
use crate::support::{SOON, TempDir};

fn behind_tls(mattermost: &FakeMattermost, ca: &TestCa) -> TlsProxy {
    let upstream: SocketAddr = mattermost
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("fake mattermost address");
    TlsProxy::start(ca, upstream)
}

#[test]
fn https_and_wss_work_with_a_private_ca_from_either_variable() {
    let mattermost = FakeMattermost::start();
    let ca = TestCa::new("private");
    let proxy = behind_tls(&mattermost, &ca);
    let state = TempDir::new("tls");
    let pem = ca.write_pem(state.path(), "ca.pem");
    for variable in ["OPENCODE_MM_CA_FILE", "SSL_CERT_FILE"] {
        let output = check_command(&state, &mattermost, &mattermost.bot().token)
            .env("MATTERMOST_URL", proxy.url())
            .env(variable, &pem)
            .finish();
        let lines = stdout_lines(&output);
        assert_line(&lines, "config", "✓", &pem.display().to_string());
        assert_line(
            &lines,
            "mattermost",
            "✓",
            &format!("{} answers", proxy.url()),
        );
        for name in ["token", "owner", "dm channel"] {
            assert_line(&lines, name, "✓", "");
        }
        assert_line(&lines, "websocket", "✓", "wss://");
    }
}

#[test]
fn an_untrusted_certificate_fails_with_a_message_naming_the_ca_setting() {
    let mattermost = FakeMattermost::start();
    let ca = TestCa::new("private");
    let proxy = behind_tls(&mattermost, &ca);
    let state = TempDir::new("tls");

    // The bundled web PKI roots do not know the test CA.
    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("MATTERMOST_URL", proxy.url())
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_line(&lines, "mattermost", "✗", "not signed by a trusted CA");
    assert_line(&lines, "mattermost", "✗", "OPENCODE_MM_CA_FILE");

    // Nor does another private CA.
    let other = TestCa::new("other").write_pem(state.path(), "other.pem");
    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("MATTERMOST_URL", proxy.url())
        .env("OPENCODE_MM_CA_FILE", &other)
        .finish();
    assert_line(
        &stdout_lines(&output),
        "mattermost",
        "✗",
        "not signed by a trusted CA",
    );

    // The bridge itself keeps retrying, and says why each time.
    let mut bridge = command(&state);
    bridge_env(&mut bridge, &mattermost, &mattermost.bot().token);
    bridge.env("MATTERMOST_URL", proxy.url());
    let mut running = Running::start(bridge);
    let warning = running.wait_for_line("OPENCODE_MM_CA_FILE");
    assert!(
        warning.contains("WARN") && warning.contains("retrying"),
        "{warning}"
    );
    let (code, _) = running.terminate();
    assert_eq!(code, 0);
}

#[test]
fn the_bridge_serves_a_thread_over_https_and_wss() {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, json!({}));
    let mattermost = FakeMattermost::start();
    let ca = TestCa::new("private");
    let proxy = behind_tls(&mattermost, &ca);
    let state = TempDir::new("tls");
    let pem = ca.write_pem(state.path(), "ca.pem");
    let mut bridge = command(&state);
    bridge_env(&mut bridge, &mattermost, &mattermost.bot().token);
    bridge
        .env("MATTERMOST_URL", proxy.url())
        .env("OPENCODE_MM_CA_FILE", &pem)
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_MM_LOG", "info");
    let mut running = Running::start(bridge);
    running.wait_for_line("ready:");

    let session = opencode.create_session(opencode.project_dir(), Some("Over TLS"));
    let session_id = session["id"].as_str().expect("session id").to_string();
    let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
    let root = mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
        })
        .expect("a thread made over https");
    // The owner's reply reaches the bridge only through the wss:// event stream.
    mattermost
        .post_as(&mattermost.owner().id, &dm, &root.id, "hello through tls")
        .expect("owner post");
    let bot = mattermost.bot().id;
    mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm).into_iter().find(|p| {
                p.user_id == bot
                    && p.root_id == root.id
                    && p.message.contains("echo: hello through tls")
            })
        })
        .expect("the reply streamed back over https");
    let (code, _) = running.terminate();
    assert_eq!(code, 0);
}
