//! The per-session worker: one OS thread per session thread, fed by its inbox. It owns everything about
//! its session's conversation: the running turn, the reply posts and their coalesced edits, the queue of
//! prompts waiting for the session to go idle. A slow session only ever blocks its own thread.
//!
//! This file holds the loop, the prompt queue and the turn's end. `inbox.rs` is the bounded, folding
//! inbox; `posting.rs` what the worker posts (reply, notices, typing), with `reply_posts.rs` planning
//! a reply's posts; `recovery.rs` what an earlier run left in the thread and the catch-up;
//! `pending.rs` what waits on the owner (permission requests, questions); `commands.rs` the thread
//! commands; `attachments.rs` the files that come with a prompt.

mod attachments;
mod commands;
mod inbox;
mod pending;
mod posting;
mod recovery;
mod reply_posts;
pub mod terminal;

use recovery::DONE_PROP;
use reply_posts::{ReplyPosts, SentPost};

pub use inbox::{Inbox, MAX_STREAM_ENTRIES};

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::json;

use crate::budget::Priority;
use crate::command::{ReactionMeaning, ThreadCommand, short_id};
use crate::mattermost::WsAction;
use crate::mattermost::rest::MattermostClient;
use crate::opencode::rest::{OcError, OpenCodeClient};
use crate::opencode::{Event, ModelRef, PromptInput, SessionInfo, SessionKey, Status};
use crate::render::format_duration;
use crate::reply;
use crate::turn::{self, Change, Tracker};

/// Edits of a streaming reply are coalesced to at most about two a second per session.
pub const EDIT_INTERVAL: Duration = Duration::from_millis(500);
const WORKER_STACK_BYTES: usize = 256 * 1024;
/// How many recent messages to read back when a turn ends, to post its exact final text.
const FINAL_MESSAGES: usize = 50;
/// A prompt that OpenCode accepted but never started is given up on after this much silence.
const STALLED_TURN: Duration = Duration::from_secs(15);
/// A worker with nothing to do for this long offers to retire; the router starts a new one when
/// the session needs one again. Keeps threads and memory in step with the sessions that are active.
const IDLE_RETIRE: Duration = Duration::from_secs(60);
/// How soon a turn whose idle status the stored messages do not bear out yet is looked at again.
const SETTLE_RECHECK: Duration = Duration::from_secs(1);
/// How long the session may stay idle, with no sign of work, while its stored messages still show
/// the turn unfinished, before the reply is shown as it stands: a stale idle is followed by the
/// turn's own events within moments, but an answer cut off by an OpenCode restart never finishes.
const UNSETTLED_GRACE: Duration = Duration::from_secs(3);
/// How often a queued prompt is tried again while OpenCode is unreachable.
const PROMPT_RETRY: Duration = Duration::from_secs(3);

/// A message as OpenCode stores it, with its parts.
type StoredMessage = (crate::opencode::MessageInfo, Vec<crate::opencode::Part>);

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
        /// Files attached to the post, sent along as file parts.
        file_ids: Vec<String>,
        /// Owed from before a restart: skipped if OpenCode already has it.
        recovered_since_ms: Option<u64>,
    },
    /// A thread command such as `!stop` or `!status`.
    Command {
        post_id: String,
        command: ThreadCommand,
    },
    /// The owner reacted to a post in this session's thread.
    Reaction {
        post_id: String,
        meaning: ReactionMeaning,
    },
    /// The reconciling poll's view of the session's status.
    Polled(Status),
    /// The session was deleted on the server.
    Ended {
        ended_ms: u64,
    },
    /// OpenCode has been unreachable for a while: say so once in the thread.
    ServerDown,
    /// OpenCode is back (its event stream reconnected). `told`: the thread heard it was down.
    ServerUp {
        told: bool,
    },
    /// The bridge was away while the session moved on: post what it answered meanwhile.
    CatchUp,
    /// The poll shows the session moved with no event here: another process (a terminal) may run
    /// it. Its finished turns are read from the store; one the worker did not stream, with a prompt
    /// the thread did not send, confirms it: posted whole, the prompt quoted, and the root says so.
    Terminal,
}

