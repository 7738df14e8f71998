//! What the worker posts in its thread: the streaming reply and its coalesced edits, notices, the
//! typing indicator, and a new thread when the old root was deleted.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::budget::Priority;
use crate::command::short_id;
use crate::mattermost::WsAction;
use crate::render::{MAX_POST_CHARS, split_post};
use crate::turn::Turn;

use super::recovery::PROMPT_PROP;
use super::reply_posts::{self, PostStep, SentPost};
use super::{EDIT_INTERVAL, Report, Worker};

/// Mattermost refuses a reply whose root no longer exists with this error.
pub(super) fn root_deleted(error: &crate::mattermost::rest::MmError) -> bool {
    matches!(
        error,
        crate::mattermost::rest::MmError::Http { status: 400, id, .. }
            if id == "api.post.create_post.root_id.app_error"
    )
}

/// Mattermost shows a typing indicator for about 5 s; refreshing a little sooner keeps it steady.
pub(super) const TYPING_INTERVAL: Duration = Duration::from_secs(4);

impl Worker {
    /// Sends what changed: at once for the first visible output and the first text, else at most
    /// every EDIT_INTERVAL.
    pub(super) fn schedule(&mut self) {
        let Some(turn) = self.tracker.turn.as_ref() else {
            return;
        };
        if !self.reply.dirty {
            return;
        }
        let urgent = self.reply.posts.is_empty()
            || (!self.reply.text_shown && turn.has_text())
            || self
                .reply
                .last_sent
                .is_none_or(|t| t.elapsed() >= EDIT_INTERVAL);
        if urgent {
            self.flush();
        }
    }

    pub(super) fn flush_deadline(&self) -> Option<Instant> {
        if !self.reply.dirty || self.tracker.turn.is_none() {
            return None;
        }
        Some(
            self.reply
                .last_sent
                .map_or_else(Instant::now, |t| t + EDIT_INTERVAL),
        )
    }

    /// Sends the running turn's reply as it stands, with its "working…" status line.
    pub(super) fn flush(&mut self) {
        self.flush_with_status(true);
    }

    /// `flush`; without the status line when a text part has just been completed, since that text is
    /// most often the final answer: the turn's end then needs no further edit.
    pub(super) fn flush_with_status(&mut self, working: bool) {
        self.absorb();
        let Some(turn) = self.tracker.turn.as_ref() else {
            return;
        };
        self.reply.dirty = false;
        if !turn.is_visible() && self.reply.posts.is_empty() {
            return;
        }
        let body = turn.body(working);
        // A part's finished text goes before anyone's intermediate edits; the first post and the
        // first text are the owner's first sign of life; everything else only uses what is left.
        let priority = if !working {
            Priority::Final
        } else if self.reply.posts.is_empty() || (!self.reply.text_shown && turn.has_text()) {
            Priority::First
        } else {
            Priority::Progress
        };
        self.reply.text_shown |= turn.has_text();
        self.reply.key = turn.prompt_key().map(str::to_string);
        self.send_reply_as(&body, false, priority);
    }

    /// Sends a finished turn's clean reply, without the status line.
    pub(super) fn show_final(&mut self, turn: &Turn) {
        self.reply.key = turn.prompt_key().map(str::to_string);
        if turn.is_visible() || !self.reply.posts.is_empty() {
            self.send_reply(&turn.body(false), true);
        }
    }

    /// Makes the reply posts show `body`: edits the posts that changed, adds continuation posts, and
    /// at the end removes posts the final text no longer needs.
    pub(super) fn send_reply(&mut self, body: &str, last: bool) {
        self.send_reply_as(body, last, Priority::Final);
    }

    /// `send_reply` in class `priority` of the shared budget. An intermediate edit
    /// (`Priority::Progress`) the budget cannot spare is not sent: the reply stays dirty and its
    /// newer state goes at the next edit instead.
    fn send_reply_as(&mut self, body: &str, last: bool, priority: Priority) {
        if !self.try_send_reply(body, last, priority) && self.recreate_root() {
            // The old thread went with its root: the whole reply goes into the new one.
            self.reply.posts.clear();
            self.try_send_reply(body, last, priority);
        }
        self.reply.last_sent = Some(Instant::now());
    }

