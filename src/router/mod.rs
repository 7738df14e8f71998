//! The router: the registry of sessions and threads, and the main loop over one closed `Input` enum.
//! Readers, workers and the look-up thread send it inputs; it decides which session a post or event
//! belongs to, starts and stops session workers, answers main-DM commands, and is the only caller of
//! `Store::save`. It never calls a server: what it needs to know is asked of the `lookup` thread
//! (`Effect::Lookup`, answered by `Input::Found`), and what it says is posted by the `notices`
//! thread (`Effect::Notice`), so no slow server can hold up every session's events.

pub mod board;
mod catch_up;
mod commands;
mod events;
pub mod lookup;
pub mod registry;
pub mod servers;
mod workers;

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
use commands::FirstPrompt;
pub use commands::help_message;
pub use lookup::{Found, Listing, Lookup, Notice, Waiting};
use registry::Registry;
use workers::Told;

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
const MAX_HELD_POSTS: usize = 256;
/// The too-old notice lists this many posts at most, and counts the rest.
const MAX_LISTED_TOO_OLD: usize = 50;
/// How many inputs may wait for the router. Readers, workers and the look-up thread wait when it is
/// full; the router itself never sends to it.
pub const INPUT_QUEUE: usize = 1024;

#[derive(Debug)]
pub enum Input {
    Mattermost(Box<WsUpdate>),
    OpenCode(ServerKey, Box<WatchEvent>),
    Session(Box<Report>),
    /// A server to follow (found by discovery): its reader is started.
    ServerAdded(Arc<OpenCodeClient>),
    /// A server to let go (its process stopped): its threads wait for it.
    ServerRemoved(ServerKey),
    /// A look-up's answer.
    Found(Box<Found>),
    /// The look-up queue was full: the look-up was not made.
    Refused(Box<Lookup>),
    /// What the `board` thread learnt.
    Board(board::BoardEvent),
    Stop,
}

/// What the router decided should happen outside it; the loop's shell carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the `lookup` thread; its answer comes back as `Input::Found`.
    Lookup(Lookup),
    /// Post in the owner DM (on the `notices` thread).
    Notice(Notice),
    /// Post or edit the board (on the `board` thread).
    Board(board::BoardJob),
}

impl From<Found> for Input {
    fn from(found: Found) -> Input {
        Input::Found(Box::new(found))
    }
}

impl From<WsUpdate> for Input {
    fn from(update: WsUpdate) -> Input {
        Input::Mattermost(Box::new(update))
    }
}

impl From<(ServerKey, WatchEvent)> for Input {
    fn from((server, event): (ServerKey, WatchEvent)) -> Input {
        Input::OpenCode(server, Box::new(event))
    }
}

impl From<Report> for Input {
    fn from(report: Report) -> Input {
        Input::Session(Box::new(report))
    }
}

