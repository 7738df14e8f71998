//! What the thread shows, as pure functions of session and turn data: the root post, the streamed reply
//! and the completion line. No IO, so every shape is cheap to test.

use crate::command::short_id;
use crate::opencode::{Part, PartBody, SessionInfo, Tokens, ToolCall, ToolStatus};
use crate::render::{format_cost, format_duration, format_tokens, truncate_chars};

const REASONING_SUMMARY_CHARS: usize = 160;
const TOOL_ARGUMENT_CHARS: usize = 80;

/// `server` is named (`🖥 NAME`) when the bridge follows more than one.
pub fn root_post(info: &SessionInfo, prefix: &str, server: Option<&str>) -> String {
    let title = display_title(info);
    let project = info.project_name.clone().unwrap_or_else(|| {
        info.directory
            .rsplit('/')
            .find(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    });
    let slug = if info.slug.is_empty() {
        String::new()
    } else {
        format!("`{}` · ", info.slug)
    };
    let server = server
        .map(|name| format!(" · 🖥 {name}"))
        .unwrap_or_default();
    format!(
        "#### 🧵 {title}\n\
         {slug}id `{short}` · project **{project}**{server}\n\
         📁 `{directory}`\n\
         🕒 started {started}\n\n\
         _Replies in this thread go to this session. `{prefix}help` here lists the thread commands and reactions._",
        short = short_id(&info.id),
        directory = info.directory,
        started = crate::log::utc_minute(info.created_ms),
    )
}

/// The session's title, or a name made from its slug while OpenCode has not generated one yet.
pub fn display_title(info: &SessionInfo) -> String {
    let title = info.title.trim();
    if !title.is_empty() {
        return title.to_string();
    }
    if !info.slug.is_empty() {
        return info.slug.replace('-', " ");
    }
    format!("session {}", short_id(&info.id))
}

/// A subagent's activity, summarised in its parent's reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChildSummary {
    pub title: String,
    pub tool_calls: u32,
    pub current_tool: Option<String>,
    pub finished: bool,
}

/// The reply as it stands. `working` adds a status line at the end while the turn runs; the final
/// reply has none.
pub fn reply_body(parts: &[&Part], children: &[&ChildSummary], working: Option<&str>) -> String {
    let mut blocks: Vec<String> = Vec::new();
    let mut tool_lines: Vec<String> = Vec::new();
    let flush_tools = |tool_lines: &mut Vec<String>, blocks: &mut Vec<String>| {
        if !tool_lines.is_empty() {
            blocks.push(tool_lines.join("\n"));
            tool_lines.clear();
        }
    };
    for part in parts {
        match &part.body {
            PartBody::Tool(call) => tool_lines.push(tool_line(call)),
            PartBody::Reasoning(text) => {
                if let Some(line) = reasoning_line(text) {
                    flush_tools(&mut tool_lines, &mut blocks);
                    blocks.push(line);
                }
            }
            PartBody::Text(text) => {
                if !text.trim().is_empty() {
                    flush_tools(&mut tool_lines, &mut blocks);
                    blocks.push(text.trim_end().to_string());
                }
            }
            PartBody::Other(_) => {}
        }
    }
    flush_tools(&mut tool_lines, &mut blocks);
    if !children.is_empty() {
        let lines: Vec<String> = children.iter().map(|c| child_line(c)).collect();
        blocks.push(lines.join("\n"));
    }
    if let Some(status) = working {
        blocks.push(format!("_⏳ {status}_"));
    }
    blocks.join("\n\n")
}

/// What a reply post says when the bridge stopped while it was streaming.
pub const INTERRUPTED_NOTE: &str = "_⏸️ opencode-mattermost stopped while this reply was streaming; the session goes on in OpenCode._";

/// Whether a reply post was cut off mid-stream: it still ends with its status line, or says the bridge
/// stopped. After a restart such a post is finished in place rather than left behind.
pub fn is_unfinished_reply(text: &str) -> bool {
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
    (last.starts_with("_⏳ ") && last.ends_with('_')) || last == INTERRUPTED_NOTE
}

/// `🔧 bash · echo hi · ✓ 0.3s`
pub fn tool_line(call: &ToolCall) -> String {
    let argument = one_line(&call.main_argument);
    let argument = if argument.is_empty() {
        one_line(&call.title)
    } else {
        argument
    };
    let argument = truncate_chars(&argument, TOOL_ARGUMENT_CHARS);
    let argument = if argument.is_empty() {
        String::new()
    } else {
        format!(" {}", inline_code(&argument))
    };
    let duration = match (call.started_ms, call.ended_ms) {
        (Some(start), Some(end)) if end >= start => format!(" {}", format_duration(end - start)),
        _ => String::new(),
    };
    let status = match call.status {
        ToolStatus::Pending => "⋯ pending".to_string(),
        ToolStatus::Running => "⏳ running".to_string(),
        ToolStatus::Completed => format!("✓{duration}"),
        ToolStatus::Error => {
            let error = truncate_chars(&one_line(&call.error), 120);
            if error.is_empty() {
                format!("✗ failed{duration}")
            } else {
                format!("✗ failed{duration}: {error}")
            }
        }
    };
    format!("🔧 **{}**{argument} · {status}", call.tool)
}

