//! Decoding of OpenCode's wire JSON (events, sessions, messages) into domain types.
//!
//! Decoding is tolerant: a missing optional field takes its default, an unknown event type becomes
//! `Event::Other`, and only JSON that is not an event at all is an error.

use serde_json::Value;

use super::{
    AgentChoice, Envelope, Event, FileContent, MessageInfo, ModelChoice, ModelRef, Part, PartBody,
    PermissionReply, PermissionRequest, Question, QuestionOption, QuestionRequest, Role,
    SessionInfo, Status, Todo, Tokens, ToolCall, ToolStatus,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed opencode event: {}", self.0)
    }
}

/// Decodes one `data:` payload of `GET /global/event`. `Ok(None)` for items that are not events
/// (the `sync` items that stream also carries).
pub fn decode_global_event(data: &str) -> Result<Option<Envelope>, DecodeError> {
    let value: Value =
        serde_json::from_str(data).map_err(|e| DecodeError(format!("not JSON ({e})")))?;
    let Some(payload) = value.get("payload") else {
        // `/event` sends the payload itself; accept it too.
        return decode_payload(&value).map(|event| {
            event.map(|event| Envelope {
                directory: Box::default(),
                event,
                seq: None,
            })
        });
    };
    let directory = str_at(&value, "directory");
    Ok(decode_payload(payload)?.map(|event| Envelope {
        directory: directory.into(),
        event,
        seq: None,
    }))
}

pub(super) fn decode_payload(payload: &Value) -> Result<Option<Event>, DecodeError> {
    let kind = payload
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError("no \"type\" field".into()))?;
    let empty = Value::Null;
    let props = payload.get("properties").unwrap_or(&empty);
    let session_id = || str_at(props, "sessionID");
    let required_session = || {
        let id = session_id();
        if id.is_empty() {
            Err(DecodeError(format!("{kind} without sessionID")))
        } else {
            Ok(id)
        }
    };
    let event = match kind {
        "sync" => return Ok(None),
        "server.connected" => Event::Connected,
        "server.heartbeat" => Event::Heartbeat,
        "session.created" | "session.updated" => {
            let info = props
                .get("info")
                .ok_or_else(|| DecodeError(format!("{kind} without info")))?;
            let info = decode_session(info)?;
            if kind == "session.created" {
                Event::SessionCreated(info)
            } else {
                Event::SessionUpdated(info)
            }
        }
        "session.deleted" => {
            let mut id = session_id();
            if id.is_empty() {
                id = props
                    .get("info")
                    .map(|i| str_at(i, "id"))
                    .unwrap_or_default();
            }
            if id.is_empty() {
                return Err(DecodeError("session.deleted without a session id".into()));
            }
            Event::SessionDeleted { session_id: id }
        }
        "session.status" => Event::SessionStatus {
            session_id: required_session()?,
            status: decode_status(props.get("status").unwrap_or(&empty)),
        },
        "session.idle" => Event::SessionIdle {
            session_id: required_session()?,
        },
        "session.error" => {
            let error = props.get("error").unwrap_or(&empty);
            let (name, message) = decode_error(error).unwrap_or_default();
            Event::SessionError {
                session_id: Some(session_id()).filter(|id| !id.is_empty()),
                name,
                message,
            }
        }
        "message.updated" => {
            let info = props
                .get("info")
                .ok_or_else(|| DecodeError("message.updated without info".into()))?;
            let message = decode_message(info)?;
            let mut id = session_id();
            if id.is_empty() {
                id = str_at(info, "sessionID");
            }
            Event::MessageUpdated {
                session_id: id,
                message,
            }
        }
        "message.removed" => Event::MessageRemoved {
            session_id: required_session()?,
            message_id: str_at(props, "messageID"),
        },
        "message.part.updated" => {
            let part = props
                .get("part")
                .ok_or_else(|| DecodeError("message.part.updated without part".into()))?;
            let mut id = session_id();
            if id.is_empty() {
                id = str_at(part, "sessionID");
            }
            Event::PartUpdated {
                session_id: id,
                part: decode_part(part)?,
            }
        }
        "message.part.delta" => Event::PartDelta {
            session_id: required_session()?,
            message_id: str_at(props, "messageID"),
            part_id: str_at(props, "partID"),
            field: str_at(props, "field"),
            delta: str_at(props, "delta"),
        },
        "message.part.removed" => Event::PartRemoved {
            session_id: required_session()?,
            part_id: str_at(props, "partID"),
        },
        "permission.asked" => Event::PermissionAsked(decode_permission_request(props)?),
        "permission.replied" => Event::PermissionReplied {
            session_id: required_session()?,
            request_id: required_request(props, kind)?,
            reply: match props.get("reply").and_then(Value::as_str) {
                Some("once") => PermissionReply::Once,
                Some("always") => PermissionReply::Always,
                Some("reject") => PermissionReply::Reject,
                other => return Err(DecodeError(format!("{kind} with reply {other:?}"))),
            },
        },
        "question.asked" => Event::QuestionAsked(decode_question_request(props)?),
        "question.replied" => Event::QuestionReplied {
            session_id: required_session()?,
            request_id: required_request(props, kind)?,
        },
        "question.rejected" => Event::QuestionRejected {
            session_id: required_session()?,
            request_id: required_request(props, kind)?,
        },
        "todo.updated" => Event::TodoUpdated {
            session_id: required_session()?,
            todos: props
                .get("todos")
                .and_then(Value::as_array)
                .ok_or_else(|| DecodeError(format!("{kind} without todos")))?
                .iter()
                .map(decode_todo)
                .collect(),
        },
        other => Event::Other {
            session_id: Some(session_id()).filter(|id| !id.is_empty()),
            kind: other.to_string(),
        },
    };
    if let Some(id) = event.session_id()
        && id.is_empty()
    {
        return Err(DecodeError(format!("{kind} without a session id")));
    }
    Ok(Some(event))
}

