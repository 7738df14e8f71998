//! The OpenCode REST client: one value per server, holding its base URL, credentials and agent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::decode::{
    decode_agent, decode_message, decode_part, decode_permission_request, decode_question_request,
    decode_session, decode_status, decode_todo,
};
use super::v2;
use super::{
    AgentChoice, ApiChoice, Dialect, FileContent, MessageInfo, ModelChoice, ModelRef, Part,
    PermissionReply, PermissionRequest, PromptInput, QuestionRequest, ServerKey, SessionInfo,
    Status, Todo,
};
use crate::config::Secret;
use crate::http::{self, percent_encode};

#[derive(Debug)]
pub enum OcError {
    /// The request never left: no connection could be made. Safe to retry, even a prompt.
    NotSent(String),
    /// The exchange failed part way: the server may or may not have acted on it.
    Unreachable(String),
    /// The session is gone (404): the thread should be marked ended.
    SessionNotFound(String),
    /// Something other than a session is gone (404): a permission or question already answered, a
    /// file that does not exist. The session itself is fine.
    NotFound(String),
    /// Wrong OPENCODE_SERVER_USERNAME/PASSWORD: retrying will not help.
    Unauthorized,
    /// Any other refusal, with the server's message.
    Http { status: u16, message: String },
    /// The server answered something this client cannot read.
    Decode(String),
    /// The server's API has no such operation (a v2 server has no delete, rename or diff); the text
    /// says what is missing and why.
    Unsupported(String),
}

impl std::fmt::Display for OcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OcError::NotSent(e) | OcError::Unreachable(e) => write!(f, "opencode unreachable: {e}"),
            OcError::SessionNotFound(m) => write!(f, "session not found: {m}"),
            OcError::NotFound(m) => write!(f, "not found: {m}"),
            OcError::Unauthorized => write!(
                f,
                "opencode rejected the credentials (401); check OPENCODE_SERVER_USERNAME and OPENCODE_SERVER_PASSWORD"
            ),
            OcError::Http { status, message } => write!(f, "opencode answered {status}: {message}"),
            OcError::Decode(e) => write!(f, "unexpected answer from opencode: {e}"),
            OcError::Unsupported(m) => f.write_str(m),
        }
    }
}

/// What `OpenCodeClient::read_file` found.
#[derive(Debug)]
pub enum FileRead {
    Content(FileContent),
    /// Over the `max_bytes` given: refuse, naming the limit.
    TooLarge,
    /// The server would not read it.
    Refused(Refusal),
}

/// Why the server would not read a file; OpenCode 1.18.33 says only "500".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    Directory,
    /// Not in its listing: a symbolic link (which the server refuses when it leads outside the
    /// session's directory), or something it cannot read.
    NotARegularFile,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Listed {
    File,
    Directory,
}

impl From<ureq::Error> for OcError {
    fn from(error: ureq::Error) -> OcError {
        use ureq::{Error, Timeout};
        let never_sent = match &error {
            Error::HostNotFound
            | Error::ConnectionFailed
            | Error::Timeout(Timeout::Resolve | Timeout::Connect) => true,
            Error::Io(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            _ => false,
        };
        if never_sent {
            OcError::NotSent(error.to_string())
        } else {
            OcError::Unreachable(error.to_string())
        }
    }
}

pub struct OpenCodeClient {
    pub key: ServerKey,
    /// What posts and `status` call it: OPENCODE_URL's `NAME`, else `host:port`.
    pub name: String,
    /// Set while the bridge follows more than one server: root posts then name this one.
    named: std::sync::atomic::AtomicBool,
    base: String,
    authorization: Option<String>,
    agent: ureq::Agent,
    tls: http::Tls,
    /// `OPENCODE_API`; with `Auto`, `dialect` is whatever the last `probe` found.
    api: ApiChoice,
    /// The dialect every call speaks now: 1 = v1, 2 = v2. Set by `probe` (at every connect of the
    /// event stream), so a server upgraded in place is followed.
    dialect: AtomicU8,
    /// What the last `probe` found, for the router to keep in `state.json` (shown by `status`).
    last_probe: Mutex<Option<Probe>>,
}

/// Names the server only: the credentials stay out of logs.
impl std::fmt::Debug for OpenCodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenCodeClient({} at {})", self.name, self.base)
    }
}

