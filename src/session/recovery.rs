//! Continuing where an earlier run left off: the reply posts, completion lines and request posts it
//! made in the thread (found by their props), a reply it cut off mid-stream, a prompt it may already
//! have handed to OpenCode, and the answers OpenCode finished while no worker watched.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::json;

use crate::opencode::rest::OcError;
use crate::reply;

use super::reply_posts::SentPost;
use super::{Delivery, StoredMessage, Worker};

/// What an earlier run left in this worker's thread, and how far the thread is delivered.
pub(super) struct Recovery {
    /// Set when a previous run began creating the root: look for it before posting one.
    pub(super) find_root_since: Option<u64>,
    pub(super) delivery: Delivery,
    pub(super) looked_for_cut_off: bool,
    /// The thread was opened by an earlier run, which may have left a reply or a request post in it.
    pub(super) took_over: bool,
    /// What an earlier run posted in this thread, by prompt; read once, when first needed.
    pub(super) earlier: Option<Earlier>,
    /// v2: the end `seq` of the turn the catch-up is posting, for its `Delivered` report.
    pub(super) posting_seq: Option<u64>,
}

impl Recovery {
    pub(super) fn new(delivery: Delivery, find_root_since: Option<u64>) -> Recovery {
        Recovery {
            find_root_since,
            delivery,
            looked_for_cut_off: false,
            took_over: false,
            earlier: None,
            posting_seq: None,
        }
    }
}

/// The reply posts and completion lines found in the thread, by the prompt they answer.
#[derive(Default)]
pub(super) struct Earlier {
    /// False when the thread could not be read: the older clues (`streaming_post_id`) then apply.
    read: bool,
    replies: HashMap<String, Vec<SentPost>>,
    done: HashSet<String>,
    /// `REQUEST_PROP` value → the post showing it.
    requests: HashMap<String, String>,
    /// The thread already says that replies do not show in the terminal (`terminal::NOTE_PROP`).
    pub(super) terminal_note: bool,
    /// The root says the session runs in a terminal (`terminal::ROOT_NOTE`).
    pub(super) terminal_root: bool,
}

/// Reply posts carry the id of the user message they answer, and the completion line carries it
/// under `DONE_PROP`: a worker started after a crash finds the reply it had begun, or finished,
/// instead of posting it again.
pub(super) const PROMPT_PROP: &str = "opencode_prompt";
pub(super) const DONE_PROP: &str = "opencode_done";

/// Permission and question posts carry their request, so a restarted worker binds a request still
/// waiting to the post that shows it instead of posting it again.
pub(super) const REQUEST_PROP: &str = "opencode_request";

impl Worker {
    /// The posts of the reply to `prompt_key` that an earlier run began, in order; empty when none.
    pub(super) fn earlier_reply(&mut self, prompt_key: Option<&str>) -> Vec<SentPost> {
        let earlier = self.earlier();
        if earlier.read {
            return prompt_key
                .and_then(|key| earlier.replies.get(key))
                .cloned()
                .unwrap_or_default();
        }
        // The thread could not be read: the saved post id, or the thread's last unfinished reply.
        let cut_off = self
            .recovery
            .delivery
            .streaming_post_id
            .take()
            .or_else(|| self.find_cut_off_reply());
        cut_off
            .map(|id| {
                vec![SentPost {
                    id,
                    text: String::new(),
                }]
            })
            .unwrap_or_default()
    }

    pub(super) fn earlier_done(&mut self, prompt_key: &str) -> bool {
        self.earlier().done.contains(prompt_key)
    }

    /// Posts what a waiting request asks, tagged with `request_key`; or, after a restart, finds the
    /// post an earlier run made for it. Returns the post's id.
    pub(super) fn post_request(&mut self, request_key: &str, text: &str) -> Option<String> {
        if let Some(post_id) = self.earlier().requests.get(request_key).cloned() {
            crate::info!(
                "[{}] request {request_key} is still waiting; its post {post_id} answers it again",
                self.short()
            );
            return Some(post_id);
        }
        self.post_tagged(text, Some(json!({ REQUEST_PROP: request_key })))
    }