pub fn decode_session(info: &Value) -> Result<SessionInfo, DecodeError> {
    let id = str_at(info, "id");
    if id.is_empty() {
        return Err(DecodeError("session without id".into()));
    }
    let time = info.get("time");
    let project_name = info
        .get("project")
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_string);
    Ok(SessionInfo {
        id,
        slug: str_at(info, "slug"),
        title: str_at(info, "title"),
        directory: str_at(info, "directory"),
        project_name,
        parent_id: Some(str_at(info, "parentID")).filter(|p| !p.is_empty()),
        created_ms: time.map(|t| u64_at(t, "created")).unwrap_or(0),
        updated_ms: time.map(|t| u64_at(t, "updated")).unwrap_or(0),
    })
}

/// A permission request, from `permission.asked` or `GET /permission`.
pub fn decode_permission_request(value: &Value) -> Result<PermissionRequest, DecodeError> {
    let (id, session_id) = request_ids(value, "permission request")?;
    let metadata = string_fields(value, "metadata");
    Ok(PermissionRequest {
        id,
        session_id,
        permission: str_at(value, "permission"),
        patterns: strings_at(value, "patterns"),
        always: strings_at(value, "always"),
        metadata,
    })
}

/// A question request, from `question.asked` or `GET /question`.
pub fn decode_question_request(value: &Value) -> Result<QuestionRequest, DecodeError> {
    let (id, session_id) = request_ids(value, "question request")?;
    let questions = value
        .get("questions")
        .and_then(Value::as_array)
        .ok_or_else(|| DecodeError(format!("question request {id} without questions")))?
        .iter()
        .map(|q| Question {
            question: str_at(q, "question"),
            header: str_at(q, "header"),
            options: q
                .get("options")
                .and_then(Value::as_array)
                .map(|options| {
                    options
                        .iter()
                        .map(|o| QuestionOption {
                            label: str_at(o, "label"),
                            description: str_at(o, "description"),
                        })
                        .filter(|o| !o.label.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            multiple: q.get("multiple").and_then(Value::as_bool).unwrap_or(false),
            // OpenCode accepts a typed answer unless told otherwise.
            custom: q.get("custom").and_then(Value::as_bool).unwrap_or(true),
        })
        .collect();
    Ok(QuestionRequest {
        id,
        session_id,
        questions,
    })
}

pub fn decode_todo(value: &Value) -> Todo {
    Todo {
        id: str_at(value, "id"),
        content: str_at(value, "content"),
        status: str_at(value, "status"),
        priority: str_at(value, "priority"),
    }
}

/// One agent of `GET /agent`; `None` for hidden ones, which are OpenCode's internal helpers
/// (title, summary, compaction).
pub fn decode_agent(value: &Value) -> Option<AgentChoice> {
    let name = str_at(value, "name");
    if name.is_empty() || value.get("hidden").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(AgentChoice {
        name,
        description: str_at(value, "description"),
        mode: str_at(value, "mode"),
    })
}

/// `GET /config/providers`: `{"providers":[{"id","models":{id:{"id","name"}}}],"default":{provider:model}}`.
/// Providers in server order, each one's default model first, the rest by id.
pub fn decode_models(value: &Value) -> Result<Vec<ModelChoice>, DecodeError> {
    let providers = value
        .get("providers")
        .and_then(Value::as_array)
        .ok_or_else(|| DecodeError("provider list without providers".into()))?;
    let empty = Value::Null;
    let defaults = value.get("default").unwrap_or(&empty);
    let mut choices = Vec::new();
    for provider in providers {
        let provider_id = str_at(provider, "id");
        let Some(models) = provider.get("models").and_then(Value::as_object) else {
            continue;
        };
        if provider_id.is_empty() {
            continue;
        }
        let default = str_at(defaults, &provider_id);
        let mut these: Vec<ModelChoice> = models
            .iter()
            .map(|(key, model)| {
                let model_id = Some(str_at(model, "id"))
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| key.clone());
                ModelChoice {
                    is_default: model_id == default,
                    name: Some(str_at(model, "name"))
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| model_id.clone()),
                    model: ModelRef {
                        provider_id: provider_id.clone(),
                        model_id,
                    },
                }
            })
            .collect();
        these.sort_by(|a, b| {
            b.is_default
                .cmp(&a.is_default)
                .then_with(|| a.model.model_id.cmp(&b.model.model_id))
        });
        choices.extend(these);
    }
    Ok(choices)
}

/// `GET /vcs/diff` (and `GET /session/{id}/diff`): a list of `{"file","patch","additions",
/// "deletions","status"}`, where `patch` is already a unified diff of one file. Joined into one text.
pub fn decode_session_diff(value: &Value) -> Result<String, DecodeError> {
    let files = value
        .as_array()
        .ok_or_else(|| DecodeError("session diff is not an array".into()))?;
    let mut text = String::new();
    for file in files {
        let patch = str_at(file, "patch");
        if patch.is_empty() {
            continue;
        }
        text.push_str(&patch);
        if !patch.ends_with('\n') {
            text.push('\n');
        }
    }
    Ok(text)
}

/// `GET /file/content`: `{"type":"text"|"binary","content","encoding"?:"base64","mimeType"?}`.
pub fn decode_file_content(value: &Value, path: &str) -> Result<FileContent, DecodeError> {
    let content = value
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError(format!("file content of {path} without content")))?;
    let bytes = match value.get("encoding").and_then(Value::as_str) {
        Some("base64") => crate::files::base64_decode(content)
            .ok_or_else(|| DecodeError(format!("file content of {path}: invalid base64")))?,
        _ => content.as_bytes().to_vec(),
    };
    let mime = Some(str_at(value, "mimeType"))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| crate::files::mime_for(path, &bytes));
    Ok(FileContent { bytes, mime })
}