/// What `OpenCodeClient::probe` found: the dialect and, in words, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub dialect: Dialect,
    /// The server's version, when it says (only v1's `/global/health` does).
    pub version: Option<String>,
    pub reason: String,
}

impl OpenCodeClient {
    pub fn new(base_url: &str, username: &str, password: Option<&Secret>) -> OpenCodeClient {
        OpenCodeClient::with_tls(base_url, username, password, &http::Tls::default())
    }

    /// `new`, trusting `tls`'s roots for https://.
    pub fn with_tls(
        base_url: &str,
        username: &str,
        password: Option<&Secret>,
        tls: &http::Tls,
    ) -> OpenCodeClient {
        OpenCodeClient {
            key: ServerKey(base_url.to_string()),
            name: crate::config::default_server_name(base_url),
            named: std::sync::atomic::AtomicBool::new(false),
            base: base_url.to_string(),
            authorization: password.map(|p| http::basic_auth(username, p.expose())),
            agent: http::agent_with_tls(Duration::from_secs(30), tls),
            tls: tls.clone(),
            api: ApiChoice::Auto,
            dialect: AtomicU8::new(1),
            last_probe: Mutex::new(None),
        }
    }

    /// This client with `OPENCODE_API`'s choice; a forced dialect is used at once, `Auto` waits for
    /// the first `probe` (and speaks v1 until then).
    pub fn with_api(mut self, api: ApiChoice) -> OpenCodeClient {
        self.api = api;
        if api == ApiChoice::V2 {
            self.set_dialect(Dialect::V2);
        }
        self
    }

    /// This client called `name` in posts and `status`.
    pub fn with_name(mut self, name: &str) -> OpenCodeClient {
        self.name = name.to_string();
        self
    }

    /// Whether posts name this server (`🖥 NAME`): true while the bridge follows several.
    pub fn set_named(&self, named: bool) {
        self.named
            .store(named, std::sync::atomic::Ordering::Relaxed);
    }

    /// The name root posts show, when they show one.
    pub fn shown_name(&self) -> Option<&str> {
        self.named
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(self.name.as_str())
    }

    pub fn api(&self) -> ApiChoice {
        self.api
    }

    pub fn dialect(&self) -> Dialect {
        match self.dialect.load(Ordering::Relaxed) {
            2 => Dialect::V2,
            _ => Dialect::V1,
        }
    }

    fn set_dialect(&self, dialect: Dialect) {
        let value = match dialect {
            Dialect::V1 => 1,
            Dialect::V2 => 2,
        };
        self.dialect.store(value, Ordering::Relaxed);
    }

    fn is_v2(&self) -> bool {
        self.dialect() == Dialect::V2
    }

    /// Finds out which dialect the server speaks and switches to it: v1 when `/global/health`
    /// answers with a version (1.x servers serve both, and their terminals drive sessions through
    /// v1), v2 when only `/api/health` answers (2.x). A forced `OPENCODE_API` is checked, not
    /// changed: a server that does not serve it is an error naming the variable.
    pub fn probe(&self) -> Result<Probe, OcError> {
        let v1 = match self.get("/global/health") {
            Ok(body) => body
                .get("version")
                .and_then(Value::as_str)
                .map(str::to_string),
            Err(e @ (OcError::NotSent(_) | OcError::Unreachable(_) | OcError::Unauthorized)) => {
                return Err(e);
            }
            Err(_) => None,
        };
        let v2 = match self.api {
            ApiChoice::V1 => false,
            ApiChoice::Auto if v1.is_some() => false,
            _ => v2::rest::health(self).is_ok(),
        };
        let probe = match (self.api, v1, v2) {
            (ApiChoice::V1 | ApiChoice::Auto, Some(version), _) => Probe {
                dialect: Dialect::V1,
                reason: if self.api == ApiChoice::V1 {
                    "OPENCODE_API=v1".to_string()
                } else {
                    format!("/global/health answers with version {version}")
                },
                version: Some(version),
            },
            (ApiChoice::V2 | ApiChoice::Auto, version, true) => Probe {
                dialect: Dialect::V2,
                reason: if self.api == ApiChoice::V2 {
                    "OPENCODE_API=v2".to_string()
                } else {
                    "only /api/health answers (an OpenCode 2.x server)".to_string()
                },
                version,
            },
            (ApiChoice::V1, None, _) => {
                return Err(OcError::Unsupported(
                    "OPENCODE_API=v1, but /global/health does not answer with a version; unset \
                     OPENCODE_API (or set it to auto) to speak v2 to an OpenCode 2.x server"
                        .into(),
                ));
            }
            (ApiChoice::V2, _, false) => {
                return Err(OcError::Unsupported(
                    "OPENCODE_API=v2, but /api/health does not answer; this server has no v2 API \
                     (OpenCode before 1.18?); unset OPENCODE_API (or set it to auto)"
                        .into(),
                ));
            }
            (ApiChoice::Auto, None, false) => {
                return Err(OcError::Decode(
                    "neither /global/health nor /api/health answers; is this an OpenCode server?"
                        .into(),
                ));
            }
        };
        self.set_dialect(probe.dialect);
        *self
            .last_probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(probe.clone());
        Ok(probe)
    }

