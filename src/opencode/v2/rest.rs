//! The domain operations over `/api/*`. Answers are wrapped in `{"data": …}`; errors carry `_tag` and
//! `message`. Routes that take a directory use the `location[directory]` query (deepObject).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::decode::{decode_context, decode_v2_permission, decode_v2_question, decode_v2_session};
use crate::http::percent_encode;
use crate::opencode::rest::{
    FileRead, OcError, OpenCodeClient, Refusal, not_found_is_file, not_found_is_request,
    permission_reply_name,
};
use crate::opencode::{
    AgentChoice, Delivery, FileContent, MessageInfo, ModelChoice, ModelRef, Part, PermissionReply,
    PermissionRequest, PromptInput, QuestionRequest, SessionInfo, Status,
};

/// Sessions asked for per page of `GET /api/session`, and the most pages read.
const SESSION_PAGE: usize = 100;
const MAX_SESSION_PAGES: usize = 50;
/// `GET /api/session/{id}/history` refuses a larger `limit`.
pub const HISTORY_PAGE: usize = 100;

/// What an operation v2 lacks says, in the thread and the log.
pub fn unsupported(what: &str) -> OcError {
    OcError::Unsupported(format!(
        "{what} is not available on an OpenCode v2 server: its /api routes have no such operation"
    ))
}

/// `GET /api/health` → `{"healthy":true}`.
pub fn health(client: &OpenCodeClient) -> Result<(), OcError> {
    let body = client.get("/api/health")?;
    match body.get("healthy").and_then(Value::as_bool) {
        Some(true) => Ok(()),
        _ => Err(OcError::Decode(format!("/api/health answered {body}"))),
    }
}

pub fn list_sessions(client: &OpenCodeClient) -> Result<Vec<SessionInfo>, OcError> {
    let mut sessions = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_SESSION_PAGES {
        let mut path = format!("/api/session?limit={SESSION_PAGE}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={}", percent_encode(cursor)));
        }
        let body = client.get(&path)?;
        let items = data(&body)?
            .as_array()
            .ok_or_else(|| OcError::Decode("session list is not an array".into()))?;
        sessions.extend(items.iter().filter_map(|s| decode_v2_session(s).ok()));
        let next = body
            .pointer("/cursor/next")
            .and_then(Value::as_str)
            .map(str::to_string);
        match next {
            Some(next) if items.len() == SESSION_PAGE => cursor = Some(next),
            _ => break,
        }
    }
    Ok(sessions)
}

pub fn get_session(client: &OpenCodeClient, session_id: &str) -> Result<SessionInfo, OcError> {
    let body = client.get(&session_path(session_id, ""))?;
    decode_v2_session(data(&body)?).map_err(|e| OcError::Decode(e.to_string()))
}

/// `GET /api/session/active`: running sessions of every directory; `directory` is not needed, and
/// every other session is idle. A v1 turn on a 1.x server does not show here.
pub fn session_status(
    client: &OpenCodeClient,
    directory: &str,
) -> Result<HashMap<String, Status>, OcError> {
    let _ = directory;
    let body = client.get("/api/session/active")?;
    let map = data(&body)?
        .as_object()
        .ok_or_else(|| OcError::Decode("active sessions is not an object".into()))?;
    Ok(map.keys().map(|id| (id.clone(), Status::Busy)).collect())
}

/// `POST /api/session/{id}/prompt`, with the bridge's own message id and an explicit delivery (the
/// server's default is `steer`). A model or agent choice is made on the session first: v2 prompts
/// carry neither, the session remembers them.
pub fn prompt(
    client: &OpenCodeClient,
    session_id: &str,
    input: &PromptInput,
) -> Result<(), OcError> {
    if let Some(model) = &input.model {
        switch_model(client, session_id, model)?;
    }
    if let Some(agent) = &input.agent {
        switch_agent(client, session_id, agent)?;
    }
    client
        .send(
            "POST",
            &session_path(session_id, "/prompt"),
            Some(&prompt_body(input)),
        )
        .map(drop)
}