pub fn decode_status(status: &Value) -> Status {
    match status.get("type").and_then(Value::as_str) {
        Some("busy") => Status::Busy,
        Some("retry") => Status::Retry,
        _ => Status::Idle,
    }
}

pub fn decode_message(info: &Value) -> Result<MessageInfo, DecodeError> {
    let id = str_at(info, "id");
    if id.is_empty() {
        return Err(DecodeError("message without id".into()));
    }
    let role = match info.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        other => return Err(DecodeError(format!("message with role {other:?}"))),
    };
    let empty = Value::Null;
    let tokens = info.get("tokens").unwrap_or(&empty);
    let cache = tokens.get("cache").unwrap_or(&empty);
    let time = info.get("time").unwrap_or(&empty);
    let model = match (info.get("providerID"), info.get("modelID")) {
        (Some(Value::String(p)), Some(Value::String(m))) => Some(format!("{p}/{m}")),
        _ => None,
    };
    Ok(MessageInfo {
        id,
        role,
        created_ms: u64_at(time, "created"),
        completed_ms: time
            .get("completed")
            .and_then(Value::as_f64)
            .map(|t| t as u64),
        tokens: Tokens {
            input: u64_at(tokens, "input"),
            output: u64_at(tokens, "output"),
            reasoning: u64_at(tokens, "reasoning"),
            cache_read: u64_at(cache, "read"),
            cache_write: u64_at(cache, "write"),
        },
        cost: info.get("cost").and_then(Value::as_f64).unwrap_or(0.0),
        error: info.get("error").and_then(decode_error),
        model,
        // Assistant messages carry `mode` as an older name of `agent`.
        agent: ["agent", "mode"]
            .iter()
            .map(|key| str_at(info, key))
            .find(|name| !name.is_empty()),
        parent_id: Some(str_at(info, "parentID")).filter(|p| !p.is_empty()),
    })
}

