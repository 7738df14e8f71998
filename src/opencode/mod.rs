//! Everything that knows OpenCode's JSON and HTTP: the REST client, the event stream, and the decoding of
//! wire events into the domain types below. Nothing outside this module looks at OpenCode's field names.

pub mod decode;
pub mod rest;
pub mod sse;
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

/// One decoded event of `/global/event`, with the directory it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub directory: String,
    pub event: Event,
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
            | Event::PartRemoved { session_id, .. } => Some(session_id),
        }
    }
}
