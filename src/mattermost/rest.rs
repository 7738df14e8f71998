//! The Mattermost REST client. Every outbound call of one Mattermost connection goes through
//! `MattermostClient::call`, which spends from one shared rate budget, learns the server's limit from its
//! `X-Ratelimit-*` headers, honours 429s and retries transient failures.

use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{FileInfo, Post, User};
use crate::config::Secret;
use crate::http::{self, Backoff, percent_encode};
use crate::ratelimit::TokenBucket;

/// Mattermost's default rate limit: 10 requests a second with a burst of 100.
const DEFAULT_PER_SECOND: f64 = 10.0;
const DEFAULT_BURST: f64 = 100.0;
const MAX_ATTEMPTS: u32 = 6;
/// The most a JSON answer may be; posts are at most 16383 characters, so this is generous.
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;
const MAX_ERROR_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub enum MmError {
    /// No answer (connection refused, timeout, reset): retryable.
    Unreachable(String),
    /// The server refused the call. `id` is Mattermost's error id, such as
    /// `model.post.is_valid.msg.app_error`. 5xx and 429 are retryable; the rest are not.
    Http {
        status: u16,
        id: String,
        message: String,
    },
    /// The answer was not what the API documents.
    Decode(String),
    /// A download was larger than the caller allows; not retryable.
    TooLarge { what: String, limit: u64 },
}

impl MmError {
    pub fn is_retryable(&self) -> bool {
        match self {
            MmError::Unreachable(_) => true,
            MmError::Http { status, .. } => *status == 429 || *status >= 500,
            MmError::Decode(_) | MmError::TooLarge { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MmError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for MmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MmError::Unreachable(e) => write!(f, "mattermost unreachable: {e}"),
            MmError::Http {
                status,
                id,
                message,
            } if id.is_empty() => write!(f, "mattermost answered {status}: {message}"),
            MmError::Http {
                status,
                id,
                message,
            } => write!(f, "mattermost answered {status}: {message} ({id})"),
            MmError::Decode(e) => write!(f, "unexpected answer from mattermost: {e}"),
            MmError::TooLarge { what, limit } => {
                write!(f, "{what} is larger than the {limit}-byte limit")
            }
        }
    }
}

/// Counts of what this client did, for the logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallStats {
    pub calls: u64,
    pub rate_limited: u64,
    pub retries: u64,
}

pub struct MattermostClient {
    base: String,
    authorization: String,
    agent: ureq::Agent,
    budget: Mutex<TokenBucket>,
    stats: Mutex<CallStats>,
}

impl MattermostClient {
    pub fn new(base_url: &str, token: &Secret) -> MattermostClient {
        MattermostClient::with_tls(base_url, token, &http::Tls::default())
    }

