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
        let stored = match self.stored_messages() {
            Ok(stored) => stored,
            Err(e) => {
                crate::debug!("[{}] running answer not read: {e}", self.short());
                return;
            }
        };
        let Some((answer, parts)) = stored.into_iter().rev().find(|(info, _)| {
            info.role == crate::opencode::Role::Assistant && info.completed_ms.is_none()
        }) else {
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

impl Worker {
    /// The thread was started anew (its root was deleted): what the old one showed went with it.
    pub(super) fn forget_earlier(&mut self) {
        self.recovery.earlier = Some(Earlier {
            read: true,
            ..Earlier::default()
        });
    }
}
