//! A fake `opencode serve` for the benchmark: it answers the REST calls the bridge makes and emits
//! `/global/event` streams in the wire format recorded from OpenCode 1.18.33
//! (`tests/fixtures/opencode-1.18.33/`), at a pace the caller controls, noting when each event left.
//!
//! It speaks only what the bridge uses: `GET /global/health`, `GET /global/event`,
//! `GET /experimental/session`, `GET /session/status`, `GET /session/{id}`,
//! `GET /session/{id}/message` and `POST /session/{id}/prompt_async`. Anything else is a 404 in
//! OpenCode's error shape. Every session lives in one directory.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const VERSION: &str = "1.18.33";
/// OpenCode sends `server.heartbeat` every 10 s on an otherwise quiet stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// A running fake on `127.0.0.1:0`. Dropping it closes every connection and joins its threads.
pub struct FakeOpenCode {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// A prompt the bridge sent, and when its request was read.
#[derive(Clone, Debug)]
pub struct PromptReceived {
    pub session_id: String,
    pub text: String,
    pub at: Instant,
}

/// How a reply is streamed: `delta_chars` characters per `message.part.delta`, one every `interval`;
/// then the text part's full text at once, and the rest of the turn's end (`step-finish`, the
/// completed message, idle) `finish_gap` later.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub delta_chars: usize,
    pub interval: Duration,
    pub finish_gap: Duration,
}

/// In `b-reasoning-text.sse`, `session.idle` came about 120 ms after the text part ended.
pub const REAL_FINISH_GAP: Duration = Duration::from_millis(120);

/// When the events of one streamed reply left the fake.
#[derive(Clone, Debug)]
pub struct ReplyTimes {
    pub session_id: String,
    pub first_delta: String,
    pub first_delta_at: Instant,
    pub last_delta_at: Instant,
    /// `session.idle`, the last event of the turn.
    pub idle_at: Instant,
}

struct Shared {
    stop: AtomicBool,
    directory: String,
    project_id: String,
    state: Mutex<State>,
    changed: Condvar,
    /// Open `/global/event` streams, written to directly by whoever emits.
    subscribers: Mutex<Vec<(u64, TcpStream)>>,
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    sessions: Vec<Session>,
    prompts: Vec<PromptReceived>,
    /// `(method, path)` of every request, in arrival order.
    requests: Vec<(String, String)>,
}

struct Session {
    info: Value,
    busy: bool,
    /// `{info, parts}` items as `GET /session/{id}/message` returns them, oldest first.
    messages: Vec<Value>,
    /// The user message the next reply answers, when a prompt is waiting for one.
    pending_user: Option<String>,
}

/// One reply being streamed by `FakeOpenCode::reply`.
struct Streaming {
    session_id: String,
    message_id: String,
    part_id: String,
    text: String,
    deltas: Vec<String>,
    next: usize,
    started_ms: u64,
    times: Option<ReplyTimes>,
    first_delta_at: Option<Instant>,
    last_delta_at: Option<Instant>,
    /// When the rest of the turn's end is due, once the text part has ended.
    turn_ends_at: Option<Instant>,
}

