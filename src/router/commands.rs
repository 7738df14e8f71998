//! Main-DM commands: `help`, `sessions`, `attach`, `new`, decided here from the look-ups' answers.

use super::*;

impl Router {
    pub(super) fn on_dm_message(&mut self, post: &Post) {
        let prefix = self.command_prefix.clone();
        if let Some(argument) = own_command(&post.message, &prefix, "use") {
            match argument.split_whitespace().collect::<Vec<_>>().as_slice() {
                [query] => self.lookup(Lookup::ListSessions {
                    then: Listing::Use {
                        query: query.to_string(),
                    },
                }),
                _ => self.reply(
                    "",
                    &format!("❓ `{prefix}use` needs one session: `{prefix}use <session>`"),
                ),
            }
            return;
        }
        let Some(command) = command::parse_dm(&post.message, &prefix) else {
            self.reply(
                "",
                &format!(
                    "Prompts go in a session's thread: reply there and the message goes to that session. \
                     Start a session in a terminal (`opencode`, or `opencode attach <url>`) and its thread appears here; \
                     `{prefix}attach <session>` gives an older session a thread, `{prefix}sessions` lists them, `{prefix}help` explains more."
                ),
            );
            return;
        };
        match command {
            DmCommand::Help => self.reply("", &help_message(&prefix)),
            DmCommand::Sessions { all } => self.lookup(Lookup::ListSessions {
                then: Listing::Sessions { all },
            }),
            DmCommand::Attach { query } => self.lookup(Lookup::ListSessions {
                then: Listing::Attach { query },
            }),
            DmCommand::New {
                directory,
                title,
                prompt,
            } => self.new_session(&post.id, directory, title, prompt),
            DmCommand::Board { on } => self.on_board_command(on),
            DmCommand::Unknown { name } => self.reply(
                "",
                &format!("❓ Unknown command `{prefix}{name}`. `{prefix}help` lists the commands."),
            ),
            DmCommand::MissingArgument { command, usage } => self.reply(
                "",
                &format!("❓ `{prefix}{command}` needs an argument: `{prefix}{usage}`"),
            ),
            DmCommand::UnexpectedArgument {
                command,
                usage,
                argument,
            } => self.reply(
                "",
                &format!("❓ `{prefix}{command}` does not take `{argument}`: `{prefix}{usage}`"),
            ),
        }
    }

    /// Top-level sessions of every server, from the fresh lists where the server answered.
    pub(super) fn all_sessions(
        &mut self,
        lists: Vec<(ServerKey, Result<Vec<SessionInfo>, String>)>,
    ) -> Vec<(SessionKey, SessionInfo)> {
        for (server, listed) in lists {
            match listed {
                Ok(sessions) => {
                    for info in sessions {
                        if let Some(key) = self.owned_key(&server, &info.id) {
                            self.learn(&key, info);
                        }
                    }
                }
                Err(e) => crate::warn!("cannot list sessions of {}: {e}", server.0),
            }
        }
        let mut sessions: Vec<(SessionKey, SessionInfo)> = self
            .live
            .iter()
            .filter(|(_, l)| l.info.parent_id.is_none())
            .map(|(k, l)| (k.clone(), l.info.clone()))
            .collect();
        // Grouped by server (a no-op with one), most recently active first within each.
        sessions.sort_by(|a, b| {
            (&a.0.server, std::cmp::Reverse(a.1.updated_ms))
                .cmp(&(&b.0.server, std::cmp::Reverse(b.1.updated_ms)))
        });
        sessions
    }

    pub(super) fn on_sessions(
        &mut self,
        lists: Vec<(ServerKey, Result<Vec<SessionInfo>, String>)>,
        then: Listing,
    ) {
        let sessions = self.all_sessions(lists);
        match then {
            Listing::Sessions { all } => self.list_sessions(all, &sessions),
            Listing::Attach { query } => self.attach(&query, &sessions, false),
            Listing::Use { query } => self.attach(&query, &sessions, true),
        }
    }

