//! The router: the registry of sessions and threads, and the main loop over one closed `Input` enum.
//! Readers and workers send it inputs; it decides which session a post or event belongs to, starts
//! and stops session workers, answers main-DM commands, and is the only caller of `Store::save`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::command::{self, DmCommand, ReactionMeaning, Resolution, SessionRef, short_id};
use crate::mattermost::rest::MattermostClient;
use crate::mattermost::ws::WsUpdate;
use crate::mattermost::{Identity, Post, Reaction, WsAction, WsEvent};
use crate::opencode::rest::{OcError, OpenCodeClient};
use crate::opencode::watch::WatchEvent;
use crate::opencode::{Event, ServerKey, SessionInfo, SessionKey, Status};
use crate::render::{MAX_POST_CHARS, split_post, truncate_chars};
use crate::reply::display_title;
use crate::session::{self, Inbox, Report, SessionHandle, SessionMsg};
use crate::store::{State, Store, ThreadRecord};

/// OpenCode unreachable for this long gets one notice in each active thread.
const UNREACHABLE_NOTICE_AFTER: Duration = Duration::from_secs(10);
/// How often the router checks its timers when no input arrives.
const TICK: Duration = Duration::from_secs(1);
/// How long shutdown waits for session workers to finish what they are sending.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
const REMEMBERED_POSTS: usize = 2048;
/// How far behind (messages queued) a worker may fall before its streamed text is held back.
const INBOX_BACKLOG: usize = 512;
/// `!sessions` lists the most recently active ones; more would only bury the thread links.
const MAX_LISTED_SESSIONS: usize = 50;

#[derive(Debug)]
pub enum Input {
    Mattermost(WsUpdate),
    OpenCode(ServerKey, WatchEvent),
    Session(Report),
    Stop,
}

impl From<WsUpdate> for Input {
    fn from(update: WsUpdate) -> Input {
        Input::Mattermost(update)
    }
}

impl From<(ServerKey, WatchEvent)> for Input {
    fn from((server, event): (ServerKey, WatchEvent)) -> Input {
        Input::OpenCode(server, event)
    }
}

impl From<Report> for Input {
    fn from(report: Report) -> Input {
        Input::Session(report)
    }
}

pub struct Router {
    command_prefix: String,
    /// Gives up after a few attempts: the router must never block long.
    mattermost: Arc<MattermostClient>,
    /// Same budget, but waits out an outage: what workers post arrives, in order, once it is over.
    worker_mattermost: Arc<MattermostClient>,
    catchup_max_age: Duration,
    identity: Identity,
    servers: BTreeMap<ServerKey, Arc<OpenCodeClient>>,
    store: Store,
    state: State,
    inputs: Sender<Input>,
    live: HashMap<SessionKey, Live>,
    workers: HashMap<SessionKey, SessionHandle>,
    /// Text parts whose streamed deltas are dropped until their next full update (`hold_back`).
    held_back: HashSet<(SessionKey, String)>,
    by_root: HashMap<String, SessionKey>,
    parents: HashMap<SessionKey, SessionKey>,
    pending_attach: HashSet<SessionKey>,
    /// Root intents left by an earlier run: their thread may exist unrecorded.
    recovered_intents: HashMap<SessionKey, u64>,
    /// Sessions made with `new`, waiting for their thread; with the first prompt, if one was given.
    pending_new: HashMap<SessionKey, Option<(String, String)>>,
    seen_posts: SeenPosts,
    typing: Sender<WsAction>,
    max_file_size: u64,
    stream_up: HashMap<ServerKey, bool>,
    /// Servers whose event stream is down, since when.
    down_since: HashMap<ServerKey, Instant>,
    /// Servers whose threads were told they are unreachable.
    told_down: HashSet<ServerKey>,
    /// Servers whose next snapshot follows a (re)connect: threads catch up on what they missed.
    catch_up_due: HashSet<ServerKey>,
    /// Owed prompts from before a restart were handed out (once, at the first connect).
    recovered_prompts: bool,
    /// Retired workers finishing what was queued, by worker id, joined when they exit.
    retiring: HashMap<u64, std::thread::JoinHandle<()>>,
    websocket_up: bool,
    announced_ready: bool,
    next_worker_id: u64,
    /// Told once, when both sides are first connected.
    ready: Option<Sender<()>>,
}

#[derive(Debug, Clone)]
struct Live {
    info: SessionInfo,
    status: Status,
}

/// What the router is started with.
pub struct Setup {
    pub command_prefix: String,
    pub mattermost: Arc<MattermostClient>,
    pub identity: Identity,
    pub servers: BTreeMap<ServerKey, Arc<OpenCodeClient>>,
    pub store: Store,
    pub state: State,
    /// Where workers send their reports: the router's own input channel.
    pub inputs: Sender<Input>,
    /// Told once, when both sides are first connected.
    pub ready: Option<Sender<()>>,
    /// Websocket actions for the workers (typing).
    pub typing: Sender<WsAction>,
    pub max_file_size: u64,
    /// Prompts recovered after downtime older than this are not run.
    pub catchup_max_age: Duration,
}

impl Router {
    pub fn new(setup: Setup) -> Router {
        let Setup {
            command_prefix,
            mattermost,
            identity,
            servers,
            store,
            state,
            inputs,
            ready,
            typing,
            max_file_size,
            catchup_max_age,
        } = setup;
        let worker_mattermost = Arc::new(mattermost.patient());
        let mut by_root = HashMap::new();
        let mut recovered_intents = HashMap::new();
        for (server, server_state) in &state.servers {
            for (session_id, since) in &server_state.root_intents {
                let key = SessionKey {
                    server: ServerKey(server.clone()),
                    session_id: session_id.clone(),
                };
                recovered_intents.insert(key, *since);
            }
            for (session_id, record) in &server_state.sessions {
                by_root.insert(
                    record.root_post_id.clone(),
                    SessionKey {
                        server: ServerKey(server.clone()),
                        session_id: session_id.clone(),
                    },
                );
            }
        }
        Router {
            command_prefix,
            worker_mattermost,
            catchup_max_age,
            mattermost,
            identity,
            servers,
            store,
            state,
            inputs,
            live: HashMap::new(),
            workers: HashMap::new(),
            held_back: HashSet::new(),
            by_root,
            parents: HashMap::new(),
            pending_attach: HashSet::new(),
            recovered_intents,
            pending_new: HashMap::new(),
            seen_posts: SeenPosts::default(),
            typing,
            max_file_size,
            stream_up: HashMap::new(),
            down_since: HashMap::new(),
            told_down: HashSet::new(),
            catch_up_due: HashSet::new(),
            recovered_prompts: false,
            retiring: HashMap::new(),
            websocket_up: false,
            announced_ready: false,
            next_worker_id: 0,
            ready,
        }
    }

