//! The real binary: its command line, its start-up errors, and how it stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::support::TempDir;
use crate::support::mattermost::FakeMattermost;

pub const BINARY: &str = env!("CARGO_BIN_EXE_opencode-mattermost");

pub fn command(state: &TempDir) -> Command {
    let mut command = Command::new(BINARY);
    command.env_clear();
    command.env("PATH", std::env::var("PATH").unwrap_or_default());
    command.env("OPENCODE_MM_STATE_DIR", state.path());
    command
}

/// A running binary whose stderr lines arrive on a channel.
pub struct Running {
    pub child: Child,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Every stderr line so far, for a failure message.
    pub fn log_so_far(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn terminate(&mut self) -> (i32, Duration) {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let status = exit_within(&mut self.child, Duration::from_secs(10))
            .expect("still running 10 s after SIGTERM");
        (status.code().unwrap_or(-1), sent.elapsed())
    }
}

/// The child's exit status, or `None` (and the child killed) if it is still running after `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return None;
        }
        // Polling a child's exit has no blocking form with a deadline in std.
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Running {
    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Command::output` with a deadline: a binary that should exit but hangs fails the test.
pub trait Finish {
    fn finish(&mut self) -> std::process::Output;
}

impl Finish for Command {
    fn finish(&mut self) -> std::process::Output {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        exit_within(&mut child, Duration::from_secs(20))
            .expect("the binary did not exit within 20 s");
        child.wait_with_output().expect("collect output")
    }
}

pub fn bridge_env(command: &mut Command, mattermost: &FakeMattermost, token: &str) {
    command
        .env("MATTERMOST_URL", mattermost.url())
        .env("MATTERMOST_TOKEN", token)
        .env(
            "MATTERMOST_OWNER",
            format!("@{}", mattermost.owner().username),
        )
        // Nothing listens there: the bridge must still run and keep retrying.
        .env("OPENCODE_URL", "http://127.0.0.1:9")
        .env("OPENCODE_MM_LOG", "debug");
}

#[test]
fn help_and_version() {
    let state = TempDir::new("cli");
    let output = command(&state).arg("--help").finish();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "MATTERMOST_URL",
        "MATTERMOST_TOKEN",
        "MATTERMOST_TOKEN_FILE",
        "MATTERMOST_OWNER",
        "OPENCODE_URL",
        "OPENCODE_SERVER_USERNAME",
        "OPENCODE_SERVER_PASSWORD",
        "OPENCODE_MM_STATE_DIR",
        "OPENCODE_MM_COMMAND_PREFIX",
        "OPENCODE_MM_LOG",
        "--env-file",
    ] {
        assert!(
            help.contains(variable),
            "--help does not mention {variable}"
        );
    }
    let output = command(&state).arg("--version").finish();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_missing_or_malformed_setting_exits_2_naming_the_variable() {
    let state = TempDir::new("cli");
    let output = command(&state)
        .env("MATTERMOST_TOKEN", "sekrit-token-value")
        .env("MATTERMOST_OWNER", "alice")
        .finish();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MATTERMOST_URL"), "{stderr}");
    assert!(
        !stderr.contains("sekrit-token-value"),
        "the token was printed: {stderr}"
    );

    let output = command(&state)
        .env("MATTERMOST_URL", "chat.example.com")
        .env("MATTERMOST_TOKEN", "sekrit-token-value")
        .env("MATTERMOST_OWNER", "alice")
        .finish();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("https://chat.example.com"), "{stderr}");
    assert!(!stderr.contains("sekrit-token-value"));
}

#[test]
fn a_rejected_token_exits_2_without_printing_it() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let mut command = command(&state);
    bridge_env(&mut command, &mattermost, "wrong-token-1234567890");
    let output = command.finish();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MATTERMOST_TOKEN"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("wrong-token-1234567890"), "{stderr}");
}

#[test]
fn an_unknown_owner_exits_2() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let mut command = command(&state);
    bridge_env(&mut command, &mattermost, &mattermost.bot().token);
    command.env("MATTERMOST_OWNER", "nobody-here");
    let output = command.finish();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("MATTERMOST_OWNER") && stderr.contains("nobody-here"),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_within_two_seconds_with_exit_code_0() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let mut command = command(&state);
    let token = mattermost.bot().token;
    bridge_env(&mut command, &mattermost, &token);
    let mut running = Running::start(command);
    running.wait_for_line("mattermost websocket connected");
    let (code, took) = running.terminate();
    assert_eq!(code, 0, "stderr:\n{}", running.seen.join("\n"));
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
    assert!(
        state.path().join("state.json").exists(),
        "state not flushed"
    );
    let log: String = running
        .lines
        .try_iter()
        .chain(running.seen.iter().cloned())
        .collect();
    assert!(!log.contains(&token), "the token appeared in the log");
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_the_bridge_starts() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    std::fs::write(
        state.path().join("state.json"),
        "{\"version\":1,\"servers\":{\"x\":",
    )
    .unwrap();
    let mut command = command(&state);
    bridge_env(&mut command, &mattermost, &mattermost.bot().token);
    let mut running = Running::start(command);
    let warning = running.wait_for_line("state.json");
    assert!(warning.contains("WARN"), "{warning}");
    running.wait_for_line("mattermost websocket connected");
    let moved: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "corrupt file not kept aside");
    let (code, _) = running.terminate();
    assert_eq!(code, 0);
}

#[test]
fn a_second_instance_on_the_same_state_directory_exits_3_naming_the_first() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let mut first = command(&state);
    bridge_env(&mut first, &mattermost, &mattermost.bot().token);
    let mut first = Running::start(first);
    first.wait_for_line("mattermost websocket connected");

    let mut second = command(&state);
    bridge_env(&mut second, &mattermost, &mattermost.bot().token);
    let output = second.finish();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "the running instance is not named: {stderr}"
    );
    let (code, _) = first.terminate();
    assert_eq!(code, 0, "the first instance was disturbed");
}

#[test]
fn a_state_directory_that_cannot_be_created_exits_1() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let blocker = state.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let mut command = command(&state);
    bridge_env(&mut command, &mattermost, &mattermost.bot().token);
    command.env("OPENCODE_MM_STATE_DIR", blocker.join("state"));
    let output = command.finish();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OPENCODE_MM_STATE_DIR"), "{stderr}");
}

#[test]
fn plain_http_to_another_host_exits_2_unless_allowed_with_a_warning() {
    let state = TempDir::new("cli");
    let mut refused = command(&state);
    refused
        .env("MATTERMOST_URL", "http://chat.example.com")
        .env("MATTERMOST_TOKEN", "sekrit-token-value")
        .env("MATTERMOST_OWNER", "alice");
    let output = refused.finish();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("OPENCODE_MM_ALLOW_INSECURE_HTTP=1") && stderr.contains("https://"),
        "{stderr}"
    );

    // 192.0.2.0/24 is reserved for documentation: nothing answers, and nothing needs to, since the
    // warning comes before the first connection.
    let mut allowed = command(&state);
    allowed
        .env("MATTERMOST_URL", "http://192.0.2.1:8065")
        .env("MATTERMOST_TOKEN", "sekrit-token-value")
        .env("MATTERMOST_OWNER", "alice")
        .env("OPENCODE_URL", "http://127.0.0.1:9")
        .env("OPENCODE_MM_ALLOW_INSECURE_HTTP", "1");
    let mut running = Running::start(allowed);
    let warning = running.wait_for_line("in clear");
    assert!(warning.contains("WARN"), "{warning}");
    let (code, _) = running.terminate();
    assert_eq!(code, 0);
}

/// A whole conversation at trace level, in JSON lines: no line holds the token, the OpenCode password
/// or the basic-auth header made from it, every line is one JSON object with the four fields, and the
/// session's lines carry its short id.
#[test]
fn a_trace_level_run_never_logs_a_secret_and_every_line_is_json() {
    use crate::support::llm::{FakeLlm, Step};
    use crate::support::opencode::OpenCode;
    use serde_json::{Value, json};

    const PASSWORD: &str = "redaction-password-77";
    let llm = FakeLlm::start();
    let opencode = OpenCode::start_with_password(&llm, json!({}), PASSWORD);
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let token = mattermost.bot().token;
    let mut bridge = command(&state);
    bridge_env(&mut bridge, &mattermost, &token);
    bridge
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
        .env("OPENCODE_MM_LOG", "trace")
        .env("OPENCODE_MM_LOG_FORMAT", "json");
    let mut running = Running::start(bridge);
    running.wait_for_line("ready:");

    let session = opencode.create_session(opencode.project_dir(), Some("Secrets"));
    let session_id = session["id"].as_str().expect("session id").to_string();
    let short_id = &session_id[session_id.len() - 8..];
    let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
    let root = mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
        })
        .expect("a thread");
    llm.script(
        "run a tool",
        vec![
            vec![Step::ToolCall {
                name: "bash".into(),
                arguments: json!({"command": "echo tool-ran", "description": "print"}),
            }],
            vec![Step::Text("The tool ran.".into())],
        ],
    );
    mattermost
        .post_as(&mattermost.owner().id, &dm, &root.id, "run a tool")
        .expect("owner post");
    let bot = mattermost.bot().id;
    mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.user_id == bot && p.message.starts_with("✅ Done"))
        })
        .expect("the completion line");
    let (code, _) = running.terminate();
    assert_eq!(code, 0);

    let log: Vec<String> = running
        .seen
        .iter()
        .cloned()
        .chain(running.lines.try_iter())
        .collect();
    let dump = log
        .iter()
        .find(|line| line.contains("configuration: Config {"))
        .unwrap_or_else(|| panic!("no configuration dump at debug level: {log:#?}"));
    assert!(dump.contains("<redacted>"), "{dump}");
    let basic = opencode_mattermost::http::basic_auth("opencode", PASSWORD);
    let encoded = basic.trim_start_matches("Basic ");
    for line in &log {
        for secret in [token.as_str(), PASSWORD, encoded] {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
        let object: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["ts", "level", "module", "msg"] {
            assert!(object[field].is_string(), "no {field}: {line}");
        }
    }
    let session_lines = log
        .iter()
        .filter(|line| line.contains(&format!("\"session\":\"{short_id}\"")))
        .count();
    assert!(session_lines > 0, "no line carries the session's short id");
}

/// The router (thread `bridge`) panics when it logs the websocket's connection, through the debug
/// build's `OPENCODE_MM_DEBUG_PANIC_ON`: the process must not stay half alive or exit 0, but exit 4
/// with one masked log line.
#[test]
fn a_panic_outside_a_session_worker_exits_4_with_one_masked_line() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let token = mattermost.bot().token;
    let mut command = command(&state);
    bridge_env(&mut command, &mattermost, &token);
    command.env(
        "OPENCODE_MM_DEBUG_PANIC_ON",
        format!("mattermost websocket connected|router broke holding {token}"),
    );
    let output = command.finish();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("panicked")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains("thread bridge panicked")
            && lines[0].contains("router broke holding <redacted>"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&token),
        "the token reached stderr: {stderr}"
    );
}

/// A session worker's panic stops that worker only: the process goes on and stops cleanly.
#[test]
fn a_session_worker_panic_leaves_the_process_running() {
    use crate::support::llm::FakeLlm;
    use crate::support::opencode::OpenCode;
    use serde_json::json;

    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, json!({}));
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("cli");
    let mut bridge = command(&state);
    bridge_env(&mut bridge, &mattermost, &mattermost.bot().token);
    bridge
        .env("OPENCODE_URL", opencode.url())
        .env("OPENCODE_MM_DEBUG_PANIC_ON", "thread created|worker broke");
    let mut running = Running::start(bridge);
    running.wait_for_line("ready:");
    opencode.create_session(opencode.project_dir(), Some("Panics"));
    let line = running.wait_for_line("panicked");
    assert!(
        line.contains("thread session-") && line.contains("worker broke"),
        "{line}"
    );
    // Still serving: a second session gets its thread.
    let second = opencode.create_session(opencode.project_dir(), Some("After the panic"));
    let second_id = second["id"].as_str().expect("session id").to_string();
    let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
    mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == second_id)
        })
        .unwrap_or_else(|| panic!("no thread after the panic:\n{}", running.log_so_far()));
    let (code, _) = running.terminate();
    assert_eq!(code, 0, "{}", running.log_so_far());
}

/// Bytes that are not UTF-8 (a Latin-1 path) in an argument or a variable: exit 2 naming it, not a
/// panic (exit 101) and not a variable silently taken as unset.
#[test]
fn an_argument_or_variable_that_is_not_utf8_exits_2_naming_it() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let state = TempDir::new("cli");
    let latin1 = || OsString::from_vec(b"/srv/caf\xe9".to_vec());
    let output = command(&state)
        .arg("status")
        .arg("--state-dir")
        .arg(latin1())
        .finish();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("argument 3 is not valid UTF-8"), "{stderr}");
    let output = command(&state)
        .arg("status")
        .env("OPENCODE_MM_STATE_DIR", latin1())
        .finish();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("OPENCODE_MM_STATE_DIR is not valid UTF-8"),
        "{stderr}"
    );
}
