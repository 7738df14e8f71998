//! The per-session worker: one OS thread per session thread, fed by a channel. It owns everything about
//! its session's conversation: the running turn, the reply posts and their coalesced edits, the queue of
//! prompts waiting for the session to go idle. A slow session only ever blocks its own thread.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::json;

use crate::command::short_id;
use crate::mattermost::rest::{MattermostClient, MmError};
use crate::opencode::rest::{OcError, OpenCodeClient};
use crate::opencode::{
    Event, MessageInfo, Part, PartBody, Role, SessionInfo, SessionKey, Status, Tokens, ToolStatus,
};
use crate::render::{MAX_POST_CHARS, format_duration, split_post};
use crate::reply::{self, ChildSummary, Outcome};

/// Edits of a streaming reply are coalesced to at most about two a second per session.
pub const EDIT_INTERVAL: Duration = Duration::from_millis(500);
const WORKER_STACK_BYTES: usize = 256 * 1024;
/// How many recent messages to read back when a turn ends, to post its exact final text.
const FINAL_MESSAGES: usize = 50;
/// A prompt that OpenCode accepted but never started is given up on after this much silence.
const STALLED_TURN: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub enum SessionMsg {
    Event(Event),
    /// An event of a subagent (child session) of this session.
    Child {
        child_id: String,
        event: Event,
    },
    Prompt {
        post_id: String,
        text: String,
    },
    /// The reconciling poll's view of the session's status.
    Polled(Status),
    /// The session was deleted on the server.
    Ended {
        ended_ms: u64,
    },
}

#[derive(Debug)]
pub enum Report {
    ThreadCreated {
        key: SessionKey,
        root_post_id: String,
        channel_id: String,
    },
    ThreadFailed {
        key: SessionKey,
        error: String,
    },
    /// OpenCode no longer knows the session.
    Gone {
        key: SessionKey,
    },
    Exited {
        key: SessionKey,
    },
}

pub struct Setup {
    pub key: SessionKey,
    pub info: SessionInfo,
    pub channel_id: String,
    /// None when the worker must create the thread's root post first.
    pub root_post_id: Option<String>,
    pub mattermost: Arc<MattermostClient>,
    pub opencode: Arc<OpenCodeClient>,
    pub command_prefix: String,
}

pub struct SessionHandle {
    pub inbox: Sender<SessionMsg>,
    pub thread: JoinHandle<()>,
}

pub fn spawn<T>(setup: Setup, reports: Sender<T>) -> std::io::Result<SessionHandle>
where
    T: From<Report> + Send + 'static,
{
    let (inbox, messages) = crossbeam_channel::unbounded();
    let name = format!("session-{}", short_id(&setup.key.session_id));
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || {
            let key = setup.key.clone();
            let worker = Worker::new(setup);
            let reports_for_worker = reports.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                worker.run(messages, &move |r: Report| {
                    let _ = reports_for_worker.send(T::from(r));
                });
            }));
            if result.is_err() {
                crate::error!(
                    "[{}] session worker panicked; this is a bug",
                    short_id(&key.session_id)
                );
            }
            let _ = reports.send(T::from(Report::Exited { key }));
        })?;
    Ok(SessionHandle { inbox, thread })
}

struct Worker {
    key: SessionKey,
    info: SessionInfo,
    channel_id: String,
    root_post_id: String,
    mattermost: Arc<MattermostClient>,
    opencode: Arc<OpenCodeClient>,
    prefix: String,
    root_text: String,
    busy: bool,
    turn: Option<Turn>,
    queue: VecDeque<String>,
    roles: HashMap<String, Role>,
}

#[derive(Default)]
struct Turn {
    started: Option<Instant>,
    parts: Vec<Part>,
    index: HashMap<String, usize>,
    /// Parts of messages whose role is not known yet, released when it is.
    pending: HashMap<String, Vec<Part>>,
    assistant: BTreeMap<String, MessageInfo>,
    children: BTreeMap<String, ChildState>,
    error: Option<(String, String)>,
    /// Busy status or assistant output seen: an idle event now really ends this turn.
    active: bool,
    posts: Vec<SentPost>,
    text_shown: bool,
    last_sent: Option<Instant>,
    dirty: bool,
}

#[derive(Default)]
struct ChildState {
    summary: ChildSummary,
    tool_ids: HashSet<String>,
}

