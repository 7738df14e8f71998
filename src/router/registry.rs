//! The registry: the persisted state (`state.json`) and the indexes built from it, in one value, so
//! no map is synced by hand. What must survive a crash is saved before the router acts on it (a
//! root intent, an owed prompt, an ended session, a new thread, the DM cursor with what its post
//! left owed); the rest (delivery marks, titles, forgotten prompts) at most every `FLUSH_EVERY`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::mattermost::Post;
use crate::opencode::{ServerKey, SessionInfo, SessionKey};
use crate::store::{MattermostCursor, PendingPrompt, State, Store, ThreadRecord};

/// How long a change that may be lost in a crash waits to be written with others.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

pub struct Registry {
    store: Store,
    state: State,
    /// Thread root post id → its session; also roots whose record is on its way (adopted).
    by_root: HashMap<String, SessionKey>,
    /// Root intents left by an earlier run, with when: their thread may exist unrecorded, so its
    /// worker looks for it before posting another.
    recovered_intents: HashMap<SessionKey, u64>,
    /// Changes not yet written.
    dirty: bool,
    last_saved: Option<Instant>,
    /// Ended sessions older than this are forgotten.
    forget_after: Duration,
}

impl Registry {
    pub fn new(store: Store, state: State, forget_after: Duration, now_ms: u64) -> Registry {
        let mut registry = Registry {
            store,
            state,
            by_root: HashMap::new(),
            recovered_intents: HashMap::new(),
            dirty: false,
            last_saved: None,
            forget_after,
        };
        registry.forget_ended(now_ms);
        for (server, server_state) in &registry.state.servers {
            for (session_id, since) in &server_state.root_intents {
                let key = SessionKey {
                    server: ServerKey(server.clone()),
                    session_id: session_id.clone(),
                };
                registry.recovered_intents.insert(key, *since);
            }
            for (session_id, record) in &server_state.sessions {
                registry.by_root.insert(
                    record.root_post_id.clone(),
                    SessionKey {
                        server: ServerKey(server.clone()),
                        session_id: session_id.clone(),
                    },
                );
            }
        }
        registry
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn record(&self, key: &SessionKey) -> Option<&ThreadRecord> {
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

    pub fn is_ended(&self, key: &SessionKey) -> bool {
        self.record(key).is_some_and(|r| r.ended_ms.is_some())
    }

    pub fn session_of_root(&self, root_id: &str) -> Option<SessionKey> {
        self.by_root.get(root_id).cloned()
    }

    /// A root known to be this session's whose record is on its way.
    pub fn link_root(&mut self, root_id: &str, key: &SessionKey) {
        self.by_root.insert(root_id.to_string(), key.clone());
    }

    pub fn thread_count(&self) -> usize {
        self.by_root.len()
    }

    /// Sessions of `server` whose thread has not ended.
    pub fn open_sessions(&self, server: &ServerKey) -> Vec<String> {
        self.state
            .servers
            .get(&server.0)
            .map(|s| {
                s.sessions
                    .iter()
                    .filter(|(_, r)| r.ended_ms.is_none())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// When a root intent left by an earlier run was recorded: its thread may exist unrecorded.
    pub fn recovered_intent(&self, key: &SessionKey) -> Option<u64> {
        self.recovered_intents.get(key).copied()
    }

    /// Saved before the root is posted, so a crash in between cannot lead to a second thread: the
    /// next run looks for the root first. An intent from an earlier run keeps its time.
    pub fn intend_root(&mut self, key: &SessionKey, now_ms: u64) {
        if self.recovered_intents.contains_key(key) {
            return;
        }
        self.server_mut(&key.server)
            .root_intents
            .insert(key.session_id.clone(), now_ms);
        self.save_now();
    }

    /// A lost removal only makes the next run look for a root first.
    pub fn clear_intent(&mut self, key: &SessionKey) {
        self.recovered_intents.remove(key);
        if let Some(server) = self.state.servers.get_mut(&key.server.0)
            && server.root_intents.remove(&key.session_id).is_some()
        {
            self.dirty = true;
        }
    }

    pub fn record_thread(
        &mut self,
        key: &SessionKey,
        root_post_id: &str,
        channel_id: &str,
        info: &SessionInfo,
        now_ms: u64,
    ) {
        self.by_root.insert(root_post_id.to_string(), key.clone());
        self.recovered_intents.remove(key);
        // A thread started anew (its root was deleted) keeps the owner's choices.
        let (model, agent) = self
            .record(key)
            .map(|r| (r.model.clone(), r.agent.clone()))
            .unwrap_or_default();
        let server = self.server_mut(&key.server);
        server.root_intents.remove(&key.session_id);
        server.sessions.insert(
            key.session_id.clone(),
            ThreadRecord {
                root_post_id: root_post_id.to_string(),
                channel_id: channel_id.to_string(),
                directory: info.directory.clone(),
                title: info.title.clone(),
                slug: info.slug.clone(),
                created_ms: info.created_ms,
                ended_ms: None,
                parent_id: None,
                delivered_message_id: None,
                delivered_at_ms: now_ms,
                streaming_post_id: None,
                delivered_seq: None,
                model,
                agent,
            },
        );
        self.save_now();
    }

    /// The owner's `!model`/`!agent` choices, saved at once: a restart keeps them.
    pub fn choices(&mut self, key: &SessionKey, model: Option<String>, agent: Option<String>) {
        if let Some(record) = self.record_mut(key)
            && (record.model != model || record.agent != agent)
        {
            record.model = model;
            record.agent = agent;
            self.save_now();
        }
    }

    pub fn learn_title(&mut self, key: &SessionKey, title: &str, slug: &str) {
        if let Some(record) = self.record_mut(key)
            && (record.title != title || record.slug != slug)
        {
            record.title = title.to_string();
            record.slug = slug.to_string();
            self.dirty = true;
        }
    }

    /// Marks the session ended and drops what it was owed; true only the first time. Saved at
    /// once: the end is said in the thread exactly once, also across a restart.
    pub fn set_ended(&mut self, key: &SessionKey, now_ms: u64) -> bool {
        self.recovered_intents.remove(key);
        if let Some(server) = self.state.servers.get_mut(&key.server.0) {
            server.root_intents.remove(&key.session_id);
            // The worker says in the thread how many were not sent; none is owed any more.
            server
                .pending_prompts
                .retain(|_, p| p.session_id != key.session_id);
        }
        let Some(record) = self.record_mut(key) else {
            self.dirty = true;
            return false;
        };
        if record.ended_ms.is_some() {
            self.dirty = true;
            return false;
        }
        record.ended_ms = Some(now_ms);
        self.save_now();
        true
    }

    /// Saved at once: a prompt taken on is owed until its worker is done with it, so a crash while
    /// it waits in a queue does not lose it.
    pub fn owe_prompt(&mut self, key: &SessionKey, post: &Post, now_ms: u64) {
        self.server_mut(&key.server).pending_prompts.insert(
            post.id.clone(),
            PendingPrompt {
                session_id: key.session_id.clone(),
                create_at: post.create_at,
                owed_at_ms: now_ms,
            },
        );
        self.save_now();
    }

    /// A lost removal only makes a restart offer the prompt again; the worker skips one OpenCode
    /// already has.
    pub fn forget_prompt(&mut self, key: &SessionKey, post_id: &str) {
        if let Some(server) = self.state.servers.get_mut(&key.server.0)
            && server.pending_prompts.remove(post_id).is_some()
        {
            self.dirty = true;
        }
    }

    /// Every owed prompt, oldest post first: (post id, session, when it was taken on).
    pub fn owed_prompts(&self) -> Vec<(String, SessionKey, u64)> {
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
        owed.into_iter()
            .map(|(_, post_id, key, owed_at_ms)| (post_id, key, owed_at_ms))
            .collect()
    }

    pub fn reply_started(&mut self, key: &SessionKey, post_id: String) {
        if let Some(record) = self.record_mut(key) {
            record.streaming_post_id = Some(post_id);
            self.dirty = true;
        }
    }

    pub fn delivered(
        &mut self,
        key: &SessionKey,
        message_id: Option<String>,
        seq: Option<u64>,
        now_ms: u64,
    ) {
        if let Some(record) = self.record_mut(key) {
            record.streaming_post_id = None;
            record.delivered_at_ms = now_ms;
            if message_id.is_some() {
                record.delivered_message_id = message_id;
            }
            if seq.is_some() {
                record.delivered_seq = seq;
            }
            self.dirty = true;
        }
    }

    /// Whether the session changed after its thread was last complete. A record from before
    /// delivery was tracked starts tracking now rather than repost history.
    pub fn changed_since_delivered(
        &mut self,
        key: &SessionKey,
        updated_ms: Option<u64>,
        now_ms: u64,
    ) -> bool {
        let Some(record) = self.record_mut(key) else {
            return false;
        };
        if record.delivered_at_ms == 0 {
            record.delivered_at_ms = now_ms;
            self.dirty = true;
            return false;
        }
        updated_ms.is_some_and(|u| u > record.delivered_at_ms)
    }

    pub fn cursor(&self) -> &MattermostCursor {
        &self.state.mattermost
    }

    /// Moves the cursor to the newest owner post handled; the caller saves (with what the post
    /// left owed). Persisted, it lets posts sent while the bridge was down be handled later.
    pub fn advance_cursor(&mut self, post: &Post) {
        let cursor = &mut self.state.mattermost;
        if post.create_at >= cursor.last_post_at && cursor.last_post_id != post.id {
            cursor.last_post_id = post.id.clone();
            cursor.last_post_at = post.create_at;
            self.dirty = true;
        }
    }

    /// A post the cursor passes whose handling waits on a look-up; saved with the cursor (by the
    /// caller), so a crash before the answer cannot pass it by.
    pub fn defer_post(&mut self, post: &Post) {
        self.state
            .unresolved_posts
            .insert(post.id.clone(), post.create_at);
        self.dirty = true;
    }

    /// The look-up answered. The caller saves: a prompt's `owe_prompt` writes both at once, so a
    /// crash can neither lose the prompt nor handle the post twice.
    pub fn resolve_post(&mut self, post_id: &str) {
        if self.state.unresolved_posts.remove(post_id).is_some() {
            self.dirty = true;
        }
    }

    /// Posts deferred by an earlier run, oldest first.
    pub fn unresolved_posts(&self) -> Vec<String> {
        let mut posts: Vec<(i64, String)> = self
            .state
            .unresolved_posts
            .iter()
            .map(|(id, at)| (*at, id.clone()))
            .collect();
        posts.sort();
        posts.into_iter().map(|(_, id)| id).collect()
    }

    pub fn board_post_id(&self) -> Option<&str> {
        self.state.board_post_id.as_deref()
    }

    /// Saved at once: a board posted and then lost to a crash would be posted twice.
    pub fn set_board_post_id(&mut self, post_id: Option<String>) {
        self.state.board_post_id = post_id;
        self.save_now();
    }

    pub fn set_cursor(&mut self, cursor: MattermostCursor) {
        self.state.mattermost = cursor;
        self.save_now();
    }

    /// Drops the records of sessions that ended more than `forget_after` ago, with their roots.
    pub fn forget_ended(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.forget_after.as_millis() as u64);
        let mut forgotten = 0;
        for server in self.state.servers.values_mut() {
            server.sessions.retain(|_, record| {
                let keep = record.ended_ms.is_none_or(|ended| ended >= horizon);
                if !keep {
                    self.by_root.remove(&record.root_post_id);
                    forgotten += 1;
                }
                keep
            });
        }
        self.state.servers.retain(|_, s| {
            !(s.sessions.is_empty() && s.root_intents.is_empty() && s.pending_prompts.is_empty())
        });
        if forgotten > 0 {
            crate::info!("forgot {forgotten} session(s) that ended long ago");
            self.dirty = true;
        }
    }

    /// Writes the state now (a write with nothing new writes nothing).
    pub fn save_now(&mut self) {
        self.dirty = false;
        self.last_saved = Some(Instant::now());
        if let Err(e) = self.store.save(&self.state) {
            crate::error!("{e}");
        }
    }

    /// Writes what changed if the last write is `FLUSH_EVERY` old.
    pub fn flush_if_due(&mut self, now: Instant) {
        if self.dirty
            && self
                .last_saved
                .is_none_or(|at| now.duration_since(at) >= FLUSH_EVERY)
        {
            self.save_now();
        }
    }

    /// How long until `flush_if_due` has something to do.
    pub fn flush_due_in(&self, now: Instant) -> Option<Duration> {
        if !self.dirty {
            return None;
        }
        Some(self.last_saved.map_or(Duration::ZERO, |at| {
            FLUSH_EVERY.saturating_sub(now.duration_since(at))
        }))
    }

    /// The dialect spoken to `server` and why, as its event stream's probe found it.
    pub fn server_api(&mut self, server: &ServerKey, api: String) {
        let entry = self.server_mut(server);
        if entry.api.as_ref() != Some(&api) {
            entry.api = Some(api);
            self.dirty = true;
        }
    }

    fn server_mut(&mut self, server: &ServerKey) -> &mut crate::store::ServerState {
        self.state.servers.entry(server.0.clone()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const DAY_MS: u64 = 86_400_000;

    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new() -> Dir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "ocmm-registry-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            Dir(path)
        }

        /// What a crash right now would leave: the file as written.
        fn on_disk(&self) -> State {
            serde_json::from_slice(&std::fs::read(self.0.join("state.json")).unwrap()).unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(dir: &Dir, forget_after: Duration, now_ms: u64) -> Registry {
        let (store, state, _) = Store::open(&dir.0, NOW).unwrap();
        let mut registry = Registry::new(store, state, forget_after, now_ms);
        registry.save_now();
        registry
    }

    fn key(session_id: &str) -> SessionKey {
        SessionKey {
            server: ServerKey("http://oc".to_string()),
            session_id: session_id.to_string(),
        }
    }

    fn post(id: &str) -> Post {
        Post {
            id: id.to_string(),
            create_at: 5,
            ..Post::default()
        }
    }

    #[test]
    fn what_must_survive_a_crash_is_on_disk_at_once_the_rest_within_the_flush() {
        let dir = Dir::new();
        let mut registry = open(&dir, Duration::from_secs(30 * 86_400), NOW);
        let a = key("ses_a");
        registry.intend_root(&a, NOW);
        assert!(
            dir.on_disk().servers["http://oc"]
                .root_intents
                .contains_key("ses_a")
        );
        registry.record_thread(&a, "root-a", "dm", &SessionInfo::default(), NOW);
        assert_eq!(
            registry.session_of_root("root-a"),
            Some(a.clone()),
            "the index follows the record"
        );
        assert!(
            dir.on_disk().servers["http://oc"]
                .sessions
                .contains_key("ses_a")
        );
        registry.owe_prompt(&a, &post("p1"), NOW);
        assert!(
            dir.on_disk().servers["http://oc"]
                .pending_prompts
                .contains_key("p1")
        );

        // Delivery marks wait for the flush: losing them only repeats a little work.
        let saved = Instant::now();
        registry.reply_started(&a, "reply-1".to_string());
        registry.forget_prompt(&a, "p1");
        registry.flush_if_due(saved);
        let on_disk = dir.on_disk();
        assert_eq!(
            on_disk.servers["http://oc"].sessions["ses_a"].streaming_post_id,
            None
        );
        assert!(
            on_disk.servers["http://oc"]
                .pending_prompts
                .contains_key("p1")
        );
        assert!(registry.flush_due_in(saved).is_some());
        registry.flush_if_due(saved + FLUSH_EVERY);
        let on_disk = dir.on_disk();
        assert_eq!(
            on_disk.servers["http://oc"].sessions["ses_a"]
                .streaming_post_id
                .as_deref(),
            Some("reply-1")
        );
        assert!(
            !on_disk.servers["http://oc"]
                .pending_prompts
                .contains_key("p1")
        );
        assert_eq!(registry.flush_due_in(saved + FLUSH_EVERY), None);

        // An end is said once: written at once, and true only the first time.
        assert!(registry.set_ended(&a, NOW));
        assert!(
            dir.on_disk().servers["http://oc"].sessions["ses_a"]
                .ended_ms
                .is_some()
        );
        assert!(!registry.set_ended(&a, NOW + 1));
    }

    #[test]
    fn sessions_that_ended_long_ago_are_forgotten_with_their_roots() {
        let dir = Dir::new();
        let month = Duration::from_secs(30 * 86_400);
        {
            let mut registry = open(&dir, month, NOW);
            for (id, ended) in [
                ("old", Some(NOW - 31 * DAY_MS)),
                ("recent", Some(NOW - DAY_MS)),
                ("open", None),
            ] {
                let k = key(id);
                registry.record_thread(
                    &k,
                    &format!("root-{id}"),
                    "dm",
                    &SessionInfo::default(),
                    NOW,
                );
                if let Some(ended) = ended {
                    registry.set_ended(&k, ended);
                }
            }
        }
        let registry = open(&dir, month, NOW);
        assert_eq!(registry.session_of_root("root-old"), None);
        assert!(registry.record(&key("old")).is_none());
        assert!(registry.record(&key("recent")).is_some());
        assert!(registry.record(&key("open")).is_some());
        assert_eq!(registry.thread_count(), 2);
        let on_disk = dir.on_disk();
        assert!(!on_disk.servers["http://oc"].sessions.contains_key("old"));

        // Later, at the hourly look, the recent one's turn comes too.
        let mut registry = registry;
        registry.forget_ended(NOW + 30 * DAY_MS);
        assert!(registry.record(&key("recent")).is_none());
        assert!(registry.record(&key("open")).is_some());
    }
}
