//! Runs a real `opencode serve` against the fake LLM in a throwaway home, so the tests exercise the
//! daemon against the server it will meet in production rather than against our idea of it.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::llm::{FakeLlm, MODEL_ID};
use super::v2proxy::V2Proxy;
use super::{Dialect, TempDir, dialect};

/// The OpenCode release the tests are written against; `tests/install-opencode.sh` installs the same one.
pub const OPENCODE_VERSION: &str = "1.18.33";

const READY_DEADLINE: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// A running `opencode serve`. Dropping it kills the server and everything it started, and removes its
/// temporary directory.
pub struct OpenCode {
    child: Child,
    url: String,
    /// The canonical path of `temp`: OpenCode reports canonical paths, and a symlinked temp dir would
    /// otherwise make directories compare unequal.
    root: PathBuf,
    project_dir: PathBuf,
    config: Value,
    agent: ureq::Agent,
    /// `Authorization` for every request, when the server was started with a password.
    authorization: Option<String>,
    password: Option<String>,
    /// Killed by `kill` and not restarted: its pid is reaped and must not be signalled again.
    killed: bool,
    /// In front of the server when the tests run in v2 (`TEST_OPENCODE_API=v2`): the bridge's way in.
    proxy: Option<V2Proxy>,
    /// Declared last so it is removed after the server is dead.
    _temp: TempDir,
}

impl OpenCode {
    /// Starts a server in a fresh git-initialised project whose `opencode.json` points at `llm`, with
    /// `extra_config` merged in, for example `{"permission":{"bash":"ask"}}`.
    pub fn start(llm: &FakeLlm, extra_config: Value) -> OpenCode {
        OpenCode::launch(llm, extra_config, None)
    }

    /// Like `start`, with `OPENCODE_SERVER_PASSWORD` set, so every request needs basic auth as user
    /// `opencode`.
    pub fn start_with_password(llm: &FakeLlm, extra_config: Value, password: &str) -> OpenCode {
        OpenCode::launch(llm, extra_config, Some(password))
    }

