//! Thread commands (`!status`, `!stop`, `!model`, `!diff`, …): each answers in the thread.

use std::sync::Arc;

use crate::asks;
use crate::budget::Priority;
use crate::command::ThreadCommand;
use crate::files;
use crate::opencode::rest::{FileRead, OcError, Refusal};
use crate::opencode::{MessageInfo, ModelRef, PermissionReply, Role, Todo, Tokens};
use crate::render::{format_cost, format_duration, format_tokens, truncate_chars};

use super::{SentPost, Worker};

/// A diff longer than this goes as an attached `.diff` file instead of a code block.
const INLINE_DIFF_CHARS: usize = 6000;
const INLINE_DIFF_LINES: usize = 120;
/// How many messages `!status` reads to total the session's tokens and cost.
const STATUS_MESSAGES: usize = 1000;

impl Worker {
    pub(super) fn command(&mut self, command: ThreadCommand) {
        let prefix = self.prefix.clone();
        match command {
            ThreadCommand::Allow => self.answer_oldest_permission(PermissionReply::Once, None),
            ThreadCommand::Always => self.answer_oldest_permission(PermissionReply::Always, None),
            ThreadCommand::Deny { message } => {
                self.answer_oldest_permission(PermissionReply::Reject, message.as_deref())
            }
            ThreadCommand::Skip => self.skip_question(),
            ThreadCommand::Stop => self.stop_run(),
            // Handled with its post id by `steer`, before commands.
            ThreadCommand::Steer { .. } => {}
            ThreadCommand::Status => self.show_status(),
            ThreadCommand::Model { choice } => self.choose_model(choice.as_deref()),
            ThreadCommand::Agent { name } => self.choose_agent(name.as_deref()),
            ThreadCommand::Todo => self.show_todos(),
            ThreadCommand::Compact => self.compact(),
            ThreadCommand::Rename { title } => self.rename(&title),
            ThreadCommand::Diff => self.show_diff(),
            ThreadCommand::File { path } => self.send_file(&path),
            ThreadCommand::Help => {
                self.post_notice(&asks::thread_help(&prefix));
            }
            ThreadCommand::Unknown { name } => {
                self.post_notice(&format!(
                    "❓ Unknown command `{prefix}{name}`. `{prefix}help` lists the commands; the message was not sent to the session."
                ));
            }
            ThreadCommand::MissingArgument { command, usage } => {
                self.post_notice(&format!(
                    "❓ `{prefix}{command}` needs an argument: `{prefix}{usage}`"
                ));
            }
            ThreadCommand::UnexpectedArgument {
                command,
                usage,
                argument,
            } => {
                self.post_notice(&format!(
                    "❓ `{prefix}{command}` does not take `{argument}`: `{prefix}{usage}`"
                ));
            }
        }
    }

    /// `!steer <text>`: into the running turn with `delivery: "steer"` (OpenCode reads it when the
    /// current step ends); when nothing runs, or the server speaks v1, which cannot steer, an ordinary
    /// prompt. Returns false when the worker should stop.
    pub(super) fn steer(&mut self, post_id: String, text: String) -> bool {
        if !self.tracker.is_running() {
            return self.prompt(post_id, text, Vec::new(), false);
        }
        if self.opencode.dialect() != crate::opencode::Dialect::V2 {
            self.post_notice(
                "ℹ️ Steering needs an OpenCode v2 server; this one is spoken to in v1, so your message waits for the running turn like any other.",
            );
            return self.prompt(post_id, text, Vec::new(), false);
        }
        // Sent or refused (and said so), it is no longer owed.
        let sent = self.send_steer(&post_id, text);
        self.prompt_done(&post_id);
        match sent {
            Ok(()) => {
                self.post_notice(
                    "↪️ Sent into the running turn; the agent reads it when its current step ends.",
                );
            }
            Err(e) => {
                self.post_notice(&format!(
                    "⚠️ Could not steer the running turn: {e}. Your message was not sent."
                ));
            }
        }
        true
    }

    /// Sends `text` into the running v2 turn (`delivery: "steer"`), with a message id made from
    /// `tag` (a post id, or a request id), which the tracker then knows as the turn's own.
    pub(super) fn send_steer(&mut self, tag: &str, text: String) -> Result<(), OcError> {
        let message_id = crate::opencode::ids::prompt_message_id(
            tag,
            crate::log::now_ms(),
            self.tracker.newest_message(),
        );
        let input = crate::opencode::PromptInput {
            text,
            message_id: Some(message_id.clone()),
            delivery: crate::opencode::Delivery::Steer,
            ..crate::opencode::PromptInput::default()
        };
        self.opencode
            .prompt_with(&self.key.session_id, &self.info.directory, &input)?;
        crate::info!(
            "[{}] steered {tag} into the running turn as {message_id}",
            self.short()
        );
        self.tracker.saw_message(&message_id);
        Ok(())
    }