    /// `send_reply`'s work; false when the thread's root has been deleted.
    fn try_send_reply(&mut self, body: &str, last: bool, priority: Priority) -> bool {
        let short = short_id(&self.key.session_id).to_string();
        if self.reply.key.is_none() && self.reply.posts.is_empty() {
            self.learn_prompt_key(!last);
        }
        let prompt_key = self.reply.key.clone();
        if self.reply.posts.is_empty() {
            // A reply begun by an earlier run goes on in its own posts.
            self.reply.posts = self.earlier_reply(prompt_key.as_deref());
        }
        if !last && self.reply.stream.is_none() {
            self.reply.stream = Some(self.mattermost.open_stream());
        }
        let props = prompt_key.map(|key| json!({ PROMPT_PROP: key }));
        let mattermost = self.mattermost.at(priority);
        // The reply's first post is a first sign of life even when an edit would not be.
        let first_post = self.mattermost.at(priority.min(Priority::First));
        let mut deleted = 0;
        for step in reply_posts::plan(&self.reply.posts, body, last) {
            match step {
                PostStep::Edit { index, text } => {
                    let sent = &mut self.reply.posts[index];
                    match mattermost.patch_post(&sent.id, &text) {
                        Ok(_) => sent.text = text,
                        // The rest waits for the next edit, which sends the newer state.
                        Err(crate::mattermost::rest::MmError::Deferred) => {
                            self.reply.dirty = true;
                            break;
                        }
                        // Deleted meanwhile: the text goes in a new post instead.
                        Err(e) if e.status() == Some(404) => {
                            crate::warn!("[{short}] reply post {} is gone; posting anew", sent.id);
                            match create_reply_post(&mattermost, self, &text, &props) {
                                Ok(post) => {
                                    self.reply.posts[index] = SentPost { id: post.id, text }
                                }
                                Err(e) if root_deleted(&e) => return false,
                                Err(crate::mattermost::rest::MmError::Deferred) => {
                                    self.reply.dirty = true;
                                    break;
                                }
                                Err(e) => crate::warn!("[{short}] reply post failed: {e}"),
                            }
                        }
                        // A reply deleted with its thread's root is refused as a permission error.
                        Err(e) if e.status() == Some(403) && self.root_is_gone() => return false,
                        Err(e) => crate::warn!("[{short}] reply edit failed: {e}"),
                    }
                }
                PostStep::Create { index, text } => {
                    let client = if index == 0 { &first_post } else { &mattermost };
                    match create_reply_post(client, self, &text, &props) {
                        Ok(post) => {
                            if index == 0 {
                                (self.report)(Report::ReplyStarted {
                                    key: self.key.clone(),
                                    post_id: post.id.clone(),
                                });
                            }
                            self.reply.posts.push(SentPost { id: post.id, text })
                        }
                        Err(e) if root_deleted(&e) => return false,
                        Err(crate::mattermost::rest::MmError::Deferred) => {
                            self.reply.dirty = true;
                            break;
                        }
                        // The posts after it wait for the next edit, so they stay in order.
                        Err(e) => {
                            crate::warn!("[{short}] reply post failed: {e}");
                            break;
                        }
                    }
                }
                PostStep::Delete { index } => {
                    let stale = self.reply.posts.remove(index - deleted);
                    deleted += 1;
                    if let Err(e) = mattermost.delete_post(&stale.id) {
                        crate::warn!("[{short}] stale reply post not removed: {e}");
                    }
                }
            }
        }
        true
    }

    pub(super) fn root_is_gone(&self) -> bool {
        matches!(
            self.mattermost.get_post(&self.root_post_id),
            Err(e) if matches!(e.status(), Some(403 | 404))
        )
    }

