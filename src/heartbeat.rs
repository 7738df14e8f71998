//! The heartbeat: when the bridge last heard from each side, and the thread that writes it to the
//! state directory every ~30 s, so that `status` and watchdogs can tell a live bridge from a hung one
//! without connecting anywhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::store::{Heartbeat, HeartbeatWriter};

/// How often the running bridge rewrites the heartbeat file.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// When one side was last heard from, in ms since the epoch (0: never). Clones share the value: the
/// reader thread of that side stamps it, the heartbeat thread reads it.
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<AtomicU64>);

/// Both sides' `Heard`.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    pub mattermost: Heard,
    pub opencode: Heard,
}

impl Heard {
    /// Records that something arrived just now.
    pub fn now(&self) {
        self.0.store(crate::log::now_ms(), Ordering::Relaxed);
    }

    pub fn last_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
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
            || (beat.opencode_heard_ms == 0 && liveness.opencode.last_ms() != 0);
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
