//! The texts of what the bridge asks the owner in a session's thread (permissions, questions), the
//! parsing of the owner's answers, and the `!todo`, `!model`, `!agent` and `!help` texts. All pure, and
//! short enough to read on a phone.

use crate::command::THREAD_USAGE;
use crate::opencode::{
    AgentChoice, ModelChoice, ModelRef, PermissionReply, PermissionRequest, Question,
    QuestionRequest, Todo,
};
use crate::render::truncate_chars;

/// Who answered a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The owner, from the thread.
    Owner,
    /// Someone in OpenCode itself (the TUI, another client).
    Elsewhere,
}

/// The longest command or metadata value shown; a heredoc can be huge and the post has a limit.
const MAX_SHOWN_CHARS: usize = 3000;
/// Metadata values longer than this are left out of the detail list (they are rarely useful).
const MAX_DETAIL_CHARS: usize = 300;
/// How many close matches an error about an unknown model lists.
const MAX_SUGGESTIONS: usize = 8;

// =========================================================================================================
// Permissions
// =========================================================================================================

/// The post that asks the owner to allow or reject a tool call.
pub fn permission_post(request: &PermissionRequest, directory: &str, prefix: &str) -> String {
    let always = if request.always.is_empty() {
        String::new()
    } else {
        format!(" {}", code_list(&request.always))
    };
    format!(
        "🔐 **Permission needed** · {}\n{}\n\n\
         React ✅ or 👍 to allow once, 🔓 to always allow{always}, ❌ or 👎 to reject.\n\
         Or reply `{prefix}allow`, `{prefix}always`, or `{prefix}deny [message]` (the message tells the \
         agent why).",
        inline_code(&request.permission),
        permission_body(request, directory),
    )
}

/// The permission post once answered: the same request, with the decision instead of the instructions.
pub fn permission_decided(
    request: &PermissionRequest,
    directory: &str,
    decision: PermissionReply,
    by: DecidedBy,
    message: Option<&str>,
) -> String {
    let mut outcome = match decision {
        PermissionReply::Once => "✅ **Allowed once**".to_string(),
        PermissionReply::Always if request.always.is_empty() => "🔓 **Always allowed**".to_string(),
        PermissionReply::Always => {
            format!("🔓 **Always allowed**: {}", code_list(&request.always))
        }
        PermissionReply::Reject => "❌ **Rejected**".to_string(),
    };
    if by == DecidedBy::Elsewhere {
        outcome.push_str(" (answered in OpenCode)");
    }
    if let Some(message) = message.map(str::trim).filter(|m| !m.is_empty()) {
        outcome.push_str(&format!("\n> {}", quote_lines(message)));
    }
    format!(
        "🔐 **Permission** · {}\n{}\n\n{outcome}",
        inline_code(&request.permission),
        permission_body(request, directory),
    )
}

/// What is asked for, in a code block, the other details, and where.
fn permission_body(request: &PermissionRequest, directory: &str) -> String {
    let metadata = |key: &str| {
        request
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    let main = match metadata("command") {
        Some(command) => command.to_string(),
        None => request.patterns.join("\n"),
    };
    let mut body = String::new();
    if !main.trim().is_empty() {
        body.push_str(&code_block(&truncate_chars(&main, MAX_SHOWN_CHARS), ""));
        body.push('\n');
    }
    for (key, value) in &request.metadata {
        let shown_elsewhere = key == "command" || key == "diff" || *value == main;
        if shown_elsewhere
            || value.trim().is_empty()
            || value.contains('\n')
            || value.chars().count() > MAX_DETAIL_CHARS
        {
            continue;
        }
        body.push_str(&format!("{key}: {}\n", inline_code(value)));
    }
    if let Some(diff) = metadata("diff") {
        body.push_str(&code_block(&truncate_chars(diff, MAX_SHOWN_CHARS), "diff"));
        body.push('\n');
    }
    body.push_str(&format!("in {}", inline_code(directory)));
    body
}

// =========================================================================================================
// Questions
// =========================================================================================================

/// The post for question `index` (0-based) of a request; the questions are asked one at a time.
pub fn question_post(request: &QuestionRequest, index: usize, prefix: &str) -> String {
    let Some(question) = request.questions.get(index) else {
        return format!("❓ Question {} does not exist in this request.", index + 1);
    };
    let mut post = question_heading(request, index, question);
    if !question.options.is_empty() {
        post.push('\n');
    }
    for (number, option) in question.options.iter().enumerate() {
        post.push_str(&format!(
            "\n{}. **{}**",
            number + 1,
            one_line(&option.label)
        ));
        let description = one_line(&option.description);
        if !description.is_empty() {
            post.push_str(&format!(" — {description}"));
        }
    }
    post.push_str("\n\n");
    post.push_str(&answer_instructions(question, prefix));
    post
}

/// How to answer `question`, as one short paragraph.
fn answer_instructions(question: &Question, prefix: &str) -> String {
    let count = question.options.len();
    let mut ways = Vec::new();
    match (count, question.multiple) {
        (0, _) => {}
        (1, _) => ways.push("reply `1` or the label".to_string()),
        (_, false) => ways.push(format!("reply with a number (1–{count}) or the label")),
        (_, true) => ways.push(format!(
            "reply with one or more numbers (1–{count}), like `1 3` or `1,3`, or labels separated \
             by commas"
        )),
    }
    if question.custom || count == 0 {
        ways.push("type your own answer".to_string());
    }
    if (1..=9).contains(&count) {
        let last = keycap(count);
        let pick = if question.multiple {
            "to choose one option"
        } else {
            "to choose"
        };
        let range = if count == 1 {
            last
        } else {
            format!("{}…{last}", keycap(1))
        };
        ways.push(format!("react {range} {pick}"));
    }
    let ways = match ways.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}, or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    };
    let mut text = capitalise(&ways);
    if !text.is_empty() {
        text.push_str(". ");
    }
    text.push_str(&format!("`{prefix}skip` declines."));
    text
}