    fn launch(llm: &FakeLlm, extra_config: Value, password: Option<&str>) -> OpenCode {
        let authorization = password.map(|p| opencode_mattermost::http::basic_auth("opencode", p));
        let binary = opencode_binary();
        let temp = TempDir::new("opencode");
        let root = temp
            .path()
            .canonicalize()
            .expect("canonicalize the temp dir");
        let mut config = json!({
            "$schema": "https://opencode.ai/config.json",
            "provider": {"fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake",
                "options": {"baseURL": llm.base_url(), "apiKey": "x"},
                // A price, so turns report a non-zero cost (dollars per million tokens).
                "models": {MODEL_ID: {"name": "Fake Model", "cost": {"input": 3, "output": 15}}},
            }},
            "model": format!("fake/{MODEL_ID}"),
            "small_model": format!("fake/{MODEL_ID}"),
            "autoupdate": false,
            "share": "disabled",
        });
        merge(&mut config, extra_config);
        let project_dir = init_project(&root.join("projects").join("main"), &config);
        for dir in [
            "home",
            "xdg/config",
            "xdg/data",
            "xdg/state",
            "xdg/cache",
            "tmp",
        ] {
            create_dir(&root.join(dir));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();

        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let log = root.join(format!("server-{attempt}.log"));
            let port = free_port();
            let mut child = spawn_server(&binary, &root, &project_dir, port, &log, password);
            let url = format!("http://127.0.0.1:{port}");
            match wait_until_ready(&agent, &url, &mut child, authorization.as_deref()) {
                Ok(()) => {
                    let proxy = (dialect() == Dialect::V2).then(|| V2Proxy::start(&url));
                    return OpenCode {
                        proxy,
                        child,
                        url,
                        root,
                        _temp: temp,
                        project_dir,
                        config,
                        agent,
                        authorization,
                        password: password.map(str::to_string),
                        killed: false,
                    };
                }
                Err(problem) => {
                    kill_tree(&mut child);
                    failures.push(format!(
                        "attempt {attempt} on port {port}: {problem}\n{}",
                        tail(&log, 4000)
                    ));
                }
            }
        }
        drop(temp);
        panic!(
            "opencode serve ({}) did not start:\n{}",
            binary.display(),
            failures.join("\n")
        );
    }

    /// The server's base URL, `http://127.0.0.1:P`, without a trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Where the bridge under test reaches the server: the server itself in v1, the proxy that
    /// refuses every v1 route in v2. The test's own calls use `url`.
    pub fn bridge_url(&self) -> String {
        self.proxy
            .as_ref()
            .map_or_else(|| self.url.clone(), V2Proxy::url)
    }

    /// The v2 proxy in front of the server, when the tests run in v2.
    pub fn proxy(&self) -> Option<&V2Proxy> {
        self.proxy.as_ref()
    }

    /// The directory the server was started in.
    pub fn project_dir(&self) -> &Path {
        &self.project_dir
    }

    /// Another git-initialised directory with the same `opencode.json`, for tests with several directories.
    pub fn new_project_dir(&self, name: &str) -> PathBuf {
        init_project(&self.root.join("projects").join(name), &self.config)
    }

    /// Runs `opencode run [--session ID] TEXT` as a separate process on this server's store (its HOME,
    /// XDG dirs and provider config), as a terminal would, and waits for it (with a deadline).
    pub fn run_in_terminal(&self, session_id: Option<&str>, text: &str) -> String {
        let log = self.root.join("terminal.log");
        let stdout = File::create(&log).expect("create terminal.log");
        let stderr = stdout.try_clone().expect("clone log file handle");
        let mut command = Command::new(opencode_binary());
        command.arg("run");
        if let Some(id) = session_id {
            command.args(["--session", id]);
        }
        isolate(&mut command, &self.root);
        command
            .arg(text)
            .current_dir(&self.project_dir)
            .env("PWD", &self.project_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("spawn opencode run");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for opencode run") {
                let output = tail(&log, 4000);
                assert!(
                    status.success(),
                    "opencode run failed ({status}):\n{output}"
                );
                return output;
            }
            if Instant::now() > deadline {
                kill_tree(&mut child);
                panic!("opencode run did not finish in 60 s:\n{}", tail(&log, 4000));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn create_session(&self, directory: &Path, title: Option<&str>) -> Value {
        let body = match title {
            Some(title) => json!({"title": title}),
            None => json!({}),
        };
        self.call("POST", &with_directory("/session", directory), Some(body))
    }

    pub fn delete_session(&self, id: &str, directory: &Path) {
        self.call(
            "DELETE",
            &with_directory(&format!("/session/{id}"), directory),
            None,
        );
    }

    /// Sends a text prompt as a terminal on the same server would, in the dialect under test (v1 and
    /// v2 keep separate records, and a bridge on v2 follows only v2 turns); returns while the turn runs.
    pub fn prompt(&self, id: &str, directory: &Path, text: &str) {
        if dialect() == Dialect::V2 {
            let body = json!({"prompt": {"text": text}, "delivery": "queue"});
            self.call("POST", &format!("/api/session/{id}/prompt"), Some(body));
            return;
        }
        let body = json!({"parts": [{"type": "text", "text": text}]});
        self.call(
            "POST",
            &with_directory(&format!("/session/{id}/prompt_async"), directory),
            Some(body),
        );
    }

    pub fn messages(&self, id: &str, directory: &Path) -> Value {
        self.call(
            "GET",
            &with_directory(&format!("/session/{id}/message"), directory),
            None,
        )
    }

    /// The session's stored messages in the dialect under test, each as `{"role", "agent", "model",
    /// "completed", "summary"}`: v1 `…/message` and v2 `/api/session/{id}/context` hold different turns.
    pub fn history(&self, id: &str, directory: &Path) -> Vec<Value> {
        if dialect() == Dialect::V2 {
            let context = self.get(&format!("/api/session/{id}/context"));
            let entries = context["data"].as_array().cloned().unwrap_or_default();
            return entries
                .iter()
                .map(|m| {
                    json!({
                        "role": m["type"],
                        "agent": m["agent"],
                        "model": m["model"]["id"],
                        "completed": m["time"]["completed"].is_number()
                            || m["finish"].is_string(),
                        "summary": m["type"] == "compaction",
                    })
                })
                .collect();
        }
        let messages = self.messages(id, directory);
        let entries = messages.as_array().cloned().unwrap_or_default();
        entries
            .iter()
            .map(|m| {
                let info = &m["info"];
                json!({
                    "role": info["role"],
                    "agent": info["agent"],
                    "model": info["model"]["modelID"].as_str().or(info["modelID"].as_str()),
                    "completed": info["time"]["completed"].is_number(),
                    "summary": info["summary"] == true,
                })
            })
            .collect()
    }

    /// `GET` on the server; panics unless the answer is a 2xx. An empty body reads as `null`.
    pub fn get(&self, path_and_query: &str) -> Value {
        self.call("GET", path_and_query, None)
    }

    fn call(&self, method: &str, path_and_query: &str, body: Option<Value>) -> Value {
        let url = format!("{}{}", self.url, path_and_query);
        let auth = self.authorization.as_deref();
        let result = match (method, body) {
            ("GET", _) => authed(self.agent.get(&url), auth).call(),
            ("DELETE", _) => authed(self.agent.delete(&url), auth).call(),
            ("POST", Some(body)) => authed(self.agent.post(&url), auth)
                .header("content-type", "application/json")
                .send(body.to_string()),
            ("POST", None) => authed(self.agent.post(&url), auth).send_empty(),
            _ => panic!("opencode harness: unsupported method {method}"),
        };
        let mut response = result.unwrap_or_else(|error| panic!("{method} {url}: {error}"));
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|error| panic!("{method} {url}: {error}"));
        assert!(
            status.is_success(),
            "{method} {url}: status {status}: {text}"
        );
        if text.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{method} {url}: {error}: {text}"))
    }
}

