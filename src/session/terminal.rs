//! Sessions run by another OpenCode process (the plain TUI, `opencode run`; issue 13): every server on the
//! same store lists them, but their live events stay inside that process. They are recognised by the poll:
//! a new session no event of which reached us, or one whose `updated` time moved later than anything our
//! stream showed of it. They are followed by reading their stored messages instead of streaming: each
//! finished turn is posted whole (its prompt quoted), through the worker's catch-up, whose delivery marks
//! make it appear once across restarts.
//!
//! Pure state and texts: no IO, so the rule is tested exhaustively here.

use std::collections::HashMap;

use crate::opencode::{MessageInfo, Part, PartBody, Role, ServerKey, SessionKey};

/// How often a session run elsewhere has its stored messages read: well inside the 10 s.
pub const READ_INTERVAL_MS: u64 = 4_000;

/// The root post's note for a session run in a terminal.
pub const ROOT_NOTE: &str =
    "🖥 Runs in a terminal: its answers appear here when each is complete, not streamed.";

/// The prop of the note below: a restarted worker finds it and does not say it again.
pub const NOTE_PROP: &str = "opencode_terminal_note";

/// Said once in the thread, when the owner's reply runs such a session on the bridge's server.
pub const REPLY_NOTE: &str = "ℹ️ This runs on the bridge's OpenCode server: the terminal will not show it until the session is reopened there.";

/// An event's time and the session's `updated` time come from clocks of the same machine; a live turn's
/// last event and its `updated` time are this close.
const SLACK_MS: u64 = 2_000;

/// OpenCode attaches a new event stream to its bus a moment after it says `server.connected` (the
/// reader waits 500 ms before its first poll for the same reason): a session created before that
/// may have no event on it though it runs on that server.
const ATTACH_MS: u64 = 500;

/// A turn the store shows unfinished (a killed terminal never completes it) counts as finished this
/// long after its last message began, so the turns after it are not held back forever.
const STALE_TURN_MS: u64 = 300_000;

#[derive(Debug, Default)]
struct Seen {
    /// The session's `updated` time at the last poll.
    updated_ms: Option<u64>,
    /// When the stream last delivered an event of this session (bridge clock, ms since epoch).
    last_event_ms: u64,
    elsewhere: bool,
    /// Seen run elsewhere at least once in this run: its thread quotes the prompts it posts.
    ever: bool,
    /// Found by a poll with no event while we were not listening: its turns from its start are owed,
    /// but where it ran is not known.
    missed: bool,
}

/// What a poll's new session is, as far as the stream can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Our stream showed it: it runs where we listen.
    Here,
    /// Created while our stream listened, yet no event of it came: another process (a terminal)
    /// runs it.
    Terminal,
    /// Created while our stream was not listening (the bridge was down, or reconnecting): its turns
    /// from its start are owed, but where it runs shows only when it moves.
    Missed,
}

/// Which sessions run in another process, from what the stream and the poll show of them.
#[derive(Debug, Default)]
pub struct Elsewhere {
    seen: HashMap<SessionKey, Seen>,
    /// Since when each server's stream has listened (bridge clock); absent while it is down.
    listening: HashMap<ServerKey, u64>,
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
            seen.ever = true;
        } else if busy_here {
            seen.elsewhere = false;
        }
        seen.updated_ms = Some(previous.max(updated_ms));
        moved_elsewhere
    }

    /// `server`'s stream is up (`Some(now_ms)`) or down (`None`).
    pub fn listening(&mut self, server: &ServerKey, since_ms: Option<u64>) {
        match since_ms {
            Some(ms) => {
                self.listening.entry(server.clone()).or_insert(ms);
            }
            None => {
                self.listening.remove(server);
            }
        }
    }

    /// A poll listed `key`, a new session that wants a thread, created at `created_ms` and last
    /// updated at `updated_ms` (`now_ms`: the bridge's clock). None: too new to tell (its
    /// `session.created` may still be on its way), so the next poll decides.
    pub fn on_found(
        &mut self,
        key: &SessionKey,
        created_ms: u64,
        updated_ms: u64,
        now_ms: u64,
    ) -> Option<Found> {
        if self.seen.get(key).is_some_and(|s| s.last_event_ms > 0) {
            return Some(Found::Here);
        }
        if now_ms < created_ms.saturating_add(SLACK_MS) {
            return None;
        }
        let listened = self
            .listening
            .get(&key.server)
            .is_some_and(|&since| created_ms >= since.saturating_add(ATTACH_MS));
        let seen = self.seen.entry(key.clone()).or_default();
        if listened {
            seen.elsewhere = true;
            seen.ever = true;
            Some(Found::Terminal)
        } else {
            // What it did so far is caught up; only a later move with no event says where it runs.
            seen.missed = true;
            seen.updated_ms = Some(updated_ms);
            Some(Found::Missed)
        }
    }

    pub fn is_elsewhere(&self, key: &SessionKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.elsewhere)
    }

    /// Whether `key` was seen run elsewhere since the bridge started, even if it runs here now.
    pub fn ever_elsewhere(&self, key: &SessionKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.ever)
    }

    /// Whether a new thread for `key` owes its turns from the session's start: nothing of it was
    /// streamed (it runs elsewhere, or was created while we did not listen).
    pub fn owed_from_start(&self, key: &SessionKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.ever || s.missed)
    }

    /// The session is gone or its thread ended.
    pub fn forget(&mut self, key: &SessionKey) {
        self.seen.remove(key);
    }
}