struct SentPost {
    id: String,
    text: String,
}

type ReportFn<'a> = &'a dyn Fn(Report);

impl Worker {
    fn new(setup: Setup) -> Worker {
        Worker {
            root_text: reply::root_post(&setup.info, &setup.command_prefix),
            key: setup.key,
            info: setup.info,
            channel_id: setup.channel_id,
            root_post_id: setup.root_post_id.unwrap_or_default(),
            mattermost: setup.mattermost,
            opencode: setup.opencode,
            prefix: setup.command_prefix,
            busy: false,
            turn: None,
            queue: VecDeque::new(),
            roles: HashMap::new(),
        }
    }

    fn short(&self) -> &str {
        short_id(&self.key.session_id)
    }

    fn run(mut self, inbox: Receiver<SessionMsg>, report: ReportFn<'_>) {
        if self.root_post_id.is_empty() && !self.create_root(report) {
            return;
        }
        loop {
            let message = match self.flush_deadline() {
                Some(deadline) => match inbox.recv_deadline(deadline) {
                    Ok(message) => Some(message),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match inbox.recv() {
                    Ok(message) => Some(message),
                    Err(_) => return,
                },
            };
            match message {
                None => self.flush(false),
                Some(SessionMsg::Ended { ended_ms }) => {
                    self.end(ended_ms);
                    return;
                }
                Some(message) => {
                    if !self.handle(message, report) {
                        return;
                    }
                }
            }
        }
    }

    fn create_root(&mut self, report: ReportFn<'_>) -> bool {
        let props = json!({
            "opencode_session_id": self.key.session_id,
            "opencode_server": self.key.server.0,
        });
        match self
            .mattermost
            .create_post(&self.channel_id, "", &self.root_text, Some(props))
        {
            Ok(post) => {
                crate::info!("[{}] thread created: post {}", self.short(), post.id);
                self.root_post_id = post.id.clone();
                report(Report::ThreadCreated {
                    key: self.key.clone(),
                    root_post_id: post.id,
                    channel_id: self.channel_id.clone(),
                });
                true
            }
            Err(e) => {
                crate::error!("[{}] could not create the thread: {e}", self.short());
                report(Report::ThreadFailed {
                    key: self.key.clone(),
                    error: e.to_string(),
                });
                false
            }
        }
    }

    /// Returns false when the worker should stop.
    fn handle(&mut self, message: SessionMsg, report: ReportFn<'_>) -> bool {
        match message {
            SessionMsg::Prompt { post_id, text } => return self.prompt(post_id, text, report),
            SessionMsg::Event(event) => self.on_event(event),
            SessionMsg::Child { child_id, event } => self.on_child_event(child_id, event),
            SessionMsg::Polled(status) => self.on_polled(status),
            SessionMsg::Ended { .. } => {}
        }
        if self.turn.is_none() && !self.busy {
            return self.send_next(report);
        }
        true
    }

    fn prompt(&mut self, post_id: String, text: String, report: ReportFn<'_>) -> bool {
        crate::debug!("[{}] prompt from post {post_id}", self.short());
        if self.busy || self.turn.is_some() || !self.queue.is_empty() {
            self.queue.push_back(text);
            let ahead = self.queue.len() - 1;
            let position = if ahead == 0 {
                "it is next".to_string()
            } else {
                format!("{ahead} more ahead of it")
            };
            self.post_notice(&format!(
                "⏳ Queued behind the running turn ({position}); it will be sent when the session is idle."
            ));
            return true;
        }
        self.queue.push_back(text);
        self.send_next(report)
    }

    fn send_next(&mut self, report: ReportFn<'_>) -> bool {
        let Some(text) = self.queue.pop_front() else {
            return true;
        };
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=4 {
            match self
                .opencode
                .prompt(&self.key.session_id, &self.info.directory, &text)
            {
                Ok(()) => {
                    self.turn = Some(Turn {
                        started: Some(Instant::now()),
                        ..Turn::default()
                    });
                    return true;
                }
                Err(OcError::SessionNotFound(_)) => {
                    self.post_notice(
                        "⚠️ This session no longer exists on the OpenCode server; the message was not sent.",
                    );
                    report(Report::Gone {
                        key: self.key.clone(),
                    });
                    return false;
                }
                Err(e @ OcError::Unreachable(_)) if attempt < 4 => {
                    crate::warn!("[{}] prompt not delivered yet: {e}", self.short());
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => {
                    crate::error!("[{}] prompt not delivered: {e}", self.short());
                    self.post_notice(&format!(
                        "⚠️ Could not deliver your message to OpenCode: {e}. Send it again once OpenCode is back."
                    ));
                    return true;
                }
            }
        }
        true
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::SessionUpdated(info) => self.on_info(info),
            Event::SessionStatus { status, .. } => match status {
                Status::Busy | Status::Retry => self.on_busy(),
                Status::Idle => self.on_idle(),
            },
            Event::SessionIdle { .. } => self.on_idle(),
            Event::SessionError { name, message, .. } => {
                let turn = self.turn_mut();
                turn.error = Some((name, message));
                turn.active = true;
            }
            Event::MessageUpdated { message, .. } => self.on_message(message),
            Event::PartUpdated { part, .. } => self.on_part(part),
            Event::PartDelta {
                message_id,
                part_id,
                field,
                delta,
                ..
            } => self.on_delta(&message_id, &part_id, &field, &delta),
            Event::PartRemoved { part_id, .. } => {
                if let Some(turn) = self.turn.as_mut()
                    && let Some(index) = turn.index.remove(&part_id)
                {
                    turn.parts.remove(index);
                    turn.index = index_of(&turn.parts);
                    turn.dirty = true;
                }
            }
            Event::MessageRemoved { message_id, .. } => {
                if let Some(turn) = self.turn.as_mut() {
                    turn.parts.retain(|p| p.message_id != message_id);
                    turn.index = index_of(&turn.parts);
                    turn.assistant.remove(&message_id);
                    turn.dirty = true;
                }
            }
            Event::SessionCreated(_)
            | Event::SessionDeleted { .. }
            | Event::Connected
            | Event::Heartbeat
            | Event::Other { .. } => {}
        }
        self.schedule();
    }

    fn on_info(&mut self, info: SessionInfo) {
        let mut info = info;
        if info.project_name.is_none() {
            info.project_name = self.info.project_name.clone();
        }
        self.info = info;
        let root = reply::root_post(&self.info, &self.prefix);
        if root != self.root_text {
            self.root_text = root;
            if let Err(e) = self
                .mattermost
                .patch_post(&self.root_post_id, &self.root_text)
            {
                crate::warn!("[{}] could not update the root post: {e}", self.short());
            }
        }
    }

    fn on_busy(&mut self) {
        self.busy = true;
        self.turn_mut().active = true;
    }

    fn on_idle(&mut self) {
        self.busy = false;
        if self.turn.as_ref().is_some_and(|t| t.active) {
            self.finish_turn();
        }
    }

    fn on_polled(&mut self, status: Status) {
        match status {
            Status::Busy | Status::Retry => self.on_busy(),
            Status::Idle => {
                // The poll catches an idle event the stream lost, and a prompt that never started.
                let stalled = self.turn.as_ref().is_some_and(|t| {
                    !t.active && t.started.is_some_and(|s| s.elapsed() > STALLED_TURN)
                });
                self.busy = false;
                if self.turn.as_ref().is_some_and(|t| t.active) || stalled {
                    self.finish_turn();
                }
            }
        }
    }

    fn on_message(&mut self, message: MessageInfo) {
        self.roles.insert(message.id.clone(), message.role);
        let turn = self.turn_mut();
        let pending = turn.pending.remove(&message.id).unwrap_or_default();
        if message.role != Role::Assistant {
            return;
        }
        turn.active = true;
        if let Some(error) = &message.error {
            turn.error = Some(error.clone());
        }
        turn.assistant.insert(message.id.clone(), message);
        for part in pending {
            upsert(turn, part);
        }
        turn.dirty = true;
    }

    fn on_part(&mut self, part: Part) {
        let role = self.roles.get(&part.message_id).copied();
        let turn = self.turn_mut();
        match role {
            Some(Role::User) => {}
            Some(Role::Assistant) => {
                turn.active = true;
                upsert(turn, part);
            }
            None => {
                let pending = turn.pending.entry(part.message_id.clone()).or_default();
                match pending.iter_mut().find(|p| p.id == part.id) {
                    Some(existing) => *existing = part,
                    None => pending.push(part),
                }
            }
        }
    }

    fn on_delta(&mut self, message_id: &str, part_id: &str, field: &str, delta: &str) {
        if field != "text" {
            return;
        }
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let part = match turn.index.get(part_id) {
            Some(&index) => turn.parts.get_mut(index),
            None => turn
                .pending
                .get_mut(message_id)
                .and_then(|parts| parts.iter_mut().find(|p| p.id == part_id)),
        };
        if let Some(part) = part {
            match &mut part.body {
                PartBody::Text(text) | PartBody::Reasoning(text) => text.push_str(delta),
                PartBody::Tool(_) | PartBody::Other(_) => {}
            }
            turn.dirty = true;
        }
    }

    fn on_child_event(&mut self, child_id: String, event: Event) {
        let turn = self.turn_mut();
        let child = turn.children.entry(child_id).or_default();
        match event {
            Event::SessionCreated(info) | Event::SessionUpdated(info) => {
                child.summary.title = info.title;
            }
            Event::PartUpdated { part, .. } => {
                if let PartBody::Tool(call) = part.body {
                    child.tool_ids.insert(part.id);
                    child.summary.tool_calls = child.tool_ids.len() as u32;
                    child.summary.current_tool =
                        matches!(call.status, ToolStatus::Pending | ToolStatus::Running)
                            .then_some(call.tool);
                }
            }
            Event::SessionStatus {
                status: Status::Busy,
                ..
            } => child.summary.finished = false,
            Event::SessionIdle { .. }
            | Event::SessionStatus {
                status: Status::Idle,
                ..
            } => {
                child.summary.finished = true;
                child.summary.current_tool = None;
            }
            _ => return,
        }
        turn.dirty = true;
        self.schedule();
    }

    fn turn_mut(&mut self) -> &mut Turn {
        self.turn.get_or_insert_with(|| Turn {
            started: Some(Instant::now()),
            ..Turn::default()
        })
    }

    /// Sends what changed: at once for the first visible output and the first text, else at most
    /// every EDIT_INTERVAL.
    fn schedule(&mut self) {
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        if !turn.dirty {
            return;
        }
        let urgent = turn.posts.is_empty()
            || (!turn.text_shown && turn.parts.iter().any(is_visible_text))
            || turn.last_sent.is_none_or(|t| t.elapsed() >= EDIT_INTERVAL);
        if urgent {
            self.flush(false);
        }
    }

    fn flush_deadline(&self) -> Option<Instant> {
        let turn = self.turn.as_ref()?;
        if !turn.dirty {
            return None;
        }
        Some(
            turn.last_sent
                .map_or_else(Instant::now, |t| t + EDIT_INTERVAL),
        )
    }

    fn flush(&mut self, last: bool) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        turn.dirty = false;
        let parts: Vec<&Part> = turn.parts.iter().collect();
        let children: Vec<&ChildSummary> = turn.children.values().map(|c| &c.summary).collect();
        let body = reply::reply_body(&parts, &children, (!last).then_some("working…"));
        let visible = !parts.is_empty() || !children.is_empty();
        if !visible && turn.posts.is_empty() {
            return;
        }
        turn.text_shown |= parts.iter().any(|p| is_visible_text(p));
        let chunks = split_post(&body, MAX_POST_CHARS);
        for (index, chunk) in chunks.into_iter().enumerate() {
            match turn.posts.get_mut(index) {
                Some(sent) if sent.text == chunk => {}
                Some(sent) => match self.mattermost.patch_post(&sent.id, &chunk) {
                    Ok(_) => sent.text = chunk,
                    Err(e) => crate::warn!(
                        "[{}] reply edit failed: {e}",
                        short_id(&self.key.session_id)
                    ),
                },
                None => match self.mattermost.create_post(
                    &self.channel_id,
                    &self.root_post_id,
                    &chunk,
                    None,
                ) {
                    Ok(post) => turn.posts.push(SentPost {
                        id: post.id,
                        text: chunk,
                    }),
                    Err(e) => {
                        crate::warn!(
                            "[{}] reply post failed: {e}",
                            short_id(&self.key.session_id)
                        );
                        break;
                    }
                },
            }
        }
        // A reply that got shorter (the status line went away) leaves no stale post behind.
        if last {
            let keep = split_post(&body, MAX_POST_CHARS).len();
            for stale in turn.posts.drain(keep.min(turn.posts.len())..) {
                if let Err(e) = self.mattermost.delete_post(&stale.id) {
                    crate::warn!(
                        "[{}] stale reply post not removed: {e}",
                        short_id(&self.key.session_id)
                    );
                }
            }
        }
        turn.last_sent = Some(Instant::now());
    }