impl FakeOpenCode {
    pub fn start() -> FakeOpenCode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake opencode: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake opencode: local address");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            directory: "/tmp/ocmm-fake-opencode/projects/main".into(),
            project_id: "280f39cf3ed6efbb878051aa3d4ff30f224eca43".into(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fake-oc-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("fake opencode: spawn acceptor")
        };
        let heartbeat = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fake-oc-heartbeat".into())
                .spawn(move || heartbeat_loop(shared))
                .expect("fake opencode: spawn heartbeat")
        };
        FakeOpenCode {
            addr,
            shared,
            threads: vec![acceptor, heartbeat],
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn directory(&self) -> String {
        self.shared.directory.clone()
    }

    /// Writes `bytes` as they are to every open event stream: for bad input the real server never sends.
    pub fn emit_raw(&self, text: &str) {
        let chunk = http_chunk(text.as_bytes());
        lock(&self.shared.subscribers).retain_mut(|(_, stream)| stream.write_all(&chunk).is_ok());
    }

    /// Sends half an event, then closes every event stream, as a connection lost mid-line would.
    pub fn cut_streams_mid_event(&self) {
        let mut subscribers = lock(&self.shared.subscribers);
        for (_, stream) in subscribers.iter_mut() {
            let half = b"data: {\"directory\":\"/tmp\",\"payload\":{\"type\":\"message.upd";
            let _ = stream.write_all(&http_chunk(half));
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
        }
        subscribers.clear();
    }

    pub fn subscriber_count(&self) -> usize {
        lock(&self.shared.subscribers).len()
    }

    /// `(method, path)` of every request so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().requests.clone()
    }

    pub fn prompts(&self) -> Vec<PromptReceived> {
        self.shared.lock().prompts.clone()
    }

    /// Waits until a prompt for `session_id` arrived after the first `skip` prompts of all sessions.
    pub fn wait_for_prompt(
        &self,
        session_id: &str,
        skip: usize,
        timeout: Duration,
    ) -> Option<PromptReceived> {
        self.shared.wait_until(timeout, |state| {
            state
                .prompts
                .iter()
                .skip(skip)
                .find(|p| p.session_id == session_id)
                .cloned()
        })
    }

    /// Creates a top-level session, as `POST /session` would, and emits `session.created` with its
    /// `sync` twin. Returns the id and when the event left.
    pub fn create_session(&self, title: &str) -> (String, Instant) {
        let id = self.shared.new_id("ses");
        let now = now_ms();
        let slug = format!("bench-{}", &id[id.len() - 6..]).to_lowercase();
        let info = json!({
            "id": id,
            "slug": slug,
            "version": VERSION,
            "projectID": self.shared.project_id,
            "directory": self.shared.directory,
            "path": "",
            "title": title,
            "cost": 0,
            "tokens": {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}},
            "time": {"created": now, "updated": now},
        });
        self.shared.update(|state| {
            state.sessions.push(Session {
                info: info.clone(),
                busy: false,
                messages: Vec::new(),
                pending_user: None,
            })
        });
        let at = self.shared.emit_durable(
            "session.created",
            json!({"sessionID": id, "info": info}),
            &id,
        );
        (id, at)
    }

    /// Streams one text reply into each session at once, interleaved, with the event sequence of
    /// `b-reasoning-text.sse` (without the reasoning): the user message unless a prompt already
    /// brought one, busy, the assistant message, `step-start`, the text part, its deltas at `pace`,
    /// the full text, `step-finish`, the completed message, idle and `session.idle`. Blocks until
    /// every reply is done.
    pub fn reply(&self, replies: &[(&str, &str)], pace: Pace) -> Vec<ReplyTimes> {
        let mut streams: Vec<Streaming> = replies
            .iter()
            .map(|(session_id, text)| self.begin_reply(session_id, text, pace))
            .collect();
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_tick {
                for stream in streams.iter_mut() {
                    if stream.next < stream.deltas.len() {
                        let at = self.emit_delta(stream);
                        stream.first_delta_at.get_or_insert(at);
                        stream.next += 1;
                        if stream.next == stream.deltas.len() {
                            stream.last_delta_at = Some(at);
                            self.end_text(stream);
                            stream.turn_ends_at = Some(Instant::now() + pace.finish_gap);
                        }
                    }
                }
                next_tick += pace.interval;
            }
            for stream in streams.iter_mut() {
                if stream.times.is_none()
                    && stream.turn_ends_at.is_some_and(|t| t <= Instant::now())
                {
                    let idle_at = self.end_turn(stream);
                    let last = stream.last_delta_at.unwrap_or(idle_at);
                    stream.times = Some(ReplyTimes {
                        session_id: stream.session_id.clone(),
                        first_delta: stream.deltas[0].clone(),
                        first_delta_at: stream.first_delta_at.unwrap_or(last),
                        last_delta_at: last,
                        idle_at,
                    });
                }
            }
            let streaming = streams.iter().any(|s| s.next < s.deltas.len());
            let wake = streams
                .iter()
                .filter(|s| s.times.is_none())
                .filter_map(|s| s.turn_ends_at)
                .chain(streaming.then_some(next_tick))
                .min();
            let Some(wake) = wake else {
                break;
            };
            thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        streams.into_iter().filter_map(|s| s.times).collect()
    }

    fn begin_reply(&self, session_id: &str, text: &str, pace: Pace) -> Streaming {
        let started_ms = now_ms();
        let pending = self.shared.update(|state| {
            state
                .session_mut(session_id)
                .and_then(|s| s.pending_user.take())
        });
        let user_id = match pending {
            Some(id) => id,
            None => self.user_message(session_id, "(typed in the TUI)"),
        };
        self.shared.update(|state| {
            if let Some(session) = state.session_mut(session_id) {
                session.busy = true;
            }
        });
        self.emit_status(session_id, "busy");
        let message_id = self.shared.new_id("msg");
        let assistant = self.assistant_info(session_id, &message_id, &user_id, started_ms, None);
        self.shared.emit_durable(
            "message.updated",
            json!({"sessionID": session_id, "info": assistant}),
            session_id,
        );
        let step_start = json!({
            "id": self.shared.new_id("prt"), "messageID": message_id, "sessionID": session_id,
            "type": "step-start",
        });
        self.emit_part(session_id, &step_start);
        let part_id = self.shared.new_id("prt");
        let empty_text = json!({
            "id": part_id, "messageID": message_id, "sessionID": session_id,
            "type": "text", "text": "", "time": {"start": started_ms},
        });
        self.emit_part(session_id, &empty_text);
        // Stored parts of a running message show the text as "" until the part ends, as observed.
        self.shared.update(|state| {
            if let Some(session) = state.session_mut(session_id) {
                session.messages.push(json!({
                    "info": assistant, "parts": [step_start, empty_text],
                }));
            }
        });
        Streaming {
            session_id: session_id.to_string(),
            message_id,
            part_id,
            text: text.to_string(),
            deltas: split_chars(text, pace.delta_chars.max(1)),
            next: 0,
            started_ms,
            times: None,
            first_delta_at: None,
            last_delta_at: None,
            turn_ends_at: None,
        }
    }

    fn emit_delta(&self, stream: &Streaming) -> Instant {
        self.shared.emit(
            "message.part.delta",
            json!({
                "sessionID": stream.session_id, "messageID": stream.message_id,
                "partID": stream.part_id, "field": "text", "delta": stream.deltas[stream.next],
            }),
        )
    }

    /// The text part's final update, with the full text, right after its last delta.
    fn end_text(&self, stream: &Streaming) {
        let session_id = stream.session_id.as_str();
        let text_part = json!({
            "id": stream.part_id, "messageID": stream.message_id, "sessionID": session_id,
            "type": "text", "text": stream.text,
            "time": {"start": stream.started_ms, "end": now_ms()},
        });
        self.emit_part(session_id, &text_part);
        self.shared.update(|state| {
            if let Some(stored) = state.message_mut(session_id, &stream.message_id) {
                stored["parts"][1] = text_part;
            }
        });
    }

    /// `step-finish`, the completed message, busy, idle, `session.idle` and the session's totals;
    /// returns when `session.idle` left.
    fn end_turn(&self, stream: &Streaming) -> Instant {
        let session_id = stream.session_id.as_str();
        let ended_ms = now_ms();
        let output = (stream.text.chars().count() / 4) as u64;
        let step_finish = json!({
            "id": self.shared.new_id("prt"), "reason": "stop", "messageID": stream.message_id,
            "sessionID": session_id, "type": "step-finish",
            "tokens": {"total": 8000 + output, "input": 8000, "output": output, "reasoning": 0,
                       "cache": {"write": 0, "read": 0}},
            "cost": 0,
        });
        self.emit_part(session_id, &step_finish);
        let parent = self.shared.update(|state| {
            let stored = state.message_mut(session_id, &stream.message_id)?;
            let parent = stored.pointer("/info/parentID")?.as_str()?.to_string();
            if let Some(parts) = stored["parts"].as_array_mut() {
                parts.push(step_finish);
            }
            Some(parent)
        });
        let parent = parent.unwrap_or_default();
        let done = self.assistant_info(
            session_id,
            &stream.message_id,
            &parent,
            stream.started_ms,
            Some((ended_ms, output)),
        );
        self.shared.update(|state| {
            if let Some(stored) = state.message_mut(session_id, &stream.message_id) {
                stored["info"] = done.clone();
            }
        });
        self.shared.emit_durable(
            "message.updated",
            json!({"sessionID": session_id, "info": done}),
            session_id,
        );
        self.emit_status(session_id, "busy");
        self.shared.update(|state| {
            if let Some(session) = state.session_mut(session_id) {
                session.busy = false;
            }
        });
        self.emit_status(session_id, "idle");
        let idle_at = self
            .shared
            .emit("session.idle", json!({"sessionID": session_id}));
        if let Some(info) = self
            .shared
            .lock()
            .session_mut(session_id)
            .map(|s| s.info.clone())
        {
            self.shared.emit_durable(
                "session.updated",
                json!({"sessionID": session_id, "info": info}),
                session_id,
            );
        }
        idle_at
    }

    /// Stores and emits a user message with its text part; its id.
    fn user_message(&self, session_id: &str, text: &str) -> String {
        self.shared.user_message(session_id, text)
    }

    fn emit_status(&self, session_id: &str, status: &str) {
        self.shared.emit(
            "session.status",
            json!({"sessionID": session_id, "status": {"type": status}}),
        );
    }

    fn emit_part(&self, session_id: &str, part: &Value) {
        self.shared.emit_durable(
            "message.part.updated",
            json!({"sessionID": session_id, "part": part, "time": now_ms()}),
            session_id,
        );
    }

    fn assistant_info(
        &self,
        session_id: &str,
        message_id: &str,
        parent_id: &str,
        created_ms: u64,
        completed: Option<(u64, u64)>,
    ) -> Value {
        let directory = &self.shared.directory;
        let output = completed.map_or(0, |(_, output)| output);
        let input = if completed.is_some() { 8000 } else { 0 };
        let mut info = json!({
            "id": message_id, "parentID": parent_id, "role": "assistant", "mode": "build",
            "agent": "build", "path": {"cwd": directory, "root": directory}, "cost": 0,
            "tokens": {"input": input, "output": output, "reasoning": 0,
                       "cache": {"read": 0, "write": 0}},
            "modelID": "fake-model", "providerID": "fake",
            "time": {"created": created_ms}, "sessionID": session_id,
        });
        if let Some((completed_ms, _)) = completed {
            info["time"]["completed"] = json!(completed_ms);
            info["finish"] = json!("stop");
        }
        info
    }
}

