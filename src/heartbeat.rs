//! The heartbeat: when the bridge last heard from each side, and the thread that writes it to the
//! state directory every ~30 s, so that `status` and watchdogs can tell a live bridge from a hung one
//! without connecting anywhere.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::store::{Heartbeat, HeartbeatWriter};

/// How often the running bridge rewrites the heartbeat file.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// When one side was last heard from, in ms since the epoch (0: never). Clones share the value: the
/// reader thread of that side stamps it, the heartbeat thread reads it. One server's stamp also
/// stamps the OpenCode side's (`also`).
#[derive(Debug, Clone, Default)]
pub struct Heard {
    at: Arc<AtomicU64>,
    also: Option<Arc<AtomicU64>>,
}

/// Both sides' `Heard`, and each OpenCode server's.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    pub mattermost: Heard,
    pub opencode: Heard,
    pub servers: Servers,
}

impl Heard {
    /// Records that something arrived just now.
    pub fn now(&self) {
        let now = crate::log::now_ms();
        self.at.store(now, Ordering::Relaxed);
        if let Some(also) = &self.also {
            also.store(now, Ordering::Relaxed);
        }
    }

    pub fn last_ms(&self) -> u64 {
        self.at.load(Ordering::Relaxed)
    }
}

/// Each followed OpenCode server's `Heard`, by its name: `status` shows when each was last heard
/// from, so one silent server among several is visible.
#[derive(Debug, Clone, Default)]
pub struct Servers(Arc<Mutex<BTreeMap<String, Heard>>>);

impl Servers {
    /// The stamp of server `name`, which also stamps `side` (the OpenCode side as a whole).
    pub fn add(&self, name: &str, side: &Heard) -> Heard {
        let heard = Heard {
            at: Arc::default(),
            also: Some(side.at.clone()),
        };
        self.lock().insert(name.to_string(), heard.clone());
        heard
    }

    /// The server is no longer followed.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Name → when last heard (ms since the epoch, 0: never).
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(name, heard)| (name.clone(), heard.last_ms()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Heard>> {
        // Only plain inserts and reads happen under the lock: a panic cannot leave it half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes the heartbeat at once, every `INTERVAL`, as soon as a side is first heard from, and a
/// last time (marked stopped) when `stop` disconnects. A failed write is logged once per run of
/// failures; the bridge keeps working without it.
pub fn run(writer: HeartbeatWriter, liveness: Liveness, stop: Receiver<()>) {
    let mut beat = Heartbeat {
        pid: std::process::id(),
        version: crate::config::VERSION.to_string(),
        started_ms: crate::log::now_ms(),
        ..Heartbeat::default()
    };
    let mut failing = false;
    let mut write = |beat: &mut Heartbeat, stopped: bool| {
        beat.written_ms = crate::log::now_ms();
        beat.mattermost_heard_ms = liveness.mattermost.last_ms();
        beat.opencode_heard_ms = liveness.opencode.last_ms();
        beat.opencode_servers = liveness.servers.snapshot();
        beat.stopped = stopped;
        match writer.write(beat) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                crate::warn!("heartbeat not written: {e}");
            }
            Err(_) => {}
        }
    };
    write(&mut beat, false);
    let mut last_write = Instant::now();
    loop {
        // A side heard for the first time is news worth writing at once: `status` right after
        // start-up should not wait 30 s to call the bridge healthy.
        let first_contact = (beat.mattermost_heard_ms == 0 && liveness.mattermost.last_ms() != 0)
            || (beat.opencode_heard_ms == 0 && liveness.opencode.last_ms() != 0)
            || first_from_a_server(&beat.opencode_servers, &liveness.servers.snapshot());
        if first_contact || last_write.elapsed() >= INTERVAL {
            write(&mut beat, false);
            last_write = Instant::now();
        }
        crate::memory::return_owed_heap();
        if crate::stopped(&stop, Duration::from_secs(1)) {
            write(&mut beat, true);
            return;
        }
    }
}

/// A server heard for the first time, or one that was not in the last heartbeat.
fn first_from_a_server(written: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> bool {
    now.iter()
        .any(|(name, &ms)| ms != 0 && written.get(name).is_none_or(|&w| w == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_stamp_also_stamps_the_opencode_side_and_is_listed_by_name() {
        let side = Heard::default();
        let servers = Servers::default();
        let home = servers.add("home", &side);
        servers.add("build", &side);
        assert_eq!(side.last_ms(), 0);
        home.now();
        assert!(side.last_ms() > 0);
        let snapshot = servers.snapshot();
        assert_eq!(snapshot["home"], side.last_ms());
        assert_eq!(snapshot["build"], 0, "never heard");
        servers.remove("build");
        assert_eq!(servers.snapshot().len(), 1);
    }

    #[test]
    fn the_first_word_from_a_server_is_written_at_once() {
        let written = BTreeMap::from([("home".to_string(), 5), ("build".to_string(), 0)]);
        assert!(!first_from_a_server(&written, &written));
        let mut now = written.clone();
        now.insert("build".to_string(), 9);
        assert!(first_from_a_server(&written, &now));
        let mut found = written.clone();
        found.insert("web".to_string(), 0);
        assert!(!first_from_a_server(&written, &found), "not heard yet");
        found.insert("web".to_string(), 3);
        assert!(first_from_a_server(&written, &found));
    }
}