/// A question once answered: the question and the chosen answer, without the instructions.
pub fn question_answered(request: &QuestionRequest, index: usize, answer: &[String]) -> String {
    let Some(question) = request.questions.get(index) else {
        return format!("❓ Question {} does not exist in this request.", index + 1);
    };
    let answer = if answer.is_empty() {
        "(nothing)".to_string()
    } else {
        answer
            .iter()
            .map(|a| format!("**{}**", one_line(a)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{}\n\n✅ Answered: {answer}",
        question_heading(request, index, question)
    )
}

/// A question request once declined, by the owner or elsewhere.
pub fn question_skipped(request: &QuestionRequest) -> String {
    let mut post = String::from("⏭️ **Question skipped**: the agent was told it got no answer.");
    for question in &request.questions {
        let header = one_line(&question.header);
        let text = one_line(&question.question);
        post.push_str("\n> ");
        if !header.is_empty() {
            post.push_str(&format!("**{header}** · "));
        }
        post.push_str(&text);
    }
    post
}

fn question_heading(request: &QuestionRequest, index: usize, question: &Question) -> String {
    let mut heading = String::from("❓ **Question");
    if request.questions.len() > 1 {
        heading.push_str(&format!(" {} of {}", index + 1, request.questions.len()));
    }
    heading.push_str("**");
    let header = one_line(&question.header);
    if !header.is_empty() {
        heading.push_str(&format!(" · {header}"));
    }
    format!("{heading}\n{}", question.question.trim())
}

/// The labels the owner's reply chooses. Accepted, in order: option numbers (several only when the
/// question allows several), an option's exact label (case-insensitive; comma-separated labels when
/// several are allowed), and any other text when the question accepts a typed answer.
pub fn parse_answer(question: &Question, text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    let count = question.options.len();
    if text.is_empty() {
        return Err(accepted(question, "The answer is empty"));
    }
    if let Some(numbers) = option_numbers(text) {
        let out_of_range = numbers.iter().find(|n| **n == 0 || **n > count);
        match out_of_range {
            // A number that is no option may be a typed answer ("how many workers?").
            Some(_) if question.custom => return Ok(vec![text.to_string()]),
            Some(n) => return Err(accepted(question, &format!("There is no option {n}"))),
            None if numbers.len() > 1 && !question.multiple => {
                return Err(accepted(question, "Only one option can be chosen"));
            }
            None => {
                let mut labels: Vec<String> = Vec::new();
                for n in numbers {
                    let label = &question.options[n - 1].label;
                    if !labels.contains(label) {
                        labels.push(label.clone());
                    }
                }
                return Ok(labels);
            }
        }
    }
    if let Some(label) = find_label(question, text) {
        return Ok(vec![label]);
    }
    if question.multiple && text.contains(',') {
        let labels: Option<Vec<String>> = text
            .split(',')
            .map(|part| find_label(question, part))
            .collect();
        if let Some(labels) = labels {
            let mut unique: Vec<String> = Vec::new();
            for label in labels {
                if !unique.contains(&label) {
                    unique.push(label);
                }
            }
            return Ok(unique);
        }
    }
    if question.custom || count == 0 {
        return Ok(vec![text.to_string()]);
    }
    Err(accepted(question, "That is not one of the options"))
}

/// `1`, `1 3`, `1,3`, `1, 3`: the numbers, or None when anything else is in the text.
fn option_numbers(text: &str) -> Option<Vec<usize>> {
    let tokens: Vec<&str> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|token| !token.is_empty())
        .collect();
    if tokens.is_empty() {
        return None;
    }
    tokens
        .iter()
        .map(|token| {
            let digits = token.strip_suffix('.').unwrap_or(token);
            if digits.chars().all(|c| c.is_ascii_digit()) && !digits.is_empty() {
                // Numbers too long for usize are simply no option.
                Some(digits.parse().unwrap_or(usize::MAX))
            } else {
                None
            }
        })
        .collect()
}

fn find_label(question: &Question, text: &str) -> Option<String> {
    let text = text.trim().to_lowercase();
    question
        .options
        .iter()
        .find(|option| option.label.trim().to_lowercase() == text)
        .map(|option| option.label.clone())
}

/// An error that says what went wrong and what is accepted.
fn accepted(question: &Question, problem: &str) -> String {
    let count = question.options.len();
    let what = match (count, question.multiple) {
        (0, _) => "any text".to_string(),
        (1, _) => "`1` or the option's label".to_string(),
        (_, false) => format!("one number from 1 to {count} or an option's label"),
        (_, true) => format!("numbers from 1 to {count} (like `1 3`) or option labels"),
    };
    let typed = if question.custom && count > 0 {
        ", or your own answer"
    } else {
        ""
    };
    format!("{problem}. Reply with {what}{typed}.")
}

// =========================================================================================================
// Todo list, help, models and agents
// =========================================================================================================

/// The session's todo list as a compact checklist.
pub fn todo_post(todos: &[Todo]) -> String {
    if todos.is_empty() {
        return "📋 **Todo**: the agent has no todo list in this session.".to_string();
    }
    let counted = todos.iter().filter(|t| t.status != "cancelled").count();
    let done = todos.iter().filter(|t| t.status == "completed").count();
    let mut post = format!("📋 **Todo** · {done}/{counted} done");
    for todo in todos {
        let content = one_line(&todo.content);
        let line = match todo.status.as_str() {
            "completed" => format!("☑ {content}"),
            "in_progress" => format!("◐ **{content}**"),
            "cancelled" => format!("✗ ~~{content}~~"),
            _ => format!("☐ {content}"),
        };
        post.push('\n');
        post.push_str(&line);
        if todo.priority == "high" && todo.status != "completed" && todo.status != "cancelled" {
            post.push_str(" ❗");
        }
    }
    post
}

/// Every thread command and reaction.
pub fn thread_help(prefix: &str) -> String {
    let mut help = String::from(
        "**In this thread**, a reply is sent to the agent as your next prompt; files attached to it \
         go along.\n\n**Commands**",
    );
    for (_, usage, description) in THREAD_USAGE {
        help.push_str(&format!("\n- `{prefix}{usage}`: {description}"));
    }
    help.push_str(
        "\n\n**Reactions**\n\
         - on a permission: ✅ or 👍 allow once, 🔓 always allow, ❌ or 👎 reject\n\
         - on a question: 1️⃣ … 9️⃣ choose that option\n\
         - 🛑 stop the current run, 🔁 run the last prompt again",
    );
    help
}

/// The `!model` listing, grouped by provider, the current choice marked.
pub fn model_list(choices: &[ModelChoice], current: Option<&ModelRef>) -> String {
    if choices.is_empty() {
        return "🧠 **Models**: the server offers none; check the providers in OpenCode's config."
            .to_string();
    }
    let current_text = current.map_or("the session's default".to_string(), |model| {
        inline_code(&model_name(model))
    });
    let mut post = format!(
        "🧠 **Models** · now {current_text}\nChoose with the `model` command and a \
         `provider/model` or a model id."
    );
    // Providers in the order they first appear, each with all its models.
    let mut providers: Vec<&str> = Vec::new();
    for choice in choices {
        if !providers.contains(&choice.model.provider_id.as_str()) {
            providers.push(&choice.model.provider_id);
        }
    }
    for provider in providers {
        post.push_str(&format!("\n\n**{}**", one_line(provider)));
        for choice in choices.iter().filter(|c| c.model.provider_id == provider) {
            post.push_str(&model_line(choice, current));
        }
    }
    post
}

/// One model as a list item: `provider/model`, its display name, and whether it is the default or
/// the current choice.
fn model_line(choice: &ModelChoice, current: Option<&ModelRef>) -> String {
    let mut line = format!("\n- {}", inline_code(&model_name(&choice.model)));
    let name = one_line(&choice.name);
    if !name.is_empty() && name != choice.model.model_id {
        line.push_str(&format!(" {name}"));
    }
    if choice.is_default {
        line.push_str(" · default");
    }
    if current == Some(&choice.model) {
        line.push_str(" · ✅ current");
    }
    line
}

/// The `!agent` listing: only agents that can run a prompt, the current one marked.
pub fn agent_list(choices: &[AgentChoice], current: Option<&str>) -> String {
    let primary: Vec<&AgentChoice> = choices.iter().filter(|a| is_primary(a)).collect();
    if primary.is_empty() {
        return "🤖 **Agents**: the server offers none that can run a prompt.".to_string();
    }
    let current_text = current.map_or("the session's default".to_string(), inline_code);
    let mut post =
        format!("🤖 **Agents** · now {current_text}\nChoose with the `agent` command and a name.");
    for agent in primary {
        post.push_str(&format!("\n- {}", inline_code(&agent.name)));
        let description = truncate_chars(&one_line(&agent.description), 120);
        if !description.is_empty() {
            post.push_str(&format!(": {description}"));
        }
        if current.is_some_and(|c| c.eq_ignore_ascii_case(&agent.name)) {
            post.push_str(" · ✅ current");
        }
    }
    let subagents = choices.len() - choices.iter().filter(|a| is_primary(a)).count();
    if subagents > 0 {
        post.push_str(&format!(
            "\n\n{subagents} subagent{} not listed: they only run inside a task.",
            if subagents == 1 { " is" } else { "s are" }
        ));
    }
    post
}

/// The model `query` names: an exact `provider/model`, or a model id only one provider offers
/// (both case-insensitive). Otherwise an error listing close matches.
pub fn match_model(choices: &[ModelChoice], query: &str) -> Result<ModelRef, String> {
    let query = query.trim();
    if query.is_empty() {
        return Err("Name a model: `provider/model` or a model id.".to_string());
    }
    let lower = query.to_lowercase();
    if let Some(choice) = choices
        .iter()
        .find(|c| model_name(&c.model).to_lowercase() == lower)
    {
        return Ok(choice.model.clone());
    }
    if !query.contains('/') {
        let same_id: Vec<&ModelChoice> = choices
            .iter()
            .filter(|c| c.model.model_id.to_lowercase() == lower)
            .collect();
        match same_id.as_slice() {
            [one] => return Ok(one.model.clone()),
            [] => {}
            several => {
                return Err(format!(
                    "Several providers offer {}: {}. Name one as `provider/model`.",
                    inline_code(query),
                    several
                        .iter()
                        .map(|c| inline_code(&model_name(&c.model)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    // Close matches: the model part of the query, or the whole query, inside a name.
    let needle = lower.rsplit('/').next().unwrap_or(&lower).to_string();
    let close: Vec<String> = choices
        .iter()
        .filter(|c| {
            let full = model_name(&c.model).to_lowercase();
            full.contains(&lower)
                || (!needle.is_empty() && full.contains(&needle))
                || c.name.to_lowercase().contains(&needle)
        })
        .map(|c| inline_code(&model_name(&c.model)))
        .collect();
    let hint = match close.len() {
        0 => "The `model` command without a name lists them.".to_string(),
        n if n > MAX_SUGGESTIONS => format!(
            "Close: {} and {} more.",
            close[..MAX_SUGGESTIONS].join(", "),
            n - MAX_SUGGESTIONS
        ),
        _ => format!("Close: {}.", close.join(", ")),
    };
    Err(format!(
        "No model {} on this server. {hint}",
        inline_code(query)
    ))
}

/// The agent `query` names (case-insensitive), as the server spells it. Subagents cannot run a prompt.
pub fn match_agent(choices: &[AgentChoice], query: &str) -> Result<String, String> {
    let query = query.trim();
    let primary: Vec<String> = choices
        .iter()
        .filter(|a| is_primary(a))
        .map(|a| inline_code(&a.name))
        .collect();
    let found = choices.iter().find(|a| a.name.eq_ignore_ascii_case(query));
    match found {
        Some(agent) if is_primary(agent) => Ok(agent.name.clone()),
        Some(agent) => Err(format!(
            "{} is a subagent: it only runs inside a task. Choose one of: {}.",
            inline_code(&agent.name),
            primary.join(", ")
        )),
        None if primary.is_empty() => Err(format!(
            "No agent {}, and the server offers none that can run a prompt.",
            inline_code(query)
        )),
        None => Err(format!(
            "No agent {}. Choose one of: {}.",
            inline_code(query),
            primary.join(", ")
        )),
    }
}

fn is_primary(agent: &AgentChoice) -> bool {
    agent.mode == "primary" || agent.mode == "all"
}

fn model_name(model: &ModelRef) -> String {
    format!("{}/{}", model.provider_id, model.model_id)
}

// =========================================================================================================
// Markdown helpers
// =========================================================================================================

/// A fenced code block that `content` cannot close early: the fence is longer than any run of
/// backticks inside.
fn code_block(content: &str, language: &str) -> String {
    let fence = "`".repeat(longest_backtick_run(content).max(2) + 1);
    format!("{fence}{language}\n{}\n{fence}", content.trim_end())
}

/// Inline code that shows any text literally: more backticks than the text has in a row, and
/// padding when the text starts or ends with one. Line breaks become spaces.
fn inline_code(text: &str) -> String {
    let text = one_line(text);
    if text.is_empty() {
        return "\"\"".to_string();
    }
    let ticks = "`".repeat(longest_backtick_run(&text) + 1);
    let pad = if text.starts_with('`') || text.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{ticks}{pad}{text}{pad}{ticks}")
}

fn code_list(items: &[String]) -> String {
    items
        .iter()
        .map(|item| inline_code(item))
        .collect::<Vec<_>>()
        .join(", ")
}

fn longest_backtick_run(text: &str) -> usize {
    text.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

/// Line breaks and runs of whitespace become single spaces, for text in a list item or heading.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every line of a multi-line message inside one block quote.
fn quote_lines(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join("\n> ")
}

/// The keycap emoji of a digit, like 3️⃣; it shows the same in posts and in push notifications.
fn keycap(digit: usize) -> String {
    format!("{digit}\u{FE0F}\u{20E3}")
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::QuestionOption;

    fn bash_request(command: &str) -> PermissionRequest {
        PermissionRequest {
            id: "per_1".into(),
            session_id: "ses_1".into(),
            permission: "bash".into(),
            patterns: vec![command.into()],
            always: vec!["git push *".into()],
            metadata: vec![
                ("command".into(), command.into()),
                ("description".into(), "Push the branch".into()),
            ],
        }
    }

    #[test]
    fn permission_post_shows_the_request_and_every_way_to_answer() {
        let post = permission_post(&bash_request("git push origin main"), "/home/a/proj", "!");
        assert!(
            post.starts_with("🔐 **Permission needed** · `bash`\n"),
            "{post}"
        );
        assert!(post.contains("```\ngit push origin main\n```"), "{post}");
        assert!(post.contains("description: `Push the branch`"), "{post}");
        assert!(post.contains("in `/home/a/proj`"), "{post}");
        for needle in [
            "✅",
            "👍",
            "🔓",
            "❌",
            "👎",
            "`git push *`",
            "`!allow`",
            "`!always`",
            "`!deny [message]`",
        ] {
            assert!(post.contains(needle), "{needle} missing from {post}");
        }
        // The command appears once: the pattern equal to it is not repeated as a detail.
        assert_eq!(post.matches("git push origin main").count(), 1, "{post}");
        let other_prefix = permission_post(&bash_request("ls"), "/", "..");
        assert!(
            other_prefix.contains("`..deny [message]`"),
            "{other_prefix}"
        );
    }

    #[test]
    fn permission_post_for_an_edit_shows_the_file_and_the_diff() {
        let request = PermissionRequest {
            permission: "edit".into(),
            patterns: vec!["src/main.rs".into()],
            metadata: vec![
                ("filepath".into(), "/home/a/proj/src/main.rs".into()),
                ("diff".into(), "-old\n+new".into()),
            ],
            ..PermissionRequest::default()
        };
        let post = permission_post(&request, "/home/a/proj", "!");
        assert!(post.contains("```\nsrc/main.rs\n```"), "{post}");
        assert!(
            post.contains("filepath: `/home/a/proj/src/main.rs`"),
            "{post}"
        );
        assert!(post.contains("```diff\n-old\n+new\n```"), "{post}");
        // No "always" patterns: nothing empty is offered.
        assert!(post.contains("🔓 to always allow, ❌"), "{post}");
    }

    #[test]
    fn backticks_in_a_command_cannot_close_the_block() {
        let command = "echo `date`\ncat <<EOF\n```\nEOF";
        let post = permission_post(&bash_request(command), "/d", "!");
        assert!(post.contains(&format!("````\n{command}\n````")), "{post}");
        assert_eq!(code_block("a````b", "").lines().next(), Some("`````"));
        assert_eq!(inline_code("a`b"), "``a`b``");
        assert_eq!(inline_code("`x"), "`` `x ``");
        assert_eq!(inline_code("two\nlines"), "`two lines`");
    }

    #[test]
    fn long_commands_are_shortened() {
        let command = "x".repeat(20_000);
        let post = permission_post(&bash_request(&command), "/d", "!");
        assert!(post.chars().count() < 5_000, "{}", post.chars().count());
        assert!(post.contains('…'));
    }

    #[test]
    fn permission_decided_replaces_the_instructions_with_the_decision() {
        let request = bash_request("rm -rf target");
        let cases = [
            (
                PermissionReply::Once,
                DecidedBy::Owner,
                None,
                "✅ **Allowed once**",
            ),
            (
                PermissionReply::Always,
                DecidedBy::Owner,
                None,
                "🔓 **Always allowed**: `git push *`",
            ),
            (
                PermissionReply::Reject,
                DecidedBy::Owner,
                Some("not now\nuse cargo clean"),
                "❌ **Rejected**\n> not now\n> use cargo clean",
            ),
            (
                PermissionReply::Once,
                DecidedBy::Elsewhere,
                None,
                "✅ **Allowed once** (answered in OpenCode)",
            ),
        ];
        for (decision, by, message, expected) in cases {
            let post = permission_decided(&request, "/d", decision, by, message);
            assert!(post.ends_with(expected), "{post}");
            assert!(post.contains("```\nrm -rf target\n```"), "{post}");
            assert!(!post.contains("React"), "{post}");
            assert!(!post.contains("!allow"), "{post}");
        }
        let blank = permission_decided(
            &request,
            "/d",
            PermissionReply::Reject,
            DecidedBy::Owner,
            Some("  "),
        );
        assert!(blank.ends_with("❌ **Rejected**"), "{blank}");
    }

    fn option(label: &str, description: &str) -> QuestionOption {
        QuestionOption {
            label: label.into(),
            description: description.into(),
        }
    }

    fn question(multiple: bool, custom: bool) -> Question {
        Question {
            question: "Which database?".into(),
            header: "Database".into(),
            options: vec![
                option("Postgres", "the default"),
                option("SQLite", ""),
                option("MySQL", "if you must"),
            ],
            multiple,
            custom,
        }
    }

    fn request(questions: Vec<Question>) -> QuestionRequest {
        QuestionRequest {
            id: "que_1".into(),
            session_id: "ses_1".into(),
            questions,
        }
    }

    #[test]
    fn question_post_lists_options_and_how_to_answer() {
        let single = request(vec![question(false, true)]);
        let post = question_post(&single, 0, "!");
        assert_eq!(
            post,
            "❓ **Question** · Database\nWhich database?\n\
             \n1. **Postgres** — the default\n2. **SQLite**\n3. **MySQL** — if you must\n\
             \nReply with a number (1–3) or the label, type your own answer, or react 1️⃣…3️⃣ to \
             choose. `!skip` declines."
        );
        let several = request(vec![question(false, false), question(true, false)]);
        let second = question_post(&several, 1, "!");
        assert!(
            second.starts_with("❓ **Question 2 of 2** · Database\n"),
            "{second}"
        );
        assert!(second.contains("like `1 3` or `1,3`"), "{second}");
        assert!(!second.contains("your own answer"), "{second}");
        assert!(
            second.contains("react 1️⃣…3️⃣ to choose one option"),
            "{second}"
        );
        assert!(question_post(&several, 5, "!").contains("does not exist"));
    }

    #[test]
    fn question_without_options_or_with_many() {
        let free = Question {
            question: "Name?".into(),
            custom: false,
            ..Question::default()
        };
        let post = question_post(&request(vec![free.clone()]), 0, "!");
        assert!(
            post.ends_with("Type your own answer. `!skip` declines."),
            "{post}"
        );
        assert_eq!(parse_answer(&free, " Ada "), Ok(vec!["Ada".to_string()]));
        let many = Question {
            options: (1..=12).map(|n| option(&format!("o{n}"), "")).collect(),
            ..Question::default()
        };
        let post = question_post(&request(vec![many.clone()]), 0, "!");
        assert!(
            !post.contains("react"),
            "no digit reactions past nine: {post}"
        );
        assert_eq!(parse_answer(&many, "12"), Ok(vec!["o12".to_string()]));
    }

    #[test]
    fn answered_and_skipped_questions() {
        let several = request(vec![question(false, true), question(true, false)]);
        let post = question_answered(&several, 1, &["Postgres".into(), "MySQL".into()]);
        assert!(
            post.starts_with("❓ **Question 2 of 2** · Database\nWhich database?"),
            "{post}"
        );
        assert!(
            post.ends_with("✅ Answered: **Postgres**, **MySQL**"),
            "{post}"
        );
        assert!(!post.contains("skip"), "{post}");
        let skipped = question_skipped(&several);
        assert!(skipped.starts_with("⏭️ **Question skipped**"), "{skipped}");
        assert_eq!(
            skipped.matches("> **Database** · Which database?").count(),
            2
        );
    }

    #[test]
    fn parse_answer_accepts_numbers_labels_and_free_text() {
        let one = question(false, false);
        let many = question(true, false);
        let open = question(false, true);
        let ok = |labels: &[&str]| Ok(labels.iter().map(|l| l.to_string()).collect::<Vec<_>>());
        assert_eq!(parse_answer(&one, "2"), ok(&["SQLite"]));
        assert_eq!(parse_answer(&one, " 3. "), ok(&["MySQL"]));
        assert_eq!(parse_answer(&one, "sqlite"), ok(&["SQLite"]));
        assert_eq!(parse_answer(&many, "1 3"), ok(&["Postgres", "MySQL"]));
        assert_eq!(parse_answer(&many, "3,1, 3"), ok(&["MySQL", "Postgres"]));
        assert_eq!(
            parse_answer(&many, "mysql, Postgres"),
            ok(&["MySQL", "Postgres"])
        );
        assert_eq!(parse_answer(&open, "Oracle, sadly"), ok(&["Oracle, sadly"]));
        assert_eq!(parse_answer(&open, "7"), ok(&["7"]));
        for (question, text, says) in [
            (&one, "1 2", "Only one option"),
            (&one, "4", "no option 4"),
            (&one, "0", "no option 0"),
            (&one, "99999999999999999999999", "no option"),
            (&one, "Oracle", "not one of the options"),
            (&one, "", "empty"),
            (&many, "1 9", "no option 9"),
            (&many, "mysql, oracle", "not one of the options"),
        ] {
            let error = parse_answer(question, text).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
            assert!(error.contains("Reply with"), "{error}");
        }
        assert!(
            parse_answer(&open, "")
                .unwrap_err()
                .contains("your own answer")
        );
    }

    #[test]
    fn parse_answer_never_panics_and_only_returns_labels_or_the_text() {
        let pieces = [
            "1", "2", "9", "0", ",", " ", "\n", "postgres", "SQLite", "x", "é", "🦀", ".",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..4000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let text: String = (0..(state % 7) as usize)
                .map(|i| pieces[((state >> (i * 4)) % pieces.len() as u64) as usize])
                .collect();
            for q in [
                question(false, false),
                question(true, false),
                question(true, true),
            ] {
                let labels: Vec<&str> = q.options.iter().map(|o| o.label.as_str()).collect();
                match parse_answer(&q, &text) {
                    Ok(answer) => {
                        assert!(!answer.is_empty());
                        assert!(q.multiple || answer.len() == 1, "{text:?} {answer:?}");
                        for a in &answer {
                            assert!(
                                labels.contains(&a.as_str()) || (q.custom && a == text.trim()),
                                "{text:?} gave {a:?}"
                            );
                        }
                    }
                    Err(error) => assert!(error.contains("Reply with"), "{error}"),
                }
            }
        }
    }

    fn todo(content: &str, status: &str, priority: &str) -> Todo {
        Todo {
            id: content.into(),
            content: content.into(),
            status: status.into(),
            priority: priority.into(),
        }
    }

    #[test]
    fn todo_post_is_a_checklist_with_counts() {
        let post = todo_post(&[
            todo("Read the code", "completed", "high"),
            todo("Write\nthe fix", "in_progress", "high"),
            todo("Test it", "pending", "low"),
            todo("Port to Windows", "cancelled", "low"),
        ]);
        assert_eq!(
            post,
            "📋 **Todo** · 1/3 done\n☑ Read the code\n◐ **Write the fix** ❗\n☐ Test it\n\
             ✗ ~~Port to Windows~~"
        );
        assert!(todo_post(&[]).contains("no todo list"));
    }

    #[test]
    fn help_lists_every_command_and_reaction() {
        let help = thread_help("..");
        for (_, usage, _) in THREAD_USAGE {
            assert!(help.contains(&format!("`..{usage}`")), "{usage} missing");
        }
        for emoji in ["✅", "👍", "🔓", "❌", "👎", "1️⃣", "🛑", "🔁"] {
            assert!(help.contains(emoji), "{emoji} missing");
        }
    }

    fn model(provider: &str, id: &str, name: &str, is_default: bool) -> ModelChoice {
        ModelChoice {
            model: ModelRef {
                provider_id: provider.into(),
                model_id: id.into(),
            },
            name: name.into(),
            is_default,
        }
    }

    fn models() -> Vec<ModelChoice> {
        vec![
            model("anthropic", "claude-sonnet-4", "Claude Sonnet 4", true),
            model("anthropic", "claude-opus-4", "Claude Opus 4", false),
            model("openrouter", "claude-opus-4", "Claude Opus 4 (OR)", false),
            model("openai", "gpt-5", "GPT-5", true),
        ]
    }

    #[test]
    fn model_list_groups_by_provider_and_marks_current() {
        let choices = models();
        let current = choices[3].model.clone();
        let post = model_list(&choices, Some(&current));
        assert!(
            post.starts_with("🧠 **Models** · now `openai/gpt-5`\n"),
            "{post}"
        );
        assert!(post.contains("\n\n**anthropic**\n- `anthropic/claude-sonnet-4` Claude Sonnet 4 · default\n- `anthropic/claude-opus-4` Claude Opus 4\n"), "{post}");
        assert!(
            post.ends_with("- `openai/gpt-5` GPT-5 · default · ✅ current"),
            "{post}"
        );
        assert_eq!(post.matches("current").count(), 1, "{post}");
        assert!(model_list(&choices, None).contains("now the session's default"));
        let mut mixed = choices.clone();
        mixed.swap(1, 3);
        let grouped = model_list(&mixed, None);
        assert_eq!(grouped.matches("**anthropic**").count(), 1, "{grouped}");
        assert!(grouped.contains("**anthropic**\n- `anthropic/claude-sonnet-4` Claude Sonnet 4 · default\n- `anthropic/claude-opus-4`"), "{grouped}");
        assert!(model_list(&[], None).contains("offers none"));
    }

    #[test]
    fn match_model_exact_or_unique_id() {
        let choices = models();
        let found =
            |q: &str| match_model(&choices, q).map(|m| format!("{}/{}", m.provider_id, m.model_id));
        assert_eq!(found("openai/gpt-5"), Ok("openai/gpt-5".into()));
        assert_eq!(found(" OpenAI/GPT-5 "), Ok("openai/gpt-5".into()));
        assert_eq!(
            found("claude-sonnet-4"),
            Ok("anthropic/claude-sonnet-4".into())
        );
        let ambiguous = found("claude-opus-4").unwrap_err();
        assert!(
            ambiguous.contains("`anthropic/claude-opus-4`")
                && ambiguous.contains("`openrouter/claude-opus-4`"),
            "{ambiguous}"
        );
        let close = found("opus").unwrap_err();
        assert!(close.starts_with("No model `opus`"), "{close}");
        assert!(
            close.contains("Close: `anthropic/claude-opus-4`, `openrouter/claude-opus-4`."),
            "{close}"
        );
        let nothing = found("llama").unwrap_err();
        assert!(nothing.contains("without a name lists them"), "{nothing}");
        let wrong_provider = found("openai/claude-opus-4").unwrap_err();
        assert!(
            wrong_provider.contains("`anthropic/claude-opus-4`"),
            "{wrong_provider}"
        );
        assert!(found("").is_err());
    }

    fn agents() -> Vec<AgentChoice> {
        let agent = |name: &str, mode: &str, description: &str| AgentChoice {
            name: name.into(),
            description: description.into(),
            mode: mode.into(),
        };
        vec![
            agent("build", "primary", "Builds things"),
            agent("plan", "primary", "Plans\nwithout editing"),
            agent("general", "subagent", "For tasks"),
            agent("custom", "all", ""),
        ]
    }

    #[test]
    fn agent_list_shows_only_primary_agents() {
        let post = agent_list(&agents(), Some("plan"));
        assert_eq!(
            post,
            "🤖 **Agents** · now `plan`\nChoose with the `agent` command and a name.\n\
             - `build`: Builds things\n- `plan`: Plans without editing · ✅ current\n- `custom`\n\
             \n1 subagent is not listed: they only run inside a task."
        );
        assert!(agent_list(&[], None).contains("none"));
    }

    #[test]
    fn match_agent_by_name() {
        let choices = agents();
        assert_eq!(match_agent(&choices, "PLAN"), Ok("plan".into()));
        assert_eq!(match_agent(&choices, "custom"), Ok("custom".into()));
        let sub = match_agent(&choices, "general").unwrap_err();
        assert!(
            sub.contains("subagent") && sub.contains("`build`, `plan`, `custom`"),
            "{sub}"
        );
        let unknown = match_agent(&choices, "nope").unwrap_err();
        assert_eq!(
            unknown,
            "No agent `nope`. Choose one of: `build`, `plan`, `custom`."
        );
    }
}