impl Drop for FakeOpenCode {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, stream) in lock(&self.shared.subscribers).drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for stream in lock(&self.shared.connections).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl State {
    fn session_mut(&mut self, id: &str) -> Option<&mut Session> {
        self.sessions.iter_mut().find(|s| s.info["id"] == id)
    }

    /// A stored `{info, parts}` item.
    fn message_mut(&mut self, session_id: &str, message_id: &str) -> Option<&mut Value> {
        self.session_mut(session_id)?
            .messages
            .iter_mut()
            .find(|m| m["info"]["id"] == message_id)
    }

    fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.iter().find(|s| s.info["id"] == id)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        result
    }

    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(found) = f(&state) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::SeqCst) {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// An id shaped like OpenCode's: prefix, 12 hex digits that grow with time, 14 letters/digits.
    fn new_id(&self, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ms();
        let tail: String = (0..14)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
            })
            .collect();
        format!("{prefix}_{:012x}{tail}", now_ms() * 1000 + n % 1000)
    }

    /// Writes one event to every stream; when it started to leave.
    fn emit(&self, kind: &str, properties: Value) -> Instant {
        let event = json!({
            "directory": self.directory,
            "project": self.project_id,
            "payload": {"id": self.new_id("evt"), "type": kind, "properties": properties},
        });
        self.broadcast(&event)
    }

    /// A durable event, followed by the `sync` twin OpenCode sends after each one.
    fn emit_durable(&self, kind: &str, properties: Value, aggregate_id: &str) -> Instant {
        let id = self.new_id("evt");
        let event = json!({
            "directory": self.directory, "project": self.project_id,
            "payload": {"id": id, "type": kind, "properties": properties},
        });
        let twin = json!({
            "directory": self.directory, "project": self.project_id,
            "payload": {"type": "sync", "syncEvent": {
                "id": id, "type": format!("{kind}.1"), "seq": 0, "aggregateID": aggregate_id,
                "data": properties,
            }, "id": id},
        });
        let at = self.broadcast(&event);
        self.broadcast(&twin);
        at
    }

    fn broadcast(&self, event: &Value) -> Instant {
        let chunk = sse_chunk(event);
        let mut subscribers = lock(&self.subscribers);
        let at = Instant::now();
        subscribers.retain_mut(|(_, stream)| stream.write_all(&chunk).is_ok());
        at
    }

    fn user_message(&self, session_id: &str, text: &str) -> String {
        self.user_message_with_id(session_id, text, None)
    }

    fn user_message_with_id(&self, session_id: &str, text: &str, id: Option<&str>) -> String {
        let message_id = id.map_or_else(|| self.new_id("msg"), str::to_string);
        let created = now_ms();
        let info = json!({
            "id": message_id, "role": "user", "sessionID": session_id,
            "time": {"created": created}, "agent": "build",
            "model": {"providerID": "fake", "modelID": "fake-model"},
        });
        let part = json!({
            "type": "text", "text": text, "messageID": message_id, "sessionID": session_id,
            "id": self.new_id("prt"),
        });
        self.update(|state| {
            if let Some(session) = state.session_mut(session_id) {
                session
                    .messages
                    .push(json!({"info": info, "parts": [part]}));
            }
        });
        self.emit_durable(
            "message.updated",
            json!({"sessionID": session_id, "info": info}),
            session_id,
        );
        self.emit_durable(
            "message.part.updated",
            json!({"sessionID": session_id, "part": part, "time": created}),
            session_id,
        );
        message_id
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let key = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(key, clone);
        }
        let connection_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("fake-oc-conn".into())
            .spawn(move || {
                let _ = serve_connection(&connection_shared, stream);
                lock(&connection_shared.connections).remove(&key);
            });
        if let Ok(handle) = spawned {
            workers.retain(|w| !w.is_finished());
            workers.push(handle);
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

fn heartbeat_loop(shared: Arc<Shared>) {
    let mut next = Instant::now() + HEARTBEAT_INTERVAL;
    let mut state = shared.lock();
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next {
            drop(state);
            let event = json!({"payload": {"id": shared.new_id("evt"), "type": "server.heartbeat",
                                           "properties": {}}});
            shared.broadcast(&event);
            next += HEARTBEAT_INTERVAL;
            state = shared.lock();
            continue;
        }
        state = shared
            .changed
            .wait_timeout(state, next - now)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

struct HttpRequest {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    body: Vec<u8>,
}

fn serve_connection(shared: &Arc<Shared>, stream: TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(request) = read_request(&mut reader)? else {
            return Ok(());
        };
        let received = Instant::now();
        shared.update(|state| {
            state
                .requests
                .push((request.method.clone(), request.path.clone()))
        });
        if request.method == "GET" && request.path == "/global/event" {
            return subscribe(shared, writer);
        }
        let (status, body) = route(shared, &request, received);
        write_response(&mut writer, status, body.as_ref())?;
    }
}

fn subscribe(shared: &Shared, mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache, no-transform\r\n\
          x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n",
    )?;
    let connected = json!({"payload": {"id": shared.new_id("evt"), "type": "server.connected", "properties": {}}});
    stream.write_all(&sse_chunk(&connected))?;
    let key = shared.next_id.fetch_add(1, Ordering::Relaxed);
    lock(&shared.subscribers).push((key, stream));
    shared.changed.notify_all();
    Ok(())
}

