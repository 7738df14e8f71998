//! The thread that blocks on the Mattermost websocket. It authenticates, keeps the connection alive with
//! pings, notices silence, resumes with `connection_id`/`sequence_number`, and reconnects with backoff
//! forever. Decoded events go to the router; it never acts on them itself.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::stopped;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use super::{WsAction, WsEvent, decode_ws_frame};
use crate::http::Backoff;

pub const PING_INTERVAL: Duration = Duration::from_secs(30);
pub const DEAD_AFTER: Duration = Duration::from_secs(60);
/// A bad token in the header still upgrades, and then the server stays silent.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a blocked read wakes up to check the stop signal and the ping timer.
const READ_TICK: Duration = Duration::from_millis(250);
const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// After asking to resume, how long a refusal (a fresh `hello`) may take before the silence counts as
/// the server's yes. Any event arriving sooner settles it at once.
const RESUME_SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum WsUpdate {
    /// Connected. `resumed` is false when the server started a fresh connection, so events may have
    /// been missed and the caller should catch up over REST.
    Connected {
        resumed: bool,
        server_version: String,
    },
    Event(WsEvent),
    Disconnected(String),
}

pub struct WsSettings {
    /// `http(s)://host[:port]`, as configured.
    pub base_url: String,
    pub authorization: String,
    /// The trust roots for wss://.
    pub tls: crate::http::Tls,
    /// Stamped on every frame read, for the heartbeat.
    pub heard: crate::heartbeat::Heard,
}

type Socket = WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Runs until `stop` disconnects. `actions` are sent while connected; those that arrive while
/// disconnected are dropped, since typing is only worth showing now. Senders should use `try_send`.
pub fn run<T>(settings: WsSettings, out: Sender<T>, actions: Receiver<WsAction>, stop: Receiver<()>)
where
    T: From<WsUpdate> + Send + 'static,
{
    let send = |update: WsUpdate| out.send(T::from(update)).is_ok();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut resume = Resume::default();
    loop {
        if stopped(&stop, Duration::ZERO) {
            return;
        }
        let reason = match connect(&settings, &resume) {
            Ok(socket) => match session(
                socket,
                &mut resume,
                &send,
                &actions,
                &stop,
                &mut backoff,
                &settings.heard,
            ) {
                End::Stopped => return,
                End::Lost(reason) => reason,
            },
            Err(reason) => reason,
        };
        if !send(WsUpdate::Disconnected(reason)) {
            return;
        }
        if stopped(&stop, backoff.next_delay()) {
            return;
        }
    }
}

/// What a reconnect needs to ask the server for the events it missed.
#[derive(Debug, Default)]
struct Resume {
    connection_id: String,
    last_seq: Option<u64>,
}

enum End {
    Stopped,
    Lost(String),
}

impl Resume {
    fn can_resume(&self) -> bool {
        !self.connection_id.is_empty() && self.last_seq.is_some()
    }
}