    pub(super) fn list_sessions(&mut self, all: bool, sessions: &[(SessionKey, SessionInfo)]) {
        let prefix = self.command_prefix.clone();
        let mut lines = Vec::new();
        let hidden = sessions.len().saturating_sub(MAX_LISTED_SESSIONS);
        let several = self.servers.len() > 1;
        let mut heading: Option<&ServerKey> = None;
        for (key, info) in sessions.iter().take(MAX_LISTED_SESSIONS) {
            if several && heading != Some(&key.server) {
                heading = Some(&key.server);
                lines.push(format!("🖥 **{}**", self.server_name(&key.server)));
            }
            let status = match self.live.get(key).map(|l| l.status) {
                Some(Status::Busy | Status::Retry) => "busy",
                _ => "idle",
            };
            let thread = match self.record(key) {
                Some(record) => format!("[thread]({})", self.permalink(&record.root_post_id)),
                None => format!("no thread: `{prefix}attach {}`", short_id(&key.session_id)),
            };
            lines.push(format!(
                "- `{}` **{}** · `{}` · {status} · {thread}",
                short_id(&key.session_id),
                truncate_chars(&display_title(info), 60),
                info.directory
            ));
        }
        if all {
            for (server, server_state) in &self.registry.state().servers {
                for (session_id, record) in &server_state.sessions {
                    if record.ended_ms.is_none()
                        || sessions
                            .iter()
                            .any(|(k, _)| k.session_id == *session_id && k.server.0 == *server)
                    {
                        continue;
                    }
                    lines.push(format!(
                        "- `{}` **{}** · `{}` · ended · [thread]({})",
                        short_id(session_id),
                        truncate_chars(&record.title, 60),
                        record.directory,
                        self.permalink(&record.root_post_id)
                    ));
                }
            }
        }
        let text = if lines.is_empty() {
            "No sessions yet. Start one with `opencode` in a terminal; its thread appears here."
                .to_string()
        } else {
            let mut hint = String::new();
            if hidden > 0 {
                hint.push_str(&format!(
                    "\n\n_…and {hidden} older session(s); `{prefix}attach <id>` works for them too._"
                ));
            }
            if !all {
                hint.push_str(&format!(
                    "\n\n_`{prefix}sessions all` includes ended sessions._"
                ));
            }
            format!(
                "**Sessions** ({})\n{}{hint}",
                lines.iter().filter(|l| l.starts_with("- ")).count() + hidden,
                lines.join("\n")
            )
        };
        self.reply("", &text);
    }

    /// `!current` in a thread: which session, server and directory it is, and its state.
    pub(super) fn current(&mut self, key: &SessionKey, root_id: &str) {
        let live = self.live.get(key);
        let record = self.record(key);
        let title = live
            .map(|l| display_title(&l.info))
            .or_else(|| record.map(|r| r.title.clone()))
            .unwrap_or_default();
        let directory = live
            .map(|l| l.info.directory.clone())
            .or_else(|| record.map(|r| r.directory.clone()))
            .unwrap_or_default();
        let state = if record.is_some_and(|r| r.ended_ms.is_some()) {
            "ended"
        } else if self.down_since.contains_key(&key.server) {
            "server unreachable"
        } else {
            match live.map(|l| l.status) {
                Some(Status::Busy | Status::Retry) => "busy",
                _ => "idle",
            }
        };
        let text = format!(
            "🧵 **{title}**\n\
             - session `{}` (short `{}`)\n\
             - server 🖥 {} (`{}`)\n\
             - directory `{directory}`\n\
             - state: {state}",
            key.session_id,
            short_id(&key.session_id),
            self.server_name(&key.server),
            key.server.0,
        );
        self.reply(root_id, &text);
    }