    /// What the last successful `probe` found.
    pub fn last_probe(&self) -> Option<Probe> {
        self.last_probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// An agent for this server's event stream, with the same trust roots as the client.
    pub fn stream_agent(&self, idle: Duration) -> ureq::Agent {
        http::stream_agent_with_tls(idle, &self.tls)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }

    /// `GET /global/health`: the server's version; a server that serves only v2 (`/api/health`)
    /// says none.
    pub fn health(&self) -> Result<String, OcError> {
        let body = match self.get("/global/health") {
            Ok(body) => body,
            Err(e @ (OcError::NotSent(_) | OcError::Unreachable(_) | OcError::Unauthorized)) => {
                return Err(e);
            }
            Err(e) => {
                return match v2::rest::health(self) {
                    Ok(()) => Ok("unknown (it serves only the v2 API)".to_string()),
                    Err(_) => Err(e),
                };
            }
        };
        Ok(body
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Every session on the server, across all projects and directories.
    pub fn list_sessions(&self) -> Result<Vec<SessionInfo>, OcError> {
        if self.is_v2() {
            return v2::rest::list_sessions(self);
        }
        let body = self.get("/experimental/session")?;
        let items = body
            .as_array()
            .ok_or_else(|| OcError::Decode("session list is not an array".into()))?;
        Ok(items
            .iter()
            .filter_map(|s| decode_session(s).ok())
            .collect())
    }

    pub fn get_session(&self, session_id: &str, directory: &str) -> Result<SessionInfo, OcError> {
        if self.is_v2() {
            return v2::rest::get_session(self, session_id);
        }
        let body = self.get(&session_path(session_id, "", directory))?;
        decode_session(&body).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// Busy or retrying sessions of one directory; absent ones are idle.
    pub fn session_status(&self, directory: &str) -> Result<HashMap<String, Status>, OcError> {
        if self.is_v2() {
            return v2::rest::session_status(self, directory);
        }
        let body = self.get(&with_directory("/session/status", directory))?;
        let map = body
            .as_object()
            .ok_or_else(|| OcError::Decode("session status is not an object".into()))?;
        Ok(map
            .iter()
            .map(|(id, status)| (id.clone(), decode_status(status)))
            .collect())
    }

    /// Sends the owner's text as-is; OpenCode runs the turn in the background.
    pub fn prompt(&self, session_id: &str, directory: &str, text: &str) -> Result<(), OcError> {
        let input = PromptInput {
            text: text.to_string(),
            ..PromptInput::default()
        };
        self.prompt_with(session_id, directory, &input)
    }

    /// Sends a prompt with attachments and an optional model and agent; OpenCode runs the turn in the
    /// background. `NotSent` means the prompt certainly did not arrive and may be sent again;
    /// `Unreachable` means it may have arrived, so resending could run it twice.
    pub fn prompt_with(
        &self,
        session_id: &str,
        directory: &str,
        input: &PromptInput,
    ) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::prompt(self, session_id, input);
        }
        self.send(
            "POST",
            &session_path(session_id, "/prompt_async", directory),
            Some(&prompt_body(input)),
        )
        .map(drop)
    }

    /// `POST /session`: a new session in `directory`.
    pub fn create_session(
        &self,
        directory: &str,
        title: Option<&str>,
    ) -> Result<SessionInfo, OcError> {
        if self.is_v2() {
            return v2::rest::create_session(self, directory, title);
        }
        let body = match title {
            Some(title) => json!({"title": title}),
            None => json!({}),
        };
        let answer = self.send("POST", &with_directory("/session", directory), Some(&body))?;
        decode_session(&answer).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// `PATCH /session/{id}`: a new title; the renamed session.
    pub fn rename(
        &self,
        session_id: &str,
        directory: &str,
        title: &str,
    ) -> Result<SessionInfo, OcError> {
        if self.is_v2() {
            return Err(v2::rest::unsupported("renaming a session"));
        }
        let body = json!({"title": title});
        let answer = self.send(
            "PATCH",
            &session_path(session_id, "", directory),
            Some(&body),
        )?;
        decode_session(&answer).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// `POST /session/{id}/abort`: stops the running turn; harmless when the session is idle.
    pub fn abort(&self, session_id: &str, directory: &str) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::interrupt(self, session_id);
        }
        self.send("POST", &session_path(session_id, "/abort", directory), None)
            .map(drop)
    }

    /// `POST /session/{id}/summarize`: compacts the conversation with `model`. Returns when done.
    pub fn summarize(
        &self,
        session_id: &str,
        directory: &str,
        model: &ModelRef,
    ) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::compact(self, session_id, model);
        }
        let body = json!({"providerID": model.provider_id, "modelID": model.model_id});
        self.send_with_timeout(
            "POST",
            &session_path(session_id, "/summarize", directory),
            Some(&body),
            SLOW_CALL,
        )
        .map(drop)
    }

