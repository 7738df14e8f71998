//! The router: the registry of sessions and threads, and the main loop over one closed `Input` enum.
//! Readers, workers and the look-up thread send it inputs; it decides which session a post or event
//! belongs to, starts and stops session workers, answers main-DM commands, and is the only caller of
//! `Store::save`. It never calls a server: what it needs to know is asked of the `lookup` thread
//! (`Effect::Lookup`, answered by `Input::Found`), and what it says is posted by the `notices`
//! thread (`Effect::Notice`), so no slow server can hold up every session's events.

pub mod lookup;
pub mod registry;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::command::{self, DmCommand, ReactionMeaning, Resolution, SessionRef, short_id};
use crate::mattermost::rest::MattermostClient;
use crate::mattermost::ws::WsUpdate;
use crate::mattermost::{Identity, Post, Reaction, WsAction, WsEvent};
use crate::opencode::rest::OpenCodeClient;
use crate::opencode::watch::WatchEvent;
use crate::opencode::{Event, ServerKey, SessionInfo, SessionKey, Status};
use crate::render::truncate_chars;
use crate::reply::display_title;
use crate::session::{self, Inbox, Report, SessionHandle, SessionMsg};
use crate::store::{State, Store};
pub use lookup::{Found, Listing, Lookup, Notice, Waiting};
use registry::Registry;

/// OpenCode unreachable for this long gets one notice in each active thread.
const UNREACHABLE_NOTICE_AFTER: Duration = Duration::from_secs(10);
/// How often the router checks its timers when no input arrives.
const TICK: Duration = Duration::from_secs(1);
/// How often records of sessions that ended long ago are looked for.
const FORGET_EVERY: Duration = Duration::from_secs(3600);
/// How long shutdown waits for session workers to finish what they are sending.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
const REMEMBERED_POSTS: usize = 2048;
/// `!sessions` lists the most recently active ones; more would only bury the thread links.
const MAX_LISTED_SESSIONS: usize = 50;
/// Owner posts from the websocket wait while a catch-up pages through older ones, so prompts reach
/// a session in the order they were written; past this many they go ahead anyway.
const MAX_HELD_POSTS: usize = 1024;
/// How many inputs may wait for the router. Readers, workers and the look-up thread wait when it is
/// full; the router itself never sends to it.
pub const INPUT_QUEUE: usize = 1024;

#[derive(Debug)]
pub enum Input {
    Mattermost(WsUpdate),
    OpenCode(ServerKey, WatchEvent),
    Session(Report),
    /// A look-up's answer.
    Found(Found),
    /// The look-up queue was full: the look-up was not made.
    Refused(Lookup),
    Stop,
}

/// What the router decided should happen outside it; the loop's shell carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the `lookup` thread; its answer comes back as `Input::Found`.
    Lookup(Lookup),
    /// Post in the owner DM (on the `notices` thread).
    Notice(Notice),
}

