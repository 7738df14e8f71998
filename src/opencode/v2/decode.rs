//! Decoding of v2 wire JSON into the domain types v1 also decodes to, so the worker and the turn logic
//! need not know the dialect.
//!
//! A v2 turn is told as `session.next.*` events: `prompted` (the user message), `step.started` …
//! `step.ended` (one assistant message per step), with `text.*`, `reasoning.*` and `tool.*` between.
//! v2 sends no idle status: a step that ends with any finish but `tool-calls`, or fails, ends the turn,
//! so the decoder says `SessionIdle` then. Texts and tool calls are keyed by assistant message, since
//! v2's `text-0` is only unique within one step.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Value, json};

use crate::opencode::decode::{
    DecodeError, decode_payload, decode_question_request, decode_session, main_argument, str_at,
    string_fields, strings_at, u64_at,
};
use crate::opencode::{
    Envelope, Event, MessageInfo, Part, PartBody, PermissionReply, PermissionRequest,
    QuestionRequest, Role, SessionInfo, Status, Tokens, ToolCall, ToolStatus,
};

/// How many assistant messages' model and agent, and tool calls' names, the decoder remembers.
const REMEMBERED: usize = 1024;

/// Decodes one v2 event stream (`/api/event`, or one session's durable log). It keeps what later
/// events of a step leave out (the step's model and agent, a tool call's name and input), and each
/// session's last durable `seq`, so nothing is delivered twice.
#[derive(Debug, Default)]
pub struct V2Decoder {
    /// The durable log of one session: an event without `durable.seq` is skipped.
    require_seq: bool,
    steps: Remembered<(Option<String>, Option<String>)>,
    tools: Remembered<(String, String, Option<u64>)>,
    last_seq: HashMap<String, u64>,
    /// What was already logged once: unknown types, and sessions whose seq went backwards.
    logged: HashSet<String>,
}

/// A map that forgets its oldest entries past `REMEMBERED`.
#[derive(Debug)]
struct Remembered<T> {
    map: HashMap<String, T>,
    order: VecDeque<String>,
}

impl<T> Default for Remembered<T> {
    fn default() -> Self {
        Remembered {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> Remembered<T> {
    fn insert(&mut self, key: String, value: T) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            if self.order.len() > REMEMBERED
                && let Some(oldest) = self.order.pop_front()
            {
                self.map.remove(&oldest);
            }
        }
    }

    fn get(&self, key: &str) -> Option<&T> {
        self.map.get(key)
    }
}

impl V2Decoder {
    /// For `/api/event`: every event, durable or not.
    pub fn live() -> V2Decoder {
        V2Decoder::default()
    }

    /// For `GET /api/session/{id}/event` and `…/history`: only durable events, each once.
    pub fn durable() -> V2Decoder {
        V2Decoder {
            require_seq: true,
            ..V2Decoder::default()
        }
    }

    /// The last durable `seq` delivered for `session_id`.
    pub fn last_seq(&self, session_id: &str) -> Option<u64> {
        self.last_seq.get(session_id).copied()
    }

    /// Starts `session_id` after `seq` (a thread's saved position): what is not after it is skipped.
    pub fn resume_after(&mut self, session_id: &str, seq: u64) {
        self.last_seq.insert(session_id.to_string(), seq);
    }

    /// One `data:` payload of an SSE stream.
    pub fn decode(&mut self, data: &str) -> Result<Vec<Envelope>, DecodeError> {
        let value: Value =
            serde_json::from_str(data).map_err(|e| DecodeError(format!("not JSON ({e})")))?;
        self.decode_value(&value)
    }

    /// One event as JSON (an SSE payload, or an item of `…/history`). Empty when it is skipped.
    pub fn decode_value(&mut self, value: &Value) -> Result<Vec<Envelope>, DecodeError> {
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| DecodeError("no \"type\" field".into()))?;
        let empty = Value::Null;
        let data = value.get("data").unwrap_or(&empty);
        let seq = value.pointer("/durable/seq").and_then(Value::as_u64);
        if kind != "session.created" && kind != "session.updated" {
            // `session.created` carries seq 0 of the new session's log: not an event to order.
            if let Some(seq) = seq {
                let session = str_at(data, "sessionID");
                if !self.accept_seq(&session, seq) {
                    return Ok(Vec::new());
                }
            } else if self.require_seq {
                self.log_once(
                    format!("noseq:{kind}"),
                    &format!("a durable-log event {kind} without durable.seq was skipped"),
                );
                return Ok(Vec::new());
            }
        }
        let directory = value
            .pointer("/location/directory")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let events = self.events(kind, data)?;
        Ok(events
            .into_iter()
            .map(|event| Envelope {
                directory: directory.into(),
                event,
                seq: seq.and_then(std::num::NonZeroU64::new),
            })
            .collect())
    }

