//! The OpenCode REST client: one value per server, holding its base URL, credentials and agent.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::decode::{decode_message, decode_part, decode_session, decode_status};
use super::{MessageInfo, Part, ServerKey, SessionInfo, Status};
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
    /// Wrong OPENCODE_SERVER_USERNAME/PASSWORD: retrying will not help.
    Unauthorized,
    /// Any other refusal, with the server's message.
    Http { status: u16, message: String },
    /// The server answered something this client cannot read.
    Decode(String),
}

impl std::fmt::Display for OcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OcError::NotSent(e) | OcError::Unreachable(e) => write!(f, "opencode unreachable: {e}"),
            OcError::SessionNotFound(m) => write!(f, "session not found: {m}"),
            OcError::Unauthorized => write!(
                f,
                "opencode rejected the credentials (401); check OPENCODE_SERVER_USERNAME and OPENCODE_SERVER_PASSWORD"
            ),
            OcError::Http { status, message } => write!(f, "opencode answered {status}: {message}"),
            OcError::Decode(e) => write!(f, "unexpected answer from opencode: {e}"),
        }
    }
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
    base: String,
    authorization: Option<String>,
    agent: ureq::Agent,
    tls: http::Tls,
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
            base: base_url.to_string(),
            authorization: password.map(|p| http::basic_auth(username, p.expose())),
            agent: http::agent_with_tls(Duration::from_secs(30), tls),
            tls: tls.clone(),
        }
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

    /// `GET /global/health`: the server's version.
    pub fn health(&self) -> Result<String, OcError> {
        let body = self.get("/global/health")?;
        Ok(body
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Every session on the server, across all projects and directories.
    pub fn list_sessions(&self) -> Result<Vec<SessionInfo>, OcError> {
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
        let body = self.get(&session_path(session_id, "", directory))?;
        decode_session(&body).map_err(|e| OcError::Decode(e.to_string()))
    }

    /// Busy or retrying sessions of one directory; absent ones are idle.
    pub fn session_status(&self, directory: &str) -> Result<HashMap<String, Status>, OcError> {
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
        let body = json!({"parts": [{"type": "text", "text": text}]});
        self.send(
            "POST",
            &session_path(session_id, "/prompt_async", directory),
            Some(&body),
        )
        .map(drop)
    }

    /// The last `limit` messages of a session, oldest first.
    pub fn messages(
        &self,
        session_id: &str,
        directory: &str,
        limit: usize,
    ) -> Result<Vec<(MessageInfo, Vec<Part>)>, OcError> {
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

    fn get(&self, path: &str) -> Result<Value, OcError> {
        self.send("GET", path, None)
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, OcError> {
        let url = format!("{}{}", self.base, path);
        let mut response = match (method, body) {
            ("GET", _) => self.with_auth_get(self.agent.get(&url)).call()?,
            (_, body) => {
                let bytes = body.map(|b| b.to_string()).unwrap_or_default();
                self.with_auth_post(self.agent.post(&url))
                    .header("Content-Type", "application/json")
                    .send(bytes.as_bytes())?
            }
        };
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| OcError::Unreachable(e.to_string()))?;
        match status {
            200..=299 if text.trim().is_empty() => Ok(Value::Null),
            200..=299 => serde_json::from_str(&text).map_err(|e| OcError::Decode(e.to_string())),
            401 => Err(OcError::Unauthorized),
            404 => Err(OcError::SessionNotFound(error_message(&text))),
            _ => Err(OcError::Http {
                status,
                message: error_message(&text),
            }),
        }
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
fn error_message(body: &str) -> String {
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
