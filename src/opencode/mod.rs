//! Everything that knows OpenCode's JSON and HTTP: the REST client, the event stream, and the decoding of
//! wire events into the domain types below. Nothing outside this module looks at OpenCode's field names.

pub mod decode;
pub mod discover;
pub mod ids;
pub mod rest;
pub mod sse;
pub mod v2;
pub mod watch;

pub use decode::decode_global_event;

/// Which OpenCode server a session lives on. Sessions are keyed by server as well as by id, so one bridge
/// can later serve several servers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerKey(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub server: ServerKey,
    pub session_id: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionInfo {
    pub id: String,
    pub slug: String,
    pub title: String,
    pub directory: String,
    pub project_name: Option<String>,
    pub parent_id: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Idle,
    Busy,
    /// The provider failed and OpenCode will try again; still a running turn.
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub reasoning: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageInfo {
    pub id: String,
    pub role: Role,
    pub created_ms: u64,
    pub completed_ms: Option<u64>,
    pub tokens: Tokens,
    pub cost: f64,
    /// `(name, message)` of the error that ended the message, such as `MessageAbortedError`.
    pub error: Option<(String, String)>,
    pub model: Option<String>,
    /// The agent that wrote (assistant) or is to answer (user) the message, such as `build`.
    pub agent: Option<String>,
    /// An assistant message's prompt: the user message it answers.
    pub parent_id: Option<String>,
}

impl MessageInfo {
    /// A message known only by its id, role and creation time; the rest comes later, if at all.
    pub fn new(id: String, role: Role, created_ms: u64) -> MessageInfo {
        MessageInfo {
            id,
            role,
            created_ms,
            completed_ms: None,
            tokens: Tokens::default(),
            cost: 0.0,
            error: None,
            model: None,
            agent: None,
            parent_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolStatus {
    Pending,
    Running,
    Completed,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub tool: String,
    pub status: ToolStatus,
    /// The argument a person would recognise the call by: the command, the file, the pattern.
    pub main_argument: String,
    pub title: String,
    pub error: String,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PartBody {
    Text(String),
    Reasoning(String),
    Tool(ToolCall),
    /// Parts the thread does not show (step markers, snapshots, patches, files).
    Other(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub id: String,
    pub message_id: String,
    pub body: PartBody,
}

/// One decoded event of `/global/event` (v1) or `/api/event` (v2), with the directory it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Boxed to keep `WatchEvent` small (a `String` is a word longer).
    pub directory: Box<str>,
    pub event: Event,
    /// v2 only: the event's place in its session's durable log (`durable.seq`); `None` for v1 and
    /// for v2 events that are not durable (deltas, permissions). Logs count from 1.
    pub seq: Option<std::num::NonZeroU64>,
}

/// Which API a server is spoken to in: v1 (`/global/event`, `/session/*`), or v2 (`/api/*`, the only
/// one OpenCode 2.x serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    V1,
    V2,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::V1 => "v1",
            Dialect::V2 => "v2",
        }
    }
}

/// `OPENCODE_API`: which dialect to speak. `Auto` probes the server at every (re)connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiChoice {
    #[default]
    Auto,
    V1,
    V2,
}

/// How a v2 prompt joins a session: `Queue` waits for the running turn to end, `Steer` joins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    #[default]
    Queue,
    Steer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connected,
    Heartbeat,
    SessionCreated(SessionInfo),
    SessionUpdated(SessionInfo),
    SessionDeleted {
        session_id: String,
    },
    SessionStatus {
        session_id: String,
        status: Status,
    },
    SessionIdle {
        session_id: String,
    },
    SessionError {
        session_id: Option<String>,
        name: String,
        message: String,
    },
    MessageUpdated {
        session_id: String,
        message: MessageInfo,
    },
    MessageRemoved {
        session_id: String,
        message_id: String,
    },
    PartUpdated {
        session_id: String,
        part: Part,
    },
    PartDelta {
        session_id: String,
        message_id: String,
        part_id: String,
        field: String,
        delta: String,
    },
    PartRemoved {
        session_id: String,
        part_id: String,
    },
    /// `permission.asked`: the agent waits for the owner to allow or reject a tool call.
    PermissionAsked(PermissionRequest),
    /// `permission.replied`: answered, by the bridge or anywhere else (the TUI, another client).
    PermissionReplied {
        session_id: String,
        request_id: String,
        reply: PermissionReply,
    },
    /// `question.asked`: the question tool waits for the owner's choice.
    QuestionAsked(QuestionRequest),
    /// `question.replied`.
    QuestionReplied {
        session_id: String,
        request_id: String,
    },
    /// `question.rejected`.
    QuestionRejected {
        session_id: String,
        request_id: String,
    },
    /// `todo.updated`: the session's whole todo list as it now stands.
    TodoUpdated {
        session_id: String,
        todos: Vec<Todo>,
    },
    /// A type the bridge does not act on (yet): kept so its session still sees activity.
    Other {
        session_id: Option<String>,
        kind: String,
    },
}