    /// Whether `seq` follows what `session` already delivered; a repeat or a log gone backwards (a
    /// session restored from a backup) is skipped and logged once.
    fn accept_seq(&mut self, session: &str, seq: u64) -> bool {
        if session.is_empty() {
            return true;
        }
        match self.last_seq.get(session) {
            Some(&last) if seq <= last => {
                self.log_once(
                    format!("seq:{session}"),
                    &format!(
                        "session {session}'s durable log repeated or went back (seq {seq} after \
                         {last}); what is not after {last} is skipped"
                    ),
                );
                false
            }
            _ => {
                self.last_seq.insert(session.to_string(), seq);
                true
            }
        }
    }

    fn log_once(&mut self, key: String, message: &str) {
        if self.logged.len() < REMEMBERED && self.logged.insert(key) {
            crate::warn!("{message}");
        }
    }

    fn events(&mut self, kind: &str, data: &Value) -> Result<Vec<Event>, DecodeError> {
        let session_id = str_at(data, "sessionID");
        if kind.starts_with("session.next.") && session_id.is_empty() {
            return Err(DecodeError(format!("{kind} without sessionID")));
        }
        let at = u64_at(data, "timestamp");
        let message_id = || str_at(data, "assistantMessageID");
        let part = |id: String, body: PartBody| Event::PartUpdated {
            session_id: session_id.clone(),
            part: Part {
                id: format!("{}/{id}", message_id()),
                message_id: message_id(),
                body,
            },
        };
        let delta = |id: &str| Event::PartDelta {
            session_id: session_id.clone(),
            message_id: message_id(),
            part_id: format!("{}/{}", message_id(), str_at(data, id)),
            field: "text".into(),
            delta: str_at(data, "delta"),
        };
        let events = match kind {
            // The session runs from here: an interrupt before the first step ends it with no
            // event, and the poll's idle then ends the turn.
            "session.next.prompted" => vec![
                Event::MessageUpdated {
                    session_id: session_id.clone(),
                    message: MessageInfo::new(str_at(data, "messageID"), Role::User, at),
                },
                Event::SessionStatus {
                    session_id: session_id.clone(),
                    status: Status::Busy,
                },
            ],
            "session.next.step.started" => {
                let model = model_name(data.get("model"));
                let agent = Some(str_at(data, "agent")).filter(|a| !a.is_empty());
                self.steps
                    .insert(message_id(), (model.clone(), agent.clone()));
                vec![
                    Event::SessionStatus {
                        session_id: session_id.clone(),
                        status: Status::Busy,
                    },
                    Event::MessageUpdated {
                        session_id: session_id.clone(),
                        message: self.assistant(data, at, None, None),
                    },
                ]
            }
            "session.next.step.ended" => {
                let finish = str_at(data, "finish");
                let mut message = self.assistant(data, at, Some(at), None);
                message.tokens = decode_tokens(data.get("tokens"));
                message.cost = data.get("cost").and_then(Value::as_f64).unwrap_or(0.0);
                let mut events = vec![Event::MessageUpdated {
                    session_id: session_id.clone(),
                    message,
                }];
                if finish != "tool-calls" {
                    events.push(Event::SessionIdle {
                        session_id: session_id.clone(),
                    });
                }
                events
            }
            "session.next.step.failed" => {
                let error = data
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let message = self.assistant(data, at, Some(at), Some(step_error(error)));
                vec![
                    Event::MessageUpdated {
                        session_id: session_id.clone(),
                        message,
                    },
                    Event::SessionIdle {
                        session_id: session_id.clone(),
                    },
                ]
            }
            "session.next.retried" => vec![Event::SessionStatus {
                session_id: session_id.clone(),
                status: Status::Retry,
            }],
            "session.next.text.started" => {
                vec![part(str_at(data, "textID"), PartBody::Text(String::new()))]
            }
            "session.next.text.delta" => vec![delta("textID")],
            "session.next.text.ended" => {
                vec![part(
                    str_at(data, "textID"),
                    PartBody::Text(str_at(data, "text")),
                )]
            }
            "session.next.reasoning.started" => vec![part(
                str_at(data, "reasoningID"),
                PartBody::Reasoning(String::new()),
            )],
            "session.next.reasoning.delta" => vec![delta("reasoningID")],
            "session.next.reasoning.ended" => vec![part(
                str_at(data, "reasoningID"),
                PartBody::Reasoning(str_at(data, "text")),
            )],
            "session.next.tool.input.started" => {
                let call = str_at(data, "callID");
                let tool = str_at(data, "name");
                self.tools
                    .insert(call.clone(), (tool.clone(), String::new(), Some(at)));
                vec![part(
                    call,
                    PartBody::Tool(tool_call(
                        tool,
                        String::new(),
                        ToolStatus::Pending,
                        Some(at),
                    )),
                )]
            }
            "session.next.tool.called" => {
                let call = str_at(data, "callID");
                let tool = str_at(data, "tool");
                let argument = main_argument(&tool, data.get("input").unwrap_or(&json!({})));
                let started = self.tools.get(&call).and_then(|t| t.2).or(Some(at));
                self.tools
                    .insert(call.clone(), (tool.clone(), argument.clone(), started));
                vec![part(
                    call,
                    PartBody::Tool(tool_call(tool, argument, ToolStatus::Running, started)),
                )]
            }
            "session.next.tool.success" | "session.next.tool.failed" => {
                let call = str_at(data, "callID");
                let (tool, argument, started) = self.tools.get(&call).cloned().unwrap_or_default();
                let failed = kind.ends_with("failed");
                let status = if failed {
                    ToolStatus::Error
                } else {
                    ToolStatus::Completed
                };
                let mut tool = tool_call(tool, argument, status, started);
                tool.ended_ms = Some(at);
                if failed {
                    tool.error = data
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                }
                vec![part(call, PartBody::Tool(tool))]
            }
            "permission.v2.asked" => vec![Event::PermissionAsked(decode_v2_permission(data)?)],
            "permission.v2.replied" => vec![Event::PermissionReplied {
                session_id: session_id.clone(),
                request_id: str_at(data, "requestID"),
                reply: match data.get("reply").and_then(Value::as_str) {
                    Some("once") => PermissionReply::Once,
                    Some("always") => PermissionReply::Always,
                    _ => PermissionReply::Reject,
                },
            }],
            "question.v2.asked" => vec![Event::QuestionAsked(decode_v2_question(data)?)],
            "question.v2.replied" => vec![Event::QuestionReplied {
                session_id: session_id.clone(),
                request_id: str_at(data, "requestID"),
            }],
            "question.v2.rejected" => vec![Event::QuestionRejected {
                session_id: session_id.clone(),
                request_id: str_at(data, "requestID"),
            }],
            // Known, and nothing for the thread: admitted is not yet taken up; the rest change the
            // session (its model, agent, place, context) rather than the answer.
            "session.next.prompt.admitted"
            | "session.next.agent.switched"
            | "session.next.model.switched"
            | "session.next.moved"
            | "session.next.context.updated"
            | "session.next.synthetic"
            | "session.next.shell.started"
            | "session.next.shell.ended"
            | "session.next.tool.input.delta"
            | "session.next.tool.input.ended"
            | "session.next.tool.progress"
            | "session.next.compaction.started"
            | "session.next.compaction.delta"
            | "session.next.compaction.ended"
            | "session.next.revert.staged"
            | "session.next.revert.cleared"
            | "session.next.revert.committed" => vec![Event::Other {
                session_id: Some(session_id.clone()),
                kind: kind.to_string(),
            }],
            other if other.starts_with("session.next.") => {
                self.log_once(
                    format!("kind:{other}"),
                    &format!("unknown v2 event type {other} skipped (a newer OpenCode?)"),
                );
                Vec::new()
            }
            // v1-shaped events on `/api/event` (`session.created`, `server.connected`, …): `data`
            // holds what v1 calls `properties`.
            _ => {
                let payload = json!({"type": kind, "properties": data});
                decode_payload(&payload)?.into_iter().collect()
            }
        };
        Ok(events)
    }