#[derive(Debug)]
pub enum Report {
    ThreadCreated {
        key: SessionKey,
        root_post_id: String,
    },
    ThreadFailed {
        key: SessionKey,
        error: String,
    },
    /// OpenCode no longer knows the session.
    Gone {
        key: SessionKey,
    },
    /// The worker is done with a prompt (sent, answered a question, or refused with a reply); it
    /// no longer needs sending after a restart.
    PromptDone {
        key: SessionKey,
        post_id: String,
    },
    /// The first post of a reply went out; until `Delivered`, a restart resumes that post.
    ReplyStarted {
        key: SessionKey,
        post_id: String,
    },
    /// A turn's final text and completion line are in the thread.
    Delivered {
        key: SessionKey,
        message_id: Option<String>,
        /// v2: the durable log's `seq` the thread is now complete up to.
        seq: Option<u64>,
    },
    /// The worker has had nothing to do for a while and holds nothing that would be lost: the router
    /// may drop its inbox, after which it ends once it has handled what was already sent.
    Idle {
        key: SessionKey,
        worker_id: u64,
    },
    /// The owner chose a model or agent for the session's prompts (`!model`, `!agent`): kept with
    /// the thread and given to its next worker (`Setup::model`, `Setup::agent`), so a restart or a
    /// retirement does not lose them. None leaves the choice to OpenCode.
    Choices {
        key: SessionKey,
        /// `provider/model`.
        model: Option<String>,
        agent: Option<String>,
    },
    /// A permission request or question started or stopped waiting for the owner (for the board).
    Waiting {
        key: SessionKey,
        waiting: bool,
    },
    /// The worker's thread is ending. `worker_id` tells it from a newer worker of the same session.
    Exited {
        key: SessionKey,
        worker_id: u64,
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
    /// The bot's user id: the author of the thread roots.
    pub bot_user_id: String,
    /// Websocket actions (typing); dropped when the socket is down or the queue is full.
    pub typing: Sender<WsAction>,
    /// Most bytes of files one prompt may carry.
    pub max_file_size: u64,
    /// What the thread already shows, as recorded in the state file.
    pub delivery: Delivery,
    /// Set when a previous run began creating this thread's root and may have posted it: look for
    /// a root made since then (ms since epoch) before posting one.
    pub find_root_since: Option<u64>,
    /// The owner's `!model` choice as `provider/model` (from `Report::Choices`); None: OpenCode's.
    pub model: Option<String>,
    /// The owner's `!agent` choice; None: OpenCode's.
    pub agent: Option<String>,
    /// The owner's username, for mentions in posts that need them.
    pub owner_username: String,
    /// Which posts mention the owner.
    pub notify: crate::config::Notify,
}

/// How far a thread is known to be delivered, so nothing is posted twice and nothing is skipped
/// across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The last assistant message whose final text is in the thread.
    pub message_id: Option<String>,
    /// When the thread was last known complete (ms since epoch): messages before it were shown.
    pub since_ms: u64,
    /// The first post of a reply that was still streaming when the bridge stopped.
    pub streaming_post_id: Option<String>,
    /// v2: the durable log's `seq` up to which the thread is complete.
    pub seq: Option<u64>,
}

pub struct SessionHandle {
    pub worker_id: u64,
    pub inbox: Inbox,
    pub thread: JoinHandle<()>,
}

pub fn spawn<T>(setup: Setup, worker_id: u64, reports: Sender<T>) -> std::io::Result<SessionHandle>
where
    T: From<Report> + Send + 'static,
{
    let (inbox, mailbox) = inbox::channel();
    let name = format!("session-{}", short_id(&setup.key.session_id));
    let link = crate::log::link();
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || {
            crate::log::set_link(link.as_deref());
            let key = setup.key.clone();
            let reports_for_worker = reports.clone();
            // Boxed: the thread's resident stack then holds a pointer, not copies of the worker.
            let worker = Box::new(Worker::new(
                setup,
                worker_id,
                mailbox,
                Box::new(move |r: Report| {
                    let _ = reports_for_worker.send(T::from(r));
                }),
            ));
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                worker.run();
            }));
            if result.is_err() {
                crate::error!(
                    "[{}] session worker panicked; this is a bug",
                    short_id(&key.session_id)
                );
            }
            let _ = reports.send(T::from(Report::Exited { key, worker_id }));
        })?;
    Ok(SessionHandle {
        worker_id,
        inbox,
        thread,
    })
}

struct Worker {
    key: SessionKey,
    info: SessionInfo,
    channel_id: String,
    root_post_id: String,
    mattermost: Arc<MattermostClient>,
    opencode: Arc<OpenCodeClient>,
    prefix: String,
    bot_user_id: String,
    root_text: String,
    tracker: Tracker,
    reply: ReplyPosts,
    queue: VecDeque<Queued>,
    typing: Sender<WsAction>,
    last_typing: Option<Instant>,
    max_file_size: u64,
    /// Chosen with `!model` / `!agent`; None leaves the choice to OpenCode.
    model: Option<ModelRef>,
    agent: Option<String>,
    waiting: pending::Waiting,
    /// The todo list post of the running turn, edited as the list changes.
    todo_post: Option<SentPost>,
    report: Box<dyn Fn(Report) + Send>,
    worker_id: u64,
    mailbox: inbox::Mailbox,
    /// What earlier runs left in the thread, and how far it is delivered.
    recovery: recovery::Recovery,
    outage: Outage,
    settle: Settle,
    owner_username: String,
    notify: crate::config::Notify,
    /// What the router was last told of `waiting.any()`; None: nothing yet, so a new worker says
    /// it once (an earlier worker may have left the router's view stale).
    reported_waiting: Option<bool>,
    /// Run by another process (a terminal), as confirmed by a turn read from the store (or by the
    /// root's note, for a worker that took the thread over): see `SessionMsg::Terminal`.
    terminal: bool,
    /// While a `SessionMsg::Terminal` catch-up reads the store as a terminal's.
    candidate: bool,
    /// The quoted terminal prompt to go above the reply the catch-up is posting.
    quote: Option<String>,
    /// The thread was told (or found to say) that replies do not show in the terminal.
    note_told: bool,
}

