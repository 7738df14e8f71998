//! A fake Mattermost server (REST API v4 and the websocket) for the bridge's tests. It is built
//! from captures of a real 5.36.1 server (`/work/shared/mattermost/`) and the official OpenAPI,
//! and it behaves like that server: same JSON shapes, status codes, error ids, rate limiting and
//! websocket events. Tests drive it through `FakeMattermost` and inspect it through `FakeView`.
//!
//! Layout: `http` parses requests and runs the middleware, `api` routes REST calls, `ws` serves
//! the websocket, `state` holds the world and its rules, `wire` writes the JSON.
#![allow(dead_code)]

mod api;
mod http;
mod multipart;
mod ratelimit;
mod state;
mod util;
mod wire;
mod ws;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use self::ratelimit::Limiter;
use self::state::{NewPost, PostChanges, State};

/// A running fake server on `127.0.0.1` with a free port. Dropping it stops the server, closes
/// every connection and joins its threads.
pub struct FakeMattermost {
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
    bot: TestUser,
    owner: TestUser,
    stranger: TestUser,
    admin: TestUser,
    /// In tests (not the benchmark or the demo), a hung test ends the run instead of hanging it.
    _watchdog: Option<super::Watchdog>,
}

/// One of the fake's users with a personal access token.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub id: String,
    pub username: String,
    pub token: String,
}

/// A post as stored by the fake.
#[derive(Clone, Debug)]
pub struct Post {
    pub id: String,
    pub create_at: i64,
    pub update_at: i64,
    pub edit_at: i64,
    pub delete_at: i64,
    pub user_id: String,
    pub channel_id: String,
    pub root_id: String,
    pub message: String,
    pub props: serde_json::Value,
    pub file_ids: Vec<String>,
    /// Successful edits (patch or update) of this post.
    pub edit_count: u32,
}

/// One HTTP request the fake answered, websocket upgrades included (status 101).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The decoded path, without the query.
    pub path: String,
    pub status: u16,
    /// The user of a valid token, if the request carried one.
    pub user_id: Option<String>,
    /// The raw query string, without `?`.
    pub query: String,
    /// When the fake decided the answer (for the benchmark's latency figures).
    pub at: Instant,
}

/// One message a post took: as created, or after an edit, with when the fake accepted it.
#[derive(Clone, Debug)]
pub struct PostVersion {
    pub at: Instant,
    pub post_id: String,
    pub root_id: String,
    pub user_id: String,
    pub message: String,
    pub props: serde_json::Value,
}

impl PostVersion {
    fn of(post: &Post, at: Instant) -> PostVersion {
        PostVersion {
            at,
            post_id: post.id.clone(),
            root_id: post.root_id.clone(),
            user_id: post.user_id.clone(),
            message: post.message.clone(),
            props: post.props.clone(),
        }
    }
}

/// A user named with `@username` in a post when it was created (edits never add one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mention {
    pub user_id: String,
    pub post_id: String,
    /// The thread's root; empty for a root post.
    pub root_id: String,
    /// The message as created.
    pub message: String,
}

/// Mattermost's `RateLimitSettings`: `per_second` requests with bursts of `burst`.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Read access to the fake's state inside `FakeMattermost::wait_until`.
pub struct FakeView<'a> {
    state: &'a State,
}

impl<'a> FakeView<'a> {
    /// Non-deleted posts of a channel, oldest first.
    pub fn posts_in(&self, channel_id: &str) -> Vec<Post> {
        self.state.posts_in(channel_id)
    }