    fn assistant(
        &self,
        data: &Value,
        at: u64,
        completed: Option<u64>,
        error: Option<(String, String)>,
    ) -> MessageInfo {
        let id = str_at(data, "assistantMessageID");
        let (model, agent) = self.steps.get(&id).cloned().unwrap_or_default();
        MessageInfo {
            completed_ms: completed,
            error,
            model,
            agent,
            ..MessageInfo::new(id, Role::Assistant, at)
        }
    }
}

/// v2 errors carry only a message (`SessionErrorUnknown`). An interrupt ends a step with "Provider
/// turn interrupted" (1.18.33): named as v1 names an abort, so the thread says stopped, not failed.
fn step_error(message: &str) -> (String, String) {
    let lower = message.to_lowercase();
    let name = if lower.contains("interrupt") || lower.contains("abort") {
        "MessageAbortedError"
    } else {
        "UnknownError"
    };
    (name.to_string(), message.to_string())
}

fn tool_call(
    tool: String,
    main_argument: String,
    status: ToolStatus,
    started: Option<u64>,
) -> ToolCall {
    ToolCall {
        tool,
        status,
        main_argument,
        title: String::new(),
        error: String::new(),
        started_ms: started,
        ended_ms: None,
    }
}

fn model_name(model: Option<&Value>) -> Option<String> {
    let model = model?;
    let provider = str_at(model, "providerID");
    let id = str_at(model, "id");
    (!provider.is_empty() && !id.is_empty()).then(|| format!("{provider}/{id}"))
}

fn decode_tokens(tokens: Option<&Value>) -> Tokens {
    let Some(tokens) = tokens else {
        return Tokens::default();
    };
    let cache = tokens.get("cache").cloned().unwrap_or(Value::Null);
    Tokens {
        input: u64_at(tokens, "input"),
        output: u64_at(tokens, "output"),
        reasoning: u64_at(tokens, "reasoning"),
        cache_read: u64_at(&cache, "read"),
        cache_write: u64_at(&cache, "write"),
    }
}