/// A quoted, shortened summary of the model's reasoning: its opening words, not a wall of text.
pub fn reasoning_line(text: &str) -> Option<String> {
    let collapsed = one_line(text);
    if collapsed.is_empty() {
        return None;
    }
    Some(format!(
        "> 💭 _{}_",
        truncate_chars(&collapsed, REASONING_SUMMARY_CHARS).replace('_', "\\_")
    ))
}

fn child_line(child: &ChildSummary) -> String {
    let title = if child.title.is_empty() {
        "subagent".to_string()
    } else {
        truncate_chars(&one_line(&child.title), 60)
    };
    let calls = match child.tool_calls {
        0 => String::new(),
        1 => " · 1 tool call".to_string(),
        n => format!(" · {n} tool calls"),
    };
    let state = if child.finished {
        " · ✓ done".to_string()
    } else if let Some(tool) = &child.current_tool {
        format!(" · ⏳ {tool}")
    } else {
        " · ⏳ working".to_string()
    };
    format!("🤖 subagent **{title}**{calls}{state}")
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    Stopped,
    Failed(String),
    /// The session went idle without OpenCode finishing the answer (it was restarted mid-answer):
    /// what the reply shows is only part of it.
    Interrupted,
}

/// Ends the reply of an answer OpenCode never finished, so no one reads it as whole.
pub const INCOMPLETE_NOTE: &str =
    "_⚠️ This answer is incomplete: OpenCode stopped before finishing it._";

/// `text` with the owner's mention on a line of its own at the end, when `owner` is given.
/// Mattermost notifies on a mention only when the post is created, never on an edit.
pub fn with_mention(text: &str, owner: Option<&str>) -> String {
    match owner {
        Some(owner) if !owner.is_empty() => format!("{text}\n@{owner}"),
        _ => text.to_string(),
    }
}

/// Whether a turn's completion line mentions the owner: a failed or interrupted answer is an error,
/// a finished one only when it took long enough; a stop was the owner's own doing.
pub fn completion_mentions(
    notify: &crate::config::Notify,
    outcome: &Outcome,
    elapsed: std::time::Duration,
) -> bool {
    match outcome {
        Outcome::Done => notify.mentions_done(elapsed),
        Outcome::Failed(_) | Outcome::Interrupted => notify.errors,
        Outcome::Stopped => false,
    }
}