fn route(shared: &Shared, request: &HttpRequest, received: Instant) -> (u16, Option<Value>) {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["global", "health"]) => (200, Some(json!({"healthy": true, "version": VERSION}))),
        ("GET", ["experimental", "session"]) => {
            let state = shared.lock();
            // Newest first, each with its project, as the real list answers; `start` keeps those
            // updated since then and `limit` the first ones, as OpenCode's light-poll answer does.
            let start = query(request, "start").and_then(|v| v.parse::<u64>().ok());
            let limit = query(request, "limit").and_then(|v| v.parse::<usize>().ok());
            let list: Vec<Value> = state
                .sessions
                .iter()
                .rev()
                .filter(|s| {
                    let updated = s.info.pointer("/time/updated").and_then(Value::as_u64);
                    start.is_none_or(|start| updated.unwrap_or(0) >= start)
                })
                .take(limit.unwrap_or(usize::MAX))
                .map(|s| {
                    let mut item = s.info.clone();
                    item["project"] =
                        json!({"id": shared.project_id, "worktree": shared.directory});
                    item
                })
                .collect();
            (200, Some(Value::Array(list)))
        }
        ("GET", ["session", "status"]) => {
            let directory = query(request, "directory").unwrap_or(&shared.directory);
            let state = shared.lock();
            let busy: serde_json::Map<String, Value> = state
                .sessions
                .iter()
                .filter(|s| s.busy && directory == shared.directory)
                .map(|s| (id_of(s), json!({"type": "busy"})))
                .collect();
            (200, Some(Value::Object(busy)))
        }
        ("GET", ["session", id]) => match shared.lock().session(id) {
            Some(session) => (200, Some(session.info.clone())),
            None => not_found(id),
        },
        ("GET", ["session", id, "message"]) => {
            let limit = query(request, "limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            match shared.lock().session(id) {
                Some(session) => {
                    let skip = session.messages.len().saturating_sub(limit);
                    let items = session.messages[skip..].to_vec();
                    (200, Some(Value::Array(items)))
                }
                None => not_found(id),
            }
        }
        ("POST", ["session", id, "prompt_async"]) => {
            let known = shared.lock().session(id).is_some();
            if !known {
                return not_found(id);
            }
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            let text = body
                .pointer("/parts/0/text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            // OpenCode echoes the prompt as a user message at once, with the `messageID` the
            // prompt asked for; the reply comes later, and answers that message. The prompt is
            // recorded last, so a caller that waits for it and then replies always finds it.
            let asked_id = body.get("messageID").and_then(Value::as_str);
            let message_id = shared.user_message_with_id(id, &text, asked_id);
            shared.update(|state| {
                if let Some(session) = state.session_mut(id) {
                    session.pending_user = Some(message_id);
                }
                state.prompts.push(PromptReceived {
                    session_id: id.to_string(),
                    text: text.clone(),
                    at: received,
                })
            });
            (204, None)
        }
        _ => (
            404,
            Some(
                json!({"name": "NotFoundError", "data": {"message": format!("no route {}", request.path)}}),
            ),
        ),
    }
}

