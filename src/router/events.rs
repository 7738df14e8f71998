//! OpenCode's side: the event stream and the reconciling poll, routed to sessions; which sessions get a
//! thread; confirming that a missing session is gone.

use super::*;
use crate::session::terminal::Found;

impl Router {
    pub(super) fn on_opencode(&mut self, server: ServerKey, event: WatchEvent) {
        match event {
            WatchEvent::StreamUp => {
                crate::info!("opencode event stream connected: {}", server.0);
                if let Some(probe) = self.servers.get(&server).and_then(|c| c.last_probe()) {
                    let api = format!("{}: {}", probe.dialect.name(), probe.reason);
                    self.registry.server_api(&server, api);
                }
                self.stream_up.insert(server.clone(), true);
                self.elsewhere
                    .listening(&server, Some(crate::log::now_ms()));
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
                self.elsewhere.listening(&server, None);
                if self.stream_up.insert(server.clone(), false) != Some(false) {
                    crate::warn!("opencode event stream lost ({}): {reason}", server.0);
                } else {
                    crate::debug!("opencode event stream still down: {reason}");
                }
                self.check_ready();
            }
            WatchEvent::PollFailed(reason) => crate::debug!("session poll failed: {reason}"),
            WatchEvent::Event(envelope) => self.on_opencode_event(server, envelope.event),
            WatchEvent::Snapshot { sessions, statuses } => {
                self.reconcile(server, sessions, statuses)
            }
            WatchEvent::Recent(sessions) => self.recent(server, sessions),
        }
    }

    /// Sessions of `server` with a running worker and a thread that has not ended.
    pub(super) fn workers_of(&self, server: &ServerKey) -> Vec<SessionKey> {
        self.workers
            .keys()
            .filter(|k| &k.server == server)
            .filter(|k| self.record(k).is_none_or(|r| r.ended_ms.is_none()))
            .cloned()
            .collect()
    }