pub fn prompt_body(input: &PromptInput) -> Value {
    let mut text = input.text.clone();
    let mut files = Vec::new();
    for file in &input.files {
        // A text file as a v2 file entry fails the turn on 1.18.33 ("does not support media type
        // text/plain"), so text travels inline.
        match inline_text(file) {
            Some(content) => {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(&format!("{}:\n```\n{content}\n```", file.filename));
            }
            None => files.push(json!({"uri": file.url, "name": file.filename})),
        }
    }
    let mut prompt = json!({ "text": text });
    if !files.is_empty() {
        prompt["files"] = json!(files);
    }
    let delivery = match input.delivery {
        Delivery::Queue => "queue",
        Delivery::Steer => "steer",
    };
    let mut body = json!({"prompt": prompt, "delivery": delivery});
    if let Some(id) = &input.message_id {
        body["id"] = json!(id);
    }
    body
}

fn inline_text(file: &crate::files::FileAttachment) -> Option<String> {
    if !file.mime.starts_with("text/") {
        return None;
    }
    let encoded = file.url.split_once(";base64,")?.1;
    String::from_utf8(crate::files::base64_decode(encoded)?).ok()
}

pub fn switch_model(
    client: &OpenCodeClient,
    session_id: &str,
    model: &ModelRef,
) -> Result<(), OcError> {
    let body = json!({"model": {"providerID": model.provider_id, "id": model.model_id}});
    client
        .send("POST", &session_path(session_id, "/model"), Some(&body))
        .map(drop)
}

pub fn switch_agent(client: &OpenCodeClient, session_id: &str, agent: &str) -> Result<(), OcError> {
    client
        .send(
            "POST",
            &session_path(session_id, "/agent"),
            Some(&json!({"agent": agent})),
        )
        .map(drop)
}

/// `POST /api/session`; v2 takes no title, so `title` is not set (the server names the session).
pub fn create_session(
    client: &OpenCodeClient,
    directory: &str,
    title: Option<&str>,
) -> Result<SessionInfo, OcError> {
    if title.is_some() {
        crate::debug!("a v2 session is created without the title asked for: v2 has no title");
    }
    let body = json!({"location": {"directory": directory}});
    let answer = client.send("POST", "/api/session", Some(&body))?;
    decode_v2_session(data(&answer)?).map_err(|e| OcError::Decode(e.to_string()))
}

/// `POST /api/session/{id}/interrupt`: stops the running turn (v1's abort does not stop a v2 turn).
pub fn interrupt(client: &OpenCodeClient, session_id: &str) -> Result<(), OcError> {
    client
        .send("POST", &session_path(session_id, "/interrupt"), None)
        .map(drop)
}

/// `POST /api/session/{id}/compact`: the session's own model compacts; `model` is not sent (v2 takes
/// none).
pub fn compact(client: &OpenCodeClient, session_id: &str, model: &ModelRef) -> Result<(), OcError> {
    let _ = model;
    client
        .send_with_timeout(
            "POST",
            &session_path(session_id, "/compact"),
            None,
            crate::opencode::rest::SLOW_CALL,
        )
        .map(drop)
}

pub fn permissions(
    client: &OpenCodeClient,
    directory: &str,
) -> Result<Vec<PermissionRequest>, OcError> {
    let body = client.get(&with_location("/api/permission/request", directory))?;
    list(&body, "permission list", |v| decode_v2_permission(v).ok())
}

pub fn questions(
    client: &OpenCodeClient,
    directory: &str,
) -> Result<Vec<QuestionRequest>, OcError> {
    let body = client.get(&with_location("/api/question/request", directory))?;
    list(&body, "question list", |v| decode_v2_question(v).ok())
}

/// v2 replies go to `/api/session/{sid}/permission/{rid}/reply`; the domain call names only the
/// request, so its session comes from the pending list. The contract takes a `message`; 1.18.33
/// accepts it (a rejection with one lets the turn go on) but does not show it to the model, so the
/// worker also steers it into the turn.
pub fn reply_permission(
    client: &OpenCodeClient,
    request_id: &str,
    directory: &str,
    reply: PermissionReply,
    message: Option<&str>,
) -> Result<(), OcError> {
    let session_id = permissions(client, directory)?
        .into_iter()
        .find(|p| p.id == request_id)
        .map(|p| p.session_id)
        .ok_or_else(|| no_longer_pending(request_id))?;
    let path = format!(
        "{}/{}/reply",
        session_path(&session_id, "/permission"),
        percent_encode(request_id)
    );
    let body = permission_reply_body(reply, message);
    client
        .send("POST", &path, Some(&body))
        .map(drop)
        .map_err(not_found_is_request(request_id))
}