    /// `!stop` or 🛑: aborts the current run. The completion line that follows says it stopped.
    pub(super) fn stop_run(&mut self) {
        if !self.tracker.is_running() && !self.waiting.any() {
            self.post_notice("ℹ️ Nothing is running in this session.");
            return;
        }
        match self
            .opencode
            .abort(&self.key.session_id, &self.info.directory)
        {
            Ok(()) => {
                crate::info!("[{}] run stopped by the owner", self.short());
                self.close_waiting_after_stop();
                let queued = match self.queue.len() {
                    0 => String::new(),
                    n => format!(
                        " {n} queued message(s) will still be sent; `{}status` shows them.",
                        self.prefix
                    ),
                };
                self.post_notice(&format!("🛑 Stopped by you.{queued}"));
            }
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not stop the session: {e}"));
            }
        }
    }

    fn show_status(&mut self) {
        let messages =
            self.opencode
                .messages(&self.key.session_id, &self.info.directory, STATUS_MESSAGES);
        let assistant: Vec<MessageInfo> = match &messages {
            Ok(messages) => messages
                .iter()
                .filter(|(info, _)| info.role == Role::Assistant)
                .map(|(info, _)| info.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut lines = Vec::new();
        let state = match self.tracker.turn.as_ref() {
            Some(turn) => {
                let mut state = format!(
                    "⏳ **busy** for {}",
                    format_duration(turn.started.elapsed().as_millis() as u64)
                );
                if let Some(tool) = turn.current_tool() {
                    state.push_str(&format!(" · running {tool}"));
                }
                state
            }
            None if self.tracker.busy => "⏳ **busy**".to_string(),
            None => "💤 **idle**".to_string(),
        };
        lines.push(format!("{state} · `{}`", self.info.directory));
        let last = assistant.last();
        let model = match (&self.model, last.and_then(|m| m.model.as_ref())) {
            (Some(chosen), _) => {
                format!("`{}/{}` (chosen here)", chosen.provider_id, chosen.model_id)
            }
            (None, Some(model)) => format!("`{model}`"),
            (None, None) => "the server's default".to_string(),
        };
        let agent = match (&self.agent, last.and_then(|m| m.agent.as_ref())) {
            (Some(chosen), _) => format!("`{chosen}` (chosen here)"),
            (None, Some(agent)) => format!("`{agent}`"),
            (None, None) => "the server's default".to_string(),
        };
        lines.push(format!("Model: {model} · Agent: {agent}"));
        match &messages {
            Ok(_) => {
                let (tokens, cost) = totals(&assistant);
                let total = tokens.input + tokens.output + tokens.reasoning;
                lines.push(format!(
                    "Tokens: {} ({} in, {} out, {} cached) · Cost: {} · {} answer(s)",
                    format_tokens(total),
                    format_tokens(tokens.input),
                    format_tokens(tokens.output + tokens.reasoning),
                    format_tokens(tokens.cache_read),
                    format_cost(cost),
                    assistant.len()
                ));
            }
            Err(e) => lines.push(format!("Tokens and cost unavailable: {e}")),
        }
        let (permissions, questions) = self.waiting.counts();
        if permissions + questions > 0 {
            lines.push(format!(
                "Waiting for you: {permissions} permission request(s), {questions} question(s)"
            ));
        }
        if !self.queue.is_empty() {
            let queued: Vec<String> = self
                .queue
                .iter()
                .map(|p| {
                    format!(
                        "> {}",
                        truncate_chars(p.input.text.lines().next().unwrap_or(""), 80)
                    )
                })
                .collect();
            lines.push(format!(
                "Queued ({}):\n{}",
                self.queue.len(),
                queued.join("\n")
            ));
        }
        self.post_notice(&lines.join("\n"));
    }

    fn choose_model(&mut self, choice: Option<&str>) {
        let choices = match self.opencode.models(&self.info.directory) {
            Ok(choices) => choices,
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not list the models: {e}"));
                return;
            }
        };
        let Some(query) = choice else {
            self.post_notice(&asks::model_list(&choices, self.model.as_ref()));
            return;
        };
        match asks::match_model(&choices, query) {
            Ok(model) => {
                let shown = format!("{}/{}", model.provider_id, model.model_id);
                self.model = Some(model);
                self.report_choices();
                self.post_notice(&format!("🧠 This session's next prompts use `{shown}`."));
            }
            Err(problem) => {
                self.post_notice(&format!("❓ {problem}"));
            }
        }
    }

    fn choose_agent(&mut self, name: Option<&str>) {
        let choices = match self.opencode.agents(&self.info.directory) {
            Ok(choices) => choices,
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not list the agents: {e}"));
                return;
            }
        };
        let Some(query) = name else {
            self.post_notice(&asks::agent_list(&choices, self.agent.as_deref()));
            return;
        };
        match asks::match_agent(&choices, query) {
            Ok(agent) => {
                self.post_notice(&format!(
                    "🧭 This session's next prompts use the `{agent}` agent."
                ));
                self.agent = Some(agent);
                self.report_choices();
            }
            Err(problem) => {
                self.post_notice(&format!("❓ {problem}"));
            }
        }
    }

    fn show_todos(&mut self) {
        match self
            .opencode
            .todos(&self.key.session_id, &self.info.directory)
        {
            Ok(todos) if todos.is_empty() => {
                self.post_notice("📋 This session has no todo list.");
            }
            Ok(todos) => {
                self.post_notice(&asks::todo_post(&todos));
            }
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not read the todo list: {e}"));
            }
        }
    }

    /// The todo list changed: one post per run, edited as it changes.
    pub(super) fn todos_changed(&mut self, todos: &[Todo]) {
        if todos.is_empty() && self.todo_post.is_none() {
            return;
        }
        let text = asks::todo_post(todos);
        match self.todo_post.as_mut() {
            Some(post) if post.text == text => {}
            Some(post) => {
                let id = post.id.clone();
                post.text = text.clone();
                self.edit_post_at(Priority::Background, &id, &text);
            }
            None => {
                if let Some(id) = self.post_at(Priority::Background, &text, None) {
                    self.todo_post = Some(SentPost { id, text });
                }
            }
        }
    }

    /// Summarising can take as long as a turn; it runs beside the worker so `!stop` still works.
    fn compact(&mut self) {
        let model = self.model.clone().or_else(|| self.last_model());
        let Some(model) = model else {
            self.post_notice(&format!(
                "⚠️ No model to summarise with yet: send a prompt first, or choose one with `{}model`.",
                self.prefix
            ));
            return;
        };
        self.post_notice(&format!(
            "🗜️ Compacting the session with `{}/{}`…",
            model.provider_id, model.model_id
        ));
        let opencode = Arc::clone(&self.opencode);
        let mattermost = Arc::clone(&self.mattermost);
        let (session_id, directory) = (self.key.session_id.clone(), self.info.directory.clone());
        let (channel_id, root_id) = (self.channel_id.clone(), self.root_post_id.clone());
        let short = self.short().to_string();
        let link = crate::log::link();
        let spawned = std::thread::Builder::new()
            .name(format!("compact-{short}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                crate::log::set_link(link.as_deref());
                if let Err(e) = opencode.summarize(&session_id, &directory, &model) {
                    crate::warn!("[{short}] compaction failed: {e}");
                    let message = format!("⚠️ Compaction failed: {e}");
                    let _ = mattermost.create_post(&channel_id, &root_id, &message, None);
                }
            });
        if let Err(e) = spawned {
            self.post_notice(&format!("⚠️ Could not start the compaction: {e}"));
        }
    }

    fn last_model(&self) -> Option<ModelRef> {
        let messages = self
            .opencode
            .messages(&self.key.session_id, &self.info.directory, 20)
            .ok()?;
        let model = messages
            .iter()
            .rev()
            .find_map(|(info, _)| info.model.clone())?;
        let (provider_id, model_id) = model.split_once('/')?;
        Some(ModelRef {
            provider_id: provider_id.to_string(),
            model_id: model_id.to_string(),
        })
    }

    fn rename(&mut self, title: &str) {
        match self
            .opencode
            .rename(&self.key.session_id, &self.info.directory, title)
        {
            Ok(info) => {
                self.on_info(info);
                self.post_notice(&format!("✏️ Renamed to **{}**.", title.trim()));
            }
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not rename the session: {e}"));
            }
        }
    }

    fn show_diff(&mut self) {
        let diff = match self
            .opencode
            .diff(&self.key.session_id, &self.info.directory)
        {
            Ok(diff) => diff,
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not read the session's diff: {e}"));
                return;
            }
        };
        if diff.trim().is_empty() {
            self.post_notice(&format!(
                "📄 No uncommitted changes in `{}`.",
                self.info.directory
            ));
            return;
        }
        let (files_changed, added, removed) = diff_stats(&diff);
        // OpenCode 1.18 reports the directory's uncommitted changes (git), not one session's.
        let summary = format!(
            "Uncommitted changes in `{}`: {files_changed} file(s), +{added} −{removed}",
            self.info.directory
        );
        if diff.chars().count() <= INLINE_DIFF_CHARS && diff.lines().count() <= INLINE_DIFF_LINES {
            let fence = fence_for(&diff);
            self.post_notice(&format!(
                "📄 {summary}\n{fence}diff\n{}\n{fence}",
                diff.trim_end()
            ));
            return;
        }
        let name = format!("session-{}.diff", self.short());
        self.attach(&name, diff.as_bytes(), &format!("📄 {summary}: `{name}`"));
    }

    /// `!file <path>`: a file from the session's directory, refused outside it. Always read by the
    /// OpenCode server, never from this host's disk: the bridge may run elsewhere, and the server
    /// reads with its own rights.
    fn send_file(&mut self, requested: &str) {
        let relative = match files::checked_relative_path(requested) {
            Ok(relative) => relative,
            Err(refusal) => {
                self.post_notice(&format!("🚫 {refusal}"));
                return;
            }
        };
        let read = self
            .opencode
            .read_file(&self.info.directory, &relative, self.max_file_size);
        let content = match read {
            Ok(FileRead::Content(content)) => content,
            Ok(FileRead::TooLarge) => {
                self.post_notice(&format!(
                    "🚫 `{relative}` is over the {} byte limit (OPENCODE_MM_MAX_FILE_SIZE).",
                    self.max_file_size
                ));
                return;
            }
            Ok(FileRead::Refused(Refusal::Directory)) => {
                self.post_notice(&format!(
                    "🚫 `{relative}` is a directory; name a file in it."
                ));
                return;
            }
            Ok(FileRead::Refused(Refusal::NotARegularFile)) => {
                self.post_notice(&format!(
                    "🚫 OpenCode refused to read `{relative}`: it is not a regular file of `{}` (a \
                     symbolic link leading outside the session's directory is refused).",
                    self.info.directory
                ));
                return;
            }
            Err(OcError::NotFound(_)) => {
                self.post_notice(&format!(
                    "❓ `{relative}` was not found in `{}`.",
                    self.info.directory
                ));
                return;
            }
            Err(e) => {
                self.post_notice(&format!("⚠️ Could not read `{relative}`: {e}"));
                return;
            }
        };
        let name = relative.rsplit('/').next().unwrap_or(&relative).to_string();
        self.attach(&name, &content.bytes, &format!("📎 `{relative}`"));
    }

    fn attach(&mut self, name: &str, bytes: &[u8], message: &str) {
        let uploaded = self.mattermost.upload_file(&self.channel_id, name, bytes);
        let posted = uploaded.and_then(|file| {
            self.mattermost.create_post_with_files(
                &self.channel_id,
                &self.root_post_id,
                message,
                &[file.id],
            )
        });
        if let Err(e) = posted {
            crate::warn!("[{}] file {name} not posted: {e}", self.short());
            self.post_notice(&format!("⚠️ Could not attach `{name}`: {e}"));
        }
    }
}