/// `SessionV2Info` (`location.directory`, no slug), or a v1 session info as `/api/event`'s
/// `session.created` carries it.
pub fn decode_v2_session(info: &Value) -> Result<SessionInfo, DecodeError> {
    let mut session = decode_session(info)?;
    if session.directory.is_empty() {
        session.directory = info
            .pointer("/location/directory")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
    }
    Ok(session)
}

/// `PermissionV2Request`: `action` is v1's `permission`, `resources` its `patterns`, `save` its
/// `always`.
pub fn decode_v2_permission(value: &Value) -> Result<PermissionRequest, DecodeError> {
    let id = str_at(value, "id");
    let session_id = str_at(value, "sessionID");
    if id.is_empty() || session_id.is_empty() {
        return Err(DecodeError(
            "permission request without id or sessionID".into(),
        ));
    }
    let metadata = string_fields(value, "metadata");
    Ok(PermissionRequest {
        id,
        session_id,
        permission: str_at(value, "action"),
        patterns: strings_at(value, "resources"),
        always: strings_at(value, "save"),
        metadata,
    })
}

/// `QuestionV2Request` has v1's shape.
pub fn decode_v2_question(value: &Value) -> Result<QuestionRequest, DecodeError> {
    decode_question_request(value)
}

/// `GET /api/session/{id}/context`'s `data`: user and assistant entries as v1 messages with parts
/// (ids as the event stream gives them); other entries (synthetic, compaction, switches) left out.
pub fn decode_context(data: &Value) -> Result<Vec<(MessageInfo, Vec<Part>)>, DecodeError> {
    let items = data
        .as_array()
        .ok_or_else(|| DecodeError("session context is not an array".into()))?;
    let mut messages = Vec::with_capacity(items.len());
    let mut last_user: Option<String> = None;
    for item in items {
        let id = str_at(item, "id");
        if id.is_empty() {
            continue;
        }
        let empty = Value::Null;
        let time = item.get("time").unwrap_or(&empty);
        let mut info = MessageInfo {
            completed_ms: time
                .get("completed")
                .and_then(Value::as_f64)
                .map(|t| t as u64),
            ..MessageInfo::new(id.clone(), Role::User, u64_at(time, "created"))
        };
        match item.get("type").and_then(Value::as_str) {
            Some("user") => {
                last_user = Some(id.clone());
                let part = Part {
                    id: format!("{id}/text"),
                    message_id: id,
                    body: PartBody::Text(str_at(item, "text")),
                };
                messages.push((info, vec![part]));
            }
            Some("assistant") => {
                info.role = Role::Assistant;
                info.tokens = decode_tokens(item.get("tokens"));
                info.cost = item.get("cost").and_then(Value::as_f64).unwrap_or(0.0);
                info.model = model_name(item.get("model"));
                info.agent = Some(str_at(item, "agent")).filter(|a| !a.is_empty());
                info.parent_id = last_user.clone();
                info.error = item
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(step_error);
                let parts = item
                    .get("content")
                    .and_then(Value::as_array)
                    .map(|content| {
                        content
                            .iter()
                            .filter_map(|c| context_part(&id, c))
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push((info, parts));
            }
            _ => {}
        }
    }
    Ok(messages)
}

fn context_part(message_id: &str, content: &Value) -> Option<Part> {
    let id = str_at(content, "id");
    let body = match content.get("type").and_then(Value::as_str)? {
        "text" => PartBody::Text(str_at(content, "text")),
        "reasoning" => PartBody::Reasoning(str_at(content, "text")),
        "tool" => {
            let empty = Value::Null;
            let state = content.get("state").unwrap_or(&empty);
            let time = content.get("time").unwrap_or(&empty);
            let tool = str_at(content, "name");
            PartBody::Tool(ToolCall {
                main_argument: main_argument(&tool, state.get("input").unwrap_or(&empty)),
                status: match state.get("status").and_then(Value::as_str) {
                    Some("running") => ToolStatus::Running,
                    Some("completed") => ToolStatus::Completed,
                    Some("error") => ToolStatus::Error,
                    _ => ToolStatus::Pending,
                },
                tool,
                title: String::new(),
                error: state
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                started_ms: time
                    .get("created")
                    .and_then(Value::as_f64)
                    .map(|t| t as u64),
                ended_ms: time
                    .get("completed")
                    .and_then(Value::as_f64)
                    .map(|t| t as u64),
            })
        }
        other => PartBody::Other(other.to_string()),
    };
    Some(Part {
        id: format!("{message_id}/{id}"),
        message_id: message_id.to_string(),
        body,
    })
}

/// A message as OpenCode stores it, with its parts: what the worker's catch-up posts.
pub type LoggedMessage = (MessageInfo, Vec<Part>);

/// One turn that ended in a session's durable log: its messages, and the `seq` of the event that
/// ended it, which becomes the thread's delivery position once the turn is in the thread.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedTurn {
    pub messages: Vec<LoggedMessage>,
    pub end_seq: u64,
}

/// The turns that ended in `items` (a session's durable log, oldest first) after `after`, each
/// once, in order; a turn still running at the end of the log is left out (it is streamed live).
/// Events repeated or out of order are skipped by the durable decoder. A turn that stopped with no
/// end event (a bare permission rejection halts one so on 1.18.33) ends where the next prompt
/// begins, so it is neither merged into the next turn nor makes that turn's prompt its own.
pub fn ended_turns(session_id: &str, after: u64, items: &[Value]) -> Vec<LoggedTurn> {
    let mut decoder = V2Decoder::durable();
    decoder.resume_after(session_id, after);
    let mut turns = Vec::new();
    let mut messages: Vec<LoggedMessage> = Vec::new();
    // The turn's first user message: v2 steps name no parent, and the reply's posts are keyed by
    // it (a reply begun before a restart is continued, not posted again).
    let mut prompt: Option<String> = None;
    let mut last_seq = after;
    for item in items {
        let envelopes = match decoder.decode_value(item) {
            Ok(envelopes) => envelopes,
            Err(e) => {
                crate::warn!("{e}; skipped in the durable log of {session_id}");
                continue;
            }
        };
        for envelope in envelopes {
            if envelope.event.session_id() != Some(session_id) {
                continue;
            }
            let seq = envelope.seq.map_or(last_seq, |s| s.get());
            // A halted turn ends at its own last event, not at the next prompt's admission.
            let counts = !matches!(envelope.event, Event::Other { .. });
            let halted = |messages: &[LoggedMessage]| {
                messages.iter().any(|(m, _)| {
                    m.role == Role::Assistant && m.completed_ms.is_none() && m.error.is_none()
                })
            };
            match envelope.event {
                Event::MessageUpdated { mut message, .. } => {
                    if message.role == Role::User && halted(&messages) {
                        prompt = None;
                        turns.push(LoggedTurn {
                            messages: std::mem::take(&mut messages),
                            end_seq: last_seq,
                        });
                    }
                    match message.role {
                        Role::User if prompt.is_none() => prompt = Some(message.id.clone()),
                        Role::Assistant if message.parent_id.is_none() => {
                            message.parent_id = prompt.clone();
                        }
                        _ => {}
                    }
                    match messages.iter_mut().find(|(m, _)| m.id == message.id) {
                        Some((stored, _)) => *stored = message,
                        None => messages.push((message, Vec::new())),
                    }
                }
                Event::PartUpdated { part, .. } => {
                    if let Some((_, parts)) =
                        messages.iter_mut().find(|(m, _)| m.id == part.message_id)
                    {
                        match parts.iter_mut().find(|p| p.id == part.id) {
                            Some(stored) => *stored = part,
                            None => parts.push(part),
                        }
                    }
                }
                Event::SessionIdle { .. } if !messages.is_empty() => {
                    prompt = None;
                    turns.push(LoggedTurn {
                        messages: std::mem::take(&mut messages),
                        end_seq: seq,
                    });
                }
                _ => {}
            }
            if counts {
                last_seq = seq;
            }
        }
    }
    turns
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::turn::{Change, Tracker};

    /// One v2 turn of `opencode serve` 1.18.33 on `/api/event` (prompted with `delivery:"queue"`).
    const RECORDED_TURN: &str = r#"{"id":"evt_241df7ebd001WKRBISOnMqQM4w","type":"session.next.prompt.admitted","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":1,"version":1},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401495741,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","messageID":"msg_dbe2000000001abcdefghijklm","prompt":{"text":"say hello"},"delivery":"queue"}}
    {"id":"evt_241df7ee1001zhOwtzYIphU706","type":"session.next.prompted","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":2,"version":1},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401495741,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","messageID":"msg_dbe2000000001abcdefghijklm","prompt":{"text":"say hello"},"delivery":"queue"}}
    {"id":"evt_241df7f93002J4ZDHfxWJXUiU3","type":"session.next.step.started","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":3,"version":1},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401495955,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","agent":"build","model":{"id":"fake-model","providerID":"fake"},"snapshot":"7f2f88f1c8f8c21f5ea311f9ecd9f7fd4fa761d3"}}
    {"id":"evt_241df7f97001XowtV3fPzR6rSP","type":"session.next.text.started","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":4,"version":1},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401495959,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","textID":"text-0"}}
    {"id":"evt_241df7f9b001XoJr5eLM9d5MBM","type":"session.next.text.delta","location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401495963,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","textID":"text-0","delta":"Hello "}}
    {"id":"evt_241df80b2001J3WruogfX5Jv21","type":"session.next.text.delta","location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401496242,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","textID":"text-0","delta":"world."}}
    {"id":"evt_241df80b5001e2ir4qBEa5PZOz","type":"session.next.text.ended","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":5,"version":1},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401496245,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","textID":"text-0","text":"Hello world."}}
    {"id":"evt_241df80d00011FihthyWuYSA1e","type":"session.next.step.ended","durable":{"aggregateID":"ses_dbe209d60ffeARMigCctWJcK6p","seq":6,"version":2},"location":{"directory":"/tmp/h2v2/proj"},"data":{"timestamp":1796401496272,"sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","assistantMessageID":"msg_241df7f93001BXQVWCEcb71Nfm","finish":"stop","cost":0,"tokens":{"input":10,"output":5,"reasoning":0,"cache":{"read":0,"write":0}},"snapshot":"7f2f88f1c8f8c21f5ea311f9ecd9f7fd4fa761d3","files":[]}}"#;

    const PERMISSION_ASKED: &str = r#"{"id":"evt_241dfc54a001E35WKd7VTFiTup","type":"permission.v2.asked","location":{"directory":"/tmp/h2v2/proj"},"data":{"id":"per_241dfc549001nyuFX2yJEeiATn","sessionID":"ses_dbe209d60ffeARMigCctWJcK6p","action":"bash","resources":["echo hi"],"save":["echo hi"],"source":{"type":"tool","messageID":"msg_241dfc4f5001Ps92Yq2wHDI6eJ","callID":"call_1"}}}"#;
    const TOOL_CALLED: &str = r#"{"id":"evt_241dfc51100104KFxRZPTUSw3q","type":"session.next.tool.called","durable":{"aggregateID":"ses_a","seq":12,"version":1},"data":{"timestamp":1796401513745,"sessionID":"ses_a","assistantMessageID":"msg_b","callID":"call_1","tool":"bash","input":{"command":"echo hi","description":"say hi"},"provider":{"executed":false}}}"#;
    const TOOL_SUCCESS: &str = r#"{"id":"evt_241dff8b000162czlvlguD8HqQ","type":"session.next.tool.success","durable":{"aggregateID":"ses_a","seq":13,"version":1},"data":{"timestamp":1796401526960,"sessionID":"ses_a","assistantMessageID":"msg_b","callID":"call_1","structured":{"exit":0,"truncated":false},"content":[{"type":"text","text":"hi\n"}],"outputPaths":[],"provider":{"executed":false}}}"#;

    fn all(decoder: &mut V2Decoder, lines: &str) -> Vec<Envelope> {
        lines
            .lines()
            .flat_map(|line| decoder.decode(line).expect("decodes"))
            .collect()
    }

    #[test]
    fn a_recorded_turn_streams_its_text_and_ends_once() {
        let mut decoder = V2Decoder::live();
        let mut tracker = Tracker::default();
        let now = Instant::now();
        tracker.begin(now, Some("msg_dbe2000000001abcdefghijklm".into()));
        let mut changes = Vec::new();
        for envelope in all(&mut decoder, RECORDED_TURN) {
            assert_eq!(&*envelope.directory, "/tmp/h2v2/proj");
            changes.push(tracker.apply(envelope.event, now));
        }
        assert_eq!(
            changes.iter().filter(|c| **c == Change::TurnEnded).count(),
            1,
            "{changes:?}"
        );
        assert_eq!(changes.last(), Some(&Change::TurnEnded));
        let turn = tracker.turn.as_ref().expect("the turn is still held");
        assert!(
            turn.body(false).contains("Hello world."),
            "{}",
            turn.body(false)
        );
        assert!(
            !turn.body(false).contains("say hello"),
            "the prompt is not the reply"
        );
    }

    #[test]
    fn durable_events_carry_their_seq_and_deltas_none() {
        let mut decoder = V2Decoder::live();
        let envelopes = all(&mut decoder, RECORDED_TURN);
        let seqs: Vec<Option<u64>> = envelopes.iter().map(|e| e.seq.map(|s| s.get())).collect();
        assert!(seqs.contains(&None), "the deltas are not durable: {seqs:?}");
        assert_eq!(seqs.iter().flatten().max(), Some(&6));
        assert_eq!(decoder.last_seq("ses_dbe209d60ffeARMigCctWJcK6p"), Some(6));
    }

    #[test]
    fn a_repeated_or_rewound_seq_is_skipped_and_the_next_one_delivered() {
        let mut decoder = V2Decoder::durable();
        let first = all(&mut decoder, RECORDED_TURN);
        assert!(!first.is_empty());
        // The same log again (a reconnect that replays it): nothing twice.
        assert!(all(&mut decoder, RECORDED_TURN).is_empty());
        // After a saved position, only what follows it.
        let mut resumed = V2Decoder::durable();
        resumed.resume_after("ses_dbe209d60ffeARMigCctWJcK6p", 5);
        let events: Vec<Event> = all(&mut resumed, RECORDED_TURN)
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert!(
            matches!(events.last(), Some(Event::SessionIdle { .. })),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .all(|e| !matches!(e, Event::PartUpdated { .. })),
            "the text before seq 5 is not delivered again: {events:?}"
        );
    }

    #[test]
    fn the_durable_log_skips_events_without_seq_and_unknown_types() {
        let mut decoder = V2Decoder::durable();
        let delta = RECORDED_TURN
            .lines()
            .find(|l| l.contains("text.delta"))
            .unwrap();
        assert!(decoder.decode(delta).unwrap().is_empty());
        let unknown =
            r#"{"type":"session.next.telepathy","durable":{"seq":9},"data":{"sessionID":"ses_a"}}"#;
        assert!(decoder.decode(unknown).unwrap().is_empty());
        assert!(decoder.decode(unknown).unwrap().is_empty());
        // A stream cut mid-event is not JSON: an error for the caller to log, not a panic.
        assert!(decoder.decode(&TOOL_CALLED[..40]).is_err());
    }

    #[test]
    fn the_log_after_a_position_gives_each_ended_turn_once_with_its_end_seq() {
        let session = "ses_dbe209d60ffeARMigCctWJcK6p";
        let items: Vec<Value> = RECORDED_TURN
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let turns = ended_turns(session, 0, &items);
        assert_eq!(turns.len(), 1);
        assert_eq!(turns[0].end_seq, 6);
        let (user, _) = &turns[0].messages[0];
        assert_eq!(user.id, "msg_dbe2000000001abcdefghijklm");
        let (answer, parts) = &turns[0].messages[1];
        assert!(answer.completed_ms.is_some());
        assert_eq!(parts[0].body, PartBody::Text("Hello world.".into()));
        // Its prompt, which keys the reply's posts: a reply begun before a restart is found by it.
        assert_eq!(
            answer.parent_id.as_deref(),
            Some("msg_dbe2000000001abcdefghijklm")
        );
        // Delivered up to its end: nothing follows. A log cut before the end: no turn yet.
        assert!(ended_turns(session, 6, &items).is_empty());
        assert!(ended_turns(session, 0, &items[..5]).is_empty());
    }

    /// The recorded log of a turn halted by a bare rejection (seq 1–7), then a later turn of the
    /// same session (the `a-text` recording, renumbered 8–13).
    fn halted_then_answered() -> (String, Vec<Value>) {
        let read = |name: &str| -> Vec<Value> {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/v2")
                .join(format!("{name}.history.json"));
            let text = std::fs::read_to_string(path).expect("fixture");
            let history: Value = serde_json::from_str(&text).expect("JSON");
            history["data"].as_array().expect("data").clone()
        };
        let mut items = read("h-rejected");
        let session = items[0]["durable"]["aggregateID"]
            .as_str()
            .expect("session")
            .to_string();
        let offset = items.len() as u64;
        for mut item in read("a-text") {
            let seq = item["durable"]["seq"].as_u64().expect("seq");
            item["durable"]["seq"] = json!(seq + offset);
            item["data"]["sessionID"] = json!(session);
            items.push(item);
        }
        (session, items)
    }

    #[test]
    fn a_turn_halted_without_an_end_event_ends_where_the_next_prompt_begins() {
        let (session, items) = halted_then_answered();
        let turns = ended_turns(&session, 0, &items);
        assert_eq!(turns.len(), 2, "{turns:?}");
        assert_eq!(turns[0].end_seq, 7);
        assert_eq!(turns[1].end_seq, 13);
        // Each turn keyed by its own prompt: the halted one's messages are not in the next.
        let prompts: Vec<Vec<Option<String>>> = turns
            .iter()
            .map(|t| {
                t.messages
                    .iter()
                    .map(|(m, _)| m.parent_id.clone())
                    .collect()
            })
            .collect();
        let first_user = &turns[0].messages[0].0.id;
        let second_user = &turns[1].messages[0].0.id;
        assert_ne!(first_user, second_user);
        assert_eq!(prompts[0][1].as_ref(), Some(first_user));
        assert_eq!(turns[1].messages.len(), 2);
        assert_eq!(prompts[1][1].as_ref(), Some(second_user));
        // Until the next prompt, the halted turn is not known to have ended.
        assert!(ended_turns(&session, 0, &items[..7]).is_empty());
        // Delivered past it: only the later turn.
        assert_eq!(ended_turns(&session, 7, &items).len(), 1);
    }

    /// Issue 12's bad input in one durable stream: an unknown `session.next.*` type, an event
    /// without `seq`, a `seq` gone backwards, and a log that ends mid-event. Each is skipped and
    /// logged once, nothing is delivered twice, and the next prompt's turn still arrives.
    #[test]
    fn bad_input_in_the_log_is_skipped_logged_once_and_the_next_turn_still_delivered() {
        let session = "ses_dbe209d60ffeARMigCctWJcK6p";
        // The durable log has the live stream's events but its deltas.
        let first: Vec<Value> = RECORDED_TURN
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e.get("durable").is_some())
            .collect();
        // The next prompt's turn after an unknown event (seq 7): the same events renumbered 8–13,
        // with their own ids and text.
        let second: Vec<Value> = first
            .iter()
            .map(|event| {
                let text = event.to_string().replace("Hello world.", "Second answer.");
                let text = text.replace("msg_dbe2000000001", "msg_dbe2000000002");
                let text = text.replace("msg_241df7f93001", "msg_241df7f93002");
                let mut event: Value = serde_json::from_str(&text).unwrap();
                if let Some(seq) = event.pointer("/durable/seq").and_then(Value::as_u64) {
                    event["durable"]["seq"] = json!(seq + 7);
                }
                event
            })
            .collect();
        let unknown = json!({"type": "session.next.telepathy", "durable": {"seq": 7},
            "data": {"sessionID": session}});
        let no_seq = json!({"type": "session.next.text.ended",
            "data": {"sessionID": session, "assistantMessageID": "msg_x", "textID": "t", "text": "stray"}});
        let rewound = first
            .iter()
            .find(|e| e["type"] == "session.next.text.ended")
            .cloned()
            .expect("text.ended");
        let mut stream = String::new();
        let mut push = |event: &Value| stream.push_str(&format!("data: {event}\n\n"));
        first.iter().for_each(&mut push);
        for bad in [&unknown, &unknown, &no_seq, &no_seq, &rewound, &rewound] {
            push(bad);
        }
        second.iter().for_each(&mut push);
        // The log ends in the middle of one more event.
        let cut = format!("data: {}", &TOOL_CALLED[..60]);
        stream.push_str(&cut);

        let mut decoder = V2Decoder::durable();
        let mut parser = crate::opencode::sse::SseParser::new(1 << 20);
        let mut events = Vec::new();
        for sse in parser.feed(stream.as_bytes()) {
            events.extend(decoder.decode(&sse.data).expect("whole events decode"));
        }
        let texts: Vec<&str> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::PartUpdated { part, .. } => match &part.body {
                    PartBody::Text(t) if !t.is_empty() => Some(t.as_str()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["Hello world.", "Second answer."]);
        let prompts: Vec<&str> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::MessageUpdated { message, .. } if message.role == Role::User => {
                    Some(message.id.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            prompts,
            [
                "msg_dbe2000000001abcdefghijklm",
                "msg_dbe2000000002abcdefghijklm"
            ]
        );
        let ends = events
            .iter()
            .filter(|e| matches!(e.event, Event::SessionIdle { .. }))
            .count();
        assert_eq!(ends, 2);
        assert_eq!(decoder.last_seq(session), Some(13));
        // Logged once each: the unknown type, the missing seq, the rewound seq.
        assert_eq!(decoder.logged.len(), 3, "{:?}", decoder.logged);
        // The cut event was never delivered; the log read again from the position delivers only
        // what is new.
        let mut again = Vec::new();
        for sse in crate::opencode::sse::SseParser::new(1 << 20).feed(stream.as_bytes()) {
            again.extend(decoder.decode(&sse.data).expect("decodes"));
        }
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_tool_call_keeps_its_command_from_called_to_success() {
        let mut decoder = V2Decoder::live();
        let tools: Vec<ToolCall> = [TOOL_CALLED, TOOL_SUCCESS]
            .iter()
            .flat_map(|line| decoder.decode(line).unwrap())
            .filter_map(|e| match e.event {
                Event::PartUpdated { part, .. } => match part.body {
                    PartBody::Tool(tool) => {
                        assert_eq!(part.id, "msg_b/call_1");
                        Some(tool)
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0].status, ToolStatus::Running);
        assert_eq!(tools[1].status, ToolStatus::Completed);
        assert_eq!(tools[1].main_argument, "echo hi");
        assert_eq!(tools[1].tool, "bash");
    }

    #[test]
    fn a_v2_permission_request_reads_as_v1s() {
        let mut decoder = V2Decoder::live();
        let events = decoder.decode(PERMISSION_ASKED).unwrap();
        let Some(Event::PermissionAsked(request)) = events.into_iter().next().map(|e| e.event)
        else {
            panic!("not a permission request");
        };
        assert_eq!(request.id, "per_241dfc549001nyuFX2yJEeiATn");
        assert_eq!(request.permission, "bash");
        assert_eq!(request.patterns, vec!["echo hi".to_string()]);
        assert_eq!(request.always, vec!["echo hi".to_string()]);
    }

    #[test]
    fn the_context_reads_as_messages_with_the_streams_part_ids() {
        let context = json!([
            {"id":"msg_u","time":{"created":1},"text":"say hello","type":"user"},
            {"id":"msg_a","time":{"created":2,"completed":3},"type":"assistant","agent":"build",
             "model":{"id":"fake-model","providerID":"fake"},
             "content":[{"type":"text","id":"text-0","text":"Hello world."}],
             "finish":"stop","cost":0.5,"tokens":{"input":10,"output":5,"reasoning":0,"cache":{"read":1,"write":0}}}
        ]);
        let messages = decode_context(&context).unwrap();
        assert_eq!(messages.len(), 2);
        let (answer, parts) = &messages[1];
        assert_eq!(answer.parent_id.as_deref(), Some("msg_u"));
        assert_eq!(answer.completed_ms, Some(3));
        assert_eq!(answer.model.as_deref(), Some("fake/fake-model"));
        assert_eq!(answer.tokens.cache_read, 1);
        assert_eq!(parts[0].id, "msg_a/text-0");
        assert_eq!(parts[0].body, PartBody::Text("Hello world.".into()));
    }
}
