//! `opencode-mattermost check` on the real binary: every line against healthy servers, and the line
//! that names each broken part.

use std::process::{Command, Output};

use serde_json::json;

use crate::cli::{Finish, command};
use crate::support::TempDir;
use crate::support::llm::FakeLlm;
use crate::support::mattermost::FakeMattermost;
use crate::support::opencode::OpenCode;

const CHECKS: [&str; 10] = [
    "config",
    "mattermost",
    "token",
    "owner",
    "dm channel",
    "websocket",
    "opencode",
    "auth",
    "state dir",
    "state file",
];

/// Nothing listens on the discard port on the test machines.
const CLOSED: &str = "http://127.0.0.1:9";

pub fn check_command(state: &TempDir, mattermost: &FakeMattermost, token: &str) -> Command {
    let mut command = command(state);
    command
        .arg("check")
        .env("MATTERMOST_URL", mattermost.url())
        .env("MATTERMOST_TOKEN", token)
        .env("MATTERMOST_OWNER", mattermost.owner().username)
        .env("OPENCODE_URL", CLOSED);
    command
}

pub fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The line of the check `name`, which must be there exactly once.
fn line<'a>(lines: &'a [String], name: &str) -> &'a str {
    let found: Vec<&String> = lines
        .iter()
        .filter(|line| {
            line.split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with(&format!("{name} ")))
        })
        .collect();
    assert_eq!(found.len(), 1, "check {name:?} in:\n{}", lines.join("\n"));
    found[0]
}

pub fn assert_line(lines: &[String], name: &str, mark: &str, needle: &str) {
    let text = line(lines, name);
    assert!(
        text.starts_with(mark) && text.contains(needle),
        "expected {mark} {name} … {needle:?}, got {text:?}; all:\n{}",
        lines.join("\n")
    );
}

#[test]
fn check_passes_against_healthy_servers_and_names_a_wrong_opencode_password() {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start_with_password(&llm, json!({}), "check-password-1");
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("check");

    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_SERVER_PASSWORD", "check-password-1")
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(0), "{}", lines.join("\n"));
    assert_eq!(lines.len(), CHECKS.len(), "{}", lines.join("\n"));
    for name in CHECKS {
        assert_line(&lines, name, "✓", "");
    }
    assert_line(&lines, "mattermost", "✓", "version 5.36.1");
    assert_line(&lines, "token", "✓", "is a bot account");
    assert_line(&lines, "opencode", "✓", "version 1.18");
    assert_line(&lines, "state file", "✓", "none yet");

    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_SERVER_PASSWORD", "not-the-password")
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_line(&lines, "opencode", "✓", "answers");
    assert_line(&lines, "auth", "✗", "OPENCODE_SERVER_PASSWORD");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("not-the-password"));
}

#[test]
fn check_names_a_bad_token_without_printing_it() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("check");
    let output = check_command(&state, &mattermost, "wrong-token-0123456789").finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_line(&lines, "mattermost", "✓", "answers");
    assert_line(&lines, "token", "✗", "rejected the token (401)");
    assert_line(&lines, "token", "✗", "MATTERMOST_TOKEN");
    for name in ["owner", "dm channel", "websocket"] {
        assert_line(&lines, name, "-", "skipped");
    }
    let everything = format!("{output:?}");
    assert!(
        !everything.contains("wrong-token-0123456789"),
        "{everything}"
    );
}

#[test]
fn check_names_a_wrong_url() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("check");
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("MATTERMOST_URL", &closed)
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_line(&lines, "mattermost", "✗", &format!("cannot reach {closed}"));
    assert_line(&lines, "mattermost", "✗", "check MATTERMOST_URL");
    assert_line(&lines, "websocket", "-", "skipped");
}

#[test]
fn check_names_a_missing_owner() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("check");
    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("MATTERMOST_OWNER", "nobody-here")
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_line(&lines, "token", "✓", "");
    assert_line(&lines, "owner", "✗", "no user \"nobody-here\"");
    assert_line(&lines, "dm channel", "-", "skipped");
    assert_line(&lines, "websocket", "✓", "");
}

#[test]
fn check_names_opencode_down_and_a_bad_config() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("check");
    let output = check_command(&state, &mattermost, &mattermost.bot().token).finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(1));
    for name in [
        "mattermost",
        "token",
        "owner",
        "dm channel",
        "websocket",
        "state dir",
    ] {
        assert_line(&lines, name, "✓", "");
    }
    assert_line(&lines, "opencode", "✗", "opencode serve");
    assert_line(&lines, "auth", "-", "skipped");

    let output = check_command(&state, &mattermost, &mattermost.bot().token)
        .env("OPENCODE_MM_LOG", "loud")
        .finish();
    let lines = stdout_lines(&output);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(lines.len(), 1, "{}", lines.join("\n"));
    assert_line(&lines, "config", "✗", "OPENCODE_MM_LOG");
}