/// The root post of a session run elsewhere: the usual root, then the note.
pub fn root_text(root: String, terminal: bool) -> String {
    match terminal {
        true => format!("{root}\n\n{ROOT_NOTE}"),
        false => root,
    }
}

/// The prompt of a stored turn, quoted, to go above its answer: the thread never showed it, since it
/// was typed in the terminal. None when the turn does not start with a prompt that has text.
pub fn quoted_prompt(turn: &[(MessageInfo, Vec<Part>)]) -> Option<String> {
    let (info, parts) = turn.first()?;
    if info.role != Role::User || from_the_thread(&info.id) {
        return None;
    }
    let text: Vec<&str> = parts
        .iter()
        .filter_map(|p| match &p.body {
            PartBody::Text(text) if !text.trim().is_empty() => Some(text.trim()),
            _ => None,
        })
        .collect();
    if text.is_empty() {
        return None;
    }
    let quoted: Vec<String> = text
        .join("\n")
        .lines()
        .map(|line| format!("> {line}").trim_end().to_string())
        .collect();
    Some(format!("🖥 In the terminal:\n{}", quoted.join("\n")))
}

/// Whether a user message is a prompt the bridge sent from the thread (`opencode/ids.rs`: its id ends
/// in its post's id, lower-case letters and digits), which the thread shows already. OpenCode's own
/// ids end in 14 random mixed-case characters: all lower-case by chance about once in 2,000, and such
/// a terminal prompt is then not quoted.
fn from_the_thread(message_id: &str) -> bool {
    message_id
        .strip_prefix("msg_")
        .and_then(|rest| rest.get(12..))
        .is_some_and(|tail| {
            tail.len() == 14
                && tail
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// Whether the stored turn has ended, though nobody tells us (its process is elsewhere): its last
/// message is an answer that completed with no tool call pending after it (a tool call is followed by
/// another answer), or it failed, or it has been silent for long.
pub fn turn_finished(turn: &[(MessageInfo, Vec<Part>)], now_ms: u64) -> bool {
    let Some((last, parts)) = turn.last() else {
        return false;
    };
    if now_ms > last.created_ms.saturating_add(STALE_TURN_MS) {
        return true;
    }
    if last.role != Role::Assistant || last.completed_ms.is_none() {
        return false;
    }
    last.error.is_some() || !parts.iter().any(|p| matches!(p.body, PartBody::Tool(_)))
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
    fn a_session_seen_run_elsewhere_stays_a_terminal_one_for_the_run() {
        let mut e = Elsewhere::default();
        let k = key("ses_a");
        assert!(!e.ever_elsewhere(&k), "never seen");
        e.on_poll(&k, 100_000, false, 1);
        assert!(e.ever_elsewhere(&k));
        e.on_event(&k, 200_000);
        assert!(
            e.ever_elsewhere(&k),
            "a reply run here does not change where it came from"
        );
        let b = key("ses_b");
        e.on_event(&b, 100_000);
        e.on_poll(&b, 100_000, false, 1);
        assert!(!e.ever_elsewhere(&b), "runs here");
        e.forget(&k);
        assert!(!e.ever_elsewhere(&k));
    }

    #[test]
    fn a_new_session_no_event_showed_runs_in_a_terminal_once_old_enough_to_tell() {
        let mut e = Elsewhere::default();
        let k = key("ses_t");
        e.listening(&k.server, Some(50_000));
        assert_eq!(
            e.on_found(&k, 100_000, 100_000, 101_000),
            None,
            "its event may come"
        );
        assert!(!e.ever_elsewhere(&k));
        assert_eq!(
            e.on_found(&k, 100_000, 100_000, 104_000),
            Some(Found::Terminal)
        );
        assert!(e.is_elsewhere(&k) && e.ever_elsewhere(&k) && e.owed_from_start(&k));
        let here = key("ses_h");
        e.on_event(&here, 100_500);
        assert_eq!(
            e.on_found(&here, 100_000, 100_000, 100_600),
            Some(Found::Here)
        );
        assert!(!e.ever_elsewhere(&here) && !e.owed_from_start(&here));
        // A reply run here later: it runs here now, but the thread still quotes terminal prompts.
        e.on_event(&k, 110_000);
        assert!(!e.is_elsewhere(&k) && e.ever_elsewhere(&k));
    }

    #[test]
    fn a_session_created_while_the_stream_did_not_listen_is_owed_but_not_called_a_terminal_one() {
        let mut e = Elsewhere::default();
        let k = key("ses_m");
        // Created while the bridge was down: the first poll after the stream came up finds it.
        e.listening(&k.server, Some(200_000));
        assert_eq!(
            e.on_found(&k, 100_000, 100_000, 200_600),
            Some(Found::Missed)
        );
        assert!(!e.ever_elsewhere(&k) && e.owed_from_start(&k));
        // Nor in the moment after a reconnect, before OpenCode attaches the stream.
        let r = key("ses_r");
        assert_eq!(
            e.on_found(&r, 200_400, 200_400, 204_000),
            Some(Found::Missed)
        );
        // A stream that went down and came back listens from its return.
        e.listening(&k.server, None);
        let t = key("ses_t");
        assert_eq!(
            e.on_found(&t, 300_000, 300_000, 303_000),
            Some(Found::Missed)
        );
        e.listening(&k.server, Some(400_000));
        e.listening(&k.server, Some(450_000));
        let u = key("ses_u");
        assert_eq!(
            e.on_found(&u, 430_000, 430_000, 433_000),
            Some(Found::Terminal)
        );
        // A missed session that ran meanwhile is not a terminal one for that; a later move is.
        let v = key("ses_v");
        assert_eq!(
            e.on_found(&v, 300_000, 350_000, 460_000),
            Some(Found::Missed)
        );
        assert!(!e.on_poll(&v, 350_000, false, 300_000));
        assert!(!e.ever_elsewhere(&v));
        assert!(e.on_poll(&v, 470_000, false, 300_000));
        assert!(e.ever_elsewhere(&v));
    }

    fn message(id: &str, role: Role, created_ms: u64, completed_ms: Option<u64>) -> MessageInfo {
        let mut info = MessageInfo::new(id.to_string(), role, created_ms);
        info.completed_ms = completed_ms;
        info
    }

    fn part(message_id: &str, body: PartBody) -> Part {
        Part {
            id: format!("prt_{message_id}"),
            message_id: message_id.to_string(),
            body,
        }
    }

    #[test]
    fn a_terminal_prompt_is_quoted_line_by_line() {
        let turn = vec![(
            message("msg_1", Role::User, 1, None),
            vec![
                part("msg_1", PartBody::Text("  first line\n\nsecond  ".into())),
                part("msg_1", PartBody::Other("file".into())),
            ],
        )];
        assert_eq!(
            quoted_prompt(&turn).as_deref(),
            Some("🖥 In the terminal:\n> first line\n>\n> second")
        );
        // A prompt the bridge sent from the thread is there already.
        let id = crate::opencode::ids::prompt_message_id("pzt9dwcngodmw6rxzxp8ynxh1r", 5, None);
        let mut sent = turn.clone();
        sent[0].0.id = id;
        assert_eq!(quoted_prompt(&sent), None);
        let mut typed = turn.clone();
        typed[0].0.id = "msg_2432e5afe0019c3hgL6erIfD6G".into();
        assert!(quoted_prompt(&typed).is_some());
        let answer_only = vec![(message("msg_2", Role::Assistant, 1, Some(2)), vec![])];
        assert_eq!(quoted_prompt(&answer_only), None);
        assert_eq!(quoted_prompt(&[]), None);
    }

    #[test]
    fn a_stored_turn_is_finished_when_its_last_answer_completed_without_a_pending_tool() {
        let now = 1_000_000;
        let user = (message("msg_1", Role::User, now - 9_000, None), vec![]);
        assert!(
            !turn_finished(std::slice::from_ref(&user), now),
            "no answer yet"
        );
        let tool = PartBody::Tool(crate::opencode::ToolCall {
            tool: "bash".into(),
            status: crate::opencode::ToolStatus::Completed,
            main_argument: "ls".into(),
            title: String::new(),
            error: String::new(),
            started_ms: None,
            ended_ms: None,
        });
        let called = (
            message("msg_2", Role::Assistant, now - 8_000, Some(now - 7_000)),
            vec![part("msg_2", tool)],
        );
        let running = (message("msg_3", Role::Assistant, now - 7_000, None), vec![]);
        let done = (
            message("msg_3", Role::Assistant, now - 7_000, Some(now - 6_000)),
            vec![part("msg_3", PartBody::Text("ok".into()))],
        );
        assert!(
            !turn_finished(&[user.clone(), called.clone()], now),
            "a tool call goes on"
        );
        assert!(!turn_finished(
            &[user.clone(), called.clone(), running.clone()],
            now
        ));
        assert!(turn_finished(&[user.clone(), called.clone(), done], now));
        let mut failed = called.clone();
        failed.0.error = Some(("MessageAbortedError".into(), "aborted".into()));
        assert!(turn_finished(&[user.clone(), failed], now));
        assert!(
            turn_finished(&[user, called, running], now + STALE_TURN_MS),
            "a terminal killed mid-turn holds nothing back for ever"
        );
    }

    #[test]
    fn the_root_of_a_terminal_session_says_so() {
        assert_eq!(root_text("root".into(), false), "root");
        assert_eq!(
            root_text("root".into(), true),
            format!("root\n\n{ROOT_NOTE}")
        );
    }
}