    /// `new <directory> [title]`: creates the session on the server (a look-up); its thread
    /// follows, linked in a reply, and the first prompt (if any) goes there once the thread exists.
    pub(super) fn new_session(
        &mut self,
        post_id: &str,
        directory: String,
        title: Option<String>,
        prompt: Option<String>,
    ) {
        let prefix = self.command_prefix.clone();
        // `NAME:/dir` names the server; a default name has a colon of its own (`host:port`).
        let (server, directory) = match directory.split_once(":/") {
            Some((name, rest)) if !name.is_empty() && !name.contains('/') => {
                (Some(name.to_string()), format!("/{rest}"))
            }
            _ => (None, directory),
        };
        if !directory.starts_with('/') {
            self.reply(
                "",
                &format!(
                    "❓ `{directory}` is not an absolute path. Give the session's directory as the server sees it, \
                     like `{prefix}new /home/me/project`."
                ),
            );
            return;
        }
        if !self.dirs.takes(&directory) {
            let dirs = &self.dirs;
            self.reply(
                "",
                &format!(
                    "❓ `{directory}` is outside this bridge's directories ({dirs}, from \
                     OPENCODE_MM_DIRS), so no session was created. Use a directory under one of them."
                ),
            );
            return;
        }
        self.lookup(Lookup::NewSession {
            post_id: post_id.to_string(),
            server,
            directory,
            title,
            prompt,
        });
    }

    pub(super) fn on_new_session(
        &mut self,
        post_id: String,
        directory: &str,
        prompt: Option<String>,
        created: Result<(ServerKey, SessionInfo), String>,
    ) {
        let (server, info) = match created {
            Ok(created) => created,
            Err(message) => {
                self.reply("", &message);
                return;
            }
        };
        let key = SessionKey {
            server,
            session_id: info.id.clone(),
        };
        crate::info!(
            "[{}] session created from Mattermost in {directory}",
            short_id(&key.session_id)
        );
        self.learn(&key, info);
        let first_prompt = prompt.map(|text| {
            // Owed like any prompt from now on, so a crash before it is sent cannot lose it.
            let now = crate::log::now_ms();
            let owed = Post {
                id: post_id.clone(),
                create_at: now as i64,
                ..Post::default()
            };
            self.registry.owe_prompt(&key, &owed, now);
            FirstPrompt {
                post_id,
                text,
                recovered_since_ms: None,
            }
        });
        match self.record(&key).map(|r| r.root_post_id.clone()) {
            // The event stream was faster: the thread is already there.
            Some(root_post_id) => self.announce_new(&key, &root_post_id, first_prompt),
            None => {
                self.pending_new.insert(key.clone(), first_prompt);
                if !self.workers.contains_key(&key) {
                    self.start_thread(key);
                }
            }
        }
    }

    pub(super) fn announce_new(
        &mut self,
        key: &SessionKey,
        root_post_id: &str,
        first_prompt: Option<FirstPrompt>,
    ) {
        if let Some(first) = first_prompt
            .as_ref()
            .filter(|f| f.recovered_since_ms.is_some())
        {
            // Recovered after a restart: the owner was told when the session was created.
            let first = first.clone();
            self.deliver(key, first.into_message());
            return;
        }
        let info = self
            .live
            .get(key)
            .map(|l| l.info.clone())
            .unwrap_or_default();
        let link = self.permalink(root_post_id);
        let sending = if first_prompt.is_some() {
            " Your first message is on its way there."
        } else {
            " Reply in it to send the first prompt."
        };
        self.reply(
            "",
            &format!(
                "🆕 **{}** started in `{}`: [open its thread]({link}).{sending}",
                display_title(&info),
                info.directory
            ),
        );
        if let Some(first) = first_prompt {
            self.deliver(key, first.into_message());
        }
    }