impl Event {
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Event::Connected | Event::Heartbeat => None,
            Event::SessionCreated(info) | Event::SessionUpdated(info) => Some(&info.id),
            Event::SessionError { session_id, .. } | Event::Other { session_id, .. } => {
                session_id.as_deref()
            }
            Event::SessionDeleted { session_id }
            | Event::SessionStatus { session_id, .. }
            | Event::SessionIdle { session_id }
            | Event::MessageUpdated { session_id, .. }
            | Event::MessageRemoved { session_id, .. }
            | Event::PartUpdated { session_id, .. }
            | Event::PartDelta { session_id, .. }
            | Event::PartRemoved { session_id, .. }
            | Event::PermissionReplied { session_id, .. }
            | Event::QuestionReplied { session_id, .. }
            | Event::QuestionRejected { session_id, .. }
            | Event::TodoUpdated { session_id, .. } => Some(session_id),
            Event::PermissionAsked(request) => Some(&request.session_id),
            Event::QuestionAsked(request) => Some(&request.session_id),
        }
    }
}

/// A pending permission request (`permission.asked`, `GET /permission`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PermissionRequest {
    pub id: String,
    pub session_id: String,
    /// What is asked for: the tool kind, such as `bash`, `edit`, `webfetch`, `external_directory`.
    pub permission: String,
    /// The concrete patterns this call needs, such as the command line or the file paths.
    pub patterns: Vec<String>,
    /// The patterns an "always" answer would allow from now on, such as `echo *`.
    pub always: Vec<String>,
    /// The string-valued fields of the request's metadata (`command`, `filepath`, …), in wire order.
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionReply {
    Once,
    Always,
    Reject,
}

/// A pending question request (`question.asked`, `GET /question`): one or more questions, answered together.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuestionRequest {
    pub id: String,
    pub session_id: String,
    pub questions: Vec<Question>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Question {
    pub question: String,
    pub header: String,
    pub options: Vec<QuestionOption>,
    /// More than one option may be chosen.
    pub multiple: bool,
    /// A typed answer that is not one of the options is accepted (OpenCode's default is true).
    pub custom: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuestionOption {
    pub label: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Todo {
    pub id: String,
    pub content: String,
    /// `pending`, `in_progress`, `completed` or `cancelled`.
    pub status: String,
    /// `high`, `medium` or `low`.
    pub priority: String,
}

/// A model as OpenCode names it in a prompt: `provider/model`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelRef {
    pub provider_id: String,
    pub model_id: String,
}

/// A model the server offers (`!model`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelChoice {
    pub model: ModelRef,
    pub name: String,
    /// The provider's default model, as the server reports it.
    pub is_default: bool,
}

/// An agent the server offers (`!agent`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentChoice {
    pub name: String,
    pub description: String,
    /// `primary`, `subagent` or `all`: only primary-capable agents can run a prompt.
    pub mode: String,
}

/// Defined by `files`, which builds it: imports run from `opencode` to `files`, not back.
pub use crate::files::FileAttachment;

/// Everything one prompt carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptInput {
    pub text: String,
    pub files: Vec<FileAttachment>,
    /// None: the session's own choice.
    pub model: Option<ModelRef>,
    pub agent: Option<String>,
    /// The id the user message is to have (`messageID`), so the bridge can tell its own prompts
    /// apart; see `prompt_message_id`.
    pub message_id: Option<String>,
    /// v2 only; v1 always queues.
    pub delivery: Delivery,
}

/// A file read from a session's directory through the server (`!file`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FileContent {
    pub bytes: Vec<u8>,
    pub mime: String,
}