/// The short line posted as a new post when a turn ends, so the owner's phone is notified.
pub fn completion_line(outcome: &Outcome, elapsed_ms: u64, tokens: Tokens, cost: f64) -> String {
    let mut line = match outcome {
        Outcome::Done => format!("✅ Done in {}", format_duration(elapsed_ms)),
        Outcome::Stopped => format!("⏹️ Stopped after {}", format_duration(elapsed_ms)),
        Outcome::Failed(error) => format!(
            "⚠️ Failed after {}: {}",
            format_duration(elapsed_ms),
            truncate_chars(&one_line(error), 300)
        ),
        Outcome::Interrupted => format!("⚠️ Interrupted after {}", format_duration(elapsed_ms)),
    };
    let total = tokens.input + tokens.output + tokens.reasoning;
    if total > 0 {
        line.push_str(&format!(
            " · {} tokens ({} in, {} out)",
            format_tokens(total),
            format_tokens(tokens.input),
            format_tokens(tokens.output + tokens.reasoning)
        ));
    }
    if cost > 0.0 {
        line.push_str(&format!(" · {}", format_cost(cost)));
    }
    if *outcome == Outcome::Interrupted {
        line.push_str(
            "\nOpenCode stopped before finishing this answer, so the reply above is incomplete. \
             To run it again, react 🔁 on your message or send it again.",
        );
    }
    line
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Inline code that survives backticks inside the text.
fn inline_code(text: &str) -> String {
    if text.contains('`') {
        format!("`` {text} ``")
    } else {
        format!("`{text}`")
    }
}

#[cfg(test)]
mod unfinished_tests {
    use super::*;

    #[test]
    fn unfinished_replies_are_recognised_by_their_last_block() {
        assert!(is_unfinished_reply("Half an answer\n\n_⏳ working…_"));
        assert!(is_unfinished_reply(&format!("Half\n\n{INTERRUPTED_NOTE}")));
        assert!(!is_unfinished_reply("A finished answer."));
        assert!(!is_unfinished_reply(
            "_⏳ working…_ is mentioned\n\nbut the answer goes on"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: &str, body: PartBody) -> Part {
        Part {
            id: id.into(),
            message_id: "msg_1".into(),
            body,
        }
    }

    fn bash(status: ToolStatus) -> ToolCall {
        ToolCall {
            tool: "bash".into(),
            status,
            main_argument: "echo   hi\nthere".into(),
            title: String::new(),
            error: String::new(),
            started_ms: Some(1_000),
            ended_ms: (status == ToolStatus::Completed).then_some(1_300),
        }
    }

    #[test]
    fn reply_shows_reasoning_tools_and_text_in_order() {
        let parts = [
            part(
                "a",
                PartBody::Reasoning("Let me think\nabout this carefully.".into()),
            ),
            part("b", PartBody::Tool(bash(ToolStatus::Completed))),
            part("c", PartBody::Other("step-finish".into())),
            part("d", PartBody::Text("The answer is **42**.\n".into())),
        ];
        let refs: Vec<&Part> = parts.iter().collect();
        assert_eq!(
            reply_body(&refs, &[], Some("working…")),
            "> 💭 _Let me think about this carefully._\n\n\
             🔧 **bash** `echo hi there` · ✓ 0.3s\n\n\
             The answer is **42**.\n\n\
             _⏳ working…_"
        );
        assert_eq!(
            reply_body(&refs, &[], None),
            "> 💭 _Let me think about this carefully._\n\n\
             🔧 **bash** `echo hi there` · ✓ 0.3s\n\n\
             The answer is **42**."
        );
    }

    #[test]
    fn tool_lines_show_each_status() {
        assert_eq!(
            tool_line(&bash(ToolStatus::Running)),
            "🔧 **bash** `echo hi there` · ⏳ running"
        );
        let mut failed = bash(ToolStatus::Error);
        failed.ended_ms = Some(3_000);
        failed.error = "exit status 1".into();
        assert_eq!(
            tool_line(&failed),
            "🔧 **bash** `echo hi there` · ✗ failed 2.0s: exit status 1"
        );
        let mut ticks = bash(ToolStatus::Pending);
        ticks.main_argument = "echo `date`".into();
        assert_eq!(
            tool_line(&ticks),
            "🔧 **bash** `` echo `date` `` · ⋯ pending"
        );
    }

    #[test]
    fn mentions_follow_the_notify_setting() {
        use crate::config::Notify;
        use std::time::Duration;
        let (short, long) = (Duration::from_secs(5), Duration::from_secs(600));
        let default = Notify::default();
        let failed = Outcome::Failed("boom".into());
        assert!(!completion_mentions(&default, &Outcome::Done, short));
        assert!(completion_mentions(&default, &Outcome::Done, long));
        assert!(completion_mentions(&default, &failed, short));
        assert!(completion_mentions(&default, &Outcome::Interrupted, short));
        assert!(!completion_mentions(&default, &Outcome::Stopped, long));
        let always = Notify {
            done_after: Some(Duration::ZERO),
            ..Notify::NONE
        };
        assert!(completion_mentions(&always, &Outcome::Done, Duration::ZERO));
        assert!(!completion_mentions(&always, &failed, short), "errors off");
        for outcome in [Outcome::Done, failed.clone(), Outcome::Interrupted] {
            assert!(!completion_mentions(&Notify::NONE, &outcome, long));
        }
        assert_eq!(with_mention("✅ Done", Some("alice")), "✅ Done\n@alice");
        assert_eq!(with_mention("✅ Done", None), "✅ Done");
    }

    #[test]
    fn completion_line_reports_time_tokens_and_cost() {
        let tokens = Tokens {
            input: 1_000,
            output: 200,
            reasoning: 34,
            ..Tokens::default()
        };
        let line = completion_line(&Outcome::Done, 12_300, tokens, 0.0012);
        assert!(line.starts_with("✅ Done in 12s"), "{line}");
        assert!(line.contains("tokens"), "{line}");
        assert!(line.contains("$0.0012"), "{line}");
        assert_eq!(
            completion_line(&Outcome::Stopped, 800, Tokens::default(), 0.0),
            "⏹️ Stopped after 0.8s"
        );
    }

    #[test]
    fn an_interrupted_answer_says_it_is_incomplete_and_how_to_run_it_again() {
        assert_eq!(
            completion_line(&Outcome::Interrupted, 12_300, Tokens::default(), 0.0),
            "⚠️ Interrupted after 12s\nOpenCode stopped before finishing this answer, so the reply \
             above is incomplete. To run it again, react 🔁 on your message or send it again."
        );
        assert!(!is_unfinished_reply(&format!(
            "partial\n\n{INCOMPLETE_NOTE}"
        )));
    }

    #[test]
    fn root_post_names_the_session_and_says_where_replies_go() {
        let info = SessionInfo {
            id: "ses_1a2b3c4d5e6fAbCdEfGhIjKlMn".into(),
            slug: "neon-eagle".into(),
            title: String::new(),
            directory: "/home/me/proj".into(),
            created_ms: 1_795_329_245_123,
            ..SessionInfo::default()
        };
        let root = root_post(&info, "!", None);
        assert!(root.starts_with("#### 🧵 neon eagle\n"), "{root}");
        assert!(!root.contains("🖥"), "{root}");
        let named = root_post(&info, "!", Some("build"));
        assert!(named.contains("project **proj** · 🖥 build\n"), "{named}");
        assert!(root.contains("`neon-eagle`"));
        assert!(root.contains("id `GhIjKlMn`"), "{root}");
        assert!(root.contains("project **proj**"));
        assert!(root.contains("`/home/me/proj`"));
        assert!(root.contains("2026-11-22 06:34 UTC"));
        assert!(root.contains("Replies in this thread go to this session"));
    }
}