fn connect(settings: &WsSettings, resume: &Resume) -> Result<Socket, String> {
    let mut url = websocket_url(&settings.base_url);
    if resume.can_resume()
        && let Some(seq) = resume.last_seq
    {
        url.push_str(&format!(
            "?connection_id={}&sequence_number={}",
            resume.connection_id,
            seq + 1
        ));
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad websocket url: {e}"))?;
    let authorization = settings
        .authorization
        .parse()
        .map_err(|_| "the token contains characters not allowed in a header".to_string())?;
    request.headers_mut().insert("Authorization", authorization);
    let host = request.uri().host().unwrap_or_default().to_string();
    let port = request
        .uri()
        .port_u16()
        .unwrap_or(if url.starts_with("wss:") { 443 } else { 80 });
    // A name can resolve to several addresses (localhost: ::1 and 127.0.0.1); try each in turn.
    let addresses = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut failure = format!("cannot resolve {host}");
    let mut connected = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => failure = format!("cannot connect to {host}:{port} ({address}): {e}"),
        }
    }
    let stream = connected.ok_or(failure)?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let handle = stream.try_clone().map_err(|e| e.to_string())?;
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let (socket, _) = tungstenite::client_tls_with_config(
        request,
        stream,
        Some(config),
        settings.tls.websocket_connector(),
    )
    .map_err(|e| {
        let problem = format!("websocket handshake failed: {e}");
        match crate::http::tls_hint(&problem) {
            Some(hint) => format!("{problem}; {hint}"),
            None => problem,
        }
    })?;
    // The clone shares the socket, so this timeout applies to the websocket's reads from now on.
    handle
        .set_read_timeout(Some(READ_TICK))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn session(
    mut socket: Socket,
    resume: &mut Resume,
    send: &impl Fn(WsUpdate) -> bool,
    actions: &Receiver<WsAction>,
    stop: &Receiver<()>,
    backoff: &mut Backoff,
    heard: &crate::heartbeat::Heard,
) -> End {
    let opened = Instant::now();
    let mut greeted = false;
    // Whatever queued up while disconnected is stale.
    let _ = actions.try_iter().count();
    let mut action_seq = 0;
    // A resumed connection gets no new hello: the upgrade itself is the server's yes. A refusal is a
    // fresh hello right away, so `resumed: true` is reported only after the first event or
    // `RESUME_SETTLE` of silence, never before a refusal that turns it into `resumed: false`.
    let mut resume_unconfirmed = resume.can_resume();
    if resume_unconfirmed {
        greeted = true;
        backoff.reset();
    }
    let confirm_resume = |unconfirmed: &mut bool| {
        if !std::mem::take(unconfirmed) {
            return true;
        }
        send(WsUpdate::Connected {
            resumed: true,
            server_version: String::new(),
        })
    };
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    loop {
        if stopped(stop, Duration::ZERO) {
            let _ = socket.close(None);
            let _ = socket.flush();
            return End::Stopped;
        }
        if greeted && let Err(e) = send_actions(&mut socket, actions, &mut action_seq) {
            return End::Lost(format!("sending a typing action failed: {e}"));
        }
        let read = socket.read();
        if read.is_ok() {
            heard.now();
        }
        match read {
            Ok(Message::Text(text)) => {
                last_heard = Instant::now();
                let decoded = match decode_ws_frame(text.as_str()) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => continue,
                    Err(e) => {
                        crate::warn!("{e}; frame skipped");
                        continue;
                    }
                };
                let (seq, event) = decoded;
                if let WsEvent::Hello {
                    connection_id,
                    server_version,
                } = &event
                {
                    // A hello means a new server-side connection: whatever was buffered is gone,
                    // and the sequence starts again from the hello's.
                    let resumed =
                        !resume.connection_id.is_empty() && *connection_id == resume.connection_id;
                    resume.connection_id = connection_id.clone();
                    resume.last_seq = seq;
                    resume_unconfirmed = false;
                    greeted = true;
                    backoff.reset();
                    if !send(WsUpdate::Connected {
                        resumed,
                        server_version: server_version.clone(),
                    }) {
                        return End::Stopped;
                    }
                    continue;
                }
                if !greeted {
                    return End::Lost("an event arrived before the hello".into());
                }
                if !confirm_resume(&mut resume_unconfirmed) {
                    return End::Stopped;
                }
                if let Some(seq) = seq {
                    resume.last_seq = Some(seq);
                }
                if !send(WsUpdate::Event(event)) {
                    return End::Stopped;
                }
            }
            Ok(Message::Close(frame)) => {
                return End::Lost(format!("closed by the server ({frame:?})"));
            }
            Ok(_) => last_heard = Instant::now(),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                if resume_unconfirmed
                    && opened.elapsed() >= RESUME_SETTLE
                    && !confirm_resume(&mut resume_unconfirmed)
                {
                    return End::Stopped;
                }
                if !greeted && opened.elapsed() >= HELLO_TIMEOUT {
                    return End::Lost(
                        "no hello within 5 s after connecting: the token was probably rejected"
                            .into(),
                    );
                }
                if last_heard.elapsed() >= DEAD_AFTER {
                    return End::Lost(format!("silent for {}s", DEAD_AFTER.as_secs()));
                }
                if last_ping.elapsed() >= PING_INTERVAL {
                    last_ping = Instant::now();
                    if let Err(e) = socket.send(Message::Ping(Vec::new().into())) {
                        return End::Lost(format!("ping failed: {e}"));
                    }
                }
            }
            Err(e @ (tungstenite::Error::Capacity(_) | tungstenite::Error::Utf8(_))) => {
                // The frame was refused before its payload was read (no allocation), which leaves
                // the stream mid-frame: only a new connection recovers. Not a resumed one, which
                // would replay the same frame; a fresh one makes the caller catch up over REST.
                crate::warn!(
                    "skipped a websocket frame the bridge cannot read ({e}); reconnecting and \
                     catching up over REST"
                );
                *resume = Resume::default();
                return End::Lost(format!("unreadable frame: {e}"));
            }
            Err(e) => return End::Lost(e.to_string()),
        }
    }
}