    /// Reads the thread once per worker that took over a thread from an earlier run (a worker that
    /// opened the thread itself has nothing earlier to find).
    pub(super) fn earlier(&mut self) -> &Earlier {
        if self.recovery.earlier.is_none() {
            let mut earlier = Earlier::default();
            if self.recovery.took_over {
                match crate::mattermost::search::thread_posts(&self.mattermost, &self.root_post_id)
                {
                    Ok(posts) => {
                        earlier.read = true;
                        for post in posts.into_iter().filter(|p| p.user_id == self.bot_user_id) {
                            let prop = |name: &str| {
                                post.props
                                    .get(name)
                                    .and_then(|v| v.as_str())
                                    .map(str::to_string)
                            };
                            if let Some(key) = prop(PROMPT_PROP) {
                                earlier.replies.entry(key).or_default().push(SentPost {
                                    id: post.id.clone(),
                                    text: post.message.clone(),
                                });
                            }
                            if let Some(key) = prop(DONE_PROP) {
                                earlier.done.insert(key);
                            }
                            if let Some(key) = prop(REQUEST_PROP) {
                                earlier.requests.insert(key, post.id.clone());
                            }
                            earlier.terminal_note |=
                                post.props.get(super::terminal::NOTE_PROP).is_some();
                            earlier.terminal_root |= post.id == self.root_post_id
                                && post.message.contains(super::terminal::ROOT_NOTE);
                        }
                    }
                    Err(e) => crate::warn!(
                        "[{}] thread not read, so a reply begun before the restart is found by its last post only: {e}",
                        self.short()
                    ),
                }
            } else {
                earlier.read = true;
            }
            self.recovery.earlier = Some(earlier);
        }
        self.recovery.earlier.get_or_insert_with(Earlier::default)
    }