    /// `new`, trusting `tls`'s roots for https://.
    pub fn with_tls(base_url: &str, token: &Secret, tls: &http::Tls) -> MattermostClient {
        MattermostClient {
            base: base_url.to_string(),
            authorization: format!("Bearer {}", token.expose()),
            agent: http::agent_with_tls(Duration::from_secs(30), tls),
            budget: Mutex::new(TokenBucket::new(
                DEFAULT_PER_SECOND,
                DEFAULT_BURST,
                Instant::now(),
            )),
            stats: Mutex::new(CallStats::default()),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    pub fn stats(&self) -> CallStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub fn me(&self) -> Result<User, MmError> {
        self.get_json("/users/me")
    }

    pub fn user_by_id(&self, user_id: &str) -> Result<User, MmError> {
        self.get_json(&format!("/users/{}", percent_encode(user_id)))
    }

    pub fn user_by_username(&self, username: &str) -> Result<User, MmError> {
        self.get_json(&format!("/users/username/{}", percent_encode(username)))
    }

    /// The DM channel between two users; Mattermost creates it on first use and returns it after.
    pub fn direct_channel(&self, user_a: &str, user_b: &str) -> Result<String, MmError> {
        let channel: Value =
            self.call_json("POST", "/channels/direct", Some(&json!([user_a, user_b])))?;
        channel
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| MmError::Decode("direct channel without id".into()))
    }

    /// Creates a post; `root_id` empty for a root post. `props` is attached as-is.
    pub fn create_post(
        &self,
        channel_id: &str,
        root_id: &str,
        message: &str,
        props: Option<Value>,
    ) -> Result<Post, MmError> {
        let mut body = json!({"channel_id": channel_id, "root_id": root_id, "message": message});
        if let Some(props) = props {
            body["props"] = props;
        }
        self.call_json("POST", "/posts", Some(&body))
    }

    pub fn patch_post(&self, post_id: &str, message: &str) -> Result<Post, MmError> {
        self.call_json(
            "PUT",
            &format!("/posts/{}/patch", percent_encode(post_id)),
            Some(&json!({"message": message})),
        )
    }

    pub fn delete_post(&self, post_id: &str) -> Result<(), MmError> {
        self.call(
            "DELETE",
            &format!("/posts/{}", percent_encode(post_id)),
            None,
        )
        .map(drop)
    }

    pub fn get_post(&self, post_id: &str) -> Result<Post, MmError> {
        self.get_json(&format!("/posts/{}", percent_encode(post_id)))
    }

    /// A file's name, size and type (`GET /files/{id}/info`).
    pub fn file_info(&self, file_id: &str) -> Result<FileInfo, MmError> {
        self.get_json(&format!("/files/{}/info", percent_encode(file_id)))
    }

    /// A file's bytes (`GET /files/{id}`). Refuses, without reading further, a file larger than
    /// `max_bytes`.
    pub fn download_file(&self, file_id: &str, max_bytes: u64) -> Result<Vec<u8>, MmError> {
        let path = format!("/files/{}", percent_encode(file_id));
        self.call_bytes("GET", &path, Body::None, max_bytes)
            .map_err(|error| match error {
                MmError::TooLarge { limit, .. } => MmError::TooLarge {
                    what: format!("file {file_id}"),
                    limit,
                },
                other => other,
            })
    }

    /// Uploads one file into a channel (`POST /files`), to attach to a post with
    /// `create_post_with_files`.
    pub fn upload_file(
        &self,
        channel_id: &str,
        filename: &str,
        bytes: &[u8],
    ) -> Result<FileInfo, MmError> {
        let boundary = multipart_boundary(bytes);
        let body = multipart_body(&boundary, channel_id, filename, bytes);
        let text = self.call_body(
            "POST",
            "/files",
            Body::Multipart {
                boundary: &boundary,
                bytes: &body,
            },
        )?;
        let uploaded: UploadAnswer = serde_json::from_str(&text)
            .map_err(|e| MmError::Decode(format!("POST /files: {e}")))?;
        uploaded.file_infos.into_iter().next().ok_or_else(|| {
            MmError::Decode("POST /files answered without a file_infos entry".into())
        })
    }

    /// Creates a post with uploaded files attached; `root_id` empty for a root post.
    pub fn create_post_with_files(
        &self,
        channel_id: &str,
        root_id: &str,
        message: &str,
        file_ids: &[String],
    ) -> Result<Post, MmError> {
        let body = json!({
            "channel_id": channel_id,
            "root_id": root_id,
            "message": message,
            "file_ids": file_ids,
        });
        self.call_json("POST", "/posts", Some(&body))
    }

    /// Reacts to a post as `user_id` (the bot itself: a user can only react as themselves).
    pub fn add_reaction(
        &self,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<(), MmError> {
        let body = json!({"user_id": user_id, "post_id": post_id, "emoji_name": emoji_name});
        self.call("POST", "/reactions", Some(&body)).map(drop)
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, MmError> {
        self.call_json("GET", path, None)
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, MmError> {
        let text = self.call(method, path, body)?;
        serde_json::from_str(&text).map_err(|e| MmError::Decode(format!("{method} {path}: {e}")))
    }

    /// One API call under the shared budget, retried on 429, 5xx and transport failures.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<String, MmError> {
        let json;
        let body = match body {
            Some(value) => {
                json = value.to_string();
                Body::Json(&json)
            }
            None => Body::None,
        };
        self.call_body(method, path, body)
    }

    fn call_body(&self, method: &str, path: &str, body: Body<'_>) -> Result<String, MmError> {
        let bytes = self.call_bytes(method, path, body, MAX_JSON_BYTES)?;
        String::from_utf8(bytes)
            .map_err(|_| MmError::Decode(format!("{method} {path}: the answer is not UTF-8")))
    }

    /// `call` for any body and answer: the answer's bytes, at most `max_bytes` of them.
    fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, MmError> {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(8));
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_for_budget();
            let error = match self.attempt(method, path, body, max_bytes) {
                Ok(text) => return Ok(text),
                Err(Attempt::RateLimited(wait)) => {
                    self.count(|s| s.rate_limited += 1);
                    if let Ok(mut budget) = self.budget.lock() {
                        budget.pause_until(Instant::now() + wait);
                    }
                    crate::debug!("{method} {path}: 429, waiting {wait:?}");
                    MmError::Http {
                        status: 429,
                        id: String::new(),
                        message: "rate limited".into(),
                    }
                }
                Err(Attempt::Failed(error)) => error,
            };
            if !error.is_retryable() || attempt >= MAX_ATTEMPTS {
                return Err(error);
            }
            self.count(|s| s.retries += 1);
            if error.status() != Some(429) {
                let delay = backoff.next_delay();
                crate::debug!("{method} {path}: {error}; retrying in {delay:?}");
                std::thread::sleep(delay);
            }
        }
    }

    fn wait_for_budget(&self) {
        loop {
            let wait = match self.budget.lock() {
                Ok(mut budget) => match budget.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                },
                Err(_) => return,
            };
            std::thread::sleep(wait.max(Duration::from_millis(1)));
        }
    }

