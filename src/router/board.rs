//! `!board`: the router decides what the board shows (`crate::board::render`) and hands the text to
//! the `board` thread, which posts it and edits it at most every 5 s in the lowest budget class,
//! always with the latest text. The router never calls Mattermost itself.

use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::board::{BoardEntry, BoardState, ENDED_SHOWN_FOR_MS, Pacer};
use crate::budget::Priority;
use crate::mattermost::rest::MattermostClient;

use super::*;

/// The board queue: the thread drains it to the latest text, so it is never long.
pub const QUEUE: usize = 16;

/// How often the router looks at what the board would show (the pacer limits the edits).
const RENDER_EVERY: Duration = Duration::from_secs(1);

/// What the router asks of the board thread.
#[derive(Debug, Clone, PartialEq)]
pub enum BoardJob {
    /// Post the board (`post_id` None) or make the post show `text`.
    Show {
        post_id: Option<String>,
        text: String,
    },
    /// The owner stopped the board: its post says so, and is edited no more.
    Stop { post_id: String, text: String },
}

/// What the board thread tells the router.
#[derive(Debug, Clone, PartialEq)]
pub enum BoardEvent {
    Posted {
        post_id: String,
    },
    /// The post could not be made; the owner may ask again.
    NotPosted {
        error: String,
    },
    /// The post was deleted: the board stops.
    Gone {
        post_id: String,
    },
}

/// The router's side of the board.
#[derive(Debug, Default)]
pub(super) struct BoardView {
    /// Being posted: no second post until it is.
    creating: bool,
    /// Sessions whose worker says a request waits for the owner.
    waiting: HashSet<SessionKey>,
    /// Each session's state on the board, and since when (ms since epoch).
    since: HashMap<SessionKey, (BoardState, u64)>,
    /// The text last handed to the board thread.
    sent: Option<String>,
    last_render: Option<Instant>,
}

impl Router {
    pub(super) fn on_board_command(&mut self, on: bool) {
        let prefix = self.command_prefix.clone();
        let current = self.registry.board_post_id().map(str::to_string);
        match (on, current) {
            (true, Some(post_id)) => {
                let link = self.permalink(&post_id);
                self.board.sent = None;
                self.reply(
                    "",
                    &format!(
                        "📋 The board is [here]({link}); it is kept current. `{prefix}board off` stops it."
                    ),
                );
            }
            (true, None) if self.board.creating => {}
            (true, None) => {
                self.board.creating = true;
                let text = self.board_text(crate::log::now_ms());
                self.board.sent = Some(text.clone());
                self.effects.push(Effect::Board(BoardJob::Show {
                    post_id: None,
                    text,
                }));
            }
            (false, Some(post_id)) => {
                self.registry.set_board_post_id(None);
                self.board.sent = None;
                self.effects.push(Effect::Board(BoardJob::Stop {
                    post_id,
                    text: format!(
                        "📋 **Sessions board** · _stopped. `{prefix}board` starts a new one._"
                    ),
                }));
                self.reply("", "📋 The board is stopped.");
            }
            (false, None) => self.reply(
                "",
                &format!("ℹ️ No board is running. `{prefix}board` starts one."),
            ),
        }
    }

    pub(super) fn on_board_event(&mut self, event: BoardEvent) {
        match event {
            BoardEvent::Posted { post_id } => {
                self.board.creating = false;
                self.registry.set_board_post_id(Some(post_id));
            }
            BoardEvent::NotPosted { error } => {
                self.board.creating = false;
                self.board.sent = None;
                self.reply(
                    "",
                    &format!("⚠️ The board could not be posted ({error}); send the command again."),
                );
            }
            BoardEvent::Gone { post_id } => {
                if self.registry.board_post_id() == Some(post_id.as_str()) {
                    crate::info!("the board post {post_id} was deleted; the board stops");
                    self.registry.set_board_post_id(None);
                    self.board.sent = None;
                }
            }
        }
    }

    /// A job the board thread's queue could not take: the text goes again at the next tick.
    pub(super) fn board_dropped(&mut self) {
        self.board.sent = None;
        self.board.creating = false;
    }

    pub(super) fn board_waiting(&mut self, key: SessionKey, waiting: bool) {
        match waiting {
            true => self.board.waiting.insert(key),
            false => self.board.waiting.remove(&key),
        };
    }

    /// On the router's tick: the latest text goes to the board thread when it changed.
    pub(super) fn board_tick(&mut self, now: Instant) {
        let Some(post_id) = self.registry.board_post_id().map(str::to_string) else {
            return;
        };
        if !self.announced_ready
            || self
                .board
                .last_render
                .is_some_and(|at| now.duration_since(at) < RENDER_EVERY)
        {
            return;
        }
        self.board.last_render = Some(now);
        let text = self.board_text(crate::log::now_ms());
        if self.board.sent.as_ref() == Some(&text) {
            return;
        }
        self.board.sent = Some(text.clone());
        self.effects.push(Effect::Board(BoardJob::Show {
            post_id: Some(post_id),
            text,
        }));
    }

