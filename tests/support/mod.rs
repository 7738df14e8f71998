//! Servers and helpers shared by the integration tests and the benchmark: a fake Mattermost, a fake
//! OpenCode, a scripted LLM, a real `opencode serve`, and the bridge itself running in-process.
#![allow(dead_code)]

pub mod bridge;
pub mod fake_opencode;
pub mod llm;
pub mod mattermost;
pub mod opencode;
pub mod tls;
pub mod v2proxy;
mod v2record;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The OpenCode API the bridge under test speaks, from `TEST_OPENCODE_API` (`v1`, the default, or
/// `v2`). For v2 the bridge reaches the real server through `v2proxy`, which refuses every v1 route, and
/// is started with `OPENCODE_API=v2`; a test's own calls to the server stay direct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    V1,
    V2,
}

pub fn dialect() -> Dialect {
    match std::env::var("TEST_OPENCODE_API").as_deref() {
        Err(_) | Ok("") | Ok("v1") => Dialect::V1,
        Ok("v2") => Dialect::V2,
        Ok(other) => panic!(
            "TEST_OPENCODE_API={other:?} is not a dialect: set it to v1 or v2, or unset it for v1"
        ),
    }
}

/// Whether the tests run in v2, for the few checks of what v2 does differently.
pub fn is_v2() -> bool {
    dialect() == Dialect::V2
}

/// What the bridge says of a thread command that a v2 server has no route for.
pub const NOT_ON_V2: &str = "not available on an OpenCode v2 server";

impl Dialect {
    /// The value of the bridge's `OPENCODE_API` for this dialect.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::V1 => "v1",
            Dialect::V2 => "v2",
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ocmm-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How long a test waits for something the bridge does in milliseconds on an idle machine. Only a
/// failure bound: a loaded CI machine running several OpenCode servers at once can be slow.
pub const SOON: Duration = Duration::from_secs(45);

/// A thread whose result the test waits for with a deadline: a call that retries forever fails the
/// test instead of hanging it (the thread is then left behind).
pub struct Bounded<T> {
    name: String,
    result: crossbeam_channel::Receiver<std::thread::Result<T>>,
}

pub fn spawn_bounded<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Bounded<T> {
    let (sender, result) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = sender.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .expect("spawn a bounded thread");
    Bounded {
        name: name.into(),
        result,
    }
}

impl<T> Bounded<T> {
    pub fn is_finished(&self) -> bool {
        !self.result.is_empty()
    }

    /// The thread's result; its panic goes on in the caller; panics if it takes longer than `limit`.
    pub fn join_within(self, limit: Duration) -> T {
        match self.result.recv_timeout(limit) {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!(
                "{} did not finish within {limit:?}: a call that should have ended is still \
                 retrying",
                self.name
            ),
        }
    }
}

/// While alive, ends the whole test process (exit code 124) if it outlives its limit: a test stuck
/// on a wait without a deadline fails the suite instead of hanging it. Every fake Mattermost holds
/// one, so nearly every test is covered. TEST_WATCHDOG_SECS changes the limit (default 900).
pub struct Watchdog {
    key: u64,
}

type Armed = std::collections::BTreeMap<u64, (std::time::Instant, String)>;

fn armed() -> std::sync::MutexGuard<'static, Armed> {
    static ARMED: std::sync::Mutex<Armed> = std::sync::Mutex::new(Armed::new());
    ARMED.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchdog {
    pub fn arm(what: &str) -> Watchdog {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static THREAD: std::sync::Once = std::sync::Once::new();
        let limit = std::env::var("TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(900), Duration::from_secs);
        let key = NEXT.fetch_add(1, Ordering::Relaxed);
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        armed().insert(
            key,
            (
                std::time::Instant::now() + limit,
                format!("{what} of {test} is still alive after {limit:?}"),
            ),
        );
        THREAD.call_once(|| {
            std::thread::Builder::new()
                .name("test-watchdog".into())
                .spawn(watch)
                .expect("spawn the test watchdog");
        });
        Watchdog { key }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        armed().remove(&self.key);
    }
}

fn watch() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = std::time::Instant::now();
        if let Some((_, what)) = armed().values().find(|(deadline, _)| *deadline <= now) {
            // Straight to stderr: eprintln! from here would be captured with the test and lost.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "watchdog: {what}; a wait without a deadline? ending the test run"
            );
            std::process::exit(124);
        }
    }
}
