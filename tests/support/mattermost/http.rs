//! Hand-written HTTP/1.1 for the fake: keep-alive, `Content-Length` and chunked request bodies,
//! and the middleware every Mattermost request passes (rate limiting, request log, headers),
//! before `api` routes the request or `ws` takes the connection over.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Shared;
use super::state::{ApiError, SERVER_VERSION};
use super::util::{http_date, new_id, percent_decode};
use super::wire::{WireError, to_json};
use super::{Request, api, ws};

/// Go's `http.DefaultMaxHeaderBytes`.
const MAX_HEAD_BYTES: usize = 1 << 20;
/// JSON bodies: 5.36 sets no limit; this one only keeps a broken client from exhausting memory.
const MAX_JSON_BODY: u64 = 64 << 20;
/// Multipart overhead allowed on top of `MaxFileSize` for `POST /files`.
const MULTIPART_SLACK: u64 = 1 << 20;
/// Like Go's server, unread request bytes up to this are drained so the connection can be kept.
const DRAIN_LIMIT: u64 = 256 << 10;

pub(super) struct HttpRequest {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: Vec<(String, String)>,
    pub(super) raw_query: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    keep_alive: bool,
}

impl HttpRequest {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// What the middleware learned about a request before routing.
pub(super) struct Context {
    pub(super) request_id: String,
    /// The token the request carried, valid or not.
    pub(super) token: Option<String>,
    /// The user of a valid token.
    pub(super) user_id: Option<String>,
    /// True when the token came as `?access_token=`, which 5.36 refuses for personal tokens.
    pub(super) token_in_query: bool,
    rate_headers: Option<[(String, String); 3]>,
}

pub(super) struct Response {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    /// Written by a Mattermost handler: gets `X-Request-Id`, `X-Version-Id`, `Expires`, `Vary`.
    pub(super) from_handler: bool,
    close: bool,
}

impl Response {
    pub(super) fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
            from_handler: true,
            close: false,
        }
    }

    pub(super) fn json<T: Serialize>(status: u16, value: &T) -> Response {
        Response::new(status, "application/json", to_json(value).into_bytes())
    }

    pub(super) fn error(error: &ApiError, request_id: &str) -> Response {
        Response::json(
            error.status,
            &WireError {
                id: &error.id,
                message: &error.message,
                detailed_error: "",
                request_id,
                status_code: error.status,
            },
        )
    }

    pub(super) fn status_ok() -> Response {
        Response::json(200, &serde_json::json!({"status": "OK"}))
    }

    pub(super) fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A response that no Mattermost handler wrote (router, rate limiter, net/http itself).
    pub(super) fn bare(status: u16, content_type: Option<&str>, body: &[u8]) -> Response {
        Response {
            status,
            headers: content_type
                .map(|t| vec![("Content-Type".to_owned(), t.to_owned())])
                .unwrap_or_default(),
            body: body.to_vec(),
            from_handler: false,
            close: false,
        }
    }
}

enum BodyError {
    TooLarge { length: u64, drained: bool },
    Malformed,
    Io,
}

