//! The texts of what the bridge asks the owner in a session's thread (permissions, questions), the
//! parsing of the owner's answers, and the `!todo`, `!model`, `!agent` and `!help` texts. All pure.

use crate::opencode::{
    AgentChoice, ModelChoice, ModelRef, PermissionReply, PermissionRequest, Question,
    QuestionRequest, Todo,
};

/// Who answered a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The owner, from the thread.
    Owner,
    /// Someone in OpenCode itself (the TUI, another client).
    Elsewhere,
}

pub fn permission_post(request: &PermissionRequest, directory: &str, prefix: &str) -> String {
    let _ = (request, directory, prefix);
    String::new()
}

pub fn permission_decided(
    request: &PermissionRequest,
    directory: &str,
    decision: PermissionReply,
    by: DecidedBy,
    message: Option<&str>,
) -> String {
    let _ = (request, directory, decision, by, message);
    String::new()
}

pub fn question_post(request: &QuestionRequest, index: usize, prefix: &str) -> String {
    let _ = (request, index, prefix);
    String::new()
}

pub fn question_answered(request: &QuestionRequest, index: usize, answer: &[String]) -> String {
    let _ = (request, index, answer);
    String::new()
}

pub fn question_skipped(request: &QuestionRequest) -> String {
    let _ = request;
    String::new()
}

pub fn parse_answer(question: &Question, text: &str) -> Result<Vec<String>, String> {
    let _ = (question, text);
    Err("not implemented yet".into())
}

pub fn todo_post(todos: &[Todo]) -> String {
    let _ = todos;
    String::new()
}

pub fn thread_help(prefix: &str) -> String {
    let _ = prefix;
    String::new()
}

pub fn model_list(choices: &[ModelChoice], current: Option<&ModelRef>) -> String {
    let _ = (choices, current);
    String::new()
}

pub fn agent_list(choices: &[AgentChoice], current: Option<&str>) -> String {
    let _ = (choices, current);
    String::new()
}

pub fn match_model(choices: &[ModelChoice], query: &str) -> Result<ModelRef, String> {
    let _ = (choices, query);
    Err("not implemented yet".into())
}

pub fn match_agent(choices: &[AgentChoice], query: &str) -> Result<String, String> {
    let _ = (choices, query);
    Err("not implemented yet".into())
}
