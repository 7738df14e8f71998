//! Servers and helpers shared by the integration tests and the benchmark: a fake Mattermost, a fake
//! OpenCode, a scripted LLM, a real `opencode serve`, and the bridge itself running in-process.
#![allow(dead_code)]

pub mod bridge;
pub mod fake_opencode;
pub mod llm;
pub mod mattermost;
pub mod opencode;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
