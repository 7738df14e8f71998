//! Sessions run by another OpenCode process (the plain TUI, `opencode run`; issue 13): every server on the
//! same store lists them, but their live events stay inside that process. They are recognised by the poll
//! (the session's `updated` time moved while our stream showed nothing of it) and followed by reading
//! their stored messages instead of streaming: each finished turn is posted whole, through the worker's
//! catch-up, whose delivery marks make it appear once across restarts.
//!
//! Pure state and texts: no IO, so the rule is tested exhaustively here.

use std::collections::HashMap;

use crate::opencode::SessionKey;

/// How often a session run elsewhere has its stored messages read: well inside the 10 s.
pub const READ_INTERVAL_MS: u64 = 4_000;

/// The root post's note for a session run in a terminal.
pub const ROOT_NOTE: &str =
    "🖥 Runs in a terminal: its answers appear here when each is complete, not streamed.";

/// Said once in the thread, when the owner's reply runs such a session on the bridge's server.
pub const REPLY_NOTE: &str = "ℹ️ This runs on the bridge's OpenCode server: the terminal will not show it until the session is reopened there.";

#[derive(Debug, Default)]
struct Seen {
    /// The session's `updated` time at the last poll.
    updated_ms: u64,
    /// The stream delivered an event of this session since the last poll.
    event_since_poll: bool,
    elsewhere: bool,
}

/// Which sessions run in another process, from what the stream and the poll show of them.
#[derive(Debug, Default)]
pub struct Elsewhere {
    seen: HashMap<SessionKey, Seen>,
}

impl Elsewhere {
    /// The stream showed an event of `key`: it runs where we listen.
    pub fn on_event(&mut self, key: &SessionKey) {
        if let Some(seen) = self.seen.get_mut(key) {
            seen.event_since_poll = true;
            seen.elsewhere = false;
        }
    }

    /// The poll listed `key` with its `updated` time; `busy_here`: our server reports it running.
    /// Returns whether the session runs elsewhere: it moved between two polls with no event of it
    /// in our stream. It stays so until the stream shows an event of it (a reply run here).
    pub fn on_poll(&mut self, key: &SessionKey, updated_ms: u64, busy_here: bool) -> bool {
        let Some(seen) = self.seen.get_mut(key) else {
            // First sight: the time to compare the next poll with.
            self.seen.insert(
                key.clone(),
                Seen {
                    updated_ms,
                    ..Seen::default()
                },
            );
            return false;
        };
        if busy_here || seen.event_since_poll {
            seen.elsewhere = false;
        } else if updated_ms > seen.updated_ms {
            seen.elsewhere = true;
        }
        seen.event_since_poll = false;
        seen.updated_ms = seen.updated_ms.max(updated_ms);
        seen.elsewhere
    }

    pub fn is_elsewhere(&self, key: &SessionKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.elsewhere)
    }

    /// The session is gone or its thread ended.
    pub fn forget(&mut self, key: &SessionKey) {
        self.seen.remove(key);
    }
}

/// The thread's notice about a reply run on the bridge's server: once per thread (`told` is kept by
/// the worker), and only while the session is run elsewhere.
pub fn reply_note(elsewhere: bool, told: &mut bool) -> Option<&'static str> {
    if !elsewhere || *told {
        return None;
    }
    *told = true;
    Some(REPLY_NOTE)
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
        assert!(!e.on_poll(&k, 100, false), "first sight only records");
        assert!(!e.on_poll(&k, 100, false), "unchanged");
        assert!(e.on_poll(&k, 150, false), "moved, stream silent");
        assert!(e.is_elsewhere(&k));
        assert!(e.on_poll(&k, 150, false), "stays elsewhere while quiet");
    }

    #[test]
    fn events_or_a_busy_status_here_mean_it_runs_here() {
        let mut e = Elsewhere::default();
        let k = key("ses_b");
        e.on_poll(&k, 100, false);
        e.on_event(&k);
        assert!(!e.on_poll(&k, 200, false), "the stream showed it move");
        assert!(!e.on_poll(&k, 300, true), "our server runs it");
        assert!(e.on_poll(&k, 400, false));
        // A reply run on our server: its events come back to us.
        e.on_event(&k);
        assert!(!e.is_elsewhere(&k));
        assert!(!e.on_poll(&k, 500, false));
        // The terminal takes it again.
        assert!(e.on_poll(&k, 600, false));
    }

    #[test]
    fn sessions_are_independent_and_forgotten() {
        let mut e = Elsewhere::default();
        let (a, b) = (key("ses_a"), key("ses_b"));
        e.on_poll(&a, 1, false);
        e.on_poll(&b, 1, false);
        e.on_event(&b);
        assert!(e.on_poll(&a, 2, false));
        assert!(!e.on_poll(&b, 2, false));
        e.forget(&a);
        assert!(!e.is_elsewhere(&a));
        assert!(!e.on_poll(&a, 3, false), "after forget, first sight again");
        // An older time (clock skew between processes) is not a move.
        assert!(!e.on_poll(&b, 1, false));
    }

    #[test]
    fn the_reply_note_is_said_once_and_only_for_sessions_run_elsewhere() {
        let mut told = false;
        assert_eq!(reply_note(false, &mut told), None);
        assert!(!told);
        assert_eq!(reply_note(true, &mut told), Some(REPLY_NOTE));
        assert_eq!(reply_note(true, &mut told), None);
    }
}