    fn attempt(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, Attempt> {
        self.count(|s| s.calls += 1);
        let url = format!("{}/api/v4{}", self.base, path);
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .call(),
            (_, body) => {
                let request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                let request = request.header("Authorization", &self.authorization);
                match body {
                    Body::None => request
                        .header("Content-Type", "application/json")
                        .send(&[][..]),
                    Body::Json(json) => request
                        .header("Content-Type", "application/json")
                        .send(json.as_bytes()),
                    Body::Multipart { boundary, bytes } => request
                        .header(
                            "Content-Type",
                            &format!("multipart/form-data; boundary={boundary}"),
                        )
                        .send(bytes),
                }
            }
        };
        let mut response =
            result.map_err(|e| Attempt::Failed(MmError::Unreachable(e.to_string())))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .map(str::to_string)
        };
        let limit = header("x-ratelimit-limit").and_then(|v| v.parse().ok());
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.parse().ok());
        let reset = header("x-ratelimit-reset").and_then(|v| v.parse().ok());
        let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
        if let Ok(mut budget) = self.budget.lock() {
            budget.observe(limit, remaining, reset, Instant::now());
        }
        if status == 429 {
            // Retry-After is the server's own advice; the reset time is the fallback.
            let wait = retry_after.or(reset).unwrap_or(1).clamp(1, 60);
            return Err(Attempt::RateLimited(Duration::from_secs(wait)));
        }
        if !(200..300).contains(&status) {
            return Err(Attempt::Failed(error_answer(status, &mut response)));
        }
        // A declared length over the limit is refused before reading anything.
        let declared = header("content-length").and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_bytes) {
            return Err(Attempt::Failed(too_large(method, path, max_bytes)));
        }
        // ureq fails a read that reaches its limit, even at the body's end: allow one byte more.
        match response
            .body_mut()
            .with_config()
            .limit(max_bytes.saturating_add(1))
            .read_to_vec()
        {
            Ok(bytes) if bytes.len() as u64 > max_bytes => {
                Err(Attempt::Failed(too_large(method, path, max_bytes)))
            }
            Ok(bytes) => Ok(bytes),
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                Err(Attempt::Failed(too_large(method, path, max_bytes)))
            }
            Err(e) => Err(Attempt::Failed(MmError::Unreachable(e.to_string()))),
        }
    }

    fn count(&self, update: impl FnOnce(&mut CallStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            update(&mut stats);
        }
    }
}

/// The error a non-2xx answer carries. Only its start is read: the message is cut to 200 chars.
fn error_answer(status: u16, response: &mut ureq::http::Response<ureq::Body>) -> MmError {
    let mut bytes = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(MAX_ERROR_BYTES)
        .read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |key: &str| {
        error
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut message = field("message");
    if message.is_empty() {
        message = crate::render::truncate_chars(text.trim(), 200);
    }
    MmError::Http {
        status,
        id: field("id"),
        message,
    }
}

enum Attempt {
    RateLimited(Duration),
    Failed(MmError),
}

#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Json(&'a str),
    Multipart { boundary: &'a str, bytes: &'a [u8] },
}

#[derive(Deserialize)]
struct UploadAnswer {
    #[serde(default)]
    file_infos: Vec<FileInfo>,
}

fn too_large(method: &str, path: &str, limit: u64) -> MmError {
    MmError::TooLarge {
        what: format!("the answer to {method} {path}"),
        limit,
    }
}