    pub(super) fn on_opencode_event(&mut self, server: ServerKey, event: Event) {
        let Some(session_id) = event.session_id().map(str::to_string) else {
            return;
        };
        // A turn run by another server on the same store streams into the owner's one thread.
        let server = self.owner_of(&server, &session_id);
        let key = SessionKey { server, session_id };
        self.elsewhere.on_event(&key, crate::log::now_ms());
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

    /// The key of a session `server` listed, when `server` owns it (servers sharing a store list the
    /// same sessions; only the owner's listing counts).
    pub(super) fn owned_key(&self, server: &ServerKey, session_id: &str) -> Option<SessionKey> {
        (self.owner_of(server, session_id) == *server).then(|| SessionKey {
            server: server.clone(),
            session_id: session_id.to_string(),
        })
    }

    /// Which server a session belongs to when servers share a store and all list it: the one its
    /// thread is recorded under, else the first that reported it. Prompts go there.
    pub(super) fn owner_of(&self, server: &ServerKey, session_id: &str) -> ServerKey {
        let key = |server: &ServerKey| SessionKey {
            server: server.clone(),
            session_id: session_id.to_string(),
        };
        if self.servers.len() < 2 {
            return server.clone();
        }
        let recorded = |s: &ServerKey| self.record(&key(s)).is_some();
        if recorded(server) {
            return server.clone();
        }
        if let Some(other) = self.servers.keys().find(|s| recorded(s)) {
            return other.clone();
        }
        let known = |s: &ServerKey| {
            let k = key(s);
            self.workers.contains_key(&k) || self.live.contains_key(&k)
        };
        if known(server) {
            return server.clone();
        }
        self.servers
            .keys()
            .find(|s| known(s))
            .unwrap_or(server)
            .clone()
    }

    pub(super) fn learn(&mut self, key: &SessionKey, mut info: SessionInfo) {
        // Another link's session (OPENCODE_MM_DIRS): unknown here, so it gets no thread, no
        // worker and no listing, and its events find no one.
        if !self.dirs.takes(&info.directory) {
            return;
        }
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

    pub(super) fn set_status(&mut self, key: &SessionKey, status: Status) {
        if let Some(live) = self.live.get_mut(key) {
            live.status = status;
        }
    }

    /// New top-level sessions created since the bridge first started get a thread automatically.
    pub(super) fn wants_thread(&self, key: &SessionKey) -> bool {
        let Some(live) = self.live.get(key) else {
            return false;
        };
        live.info.parent_id.is_none()
            && live.info.created_ms >= self.registry.state().first_started_ms
            && self.record(key).is_none()
            && !self.workers.contains_key(key)
    }

    pub(super) fn reconcile(
        &mut self,
        server: ServerKey,
        sessions: Vec<SessionInfo>,
        statuses: HashMap<String, Status>,
    ) {
        let catching_up = self.catch_up_due.remove(&server);
        let mut updated_ms = HashMap::new();
        let mut present = HashSet::new();
        for info in sessions {
            let Some(key) = self.owned_key(&server, &info.id) else {
                continue;
            };
            present.insert(info.id.clone());
            updated_ms.insert(info.id.clone(), info.updated_ms);
            self.learn(&key, info);
            if let Some(status) = statuses.get(&key.session_id) {
                self.set_status(&key, *status);
            }
            self.found_by_poll(&key);
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
            let updated = updated_ms.get(&key.session_id).copied().unwrap_or(0);
            let busy = status.is_some_and(|s| s != Status::Idle);
            if !self.follow_elsewhere(&key, updated, busy) && catching_up && !busy {
                self.catch_up(&key, updated_ms.get(&key.session_id).copied());
            }
        }
    }

    /// The light poll: sessions updated (v1) or created (v2) lately. A new one gets its thread, and
    /// one run in a terminal has its finished turns posted, without waiting for the full poll.
    pub(super) fn recent(&mut self, server: ServerKey, sessions: Vec<SessionInfo>) {
        for info in sessions {
            let Some(key) = self.owned_key(&server, &info.id) else {
                continue;
            };
            let updated = info.updated_ms;
            // A terminal names its session with no event here: the root shows the new title.
            let retitled = self
                .live
                .get(&key)
                .is_some_and(|l| l.info.title != info.title)
                && self.record(&key).is_some_and(|r| r.ended_ms.is_none());
            if retitled {
                self.deliver(&key, SessionMsg::Event(Event::SessionUpdated(info.clone())));
            }
            self.learn(&key, info);
            self.found_by_poll(&key);
            if self.record(&key).is_some_and(|r| r.ended_ms.is_none()) {
                let busy = self
                    .live
                    .get(&key)
                    .is_some_and(|l| l.status != Status::Idle);
                self.follow_elsewhere(&key, updated, busy);
            }
        }
    }

    /// A session listed by a poll that wants a thread gets one, marked as run in a terminal when no
    /// event of it reached us; one too new to tell waits for its event or the next poll.
    fn found_by_poll(&mut self, key: &SessionKey) {
        if !self.wants_thread(key) {
            return;
        }
        let (created_ms, updated_ms) = self
            .live
            .get(key)
            .map_or((0, 0), |l| (l.info.created_ms, l.info.updated_ms));
        let now = crate::log::now_ms();
        let Some(found) = self.elsewhere.on_found(key, created_ms, updated_ms, now) else {
            return;
        };
        crate::info!(
            "[{}] session found by the poll ({found:?}, created {} ms ago); creating its thread",
            short_id(&key.session_id),
            now.saturating_sub(created_ms)
        );
        self.start_thread(key.clone());
        // Nothing of it was streamed: what it ran so far is posted once its root is up.
        match found {
            Found::Terminal => self.deliver(key, SessionMsg::Terminal),
            Found::Missed => self.deliver(key, SessionMsg::CatchUp),
            Found::Here => true,
        };
    }

    /// Run in a terminal: no events reach us, so its finished turns come from the store, read when
    /// the poll shows it moved with no event here. True when the worker was told to read them.
    fn follow_elsewhere(&mut self, key: &SessionKey, updated_ms: u64, busy: bool) -> bool {
        let since = self.record(key).map_or(0, |r| r.delivered_at_ms);
        if self.elsewhere.on_poll(key, updated_ms, busy, since) && !busy {
            self.deliver(key, SessionMsg::Terminal);
            return true;
        }
        false
    }

    /// An idle session that changed since its thread was last complete may have answered while
    /// the bridge (or the stream) was away: its worker posts what is missing.
    pub(super) fn catch_up(&mut self, key: &SessionKey, updated_ms: Option<u64>) {
        // A v2 turn leaves the session's `time.updated` as it was (1.18.33), so on v2 any open
        // thread may have moved on: its worker reads the durable log after its position, a call
        // that finds nothing when nothing happened.
        let v2 = self
            .servers
            .get(&key.server)
            .is_some_and(|c| c.dialect() == crate::opencode::Dialect::V2);
        let updated_ms = if v2 { Some(u64::MAX) } else { updated_ms };
        if self
            .registry
            .changed_since_delivered(key, updated_ms, crate::log::now_ms())
        {
            self.deliver(key, SessionMsg::CatchUp);
        }
    }

    /// A session missing from the list may be archived rather than deleted: ask before ending it.
    pub(super) fn confirm_gone(&mut self, key: &SessionKey) {
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
}

/// One event in a few words, for trace logs.
pub(super) fn event_brief(event: &Event) -> String {
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
