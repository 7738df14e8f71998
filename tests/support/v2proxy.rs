//! An OpenCode 2.x stand-in: a proxy on 127.0.0.1 in front of a real `opencode serve` 1.18.33 that
//! passes `/api/*` (the v2 routes) through untouched and answers every other route 404 with OpenCode's
//! `NotFoundError` JSON, so a bridge speaking v2 cannot silently fall back to a v1 route.
//!
//! 1.18.33 itself answers an unknown route with its web app (200, text/html); the 404 body here has the
//! shape of the `NotFoundError` that both SDK generations declare (`{"name":"NotFoundError","data":
//! {"message":…}}`, as 1.18.33 sends for a missing session).
//!
//! As 1.18.33 checks credentials before it routes (401 on any route, even an unknown one), a refused
//! route is first checked with `GET /api/health` and the request's `Authorization`: bad credentials
//! get the server's own 401.
//!
//! Each connection carries one request: the proxy sets `Connection: close` both ways, so a client's
//! next request comes on a new connection and has its route checked too. Bytes are copied as they
//! arrive, so event streams are not buffered.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest request or response head the proxy reads before giving up on a connection.
const MAX_HEAD: usize = 64 * 1024;

pub struct V2Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    stopping: AtomicBool,
    /// Both sockets of every live connection, shut down on drop so streams through the proxy end.
    live: Mutex<Vec<(u64, TcpStream)>>,
    next: AtomicU64,
    /// Requests answered 404, as `METHOD /path`, for tests that check nothing reached a v1 route.
    refused: Mutex<Vec<String>>,
}

impl V2Proxy {
    /// Starts the proxy in front of `upstream`, the real server's `http://127.0.0.1:P` URL.
    pub fn start(upstream: &str) -> V2Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| {
                panic!("v2 proxy: upstream {upstream:?} is not http://IP:PORT: {e}")
            });
        let listener = TcpListener::bind("127.0.0.1:0").expect("v2 proxy: bind");
        let addr = listener.local_addr().expect("v2 proxy: address");
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            refused: Mutex::new(Vec::new()),
        });
        let accept = shared.clone();
        std::thread::Builder::new()
            .name("v2-proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if accept.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let shared = accept.clone();
                    let _ = std::thread::Builder::new()
                        .name("v2-proxy-conn".into())
                        .spawn(move || serve(client, upstream, &shared));
                }
            })
            .expect("v2 proxy: spawn");
        running().push(format!("http://{addr}"));
        V2Proxy { addr, shared }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests refused so far (`METHOD /path?query`).
    pub fn refused(&self) -> Vec<String> {
        lock(&self.shared.refused).clone()
    }
}