/// Serves one TCP connection until it closes, is shut down, or becomes a websocket.
pub(super) fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream) {
    let peer_ip = stream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".to_owned());
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let head_len = match read_head(&mut stream, &mut buffer) {
            Ok(Some(len)) => len,
            Ok(None) => return,
            Err(HeadError::TooLarge) => {
                let _ = write_raw(&mut stream, 431, "Request Header Fields Too Large");
                return;
            }
            Err(HeadError::Io) => return,
        };
        let head: Vec<u8> = buffer.drain(..head_len).collect();
        if shared.is_down() {
            shared.refuse();
            return;
        }
        let Some(mut request) = parse_head(&head) else {
            let _ = write_raw(&mut stream, 400, "Bad Request");
            return;
        };
        let started = Instant::now();
        let (context, limited) = begin(&shared, &request, &peer_ip, started);
        if let Some(response) = limited {
            if !finish(&shared, &mut stream, &request, &context, response) {
                return;
            }
            continue;
        }
        if ws::is_upgrade(&request) {
            log_request(&shared, &request, 101, &context);
            ws::serve(shared, stream, head, buffer, &request, context.user_id);
            return;
        }
        let limit = if request.path == "/api/v4/files" {
            shared.lock().max_file_size + MULTIPART_SLACK
        } else {
            MAX_JSON_BODY
        };
        if request
            .header("Expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
            && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let response = match read_body(&mut stream, &mut buffer, &request, limit) {
            Ok(body) => {
                request.body = body;
                api::handle(&shared, &request, &context)
            }
            Err(BodyError::TooLarge { length, drained }) => {
                let error = api::body_too_large(&request.path, length, limit);
                let mut response = Response::error(&error, &context.request_id);
                response.close = !drained;
                response
            }
            Err(BodyError::Malformed) => {
                let _ = write_raw(&mut stream, 400, "Bad Request");
                return;
            }
            Err(BodyError::Io) => return,
        };
        match take_response_fault(&shared, &request) {
            Some(ResponseFault::Lose) => {
                log_request(&shared, &request, 0, &context);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Some(ResponseFault::Delay(delay)) => std::thread::sleep(delay),
            Some(ResponseFault::DelayUnlessStopping(delay))
                if !shared.wait_unless_stopping(delay) =>
            {
                return;
            }
            Some(ResponseFault::DelayUnlessStopping(_)) => {}
            None => {}
        }
        if !finish(&shared, &mut stream, &request, &context, response) {
            return;
        }
    }
}

enum ResponseFault {
    Lose,
    Delay(Duration),
    /// A `delay_matching` rule: cut short when the server stops, so a test's end never waits for it.
    DelayUnlessStopping(Duration),
}

/// `lose_next` first, then `delay_next`: each counts down once per handled REST request. Then the
/// first `delay_matching` rule the request matches.
fn take_response_fault(shared: &Shared, request: &HttpRequest) -> Option<ResponseFault> {
    shared.update(|state| {
        if state.lose_next > 0 {
            state.lose_next -= 1;
            return Some(ResponseFault::Lose);
        }
        if state.delay_next.0 == 0
            && let Some(rule) = state
                .delay_rules
                .iter()
                .find(|rule| rule.matches(&request.method, &request.path))
        {
            let delay = rule.delay;
            state.delayed_by_rules += 1;
            return Some(ResponseFault::DelayUnlessStopping(delay));
        }
        let (count, delay) = state.delay_next;
        (count > 0).then(|| {
            state.delay_next.0 -= 1;
            ResponseFault::Delay(delay)
        })
    })
}

/// The middleware before any handler: request id, token, rate limit (Mattermost wraps its whole
/// router with throttled, so even 404s count). The response, if any, is the 429.
fn begin(
    shared: &Shared,
    request: &HttpRequest,
    peer_ip: &str,
    now: Instant,
) -> (Context, Option<Response>) {
    let (token, token_in_query) = match parse_auth_header(request.header("Authorization")) {
        Some(token) => (Some(token), false),
        None => match request.query_param("access_token") {
            Some(token) if !token.is_empty() => (Some(token.to_owned()), true),
            _ => (None, false),
        },
    };
    let mut state = shared.lock();
    let user_id = token
        .as_deref()
        .and_then(|t| state.user_by_token(t))
        .map(|u| u.id.clone());
    let key = token.clone().unwrap_or_else(|| peer_ip.to_owned());
    let decision = state.limiter.as_mut().map(|l| l.check(&key, now));
    drop(state);
    let rate_headers = decision.as_ref().map(|d| {
        [
            ("X-Ratelimit-Limit".to_owned(), d.limit.to_string()),
            ("X-Ratelimit-Remaining".to_owned(), d.remaining.to_string()),
            ("X-Ratelimit-Reset".to_owned(), d.reset_secs.to_string()),
        ]
    });
    let context = Context {
        request_id: new_id(),
        token,
        user_id,
        token_in_query,
        rate_headers,
    };
    match decision {
        Some(d) if d.limited => {
            let response =
                Response::bare(429, Some("text/plain; charset=utf-8"), b"limit exceeded\n")
                    .with_header("Retry-After", &d.retry_after_secs.to_string())
                    .with_header("X-Content-Type-Options", "nosniff");
            (context, Some(response))
        }
        _ => (context, None),
    }
}

/// `Authorization: Bearer <token>` or `Token <token>`, as `ParseAuthTokenFromRequest` reads it.
fn parse_auth_header(header: Option<&str>) -> Option<String> {
    let header = header?;
    let scheme_is = |scheme: &str| {
        header
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            && header.len() > scheme.len()
    };
    if scheme_is("bearer") {
        return header.get(7..).map(str::to_owned);
    }
    if scheme_is("token") {
        return header.get(6..).map(str::to_owned);
    }
    None
}

/// Logs and writes a response; false when the connection must close.
fn finish(
    shared: &Shared,
    stream: &mut TcpStream,
    request: &HttpRequest,
    context: &Context,
    response: Response,
) -> bool {
    log_request(shared, request, response.status, context);
    let close = response.close || !request.keep_alive;
    write_response(stream, response, context, close).is_ok() && !close && !shared.is_down()
}

fn log_request(shared: &Shared, request: &HttpRequest, status: u16, context: &Context) {
    shared.update(|state| {
        state.requests.push(Request {
            method: request.method.clone(),
            path: request.path.clone(),
            status,
            user_id: context.user_id.clone(),
            query: request.raw_query.clone(),
            at: std::time::Instant::now(),
        })
    });
}

fn write_response(
    stream: &mut TcpStream,
    response: Response,
    context: &Context,
    close: bool,
) -> io::Result<()> {
    let mut headers = response.headers;
    if let Some(rate) = &context.rate_headers {
        headers.extend(rate.iter().cloned());
    }
    if response.from_handler {
        headers.push(("X-Request-Id".into(), context.request_id.clone()));
        headers.push(("X-Version-Id".into(), SERVER_VERSION.into()));
        headers.push(("Expires".into(), "0".into()));
        headers.push(("Vary".into(), "Accept-Encoding".into()));
    }
    // Go writes the header map sorted, then Date and Content-Length.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    headers.push(("Date".into(), http_date(now)));
    headers.push(("Content-Length".into(), response.body.len().to_string()));
    if close {
        headers.push(("Connection".into(), "close".into()));
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason_phrase(response.status)
    );
    for (name, value) in &headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&response.body);
    stream.write_all(&bytes)?;
    stream.flush()
}