/// OpenCode could not be reached (`down`): queued prompts wait for it.
#[derive(Default)]
struct Outage {
    down: bool,
    /// The thread was told OpenCode is unreachable (by the router's notice or a refused prompt).
    told: bool,
    /// When to try the queue again while OpenCode is unreachable.
    retry_at: Option<Instant>,
}

/// The session looks idle but its stored messages do not show the turn finished (yet): when that
/// was first seen, and when to look again.
#[derive(Default)]
struct Settle {
    since: Option<Instant>,
    recheck_at: Option<Instant>,
    /// v2: a bare rejection by the owner halts the turn and the server says nothing of it. When to
    /// ask whether the session still runs, how many more times, and whether it was found halted.
    halt_check_at: Option<Instant>,
    halt_checks_left: u8,
    halted: bool,
}

/// A prompt waiting its turn, with the post it came from.
struct Queued {
    post_id: String,
    input: PromptInput,
}

impl Worker {
    fn new(
        setup: Setup,
        worker_id: u64,
        mailbox: inbox::Mailbox,
        report: Box<dyn Fn(Report) + Send>,
    ) -> Worker {
        Worker {
            worker_id,
            mailbox,
            report,
            recovery: recovery::Recovery::new(setup.delivery, setup.find_root_since),
            outage: Outage::default(),
            settle: Settle::default(),
            owner_username: setup.owner_username,
            notify: setup.notify,
            reported_waiting: None,
            root_text: reply::root_post(
                &setup.info,
                &setup.command_prefix,
                setup.opencode.shown_name(),
            ),
            terminal: false,
            candidate: false,
            quote: None,
            note_told: false,
            key: setup.key,
            info: setup.info,
            channel_id: setup.channel_id,
            root_post_id: setup.root_post_id.unwrap_or_default(),
            mattermost: setup.mattermost,
            opencode: setup.opencode,
            prefix: setup.command_prefix,
            bot_user_id: setup.bot_user_id,
            tracker: Tracker::default(),
            reply: ReplyPosts::default(),
            queue: VecDeque::new(),
            typing: setup.typing,
            last_typing: None,
            max_file_size: setup.max_file_size,
            model: setup.model.as_deref().and_then(model_ref),
            agent: setup.agent,
            waiting: pending::Waiting::default(),
            todo_post: None,
        }
    }

    fn short(&self) -> &str {
        short_id(&self.key.session_id)
    }

    fn run(mut self: Box<Self>) {
        let recorded = !self.root_post_id.is_empty();
        self.recovery.took_over = recorded;
        if !recorded && !self.create_root() {
            return;
        }
        self.sync_waiting();
        // Before any new prompt: an answer finished while no worker watched belongs above it.
        if recorded {
            self.catch_up();
            self.learn_status();
            // A turn that ended between the catch-up's read and the status read is in neither:
            // the next prompt would pass over it, and its answer would never be posted.
            if !self.tracker.is_running() {
                self.catch_up();
            }
        }
        let mut memory_returned = false;
        loop {
            self.note_dropped();
            self.report_waiting();
            if let Some(message) = self.mailbox.pop() {
                memory_returned = false;
                if let SessionMsg::Ended { ended_ms } = message {
                    return self.end(ended_ms);
                }
                if !self.handle(message) {
                    return;
                }
                continue;
            }
            let (deadline, idle) = match self.next_deadline() {
                Some(deadline) => (deadline, false),
                None => (Instant::now() + IDLE_RETIRE, true),
            };
            if idle && !memory_returned {
                // Nothing to do until the owner or OpenCode speaks: what the work used goes back.
                crate::memory::return_unused_stack();
                crate::memory::return_free_heap();
                memory_returned = true;
            }
            match self.mailbox.wait(deadline) {
                inbox::Wait::Woken => {}
                inbox::Wait::Timeout if idle => {
                    if self.retire() {
                        return;
                    }
                }
                inbox::Wait::Timeout => self.on_timer(),
                // What was sent before the last sender went is still handled first.
                inbox::Wait::Disconnected if self.mailbox.is_empty() => return self.stop(),
                inbox::Wait::Disconnected => {}
            }
        }
    }