impl Drop for V2Proxy {
    fn drop(&mut self) {
        let url = self.url();
        running().retain(|u| *u != url);
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        for (_, socket) in lock(&self.shared.live).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// The URLs of the proxies alive now, so that the bridge's settings can tell a proxied server.
fn running() -> std::sync::MutexGuard<'static, Vec<String>> {
    static RUNNING: Mutex<Vec<String>> = Mutex::new(Vec::new());
    lock(&RUNNING)
}

/// Whether `url` is a v2 proxy of this test process: a bridge pointed there speaks v2.
pub fn is_proxy(url: &str) -> bool {
    running().iter().any(|u| u == url.trim_end_matches('/'))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a request target is a v2 route: `/api` or below it.
pub fn is_v2_route(target: &str) -> bool {
    let path = target.split(['?', '#']).next().unwrap_or("");
    path == "/api" || path.starts_with("/api/")
}

/// The 404 a 2.x server gives for a route it does not serve.
pub fn not_found_body(method: &str, path: &str) -> String {
    serde_json::json!({
        "name": "NotFoundError",
        "data": {"message": format!("Route not found: {method} {path}")},
    })
    .to_string()
}

fn serve(mut client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) {
    // A client that opens a connection and sends nothing is not waited for forever.
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let Some((head, rest)) = read_head(&mut client) else {
        return;
    };
    let _ = client.set_read_timeout(None);
    let Some((method, target)) = request_line(&head) else {
        return;
    };
    if !is_v2_route(&target) {
        lock(&shared.refused).push(format!("{method} {target}"));
        // OpenCode checks credentials before routes: a request it would refuse as unauthorized
        // gets that answer, whatever its route. A dead server refuses the connection either way.
        match authorization_answer(upstream, &head) {
            Err(()) => {}
            Ok(Some(unauthorized)) => answer(client, &head, rest, &unauthorized),
            Ok(None) => {
                let path = target.split('?').next().unwrap_or(&target);
                let body = not_found_body(&method, path);
                let not_found = format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                answer(client, &head, rest, not_found.as_bytes());
            }
        }
        return;
    }
    // A dead server: the client sees its connection closed, as near as a proxy gets to "refused".
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let key = shared.next.fetch_add(1, Ordering::Relaxed);
    {
        let mut live = lock(&shared.live);
        for socket in [&client, &server] {
            if let Ok(clone) = socket.try_clone() {
                live.push((key, clone));
            }
        }
    }
    // Checked after registering: a drop that raced the accept still ends this connection.
    if !shared.stopping.load(Ordering::Relaxed)
        && server.write_all(&with_close(&head)).is_ok()
        && server.write_all(&rest).is_ok()
    {
        // The request body (if any) goes up on its own thread; the answer comes back on this one.
        let (mut from_client, mut to_server) = match (client.try_clone(), server.try_clone()) {
            (Ok(c), Ok(s)) => (c, s),
            _ => return forget(shared, key),
        };
        let up = std::thread::Builder::new()
            .name("v2-proxy-up".into())
            .spawn(move || {
                let _ = copy(&mut from_client, &mut to_server);
                // The client is gone (or closed its side): the server's answer has no reader.
                let _ = to_server.shutdown(Shutdown::Both);
            });
        if let Some((head, rest)) = read_head(&mut server) {
            let _ = client
                .write_all(&with_close(&head))
                .and_then(|()| client.write_all(&rest))
                .and_then(|()| copy(&mut server, &mut client));
        }
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        if let Ok(up) = up {
            let _ = up.join();
        }
    }
    forget(shared, key);
}

fn forget(shared: &Shared, key: u64) {
    lock(&shared.live).retain(|(k, _)| *k != key);
}

/// The server's own answer when it refuses the request's credentials (asked with `GET /api/health`
/// and the request's `Authorization`), `None` when it accepts them; `Err` when it is down.
fn authorization_answer(upstream: SocketAddr, head: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let mut server = TcpStream::connect(upstream).map_err(|_| ())?;
    let _ = server.set_read_timeout(Some(Duration::from_secs(30)));
    let authorization = header(head, "authorization")
        .map(|value| format!("authorization: {value}\r\n"))
        .unwrap_or_default();
    let probe = format!(
        "GET /api/health HTTP/1.1\r\nhost: {upstream}\r\n{authorization}connection: close\r\n\r\n"
    );
    server.write_all(probe.as_bytes()).map_err(|_| ())?;
    let mut response = Vec::new();
    let _ = server.read_to_end(&mut response);
    if response.starts_with(b"HTTP/1.1 401") {
        let end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(response.len(), |i| i + 4);
        let mut answer = with_close(&response[..end]);
        answer.extend_from_slice(&response[end..]);
        Ok(Some(answer))
    } else if response.starts_with(b"HTTP/") {
        Ok(None)
    } else {
        Err(())
    }
}

/// Sends `response` after reading the request body, so that closing does not reset the connection
/// under an answer the client has not read yet.
fn answer(mut client: TcpStream, head: &[u8], rest: Vec<u8>, response: &[u8]) {
    let length = header(head, "content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if length > rest.len() {
        let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
        let mut body = vec![0u8; (length - rest.len()).min(16 * 1024 * 1024)];
        let _ = client.read_exact(&mut body);
    }
    let _ = client.write_all(response);
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Write);
    // Lets the client read the answer before the socket goes.
    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 1024];
    while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
}

/// Reads up to the blank line ending an HTTP head; returns the head (with the blank line) and the
/// bytes read after it.
fn read_head(stream: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Some((buffer, rest));
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
    }
}

fn request_line(head: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut words = text.lines().next()?.split(' ');
    Some((words.next()?.to_string(), words.next()?.to_string()))
}