    fn finish_turn(&mut self) {
        self.reload_final_parts();
        self.flush(true);
        let Some(turn) = self.turn.take() else {
            return;
        };
        let elapsed = turn
            .started
            .map(|s| s.elapsed().as_millis() as u64)
            .unwrap_or(0);
        let mut tokens = Tokens::default();
        let mut cost = 0.0;
        for message in turn.assistant.values() {
            tokens.input += message.tokens.input;
            tokens.output += message.tokens.output;
            tokens.reasoning += message.tokens.reasoning;
            cost += message.cost;
        }
        let outcome = match &turn.error {
            Some((name, _)) if name == "MessageAbortedError" => Outcome::Stopped,
            Some((name, message)) => Outcome::Failed(if message.is_empty() {
                name.clone()
            } else {
                message.clone()
            }),
            None => Outcome::Done,
        };
        let line = reply::completion_line(&outcome, elapsed, tokens, cost);
        self.post_notice(&line);
        // Roles are only needed within a turn; keep the map from growing over a long session.
        self.roles.clear();
    }

    /// The stream may have dropped events; the server's stored messages are the truth for the final text.
    fn reload_final_parts(&mut self) {
        let messages =
            match self
                .opencode
                .messages(&self.key.session_id, &self.info.directory, FINAL_MESSAGES)
            {
                Ok(messages) => messages,
                Err(e) => {
                    crate::warn!("[{}] final text not re-read: {e}", self.short());
                    return;
                }
            };
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let after_last_user = messages
            .iter()
            .rposition(|(info, _)| info.role == Role::User)
            .map_or(0, |i| i + 1);
        let from_server: Vec<&(MessageInfo, Vec<Part>)> = if after_last_user > 0 {
            messages[after_last_user..].iter().collect()
        } else {
            messages
                .iter()
                .filter(|(info, _)| turn.assistant.contains_key(&info.id))
                .collect()
        };
        if from_server.is_empty() {
            return;
        }
        let mut parts = Vec::new();
        for (info, message_parts) in from_server {
            if info.role != Role::Assistant {
                continue;
            }
            if let Some(error) = &info.error {
                turn.error = Some(error.clone());
            }
            turn.assistant.insert(info.id.clone(), info.clone());
            parts.extend(message_parts.iter().cloned());
        }
        if !parts.is_empty() {
            turn.index = index_of(&parts);
            turn.parts = parts;
        }
    }

