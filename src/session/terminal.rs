//! Sessions run by another OpenCode process (the plain TUI, `opencode run`; issue 13): every server on the
//! same store lists them, but their live events stay inside that process. They are recognised by the poll
//! (the session's `updated` time moved later than anything our stream showed of it) and followed by reading
//! their stored messages instead of streaming: each finished turn is posted whole, through the worker's
//! catch-up, whose delivery marks make it appear once across restarts.
//!
//! Pure state and texts: no IO, so the rule is tested exhaustively here.

use std::collections::{HashMap, HashSet};

use crate::opencode::SessionKey;

/// How often a session run elsewhere has its stored messages read: well inside the 10 s.
pub const READ_INTERVAL_MS: u64 = 4_000;

/// The root post's note for a session run in a terminal.
pub const ROOT_NOTE: &str =
    "🖥 Runs in a terminal: its answers appear here when each is complete, not streamed.";

/// Said once in the thread, when the owner's reply runs such a session on the bridge's server.
pub const REPLY_NOTE: &str = "ℹ️ This runs on the bridge's OpenCode server: the terminal will not show it until the session is reopened there.";

/// An event's time and the session's `updated` time come from clocks of the same machine; a live turn's
/// last event and its `updated` time are this close.
const SLACK_MS: u64 = 2_000;

#[derive(Debug, Default)]
struct Seen {
    /// The session's `updated` time at the last poll.
    updated_ms: Option<u64>,
    /// When the stream last delivered an event of this session (bridge clock, ms since epoch).
    last_event_ms: u64,
    elsewhere: bool,
}

/// Which sessions run in another process, from what the stream and the poll show of them.
#[derive(Debug, Default)]
pub struct Elsewhere {
    seen: HashMap<SessionKey, Seen>,
    /// Threads told that a reply runs on the bridge's server (once each, per bridge run).
    told: HashSet<SessionKey>,
}

impl Elsewhere {
    /// The stream showed an event of `key` at `now_ms`: it runs where we listen.
    pub fn on_event(&mut self, key: &SessionKey, now_ms: u64) {
        let seen = self.seen.entry(key.clone()).or_default();
        seen.last_event_ms = now_ms;
        seen.elsewhere = false;
    }

    /// The poll listed `key` with its `updated` time; `busy_here`: our server reports it running;
    /// `since_ms`: when its thread was last complete, the mark for the first poll. Returns whether it
    /// moved elsewhere since the last poll: later than any event of it in our stream, so its turns
    /// are to be read from the store.
    pub fn on_poll(
        &mut self,
        key: &SessionKey,
        updated_ms: u64,
        busy_here: bool,
        since_ms: u64,
    ) -> bool {
        let seen = self.seen.entry(key.clone()).or_default();
        let previous = seen.updated_ms.unwrap_or(since_ms);
        let moved_elsewhere =
            !busy_here && updated_ms > previous && updated_ms > seen.last_event_ms + SLACK_MS;
        // Stays so until our stream or our server shows it running here.
        if moved_elsewhere {
            seen.elsewhere = true;
        } else if busy_here {
            seen.elsewhere = false;
        }
        seen.updated_ms = Some(previous.max(updated_ms));
        moved_elsewhere
    }

    pub fn is_elsewhere(&self, key: &SessionKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.elsewhere)
    }

    /// The owner's reply runs `key` on the bridge's server: the note to post first, once per thread,
    /// and only while the session is run elsewhere.
    pub fn reply_note(&mut self, key: &SessionKey) -> Option<&'static str> {
        (self.is_elsewhere(key) && self.told.insert(key.clone())).then_some(REPLY_NOTE)
    }

    /// The session is gone or its thread ended.
    pub fn forget(&mut self, key: &SessionKey) {
        self.seen.remove(key);
        self.told.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::ServerKey;

    fn key(id: &str) -> SessionKey {
        SessionKey {
            server: ServerKey("local".to_string()),
            session_id: id.to_string(),
        }
    }

    #[test]
    fn a_session_that_moves_with_no_event_runs_elsewhere() {
        let mut e = Elsewhere::default();
        let k = key("ses_a");
        assert!(
            !e.on_poll(&k, 100_000, false, 100_000),
            "unchanged since its thread was complete"
        );
        assert!(
            e.on_poll(&k, 150_000, false, 100_000),
            "moved, stream silent"
        );
        assert!(e.is_elsewhere(&k));
        assert!(!e.on_poll(&k, 150_000, false, 100_000), "nothing new");
        assert!(e.is_elsewhere(&k), "until it runs here");
        // First sight of a session that moved after its thread was last complete.
        let b = key("ses_b");
        assert!(e.on_poll(&b, 500_000, false, 100_000));
    }

    #[test]
    fn events_or_a_busy_status_here_mean_it_runs_here() {
        let mut e = Elsewhere::default();
        let k = key("ses_b");
        e.on_poll(&k, 10_000, false, 10_000);
        e.on_event(&k, 19_500);
        assert!(
            !e.on_poll(&k, 20_000, false, 0),
            "the stream showed it move"
        );
        assert!(!e.is_elsewhere(&k));
        assert!(!e.on_poll(&k, 30_000, true, 0), "our server runs it");
        assert!(
            e.on_poll(&k, 40_000, false, 0),
            "moved long after the last event"
        );
        // A reply run on our server: its events come back to us.
        e.on_event(&k, 41_000);
        assert!(!e.is_elsewhere(&k));
        assert!(!e.on_poll(&k, 42_000, false, 0));
    }

    #[test]
    fn sessions_are_independent_and_forgotten() {
        let mut e = Elsewhere::default();
        let (a, b) = (key("ses_a"), key("ses_b"));
        e.on_poll(&a, 1, false, 1);
        e.on_poll(&b, 1, false, 1);
        e.on_event(&b, 10_000);
        assert!(e.on_poll(&a, 20_000, false, 1));
        assert!(!e.on_poll(&b, 10_500, false, 1));
        e.forget(&a);
        assert!(!e.is_elsewhere(&a));
        // An older time (clock skew between processes) is not a move.
        assert!(!e.on_poll(&b, 5, false, 1));
    }

    #[test]
    fn the_reply_note_is_said_once_and_only_for_sessions_run_elsewhere() {
        let mut e = Elsewhere::default();
        let k = key("ses_a");
        assert_eq!(e.reply_note(&k), None, "never seen");
        e.on_poll(&k, 100_000, false, 1);
        assert_eq!(e.reply_note(&k), Some(REPLY_NOTE));
        assert_eq!(e.reply_note(&k), None, "once");
        let b = key("ses_b");
        e.on_event(&b, 100_000);
        e.on_poll(&b, 100_000, false, 1);
        assert_eq!(e.reply_note(&b), None, "runs here");
    }
}
