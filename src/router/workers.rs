//! Worker lifecycle: starting a session's worker (and its thread), handing it messages, the end of a
//! session, and what workers report.

use super::*;

impl Router {
    /// Starts a worker that first posts the session's thread root.
    pub(super) fn start_thread(&mut self, key: SessionKey) {
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
    pub(super) fn worker_for(&mut self, key: &SessionKey, ending: Ending) -> Option<Inbox> {
        if let Some(handle) = self.workers.get(key) {
            return Some(handle.inbox.clone());
        }
        if self.record(key)?.ended_ms.is_some() && ending == Ending::Refused {
            return None;
        }
        self.spawn_recorded(key)
    }

    /// A worker for a session whose thread is on record, ended or not.
    pub(super) fn spawn_recorded(&mut self, key: &SessionKey) -> Option<Inbox> {
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

    pub(super) fn spawn_worker(
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
        let from_start = self.elsewhere.owed_from_start(key);
        let delivery = match self.record(key) {
            Some(record) => session::Delivery {
                message_id: record.delivered_message_id.clone(),
                since_ms: record.delivered_at_ms,
                streaming_post_id: record.streaming_post_id.clone(),
                seq: record.delivered_seq,
            },
            // Found by the poll, run in a terminal or created while we did not listen: nothing of
            // it was streamed, so its turns from its start are owed, the one that created it too.
            None if from_start => session::Delivery {
                since_ms: info.created_ms.min(crate::log::now_ms()),
                ..session::Delivery::default()
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
            model,
            agent,
            owner_username: self.identity.owner_username.clone(),
            notify: self.notify,
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
    pub(super) fn session_ended(&mut self, key: &SessionKey, told: Told) {
        self.live.remove(key);
        self.parents.remove(key);
        self.elsewhere.forget(key);
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

    /// Hands a message to the session's worker, starting one if needed.
    pub(super) fn deliver(&mut self, key: &SessionKey, message: SessionMsg) -> bool {
        self.deliver_to(key, message, Ending::Refused)
    }

    /// A worker that exited since the router last looked (its report still queued) is replaced, so
    /// nothing sent is dropped.
    pub(super) fn deliver_to(
        &mut self,
        key: &SessionKey,
        message: SessionMsg,
        ending: Ending,
    ) -> bool {
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

    pub(super) fn on_report(&mut self, report: Report) {
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
                    // The worker closed its inbox with nothing waiting and is ending; a message
                    // sent meanwhile came back from `Inbox::send` and started a new one.
                    crate::debug!("[{}] idle worker retired", short_id(&key.session_id));
                    self.retiring.insert(worker_id, handle.thread);
                }
            }
            Report::ReplyStarted { key, post_id } => {
                self.registry.reply_started(&key, post_id);
            }
            Report::Choices { key, model, agent } => self.registry.choices(&key, model, agent),
            Report::Delivered {
                key,
                message_id,
                seq,
            } => {
                self.registry
                    .delivered(&key, message_id, seq, crate::log::now_ms());
            }
            Report::Waiting { key, waiting } => self.board_waiting(key, waiting),
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
}

/// Whether the thread was already told its session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Told {
    Yes,
    No,
}

/// Whether a worker may be started for a session whose thread has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Refused,
    Allowed,
}