/// Sends every pending action, each identical action once. `seq` counts the client's frames on this
/// connection, from 1.
fn send_actions(
    socket: &mut Socket,
    actions: &Receiver<WsAction>,
    seq: &mut u64,
) -> Result<(), tungstenite::Error> {
    let mut pending: Vec<WsAction> = Vec::new();
    for action in actions.try_iter() {
        if !pending.contains(&action) {
            pending.push(action);
        }
    }
    for action in pending {
        *seq += 1;
        let frame = action_frame(&action, *seq);
        socket.send(Message::Text(frame.into()))?;
    }
    Ok(())
}

/// The client frame for an action, as a Mattermost web client sends it.
pub fn action_frame(action: &WsAction, seq: u64) -> String {
    match action {
        WsAction::Typing {
            channel_id,
            parent_id,
        } => serde_json::json!({
            "action": "user_typing",
            "seq": seq,
            "data": {"channel_id": channel_id, "parent_id": parent_id},
        })
        .to_string(),
    }
}

/// Connects once and waits for the server's hello, for `check`: the server version, or why not.
pub fn handshake(settings: &WsSettings) -> Result<String, String> {
    let mut socket = connect(settings, &Resume::default())?;
    let opened = Instant::now();
    let outcome = loop {
        match socket.read() {
            Ok(Message::Text(text)) => match decode_ws_frame(text.as_str()) {
                Ok(Some((_, WsEvent::Hello { server_version, .. }))) => break Ok(server_version),
                Ok(_) => {}
                Err(e) => break Err(e.to_string()),
            },
            Ok(Message::Close(frame)) => break Err(format!("closed by the server ({frame:?})")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                if opened.elapsed() >= HELLO_TIMEOUT {
                    break Err(
                        "connected, but no hello within 5 s: the server probably rejected the token"
                            .into(),
                    );
                }
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let _ = socket.close(None);
    let _ = socket.flush();
    outcome
}

/// `https://chat.example.com` → `wss://chat.example.com/api/v4/websocket`.
pub fn websocket_url(base_url: &str) -> String {
    let rest = base_url
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| {
            base_url
                .strip_prefix("http://")
                .map(|r| format!("ws://{r}"))
        })
        .unwrap_or_else(|| base_url.to_string());
    format!("{rest}/api/v4/websocket")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_frame_matches_the_protocol() {
        let frame = action_frame(
            &WsAction::Typing {
                channel_id: "chan".into(),
                parent_id: "root".into(),
            },
            7,
        );
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"action":"user_typing","seq":7,"data":{"channel_id":"chan","parent_id":"root"}})
        );
    }

    #[test]
    fn websocket_url_follows_the_scheme() {
        assert_eq!(
            websocket_url("https://chat.example.com"),
            "wss://chat.example.com/api/v4/websocket"
        );
        assert_eq!(
            websocket_url("http://127.0.0.1:8065"),
            "ws://127.0.0.1:8065/api/v4/websocket"
        );
    }
}