pub fn decode_part(part: &Value) -> Result<Part, DecodeError> {
    let id = str_at(part, "id");
    if id.is_empty() {
        return Err(DecodeError("part without id".into()));
    }
    let kind = str_at(part, "type");
    let body = match kind.as_str() {
        "text" => {
            // Synthetic and ignored text is context OpenCode adds for the model, not an answer.
            let hidden = part.get("synthetic").and_then(Value::as_bool) == Some(true)
                || part.get("ignored").and_then(Value::as_bool) == Some(true);
            if hidden {
                PartBody::Other(kind)
            } else {
                PartBody::Text(str_at(part, "text"))
            }
        }
        "reasoning" => PartBody::Reasoning(str_at(part, "text")),
        "tool" => PartBody::Tool(decode_tool(part)),
        _ => PartBody::Other(kind),
    };
    Ok(Part {
        id,
        message_id: str_at(part, "messageID"),
        body,
    })
}

pub(super) fn decode_tool(part: &Value) -> ToolCall {
    let empty = Value::Null;
    let state = part.get("state").unwrap_or(&empty);
    let status = match state.get("status").and_then(Value::as_str) {
        Some("running") => ToolStatus::Running,
        Some("completed") => ToolStatus::Completed,
        Some("error") => ToolStatus::Error,
        _ => ToolStatus::Pending,
    };
    let tool = str_at(part, "tool");
    let time = state.get("time").unwrap_or(&empty);
    ToolCall {
        main_argument: main_argument(&tool, state.get("input").unwrap_or(&empty)),
        tool,
        status,
        title: str_at(state, "title"),
        error: str_at(state, "error"),
        started_ms: time.get("start").and_then(Value::as_f64).map(|t| t as u64),
        ended_ms: time.get("end").and_then(Value::as_f64).map(|t| t as u64),
    }
}

/// The input field that names what a tool call is about.
pub(super) fn main_argument(tool: &str, input: &Value) -> String {
    let preferred: &[&str] = match tool {
        "bash" => &["command"],
        "read" | "write" | "edit" | "patch" => &["filePath", "path"],
        "glob" | "grep" => &["pattern", "path"],
        "list" => &["path"],
        "webfetch" => &["url"],
        "task" => &["description", "prompt"],
        _ => &[],
    };
    let fallback = [
        "command",
        "filePath",
        "path",
        "pattern",
        "url",
        "query",
        "description",
    ];
    preferred
        .iter()
        .chain(fallback.iter())
        .find_map(|key| input.get(*key).and_then(Value::as_str))
        .or_else(|| input.as_object()?.values().find_map(Value::as_str))
        .unwrap_or_default()
        .to_string()
}