    /// The board for this link's sessions: live threads, then those ended within the hour.
    fn board_text(&mut self, now_ms: u64) -> String {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        for (key, live) in &self.live {
            let Some(record) = self.registry.record(key) else {
                continue;
            };
            if record.root_post_id.is_empty() || record.ended_ms.is_some() {
                continue;
            }
            let state = if self.board.waiting.contains(key) {
                BoardState::Waiting
            } else if matches!(live.status, Status::Busy | Status::Retry) {
                BoardState::Working
            } else {
                BoardState::Idle
            };
            let title = match live.info.title.is_empty() {
                true => record.title.clone(),
                false => live.info.title.clone(),
            };
            entries.push((key.clone(), state, title, record.root_post_id.clone(), None));
            seen.insert(key.clone());
        }
        for (server, server_state) in &self.registry.state().servers {
            for (session_id, record) in &server_state.sessions {
                let Some(ended) = record.ended_ms else {
                    continue;
                };
                if now_ms.saturating_sub(ended) > ENDED_SHOWN_FOR_MS
                    || record.root_post_id.is_empty()
                {
                    continue;
                }
                let key = SessionKey {
                    server: ServerKey(server.clone()),
                    session_id: session_id.clone(),
                };
                if seen.contains(&key) {
                    continue;
                }
                entries.push((
                    key,
                    BoardState::Ended,
                    record.title.clone(),
                    record.root_post_id.clone(),
                    Some(ended),
                ));
            }
        }
        let mut shown = Vec::new();
        let mut since = HashMap::new();
        for (key, state, title, root, ended) in entries {
            let from = match self.board.since.get(&key) {
                Some((was, from)) if *was == state => *from,
                _ => ended.unwrap_or(now_ms),
            };
            since.insert(key.clone(), (state, from));
            shown.push(BoardEntry {
                title,
                server: server_name(&key.server),
                state,
                since_ms: from,
                permalink: self.permalink(&root),
            });
        }
        self.board.since = since;
        crate::board::render(&shown, now_ms, &self.command_prefix)
    }
}

/// A server as the owner knows it: its host and port.
fn server_name(server: &ServerKey) -> String {
    let url = server.0.as_str();
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .to_string()
}

/// The `board` thread: posts the board, and edits it at most every 5 s in the lowest class of the
/// budget, always with the latest text; what it learns goes back to the router as `Input::Board`.
pub fn run_board(
    client: Arc<MattermostClient>,
    dm_channel_id: String,
    jobs: Receiver<BoardJob>,
    inputs: Sender<Input>,
) {
    let mut pacer = Pacer::default();
    let mut post_id: Option<String> = None;
    loop {
        let job = match pacer.due() {
            Some(due) => match jobs.recv_deadline(due) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
        };
        match job {
            Some(BoardJob::Show {
                post_id: None,
                text,
            }) => {
                // The owner asked for it: an answer, first in the budget.
                match client
                    .at(Priority::Ask)
                    .create_post(&dm_channel_id, "", &text, None)
                {
                    Ok(post) => {
                        pacer = Pacer::default();
                        pacer.shown(text, Instant::now());
                        post_id = Some(post.id.clone());
                        let _ = inputs.send(Input::Board(BoardEvent::Posted { post_id: post.id }));
                    }
                    Err(e) => {
                        crate::warn!("the board was not posted: {e}");
                        let error = e.to_string();
                        let _ = inputs.send(Input::Board(BoardEvent::NotPosted { error }));
                    }
                }
            }
            Some(BoardJob::Show {
                post_id: Some(id),
                text,
            }) => {
                if post_id.as_ref() != Some(&id) {
                    // A board from before a restart: its text is unknown, so the first edit goes now.
                    post_id = Some(id);
                    pacer = Pacer::default();
                }
                pacer.want(text);
            }
            Some(BoardJob::Stop { post_id: id, text }) => {
                post_id = None;
                pacer = Pacer::default();
                if let Err(e) = client.at(Priority::Ask).patch_post(&id, &text) {
                    crate::warn!("the stopped board {id} was not updated: {e}");
                }
            }
            None => {}
        }
        let (Some(id), Some(text)) = (post_id.clone(), pacer.take_due(Instant::now())) else {
            continue;
        };
        match client.at(Priority::Background).patch_post(&id, &text) {
            Ok(_) => {}
            Err(e) if matches!(e.status(), Some(403 | 404)) => {
                post_id = None;
                pacer = Pacer::default();
                let _ = inputs.send(Input::Board(BoardEvent::Gone { post_id: id }));
            }
            Err(e) => {
                crate::warn!("the board {id} was not updated: {e}; trying again");
                pacer.failed(text);
            }
        }
    }
}