/// A response net/http writes on its own for requests it cannot parse.
fn write_raw(stream: &mut TcpStream, status: u16, text: &str) -> io::Result<()> {
    let message = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n{status} {text}"
    );
    stream.write_all(message.as_bytes())
}

pub(super) fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

enum HeadError {
    TooLarge,
    Io,
}

/// Reads until the blank line ending a request head; `None` on a clean EOF between requests.
fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<Option<usize>, HeadError> {
    let mut scanned = 0;
    loop {
        if let Some(end) = find_head_end(buffer, scanned) {
            return Ok(Some(end));
        }
        scanned = buffer.len().saturating_sub(3);
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        match fill(stream, buffer) {
            Ok(0) if buffer.is_empty() => return Ok(None),
            Ok(0) => return Err(HeadError::Io),
            Ok(_) => {}
            Err(_) => return Err(HeadError::Io),
        }
    }
}

fn find_head_end(buffer: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buffer.len() {
        if buffer[i] == b'\n' {
            if buffer.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buffer.get(i + 1) == Some(&b'\r') && buffer.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn parse_head(head: &[u8]) -> Option<HttpRequest> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return None;
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let target = match target.find("://") {
        Some(scheme_end) => {
            let rest = &target[scheme_end + 3..];
            rest.find('/').map(|slash| &rest[slash..]).unwrap_or("/")
        }
        None => target,
    };
    if !target.starts_with('/') && target != "*" {
        return None;
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let query = raw_query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name, true), percent_decode(value, true))
        })
        .collect();
    let mut request = HttpRequest {
        method,
        path: percent_decode(raw_path, false),
        query,
        raw_query: raw_query.to_owned(),
        headers,
        body: Vec::new(),
        keep_alive: true,
    };
    request.keep_alive = if http10 {
        request.header_has_token("Connection", "keep-alive")
    } else {
        !request.header_has_token("Connection", "close")
    };
    Some(request)
}

fn read_body(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    request: &HttpRequest,
    limit: u64,
) -> Result<Vec<u8>, BodyError> {
    if let Some(encoding) = request.header("Transfer-Encoding") {
        let chunked = encoding
            .rsplit(',')
            .next()
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        if !chunked {
            return Err(BodyError::Malformed);
        }
        return read_chunked(stream, buffer, limit);
    }
    let Some(length) = request.header("Content-Length") else {
        return Ok(Vec::new());
    };
    if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BodyError::Malformed);
    }
    let length: u64 = length.parse().map_err(|_| BodyError::Malformed)?;
    if length > limit {
        let drained =
            length <= limit + DRAIN_LIMIT && read_exact_into(stream, buffer, length).is_ok();
        if drained {
            buffer.drain(..length as usize);
        }
        return Err(BodyError::TooLarge { length, drained });
    }
    read_exact_into(stream, buffer, length)?;
    Ok(buffer.drain(..length as usize).collect())
}

/// Makes sure `buffer` holds at least `length` bytes.
fn read_exact_into(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    length: u64,
) -> Result<(), BodyError> {
    let length = usize::try_from(length).map_err(|_| BodyError::Malformed)?;
    while buffer.len() < length {
        match fill(stream, buffer) {
            Ok(0) | Err(_) => return Err(BodyError::Io),
            Ok(_) => {}
        }
    }
    Ok(())
}

fn read_line(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<String, BodyError> {
    loop {
        if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
        }
        if buffer.len() > 64 * 1024 {
            return Err(BodyError::Malformed);
        }
        match fill(stream, buffer) {
            Ok(0) | Err(_) => return Err(BodyError::Io),
            Ok(_) => {}
        }
    }
}

fn read_chunked(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    limit: u64,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    let mut total: u64 = 0;
    loop {
        let line = read_line(stream, buffer)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| BodyError::Malformed)?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !read_line(stream, buffer)?.is_empty() {}
            break;
        }
        total = total.saturating_add(size);
        if total > limit + DRAIN_LIMIT {
            return Err(BodyError::TooLarge {
                length: total,
                drained: false,
            });
        }
        read_exact_into(stream, buffer, size + 2)?;
        let chunk: Vec<u8> = buffer.drain(..size as usize + 2).collect();
        if &chunk[size as usize..] != b"\r\n" {
            return Err(BodyError::Malformed);
        }
        if total <= limit {
            body.extend_from_slice(&chunk[..size as usize]);
        }
    }
    if total > limit {
        return Err(BodyError::TooLarge {
            length: total,
            drained: true,
        });
    }
    Ok(body)
}