    /// Tells the router when the session starts or stops waiting for the owner.
    fn report_waiting(&mut self) {
        let waiting = self.waiting.any();
        if self.reported_waiting != Some(waiting) {
            self.reported_waiting = Some(waiting);
            (self.report)(Report::Waiting {
                key: self.key.clone(),
                waiting,
            });
        }
    }

    /// Says once in the log that stream events were dropped (the inbox was full).
    fn note_dropped(&mut self) {
        let dropped = self.mailbox.take_dropped();
        if dropped > 0 {
            crate::warn!(
                "[{}] {dropped} streamed event(s) dropped while the worker was behind; the turn's end re-reads the answer",
                self.short()
            );
        }
    }

    /// Folds the stream events first in line into the turn, so the next post or edit shows what is
    /// known now and a worker that is behind catches up in one call instead of one per event.
    fn absorb(&mut self) {
        let now = Instant::now();
        let content = |message: &SessionMsg| match message {
            SessionMsg::Event(event) => turn::is_content(event),
            SessionMsg::Child { event, .. } => !pending::is_for_owner(event),
            _ => false,
        };
        while let Some(message) = self.mailbox.pop_if(content) {
            let change = match message {
                SessionMsg::Event(event) => self.tracker.apply(event, now),
                SessionMsg::Child { child_id, event } => self.tracker.apply_child(child_id, event),
                _ => Change::Nothing,
            };
            if change == Change::Reply {
                self.reply.dirty = true;
            }
        }
    }

    /// A session already busy when its worker starts (after a restart, or a retirement) must not be
    /// sent a prompt now: OpenCode would fold it into the running turn.
    fn learn_status(&mut self) {
        match self.opencode.session_status(&self.info.directory) {
            Ok(statuses) => {
                if let Some(status) = statuses.get(&self.key.session_id)
                    && *status != Status::Idle
                {
                    crate::debug!("[{}] session is {status:?} at worker start", self.short());
                    self.tracker
                        .apply_polled(*status, Instant::now(), STALLED_TURN);
                    self.learn_running_answer();
                }
            }
            Err(e) => crate::debug!("[{}] status not read: {e}", self.short()),
        }
    }

    /// Only a worker whose loss would lose nothing retires: no turn, no queue, nothing asked of the
    /// owner, and OpenCode reachable (`!model`/`!agent` choices are kept by the router). It closes its inbox only if nothing waits in it, so a message
    /// sent meanwhile is either handled here or handed back to the router, which starts a new worker.
    /// True when the worker is retiring.
    fn retire(&mut self) -> bool {
        let retirable = !self.tracker.is_running()
            && self.queue.is_empty()
            && !self.waiting.any()
            && !self.outage.down;
        if !retirable || !self.mailbox.close_if_empty() {
            return false;
        }
        crate::debug!("[{}] idle; retiring", self.short());
        (self.report)(Report::Idle {
            key: self.key.clone(),
            worker_id: self.worker_id,
        });
        true
    }

    fn create_root(&mut self) -> bool {
        if let Some(since_ms) = self.recovery.find_root_since.take() {
            // A minute of slack for clocks that disagree between this host and Mattermost.
            let since = since_ms.saturating_sub(60_000);
            match crate::mattermost::search::find_thread_root(
                &self.mattermost,
                &self.channel_id,
                &self.bot_user_id,
                &self.key.session_id,
                since,
            ) {
                Ok(Some(root)) => {
                    crate::info!(
                        "[{}] found the thread root posted before a restart: {}",
                        self.short(),
                        root.id
                    );
                    self.root_post_id = root.id.clone();
                    (self.report)(Report::ThreadCreated {
                        key: self.key.clone(),
                        root_post_id: root.id,
                    });
                    return true;
                }
                Ok(None) => {}
                Err(e) => crate::warn!(
                    "[{}] could not look for an earlier thread root ({e}); posting one",
                    self.short()
                ),
            }
        }
        let props = json!({
            "opencode_session_id": self.key.session_id,
            "opencode_server": self.key.server.0,
        });
        match self.mattermost.at(Priority::First).create_post(
            &self.channel_id,
            "",
            &self.root_text,
            Some(props),
        ) {
            Ok(post) => {
                crate::info!("[{}] thread created: post {}", self.short(), post.id);
                self.root_post_id = post.id.clone();
                (self.report)(Report::ThreadCreated {
                    key: self.key.clone(),
                    root_post_id: post.id,
                });
                true
            }
            Err(e) => {
                crate::error!("[{}] could not create the thread: {e}", self.short());
                (self.report)(Report::ThreadFailed {
                    key: self.key.clone(),
                    error: e.to_string(),
                });
                false
            }
        }
    }