    /// A reply cut off by a crash before its post id was saved: the thread's last bot post, when it
    /// still shows a streaming reply. Looked for once per worker, on its first reply.
    pub(super) fn find_cut_off_reply(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.recovery.looked_for_cut_off, true) {
            return None;
        }
        let posts =
            match crate::mattermost::search::thread_posts(&self.mattermost, &self.root_post_id) {
                Ok(posts) => posts,
                Err(e) => {
                    crate::debug!("[{}] thread not read: {e}", self.short());
                    return None;
                }
            };
        let last = posts
            .iter()
            .rev()
            .find(|p| p.user_id == self.bot_user_id && p.id != self.root_post_id)?;
        reply::is_unfinished_reply(&last.message).then(|| last.id.clone())
    }

    /// Whether the session already has the prompt from `post_id`, sent from `since_ms` on (when it
    /// was owed): a prompt handed over just before a crash must not run twice. The bridge's prompts
    /// carry their post in their message id, so this is exact.
    pub(super) fn already_sent(&mut self, post_id: &str, since_ms: u64) -> bool {
        let messages = match self.stored_messages() {
            Ok(messages) => messages,
            Err(e) => {
                crate::warn!(
                    "[{}] could not check whether prompt {post_id} arrived before the restart ({e}); sending it",
                    self.short()
                );
                return false;
            }
        };
        messages.iter().any(|(info, _)| {
            info.role == crate::opencode::Role::User
                && crate::opencode::ids::is_prompt_of(&info.id, post_id, since_ms)
        })
    }

    /// v2, before a taken-over turn's first reply post, when its prompt is still unknown (at
    /// worker start OpenCode had not stored even the prompt yet): the stored parent of the
    /// answer being streamed, so the posts carry the prompt and a later run continues them.
    /// `streaming`: the turn is still running, so a prompt that ends the stored messages is its
    /// own (a finished turn shown late takes only its stored answer's parent).
    pub(super) fn learn_prompt_key(&mut self, streaming: bool) {
        if self.opencode.dialect() != crate::opencode::Dialect::V2 || !self.recovery.took_over {
            return;
        }
        let answer = self
            .tracker
            .turn
            .as_ref()
            .and_then(|turn| turn.last_assistant_id())
            .map(str::to_string);
        let stored = match self.stored_messages() {
            Ok(stored) => stored,
            Err(e) => {
                crate::debug!("[{}] running answer's prompt not read: {e}", self.short());
                return;
            }
        };
        let prompt = answer
            .and_then(|id| stored.iter().find(|(info, _)| info.id == id))
            .and_then(|(info, _)| info.parent_id.clone())
            .or_else(|| streaming.then(|| running_answer(&stored).1).flatten());
        if let Some(prompt) = prompt {
            self.tracker.adopt_prompt(&prompt);
            self.reply.key = Some(prompt);
        }
    }

    /// The poll says idle while the sent prompt's own message never came on the stream: the
    /// stream was not connected when OpenCode took it (a bridge just started, or reconnecting).
    /// Live v2 answers name no parent, so nothing else would ever show the prompt taken, and the
    /// turn, with every prompt queued behind it, would wait forever. The stored messages tell.
    pub(super) fn confirm_prompt_taken(&mut self) {
        let Some(prompt_id) = self.tracker.awaited_prompt().map(str::to_string) else {
            return;
        };
        match self.stored_messages() {
            Ok(stored) if stored.iter().any(|(info, _)| info.id == prompt_id) => {
                crate::debug!(
                    "[{}] prompt {prompt_id} is stored though the stream never showed it",
                    self.short()
                );
                self.tracker.prompt_taken();
            }
            Ok(_) => {}
            Err(e) => crate::debug!("[{}] stored messages not read: {e}", self.short()),
        }
    }

    /// v2: the durable log's position once the turn whose last answer is `message_id` is in the
    /// thread: the `seq` of the event that ended it. None on v1, or when the log cannot tell (the
    /// saved position then stays).
    pub(super) fn delivered_seq(&mut self, message_id: Option<&str>) -> Option<u64> {
        if let Some(seq) = self.recovery.posting_seq.take() {
            return Some(seq);
        }
        if self.opencode.dialect() != crate::opencode::Dialect::V2 {
            return None;
        }
        let message_id = message_id?;
        let after = self.recovery.delivery.seq.unwrap_or(0);
        let log = match crate::opencode::v2::rest::read_log(
            &self.opencode,
            &self.key.session_id,
            after,
        ) {
            Ok(log) => log,
            Err(e) => {
                crate::warn!("[{}] durable log not read: {e}", self.short());
                return None;
            }
        };
        crate::opencode::v2::decode::ended_turns(&self.key.session_id, after, &log)
            .into_iter()
            .find(|turn| turn.messages.iter().any(|(m, _)| m.id == message_id))
            .map(|turn| turn.end_seq)
    }

    /// v2, with a saved position: posts exactly the turns that ended in the durable log after it.
    /// False when there is no position to go by (v1, or a thread from before v2), so the caller
    /// goes by the stored messages instead.
    fn catch_up_from_log(&mut self) -> bool {
        if self.opencode.dialect() != crate::opencode::Dialect::V2 {
            return false;
        }
        let Some(after) = self.recovery.delivery.seq else {
            return false;
        };
        let log = match crate::opencode::v2::rest::read_log(
            &self.opencode,
            &self.key.session_id,
            after,
        ) {
            Ok(log) => log,
            // Deleted: the router is ending the thread.
            Err(OcError::SessionNotFound(_)) => return true,
            Err(e) => {
                crate::warn!("[{}] missed answers not read: {e}", self.short());
                return true;
            }
        };
        let turns = crate::opencode::v2::decode::ended_turns(&self.key.session_id, after, &log);
        crate::debug!(
            "[{}] catch-up from the durable log after seq {after}: {} turn(s)",
            self.short(),
            turns.len()
        );
        for turn in turns {
            let finished_ms = turn
                .messages
                .iter()
                .filter_map(|(info, _)| info.completed_ms)
                .max()
                .unwrap_or(0);
            let began_ms = turn
                .messages
                .first()
                .map_or(finished_ms, |(info, _)| info.created_ms);
            if let Some((newest, _)) = turn.messages.last() {
                self.tracker.saw_message(&newest.id);
            }
            crate::info!(
                "[{}] posting an answer finished while the bridge was away (log seq {})",
                self.short(),
                turn.end_seq
            );
            self.recovery.posting_seq = Some(turn.end_seq);
            self.tracker.begin(Instant::now(), None);
            self.complete_turn(
                Some(&turn.messages),
                Some(finished_ms.saturating_sub(began_ms)),
                false,
            );
            // A turn that showed nothing reports nothing: its position still counts.
            if self.recovery.posting_seq.take().is_some() {
                self.recovery.delivery.seq = Some(turn.end_seq);
            }
        }
        true
    }

    /// v2, a session already running at worker start: its stream no longer says which prompt the
    /// running answer is for (v2 step events name no parent), so the stored answer tells the turn,
    /// and a reply an earlier run was streaming for that prompt is continued, not posted again.
    pub(super) fn learn_running_answer(&mut self) {
        if self.opencode.dialect() != crate::opencode::Dialect::V2 {
            return;
        }
        let mut stored = match self.stored_messages() {
            Ok(stored) => stored,
            Err(e) => {
                crate::debug!("[{}] running answer not read: {e}", self.short());
                return;
            }
        };
        let (running, prompt) = running_answer(&stored);
        // Live v2 steps name no parent: without this the reply's posts carry no prompt key, and
        // a later run cannot find them and posts the answer again.
        if let Some(prompt) = prompt {
            self.tracker.adopt_prompt(&prompt);
        }
        let Some((answer, parts)) = running.map(|i| stored.swap_remove(i)) else {
            return;
        };
        let now = Instant::now();
        let session_id = self.key.session_id.clone();
        self.tracker.apply(
            crate::opencode::Event::MessageUpdated {
                session_id: session_id.clone(),
                message: answer,
            },
            now,
        );
        for part in parts {
            self.tracker.apply(
                crate::opencode::Event::PartUpdated {
                    session_id: session_id.clone(),
                    part,
                },
                now,
            );
        }
    }

    /// After the bridge was away: the answers OpenCode finished meanwhile, shown as one reply.
    pub(super) fn catch_up(&mut self) {
        if self.tracker.is_running() {
            return;
        }
        if self.catch_up_from_log() {
            return;
        }
        let stored = match self.stored_messages() {
            Ok(messages) => messages,
            // Deleted: the router is ending the thread.
            Err(OcError::SessionNotFound(_)) => return,
            Err(e) => {
                crate::warn!("[{}] missed answers not read: {e}", self.short());
                return;
            }
        };
        let after_delivered = self.recovery.delivery.message_id.as_ref().and_then(|id| {
            stored
                .iter()
                .position(|(info, _)| &info.id == id)
                .map(|i| i + 1)
        });
        let start = after_delivered.unwrap_or_else(|| {
            stored
                .iter()
                .position(|(info, _)| info.created_ms >= self.recovery.delivery.since_ms)
                .unwrap_or(stored.len())
        });
        // Up to the last finished answer: one still running is streamed live instead. A terminal's
        // turn is never streamed here: it waits, whole, until `turn_finished` says it ended.
        // The root's note is read (with the thread) only when there is something to post.
        let from_store = self.candidate || (start < stored.len() && self.is_terminal());
        let end = match from_store {
            true => stored.len(),
            false => stored
                .iter()
                .rposition(|(info, _)| {
                    info.role == crate::opencode::Role::Assistant && info.completed_ms.is_some()
                })
                .map_or(0, |i| i + 1),
        };
        crate::debug!(
            "[{}] catch-up: {} stored message(s), missed {start}..{end}",
            self.short(),
            stored.len()
        );
        if end <= start {
            return;
        }
        let missed = &stored[start..end];
        // One reply per turn: each user message starts a turn (OpenCode may have run several while
        // the bridge was away, from prompts it had queued).
        let mut turns: Vec<&[StoredMessage]> = Vec::new();
        let mut from = 0;
        for (i, (info, _)) in missed.iter().enumerate() {
            if info.role == crate::opencode::Role::User && i > from {
                turns.push(&missed[from..i]);
                from = i;
            }
        }
        turns.push(&missed[from..]);
        if from_store
            && turns
                .last()
                .is_some_and(|t| !super::terminal::turn_finished(t, crate::log::now_ms()))
        {
            turns.pop();
        }
        for turn in turns {
            let finished = turn
                .iter()
                .filter(|(info, _)| info.role == crate::opencode::Role::Assistant)
                .filter_map(|(info, _)| info.completed_ms)
                .max();
            let Some(finished_ms) = finished else {
                continue;
            };
            let began_ms = turn
                .first()
                .map_or(finished_ms, |(info, _)| info.created_ms);
            crate::info!(
                "[{}] posting an answer finished {}",
                self.short(),
                if from_store {
                    "in a terminal"
                } else {
                    "while the bridge was away"
                }
            );
            if from_store {
                self.quote = super::terminal::quoted_prompt(turn);
                // A turn we did not stream, prompted from elsewhere: a terminal runs it.
                if self.quote.is_some() && !self.terminal {
                    self.terminal = true;
                    self.update_root();
                }
            }
            self.tracker.begin(Instant::now(), None);
            self.complete_turn(
                Some(turn),
                Some(finished_ms.saturating_sub(began_ms)),
                false,
            );
        }
    }
}