fn header(head: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// The head with its `Connection`/`Keep-Alive` headers replaced by `Connection: close`.
fn with_close(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + 20);
    for (i, line) in text.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0
            && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    out.into_bytes()
}

/// Copies until end of stream or an error, writing each read at once (no buffering).
fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buffer[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The proxy against a small scripted upstream, and against the real server.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};

    use super::V2Proxy;
    use crate::support::llm::FakeLlm;
    use crate::support::opencode::OpenCode;

    const WAIT: Duration = Duration::from_secs(10);

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WAIT))
            .build()
            .into()
    }

    fn text(response: &mut ureq::http::Response<ureq::Body>) -> String {
        response.body_mut().read_to_string().expect("body")
    }

    /// An upstream that answers every connection with `answer` and reports each request line.
    fn answer_all(answer: &'static [u8]) -> (String, crossbeam_channel::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (sender, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                stream.set_read_timeout(Some(WAIT)).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                while matches!(reader.read_line(&mut String::new()), Ok(n) if n > 2) {}
                let _ = stream.write_all(answer);
                if sender.send(line.trim_end().to_string()).is_err() {
                    return;
                }
            }
        });
        (url, lines)
    }

    #[test]
    fn routes_outside_api_get_a_not_found_error_and_only_a_credentials_check_reaches_the_server() {
        let (upstream, seen) = answer_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n\
              {\"healthy\":true}",
        );
        let proxy = V2Proxy::start(&upstream);
        let agent = agent();
        for (method, path) in [
            ("GET", "/global/health"),
            ("GET", "/session?directory=/x"),
            ("POST", "/session/ses_1/prompt_async"),
            ("GET", "/apis"),
            ("GET", "/"),
        ] {
            let url = format!("{}{path}", proxy.url());
            let mut response = match method {
                "GET" => agent.get(&url).call(),
                _ => agent.post(&url).send(json!({"parts": []}).to_string()),
            }
            .expect("an answer");
            assert_eq!(response.status(), 404, "{method} {path}");
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "{method} {path}"
            );
            let body: Value = serde_json::from_str(&text(&mut response)).expect("json");
            let route = path.split('?').next().unwrap();
            assert_eq!(
                body,
                json!({"name": "NotFoundError", "data": {"message": format!("Route not found: {method} {route}")}})
            );
            assert_eq!(
                seen.recv_timeout(WAIT).as_deref(),
                Ok("GET /api/health HTTP/1.1"),
                "{method} {path}"
            );
        }
        assert!(
            seen.try_recv().is_err(),
            "a refused route reached the server"
        );
        assert_eq!(proxy.refused().len(), 5);
    }

    /// As OpenCode checks credentials before routes, bad ones get its 401 on any route.
    #[test]
    fn a_refused_password_gets_the_servers_401_on_any_route() {
        let (upstream, _seen) = answer_all(
            b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"Secure Area\"\r\n\
              content-type: application/json\r\ncontent-length: 17\r\n\r\n{\"_tag\":\"Unauth\"}",
        );
        let proxy = V2Proxy::start(&upstream);
        let mut response = agent()
            .get(&format!("{}/global/health", proxy.url()))
            .header("authorization", "Basic eDp5")
            .call()
            .expect("an answer");
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            "Basic realm=\"Secure Area\""
        );
        assert_eq!(response.headers()["connection"], "close");
        assert_eq!(text(&mut response), "{\"_tag\":\"Unauth\"}");
    }

    /// One scripted upstream connection: returns the request it got, after answering `answer`.
    fn answer_once(
        listener: &TcpListener,
        answer: &'static [u8],
    ) -> std::thread::JoinHandle<String> {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            stream.write_all(answer).unwrap();
            head + &String::from_utf8(body).unwrap()
        })
    }

    #[test]
    fn api_requests_pass_with_their_body_and_auth_and_each_connection_carries_one() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = V2Proxy::start(&format!("http://{}", upstream.local_addr().unwrap()));
        let agent = agent();
        for round in 0..2 {
            let seen = answer_once(
                &upstream,
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\
                  connection: keep-alive\r\n\r\n{\"data\":1}\n",
            );
            let body = json!({"prompt": {"text": format!("hello {round}")}, "delivery": "queue"});
            let mut response = agent
                .post(&format!("{}/api/session/ses_1/prompt?x=1", proxy.url()))
                .header("authorization", "Basic b3BlbmNvZGU6cw==")
                .send(body.to_string())
                .expect("an answer");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["connection"], "close");
            assert_eq!(text(&mut response), "{\"data\":1}\n");
            let request = seen.join().unwrap();
            assert!(
                request.starts_with("POST /api/session/ses_1/prompt?x=1 HTTP/1.1\r\n"),
                "{request}"
            );
            assert!(
                request.contains("authorization: Basic b3BlbmNvZGU6cw==\r\n"),
                "{request}"
            );
            assert!(request.contains("connection: close\r\n"), "{request}");
            assert!(request.ends_with(&body.to_string()), "{request}");
        }
        assert!(proxy.refused().is_empty());
    }

    #[test]
    fn a_dead_server_closes_the_connection_and_a_drop_ends_open_streams() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = upstream.local_addr().unwrap();
        let proxy = V2Proxy::start(&format!("http://{address}"));
        // A stream that the upstream keeps open after its head.
        let seen = answer_once(
            &upstream,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {}\n\n",
        );
        let mut stream = TcpStream::connect(proxy.url().trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(b"GET /api/event HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("data: {}") {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&chunk[..n]);
        }
        seen.join().unwrap();
        let started = Instant::now();
        drop(proxy);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(started.elapsed() < WAIT, "the stream outlived the proxy");

        drop(upstream);
        let proxy = V2Proxy::start(&format!("http://{address}"));
        let answer = agent().get(&format!("{}/api/health", proxy.url())).call();
        assert!(answer.is_err(), "{answer:?}");
    }

    /// Through the proxy, the real server's event stream arrives while a prompt's turn runs, not when
    /// it ends.
    #[test]
    fn the_real_event_stream_flows_live_and_v1_routes_are_gone() {
        let llm = FakeLlm::start();
        let gate = crate::support::llm::Gate::new();
        llm.script(
            "held answer",
            vec![vec![
                crate::support::llm::Step::Text("first part ".into()),
                crate::support::llm::Step::Gate(gate.clone()),
                crate::support::llm::Step::Text("second part".into()),
            ]],
        );
        let opencode = OpenCode::start(&llm, json!({}));
        let proxy = V2Proxy::start(&opencode.url());
        let agent = agent();
        let mut health = agent
            .get(&format!("{}/global/health", proxy.url()))
            .call()
            .unwrap();
        assert_eq!(health.status(), 404);
        assert!(text(&mut health).contains(r#""name":"NotFoundError""#));
        let mut health = agent
            .get(&format!("{}/api/health", proxy.url()))
            .call()
            .unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(text(&mut health), r#"{"healthy":true}"#);

        let stream_agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_recv_body(Some(Duration::from_secs(30)))
            .build()
            .into();
        let response = stream_agent
            .get(&format!("{}/api/event", proxy.url()))
            .call()
            .expect("event stream");
        let (events, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if events.send(line).is_err() {
                    return;
                }
            }
        });
        let created: Value = {
            let mut r = agent
                .post(&format!("{}/api/session", proxy.url()))
                .header("content-type", "application/json")
                .send("{}")
                .unwrap();
            serde_json::from_str(&text(&mut r)).unwrap()
        };
        let id = created["data"]["id"]
            .as_str()
            .expect("session id")
            .to_string();
        let mut prompted = agent
            .post(&format!("{}/api/session/{id}/prompt", proxy.url()))
            .header("content-type", "application/json")
            .send(json!({"prompt": {"text": "held answer"}, "delivery": "queue"}).to_string())
            .unwrap();
        assert_eq!(prompted.status(), 200, "{}", text(&mut prompted));
        // The first delta arrives while the LLM still holds the rest of the answer.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let line = lines
                .recv_deadline(deadline)
                .expect("the first delta through the proxy while the turn is held");
            if line.contains("session.next.text.delta") && line.contains("first part") {
                break;
            }
        }
        gate.open();
        loop {
            let line = lines
                .recv_deadline(deadline)
                .expect("the end of the text through the proxy");
            if line.contains("session.next.text.ended") {
                assert!(line.contains("first part second part"), "{line}");
                break;
            }
        }
    }
}