pub fn permission_reply_body(reply: PermissionReply, message: Option<&str>) -> Value {
    let mut body = json!({"reply": permission_reply_name(reply)});
    if let Some(message) = message.map(str::trim).filter(|m| !m.is_empty()) {
        body["message"] = json!(message);
    }
    body
}

pub fn reply_question(
    client: &OpenCodeClient,
    request_id: &str,
    directory: &str,
    answers: &[Vec<String>],
) -> Result<(), OcError> {
    let path = question_path(client, request_id, directory, "reply")?;
    client
        .send("POST", &path, Some(&json!({"answers": answers})))
        .map(drop)
        .map_err(not_found_is_request(request_id))
}

pub fn reject_question(
    client: &OpenCodeClient,
    request_id: &str,
    directory: &str,
) -> Result<(), OcError> {
    let path = question_path(client, request_id, directory, "reject")?;
    client
        .send("POST", &path, None)
        .map(drop)
        .map_err(not_found_is_request(request_id))
}

fn question_path(
    client: &OpenCodeClient,
    request_id: &str,
    directory: &str,
    action: &str,
) -> Result<String, OcError> {
    let session_id = questions(client, directory)?
        .into_iter()
        .find(|q| q.id == request_id)
        .map(|q| q.session_id)
        .ok_or_else(|| no_longer_pending(request_id))?;
    Ok(format!(
        "{}/{}/{action}",
        session_path(&session_id, "/question"),
        percent_encode(request_id)
    ))
}

fn no_longer_pending(request_id: &str) -> OcError {
    OcError::NotFound(format!(
        "request {request_id} is no longer pending; it was answered or its turn ended"
    ))
}

/// `GET /api/agent`: `{"id","mode","hidden",…}`; hidden ones left out.
pub fn agents(client: &OpenCodeClient, directory: &str) -> Result<Vec<AgentChoice>, OcError> {
    let body = client.get(&with_location("/api/agent", directory))?;
    list(&body, "agent list", |v| {
        let name = v.get("id").and_then(Value::as_str)?.to_string();
        if v.get("hidden").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        Some(AgentChoice {
            name,
            description: str_of(v, "description"),
            mode: str_of(v, "mode"),
        })
    })
}

/// `GET /api/model`: enabled models, by provider then id (v2 marks no default).
pub fn models(client: &OpenCodeClient, directory: &str) -> Result<Vec<ModelChoice>, OcError> {
    let body = client.get(&with_location("/api/model", directory))?;
    let mut choices = list(&body, "model list", |v| {
        if v.get("enabled").and_then(Value::as_bool) == Some(false) {
            return None;
        }
        let model_id = str_of(v, "id");
        let provider_id = str_of(v, "providerID");
        if model_id.is_empty() || provider_id.is_empty() {
            return None;
        }
        Some(ModelChoice {
            name: Some(str_of(v, "name"))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| model_id.clone()),
            model: ModelRef {
                provider_id,
                model_id,
            },
            is_default: false,
        })
    })?;
    choices.sort_by(|a, b| a.model.provider_id.cmp(&b.model.provider_id));
    Ok(choices)
}

/// `GET /api/fs/read/{path}`: the raw bytes. A missing file and a directory both answer 500 on
/// 1.18.33, told apart by the listing of the parent directory (`GET /api/fs/list`).
pub fn read_file(
    client: &OpenCodeClient,
    directory: &str,
    relative_path: &str,
    max_bytes: u64,
) -> Result<FileRead, OcError> {
    let encoded: Vec<String> = relative_path.split('/').map(percent_encode).collect();
    let path = with_location(&format!("/api/fs/read/{}", encoded.join("/")), directory);
    match client.get_bytes_limited(&path, max_bytes) {
        Ok(Some(bytes)) => {
            let mime = crate::files::mime_for(relative_path, &bytes);
            Ok(FileRead::Content(FileContent { bytes, mime }))
        }
        Ok(None) => Ok(FileRead::TooLarge),
        Err(OcError::Http { .. } | OcError::SessionNotFound(_)) => {
            match listed(client, directory, relative_path)? {
                Some(true) => Ok(FileRead::Refused(Refusal::Directory)),
                Some(false) => Ok(FileRead::Refused(Refusal::NotARegularFile)),
                None => Err(OcError::NotFound(format!(
                    "no file {relative_path} in {directory}; check the path (it is relative to the session's directory)"
                ))),
            }
        }
        Err(e) => Err(not_found_is_file(relative_path)(e)),
    }
}