    /// Any post, deleted ones included (`delete_at` set).
    pub fn post(&self, id: &str) -> Option<&'a Post> {
        self.state.posts.get(id).map(|r| &r.post)
    }

    /// The non-deleted root, then its non-deleted replies, oldest first.
    pub fn thread(&self, root_id: &str) -> Vec<Post> {
        self.state.thread(root_id)
    }

    pub fn requests(&self) -> &'a [Request] {
        &self.state.requests
    }

    /// Every post creation and edit so far, in the order accepted.
    pub fn post_versions(&self) -> &'a [PostVersion] {
        &self.state.post_versions
    }

    /// `(user, channel, parent)` of every accepted `user_typing` action.
    pub fn typing_events(&self) -> &'a [(String, String, String)] {
        &self.state.typing
    }

    /// `FakeMattermost::mentions_of`.
    pub fn mentions_of(&self, user_id: &str) -> Vec<Mention> {
        (self.state.mention_log.iter())
            .filter(|m| m.user_id == user_id)
            .cloned()
            .collect()
    }

    pub fn ws_connection_count(&self) -> usize {
        self.state.open_websockets
    }

    /// Connections and requests turned away while the server was down.
    pub fn refused_while_down(&self) -> u64 {
        self.state.refused_while_down
    }

    /// `(user_id, emoji_name)` of the reactions on a post.
    pub fn reactions(&self, post_id: &str) -> Vec<(String, String)> {
        self.state.reaction_names(post_id)
    }

    pub fn is_online(&self, user_id: &str) -> bool {
        self.state.is_online(user_id)
    }
}