pub struct Router {
    command_prefix: String,
    /// Never called by the router itself: it names permalinks and is shut down at stop.
    mattermost: Arc<MattermostClient>,
    /// Same budget, but waits out an outage: what workers post arrives, in order, once it is over.
    worker_mattermost: Arc<MattermostClient>,
    catchup_max_age: Duration,
    /// Which posts mention the owner (handed to each worker).
    notify: crate::config::Notify,
    identity: Identity,
    servers: BTreeMap<ServerKey, Arc<OpenCodeClient>>,
    /// How the server set changes at run time (`servers.rs`).
    server_set: servers::ServerSet,
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
    /// Sessions run by another OpenCode process (a terminal): followed by the poll's catch-up.
    elsewhere: crate::session::terminal::Elsewhere,
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
    too_old: Vec<String>,
    too_old_count: usize,
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
    board: board::BoardView,
    /// OPENCODE_MM_DIRS: sessions elsewhere are another link's, never learned here.
    dirs: crate::config::Dirs,
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
    /// Which posts mention the owner.
    pub notify: crate::config::Notify,
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
            notify,
        } = setup;
        let worker_mattermost = Arc::new(mattermost.patient());
        let registry = Registry::new(store, state, forget_after, crate::log::now_ms());
        Router {
            command_prefix,
            worker_mattermost,
            catchup_max_age,
            notify,
            mattermost,
            identity,
            servers,
            server_set: servers::ServerSet::default(),
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
            elsewhere: Default::default(),
            recovered_prompts: false,
            effects: Vec::new(),
            confirming: HashSet::new(),
            catch_ups: 0,
            held_posts: VecDeque::new(),
            too_old: Vec::new(),
            too_old_count: 0,
            caught_up: 0,
            retiring: HashMap::new(),
            last_forget: None,
            websocket_up: false,
            announced_ready: false,
            next_worker_id: 0,
            ready,
            board: board::BoardView::default(),
            dirs: crate::config::Dirs::default(),
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
            Input::Mattermost(update) => self.on_mattermost(*update),
            Input::OpenCode(server, event) => self.on_opencode(server, *event),
            Input::Session(report) => self.on_report(*report),
            Input::Found(found) => self.on_found(*found),
            Input::ServerAdded(client) => self.add_server(client),
            Input::ServerRemoved(server) => self.remove_server(&server),
            Input::Refused(lookup) => self.on_refused(*lookup),
            Input::Board(event) => self.on_board_event(event),
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
                Ok(Input::Session(report)) => {
                    if let Report::Exited { worker_id, .. } = *report {
                        if let Some(thread) = running.remove(&worker_id) {
                            let _ = thread.join();
                        }
                        continue;
                    }
                    self.on_report(*report);
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

    /// Timers: OpenCode unreachable for long enough is said once in every active thread.
    fn tick(&mut self) {
        let now = Instant::now();
        self.board_tick(now);
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

    // ---- Mattermost: posts and reactions (catch-up in `catch_up.rs`, DM commands in `commands.rs`) ----

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
                    self.recover_unresolved_posts();
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

    fn on_thread_reply(&mut self, post: Post) {
        match self.registry.session_of_root(&post.root_id) {
            Some(key) => self.reply_in_thread(key, post),
            // Whether the root is a session thread is read from its props, off the loop. The
            // cursor passes the post meanwhile, so it is saved as unresolved until then.
            None => {
                self.registry.defer_post(&post);
                self.lookup(Lookup::ThreadRoot {
                    root_id: post.root_id.clone(),
                    then: Waiting::Reply(post),
                })
            }
        }
    }

    fn reply_in_thread(&mut self, key: SessionKey, post: Post) {
        if commands::own_command(&post.message, &self.command_prefix, "current")
            .is_some_and(str::is_empty)
        {
            self.current(&key, &post.root_id);
            return;
        }
        if self.record(&key).is_some_and(|r| r.ended_ms.is_some()) {
            self.reply(
                &post.root_id,
                "⚠️ This session has ended, so the message was not sent. Start a new session to continue.",
            );
            return;
        }
        let root_id = post.root_id.clone();
        let message = match command::parse_thread(&post.message, &self.command_prefix) {
            Some(command) => {
                // `!steer` is a prompt too: owed until its worker hands it to OpenCode.
                if matches!(command, command::ThreadCommand::Steer { .. }) {
                    self.owe_prompt(&key, &post);
                }
                SessionMsg::Command {
                    post_id: post.id,
                    command,
                }
            }
            None => {
                self.owe_prompt(&key, &post);
                prompt_of(post)
            }
        };
        if !self.deliver(&key, message) {
            self.reply(
                &root_id,
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
                prompt_of(post)
            }
            meaning => SessionMsg::Reaction {
                post_id: post.id,
                meaning,
            },
        };
        self.deliver(&key, message);
    }

    /// A root this router had no record of, looked up: one whose creation report has not arrived
    /// yet, or one posted just before a crash, is a session's thread from now on.
    fn on_thread_root(
        &mut self,
        root_id: String,
        session: Option<(SessionKey, Option<SessionInfo>)>,
        then: Waiting,
    ) {
        if let Waiting::Reply(post) = &then {
            self.registry.resolve_post(&post.id);
        }
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
        // What the post resolved to, if it owed nothing (a command, a refusal).
        self.registry.save_now();
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

    /// Records a prompt as owed to its session until the worker is done with it, so a crash while
    /// it waits in a queue does not lose it.
    fn owe_prompt(&mut self, key: &SessionKey, post: &Post) {
        self.registry.owe_prompt(key, post, crate::log::now_ms());
    }

    fn forget_prompt(&mut self, key: &SessionKey, post_id: &str) {
        self.registry.forget_prompt(key, post_id);
    }

    // ---- helpers ----

    /// Ready once the websocket is up and every server has answered or failed its first attempt: one
    /// unreachable server must not hold the others' start (it keeps being retried).
    fn check_ready(&mut self) {
        let streams_tried = self.servers.keys().all(|k| self.stream_up.contains_key(k));
        if self.announced_ready || !self.websocket_up || !streams_tried {
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
        let mut since = crate::log::now_ms();
        if self.elsewhere.owed_from_start(key) {
            // Nothing of it was streamed: its turns from its start are owed, across a restart too.
            since = since.min(info.created_ms);
        }
        self.registry
            .record_thread(key, root_post_id, &channel_id, info, since);
    }

    /// A server's name for posts: its OPENCODE_URL `NAME`, else `host:port`.
    fn server_name(&self, server: &ServerKey) -> String {
        self.servers
            .get(server)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| crate::config::default_server_name(&server.0))
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
            Found::UnresolvedPost { post_id, post } => self.on_unresolved_post(&post_id, post),
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
                then: Waiting::Reply(post),
            } => {
                self.registry.resolve_post(&post.id);
                self.registry.save_now();
                self.reply(&root_id, busy)
            }
            Lookup::ListSessions { .. } | Lookup::NewSession { .. } => self.reply("", busy),
            Lookup::LatestPost
            | Lookup::ReactedPost { .. }
            | Lookup::ThreadRoot { .. }
            | Lookup::OwedPrompt { .. }
            | Lookup::UnresolvedPost { .. } => {}
        }
    }
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

/// Carries out the router's effects: look-ups go to the `lookup` thread, notices to the `notices`
/// thread. Neither send waits: a full queue refuses the effect (a refused look-up is handed back
/// to the router as `Input::Refused`).
pub struct Shell {
    pub lookups: Sender<Lookup>,
    pub notices: Sender<Notice>,
    pub boards: Sender<board::BoardJob>,
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
                        effects.extend(router.handle(Input::Refused(Box::new(lookup))));
                    }
                },
                Effect::Board(job) => {
                    if self.boards.try_send(job).is_err() {
                        crate::warn!(
                            "the board queue is full; the board catches up at its next change"
                        );
                        router.board_dropped();
                    }
                }
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

/// The owner's post as a prompt sent now (not one recovered from before a restart).
fn prompt_of(post: Post) -> SessionMsg {
    SessionMsg::Prompt {
        post_id: post.id,
        text: post.message,
        file_ids: post.file_ids.unwrap_or_default(),
        recovered_since_ms: None,
    }
}
