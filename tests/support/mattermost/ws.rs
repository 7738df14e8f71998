//! `GET /api/v4/websocket`: the upgrade (through tungstenite), header and challenge auth,
//! reliable-websocket resume, the `user_typing` action, and pushing events to the client.
//!
//! Each connection has a reader thread (the connection's own thread) and a writer thread. Only
//! the writer writes to the socket: events, replies, and the pongs and close replies that
//! tungstenite's reading side produces all reach it through one channel, in order. Shutting the
//! socket down (server drop, `set_down`, `drop_websockets`) wakes the blocked reader.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde_json::{Map, Value, json};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use super::Shared;
use super::http::HttpRequest;
use super::state::{ApiError, WsOut};

/// A client that stops reading for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn is_upgrade(request: &HttpRequest) -> bool {
    request.method == "GET"
        && request.path == "/api/v4/websocket"
        && request.header_has_token("Connection", "upgrade")
        && request.header_has_token("Upgrade", "websocket")
        && request.header("Sec-WebSocket-Version") == Some("13")
        && request
            .header("Sec-WebSocket-Key")
            .is_some_and(|key| !key.is_empty())
}

/// Takes the connection over after the HTTP layer parsed `head`; `leftover` holds bytes that
/// arrived after it.
pub(super) fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    head: Vec<u8>,
    leftover: Vec<u8>,
    request: &HttpRequest,
    header_user: Option<String>,
) {
    let connection_id = request
        .query_param("connection_id")
        .unwrap_or("")
        .to_owned();
    let sequence_number = request.query_param("sequence_number").map(str::to_owned);
    let Ok(raw) = stream.try_clone() else {
        return;
    };
    let chunks = [head, leftover]
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    let replayed = ReplayedStream {
        chunks,
        inner: stream,
        forward: None,
    };
    // Gorilla's upgrade response carries only its own headers, so no callback adds any.
    let Ok(mut socket) = tungstenite::accept(replayed) else {
        let _ = raw.shutdown(Shutdown::Both);
        return;
    };
    let writer_stream = match (raw.set_write_timeout(Some(WRITE_TIMEOUT)), raw.try_clone()) {
        (Ok(()), Ok(writer_stream)) => writer_stream,
        _ => {
            let _ = raw.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = raw.set_nodelay(true);
    let Some(socket_key) = shared.add_websocket(&raw) else {
        let _ = raw.shutdown(Shutdown::Both);
        return;
    };
    let (sender, receiver) = crossbeam_channel::unbounded();
    socket.get_mut().forward = Some(sender.clone());
    let writer = thread::Builder::new()
        .name("fake-mm-ws-writer".into())
        .spawn(move || write_loop(writer_stream, receiver));
    let mut connection = Connection {
        shared: Arc::clone(&shared),
        sender: sender.clone(),
        session: None,
    };
    let registered = match (&writer, header_user) {
        (Err(_), _) => Err(()),
        (Ok(_), None) => Ok(()),
        (Ok(_), Some(user_id)) => shared
            .update(|state| {
                if state.reliable_websockets && !connection_id.is_empty() {
                    state.ws_resume(
                        &user_id,
                        &connection_id,
                        sequence_number.as_deref(),
                        sender.clone(),
                    )
                } else {
                    let key = state.ws_open(&user_id, sender.clone());
                    state.mark_online(&user_id);
                    Ok(key)
                }
            })
            .map(|key| connection.session = Some((key, user_id))),
    };
    if registered.is_ok() {
        loop {
            let next = match socket.read() {
                Ok(Message::Text(text)) => connection.handle_request(text.as_str()),
                Ok(Message::Binary(bytes)) => match std::str::from_utf8(&bytes) {
                    Ok(text) => connection.handle_request(text),
                    Err(_) => Next::Drop,
                },
                Ok(_) => Next::Continue,
                Err(_) => Next::Drop,
            };
            if let Next::Drop = next {
                break;
            }
        }
    }
    if let Some((key, _)) = connection.session.take() {
        shared.update(|state| state.ws_close(key, &sender));
    }
    let _ = sender.send(WsOut::Drop);
    if let Ok(writer) = writer {
        let _ = writer.join();
    }
    shared.remove_websocket(socket_key);
    // No close frame: to the client this is a dropped connection, unless it already closed.
    let _ = raw.shutdown(Shutdown::Both);
}

/// The writer thread: the only code that writes to the socket after the handshake.
fn write_loop(stream: TcpStream, receiver: Receiver<WsOut>) {
    let mut socket = WebSocket::from_raw_socket(stream, Role::Server, None);
    while let Ok(out) = receiver.recv() {
        let written = match out {
            WsOut::Frame(text) => socket.send(Message::text(text)).is_ok(),
            WsOut::Raw(bytes) => {
                let stream = socket.get_mut();
                stream
                    .write_all(&bytes)
                    .and_then(|()| stream.flush())
                    .is_ok()
            }
            WsOut::Drop => false,
        };
        if !written {
            let _ = socket.get_ref().shutdown(Shutdown::Both);
            return;
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    sender: Sender<WsOut>,
    /// Session key and user once authenticated.
    session: Option<(u64, String)>,
}

enum Next {
    Continue,
    Drop,
}

impl Connection {
    /// The websocket router of 5.36: malformed frames end the connection, errors become FAIL
    /// replies.
    fn handle_request(&mut self, text: &str) -> Next {
        let Ok(Value::Object(request)) = serde_json::from_str::<Value>(text) else {
            return Next::Drop;
        };
        let seq = match request.get("seq") {
            None | Some(Value::Null) => 0,
            Some(value) => match value.as_i64() {
                Some(seq) => seq,
                None => return Next::Drop,
            },
        };
        let action = match request.get("action") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(action)) => action.clone(),
            Some(_) => return Next::Drop,
        };
        let data = match request.get("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data.clone(),
            Some(_) => return Next::Drop,
        };
        if action.is_empty() {
            let error = ApiError::new(
                400,
                "api.web_socket_router.no_action.app_error",
                "No websocket action.",
            );
            return self.reply(seq, Err(error));
        }
        if seq <= 0 {
            let error = ApiError::new(
                400,
                "api.web_socket_router.bad_seq.app_error",
                "Invalid sequence for WebSocket message.",
            );
            return self.reply(seq, Err(error));
        }
        if action == "authentication_challenge" {
            return self.authenticate(seq, &data);
        }
        let Some((_, user_id)) = self.session.clone() else {
            let error = ApiError::new(
                401,
                "api.web_socket_router.not_authenticated.app_error",
                "WebSocket connection is not authenticated. Please log in and try again.",
            );
            return self.reply(seq, Err(error));
        };
        match action.as_str() {
            "user_typing" => {
                let channel_id = data.get("channel_id").and_then(Value::as_str);
                let parent_id = data.get("parent_id").and_then(Value::as_str).unwrap_or("");
                let result = self
                    .shared
                    .update(|state| state.user_typing(&user_id, channel_id, parent_id));
                self.reply(seq, result)
            }
            _ => {
                let error = ApiError::new(
                    500,
                    "api.web_socket_router.bad_action.app_error",
                    "Unknown WebSocket action.",
                );
                self.reply(seq, Err(error))
            }
        }
    }

    /// `authentication_challenge`: ignored once authenticated; a bad token drops the TCP
    /// connection without a close frame; a good one gets `hello`, then the OK reply.
    fn authenticate(&mut self, seq: i64, data: &Map<String, Value>) -> Next {
        if self.session.is_some() {
            return Next::Continue;
        }
        let Some(token) = data.get("token").and_then(Value::as_str) else {
            return Next::Drop;
        };
        let sender = self.sender.clone();
        let registered = self.shared.update(|state| {
            let user_id = state.user_by_token(token)?.id.clone();
            let key = state.ws_open(&user_id, sender.clone());
            let _ = sender.send(WsOut::Frame(reply_frame(seq, Ok(()))));
            state.mark_online(&user_id);
            Some((key, user_id))
        });
        match registered {
            Some(session) => {
                self.session = Some(session);
                Next::Continue
            }
            None => Next::Drop,
        }
    }

    fn reply(&mut self, seq: i64, result: Result<(), ApiError>) -> Next {
        // Through the channel, so the reply never overtakes events queued before it.
        let _ = self.sender.send(WsOut::Frame(reply_frame(seq, result)));
        Next::Continue
    }
}

/// Mattermost's `WebSocketResponse`: `seq_reply` and `error` are omitted when empty.
fn reply_frame(seq: i64, result: Result<(), ApiError>) -> String {
    let mut reply = Map::new();
    match result {
        Ok(()) => {
            reply.insert("status".into(), "OK".into());
            if seq != 0 {
                reply.insert("seq_reply".into(), seq.into());
            }
        }
        Err(error) => {
            reply.insert("status".into(), "FAIL".into());
            if seq != 0 {
                reply.insert("seq_reply".into(), seq.into());
            }
            reply.insert(
                "error".into(),
                json!({
                    "id": error.id,
                    "message": error.message,
                    "detailed_error": "",
                    "status_code": error.status,
                }),
            );
        }
    }
    // `status` first, as Go's struct order writes it.
    let mut ordered = String::from("{");
    for (i, key) in ["status", "seq_reply", "error"].iter().enumerate() {
        if let Some(value) = reply.get(*key) {
            if i > 0 && ordered.len() > 1 {
                ordered.push(',');
            }
            ordered.push_str(&format!("{}:{}", Value::from(*key), value));
        }
    }
    ordered.push('}');
    ordered
}

/// The reader's view of the TCP stream: bytes the HTTP layer already read are played back first,
/// one chunk per read so tungstenite sees the request head alone; once the handshake is done,
/// writes go to the writer thread instead of the socket.
struct ReplayedStream {
    chunks: VecDeque<Vec<u8>>,
    inner: TcpStream,
    forward: Option<Sender<WsOut>>,
}

impl Read for ReplayedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(front) = self.chunks.front_mut() {
            let n = front.len().min(buf.len());
            buf[..n].copy_from_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl Write for ReplayedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.forward {
            Some(forward) => forward
                .send(WsOut::Raw(buf.to_vec()))
                .map(|()| buf.len())
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)),
            None => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.forward {
            Some(_) => Ok(()),
            None => self.inner.flush(),
        }
    }
}