/// A `multipart/form-data` body as `POST /files` reads it: `channel_id` first (the server needs it
/// before any file), then the one `files` part.
pub fn multipart_body(boundary: &str, channel_id: &str, filename: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(bytes.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\n{channel_id}\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n",
            quoted_filename(filename)
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A boundary that does not occur in `content`, so the body cannot be misread.
pub fn multipart_boundary(content: &[u8]) -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (0u64..)
        .map(|n| {
            format!(
                "opencode-mattermost-{:016x}",
                seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            )
        })
        .find(|boundary| !contains(content, boundary.as_bytes()))
        .unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The filename as a quoted-string: backslash and quote escaped, line breaks and other controls
/// replaced so the header stays one line.
fn quoted_filename(filename: &str) -> String {
    let mut out = String::with_capacity(filename.len());
    for c in filename.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        "file".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_parts(body: &[u8], boundary: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(body).into_owned();
        text.split(&format!("--{boundary}"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn multipart_body_has_channel_then_file() {
        let body = multipart_body("BOUND", "chan1", "notes.txt", b"hello\r\nworld");
        let expected = "--BOUND\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\nchan1\r\n\
            --BOUND\r\nContent-Disposition: form-data; name=\"files\"; filename=\"notes.txt\"\r\n\
            Content-Type: application/octet-stream\r\n\r\nhello\r\nworld\r\n--BOUND--\r\n";
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    #[test]
    fn multipart_body_keeps_binary_content_intact() {
        let content: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let boundary = multipart_boundary(&content);
        let body = multipart_body(&boundary, "c", "bin", &content);
        let start = body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .and_then(|after_first| {
                body[after_first..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| after_first + i + 4)
            })
            .unwrap();
        let end = body.len() - format!("\r\n--{boundary}--\r\n").len();
        assert_eq!(&body[start..end], &content[..]);
        assert_eq!(
            split_parts(&body, &boundary).len(),
            4,
            "preamble, two parts, closing"
        );
    }

    #[test]
    fn boundary_never_occurs_in_the_content() {
        for _ in 0..50 {
            let first = multipart_boundary(b"");
            // Content that contains the boundary just chosen must get a different one.
            let content = format!("x--{first}y");
            let second = multipart_boundary(content.as_bytes());
            assert!(!content.contains(&second), "{second} in {content}");
            assert!(second.starts_with("opencode-mattermost-"));
        }
    }

    /// A server that answers one request with `response` as raw bytes; its base URL.
    fn serve_once(response: Vec<u8>) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let _ = stream.write_all(&response);
        });
        format!("http://{address}")
    }

    fn chunked(status: &str, body: &[u8]) -> Vec<u8> {
        let mut response =
            format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                .into_bytes();
        for chunk in body.chunks(1000) {
            response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            response.extend_from_slice(chunk);
            response.extend_from_slice(b"\r\n");
        }
        response.extend_from_slice(b"0\r\n\r\n");
        response
    }

    fn client(base: &str) -> MattermostClient {
        MattermostClient::new(base, &Secret::new("test-token".into()))
    }

    #[test]
    fn a_download_without_a_length_stops_at_the_limit() {
        let body = vec![b'z'; 5000];
        let base = serve_once(chunked("200 OK", &body));
        let error = client(&base).download_file("abc", 4999).unwrap_err();
        assert!(
            matches!(&error, MmError::TooLarge { what, limit: 4999 } if what == "file abc"),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        let base = serve_once(chunked("200 OK", &body));
        assert_eq!(client(&base).download_file("abc", 5000).unwrap(), body);
    }

    #[test]
    fn an_error_answer_is_reported_whatever_the_download_limit() {
        let body = br#"{"id":"app.file_info.get.app_error","message":"Unable to find the file.","status_code":404}"#;
        let base = serve_once(chunked("404 Not Found", body));
        let error = client(&base).download_file("abc", 10).unwrap_err();
        assert_eq!(error.status(), Some(404), "{error:?}");
        assert_eq!(
            error.to_string(),
            "mattermost answered 404: Unable to find the file. (app.file_info.get.app_error)"
        );
        // A huge error body is read only in part, and still reported as the error it is.
        let base = serve_once(chunked("403 Forbidden", &vec![b'e'; 300_000]));
        let error = client(&base).file_info("abc").unwrap_err();
        assert_eq!(error.status(), Some(403), "{error:?}");
    }

    #[test]
    fn filenames_cannot_break_the_header() {
        assert_eq!(quoted_filename("a\"b\\c.txt"), "a\\\"b\\\\c.txt");
        assert_eq!(quoted_filename("evil\r\nX-Header: 1"), "evil__X-Header: 1");
        assert_eq!(quoted_filename("résumé 📄.pdf"), "résumé 📄.pdf");
        assert_eq!(quoted_filename(""), "file");
        let body = multipart_body("B", "c", "x\"\r\n", b"");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("filename=\"x\\\"__\""), "{text}");
    }
}