    /// `attach`, or with `linking` (`!use`) a plain link when the thread exists.
    pub(super) fn attach(
        &mut self,
        query: &str,
        sessions: &[(SessionKey, SessionInfo)],
        linking: bool,
    ) {
        let refs: Vec<SessionRef<'_>> = sessions
            .iter()
            .map(|(_, info)| SessionRef {
                id: &info.id,
                slug: &info.slug,
            })
            .collect();
        let prefix = self.command_prefix.clone();
        match command::resolve_session(query, &refs) {
            Resolution::NotFound => self.reply(
                "",
                &format!("❓ No session matches `{query}`. `{prefix}sessions` lists them."),
            ),
            Resolution::Ambiguous(candidates) => {
                let lines: Vec<String> = candidates
                    .iter()
                    .filter_map(|&i| sessions.get(i))
                    .map(|(key, info)| {
                        format!(
                            "- `{}` `{}` **{}** · `{}` · 🖥 {}",
                            short_id(&key.session_id),
                            info.slug,
                            truncate_chars(&display_title(info), 60),
                            info.directory,
                            self.server_name(&key.server)
                        )
                    })
                    .collect();
                self.reply(
                    "",
                    &format!(
                        "❓ `{query}` matches {} sessions; use more of the id:\n{}",
                        lines.len(),
                        lines.join("\n")
                    ),
                );
            }
            Resolution::One(index) => {
                let Some((key, info)) = sessions.get(index).cloned() else {
                    return;
                };
                if let Some(record) = self.record(&key) {
                    let link = self.permalink(&record.root_post_id);
                    if linking {
                        let text =
                            format!("🧵 **{}**: [open its thread]({link})", display_title(&info));
                        self.reply("", &text);
                        return;
                    }
                    self.reply(
                        "",
                        &format!(
                            "**{}** already has a thread: [open it]({link})",
                            display_title(&info)
                        ),
                    );
                    return;
                }
                if !self.workers.contains_key(&key) {
                    self.start_thread(key.clone());
                }
                self.pending_attach.insert(key);
            }
        }
    }
}

pub fn help_message(prefix: &str) -> String {
    format!(
        "**opencode-mattermost** connects this DM to OpenCode. Every OpenCode session gets its own thread here.\n\n\
         **In a session's thread:** write a reply and it goes to that session as a prompt, exactly as written. \
         The answer streams back into the thread, with tool calls and a completion line. \
         Messages sent while the session is busy are queued and sent in order.\n\n\
         **In this main DM:**\n\
         - `{prefix}sessions`: list sessions with their status and thread links (`{prefix}sessions all` includes ended ones)\n\
         - `{prefix}attach <session>`: give an existing session a thread\n\
         - `{prefix}new [server:]<directory> [title]`: start a session in that directory (lines after the first are its first prompt)\n\
         - `{prefix}use <session>`: a link to the session's thread (made if it has none)\n\
         - `{prefix}board`: one post here that lists every session's state, kept current (`{prefix}board off` stops it)\n\
         - `{prefix}help`: this message\n\n\
         **In a thread**, `{prefix}current` names its session, server, directory and state.\n\n\
         A session can be named by its full id, its short id (the last 8 characters), its slug (such as `neon-eagle`), \
         or any unique start or end of its id."
    )
}

/// The argument of `prefix` + `name` when `text` is that command (any case), else None.
pub(super) fn own_command<'t>(text: &'t str, prefix: &str, name: &str) -> Option<&'t str> {
    let rest = text.trim().strip_prefix(prefix)?;
    let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let (word, argument) = rest.split_at(word_end);
    word.eq_ignore_ascii_case(name).then(|| argument.trim())
}

/// The prompt a `new` command carried, sent once the session's thread exists.
#[derive(Debug, Clone)]
pub(super) struct FirstPrompt {
    pub(super) post_id: String,
    pub(super) text: String,
    /// Owed from before a restart (the owner was told of the session then).
    pub(super) recovered_since_ms: Option<u64>,
}

impl FirstPrompt {
    pub(super) fn into_message(self) -> SessionMsg {
        SessionMsg::Prompt {
            post_id: self.post_id,
            text: self.text,
            file_ids: Vec::new(),
            recovered_since_ms: self.recovered_since_ms,
        }
    }
}