    /// Returns false when the worker should stop.
    fn handle(&mut self, message: SessionMsg) -> bool {
        let now = Instant::now();
        let mut completes_text = false;
        let change = match message {
            SessionMsg::Prompt {
                post_id,
                text,
                file_ids,
                recovered_since_ms,
            } => {
                if let Some(since_ms) = recovered_since_ms
                    && self.already_sent(&post_id, since_ms)
                {
                    crate::info!(
                        "[{}] prompt {post_id} reached OpenCode before the restart; not resending",
                        self.short()
                    );
                    self.prompt_done(&post_id);
                    return true;
                }
                // An owed `!steer` comes back as its post's text.
                if recovered_since_ms.is_some()
                    && let Some(ThreadCommand::Steer { text }) =
                        crate::command::parse_thread(&text, &self.prefix)
                {
                    return self.steer(post_id, text);
                }
                self.terminal_note();
                return self.prompt(post_id, text, file_ids, recovered_since_ms.is_some());
            }
            SessionMsg::Command {
                post_id,
                command: ThreadCommand::Steer { text },
            } => return self.steer(post_id, text),
            SessionMsg::Command { post_id, command } => {
                crate::debug!("[{}] command from post {post_id}", self.short());
                self.command(command);
                Change::Nothing
            }
            SessionMsg::Reaction { post_id, meaning } => {
                self.reaction(&post_id, meaning);
                Change::Nothing
            }
            SessionMsg::ServerDown => {
                self.outage.down = true;
                if !self.outage.told {
                    self.outage.told = true;
                    self.post_notice(
                        "⚠️ OpenCode is unreachable. Messages you send here are queued and delivered, in order, when it is back.",
                    );
                }
                Change::Nothing
            }
            SessionMsg::ServerUp { told } => {
                self.outage.down = false;
                self.outage.retry_at = None;
                if told || self.outage.told {
                    self.post_notice("✅ OpenCode is reachable again.");
                }
                self.outage.told = false;
                self.sync_waiting();
                Change::Nothing
            }
            SessionMsg::CatchUp => {
                self.catch_up();
                Change::Nothing
            }
            SessionMsg::Terminal => {
                self.candidate = true;
                self.catch_up();
                self.candidate = false;
                Change::Nothing
            }
            SessionMsg::Event(Event::SessionUpdated(info)) => {
                self.on_info(info);
                Change::Nothing
            }
            SessionMsg::Event(event) | SessionMsg::Child { event, .. }
                if pending::is_for_owner(&event) =>
            {
                self.on_owner_event(event);
                Change::Nothing
            }
            SessionMsg::Event(Event::TodoUpdated { todos, .. }) => {
                self.todos_changed(&todos);
                Change::Nothing
            }
            SessionMsg::Event(event) => {
                // A text part's closing update carries its whole text: shown at once, so the final
                // text does not wait for the next coalesced edit or for the session to go idle.
                completes_text = matches!(
                    &event,
                    Event::PartUpdated { part, .. }
                        if matches!(&part.body, crate::opencode::PartBody::Text(t) if !t.trim().is_empty())
                );
                self.tracker.apply(event, now)
            }
            SessionMsg::Child { child_id, event } => self.tracker.apply_child(child_id, event),
            SessionMsg::Polled(status) => {
                if status == Status::Idle && self.tracker.awaited_prompt().is_some() {
                    self.confirm_prompt_taken();
                }
                crate::debug!(
                    "[{}] polled {status:?} (running: {})",
                    self.short(),
                    self.tracker.is_running()
                );
                self.tracker.apply_polled(status, now, STALLED_TURN)
            }
            SessionMsg::Ended { .. } => Change::Nothing,
        };
        match change {
            Change::Nothing => {}
            Change::Reply if completes_text => {
                self.reply.dirty = true;
                self.flush_with_status(false);
            }
            Change::Reply => {
                self.reply.dirty = true;
                self.schedule();
            }
            Change::TurnEnded => {
                crate::debug!("[{}] turn ended", self.short());
                self.finish_turn()
            }
        }
        if self.tracker.busy {
            // Working again: an earlier idle that the stored messages did not bear out was stale.
            self.settle.since = None;
        }
        if !self.tracker.is_running() {
            return self.send_next();
        }
        true
    }