    /// The thread's root was deleted (and its replies with it): the session gets a new thread.
    pub(super) fn recreate_root(&mut self) -> bool {
        crate::warn!(
            "[{}] the thread root {} was deleted; starting a new thread",
            self.short(),
            self.root_post_id
        );
        self.root_post_id.clear();
        self.recovery.find_root_since = None;
        self.todo_post = None;
        // What the old thread showed went with it.
        self.forget_earlier();
        if !self.create_root() {
            return false;
        }
        self.post_notice(
            "🧵 This session's earlier thread was deleted, so it goes on here. Reply here to reach it.",
        );
        true
    }

    /// Posts in the thread, split when long. Returns the id of the first post, if it was accepted.
    /// Notices answer or warn the owner: first in the budget.
    pub(super) fn post_notice(&mut self, message: &str) -> Option<String> {
        self.post_tagged(message, None)
    }

    /// `post_notice`, with props on each post.
    pub(super) fn post_tagged(
        &mut self,
        message: &str,
        props: Option<serde_json::Value>,
    ) -> Option<String> {
        self.post_at(Priority::Ask, message, props)
    }

    /// `post_tagged` in class `priority` of the shared budget (a completion line, a todo list).
    pub(super) fn post_at(
        &mut self,
        priority: Priority,
        message: &str,
        props: Option<serde_json::Value>,
    ) -> Option<String> {
        let mut first = None;
        for chunk in split_post(message, MAX_POST_CHARS) {
            let mattermost = self.mattermost.at(priority);
            let mut posted =
                mattermost.create_post(&self.channel_id, &self.root_post_id, &chunk, props.clone());
            if posted.as_ref().is_err_and(root_deleted) && self.recreate_root() {
                posted = mattermost.create_post(
                    &self.channel_id,
                    &self.root_post_id,
                    &chunk,
                    props.clone(),
                );
            }
            match posted {
                Ok(post) => {
                    first.get_or_insert(post.id);
                }
                Err(e) => {
                    crate::warn!("[{}] notice not posted: {e}", self.short());
                    break;
                }
            }
        }
        first
    }

    /// `text` mentioning the owner when `wanted`: only a new post's mention notifies them.
    pub(super) fn mention_if(&self, wanted: bool, text: &str) -> String {
        crate::reply::with_mention(text, wanted.then_some(self.owner_username.as_str()))
    }

    /// Replaces a post's text; a failure is logged, since the post's old text is still true enough.
    pub(super) fn edit_post(&self, post_id: &str, message: &str) {
        self.edit_post_at(Priority::Ask, post_id, message);
    }

    /// `edit_post` in class `priority` of the shared budget (a todo refresh).
    pub(super) fn edit_post_at(&self, priority: Priority, post_id: &str, message: &str) {
        if post_id.is_empty() {
            return;
        }
        if let Err(e) = self.mattermost.at(priority).patch_post(post_id, message) {
            crate::warn!("[{}] post {post_id} not updated: {e}", self.short());
        }
    }

    /// While the session works (and is not waiting on the owner), the bot shows as typing in the thread.
    pub(super) fn typing_deadline(&self) -> Option<Instant> {
        if !self.tracker.is_running() || self.waiting.any() || self.root_post_id.is_empty() {
            return None;
        }
        Some(
            self.last_typing
                .map_or_else(Instant::now, |t| t + TYPING_INTERVAL),
        )
    }

    pub(super) fn send_typing(&mut self) {
        self.last_typing = Some(Instant::now());
        // Typing is ephemeral: when the socket is down or behind, skipping one is right.
        let _ = self.typing.try_send(WsAction::Typing {
            channel_id: self.channel_id.clone(),
            parent_id: self.root_post_id.clone(),
        });
    }
}

/// One post of the reply, in the thread, tagged with the prompt it answers.
fn create_reply_post(
    mattermost: &crate::mattermost::rest::MattermostClient,
    worker: &Worker,
    text: &str,
    props: &Option<serde_json::Value>,
) -> Result<crate::mattermost::Post, crate::mattermost::rest::MmError> {
    mattermost.create_post(
        &worker.channel_id,
        &worker.root_post_id,
        text,
        props.clone(),
    )
}