/// `Some(is_directory)` when the parent's listing shows the path.
fn listed(
    client: &OpenCodeClient,
    directory: &str,
    relative_path: &str,
) -> Result<Option<bool>, OcError> {
    let parent = relative_path.rsplit_once('/').map_or(".", |(p, _)| p);
    let path = format!(
        "{}&path={}",
        with_location("/api/fs/list", directory),
        percent_encode(parent)
    );
    let body = match client.get(&path) {
        Ok(body) => body,
        Err(OcError::Http { .. } | OcError::SessionNotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let entries = data(&body)?
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    Ok(entries.iter().find_map(|entry| {
        let path = entry.get("path").and_then(Value::as_str)?;
        match entry.get("type").and_then(Value::as_str)? {
            "file" if path == relative_path => Some(false),
            "directory" if path.trim_end_matches('/') == relative_path => Some(true),
            _ => None,
        }
    }))
}

pub fn directory_exists(client: &OpenCodeClient, directory: &str) -> Result<bool, OcError> {
    match client.get(&format!(
        "{}&path=.",
        with_location("/api/fs/list", directory)
    )) {
        Ok(_) => Ok(true),
        Err(OcError::Http { .. } | OcError::SessionNotFound(_)) => Ok(false),
        Err(other) => Err(other),
    }
}

/// `GET /api/session/{id}/context`, as v1-shaped messages: the last `limit`, oldest first.
pub fn messages(
    client: &OpenCodeClient,
    session_id: &str,
    limit: usize,
) -> Result<Vec<(MessageInfo, Vec<Part>)>, OcError> {
    let body = client.get(&session_path(session_id, "/context"))?;
    let mut messages = decode_context(data(&body)?).map_err(|e| OcError::Decode(e.to_string()))?;
    let excess = messages.len().saturating_sub(limit);
    messages.drain(..excess);
    Ok(messages)
}

/// `GET /api/session/{id}/history?after=SEQ&limit=100`: one page of the durable log, and whether
/// more follows.
pub fn history(
    client: &OpenCodeClient,
    session_id: &str,
    after: u64,
) -> Result<(Vec<Value>, bool), OcError> {
    let path = format!(
        "{}?after={after}&limit={HISTORY_PAGE}",
        session_path(session_id, "/history")
    );
    let body = client.get(&path)?;
    let items = data(&body)?
        .as_array()
        .cloned()
        .ok_or_else(|| OcError::Decode("session history is not an array".into()))?;
    let more = body
        .get("hasMore")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((items, more))
}

/// Most pages of the durable log read at once (10 000 events); the rest waits for the next read.
const MAX_HISTORY_PAGES: usize = 100;

/// The session's durable log after `after`, oldest first, page by page.
pub fn read_log(
    client: &OpenCodeClient,
    session_id: &str,
    after: u64,
) -> Result<Vec<Value>, OcError> {
    let mut items = Vec::new();
    let mut position = after;
    for _ in 0..MAX_HISTORY_PAGES {
        let (page, more) = history(client, session_id, position)?;
        let last = page
            .iter()
            .filter_map(|item| item.pointer("/durable/seq").and_then(Value::as_u64))
            .max();
        items.extend(page);
        match last {
            Some(last) if more && last > position => position = last,
            _ => break,
        }
    }
    Ok(items)
}

/// The answer's `data`.
fn data(body: &Value) -> Result<&Value, OcError> {
    body.get("data")
        .ok_or_else(|| OcError::Decode("answer without \"data\"".into()))
}

fn list<T>(
    body: &Value,
    what: &str,
    decode: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, OcError> {
    let items = data(body)?
        .as_array()
        .ok_or_else(|| OcError::Decode(format!("{what} is not an array")))?;
    Ok(items.iter().filter_map(decode).collect())
}

fn str_of(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn session_path(session_id: &str, suffix: &str) -> String {
    format!("/api/session/{}{suffix}", percent_encode(session_id))
}

/// `path?location[directory]=…`; ends ready for `&more`.
fn with_location(path: &str, directory: &str) -> String {
    if directory.is_empty() {
        format!("{path}?")
    } else {
        format!(
            "{path}?location%5Bdirectory%5D={}",
            percent_encode(directory)
        )
    }
}