impl OpenCode {
    /// Kills the server (and what it spawned) at once, as a crash would; `restart` brings it back.
    pub fn kill(&mut self) {
        if !self.killed {
            kill_tree(&mut self.child);
            self.killed = true;
        }
    }

    /// Starts the server again on the same port, project and data, as after a crash or an upgrade.
    pub fn restart(&mut self) {
        self.kill();
        let port: u16 = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the server url ends with its port");
        let binary = opencode_binary();
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let log = self.root.join(format!("server-restart-{attempt}.log"));
            let mut child = spawn_server(
                &binary,
                &self.root,
                &self.project_dir,
                port,
                &log,
                self.password.as_deref(),
            );
            match wait_until_ready(
                &self.agent,
                &self.url,
                &mut child,
                self.authorization.as_deref(),
            ) {
                Ok(()) => {
                    self.child = child;
                    self.killed = false;
                    return;
                }
                Err(problem) => {
                    kill_tree(&mut child);
                    failures.push(format!(
                        "attempt {attempt}: {problem}\n{}",
                        tail(&log, 4000)
                    ));
                    // The port may still be held by the dying server for a moment.
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        panic!(
            "opencode serve did not restart on port {port}:\n{}",
            failures.join("\n")
        );
    }
}

impl OpenCode {
    /// A second `opencode serve` on this one's `HOME` and data (one store, two processes), on its
    /// own port, as two servers of one user on one machine are.
    pub fn start_sharing(&self) -> OpenCode {
        let binary = opencode_binary();
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let log = self.root.join(format!("server-sharing-{attempt}.log"));
            let port = free_port();
            let mut child = spawn_server(
                &binary,
                &self.root,
                &self.project_dir,
                port,
                &log,
                self.password.as_deref(),
            );
            let url = format!("http://127.0.0.1:{port}");
            match wait_until_ready(&self.agent, &url, &mut child, self.authorization.as_deref()) {
                Ok(()) => {
                    let proxy = (dialect() == Dialect::V2).then(|| V2Proxy::start(&url));
                    return OpenCode {
                        proxy,
                        child,
                        url,
                        root: self.root.clone(),
                        // Its own (empty) temp dir: the shared one belongs to `self`.
                        _temp: TempDir::new("opencode-sharing"),
                        project_dir: self.project_dir.clone(),
                        config: self.config.clone(),
                        agent: self.agent.clone(),
                        authorization: self.authorization.clone(),
                        password: self.password.clone(),
                        killed: false,
                    };
                }
                Err(problem) => {
                    kill_tree(&mut child);
                    failures.push(format!(
                        "attempt {attempt}: {problem}\n{}",
                        tail(&log, 4000)
                    ));
                }
            }
        }
        panic!(
            "a second opencode serve did not start:\n{}",
            failures.join("\n")
        );
    }
}

impl Drop for OpenCode {
    fn drop(&mut self) {
        // The fields drop after this, so the temp dir goes once nothing writes to it any more.
        self.kill();
    }
}

/// The OpenCode binary: `$OPENCODE_BIN`, else where `tests/install-opencode.sh` puts it.
pub fn opencode_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("OPENCODE_BIN") {
        let binary = PathBuf::from(binary);
        assert!(
            binary.is_file(),
            "OPENCODE_BIN={}: no such file; unset it or point it at an opencode binary",
            binary.display()
        );
        return binary;
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache"),
    };
    let binary = cache
        .join("opencode-mattermost")
        .join(format!("opencode-{OPENCODE_VERSION}"))
        .join("node_modules/opencode-linux-x64/bin/opencode");
    assert!(
        binary.is_file(),
        "opencode {OPENCODE_VERSION} is not installed at {}; run `make test`, which installs it with \
         tests/install-opencode.sh, or set OPENCODE_BIN",
        binary.display()
    );
    binary
}

fn authed<B>(
    request: ureq::RequestBuilder<B>,
    authorization: Option<&str>,
) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(value) => request.header("authorization", value),
        None => request,
    }
}