fn totals(messages: &[MessageInfo]) -> (Tokens, f64) {
    let mut tokens = Tokens::default();
    let mut cost = 0.0;
    for message in messages {
        tokens.input += message.tokens.input;
        tokens.output += message.tokens.output;
        tokens.reasoning += message.tokens.reasoning;
        tokens.cache_read += message.tokens.cache_read;
        tokens.cache_write += message.tokens.cache_write;
        cost += message.cost;
    }
    (tokens, cost)
}

/// Files, added and removed lines of a unified diff.
fn diff_stats(diff: &str) -> (usize, usize, usize) {
    let (mut files, mut added, mut removed) = (0, 0, 0);
    for line in diff.lines() {
        if line.starts_with("+++ ") {
            files += 1;
        } else if line.starts_with('+') {
            added += 1;
        } else if line.starts_with('-') && !line.starts_with("--- ") {
            removed += 1;
        }
    }
    (files, added, removed)
}

/// A backtick fence longer than any run of backticks in `text`, so the block cannot be closed early.
fn fence_for(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_stats_count_files_and_lines_but_not_headers() {
        let diff = "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-old\n+new\n+more\n ctx\n--- a/y\n+++ b/y\n@@ -1 +0,0 @@\n-gone\n";
        assert_eq!(diff_stats(diff), (2, 2, 2));
    }

    #[test]
    fn fence_is_longer_than_any_backtick_run() {
        assert_eq!(fence_for("plain"), "```");
        assert_eq!(fence_for("a ```` b"), "`````");
    }

    #[test]
    fn totals_add_every_message() {
        let message = |input, output, cost| MessageInfo {
            id: "m".into(),
            role: Role::Assistant,
            created_ms: 0,
            completed_ms: None,
            tokens: Tokens {
                input,
                output,
                ..Tokens::default()
            },
            cost,
            error: None,
            model: None,
            agent: None,
            parent_id: None,
        };
        let (tokens, cost) = totals(&[message(10, 5, 0.5), message(1, 2, 0.25)]);
        assert_eq!((tokens.input, tokens.output), (11, 7));
        assert!((cost - 0.75).abs() < 1e-9);
    }
}