    pub fn run(mut self, inputs: Receiver<Input>) {
        self.save();
        loop {
            match inputs.recv_timeout(TICK) {
                Ok(Input::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Ok(Input::Mattermost(update)) => self.on_mattermost(update),
                Ok(Input::OpenCode(server, event)) => self.on_opencode(server, event),
                Ok(Input::Session(report)) => self.on_report(report),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            self.tick();
        }
        self.shutdown(&inputs);
    }

    fn shutdown(&mut self, inputs: &Receiver<Input>) {
        crate::info!("stopping");
        // Workers waiting out a Mattermost outage give up; the rest send their last edits once.
        self.mattermost.shut_down();
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        // Dropping a worker's sender ends its loop once it has sent what it was sending.
        let mut running: HashMap<u64, std::thread::JoinHandle<()>> = self
            .workers
            .drain()
            .map(|(_, handle)| (handle.worker_id, handle.thread))
            .chain(self.retiring.drain())
            .collect();
        while !running.is_empty() {
            match inputs.recv_deadline(deadline) {
                Ok(Input::Session(Report::Exited { worker_id, .. })) => {
                    if let Some(thread) = running.remove(&worker_id) {
                        let _ = thread.join();
                    }
                }
                Ok(Input::Session(report)) => self.on_report(report),
                Ok(_) => {}
                Err(_) => {
                    crate::warn!(
                        "{} session worker(s) still busy at shutdown; leaving them",
                        running.len()
                    );
                    break;
                }
            }
        }
        self.save();
        let calls = self.mattermost.stats();
        crate::info!(
            "stopped: {} mattermost calls, {} retried, {} rate-limited, {} outage(s) waited out",
            calls.calls,
            calls.retries,
            calls.rate_limited,
            calls.outages_waited
        );
    }

    // ---- OpenCode ----

    fn on_opencode(&mut self, server: ServerKey, event: WatchEvent) {
        match event {
            WatchEvent::StreamUp => {
                crate::info!("opencode event stream connected: {}", server.0);
                self.stream_up.insert(server.clone(), true);
                self.catch_up_due.insert(server.clone());
                let reconnected = self.down_since.remove(&server).is_some();
                let told = self.told_down.remove(&server);
                if reconnected {
                    // Requests still pending are posted again or re-bound; queued prompts go out.
                    for key in self.workers_of(&server) {
                        self.deliver(&key, SessionMsg::ServerUp { told });
                    }
                }
                self.check_ready();
            }
            WatchEvent::StreamDown(reason) => {
                self.down_since
                    .entry(server.clone())
                    .or_insert_with(Instant::now);
                if self.stream_up.insert(server.clone(), false) != Some(false) {
                    crate::warn!("opencode event stream lost ({}): {reason}", server.0);
                } else {
                    crate::debug!("opencode event stream still down: {reason}");
                }
            }
            WatchEvent::PollFailed(reason) => crate::debug!("session poll failed: {reason}"),
            WatchEvent::Event(envelope) => self.on_opencode_event(server, envelope.event),
            WatchEvent::Snapshot { sessions, statuses } => {
                self.reconcile(server, sessions, statuses)
            }
        }
    }

    /// Timers: OpenCode unreachable for long enough is said once in every active thread.
    fn tick(&mut self) {
        let overdue: Vec<ServerKey> = self
            .down_since
            .iter()
            .filter(|(server, since)| {
                since.elapsed() >= UNREACHABLE_NOTICE_AFTER && !self.told_down.contains(*server)
            })
            .map(|(server, _)| server.clone())
            .collect();
        for server in overdue {
            crate::warn!(
                "opencode unreachable for {}s: {}",
                UNREACHABLE_NOTICE_AFTER.as_secs(),
                server.0
            );
            self.told_down.insert(server.clone());
            for key in self.workers_of(&server) {
                self.deliver(&key, SessionMsg::ServerDown);
            }
        }
    }

    /// A worker held up by Mattermost (an outage, a 429 storm) must not queue a stream's every
    /// delta without bound. Once its inbox is this far behind, a text part's deltas are dropped
    /// until the part's next full update, which carries its whole text; the turn's end re-reads
    /// the final text anyway. Until then the reply shows a clean prefix of that part.
    fn hold_back(&mut self, key: &SessionKey, event: &Event) -> bool {
        match event {
            Event::PartDelta { part_id, .. } => {
                let part = (key.clone(), part_id.clone());
                if self.held_back.contains(&part) {
                    return true;
                }
                let behind = self
                    .workers
                    .get(key)
                    .is_some_and(|w| w.inbox.backlog() >= INBOX_BACKLOG);
                if behind {
                    crate::debug!(
                        "[{}] the worker is {INBOX_BACKLOG} messages behind; holding back part {part_id}'s streamed text until it completes",
                        short_id(&key.session_id)
                    );
                    // Parts whose last update never came (OpenCode died mid-part) are not kept forever.
                    if self.held_back.len() >= 4 * INBOX_BACKLOG {
                        self.held_back.clear();
                    }
                    self.held_back.insert(part);
                }
                behind
            }
            Event::PartUpdated { part, .. } => {
                if !self.held_back.is_empty() {
                    self.held_back.remove(&(key.clone(), part.id.clone()));
                }
                false
            }
            _ => false,
        }
    }

    /// Sessions of `server` with a running worker and a thread that has not ended.
    fn workers_of(&self, server: &ServerKey) -> Vec<SessionKey> {
        self.workers
            .keys()
            .filter(|k| &k.server == server)
            .filter(|k| self.record(k).is_none_or(|r| r.ended_ms.is_none()))
            .cloned()
            .collect()
    }

    fn on_opencode_event(&mut self, server: ServerKey, event: Event) {
        let Some(session_id) = event.session_id().map(str::to_string) else {
            return;
        };
        let key = SessionKey { server, session_id };
        crate::trace!(
            "[{}] event {}",
            short_id(&key.session_id),
            event_brief(&event)
        );
        match &event {
            Event::SessionCreated(info) | Event::SessionUpdated(info) => {
                self.learn(&key, info.clone());
                if matches!(event, Event::SessionCreated(_)) && self.wants_thread(&key) {
                    self.start_thread(key.clone());
                }
            }
            Event::SessionDeleted { .. } => {
                self.session_ended(&key);
                return;
            }
            Event::SessionStatus { status, .. } => self.set_status(&key, *status),
            Event::SessionIdle { .. } => self.set_status(&key, Status::Idle),
            _ => {}
        }
        if let Some(parent) = self.parents.get(&key).cloned() {
            // A subagent's text is not shown, only its tools and progress.
            if !matches!(event, Event::PartDelta { .. }) {
                self.deliver(
                    &parent,
                    SessionMsg::Child {
                        child_id: key.session_id,
                        event,
                    },
                );
            }
            return;
        }
        if self.hold_back(&key, &event) {
            return;
        }
        self.deliver(&key, SessionMsg::Event(event));
    }

    fn learn(&mut self, key: &SessionKey, mut info: SessionInfo) {
        if let Some(parent_id) = &info.parent_id {
            self.parents.insert(
                key.clone(),
                SessionKey {
                    server: key.server.clone(),
                    session_id: parent_id.clone(),
                },
            );
        }
        let status = self.live.get(key).map_or(Status::Idle, |l| l.status);
        if let Some(old) = self.live.get(key)
            && info.project_name.is_none()
        {
            info.project_name = old.info.project_name.clone();
        }
        if let Some(record) = self.record_mut(key)
            && (record.title != info.title || record.slug != info.slug)
        {
            record.title = info.title.clone();
            record.slug = info.slug.clone();
        }
        self.live.insert(key.clone(), Live { info, status });
    }

    fn set_status(&mut self, key: &SessionKey, status: Status) {
        if let Some(live) = self.live.get_mut(key) {
            live.status = status;
        }
    }

    /// New top-level sessions created since the bridge first started get a thread automatically.
    fn wants_thread(&self, key: &SessionKey) -> bool {
        let Some(live) = self.live.get(key) else {
            return false;
        };
        live.info.parent_id.is_none()
            && live.info.created_ms >= self.state.first_started_ms
            && self.record(key).is_none()
            && !self.workers.contains_key(key)
    }

    /// Starts a worker that first posts the session's thread root.
    fn start_thread(&mut self, key: SessionKey) {
        let Some(info) = self.live.get(&key).map(|l| l.info.clone()) else {
            return;
        };
        // The intent is on disk before the root is posted, so a crash in between cannot lead to a
        // second thread: the next run looks for the root first.
        if !self.recovered_intents.contains_key(&key) {
            self.state
                .servers
                .entry(key.server.0.clone())
                .or_default()
                .root_intents
                .insert(key.session_id.clone(), crate::log::now_ms());
            self.save();
        }
        let channel_id = self.identity.dm_channel_id.clone();
        self.spawn_worker(&key, info, channel_id, None);
    }

    fn clear_intent(&mut self, key: &SessionKey) {
        self.recovered_intents.remove(key);
        if let Some(server) = self.state.servers.get_mut(&key.server.0)
            && server.root_intents.remove(&key.session_id).is_some()
        {
            self.save();
        }
    }

    /// The inbox of the session's worker, starting one if the session has a live thread (or, with
    /// `Ending::Allowed`, an ended one).
    fn worker_for(&mut self, key: &SessionKey, ending: Ending) -> Option<Inbox> {
        if let Some(handle) = self.workers.get(key) {
            return Some(handle.inbox.clone());
        }
        if self.record(key)?.ended_ms.is_some() && ending == Ending::Refused {
            return None;
        }
        self.spawn_recorded(key)
    }

    /// A worker for a session whose thread is on record, ended or not.
    fn spawn_recorded(&mut self, key: &SessionKey) -> Option<Inbox> {
        let record = self.record(key)?.clone();
        let info = self
            .live
            .get(key)
            .map(|l| l.info.clone())
            .unwrap_or_else(|| SessionInfo {
                id: key.session_id.clone(),
                slug: record.slug.clone(),
                title: record.title.clone(),
                directory: record.directory.clone(),
                created_ms: record.created_ms,
                ..SessionInfo::default()
            });
        self.spawn_worker(key, info, record.channel_id, Some(record.root_post_id))
    }

    fn spawn_worker(
        &mut self,
        key: &SessionKey,
        info: SessionInfo,
        channel_id: String,
        root_post_id: Option<String>,
    ) -> Option<Inbox> {
        let client = self.servers.get(&key.server)?.clone();
        let (model, agent) = self
            .record(key)
            .map(|r| (r.model.clone(), r.agent.clone()))
            .unwrap_or_default();
        let delivery = match self.record(key) {
            Some(record) => session::Delivery {
                message_id: record.delivered_message_id.clone(),
                since_ms: record.delivered_at_ms,
                streaming_post_id: record.streaming_post_id.clone(),
            },
            None => session::Delivery {
                since_ms: crate::log::now_ms(),
                ..session::Delivery::default()
            },
        };
        let setup = session::Setup {
            key: key.clone(),
            info,
            channel_id,
            root_post_id,
            mattermost: self.worker_mattermost.clone(),
            opencode: client,
            command_prefix: self.command_prefix.clone(),
            typing: self.typing.clone(),
            max_file_size: self.max_file_size,
            delivery,
            bot_user_id: self.identity.bot_user_id.clone(),
            find_root_since: self.recovered_intents.get(key).copied(),
            model,
            agent,
        };
        self.next_worker_id += 1;
        match session::spawn(setup, self.next_worker_id, self.inputs.clone()) {
            Ok(handle) => {
                let inbox = handle.inbox.clone();
                self.workers.insert(key.clone(), handle);
                Some(inbox)
            }
            Err(e) => {
                crate::error!(
                    "[{}] cannot start a session worker thread: {e}",
                    short_id(&key.session_id)
                );
                None
            }
        }
    }

    fn session_ended(&mut self, key: &SessionKey) {
        self.clear_intent(key);
        if let Some(server) = self.state.servers.get_mut(&key.server.0) {
            // The worker says in the thread how many were not sent; none is owed any more.
            server
                .pending_prompts
                .retain(|_, p| p.session_id != key.session_id);
        }
        self.live.remove(key);
        self.parents.remove(key);
        let now = crate::log::now_ms();
        let Some(record) = self.record_mut(key) else {
            return;
        };
        if record.ended_ms.is_some() {
            return;
        }
        record.ended_ms = Some(now);
        self.save();
        crate::info!("[{}] session ended", short_id(&key.session_id));
        // Even an ended session needs its worker once more, to say so in the thread.
        self.deliver_to(key, SessionMsg::Ended { ended_ms: now }, Ending::Allowed);
    }

    fn reconcile(
        &mut self,
        server: ServerKey,
        sessions: Vec<SessionInfo>,
        statuses: HashMap<String, Status>,
    ) {
        let catching_up = self.catch_up_due.remove(&server);
        let mut updated_ms = HashMap::new();
        let mut present = HashSet::new();
        for info in sessions {
            let key = SessionKey {
                server: server.clone(),
                session_id: info.id.clone(),
            };
            present.insert(info.id.clone());
            updated_ms.insert(info.id.clone(), info.updated_ms);
            self.learn(&key, info);
            if let Some(status) = statuses.get(&key.session_id) {
                self.set_status(&key, *status);
            }
            if self.wants_thread(&key) {
                crate::info!(
                    "[{}] session found by the poll; creating its thread",
                    short_id(&key.session_id)
                );
                self.start_thread(key);
            }
        }
        let open_records: Vec<String> = self
            .state
            .servers
            .get(&server.0)
            .map(|s| {
                s.sessions
                    .iter()
                    .filter(|(_, r)| r.ended_ms.is_none())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for session_id in open_records {
            let key = SessionKey {
                server: server.clone(),
                session_id,
            };
            if !present.contains(&key.session_id) {
                self.confirm_gone(&key);
                continue;
            }
            let status = statuses.get(&key.session_id).copied();
            let has_worker = self.workers.contains_key(&key);
            // A session that turned busy while the bridge was away gets a worker to follow it.
            if let Some(status) = status
                && (has_worker || status != Status::Idle)
            {
                self.deliver(&key, SessionMsg::Polled(status));
            }
            if catching_up && status.is_none_or(|s| s == Status::Idle) {
                self.catch_up(&key, updated_ms.get(&key.session_id).copied());
            }
        }
    }

    /// An idle session that changed since its thread was last complete may have answered while
    /// the bridge (or the stream) was away: its worker posts what is missing.
    fn catch_up(&mut self, key: &SessionKey, updated_ms: Option<u64>) {
        let Some(record) = self.record_mut(key) else {
            return;
        };
        if record.delivered_at_ms == 0 {
            // Recorded before delivery was tracked: start tracking now rather than repost history.
            record.delivered_at_ms = crate::log::now_ms();
            self.save();
            return;
        }
        if updated_ms.is_some_and(|u| u > record.delivered_at_ms) {
            self.deliver(key, SessionMsg::CatchUp);
        }
    }

    /// A session missing from the list may be archived rather than deleted: ask before ending it.
    fn confirm_gone(&mut self, key: &SessionKey) {
        let Some(client) = self.servers.get(&key.server).cloned() else {
            return;
        };
        let directory = self
            .record(key)
            .map(|r| r.directory.clone())
            .unwrap_or_default();
        if let Err(OcError::SessionNotFound(_)) = client.get_session(&key.session_id, &directory) {
            self.session_ended(key);
        }
    }

    // ---- Mattermost ----

    fn on_mattermost(&mut self, update: WsUpdate) {
        match update {
            WsUpdate::Connected {
                resumed,
                server_version,
            } => {
                crate::info!(
                    "mattermost websocket connected (resumed: {resumed}, server {server_version})"
                );
                self.websocket_up = true;
                if !std::mem::replace(&mut self.recovered_prompts, true) {
                    self.recover_owed_prompts();
                }
                // Even a resumed connection can miss events on some servers: a REST pass after the
                // cursor is cheap, and duplicates are dropped by post id.
                self.catch_up_posts();
                self.check_ready();
            }
            WsUpdate::Disconnected(reason) if !self.websocket_up => {
                crate::debug!("mattermost websocket still down: {reason}")
            }
            WsUpdate::Disconnected(reason) => {
                self.websocket_up = false;
                crate::warn!("mattermost websocket lost: {reason}")
            }
            WsUpdate::Event(WsEvent::Posted(post)) => self.on_post(post),
            WsUpdate::Event(WsEvent::ReactionAdded(reaction)) => self.on_reaction(reaction),
            WsUpdate::Event(_) => {}
        }
    }

    fn on_post(&mut self, post: Post) {
        if post.user_id == self.identity.bot_user_id {
            return;
        }
        if post.channel_id != self.identity.dm_channel_id {
            // Never follow a post from another channel into a session.
            crate::trace!("ignored a post in another channel");
            return;
        }
        if post.user_id != self.identity.owner_user_id {
            crate::warn!(
                "ignored a post by user {} who is not the owner",
                post.user_id
            );
            return;
        }
        if !post.post_type.is_empty() || !self.seen_posts.insert(&post.id) {
            return;
        }
        self.advance_cursor(&post);
        if post.root_id.is_empty() {
            self.on_dm_message(&post);
        } else {
            self.on_thread_reply(post);
        }
        // One save for the cursor and what the post left owed, so a crash between the two
        // cannot pass a prompt by (a save with nothing new writes nothing).
        self.save();
    }

    /// Moves the cursor to the newest owner post handled; the caller saves. Persisted, it lets
    /// posts sent while the bridge was down be handled when it is back.
    fn advance_cursor(&mut self, post: &Post) {
        let cursor = &mut self.state.mattermost;
        if post.create_at >= cursor.last_post_at && cursor.last_post_id != post.id {
            cursor.last_post_id = post.id.clone();
            cursor.last_post_at = post.create_at;
        }
    }

    /// Handles the owner-DM posts after the cursor that the websocket did not deliver: sent while
    /// the bridge was down, or during a gap the server could not replay. Prompts older than
    /// `catchup_max_age` are not run; the owner gets one notice listing them.
    fn catch_up_posts(&mut self) {
        let dm = self.identity.dm_channel_id.clone();
        let cursor = self.state.mattermost.clone();
        if cursor.last_post_id.is_empty() && cursor.last_post_at == 0 {
            // First start on this state: nothing before now is owed an answer.
            match self.mattermost.latest_post(&dm) {
                Ok(latest) => {
                    let (id, at) = latest.map_or_else(
                        || (String::new(), crate::log::now_ms() as i64),
                        |p| (p.id, p.create_at),
                    );
                    self.state.mattermost.last_post_id = id;
                    self.state.mattermost.last_post_at = at;
                    self.save();
                }
                Err(e) => crate::warn!("cannot read the DM's latest post: {e}"),
            }
            return;
        }
        let listed = if cursor.last_post_id.is_empty() {
            // The DM was empty at the first start: no post to page from yet, only a time.
            crate::mattermost::search::posts_since(
                &self.mattermost,
                &dm,
                cursor.last_post_at as u64,
            )
        } else {
            self.mattermost.posts_after(&dm, &cursor.last_post_id, 200)
        };
        let posts = match listed {
            Ok(posts) => posts,
            Err(e) => {
                crate::warn!(
                    "cannot catch up on the DM's posts: {e}; retrying at the next reconnect"
                );
                return;
            }
        };
        let oldest_runnable =
            crate::log::now_ms().saturating_sub(self.catchup_max_age.as_millis() as u64) as i64;
        let mut too_old = Vec::new();
        let mut handled = 0;
        // Every post up to the newest is handled (the bot's own by ignoring them), so the cursor may
        // pass them all and the next catch-up pages through less.
        let newest = posts.last().cloned();
        for post in posts {
            let from_owner = post.user_id == self.identity.owner_user_id
                && post.channel_id == dm
                && post.post_type.is_empty();
            if from_owner && post.create_at < oldest_runnable {
                if self.seen_posts.insert(&post.id) {
                    self.advance_cursor(&post);
                    too_old.push(post);
                }
                continue;
            }
            if from_owner && !self.seen_posts.contains(&post.id) {
                handled += 1;
            }
            self.on_post(post);
        }
        if let Some(newest) = newest {
            self.advance_cursor(&newest);
        }
        self.save();
        if handled > 0 {
            crate::info!("caught up on {handled} post(s) the websocket did not deliver");
        }
        if !too_old.is_empty() {
            self.report_too_old(&too_old);
        }
    }

    fn report_too_old(&self, posts: &[Post]) {
        let lines: Vec<String> = posts
            .iter()
            .map(|p| {
                let first_line = truncate_chars(p.message.lines().next().unwrap_or(""), 80);
                format!(
                    "- {} · [open]({}) · {first_line}",
                    crate::log::utc_minute(p.create_at.max(0) as u64),
                    self.permalink(&p.id)
                )
            })
            .collect();
        self.reply(
            "",
            &format!(
                "⏸️ {} message(s) sent while opencode-mattermost was away are older than {} and were not run                  (OPENCODE_MM_CATCHUP_MAX_AGE). Send them again if they still matter:\n{}",
                posts.len(),
                crate::render::format_duration(self.catchup_max_age.as_millis() as u64),
                lines.join("\n")
            ),
        );
    }

    fn on_thread_reply(&mut self, post: Post) {
        let known = self.by_root.get(&post.root_id).cloned();
        let Some(key) = known.or_else(|| self.adopt_root(&post.root_id)) else {
            self.reply(
                &post.root_id,
                &format!(
                    "ℹ️ This thread is not linked to any OpenCode session, so the message was not sent anywhere. \
                     Each session has its own thread; `{}sessions` in the main DM lists them.",
                    self.command_prefix
                ),
            );
            return;
        };
        if self.record(&key).is_some_and(|r| r.ended_ms.is_some()) {
            self.reply(
                &post.root_id,
                "⚠️ This session has ended, so the message was not sent. Start a new session to continue.",
            );
            return;
        }
        let message = match command::parse_thread(&post.message, &self.command_prefix) {
            Some(command) => SessionMsg::Command {
                post_id: post.id,
                command,
            },
            None => {
                self.owe_prompt(&key, &post);
                SessionMsg::Prompt {
                    post_id: post.id,
                    text: post.message,
                    file_ids: post.file_ids.unwrap_or_default(),
                    recovered_since_ms: None,
                }
            }
        };
        if !self.deliver(&key, message) {
            self.reply(
                &post.root_id,
                "⚠️ The message could not be handed to this session's worker; please send it again.",
            );
        }
    }

    /// The owner's reactions answer permission requests and questions, stop a run (🛑) or resend a
    /// prompt (🔁). Which session a post belongs to is read from the post itself.
    fn on_reaction(&mut self, reaction: Reaction) {
        if reaction.user_id != self.identity.owner_user_id {
            return;
        }
        let Some(meaning) = command::reaction_meaning(&reaction.emoji_name) else {
            return;
        };
        let post = match self.mattermost.get_post(&reaction.post_id) {
            Ok(post) => post,
            Err(e) => {
                crate::debug!("reacted post {} not readable: {e}", reaction.post_id);
                return;
            }
        };
        if post.channel_id != self.identity.dm_channel_id {
            return;
        }
        let root_id = if post.root_id.is_empty() {
            post.id.clone()
        } else {
            post.root_id.clone()
        };
        let known = self.by_root.get(&root_id).cloned();
        let Some(key) = known.or_else(|| self.adopt_root(&root_id)) else {
            return;
        };
        if self.record(&key).is_some_and(|r| r.ended_ms.is_some()) {
            return;
        }
        let message = match meaning {
            ReactionMeaning::Retry => {
                // Only the owner's own prompts are resent; a command is not a prompt.
                if post.user_id != self.identity.owner_user_id
                    || post.root_id.is_empty()
                    || command::parse_thread(&post.message, &self.command_prefix).is_some()
                {
                    return;
                }
                crate::info!("[{}] prompt {} resent", short_id(&key.session_id), post.id);
                self.owe_prompt(&key, &post);
                SessionMsg::Prompt {
                    post_id: post.id,
                    text: post.message,
                    file_ids: post.file_ids.unwrap_or_default(),
                    recovered_since_ms: None,
                }
            }
            meaning => SessionMsg::Reaction {
                post_id: post.id,
                meaning,
            },
        };
        self.deliver(&key, message);
    }

    /// Hands a message to the session's worker, starting one if needed.
    fn deliver(&mut self, key: &SessionKey, message: SessionMsg) -> bool {
        self.deliver_to(key, message, Ending::Refused)
    }

    /// A worker that exited since the router last looked (its report still queued) is replaced, so
    /// nothing sent is dropped.
    fn deliver_to(&mut self, key: &SessionKey, message: SessionMsg, ending: Ending) -> bool {
        let Some(inbox) = self.worker_for(key, ending) else {
            return false;
        };
        let Err(message) = inbox.send(message) else {
            return true;
        };
        self.workers.remove(key);
        self.worker_for(key, ending)
            .is_some_and(|inbox| inbox.send(message).is_ok())
    }

    /// A root this router has no record of may still be a session thread: one whose creation report
    /// has not arrived yet, or one posted just before a crash. The root's props say which session.
    fn adopt_root(&mut self, root_id: &str) -> Option<SessionKey> {
        let root = match self.mattermost.get_post(root_id) {
            Ok(root) => root,
            Err(e) => {
                crate::debug!("thread root {root_id} not readable: {e}");
                return None;
            }
        };
        if root.user_id != self.identity.bot_user_id
            || root.channel_id != self.identity.dm_channel_id
        {
            return None;
        }
        let session_id = root.props.get("opencode_session_id")?.as_str()?;
        let server = ServerKey(root.props.get("opencode_server")?.as_str()?.to_string());
        let key = SessionKey {
            server,
            session_id: session_id.to_string(),
        };
        let client = self.servers.get(&key.server)?.clone();
        if self.record(&key).is_some() || self.workers.contains_key(&key) {
            // Known, or its worker's report is on its way.
            self.by_root.insert(root_id.to_string(), key.clone());
            return Some(key);
        }
        let info = match self.live.get(&key) {
            Some(live) => live.info.clone(),
            // The list covers every directory; a lookup by id alone would only cover the default one.
            None => match client.list_sessions() {
                Ok(sessions) => sessions.into_iter().find(|s| s.id == key.session_id)?,
                Err(e) => {
                    crate::warn!("cannot look up the session of thread {root_id}: {e}");
                    return None;
                }
            },
        };
        crate::info!(
            "[{}] adopted existing thread root {root_id}",
            short_id(&key.session_id)
        );
        self.record_thread(&key, root_id, &info);
        Some(key)
    }

    fn on_dm_message(&mut self, post: &Post) {
        let prefix = self.command_prefix.clone();
        let Some(command) = command::parse_dm(&post.message, &prefix) else {
            self.reply(
                "",
                &format!(
                    "Prompts go in a session's thread: reply there and the message goes to that session. \
                     Start a session in a terminal (`opencode`, or `opencode attach <url>`) and its thread appears here; \
                     `{prefix}attach <session>` gives an older session a thread, `{prefix}sessions` lists them, `{prefix}help` explains more."
                ),
            );
            return;
        };
        match command {
            DmCommand::Help => self.reply("", &help_message(&prefix)),
            DmCommand::Sessions { all } => self.list_sessions(all),
            DmCommand::Attach { query } => self.attach(&query),
            DmCommand::New {
                directory,
                title,
                prompt,
            } => self.new_session(&post.id, &directory, title.as_deref(), prompt),
            DmCommand::Unknown { name } => self.reply(
                "",
                &format!("❓ Unknown command `{prefix}{name}`. `{prefix}help` lists the commands."),
            ),
            DmCommand::MissingArgument { command, usage } => self.reply(
                "",
                &format!("❓ `{prefix}{command}` needs an argument: `{prefix}{usage}`"),
            ),
            DmCommand::UnexpectedArgument {
                command,
                usage,
                argument,
            } => self.reply(
                "",
                &format!("❓ `{prefix}{command}` does not take `{argument}`: `{prefix}{usage}`"),
            ),
        }
    }

    /// Top-level sessions of every server, freshly listed where the server answers.
    fn all_sessions(&mut self) -> Vec<(SessionKey, SessionInfo)> {
        let servers: Vec<(ServerKey, Arc<OpenCodeClient>)> = self
            .servers
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (server, client) in servers {
            match client.list_sessions() {
                Ok(sessions) => {
                    for info in sessions {
                        let key = SessionKey {
                            server: server.clone(),
                            session_id: info.id.clone(),
                        };
                        self.learn(&key, info);
                    }
                }
                Err(e) => crate::warn!("cannot list sessions of {}: {e}", server.0),
            }
        }
        let mut sessions: Vec<(SessionKey, SessionInfo)> = self
            .live
            .iter()
            .filter(|(_, l)| l.info.parent_id.is_none())
            .map(|(k, l)| (k.clone(), l.info.clone()))
            .collect();
        sessions.sort_by_key(|s| std::cmp::Reverse(s.1.updated_ms));
        sessions
    }

    fn list_sessions(&mut self, all: bool) {
        let sessions = self.all_sessions();
        let prefix = self.command_prefix.clone();
        let mut lines = Vec::new();
        let hidden = sessions.len().saturating_sub(MAX_LISTED_SESSIONS);
        for (key, info) in sessions.iter().take(MAX_LISTED_SESSIONS) {
            let status = match self.live.get(key).map(|l| l.status) {
                Some(Status::Busy | Status::Retry) => "busy",
                _ => "idle",
            };
            let thread = match self.record(key) {
                Some(record) => format!("[thread]({})", self.permalink(&record.root_post_id)),
                None => format!("no thread: `{prefix}attach {}`", short_id(&key.session_id)),
            };
            lines.push(format!(
                "- `{}` **{}** · `{}` · {status} · {thread}",
                short_id(&key.session_id),
                truncate_chars(&display_title(info), 60),
                info.directory
            ));
        }
        if all {
            for (server, server_state) in &self.state.servers {
                for (session_id, record) in &server_state.sessions {
                    if record.ended_ms.is_none()
                        || sessions
                            .iter()
                            .any(|(k, _)| k.session_id == *session_id && k.server.0 == *server)
                    {
                        continue;
                    }
                    lines.push(format!(
                        "- `{}` **{}** · `{}` · ended · [thread]({})",
                        short_id(session_id),
                        truncate_chars(&record.title, 60),
                        record.directory,
                        self.permalink(&record.root_post_id)
                    ));
                }
            }
        }
        let text = if lines.is_empty() {
            "No sessions yet. Start one with `opencode` in a terminal; its thread appears here."
                .to_string()
        } else {
            let mut hint = String::new();
            if hidden > 0 {
                hint.push_str(&format!(
                    "\n\n_…and {hidden} older session(s); `{prefix}attach <id>` works for them too._"
                ));
            }
            if !all {
                hint.push_str(&format!(
                    "\n\n_`{prefix}sessions all` includes ended sessions._"
                ));
            }
            format!(
                "**Sessions** ({})\n{}{hint}",
                lines.len() + hidden,
                lines.join("\n")
            )
        };
        self.reply("", &text);
    }

    /// `new <directory> [title]`: creates the session on the server; its thread follows, linked in a
    /// reply, and the first prompt (if any) goes there once the thread exists.
    fn new_session(
        &mut self,
        post_id: &str,
        directory: &str,
        title: Option<&str>,
        prompt: Option<String>,
    ) {
        let prefix = self.command_prefix.clone();
        if !directory.starts_with('/') {
            self.reply(
                "",
                &format!(
                    "❓ `{directory}` is not an absolute path. Give the session's directory as the server sees it,                      like `{prefix}new /home/me/project`."
                ),
            );
            return;
        }
        let Some((server, client)) = self
            .servers
            .iter()
            .next()
            .map(|(k, c)| (k.clone(), c.clone()))
        else {
            return;
        };
        match client.directory_exists(directory) {
            Ok(true) => {}
            Ok(false) => {
                self.reply(
                    "",
                    &format!(
                        "❓ `{directory}` does not exist on the OpenCode server, so no session was created.                          Check the path, or create the directory first."
                    ),
                );
                return;
            }
            Err(e) => {
                self.reply(
                    "",
                    &format!("⚠️ Could not check `{directory}` on the OpenCode server: {e}"),
                );
                return;
            }
        }
        let info = match client.create_session(directory, title) {
            Ok(info) => info,
            Err(e) => {
                self.reply("", &format!("⚠️ Could not create the session: {e}"));
                return;
            }
        };
        let key = SessionKey {
            server,
            session_id: info.id.clone(),
        };
        crate::info!(
            "[{}] session created from Mattermost in {directory}",
            short_id(&key.session_id)
        );
        self.learn(&key, info);
        let first_prompt = prompt.map(|text| (post_id.to_string(), text));
        match self.record(&key).map(|r| r.root_post_id.clone()) {
            // The event stream was faster: the thread is already there.
            Some(root_post_id) => self.announce_new(&key, &root_post_id, first_prompt),
            None => {
                self.pending_new.insert(key.clone(), first_prompt);
                if !self.workers.contains_key(&key) {
                    self.start_thread(key);
                }
            }
        }
    }

    fn announce_new(
        &mut self,
        key: &SessionKey,
        root_post_id: &str,
        first_prompt: Option<(String, String)>,
    ) {
        let info = self
            .live
            .get(key)
            .map(|l| l.info.clone())
            .unwrap_or_default();
        let link = self.permalink(root_post_id);
        let sending = if first_prompt.is_some() {
            " Your first message is on its way there."
        } else {
            " Reply in it to send the first prompt."
        };
        self.reply(
            "",
            &format!(
                "🆕 **{}** started in `{}`: [open its thread]({link}).{sending}",
                display_title(&info),
                info.directory
            ),
        );
        if let Some((post_id, text)) = first_prompt {
            self.deliver(
                key,
                SessionMsg::Prompt {
                    post_id,
                    text,
                    file_ids: Vec::new(),
                    recovered_since_ms: None,
                },
            );
        }
    }

    /// Records a prompt as owed to its session until the worker is done with it, so a crash while
    /// it waits in a queue does not lose it.
    fn owe_prompt(&mut self, key: &SessionKey, post: &Post) {
        self.state
            .servers
            .entry(key.server.0.clone())
            .or_default()
            .pending_prompts
            .insert(
                post.id.clone(),
                crate::store::PendingPrompt {
                    session_id: key.session_id.clone(),
                    create_at: post.create_at,
                    owed_at_ms: crate::log::now_ms(),
                },
            );
        self.save();
    }

    /// Prompts owed from before a restart go to their sessions again, oldest first; a worker
    /// skips one that OpenCode already has.
    fn recover_owed_prompts(&mut self) {
        let mut owed: Vec<(i64, String, SessionKey, u64)> = Vec::new();
        for (server, state) in &self.state.servers {
            for (post_id, pending) in &state.pending_prompts {
                let key = SessionKey {
                    server: ServerKey(server.clone()),
                    session_id: pending.session_id.clone(),
                };
                owed.push((pending.create_at, post_id.clone(), key, pending.owed_at_ms));
            }
        }
        owed.sort();
        for (_, post_id, key, owed_at_ms) in owed {
            match self.mattermost.get_post(&post_id) {
                Ok(post) if post.user_id == self.identity.owner_user_id => {
                    crate::info!(
                        "[{}] sending prompt {post_id}, owed since before the restart",
                        short_id(&key.session_id)
                    );
                    self.seen_posts.insert(&post_id);
                    self.deliver(
                        &key,
                        SessionMsg::Prompt {
                            post_id: post.id,
                            text: post.message,
                            file_ids: post.file_ids.unwrap_or_default(),
                            recovered_since_ms: Some(owed_at_ms),
                        },
                    );
                }
                Ok(_) | Err(crate::mattermost::rest::MmError::Http { status: 404, .. }) => {
                    // Deleted by the owner meanwhile: nothing is owed any more.
                    self.forget_prompt(&key, &post_id);
                }
                Err(e) => crate::warn!("owed prompt {post_id} not readable yet: {e}"),
            }
        }
    }

    fn forget_prompt(&mut self, key: &SessionKey, post_id: &str) {
        if let Some(server) = self.state.servers.get_mut(&key.server.0)
            && server.pending_prompts.remove(post_id).is_some()
        {
            self.save();
        }
    }

    fn attach(&mut self, query: &str) {
        let sessions = self.all_sessions();
        let refs: Vec<SessionRef<'_>> = sessions
            .iter()
            .map(|(_, info)| SessionRef {
                id: &info.id,
                slug: &info.slug,
            })
            .collect();
        let prefix = self.command_prefix.clone();
        match command::resolve_session(query, &refs) {
            Resolution::NotFound => self.reply(
                "",
                &format!("❓ No session matches `{query}`. `{prefix}sessions` lists them."),
            ),
            Resolution::Ambiguous(candidates) => {
                let lines: Vec<String> = candidates
                    .iter()
                    .filter_map(|&i| sessions.get(i))
                    .map(|(key, info)| {
                        format!(
                            "- `{}` `{}` **{}** · `{}`",
                            short_id(&key.session_id),
                            info.slug,
                            truncate_chars(&display_title(info), 60),
                            info.directory
                        )
                    })
                    .collect();
                self.reply(
                    "",
                    &format!(
                        "❓ `{query}` matches {} sessions; use more of the id:\n{}",
                        lines.len(),
                        lines.join("\n")
                    ),
                );
            }
            Resolution::One(index) => {
                let Some((key, info)) = sessions.get(index).cloned() else {
                    return;
                };
                if let Some(record) = self.record(&key) {
                    let link = self.permalink(&record.root_post_id);
                    self.reply(
                        "",
                        &format!(
                            "**{}** already has a thread: [open it]({link})",
                            display_title(&info)
                        ),
                    );
                    return;
                }
                if !self.workers.contains_key(&key) {
                    self.start_thread(key.clone());
                }
                self.pending_attach.insert(key);
            }
        }
    }

    // ---- session workers ----

    fn on_report(&mut self, report: Report) {
        match report {
            Report::ThreadCreated { key, root_post_id } => {
                let info = self
                    .live
                    .get(&key)
                    .map(|l| l.info.clone())
                    .unwrap_or_default();
                self.record_thread(&key, &root_post_id, &info);
                if let Some(first_prompt) = self.pending_new.remove(&key) {
                    self.announce_new(&key, &root_post_id, first_prompt);
                }
                if self.pending_attach.remove(&key) {
                    let link = self.permalink(&root_post_id);
                    self.reply(
                        "",
                        &format!(
                            "🧵 **{}** is attached: [open its thread]({link})",
                            display_title(&info)
                        ),
                    );
                }
            }
            Report::ThreadFailed { key, error } => {
                self.clear_intent(&key);
                if self.pending_new.remove(&key).is_some() {
                    self.reply(
                        "",
                        &format!("⚠️ The session was created, but its thread could not be: {error}. `{}attach {}` tries again.", self.command_prefix, short_id(&key.session_id)),
                    );
                }
                if self.pending_attach.remove(&key) {
                    self.reply("", &format!("⚠️ Could not create the thread: {error}"));
                }
            }
            Report::Gone { key } => self.session_ended(&key),
            Report::PromptDone { key, post_id } => self.forget_prompt(&key, &post_id),
            Report::Idle { key, worker_id } => {
                if self
                    .workers
                    .get(&key)
                    .is_some_and(|h| h.worker_id == worker_id)
                    && let Some(handle) = self.workers.remove(&key)
                {
                    // Dropping the inbox ends the worker once it has handled what is queued;
                    // anything sent from now on starts a new one.
                    crate::debug!("[{}] idle worker retired", short_id(&key.session_id));
                    self.retiring.insert(worker_id, handle.thread);
                }
            }
            Report::ReplyStarted { key, post_id } => {
                if let Some(record) = self.record_mut(&key) {
                    record.streaming_post_id = Some(post_id);
                    self.save();
                }
            }
            Report::Delivered { key, message_id } => {
                if let Some(record) = self.record_mut(&key) {
                    record.streaming_post_id = None;
                    record.delivered_at_ms = crate::log::now_ms();
                    if message_id.is_some() {
                        record.delivered_message_id = message_id;
                    }
                    self.save();
                }
            }
            Report::Choices { key, model, agent } => {
                if let Some(record) = self.record_mut(&key) {
                    record.model = model;
                    record.agent = agent;
                    self.save();
                }
            }
            Report::Exited { key, worker_id } => {
                if let Some(thread) = self.retiring.remove(&worker_id) {
                    let _ = thread.join();
                }
                if self
                    .workers
                    .get(&key)
                    .is_some_and(|h| h.worker_id == worker_id)
                    && let Some(handle) = self.workers.remove(&key)
                {
                    drop(handle.inbox);
                    let _ = handle.thread.join();
                }
            }
        }
    }

    // ---- helpers ----

    fn check_ready(&mut self) {
        let streams_up = self
            .servers
            .keys()
            .all(|k| self.stream_up.get(k) == Some(&true));
        if self.announced_ready || !self.websocket_up || !streams_up {
            return;
        }
        self.announced_ready = true;
        crate::info!(
            "ready: owner @{}, {} thread(s) on record",
            self.identity.owner_username,
            self.by_root.len()
        );
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }

    fn record(&self, key: &SessionKey) -> Option<&ThreadRecord> {
        self.state
            .servers
            .get(&key.server.0)?
            .sessions
            .get(&key.session_id)
    }

    fn record_mut(&mut self, key: &SessionKey) -> Option<&mut ThreadRecord> {
        self.state
            .servers
            .get_mut(&key.server.0)?
            .sessions
            .get_mut(&key.session_id)
    }

    fn record_thread(&mut self, key: &SessionKey, root_post_id: &str, info: &SessionInfo) {
        self.by_root.insert(root_post_id.to_string(), key.clone());
        self.recovered_intents.remove(key);
        if let Some(server) = self.state.servers.get_mut(&key.server.0) {
            server.root_intents.remove(&key.session_id);
        }
        // A thread started anew (its root was deleted) keeps the owner's choices.
        let (model, agent) = self
            .record(key)
            .map(|r| (r.model.clone(), r.agent.clone()))
            .unwrap_or_default();
        self.state
            .servers
            .entry(key.server.0.clone())
            .or_default()
            .sessions
            .insert(
                key.session_id.clone(),
                ThreadRecord {
                    root_post_id: root_post_id.to_string(),
                    channel_id: self.identity.dm_channel_id.clone(),
                    directory: info.directory.clone(),
                    title: info.title.clone(),
                    slug: info.slug.clone(),
                    created_ms: info.created_ms,
                    ended_ms: None,
                    parent_id: None,
                    delivered_message_id: None,
                    delivered_at_ms: crate::log::now_ms(),
                    streaming_post_id: None,
                    model,
                    agent,
                },
            );
        self.save();
    }

    fn save(&mut self) {
        if let Err(e) = self.store.save(&self.state) {
            crate::error!("{e}");
        }
    }

    fn permalink(&self, post_id: &str) -> String {
        format!("{}/_redirect/pl/{post_id}", self.mattermost.base_url())
    }

    /// Posts in the owner DM: in a thread when `root_id` is set, else in the main DM.
    fn reply(&self, root_id: &str, message: &str) {
        for chunk in split_post(message, MAX_POST_CHARS) {
            if let Err(e) =
                self.mattermost
                    .create_post(&self.identity.dm_channel_id, root_id, &chunk, None)
            {
                crate::error!("could not post a reply to the owner: {e}");
                return;
            }
        }
    }
}

pub fn help_message(prefix: &str) -> String {
    format!(
        "**opencode-mattermost** connects this DM to OpenCode. Every OpenCode session gets its own thread here.\n\n\
         **In a session's thread:** write a reply and it goes to that session as a prompt, exactly as written. \
         The answer streams back into the thread, with tool calls and a completion line. \
         Messages sent while the session is busy are queued and sent in order.\n\n\
         **In this main DM:**\n\
         - `{prefix}sessions`: list sessions with their status and thread links (`{prefix}sessions all` includes ended ones)\n\
         - `{prefix}attach <session>`: give an existing session a thread\n\
         - `{prefix}new <directory> [title]`: start a session in that directory (lines after the first are its first prompt)\n\
         - `{prefix}help`: this message\n\n\
         A session can be named by its full id, its short id (the last 8 characters), its slug (such as `neon-eagle`), \
         or any unique start or end of its id."
    )
}

/// Whether a worker may be started for a session whose thread has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Refused,
    Allowed,
}

/// Post ids already handled, so a post that arrives twice is handled once.
#[derive(Default)]
struct SeenPosts {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl SeenPosts {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > REMEMBERED_POSTS
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

/// One event in a few words, for trace logs.
fn event_brief(event: &Event) -> String {
    match event {
        Event::SessionStatus { status, .. } => format!("status {status:?}"),
        Event::SessionIdle { .. } => "idle".to_string(),
        Event::MessageUpdated { message, .. } => format!(
            "message {} {:?} completed {:?}",
            message.id, message.role, message.completed_ms
        ),
        Event::PartUpdated { part, .. } => format!("part {} of {}", part.id, part.message_id),
        Event::PartDelta { message_id, .. } => format!("delta of {message_id}"),
        other => format!("{:.60}", format!("{other:?}")),
    }
}