    /// Pending permission requests of one directory.
    pub fn permissions(&self, directory: &str) -> Result<Vec<PermissionRequest>, OcError> {
        if self.is_v2() {
            return v2::rest::permissions(self, directory);
        }
        let body = self.get(&with_directory("/permission", directory))?;
        decode_list(&body, "permission list", |v| {
            decode_permission_request(v).ok()
        })
    }

    /// Answers a permission request. `message` only matters with `Reject`: the agent then gets it as
    /// feedback and carries on instead of stopping. `NotFound` when it was already answered.
    pub fn reply_permission(
        &self,
        request_id: &str,
        directory: &str,
        reply: PermissionReply,
        message: Option<&str>,
    ) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::reply_permission(self, request_id, directory, reply, message);
        }
        let mut body = json!({"reply": permission_reply_name(reply)});
        if let Some(message) = message.filter(|m| !m.trim().is_empty()) {
            body["message"] = json!(message);
        }
        let path = with_directory(
            &format!("/permission/{}/reply", percent_encode(request_id)),
            directory,
        );
        self.send("POST", &path, Some(&body))
            .map(drop)
            .map_err(not_found_is_request(request_id))
    }

    /// Pending questions of one directory.
    pub fn questions(&self, directory: &str) -> Result<Vec<QuestionRequest>, OcError> {
        if self.is_v2() {
            return v2::rest::questions(self, directory);
        }
        let body = self.get(&with_directory("/question", directory))?;
        decode_list(&body, "question list", |v| decode_question_request(v).ok())
    }

    /// Answers a question request: one list of chosen labels (or typed answers) per question, in order.
    pub fn reply_question(
        &self,
        request_id: &str,
        directory: &str,
        answers: &[Vec<String>],
    ) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::reply_question(self, request_id, directory, answers);
        }
        let body = json!({"answers": answers});
        let path = with_directory(
            &format!("/question/{}/reply", percent_encode(request_id)),
            directory,
        );
        self.send("POST", &path, Some(&body))
            .map(drop)
            .map_err(not_found_is_request(request_id))
    }

    /// Dismisses a question request; the question tool call fails and the turn stops.
    pub fn reject_question(&self, request_id: &str, directory: &str) -> Result<(), OcError> {
        if self.is_v2() {
            return v2::rest::reject_question(self, request_id, directory);
        }
        let path = with_directory(
            &format!("/question/{}/reject", percent_encode(request_id)),
            directory,
        );
        self.send("POST", &path, None)
            .map(drop)
            .map_err(not_found_is_request(request_id))
    }

    /// The session's todo list.
    pub fn todos(&self, session_id: &str, directory: &str) -> Result<Vec<Todo>, OcError> {
        if self.is_v2() {
            return Err(v2::rest::unsupported("the todo list"));
        }
        let body = self.get(&session_path(session_id, "/todo", directory))?;
        decode_list(&body, "todo list", |v| Some(decode_todo(v)))
    }

    /// The agents the server offers, hidden ones left out.
    pub fn agents(&self, directory: &str) -> Result<Vec<AgentChoice>, OcError> {
        if self.is_v2() {
            return v2::rest::agents(self, directory);
        }
        let body = self.get(&with_directory("/agent", directory))?;
        decode_list(&body, "agent list", decode_agent)
    }

    /// The models of the configured providers, each provider's default first.
    pub fn models(&self, directory: &str) -> Result<Vec<ModelChoice>, OcError> {
        if self.is_v2() {
            return v2::rest::models(self, directory);
        }
        let body = self.get(&with_directory("/config/providers", directory))?;
        super::decode::decode_models(&body).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// The uncommitted changes of the session's directory as one git-style unified diff (`--- a/…`,
    /// `+++ b/…`, 3 lines of context), empty when nothing changed. OpenCode 1.18.33 has no diff of a
    /// whole session: `GET /session/{id}/diff` answers `[]` without a `messageID`, and with one only
    /// that turn's changes. So this asks git, through `GET /vcs/diff?mode=git`, which also shows
    /// changes made outside the session; `session_id` is kept for when the server offers more.
    pub fn diff(&self, session_id: &str, directory: &str) -> Result<String, OcError> {
        if self.is_v2() {
            return Err(v2::rest::unsupported("the diff"));
        }
        let _ = session_id;
        let body = self.get(&format!(
            "{}&mode=git",
            with_directory("/vcs/diff", directory)
        ))?;
        super::decode::decode_session_diff(&body).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// A file of the session's directory, by a path relative to it (checked with
    /// `files::checked_relative_path` first), read by the server: the bridge may run on another
    /// host, and the server reads with its own rights. At most `max_bytes` of content: the answer's
    /// body is read with a limit, so a bigger file costs no more memory than the limit.
    ///
    /// OpenCode 1.18.33 answers text files with their trailing whitespace trimmed, binary ones
    /// base64-encoded (decoded here), a missing file as empty text (checked against the listing of
    /// its directory, so it becomes `NotFound`), and a path it will not read (a directory, a
    /// symbolic link leading outside the directory) with a bare 500.
    pub fn read_file(
        &self,
        directory: &str,
        relative_path: &str,
        max_bytes: u64,
    ) -> Result<FileRead, OcError> {
        if self.is_v2() {
            return v2::rest::read_file(self, directory, relative_path, max_bytes);
        }
        let mut path = with_directory("/file/content", directory);
        path.push_str(&format!("&path={}", percent_encode(relative_path)));
        // Base64 is 4/3 of the bytes; the rest of the JSON object is small.
        let body_limit = max_bytes.saturating_add(2) / 3 * 4 + 4096;
        let body = match self.get_limited(&path, body_limit) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(FileRead::TooLarge),
            Err(OcError::Http { status: 500, .. }) => {
                return Ok(match self.listed(directory, relative_path)? {
                    Some(Listed::Directory) => FileRead::Refused(Refusal::Directory),
                    _ => FileRead::Refused(Refusal::NotARegularFile),
                });
            }
            Err(e) => return Err(not_found_is_file(relative_path)(e)),
        };
        let content = super::decode::decode_file_content(&body, relative_path)
            .map_err(|e| OcError::Decode(e.to_string()))?;
        if content.bytes.len() as u64 > max_bytes {
            return Ok(FileRead::TooLarge);
        }
        if content.bytes.is_empty() && self.listed(directory, relative_path)? != Some(Listed::File)
        {
            return Err(OcError::NotFound(format!(
                "no file {relative_path} in {directory}; check the path (it is relative to the session's directory)"
            )));
        }
        Ok(FileRead::Content(content))
    }

    /// Whether `directory` exists on the server's host. Asked of the server, because the bridge may
    /// run elsewhere: listing a directory that does not exist (or is a file) fails with a 500.
    pub fn directory_exists(&self, directory: &str) -> Result<bool, OcError> {
        if self.is_v2() {
            return v2::rest::directory_exists(self, directory);
        }
        match self.get(&format!("{}&path=.", with_directory("/file", directory))) {
            Ok(_) => Ok(true),
            Err(OcError::Http { .. } | OcError::SessionNotFound(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// How the server's listing of the file's directory shows it; `None` when it is not there.
    /// Listings leave out symbolic links.
    fn listed(&self, directory: &str, relative_path: &str) -> Result<Option<Listed>, OcError> {
        let parent = match relative_path.rsplit_once('/') {
            Some((parent, _)) => parent,
            None => ".",
        };
        let mut path = with_directory("/file", directory);
        path.push_str(&format!("&path={}", percent_encode(parent)));
        let listing = match self.get(&path) {
            Ok(listing) => listing,
            // The parent directory does not exist either.
            Err(OcError::Http { .. }) => return Ok(None),
            Err(other) => return Err(other),
        };
        let entries = listing.as_array().map(Vec::as_slice).unwrap_or_default();
        // Directories are listed with a trailing slash: "sub/".
        Ok(entries.iter().find_map(|entry| {
            let path = entry.get("path").and_then(Value::as_str)?;
            match entry.get("type").and_then(Value::as_str)? {
                "file" if path == relative_path => Some(Listed::File),
                "directory" if path.trim_end_matches('/') == relative_path => {
                    Some(Listed::Directory)
                }
                _ => None,
            }
        }))
    }

    /// The last `limit` messages of a session, oldest first.
    pub fn messages(
        &self,
        session_id: &str,
        directory: &str,
        limit: usize,
    ) -> Result<Vec<(MessageInfo, Vec<Part>)>, OcError> {
        if self.is_v2() {
            return v2::rest::messages(self, session_id, limit);
        }
        let mut path = session_path(session_id, "/message", directory);
        path.push_str(&format!("&limit={limit}"));
        let body = self.get(&path)?;
        let items = body
            .as_array()
            .ok_or_else(|| OcError::Decode("message list is not an array".into()))?;
        let mut messages = Vec::with_capacity(items.len());
        for item in items {
            let Some(info) = item.get("info").and_then(|i| decode_message(i).ok()) else {
                continue;
            };
            let parts = item
                .get("parts")
                .and_then(Value::as_array)
                .map(|parts| parts.iter().filter_map(|p| decode_part(p).ok()).collect())
                .unwrap_or_default();
            messages.push((info, parts));
        }
        Ok(messages)
    }

    pub(super) fn get(&self, path: &str) -> Result<Value, OcError> {
        self.send("GET", path, None)
    }

    /// `get`, reading at most `limit` bytes of the body: `Ok(None)` when the body is longer.
    pub(super) fn get_limited(&self, path: &str, limit: u64) -> Result<Option<Value>, OcError> {
        let url = format!("{}{}", self.base, path);
        let mut response = self.with_auth_get(self.agent.get(&url)).call()?;
        let status = response.status().as_u16();
        let text = match response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_string()
        {
            Ok(text) => text,
            Err(ureq::Error::BodyExceedsLimit(_)) if (200..300).contains(&status) => {
                return Ok(None);
            }
            Err(e) => return Err(OcError::Unreachable(e.to_string())),
        };
        interpret(status, &text).map(Some)
    }

    /// A GET whose answer is raw bytes (v2's `/api/fs/read`): at most `limit` of them, `Ok(None)`
    /// when the body is longer; an error status is read as JSON like any other.
    pub(super) fn get_bytes_limited(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, OcError> {
        let url = format!("{}{}", self.base, path);
        let mut response = self.with_auth_get(self.agent.get(&url)).call()?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response
                .body_mut()
                .with_config()
                .limit(1024 * 1024)
                .read_to_string()
                .map_err(|e| OcError::Unreachable(e.to_string()))?;
            return interpret(status, &text).map(|_| None);
        }
        match response.body_mut().with_config().limit(limit).read_to_vec() {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ureq::Error::BodyExceedsLimit(_)) => Ok(None),
            Err(e) => Err(OcError::Unreachable(e.to_string())),
        }
    }

    pub(super) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, OcError> {
        let (status, text) = self.exchange(method, path, body, None)?;
        interpret(status, &text)
    }

    /// `send` for calls that take as long as a model turn.
    pub(super) fn send_with_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, OcError> {
        let (status, text) = self.exchange(method, path, body, Some(timeout))?;
        interpret(status, &text)
    }

    /// One request; the status and the body text.
    pub(super) fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<(u16, String), OcError> {
        let url = format!("{}{}", self.base, path);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut response = match method {
            "GET" => {
                let request = self.with_auth_get(self.agent.get(&url));
                match timeout {
                    Some(t) => request.config().timeout_global(Some(t)).build().call()?,
                    None => request.call()?,
                }
            }
            _ => {
                let request = match method {
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.post(&url),
                };
                let request = self
                    .with_auth_post(request)
                    .header("Content-Type", "application/json");
                match timeout {
                    Some(t) => request
                        .config()
                        .timeout_global(Some(t))
                        .build()
                        .send(bytes.as_bytes())?,
                    None => request.send(bytes.as_bytes())?,
                }
            }
        };
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| OcError::Unreachable(e.to_string()))?;
        Ok((status, text))
    }

    fn with_auth_get(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.authorization {
            Some(auth) => request.header("Authorization", auth),
            None => request,
        }
    }

    fn with_auth_post(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        match &self.authorization {
            Some(auth) => request.header("Authorization", auth),
            None => request,
        }
    }
}

pub(super) fn interpret(status: u16, text: &str) -> Result<Value, OcError> {
    match status {
        200..=299 if text.trim().is_empty() => Ok(Value::Null),
        200..=299 => serde_json::from_str(text).map_err(|e| OcError::Decode(e.to_string())),
        401 => Err(OcError::Unauthorized),
        404 => Err(OcError::SessionNotFound(error_message(text))),
        _ => Err(OcError::Http {
            status,
            message: error_message(text),
        }),
    }
}

/// Summarizing runs a whole model turn.
pub(super) const SLOW_CALL: Duration = Duration::from_secs(300);

fn prompt_body(input: &PromptInput) -> Value {
    let mut parts = Vec::with_capacity(1 + input.files.len());
    if !input.text.is_empty() || input.files.is_empty() {
        parts.push(json!({"type": "text", "text": input.text}));
    }
    for file in &input.files {
        parts.push(json!({
            "type": "file",
            "mime": file.mime,
            "filename": file.filename,
            "url": file.url,
        }));
    }
    let mut body = json!({ "parts": parts });
    if let Some(model) = &input.model {
        body["model"] = json!({"providerID": model.provider_id, "modelID": model.model_id});
    }
    if let Some(agent) = &input.agent {
        body["agent"] = json!(agent);
    }
    if let Some(id) = &input.message_id {
        body["messageID"] = json!(id);
    }
    body
}

pub(super) fn permission_reply_name(reply: PermissionReply) -> &'static str {
    match reply {
        PermissionReply::Once => "once",
        PermissionReply::Always => "always",
        PermissionReply::Reject => "reject",
    }
}

/// A 404 on a permission or question id means the request was already answered, not that the
/// session is gone.
pub(super) fn not_found_is_request(request_id: &str) -> impl Fn(OcError) -> OcError + '_ {
    move |error| match error {
        OcError::SessionNotFound(message) => OcError::NotFound(format!(
            "request {request_id} is no longer pending ({message}); it was answered or its turn ended"
        )),
        other => other,
    }
}

pub(super) fn not_found_is_file(relative_path: &str) -> impl Fn(OcError) -> OcError + '_ {
    move |error| match error {
        OcError::SessionNotFound(message) => {
            OcError::NotFound(format!("file {relative_path}: {message}"))
        }
        other => other,
    }
}

fn decode_list<T>(
    body: &Value,
    what: &str,
    decode: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, OcError> {
    let items = body
        .as_array()
        .ok_or_else(|| OcError::Decode(format!("{what} is not an array")))?;
    Ok(items.iter().filter_map(decode).collect())
}

fn session_path(session_id: &str, suffix: &str, directory: &str) -> String {
    with_directory(
        &format!("/session/{}{suffix}", percent_encode(session_id)),
        directory,
    )
}

fn with_directory(path: &str, directory: &str) -> String {
    if directory.is_empty() {
        format!("{path}?")
    } else {
        format!("{path}?directory={}", percent_encode(directory))
    }
}

/// OpenCode errors look like `{"name":"NotFoundError","data":{"message":"…"}}`.
pub(super) fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/data/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
        })
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(200).collect())
}