fn decode_error(error: &Value) -> Option<(String, String)> {
    let name = error.get("name").and_then(Value::as_str)?.to_string();
    let message = error
        .get("data")
        .and_then(|d| d.get("message"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Some((name, message))
}

fn request_ids(value: &Value, what: &str) -> Result<(String, String), DecodeError> {
    let id = str_at(value, "id");
    let session_id = str_at(value, "sessionID");
    if id.is_empty() || session_id.is_empty() {
        return Err(DecodeError(format!("{what} without id or sessionID")));
    }
    Ok((id, session_id))
}

fn required_request(props: &Value, kind: &str) -> Result<String, DecodeError> {
    let id = str_at(props, "requestID");
    if id.is_empty() {
        return Err(DecodeError(format!("{kind} without requestID")));
    }
    Ok(id)
}

/// The string-valued fields of the object at `key`, in wire order; others are skipped.
pub(super) fn string_fields(value: &Value, key: &str) -> Vec<(String, String)> {
    value
        .get(key)
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(key, v)| Some((key.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn strings_at(value: &Value, key: &str) -> Vec<String> {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn str_at(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

pub(super) fn u64_at(value: &Value, key: &str) -> u64 {
    value
        .get(key)
        .and_then(Value::as_f64)
        .filter(|n| *n >= 0.0)
        .map(|n| n as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(payload: &str) -> Event {
        decode_global_event(payload)
            .expect("decodes")
            .expect("is an event")
            .event
    }

    /// Recorded from a real OpenCode 1.18.33 (`tests/fixtures/opencode-1.18.33/f-permission-ask.sse`).
    #[test]
    fn recorded_permission_events_decode() {
        let fixture = include_str!("../../tests/fixtures/opencode-1.18.33/f-permission-ask.sse");
        let events: Vec<Event> = fixture
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| decode_global_event(data).expect("fixture decodes"))
            .map(|envelope| envelope.event)
            .collect();
        let asked = events
            .iter()
            .find_map(|e| match e {
                Event::PermissionAsked(request) => Some(request.clone()),
                _ => None,
            })
            .expect("a permission.asked event");
        assert!(asked.id.starts_with("per_"), "{asked:?}");
        assert!(asked.session_id.starts_with("ses_"), "{asked:?}");
        assert_eq!(asked.permission, "bash");
        assert!(!asked.patterns.is_empty() && !asked.always.is_empty());
        assert!(asked.metadata.iter().any(|(k, _)| k == "command"));
        let replied = events.iter().find_map(|e| match e {
            Event::PermissionReplied {
                session_id,
                request_id,
                reply,
            } => Some((session_id.clone(), request_id.clone(), *reply)),
            _ => None,
        });
        let (session_id, request_id, _) = replied.expect("a permission.replied event");
        assert_eq!((session_id, request_id), (asked.session_id, asked.id));
    }

    #[test]
    fn permission_events_decode() {
        let asked = event(
            r#"{"directory":"/p","payload":{"type":"permission.asked","properties":{"id":"per_1","sessionID":"ses_1","permission":"bash","patterns":["echo hi"],"metadata":{"command":"echo hi","timeout":5},"always":["echo *"],"tool":{"messageID":"msg_1","callID":"c1"}}}}"#,
        );
        assert_eq!(
            asked,
            Event::PermissionAsked(PermissionRequest {
                id: "per_1".into(),
                session_id: "ses_1".into(),
                permission: "bash".into(),
                patterns: vec!["echo hi".into()],
                always: vec!["echo *".into()],
                metadata: vec![("command".into(), "echo hi".into())],
            })
        );
        for (wire, reply) in [
            ("once", PermissionReply::Once),
            ("always", PermissionReply::Always),
            ("reject", PermissionReply::Reject),
        ] {
            let replied = event(&format!(
                r#"{{"payload":{{"type":"permission.replied","properties":{{"sessionID":"ses_1","requestID":"per_1","reply":"{wire}"}}}}}}"#
            ));
            assert_eq!(
                replied,
                Event::PermissionReplied {
                    session_id: "ses_1".into(),
                    request_id: "per_1".into(),
                    reply
                }
            );
        }
    }

    #[test]
    fn question_events_decode_with_opencode_defaults() {
        let asked = event(
            r#"{"payload":{"type":"question.asked","properties":{"id":"que_1","sessionID":"ses_1","questions":[{"question":"Which?","header":"Pick","options":[{"label":"A","description":"first"},{"label":"B","description":"second"}],"multiple":true,"custom":false},{"question":"Free?","header":"Free","options":[]}]}}}"#,
        );
        let Event::QuestionAsked(request) = asked else {
            panic!("not a question: {asked:?}");
        };
        assert_eq!(
            (request.id.as_str(), request.session_id.as_str()),
            ("que_1", "ses_1")
        );
        assert_eq!(request.questions.len(), 2);
        let first = &request.questions[0];
        assert_eq!(
            (first.question.as_str(), first.header.as_str()),
            ("Which?", "Pick")
        );
        assert_eq!(first.options[1].label, "B");
        assert_eq!(first.options[1].description, "second");
        assert!(first.multiple && !first.custom);
        assert!(!request.questions[1].multiple && request.questions[1].custom);

        let replied = event(
            r#"{"payload":{"type":"question.replied","properties":{"sessionID":"ses_1","requestID":"que_1","answers":[["A"]]}}}"#,
        );
        assert_eq!(
            replied,
            Event::QuestionReplied {
                session_id: "ses_1".into(),
                request_id: "que_1".into()
            }
        );
        let rejected = event(
            r#"{"payload":{"type":"question.rejected","properties":{"sessionID":"ses_1","requestID":"que_1"}}}"#,
        );
        assert_eq!(
            rejected,
            Event::QuestionRejected {
                session_id: "ses_1".into(),
                request_id: "que_1".into()
            }
        );
    }

    #[test]
    fn todo_updates_decode() {
        let updated = event(
            r#"{"payload":{"type":"todo.updated","properties":{"sessionID":"ses_1","todos":[{"content":"write","status":"in_progress","priority":"high"},{"content":"ship","status":"pending","priority":"low","id":"t2"}]}}}"#,
        );
        assert_eq!(
            updated,
            Event::TodoUpdated {
                session_id: "ses_1".into(),
                todos: vec![
                    Todo {
                        id: String::new(),
                        content: "write".into(),
                        status: "in_progress".into(),
                        priority: "high".into()
                    },
                    Todo {
                        id: "t2".into(),
                        content: "ship".into(),
                        status: "pending".into(),
                        priority: "low".into()
                    },
                ],
            }
        );
    }

    #[test]
    fn malformed_control_events_are_errors_not_panics() {
        let malformed = [
            r#"{"payload":{"type":"permission.asked","properties":{"sessionID":"ses_1"}}}"#,
            r#"{"payload":{"type":"permission.asked","properties":"nope"}}"#,
            r#"{"payload":{"type":"permission.replied","properties":{"sessionID":"ses_1","requestID":"per_1","reply":"maybe"}}}"#,
            r#"{"payload":{"type":"permission.replied","properties":{"sessionID":"ses_1","reply":"once"}}}"#,
            r#"{"payload":{"type":"question.asked","properties":{"id":"que_1","sessionID":"ses_1"}}}"#,
            r#"{"payload":{"type":"question.asked","properties":{"id":"que_1","questions":[]}}}"#,
            r#"{"payload":{"type":"question.replied","properties":{"requestID":"que_1"}}}"#,
            r#"{"payload":{"type":"question.rejected","properties":{"sessionID":"ses_1"}}}"#,
            r#"{"payload":{"type":"todo.updated","properties":{"sessionID":"ses_1","todos":{}}}}"#,
            r#"{"payload":{"type":"todo.updated","properties":{"todos":[]}}}"#,
        ];
        for data in malformed {
            assert!(decode_global_event(data).is_err(), "{data}");
        }
        // Odd but harmless values inside a well-formed request are dropped, not fatal.
        let asked = event(
            r#"{"payload":{"type":"question.asked","properties":{"id":"que_1","sessionID":"ses_1","questions":[{"question":7,"options":[{"label":""},{"label":"ok"},3]}]}}}"#,
        );
        let Event::QuestionAsked(request) = asked else {
            panic!("{asked:?}");
        };
        assert_eq!(request.questions[0].question, "");
        assert_eq!(request.questions[0].options.len(), 1);
    }

    #[test]
    fn message_agent_comes_from_agent_or_mode() {
        let user = json!({"id":"msg_1","role":"user","agent":"plan","time":{"created":1}});
        assert_eq!(
            decode_message(&user).unwrap().agent.as_deref(),
            Some("plan")
        );
        let old = json!({"id":"msg_2","role":"assistant","mode":"build","time":{"created":1}});
        assert_eq!(
            decode_message(&old).unwrap().agent.as_deref(),
            Some("build")
        );
        let none = json!({"id":"msg_3","role":"assistant","time":{"created":1}});
        assert_eq!(decode_message(&none).unwrap().agent, None);
    }

    #[test]
    fn models_list_defaults_first_and_agents_skip_hidden() {
        let providers = json!({
            "providers": [{"id": "fake", "models": {
                "b-model": {"id": "b-model", "name": "B"},
                "a-model": {"id": "a-model", "name": "A"},
                "z-default": {"id": "z-default", "name": "Z"},
            }}, {"id": "", "models": {}}],
            "default": {"fake": "z-default"},
        });
        let ids: Vec<(String, bool)> = decode_models(&providers)
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    format!("{}/{}", m.model.provider_id, m.model.model_id),
                    m.is_default,
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("fake/z-default".to_string(), true),
                ("fake/a-model".to_string(), false),
                ("fake/b-model".to_string(), false),
            ]
        );
        assert!(decode_models(&json!([])).is_err());
        assert!(
            decode_agent(&json!({"name": "title", "mode": "primary", "hidden": true})).is_none()
        );
        assert_eq!(
            decode_agent(&json!({"name": "plan", "mode": "primary", "description": "Plan"})),
            Some(AgentChoice {
                name: "plan".into(),
                description: "Plan".into(),
                mode: "primary".into()
            })
        );
    }

    #[test]
    fn file_content_and_diff_decode() {
        let text = decode_file_content(&json!({"type": "text", "content": "hi"}), "a.rs").unwrap();
        assert_eq!(
            (text.bytes.as_slice(), text.mime.as_str()),
            (&b"hi"[..], "text/plain")
        );
        let binary = decode_file_content(
            &json!({"type": "binary", "content": "iVBORw0KGgo=", "encoding": "base64", "mimeType": "image/png"}),
            "p.png",
        )
        .unwrap();
        assert_eq!(binary.bytes, b"\x89PNG\r\n\x1a\n");
        assert_eq!(binary.mime, "image/png");
        assert!(
            decode_file_content(
                &json!({"type":"binary","content":"!!","encoding":"base64"}),
                "x"
            )
            .is_err()
        );
        assert!(decode_file_content(&json!({}), "x").is_err());

        let diff = decode_session_diff(&json!([
            {"file": "a", "patch": "--- a/a\n+++ b/a\n@@ -1 +1 @@\n-x\n+y\n"},
            {"file": "b", "patch": "--- a/b\n+++ b/b\n@@ -1 +1 @@\n-p\n+q"},
            {"file": "c", "additions": 0, "deletions": 0},
        ]))
        .unwrap();
        assert_eq!(
            diff,
            "--- a/a\n+++ b/a\n@@ -1 +1 @@\n-x\n+y\n--- a/b\n+++ b/b\n@@ -1 +1 @@\n-p\n+q\n"
        );
        assert_eq!(decode_session_diff(&json!([])).unwrap(), "");
        assert!(decode_session_diff(&json!({})).is_err());
    }
}