impl FakeMattermost {
    pub fn start() -> FakeMattermost {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake mattermost: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake mattermost: local address");
        let state = State::new();
        let test_user = |i: usize| TestUser {
            id: state.users[i].id.clone(),
            username: state.users[i].username.clone(),
            token: state.users[i].token.clone(),
        };
        let (bot, owner, stranger, admin) =
            (test_user(0), test_user(1), test_user(2), test_user(3));
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            url: format!("http://{addr}"),
            addr,
            stopping: AtomicBool::new(false),
            down: AtomicBool::new(false),
            sockets: Mutex::new(Sockets::default()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("fake-mm-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("fake mattermost: spawn accept thread");
        FakeMattermost {
            shared,
            accept_thread: Some(accept_thread),
            bot,
            owner,
            stranger,
            admin,
            _watchdog: cfg!(test).then(|| super::Watchdog::arm("a fake Mattermost")),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// `ws://127.0.0.1:PORT/api/v4/websocket`
    pub fn websocket_url(&self) -> String {
        format!("ws://{}/api/v4/websocket", self.shared.addr)
    }

    /// `testbot`, a bot account ("Test Bot").
    pub fn bot(&self) -> TestUser {
        self.bot.clone()
    }

    /// `alice`, the bridge's owner.
    pub fn owner(&self) -> TestUser {
        self.owner.clone()
    }

    /// `mallory`, a user who shares no channel with anyone unless a test adds one.
    pub fn stranger(&self) -> TestUser {
        self.stranger.clone()
    }

    /// `sysadmin`, a system admin: like on a real server, it may post in any channel, even other
    /// people's DMs, without being a member.
    pub fn admin(&self) -> TestUser {
        self.admin.clone()
    }

    /// The DM channel of two users, created if needed (with a `direct_added` event).
    pub fn dm_channel(&self, user_a: &str, user_b: &str) -> String {
        self.shared
            .update(|state| state.direct_channel(user_a, user_b))
    }

    /// An open channel ("O") in the fake's one team, with these members.
    pub fn create_channel(&self, name: &str, members: &[&str]) -> String {
        self.shared
            .update(|state| state.open_channel(name, members))
    }

    /// Posts as `user_id`, with the same validation and events as `POST /api/v4/posts`.
    /// `Err` is the HTTP status and the error id the API would answer.
    pub fn post_as(
        &self,
        user_id: &str,
        channel_id: &str,
        root_id: &str,
        message: &str,
    ) -> Result<Post, (u16, String)> {
        self.shared.update(|state| {
            let new = NewPost {
                channel_id: channel_id.to_owned(),
                message: message.to_owned(),
                root_id: root_id.to_owned(),
                props: Default::default(),
                file_ids: Vec::new(),
                kind: String::new(),
                pending_post_id: String::new(),
                set_online: true,
            };
            let created = state
                .create_post(user_id, new)
                .map_err(|e| (e.status, e.id))?;
            Ok(state.posts[&created.id].post.clone())
        })
    }

    /// Edits a post's message as `user_id`, like `PUT /posts/{id}/patch`.
    pub fn edit_as(
        &self,
        user_id: &str,
        post_id: &str,
        message: &str,
    ) -> Result<Post, (u16, String)> {
        self.shared.update(|state| {
            let changes = PostChanges {
                message: Some(message.to_owned()),
                ..PostChanges::default()
            };
            state
                .edit_post(user_id, post_id, changes)
                .map_err(|e| (e.status, e.id))?;
            Ok(state.posts[post_id].post.clone())
        })
    }

    /// Deletes a post as `user_id`, like `DELETE /posts/{id}`.
    pub fn delete_as(&self, user_id: &str, post_id: &str) -> Result<(), (u16, String)> {
        self.shared
            .update(|state| state.delete_post(user_id, post_id))
            .map_err(|e| (e.status, e.id))
    }

    /// Reacts as `user_id`, like `POST /api/v4/reactions`.
    pub fn react_as(&self, user_id: &str, post_id: &str, emoji: &str) -> Result<(), (u16, String)> {
        self.shared
            .update(|state| state.save_reaction(user_id, user_id, post_id, emoji))
            .map(|_| ())
            .map_err(|e| (e.status, e.id))
    }

    /// Removes a reaction as `user_id`, like `DELETE /users/{user_id}/posts/{post_id}/reactions/{emoji}`.
    pub fn unreact_as(
        &self,
        user_id: &str,
        post_id: &str,
        emoji: &str,
    ) -> Result<(), (u16, String)> {
        self.shared
            .update(|state| state.delete_reaction(user_id, user_id, post_id, emoji))
            .map_err(|e| (e.status, e.id))
    }

    /// Non-deleted posts of a channel, oldest first.
    pub fn posts_in(&self, channel_id: &str) -> Vec<Post> {
        self.shared.lock().posts_in(channel_id)
    }

    /// Any post, deleted ones included.
    pub fn post(&self, id: &str) -> Option<Post> {
        self.shared.lock().posts.get(id).map(|r| r.post.clone())
    }

    /// The non-deleted root, then its non-deleted replies, oldest first.
    pub fn thread(&self, root_id: &str) -> Vec<Post> {
        self.shared.lock().thread(root_id)
    }

    /// `(user_id, emoji_name)` of the reactions on a post.
    pub fn reactions(&self, post_id: &str) -> Vec<(String, String)> {
        self.shared.lock().reaction_names(post_id)
    }

    /// Name and content of an uploaded file.
    pub fn file(&self, file_id: &str) -> Option<(String, Vec<u8>)> {
        let state = self.shared.lock();
        state
            .files
            .get(file_id)
            .map(|f| (f.name.clone(), f.bytes.clone()))
    }

    /// Calls `f` now and after every change of state until it returns `Some`, or `timeout`
    /// passes (then `None`).
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&FakeView) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = f(&FakeView { state: &state }) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every post creation and edit so far, in the order accepted.
    pub fn post_versions(&self) -> Vec<PostVersion> {
        self.shared.lock().post_versions.clone()
    }

    /// `(user, channel, parent)` of every accepted `user_typing` action.
    pub fn typing_events(&self) -> Vec<(String, String, String)> {
        self.shared.lock().typing.clone()
    }

    /// Every `@username` mention of `user_id` in posts as they were created, oldest first: what
    /// notifies that user (Mattermost never notifies on an edit).
    pub fn mentions_of(&self, user_id: &str) -> Vec<Mention> {
        self.shared
            .lock()
            .mention_log
            .iter()
            .filter(|m| m.user_id == user_id)
            .cloned()
            .collect()
    }

    /// Turns Mattermost's per-token rate limiting on (`Some`) or off (`None`, the default).
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared
            .update(|state| state.limiter = limit.as_ref().map(Limiter::new));
    }

    /// The next `n` REST requests (not websocket upgrades) answer `status` with a JSON error.
    pub fn fail_next(&self, n: u32, status: u16) {
        self.shared.update(|state| state.fail_next = (n, status));
    }

    /// The next `n` REST requests are handled (a post is stored), then the connection is closed
    /// without an answer: a response lost on the way back. Logged with status 0.
    pub fn lose_next_responses(&self, n: u32) {
        self.shared.update(|state| state.lose_next = n);
    }

    /// The next `n` REST requests are handled, then answered only after `delay`: a server slower
    /// than the client's timeout.
    pub fn delay_next_responses(&self, n: u32, delay: Duration) {
        self.shared.update(|state| state.delay_next = (n, delay));
    }

    /// Requests with this method whose path matches `path` (such as `GET` and `/api/v4/posts/*`:
    /// a `*` segment matches any one segment) are handled, then answered only after `delay`, until
    /// `clear_delays`: one slow kind of call among fast ones. The server's stop cuts the delay short.
    pub fn delay_matching(&self, method: &str, path: &str, delay: Duration) {
        let rule = DelayRule {
            method: method.to_owned(),
            path: path.to_owned(),
            delay,
        };
        self.shared.update(|state| state.delay_rules.push(rule));
    }

    pub fn clear_delays(&self) {
        self.shared.update(|state| state.delay_rules.clear());
    }

    /// How many answers `delay_matching` rules have held back so far (counted when the delay starts).
    pub fn delayed_by_rules(&self) -> u32 {
        self.shared.lock().delayed_by_rules
    }

    /// How many posts were created (not answered from the de-duplication cache) with this
    /// `pending_post_id`.
    pub fn posts_created_with_pending_id(&self, pending_post_id: &str) -> u32 {
        self.shared
            .lock()
            .created_per_pending_id
            .get(pending_post_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every `pending_post_id` that created more than one post: must stay empty.
    pub fn duplicated_pending_ids(&self) -> Vec<String> {
        self.shared
            .lock()
            .created_per_pending_id
            .iter()
            .filter(|(_, count)| **count > 1)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Sends `raw` as one text frame, as it is, to every connected websocket (malformed JSON,
    /// unknown events, oversized frames); the number of connections it went to.
    pub fn inject_ws_frame(&self, raw: &str) -> usize {
        self.shared.update(|state| state.inject_ws_frame(raw))
    }

    /// Closes every websocket's TCP connection at once, without a close frame. Reliable sessions
    /// stay resumable.
    pub fn drop_websockets(&self) {
        self.shared.shutdown_sockets(true);
    }

    /// Revokes `user_id`'s access token, as deleting it in Mattermost does: from now on it is
    /// refused (401), and the websockets it opened are closed (all of them: the fake does not
    /// know whose they are; the others reconnect).
    pub fn revoke_token(&self, user_id: &str) {
        self.shared.update(|state| {
            if let Some(user) = state.users.iter_mut().find(|u| u.id == user_id) {
                user.token = util::new_id();
            }
        });
        self.shared.shutdown_sockets(false);
    }

    /// While down, every connection (REST and websocket, open or new) is closed at once.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.shutdown_sockets(false);
        }
    }

    /// Open websocket connections, authenticated or not.
    pub fn ws_connection_count(&self) -> usize {
        self.shared.lock().open_websockets
    }

    /// Moves the server's clock `by` ahead for what it remembers only a while: `pending_post_id`s
    /// (30 s) and disconnected websocket sessions (5 min). Stands in for a long outage without the
    /// test waiting it out; post times stay on the wall clock.
    pub fn advance_clock(&self, by: Duration) {
        self.shared.update(|state| state.advance_clock(by));
    }

    /// On (the default, like servers after 5.36): `hello` has a `connection_id` and reconnects
    /// can resume. Off: 5.36's default, empty `connection_id` and no replay.
    pub fn set_reliable_websockets(&self, on: bool) {
        self.shared
            .update(|state| state.set_reliable_websockets(on));
    }

    /// Forgets disconnected websocket sessions, as when they expire on the real server.
    pub fn expire_websocket_sessions(&self) {
        self.shared
            .update(|state| state.expire_sessions(Duration::ZERO));
    }

    /// `FileSettings.MaxFileSize` (default 100 MiB).
    pub fn set_max_file_size(&self, bytes: u64) {
        self.shared.update(|state| state.max_file_size = bytes);
    }

    /// Uploads a file as `user_id` into `channel_id`, like `POST /api/v4/files`; the file id.
    pub fn upload_as(&self, user_id: &str, channel_id: &str, name: &str, bytes: &[u8]) -> String {
        self.shared
            .update(|state| state.upload_file(user_id, channel_id, name, bytes.to_vec()))
            .unwrap_or_else(|e| panic!("fake mattermost: upload_as failed: {} {}", e.status, e.id))
    }

    pub fn is_online(&self, user_id: &str) -> bool {
        self.shared.lock().is_online(user_id)
    }
}

impl Drop for FakeMattermost {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Ends the delays of `delay_matching`.
        self.shared.update(|_| ());
        // Wake the accept loop; it sees `stopping` and ends.
        let _ = TcpStream::connect_timeout(&self.shared.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept_thread.take() {
            let _ = accept.join();
        }
        self.shared.shutdown_sockets(false);
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for handle in threads {
            let _ = handle.join();
        }
    }
}

/// One `delay_matching` rule.
struct DelayRule {
    method: String,
    path: String,
    delay: Duration,
}

impl DelayRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        let (mut pattern, mut path) = (self.path.split('/'), path.split('/'));
        self.method.eq_ignore_ascii_case(method)
            && loop {
                match (pattern.next(), path.next()) {
                    (None, None) => break true,
                    (Some(want), Some(got)) if want == "*" || want == got => {}
                    _ => break false,
                }
            }
    }
}

/// What the server's threads share.
struct Shared {
    state: Mutex<State>,
    /// Notified after every change of `state`; `wait_until` waits on it.
    changed: Condvar,
    url: String,
    addr: SocketAddr,
    stopping: AtomicBool,
    down: AtomicBool,
    sockets: Mutex<Sockets>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Clones of every open connection's socket, so they can be shut down from outside.
#[derive(Default)]
struct Sockets {
    next_key: u64,
    http: HashMap<u64, TcpStream>,
    websockets: HashMap<u64, TcpStream>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then wakes `wait_until`.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        result
    }

    /// Waits `delay`, or less if the server stops meanwhile; false when it stopped.
    fn wait_unless_stopping(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Counts a request turned away because the server is down.
    fn refuse(&self) {
        self.update(|state| state.refused_while_down += 1);
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst)
    }

    fn sockets(&self) -> MutexGuard<'_, Sockets> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_socket(&self, stream: TcpStream) -> u64 {
        let mut sockets = self.sockets();
        sockets.next_key += 1;
        let key = sockets.next_key;
        sockets.http.insert(key, stream);
        key
    }

    fn remove_socket(&self, key: u64) {
        self.sockets().http.remove(&key);
    }

    /// Registers an upgraded connection; `None` when the server is going down.
    fn add_websocket(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let key = {
            let mut sockets = self.sockets();
            if self.is_down() {
                return None;
            }
            sockets.next_key += 1;
            let key = sockets.next_key;
            sockets.websockets.insert(key, clone);
            key
        };
        self.update(|state| state.open_websockets += 1);
        Some(key)
    }

    fn remove_websocket(&self, key: u64) {
        if self.sockets().websockets.remove(&key).is_some() {
            self.update(|state| state.open_websockets -= 1);
        }
    }

    fn shutdown_sockets(&self, websockets_only: bool) {
        let sockets = self.sockets();
        for stream in sockets.websockets.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if !websockets_only {
            for stream in sockets.http.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            continue;
        };
        if shared.is_down() {
            let _ = stream.shutdown(Shutdown::Both);
            shared.refuse();
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let key = shared.add_socket(clone);
        let connection_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("fake-mm-conn".into())
            .spawn(move || {
                http::serve_connection(Arc::clone(&connection_shared), stream);
                connection_shared.remove_socket(key);
            });
        match spawned {
            Ok(handle) => {
                let mut threads = shared.threads.lock().unwrap_or_else(|e| e.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(_) => shared.remove_socket(key),
        }
    }
}