    /// `recovered`: owed from before a restart; the owner was already told if it had to wait.
    fn prompt(
        &mut self,
        post_id: String,
        text: String,
        file_ids: Vec<String>,
        recovered: bool,
    ) -> bool {
        crate::debug!("[{}] prompt from post {post_id}", self.short());
        // While a question waits, a plain reply is its answer, as in OpenCode's own UI.
        if file_ids.is_empty() && self.waiting.has_question() {
            self.answer_question_text(&text);
            self.prompt_done(&post_id);
            return true;
        }
        let files = match self.fetch_attachments(&file_ids) {
            Ok(files) => files,
            Err(problem) => {
                self.post_notice(&problem);
                self.prompt_done(&post_id);
                return true;
            }
        };
        let must_wait = self.tracker.is_running() || !self.queue.is_empty() || self.outage.down;
        if must_wait {
            crate::debug!(
                "[{}] prompt queued (running: {}, queued: {}, server down: {})",
                self.short(),
                self.tracker.is_running(),
                self.queue.len(),
                self.outage.down
            );
        }
        self.queue.push_back(Queued {
            post_id,
            input: PromptInput {
                text,
                files,
                ..PromptInput::default()
            },
        });
        if self.outage.down && !self.tracker.is_running() {
            let ahead = self.queue.len() - 1;
            self.post_notice(&format!(
                "⏳ OpenCode is unreachable; your message is queued ({ahead} ahead of it) and will be sent when it is back."
            ));
            return true;
        }
        if must_wait && recovered {
            return true;
        }
        if must_wait {
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
        self.send_next()
    }

    fn send_next(&mut self) -> bool {
        if self.outage.down && self.outage.retry_at.is_some_and(|t| t > Instant::now()) {
            return true;
        }
        let Some(Queued { post_id, mut input }) = self.queue.pop_front() else {
            return true;
        };
        // The choices in force when the prompt is sent, not when it was queued.
        input.model = self.model.clone();
        input.agent = self.agent.clone();
        let message_id = crate::opencode::ids::prompt_message_id(
            &post_id,
            crate::log::now_ms(),
            self.tracker.newest_message(),
        );
        input.message_id = Some(message_id.clone());
        crate::debug!(
            "[{}] sending prompt {post_id} to OpenCode as {message_id}",
            self.short()
        );
        match self
            .opencode
            .prompt_with(&self.key.session_id, &self.info.directory, &input)
        {
            Ok(()) => {
                self.prompt_done(&post_id);
                self.outage.down = false;
                self.outage.retry_at = None;
                self.tracker.saw_message(&message_id);
                self.tracker.begin(Instant::now(), Some(message_id));
                self.reply = ReplyPosts::default();
                self.todo_post = None;
                true
            }
            Err(OcError::SessionNotFound(_)) => {
                // The note counts the others waiting; this one is named in the sentence itself.
                let others = self.unsent_queue_note();
                self.queue.push_front(Queued { post_id, input });
                self.post_notice(&format!(
                    "⚠️ This session no longer exists on the OpenCode server; the message was not sent.{others}"
                ));
                (self.report)(Report::Gone {
                    key: self.key.clone(),
                });
                false
            }
            // A request that certainly never left waits for the server, first in line; one that may
            // have arrived is never resent, since a prompt sent twice would run twice.
            Err(e @ OcError::NotSent(_)) => {
                crate::warn!(
                    "[{}] prompt not delivered yet, OpenCode unreachable: {e}",
                    self.short()
                );
                self.queue.push_front(Queued { post_id, input });
                self.outage.down = true;
                self.outage.retry_at = Some(Instant::now() + PROMPT_RETRY);
                if !self.outage.told {
                    self.outage.told = true;
                    self.post_notice(
                        "⏳ OpenCode is unreachable; your message is queued and will be sent, in order, when it is back.",
                    );
                }
                true
            }
            Err(e @ OcError::Unreachable(_)) => {
                self.prompt_done(&post_id);
                crate::error!("[{}] prompt may not have been delivered: {e}", self.short());
                self.post_notice(&format!(
                    "⚠️ OpenCode stopped answering while your message was being sent ({e}), so it may not have arrived. \
                     If no answer follows, send it again."
                ));
                true
            }
            Err(e) => {
                self.prompt_done(&post_id);
                crate::error!("[{}] prompt not delivered: {e}", self.short());
                self.post_notice(&format!(
                    "⚠️ OpenCode refused your message: {e}. It was not sent; `{}status` shows the session.",
                    self.prefix
                ));
                true
            }
        }
    }

    fn on_info(&mut self, info: SessionInfo) {
        let mut info = info;
        if info.project_name.is_none() {
            info.project_name = self.info.project_name.clone();
        }
        self.info = info;
        self.update_root();
    }

    /// A reply runs a terminal's session on the bridge's server: the thread says once, ever (the
    /// note carries a prop a later worker finds), that the terminal will not show it.
    fn terminal_note(&mut self) {
        if !self.is_terminal() || std::mem::replace(&mut self.note_told, true) {
            return;
        }
        if !self.earlier().terminal_note {
            let props = json!({ terminal::NOTE_PROP: true });
            self.post_tagged(terminal::REPLY_NOTE, Some(props));
        }
    }

    /// Whether the session runs in a terminal: confirmed in this worker, or said by the root of a
    /// thread it took over (read once, with what an earlier run left there).
    pub(super) fn is_terminal(&mut self) -> bool {
        if !self.terminal && self.recovery.took_over && self.earlier().terminal_root {
            self.terminal = true;
        }
        self.terminal
    }

    /// Edits the root post when what it shows changed (title, terminal note).
    fn update_root(&mut self) {
        let terminal = self.is_terminal();
        let root = terminal::root_text(
            reply::root_post(&self.info, &self.prefix, self.opencode.shown_name()),
            terminal,
        );
        if root != self.root_text {
            self.root_text = root;
            if let Err(e) = self
                .mattermost
                .at(Priority::Background)
                .patch_post(&self.root_post_id, &self.root_text)
            {
                crate::warn!("[{}] could not update the root post: {e}", self.short());
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let retry = self.outage.retry_at.filter(|_| !self.queue.is_empty());
        [
            self.flush_deadline(),
            self.typing_deadline(),
            retry,
            self.settle.recheck_at,
            self.settle.halt_check_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self) {
        if self.flush_deadline().is_some_and(|d| d <= Instant::now()) {
            self.flush();
        }
        if self.typing_deadline().is_some_and(|d| d <= Instant::now()) {
            self.send_typing();
        }
        if self.outage.retry_at.is_some_and(|d| d <= Instant::now()) && !self.tracker.is_running() {
            self.outage.retry_at = None;
            self.send_next();
        }
        if self
            .settle
            .halt_check_at
            .is_some_and(|d| d <= Instant::now())
        {
            self.check_halt();
            if !self.tracker.is_running() {
                self.send_next();
            }
        }
        if self.settle.recheck_at.is_some_and(|d| d <= Instant::now()) {
            self.settle.recheck_at = None;
            if !self.tracker.busy {
                self.finish_turn();
                if !self.tracker.is_running() {
                    self.send_next();
                }
            }
        }
    }

    fn finish_turn(&mut self) {
        // The stream may have dropped events; the server's stored messages are the final text.
        let stored = match self.stored_messages() {
            Ok(messages) => Some(messages),
            Err(e) => {
                crate::warn!("[{}] final text not re-read: {e}", self.short());
                None
            }
        };
        // Settled nowhere in the stored messages: OpenCode was restarted mid-answer, which is never
        // finished.
        let mut interrupted = false;
        if let Some(messages) = &stored
            && !self.settle.halted
            && !self.tracker.settled_in(messages)
        {
            let never_started = self
                .tracker
                .turn
                .as_ref()
                .is_some_and(|t| !t.active && t.started.elapsed() >= STALLED_TURN);
            if never_started {
                return self.abandon_turn();
            }
            let since = *self.settle.since.get_or_insert_with(Instant::now);
            if since.elapsed() < UNSETTLED_GRACE {
                crate::debug!(
                    "[{}] idle, but the stored messages do not show the turn finished yet",
                    self.short()
                );
                self.settle.recheck_at = Some(Instant::now() + SETTLE_RECHECK);
                return;
            }
            crate::warn!(
                "[{}] the session stayed idle without finishing the turn; showing what it has as incomplete",
                self.short()
            );
            interrupted = true;
        }
        self.settle = Settle::default();
        self.complete_turn(stored.as_deref(), None, interrupted);
    }

    /// OpenCode took the prompt but never started on it (it may drop a prompt it cannot use, such
    /// as an image it fails to decode): say so rather than show an empty answer as done.
    fn abandon_turn(&mut self) {
        crate::warn!(
            "[{}] OpenCode did not start on the prompt within {} s",
            self.short(),
            STALLED_TURN.as_secs()
        );
        self.settle.since = None;
        self.settle.recheck_at = None;
        self.tracker.finish(None, Instant::now());
        self.reply = ReplyPosts::default();
        self.post_notice(&format!(
            "⚠️ OpenCode took your message but has not started on it after {} s. If no answer follows, send it again; `{}status` shows the session.",
            STALLED_TURN.as_secs(),
            self.prefix
        ));
    }

    /// Shows the turn's final text and its completion line, and records it as delivered.
    /// `elapsed_ms` overrides the turn's own clock (a turn that ran while the bridge was away);
    /// `interrupted`: OpenCode never finished the answer, so the reply says it is incomplete.
    fn complete_turn(
        &mut self,
        stored: Option<&[StoredMessage]>,
        elapsed_ms: Option<u64>,
        interrupted: bool,
    ) {
        let finished = match interrupted {
            true => self.tracker.finish_cut_off(stored, Instant::now()),
            false => self.tracker.finish(stored, Instant::now()),
        };
        let Some((turn, summary)) = finished else {
            return;
        };
        let in_terminal = self.quote.is_some();
        if summary.outcome == reply::Outcome::Interrupted {
            self.reply.key = turn.prompt_key().map(str::to_string);
            let shown = turn.body(false);
            let body = match shown.is_empty() {
                true => reply::INCOMPLETE_NOTE.to_string(),
                false => format!("{shown}\n\n{}", reply::INCOMPLETE_NOTE),
            };
            self.send_reply(&body, true);
        } else if let Some(quote) = self.quote.take() {
            self.reply.key = turn.prompt_key().map(str::to_string);
            self.send_reply(&format!("{quote}\n\n{}", turn.body(false)), true);
        } else {
            self.show_final(&turn);
        }
        self.quote = None;
        self.reply = ReplyPosts::default();
        self.todo_post = None;
        self.last_typing = None;
        let mut line = reply::completion_line(
            &summary.outcome,
            elapsed_ms.unwrap_or(summary.elapsed_ms),
            summary.tokens,
            summary.cost,
        );
        if elapsed_ms.is_some() && in_terminal {
            line.push_str(" · _run in a terminal_");
        } else if elapsed_ms.is_some() {
            line.push_str(" · _finished while opencode-mattermost was away_");
        }
        let elapsed = Duration::from_millis(elapsed_ms.unwrap_or(summary.elapsed_ms));
        let wanted = reply::completion_mentions(&self.notify, &summary.outcome, elapsed);
        let line = self.mention_if(wanted, &line);
        match turn.prompt_key() {
            Some(key) if self.earlier_done(key) => {
                crate::debug!(
                    "[{}] the completion line was posted before the restart",
                    self.short()
                );
            }
            Some(key) => {
                self.post_at(Priority::Final, &line, Some(json!({ DONE_PROP: key })));
            }
            None => {
                self.post_at(Priority::Final, &line, None);
            }
        }
        let message_id = turn.last_assistant_id().map(str::to_string);
        crate::debug!(
            "[{}] turn delivered: last assistant message {message_id:?}",
            self.short()
        );
        self.recovery.delivery.message_id = message_id.clone();
        self.recovery.delivery.streaming_post_id = None;
        let seq = self.delivered_seq(message_id.as_deref());
        if seq.is_some() {
            self.recovery.delivery.seq = seq;
        }
        (self.report)(Report::Delivered {
            key: self.key.clone(),
            message_id,
            seq,
        });
    }

    /// Hands the owner's current `!model`/`!agent` choices to the router to keep.
    fn report_choices(&self) {
        (self.report)(Report::Choices {
            key: self.key.clone(),
            model: self.model.as_ref().map(model_setting),
            agent: self.agent.clone(),
        });
    }

    fn prompt_done(&self, post_id: &str) {
        (self.report)(Report::PromptDone {
            key: self.key.clone(),
            post_id: post_id.to_string(),
        });
    }

    /// The session's latest messages as OpenCode stores them, oldest first. The newest id is noted:
    /// the next prompt's id must sort after it.
    fn stored_messages(&mut self) -> Result<Vec<StoredMessage>, OcError> {
        let messages =
            self.opencode
                .messages(&self.key.session_id, &self.info.directory, FINAL_MESSAGES)?;
        if let Some((newest, _)) = messages.last() {
            self.tracker.saw_message(&newest.id);
        }
        Ok(messages)
    }

    /// The bridge is stopping: a reply still streaming says so instead of "working…" forever.
    fn stop(&mut self) {
        let Some(turn) = self.tracker.turn.as_ref() else {
            return;
        };
        if self.reply.posts.is_empty() {
            return;
        }
        let body = format!("{}\n\n{}", turn.body(false), reply::INTERRUPTED_NOTE);
        self.reply.key = turn.prompt_key().map(str::to_string);
        self.send_reply(&body, true);
    }

    fn end(&mut self, ended_ms: u64) {
        if let Some((turn, _)) = self.tracker.finish(None, Instant::now()) {
            self.show_final(&turn);
        }
        let lived = ended_ms.saturating_sub(self.info.created_ms);
        let ended = format!(
            "🏁 This session ended after {} (deleted on the OpenCode server). Replies here are no longer delivered.{}",
            format_duration(lived),
            self.unsent_queue_note()
        );
        let ended = self.mention_if(self.notify.errors, &ended);
        self.post_at(Priority::Final, &ended, None);
    }

    /// Said when the session is gone with prompts still waiting, so none vanish silently.
    fn unsent_queue_note(&self) -> String {
        match self.queue.len() {
            0 => String::new(),
            n => format!(" {n} queued message(s) were not sent."),
        }
    }
}

/// A model as `Setup::model` and `Report::Choices` carry it: `provider/model` (the model id may hold
/// more slashes).
fn model_ref(setting: &str) -> Option<ModelRef> {
    match setting.split_once('/') {
        Some((provider_id, model_id)) if !provider_id.is_empty() && !model_id.is_empty() => {
            Some(ModelRef {
                provider_id: provider_id.to_string(),
                model_id: model_id.to_string(),
            })
        }
        _ => {
            crate::warn!("a saved model choice {setting:?} is not provider/model; ignored");
            None
        }
    }
}

fn model_setting(model: &ModelRef) -> String {
    format!("{}/{}", model.provider_id, model.model_id)
}