impl From<Found> for Input {
    fn from(found: Found) -> Input {
        Input::Found(found)
    }
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
    /// Never called by the router itself: it names permalinks and is shut down at stop.
    mattermost: Arc<MattermostClient>,
    /// Same budget, but waits out an outage: what workers post arrives, in order, once it is over.
    worker_mattermost: Arc<MattermostClient>,
    catchup_max_age: Duration,
    identity: Identity,
    servers: BTreeMap<ServerKey, Arc<OpenCodeClient>>,
    /// The persisted state and its indexes.
    registry: Registry,
    inputs: Sender<Input>,
    live: HashMap<SessionKey, Live>,
    workers: HashMap<SessionKey, SessionHandle>,
    parents: HashMap<SessionKey, SessionKey>,
    pending_attach: HashSet<SessionKey>,
    /// Sessions made with `new`, waiting for their thread; with the first prompt, if one was given.
    pending_new: HashMap<SessionKey, Option<FirstPrompt>>,
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
    /// Decisions not yet handed to the shell.
    effects: Vec<Effect>,
    /// Sessions whose end is being confirmed with OpenCode.
    confirming: HashSet<SessionKey>,
    /// Catch-ups of the DM's posts under way; websocket posts wait in `held_posts` meanwhile.
    catch_ups: u32,
    held_posts: VecDeque<Post>,
    /// Owner posts a catch-up found too old to run, reported when it ends.
    too_old: Vec<Post>,
    /// Owner posts a catch-up handled.
    caught_up: usize,
    /// When ended sessions were last looked at for forgetting.
    last_forget: Option<Instant>,
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
    /// Records of sessions that ended longer ago than this are forgotten.
    pub forget_after: Duration,
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
            forget_after,
        } = setup;
        let worker_mattermost = Arc::new(mattermost.patient());
        let registry = Registry::new(store, state, forget_after, crate::log::now_ms());
        Router {
            command_prefix,
            worker_mattermost,
            catchup_max_age,
            mattermost,
            identity,
            servers,
            registry,
            inputs,
            live: HashMap::new(),
            workers: HashMap::new(),
            parents: HashMap::new(),
            pending_attach: HashSet::new(),
            pending_new: HashMap::new(),
            seen_posts: SeenPosts::default(),
            typing,
            max_file_size,
            stream_up: HashMap::new(),
            down_since: HashMap::new(),
            told_down: HashSet::new(),
            catch_up_due: HashSet::new(),
            recovered_prompts: false,
            effects: Vec::new(),
            confirming: HashSet::new(),
            catch_ups: 0,
            held_posts: VecDeque::new(),
            too_old: Vec::new(),
            caught_up: 0,
            retiring: HashMap::new(),
            last_forget: None,
            websocket_up: false,
            announced_ready: false,
            next_worker_id: 0,
            ready,
        }
    }

    /// The loop: one input at a time, decided by `handle`, its effects carried out by `Shell`.
    pub fn run(mut self, inputs: Receiver<Input>, shell: Shell) {
        self.registry.save_now();
        loop {
            // Unsaved changes shorten the wait, so they reach the disk within `FLUSH_EVERY`.
            let wait = self
                .registry
                .flush_due_in(Instant::now())
                .map_or(TICK, |due| due.min(TICK));
            let effects = match inputs.recv_timeout(wait) {
                Ok(Input::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Ok(input) => self.handle(input),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.handle_tick(),
            };
            shell.carry_out(&mut self, effects);
        }
        self.shutdown(&inputs, &shell);
    }

    /// Decides what one input means. Never blocks and never calls a server: what it needs from
    /// outside is in the returned effects.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        match input {
            Input::Mattermost(update) => self.on_mattermost(update),
            Input::OpenCode(server, event) => self.on_opencode(server, event),
            Input::Session(report) => self.on_report(report),
            Input::Found(found) => self.on_found(found),
            Input::Refused(lookup) => self.on_refused(lookup),
            Input::Stop => {}
        }
        self.tick();
        std::mem::take(&mut self.effects)
    }

    /// The timers, when no input arrived for a tick.
    pub fn handle_tick(&mut self) -> Vec<Effect> {
        self.tick();
        std::mem::take(&mut self.effects)
    }

    fn shutdown(&mut self, inputs: &Receiver<Input>, shell: &Shell) {
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
                Ok(Input::Session(report)) => {
                    self.on_report(report);
                    let effects = std::mem::take(&mut self.effects);
                    shell.carry_out(self, effects);
                }
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
        self.registry.save_now();
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
        let now = Instant::now();
        self.registry.flush_if_due(now);
        if self
            .last_forget
            .is_none_or(|at| now.duration_since(at) >= FORGET_EVERY)
        {
            self.last_forget = Some(now);
            self.registry.forget_ended(crate::log::now_ms());
        }
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
                self.session_ended(&key, Told::No);
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
        self.registry.learn_title(key, &info.title, &info.slug);
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
            && live.info.created_ms >= self.registry.state().first_started_ms
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
        self.registry.intend_root(&key, crate::log::now_ms());
        let channel_id = self.identity.dm_channel_id.clone();
        self.spawn_worker(&key, info, channel_id, None);
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
            find_root_since: self.registry.recovered_intent(key),
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

    /// The thread hears of the end exactly once: from `Ended` here, unless `told` (the worker
    /// already said so and exited). The record's end is saved first, so no later path (an event,
    /// the poll's confirmation, a restart) says it again.
    fn session_ended(&mut self, key: &SessionKey, told: Told) {
        self.live.remove(key);
        self.parents.remove(key);
        let now = crate::log::now_ms();
        if !self.registry.set_ended(key, now) {
            return;
        }
        crate::info!("[{}] session ended", short_id(&key.session_id));
        if told == Told::No {
            // Even an ended session needs its worker once more, to say so in the thread.
            self.deliver_to(key, SessionMsg::Ended { ended_ms: now }, Ending::Allowed);
        }
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
        let open_records = self.registry.open_sessions(&server);
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
        if self
            .registry
            .changed_since_delivered(key, updated_ms, crate::log::now_ms())
        {
            self.deliver(key, SessionMsg::CatchUp);
        }
    }

    /// A session missing from the list may be archived rather than deleted: ask before ending it.
    fn confirm_gone(&mut self, key: &SessionKey) {
        if !self.servers.contains_key(&key.server) || !self.confirming.insert(key.clone()) {
            return;
        }
        let directory = self
            .record(key)
            .map(|r| r.directory.clone())
            .unwrap_or_default();
        self.lookup(Lookup::ConfirmGone {
            key: key.clone(),
            directory,
        });
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
            WsUpdate::Event(WsEvent::Posted(post)) => {
                if self.catch_ups > 0 && self.held_posts.len() < MAX_HELD_POSTS {
                    self.held_posts.push_back(post);
                } else {
                    self.on_post(post);
                }
            }
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
        // One save for the cursor and what the post left owed, before anything acts on it, so a
        // crash between the two cannot pass a prompt by (a save with nothing new writes nothing).
        self.registry.save_now();
    }

    fn advance_cursor(&mut self, post: &Post) {
        self.registry.advance_cursor(post);
    }

    /// Asks for the owner-DM posts after the cursor that the websocket did not deliver: sent while
    /// the bridge was down, or during a gap the server could not replay. They come back a page at
    /// a time (`on_posts`).
    fn catch_up_posts(&mut self) {
        let cursor = self.registry.cursor().clone();
        if cursor.last_post_id.is_empty() && cursor.last_post_at == 0 {
            // First start on this state: nothing before now is owed an answer.
            self.lookup(Lookup::LatestPost);
            return;
        }
        self.catch_ups += 1;
        self.lookup(Lookup::PostsAfter { cursor });
    }

    fn on_latest_post(&mut self, latest: Result<Option<Post>, String>) {
        let cursor = self.registry.cursor();
        if !cursor.last_post_id.is_empty() || cursor.last_post_at != 0 {
            // A post handled meanwhile set it already.
            return;
        }
        match latest {
            Ok(latest) => {
                let (id, at) = latest.map_or_else(
                    || (String::new(), crate::log::now_ms() as i64),
                    |p| (p.id, p.create_at),
                );
                self.registry.set_cursor(crate::store::MattermostCursor {
                    last_post_id: id,
                    last_post_at: at,
                });
            }
            Err(e) => crate::warn!("cannot read the DM's latest post: {e}"),
        }
    }

    /// One page of a catch-up. Prompts older than `catchup_max_age` are not run; when the catch-up
    /// ends, the owner gets one notice listing them.
    fn on_posts(&mut self, posts: Vec<Post>, last: bool, error: Option<String>) {
        let dm = self.identity.dm_channel_id.clone();
        let oldest_runnable =
            crate::log::now_ms().saturating_sub(self.catchup_max_age.as_millis() as u64) as i64;
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
                    if self.too_old.len() < MAX_HELD_POSTS {
                        self.too_old.push(post);
                    }
                }
                continue;
            }
            if from_owner && !self.seen_posts.contains(&post.id) {
                self.caught_up += 1;
            }
            self.on_post(post);
        }
        if let Some(newest) = newest {
            self.advance_cursor(&newest);
        }
        self.registry.save_now();
        if !last {
            return;
        }
        if let Some(e) = error {
            crate::warn!("cannot catch up on the DM's posts: {e}; retrying at the next reconnect");
        }
        let handled = std::mem::take(&mut self.caught_up);
        if handled > 0 {
            crate::info!("caught up on {handled} post(s) the websocket did not deliver");
        }
        let too_old = std::mem::take(&mut self.too_old);
        if !too_old.is_empty() {
            self.report_too_old(&too_old);
        }
        self.catch_up_done();
    }

    /// The websocket's posts held during the catch-up go on, in order.
    fn catch_up_done(&mut self) {
        self.catch_ups = self.catch_ups.saturating_sub(1);
        if self.catch_ups == 0 {
            while let Some(post) = self.held_posts.pop_front() {
                self.on_post(post);
            }
        }
    }

    fn report_too_old(&mut self, posts: &[Post]) {
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
                "⏸️ {} message(s) sent while opencode-mattermost was away are older than {} and were not run \
                 (OPENCODE_MM_CATCHUP_MAX_AGE). Send them again if they still matter:\n{}",
                posts.len(),
                crate::render::format_duration(self.catchup_max_age.as_millis() as u64),
                lines.join("\n")
            ),
        );
    }

    fn on_thread_reply(&mut self, post: Post) {
        match self.registry.session_of_root(&post.root_id) {
            Some(key) => self.reply_in_thread(key, post),
            // Whether the root is a session thread is read from its props, off the loop.
            None => self.lookup(Lookup::ThreadRoot {
                root_id: post.root_id.clone(),
                then: Waiting::Reply(post),
            }),
        }
    }

    fn reply_in_thread(&mut self, key: SessionKey, post: Post) {
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

    fn not_linked(&mut self, root_id: &str) {
        self.reply(
            root_id,
            &format!(
                "ℹ️ This thread is not linked to any OpenCode session, so the message was not sent anywhere. \
                 Each session has its own thread; `{}sessions` in the main DM lists them.",
                self.command_prefix
            ),
        );
    }

    /// The owner's reactions answer permission requests and questions, stop a run (🛑) or resend a
    /// prompt (🔁). Which session a post belongs to is read from the post itself, off the loop.
    fn on_reaction(&mut self, reaction: Reaction) {
        if reaction.user_id != self.identity.owner_user_id {
            return;
        }
        let Some(meaning) = command::reaction_meaning(&reaction.emoji_name) else {
            return;
        };
        self.lookup(Lookup::ReactedPost {
            post_id: reaction.post_id,
            meaning,
        });
    }

    fn on_reacted_post(&mut self, post: Post, meaning: ReactionMeaning) {
        if post.channel_id != self.identity.dm_channel_id {
            return;
        }
        let root_id = if post.root_id.is_empty() {
            post.id.clone()
        } else {
            post.root_id.clone()
        };
        match self.registry.session_of_root(&root_id) {
            Some(key) => self.react_in_thread(key, post, meaning),
            None => self.lookup(Lookup::ThreadRoot {
                root_id,
                then: Waiting::Reaction { post, meaning },
            }),
        }
    }

    fn react_in_thread(&mut self, key: SessionKey, post: Post, meaning: ReactionMeaning) {
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

    /// A root this router had no record of, looked up: one whose creation report has not arrived
    /// yet, or one posted just before a crash, is a session's thread from now on.
    fn on_thread_root(
        &mut self,
        root_id: String,
        session: Option<(SessionKey, Option<SessionInfo>)>,
        then: Waiting,
    ) {
        let key = match self.registry.session_of_root(&root_id) {
            // Recorded while the look-up ran.
            Some(key) => Some(key),
            None => session.and_then(|(key, info)| self.adopt_root(&root_id, key, info)),
        };
        match (key, then) {
            (Some(key), Waiting::Reply(post)) => self.reply_in_thread(key, post),
            (Some(key), Waiting::Reaction { post, meaning }) => {
                self.react_in_thread(key, post, meaning)
            }
            (None, Waiting::Reply(post)) => self.not_linked(&post.root_id),
            (None, Waiting::Reaction { .. }) => {}
        }
    }

    fn adopt_root(
        &mut self,
        root_id: &str,
        key: SessionKey,
        listed: Option<SessionInfo>,
    ) -> Option<SessionKey> {
        if !self.servers.contains_key(&key.server) {
            return None;
        }
        if self.record(&key).is_some() || self.workers.contains_key(&key) {
            // Known, or its worker's report is on its way.
            self.registry.link_root(root_id, &key);
            return Some(key);
        }
        let info = match self.live.get(&key) {
            Some(live) => live.info.clone(),
            None => listed?,
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
            DmCommand::Sessions { all } => self.lookup(Lookup::ListSessions {
                then: Listing::Sessions { all },
            }),
            DmCommand::Attach { query } => self.lookup(Lookup::ListSessions {
                then: Listing::Attach { query },
            }),
            DmCommand::New {
                directory,
                title,
                prompt,
            } => self.new_session(&post.id, directory, title, prompt),
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

    /// Top-level sessions of every server, from the fresh lists where the server answered.
    fn all_sessions(
        &mut self,
        lists: Vec<(ServerKey, Result<Vec<SessionInfo>, String>)>,
    ) -> Vec<(SessionKey, SessionInfo)> {
        for (server, listed) in lists {
            match listed {
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

    fn on_sessions(
        &mut self,
        lists: Vec<(ServerKey, Result<Vec<SessionInfo>, String>)>,
        then: Listing,
    ) {
        let sessions = self.all_sessions(lists);
        match then {
            Listing::Sessions { all } => self.list_sessions(all, &sessions),
            Listing::Attach { query } => self.attach(&query, &sessions),
        }
    }

    fn list_sessions(&mut self, all: bool, sessions: &[(SessionKey, SessionInfo)]) {
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
            for (server, server_state) in &self.registry.state().servers {
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

    /// `new <directory> [title]`: creates the session on the server (a look-up); its thread
    /// follows, linked in a reply, and the first prompt (if any) goes there once the thread exists.
    fn new_session(
        &mut self,
        post_id: &str,
        directory: String,
        title: Option<String>,
        prompt: Option<String>,
    ) {
        let prefix = self.command_prefix.clone();
        if !directory.starts_with('/') {
            self.reply(
                "",
                &format!(
                    "❓ `{directory}` is not an absolute path. Give the session's directory as the server sees it, \
                     like `{prefix}new /home/me/project`."
                ),
            );
            return;
        }
        self.lookup(Lookup::NewSession {
            post_id: post_id.to_string(),
            directory,
            title,
            prompt,
        });
    }

    fn on_new_session(
        &mut self,
        post_id: String,
        directory: &str,
        prompt: Option<String>,
        created: Result<(ServerKey, SessionInfo), String>,
    ) {
        let (server, info) = match created {
            Ok(created) => created,
            Err(message) => {
                self.reply("", &message);
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
        let first_prompt = prompt.map(|text| {
            // Owed like any prompt from now on, so a crash before it is sent cannot lose it.
            let now = crate::log::now_ms();
            let owed = Post {
                id: post_id.clone(),
                create_at: now as i64,
                ..Post::default()
            };
            self.registry.owe_prompt(&key, &owed, now);
            FirstPrompt {
                post_id,
                text,
                recovered_since_ms: None,
            }
        });
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
        first_prompt: Option<FirstPrompt>,
    ) {
        if let Some(first) = first_prompt
            .as_ref()
            .filter(|f| f.recovered_since_ms.is_some())
        {
            // Recovered after a restart: the owner was told when the session was created.
            let first = first.clone();
            self.deliver(key, first.into_message());
            return;
        }
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
        if let Some(first) = first_prompt {
            self.deliver(key, first.into_message());
        }
    }

    /// Records a prompt as owed to its session until the worker is done with it, so a crash while
    /// it waits in a queue does not lose it.
    fn owe_prompt(&mut self, key: &SessionKey, post: &Post) {
        self.registry.owe_prompt(key, post, crate::log::now_ms());
    }

    /// Prompts owed from before a restart go to their sessions again, oldest first (each read back
    /// by a look-up, answered in order); a worker skips one that OpenCode already has.
    fn recover_owed_prompts(&mut self) {
        for (post_id, key, owed_at_ms) in self.registry.owed_prompts() {
            self.lookup(Lookup::OwedPrompt {
                key,
                post_id,
                owed_at_ms,
            });
        }
    }

    fn on_owed_prompt(
        &mut self,
        key: SessionKey,
        post_id: String,
        owed_at_ms: u64,
        post: Result<Option<Post>, String>,
    ) {
        match post {
            Ok(Some(post)) => {
                crate::info!(
                    "[{}] sending prompt {post_id}, owed since before the restart",
                    short_id(&key.session_id)
                );
                self.seen_posts.insert(&post_id);
                if post.root_id.is_empty() {
                    // The first prompt of a `new` command, whose thread may not exist yet.
                    let Some(DmCommand::New {
                        prompt: Some(text), ..
                    }) = command::parse_dm(&post.message, &self.command_prefix)
                    else {
                        self.forget_prompt(&key, &post_id);
                        return;
                    };
                    let first = FirstPrompt {
                        post_id: post.id,
                        text,
                        recovered_since_ms: Some(owed_at_ms),
                    };
                    match self.record(&key).map(|r| r.root_post_id.clone()) {
                        Some(_) => {
                            self.deliver(&key, first.into_message());
                        }
                        None => {
                            self.pending_new.insert(key, Some(first));
                        }
                    }
                    return;
                }
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
            // Deleted by the owner meanwhile: nothing is owed any more.
            Ok(None) => self.forget_prompt(&key, &post_id),
            Err(e) => crate::warn!("owed prompt {post_id} not readable yet: {e}"),
        }
    }

    fn forget_prompt(&mut self, key: &SessionKey, post_id: &str) {
        self.registry.forget_prompt(key, post_id);
    }

    fn attach(&mut self, query: &str, sessions: &[(SessionKey, SessionInfo)]) {
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
                self.registry.clear_intent(&key);
                if let Some(first) = self.pending_new.remove(&key) {
                    if let Some(first) = first {
                        // The owner is told to attach and send it again.
                        self.registry.forget_prompt(&key, &first.post_id);
                    }
                    self.reply(
                        "",
                        &format!("⚠️ The session was created, but its thread could not be: {error}. `{}attach {}` tries again.", self.command_prefix, short_id(&key.session_id)),
                    );
                }
                if self.pending_attach.remove(&key) {
                    self.reply("", &format!("⚠️ Could not create the thread: {error}"));
                }
            }
            // The worker said in the thread that the session no longer exists, and exited.
            Report::Gone { key } => self.session_ended(&key, Told::Yes),
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
                self.registry.reply_started(&key, post_id);
            }
            Report::Delivered { key, message_id } => {
                self.registry
                    .delivered(&key, message_id, crate::log::now_ms());
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
            self.registry.thread_count()
        );
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }

    fn record(&self, key: &SessionKey) -> Option<&crate::store::ThreadRecord> {
        self.registry.record(key)
    }

    fn record_thread(&mut self, key: &SessionKey, root_post_id: &str, info: &SessionInfo) {
        let channel_id = self.identity.dm_channel_id.clone();
        self.registry
            .record_thread(key, root_post_id, &channel_id, info, crate::log::now_ms());
    }

    fn permalink(&self, post_id: &str) -> String {
        format!("{}/_redirect/pl/{post_id}", self.mattermost.base_url())
    }

    /// Posts in the owner DM: in a thread when `root_id` is set, else in the main DM.
    fn reply(&mut self, root_id: &str, message: &str) {
        self.effects.push(Effect::Notice(Notice {
            root_id: root_id.to_string(),
            message: message.to_string(),
        }));
    }

    fn lookup(&mut self, lookup: Lookup) {
        self.effects.push(Effect::Lookup(lookup));
    }

    // ---- look-ups ----

    fn on_found(&mut self, found: Found) {
        match found {
            Found::LatestPost(latest) => self.on_latest_post(latest),
            Found::Posts { posts, last, error } => self.on_posts(posts, last, error),
            Found::ReactedPost { post, meaning } => self.on_reacted_post(post, meaning),
            Found::ThreadRoot {
                root_id,
                session,
                then,
            } => self.on_thread_root(root_id, session, then),
            Found::OwedPrompt {
                key,
                post_id,
                owed_at_ms,
                post,
            } => self.on_owed_prompt(key, post_id, owed_at_ms, post),
            Found::Gone { key } => {
                self.confirming.remove(&key);
                self.session_ended(&key, Told::No);
            }
            Found::NotGone { key } => {
                self.confirming.remove(&key);
            }
            Found::Sessions { lists, then } => self.on_sessions(lists, then),
            Found::NewSession {
                post_id,
                directory,
                prompt,
                created,
            } => self.on_new_session(post_id, &directory, prompt, created),
        }
    }

    /// The look-up queue was full. What the owner asked for is answered with a retry hint; what
    /// the router asked for itself is asked again when it next matters.
    fn on_refused(&mut self, lookup: Lookup) {
        crate::warn!("the look-up queue is full; dropped a look-up: {lookup:?}");
        let busy = "⏳ The bridge is busy looking things up; please send that again in a moment.";
        match lookup {
            Lookup::PostsAfter { .. } => self.catch_up_done(),
            Lookup::ConfirmGone { key, .. } => {
                self.confirming.remove(&key);
            }
            Lookup::ThreadRoot {
                root_id,
                then: Waiting::Reply(_),
            } => self.reply(&root_id, busy),
            Lookup::ListSessions { .. } | Lookup::NewSession { .. } => self.reply("", busy),
            Lookup::LatestPost
            | Lookup::ReactedPost { .. }
            | Lookup::ThreadRoot { .. }
            | Lookup::OwedPrompt { .. } => {}
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

/// The prompt a `new` command carried, sent once the session's thread exists.
#[derive(Debug, Clone)]
struct FirstPrompt {
    post_id: String,
    text: String,
    /// Owed from before a restart (the owner was told of the session then).
    recovered_since_ms: Option<u64>,
}

impl FirstPrompt {
    fn into_message(self) -> SessionMsg {
        SessionMsg::Prompt {
            post_id: self.post_id,
            text: self.text,
            file_ids: Vec::new(),
            recovered_since_ms: self.recovered_since_ms,
        }
    }
}

/// Whether the thread was already told its session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Yes,
    No,
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

/// Carries out the router's effects: look-ups go to the `lookup` thread, notices to the `notices`
/// thread. Neither send waits: a full queue refuses the effect (a refused look-up is handed back
/// to the router as `Input::Refused`).
pub struct Shell {
    pub lookups: Sender<Lookup>,
    pub notices: Sender<Notice>,
}

impl Shell {
    fn carry_out(&self, router: &mut Router, effects: Vec<Effect>) {
        let mut effects = VecDeque::from(effects);
        while let Some(effect) = effects.pop_front() {
            match effect {
                Effect::Lookup(lookup) => match self.lookups.try_send(lookup) {
                    Ok(()) => {}
                    Err(TrySendError::Full(lookup) | TrySendError::Disconnected(lookup)) => {
                        // Refusals only ever answer with notices, so this ends.
                        effects.extend(router.handle(Input::Refused(lookup)));
                    }
                },
                Effect::Notice(notice) => {
                    if let Err(e) = self.notices.try_send(notice) {
                        crate::warn!(
                            "the notice queue is full; a reply to the owner was dropped: {:.80}",
                            e.into_inner().message
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
