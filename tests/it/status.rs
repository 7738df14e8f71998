//! `opencode-mattermost status` on the real binary: a running bridge with a session, the same after
//! it stopped, and a state directory no bridge ever used.

use std::process::Output;
use std::time::Instant;

use serde_json::{Value, json};

use crate::cli::{Finish, Running, bridge_env, command};
use crate::support::llm::FakeLlm;
use crate::support::mattermost::FakeMattermost;
use crate::support::opencode::OpenCode;
use crate::support::{SOON, TempDir};

fn status(state: &TempDir, json: bool) -> Output {
    let mut command = command(state);
    command.arg("status");
    if json {
        command.arg("--json");
    }
    command.finish()
}

fn status_json(state: &TempDir) -> (Option<i32>, Value) {
    let output = status(state, true);
    let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (output.status.code(), value)
}

#[test]
fn status_shows_the_running_bridge_its_sessions_and_then_that_it_stopped() {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, json!({}));
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("status");
    let mut bridge = command(&state);
    bridge_env(&mut bridge, &mattermost, &mattermost.bot().token);
    bridge
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_MM_LOG", "info");
    let mut running = Running::start(bridge);
    running.wait_for_line("ready:");

    let session = opencode.create_session(opencode.project_dir(), Some("Status check"));
    let session_id = session["id"].as_str().expect("session id").to_string();
    let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
    let root = mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
        })
        .expect("a thread for the session");

    // The heartbeat names both sides within a second or so of their first contact; the thread
    // record is saved as the thread is made. Poll until both show, with a deadline.
    let deadline = Instant::now() + SOON;
    let report = loop {
        let (code, report) = status_json(&state);
        let has_session = report["sessions"]
            .as_array()
            .is_some_and(|sessions| !sessions.is_empty());
        if code == Some(0) && has_session {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "status never healthy with the session: {report:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(report["running"], true);
    assert_eq!(report["healthy"], true);
    assert_eq!(report["pid"], running.child.id());
    assert_eq!(report["problems"], json!([]));
    for side in ["heartbeat", "mattermost", "opencode"] {
        assert!(
            report[side]["at_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{side}: {report:#}"
        );
    }
    let sessions = report["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{report:#}");
    assert_eq!(sessions[0]["session_id"], session_id.as_str());
    assert_eq!(sessions[0]["thread_id"], root.id.as_str());
    assert_eq!(sessions[0]["state"], "active");
    assert_eq!(sessions[0]["server"], opencode.url().as_str());

    let output = status(&state, false);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with(&format!("running (pid {}), healthy", running.child.id())),
        "{text}"
    );
    assert!(
        text.contains(&root.id) && text.contains("Status check"),
        "{text}"
    );
    assert!(text.contains("mattermost  last heard 20"), "{text}");

    let (code, _) = running.terminate();
    assert_eq!(code, 0);
    let (code, report) = status_json(&state);
    assert_eq!(code, Some(1));
    assert_eq!(report["running"], false);
    assert_eq!(report["healthy"], false);
    assert_eq!(report["sessions"][0]["thread_id"], root.id.as_str());
    let output = status(&state, false);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("not running"));
}

#[test]
fn status_of_an_unused_state_directory_is_not_running() {
    let state = TempDir::new("status");
    let (code, report) = status_json(&state);
    assert_eq!(code, Some(1));
    assert_eq!(report["running"], false);
    assert_eq!(report["pid"], Value::Null);
    assert_eq!(report["sessions"], json!([]));
    assert_eq!(
        report["problems"],
        json!(["no bridge is running on this state directory"])
    );
}