fn spawn_server(
    binary: &Path,
    root: &Path,
    project_dir: &Path,
    port: u16,
    log: &Path,
    password: Option<&str>,
) -> Child {
    let stdout = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let stderr = stdout.try_clone().expect("clone log file handle");
    let mut command = Command::new(binary);
    isolate(&mut command, root);
    command
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--hostname",
            "127.0.0.1",
            "--print-logs",
        ])
        .current_dir(project_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if let Some(password) = password {
        command.env("OPENCODE_SERVER_PASSWORD", password);
    }
    // A process group of its own lets Drop kill the tools and servers OpenCode spawns along with it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()))
}

fn wait_until_ready(
    agent: &ureq::Agent,
    url: &str,
    child: &mut Child,
    authorization: Option<&str>,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_DEADLINE;
    let probe = format!("{url}/session");
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("the server exited with {status}"));
        }
        let answer = authed(agent.get(&probe), authorization)
            .config()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .call();
        if answer.is_ok_and(|response| response.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "GET {probe} did not succeed within {READY_DEADLINE:?}"
            ));
        }
        // Polling with a deadline: the server offers no readiness signal to wait on.
        thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the server and every process it started, then reaps the server.
///
/// The server runs in its own process group, but OpenCode starts tool commands (bash) in process groups
/// of their own, so the group alone misses them. The server is stopped first, so that it cannot start
/// more, and its descendants are found through `/proc` while they are still its descendants.
fn kill_tree(child: &mut Child) {
    const SIGKILL: i32 = 9;
    const SIGSTOP: i32 = 19;
    unsafe extern "C" {
        fn kill(pid: i32, signal: i32) -> i32;
    }
    let server = child.id() as i32;
    // SAFETY (all three blocks): kill(2) has no memory-safety preconditions. The server's pid, which is
    // also its group id, stays reserved until it is reaped below, so the signals cannot reach a stranger.
    // A descendant is alive when found; a pid reused since then is a race this test harness accepts.
    unsafe { kill(server, SIGSTOP) };
    let descendants = descendants(server);
    unsafe { kill(-server, SIGKILL) };
    for pid in descendants {
        // The descendant's own group, if it leads one, takes its children along; else this fails with
        // ESRCH, harmlessly.
        unsafe {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
        }
    }
    let _ = child.wait();
}

/// The pids of all live descendants of `root`, read from `/proc/*/stat`.
fn descendants(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain anything; the parent pid is the second
        // field after it.
        let after_name = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        if let Some(parent) = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
        {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// Picks a port that was free a moment ago; a server that then fails to bind it is retried on another.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Writes `opencode.json` into a new git repository with one empty commit. OpenCode derives a project id
/// from the root commit; without one every directory would share the project "global", unlike real use.
fn init_project(dir: &Path, config: &Value) -> PathBuf {
    create_dir(dir);
    let text = serde_json::to_string_pretty(config).expect("config serialises");
    fs::write(dir.join("opencode.json"), text)
        .unwrap_or_else(|e| panic!("write opencode.json: {e}"));
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    git(dir, &["init", "--quiet"]);
    git(
        dir,
        &[
            "commit",
            "--allow-empty",
            "--quiet",
            "--message",
            &format!("init {name}"),
        ],
    );
    dir.to_path_buf()
}

/// Runs git without the user's configuration, which could demand signing or hooks.
fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args([
            "-c",
            "user.name=opencode-mattermost tests",
            "-c",
            "user.email=tests@example.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "run git in {}: {e}; the OpenCode tests need git on PATH",
                dir.display()
            )
        });
    assert!(
        status.success(),
        "git {} in {} failed: {status}",
        args.join(" "),
        dir.display()
    );
}

fn create_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
}

/// Deep-merges `extra` into `base`: objects merge key by key, anything else replaces.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, extra) => *base = extra,
    }
}

fn with_directory(path: &str, directory: &Path) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!(
        "{path}{separator}directory={}",
        percent_encode(&directory.to_string_lossy())
    )
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The last `limit` bytes of a log file, for failure messages.
fn tail(path: &Path, limit: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(limit)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    format!(
        "--- tail of {} ---\n{}",
        path.display(),
        String::from_utf8_lossy(&bytes)
    )
}

/// Only this test's HOME and XDG directories, offline and away from anything of the real user's: what
/// a server and a terminal process on the same store share.
fn isolate(command: &mut Command, root: &Path) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root.join("home"))
        .env("XDG_CONFIG_HOME", root.join("xdg/config"))
        .env("XDG_DATA_HOME", root.join("xdg/data"))
        .env("XDG_STATE_HOME", root.join("xdg/state"))
        .env("XDG_CACHE_HOME", root.join("xdg/cache"))
        .env("TMPDIR", root.join("tmp"))
        .env("LANG", "C.UTF-8")
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
        .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
        .env("OPENCODE_DISABLE_SHARE", "1")
        .env("OPENCODE_DISABLE_CLAUDE_CODE", "1")
        .env("OPENCODE_DISABLE_EXTERNAL_SKILLS", "1");
}