fn not_found(id: &str) -> (u16, Option<Value>) {
    (
        404,
        Some(
            json!({"name": "NotFoundError", "data": {"message": format!("Session not found: {id}")}}),
        ),
    )
}

fn id_of(session: &Session) -> String {
    session.info["id"].as_str().unwrap_or_default().to_string()
}

fn query<'r>(request: &'r HttpRequest, name: &str) -> Option<&'r str> {
    request
        .query
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Ok(None);
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let body = if chunked {
        read_chunked(reader)?
    } else {
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
        body
    };
    let (path, raw_query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(HttpRequest {
        method,
        path: percent_decode(path),
        query: raw_query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect(),
        body,
    }))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn write_response(stream: &mut TcpStream, status: u16, body: Option<&Value>) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        _ => "Not Found",
    };
    let mut response = format!("HTTP/1.1 {status} {reason}\r\n");
    let body = body.map(Value::to_string).unwrap_or_default();
    if status != 204 {
        response.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    stream.write_all(response.as_bytes())
}

fn sse_chunk(event: &Value) -> Vec<u8> {
    http_chunk(format!("data: {event}\n\n").as_bytes())
}

/// One chunk of a `Transfer-Encoding: chunked` body.
fn http_chunk(data: &[u8]) -> Vec<u8> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` cut into pieces of `size` characters.
fn split_chars(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
    if pieces.is_empty() {
        vec![String::new()]
    } else {
        pieces
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencode_mattermost::opencode::rest::OpenCodeClient;
    use opencode_mattermost::opencode::sse::SseParser;
    use opencode_mattermost::opencode::{Event, PartBody, Role, decode_global_event};

    /// Reads the fake's event stream on a thread and hands over the decoded events.
    fn listen(url: &str) -> crossbeam_channel::Receiver<Event> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let url = format!("{url}/global/event");
        thread::spawn(move || {
            let Ok(response) = ureq::get(&url).call() else {
                return;
            };
            let mut reader = response.into_body().into_reader();
            let mut parser = SseParser::new(1 << 20);
            let mut buffer = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    return;
                }
                for sse in parser.feed(&buffer[..n]) {
                    let event = decode_global_event(&sse.data).expect("the fake's events decode");
                    if let Some(envelope) = event
                        && tx.send(envelope.event).is_err()
                    {
                        return;
                    }
                }
            }
        });
        rx
    }

    fn next(events: &crossbeam_channel::Receiver<Event>) -> Event {
        events
            .recv_timeout(Duration::from_secs(10))
            .expect("an event from the fake")
    }

    #[test]
    fn a_new_session_is_announced_and_listed_like_opencode_does() {
        let fake = FakeOpenCode::start();
        let events = listen(&fake.url());
        assert_eq!(next(&events), Event::Connected);
        let (id, _) = fake.create_session("bench");
        match next(&events) {
            Event::SessionCreated(info) => {
                assert_eq!(info.id, id);
                assert_eq!(info.title, "bench");
                assert_eq!(info.directory, fake.directory());
            }
            other => panic!("expected session.created, got {other:?}"),
        }
        let client = OpenCodeClient::new(&fake.url(), "opencode", None);
        assert_eq!(client.health().expect("health"), VERSION);
        let listed = client.list_sessions().expect("session list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert_eq!(
            client
                .get_session(&id, &fake.directory())
                .expect("session")
                .id,
            id
        );
        assert!(matches!(
            client.get_session("ses_missing", &fake.directory()),
            Err(opencode_mattermost::opencode::rest::OcError::SessionNotFound(_))
        ));
    }

    #[test]
    fn a_prompt_is_recorded_and_its_reply_streams_then_is_stored() {
        let fake = FakeOpenCode::start();
        let events = listen(&fake.url());
        assert_eq!(next(&events), Event::Connected);
        let (id, _) = fake.create_session("bench");
        let client = OpenCodeClient::new(&fake.url(), "opencode", None);
        client
            .prompt(&id, &fake.directory(), "hello there")
            .expect("prompt accepted");
        let prompt = fake
            .wait_for_prompt(&id, 0, Duration::from_secs(10))
            .expect("prompt recorded");
        assert_eq!(prompt.text, "hello there");
        let pace = Pace {
            delta_chars: 4,
            interval: Duration::from_millis(1),
            finish_gap: Duration::from_millis(1),
        };
        let times = fake.reply(&[(&id, "one two three")], pace);
        assert_eq!(times.len(), 1);
        assert_eq!(times[0].first_delta, "one ");
        assert!(times[0].first_delta_at <= times[0].last_delta_at);

        let mut deltas = String::new();
        let mut saw_idle = false;
        while !saw_idle {
            match next(&events) {
                Event::PartDelta { delta, .. } => deltas.push_str(&delta),
                Event::SessionIdle { session_id } => saw_idle = session_id == id,
                _ => {}
            }
        }
        assert_eq!(deltas, "one two three");
        let messages = client
            .messages(&id, &fake.directory(), 50)
            .expect("messages");
        let roles: Vec<Role> = messages.iter().map(|(info, _)| info.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant]);
        let texts: Vec<&PartBody> = messages[1]
            .1
            .iter()
            .map(|p| &p.body)
            .filter(|b| matches!(b, PartBody::Text(_)))
            .collect();
        assert_eq!(texts, [&PartBody::Text("one two three".into())]);
        assert!(messages[1].0.completed_ms.is_some());
        assert!(
            client
                .session_status(&fake.directory())
                .expect("status")
                .is_empty()
        );
    }
}