/// In a busy session's stored messages: the index of the answer still running, if stored yet, and
/// the prompt the running turn answers: that answer's parent, or, while no answer is stored, the
/// user message that ends the stored ones (never an older turn's prompt, whose posts the reply
/// would then take over).
fn running_answer(stored: &[StoredMessage]) -> (Option<usize>, Option<String>) {
    use crate::opencode::Role;
    let running = stored
        .iter()
        .rposition(|(info, _)| info.role == Role::Assistant && info.completed_ms.is_none());
    let prompt = match running {
        Some(i) => stored[i].0.parent_id.clone(),
        None => stored
            .last()
            .filter(|(info, _)| info.role == Role::User)
            .map(|(info, _)| info.id.clone()),
    };
    (running, prompt)
}

impl Worker {
    /// The thread was started anew (its root was deleted): what the old one showed went with it.
    pub(super) fn forget_earlier(&mut self) {
        self.recovery.earlier = Some(Earlier {
            read: true,
            ..Earlier::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::{MessageInfo, Role};

    fn message(id: &str, role: Role, done: bool, parent: Option<&str>) -> StoredMessage {
        let mut info = MessageInfo::new(id.into(), role, 0);
        info.completed_ms = done.then_some(1);
        info.parent_id = parent.map(str::to_string);
        (info, Vec::new())
    }

    #[test]
    fn a_running_turn_is_keyed_by_its_prompt_even_before_its_answer_is_stored() {
        let earlier = [
            message("msg_1", Role::User, false, None),
            message("msg_2", Role::Assistant, true, Some("msg_1")),
        ];
        // Taken over while the prompt waits for its first step: the prompt that ends the log.
        let mut waiting = earlier.to_vec();
        waiting.push(message("msg_3", Role::User, false, None));
        assert_eq!(running_answer(&waiting), (None, Some("msg_3".into())));
        // Its answer is stored: the answer's parent.
        let mut answering = waiting.clone();
        answering.push(message("msg_4", Role::Assistant, false, Some("msg_3")));
        assert_eq!(running_answer(&answering), (Some(3), Some("msg_3".into())));
        // Nothing new stored yet: never the finished turn's prompt, whose reply would be edited.
        assert_eq!(running_answer(&earlier), (None, None));
        assert_eq!(running_answer(&[]), (None, None));
    }
}