    fn end(&mut self, ended_ms: u64) {
        if self.turn.is_some() {
            self.flush(true);
            self.turn = None;
        }
        let lived = ended_ms.saturating_sub(self.info.created_ms);
        let dropped = if self.queue.is_empty() {
            String::new()
        } else {
            format!(" {} queued message(s) were not sent.", self.queue.len())
        };
        self.post_notice(&format!(
            "🏁 This session ended after {} (deleted on the OpenCode server). Replies here are no longer delivered.{dropped}",
            format_duration(lived)
        ));
    }

    fn post_notice(&self, message: &str) {
        if let Err(e) = self.post_reply(message) {
            crate::warn!("[{}] notice not posted: {e}", self.short());
        }
    }

    fn post_reply(&self, message: &str) -> Result<(), MmError> {
        self.mattermost
            .create_post(&self.channel_id, &self.root_post_id, message, None)
            .map(drop)
    }
}

fn upsert(turn: &mut Turn, part: Part) {
    if matches!(part.body, PartBody::Other(_)) {
        return;
    }
    match turn.index.get(&part.id) {
        Some(&index) => turn.parts[index] = part,
        None => {
            turn.index.insert(part.id.clone(), turn.parts.len());
            turn.parts.push(part);
        }
    }
    turn.dirty = true;
}

fn index_of(parts: &[Part]) -> HashMap<String, usize> {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.clone(), i))
        .collect()
}

fn is_visible_text(part: &Part) -> bool {
    matches!(&part.body, PartBody::Text(text) if !text.trim().is_empty())
}
