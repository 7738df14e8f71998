//! Parses the commands the owner types and resolves the session names they use, as pure functions so
//! that every spelling can be tested without a server.

/// A command typed in the main DM (outside any session thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmCommand {
    /// `help`: list the commands.
    Help,
    /// `sessions` or `sessions all`: list the open sessions, or all of them.
    Sessions { all: bool },
    /// `attach <session>`: open a thread for an existing session.
    Attach { query: String },
    /// `new <directory> [title]`, and any lines after the first as the first prompt.
    New {
        directory: String,
        title: Option<String>,
        prompt: Option<String>,
    },
    /// `board` or `board off`: start (or show) the board post the bridge keeps current, or stop it.
    Board { on: bool },
    /// The word after the prefix is not a command. `name` is as typed, for the reply.
    Unknown { name: String },
    /// A command that needs an argument came without one. `usage` has no prefix, like
    /// `attach <session>`; the caller puts its configured prefix in front.
    MissingArgument {
        command: &'static str,
        usage: &'static str,
    },
    /// A command came with an argument it does not take, like `sessions everything`. `argument` is the
    /// text after the command name, trimmed.
    UnexpectedArgument {
        command: &'static str,
        usage: &'static str,
        argument: String,
    },
}

/// A command typed as a reply in a session's thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadCommand {
    /// `allow`: allow the oldest pending permission request once.
    Allow,
    /// `always`: allow it, and its pattern from now on in this session.
    Always,
    /// `deny [message]`: reject it; a message is passed on to the agent.
    Deny {
        message: Option<String>,
    },
    /// `skip`: reject the pending question.
    Skip,
    /// `stop`: abort the session's current run.
    Stop,
    /// `steer <text>`: send the text into the running turn (v2 only); when idle, a plain prompt.
    Steer {
        text: String,
    },
    /// `status`.
    Status,
    /// `model [provider/model]`: list, or choose for this session's next prompts.
    Model {
        choice: Option<String>,
    },
    /// `agent [name]`: list, or choose.
    Agent {
        name: Option<String>,
    },
    /// `todo`.
    Todo,
    /// `compact`: summarise the session.
    Compact,
    /// `rename <title>`.
    Rename {
        title: String,
    },
    /// `diff`: the session's current changes.
    Diff,
    /// `file <path>`: attach a file from the session's directory.
    File {
        path: String,
    },
    /// `help`.
    Help,
    Unknown {
        name: String,
    },
    MissingArgument {
        command: &'static str,
        usage: &'static str,
    },
    UnexpectedArgument {
        command: &'static str,
        usage: &'static str,
        argument: String,
    },
}

/// What an owner's reaction means, wherever it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReactionMeaning {
    /// `white_check_mark`, `+1`.
    Allow,
    /// `unlock`.
    Always,
    /// `x`, `-1`.
    Reject,
    /// `octagonal_sign`.
    Stop,
    /// `repeat`.
    Retry,
    /// `one` … `nine`: an option number, 1-based.
    Choice(u8),
}

/// A session as `resolve_session` sees it.
pub struct SessionRef<'a> {
    pub id: &'a str,
    pub slug: &'a str,
}

/// Which session a query names: an index into the slice given to `resolve_session`.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    One(usize),
    /// Indices in ascending order.
    Ambiguous(Vec<usize>),
    NotFound,
}

/// The usage line of each DM command, without the prefix, for help texts and error replies.
pub const DM_USAGE: &[(&str, &str)] = &[
    ("help", "help"),
    ("sessions", "sessions [all]"),
    ("attach", "attach <session>"),
    ("new", "new <directory> [title]"),
    ("board", "board [off]"),
];

/// The usage line and a short description of each thread command, without the prefix.
pub const THREAD_USAGE: &[(&str, &str, &str)] = &[
    ("allow", "allow", "allow the pending permission once"),
    (
        "always",
        "always",
        "allow it, and its patterns for the rest of the session",
    ),
    (
        "deny",
        "deny [message]",
        "reject it; the message tells the agent why",
    ),
    ("skip", "skip", "decline the pending question"),
    ("stop", "stop", "abort the current run"),
    (
        "steer",
        "steer <text>",
        "send the text into the running turn, read at its next step (OpenCode v2 servers; when the session is idle, an ordinary message)",
    ),
    ("status", "status", "what the session is doing"),
    (
        "model",
        "model [provider/model]",
        "list the models, or choose one",
    ),
    ("agent", "agent [name]", "list the agents, or choose one"),
    ("todo", "todo", "the agent's todo list"),
    (
        "compact",
        "compact",
        "summarise the session to free context",
    ),
    ("rename", "rename <title>", "rename the session"),
    ("diff", "diff", "the session's changes"),
    (
        "file",
        "file <path>",
        "attach a file from the session's directory",
    ),
    ("help", "help", "this list"),
];

/// Parses a main-DM message. `None` when `text` does not start with `prefix`, or when the prefix is
/// followed by nothing or by whitespace (`! really?` is a message, not a command). Leading and trailing
/// whitespace is ignored and command names are case-insensitive.
pub fn parse_dm(text: &str, prefix: &str) -> Option<DmCommand> {
    let (name, argument) = split_command(text, prefix)?;
    if name.eq_ignore_ascii_case("new") {
        return Some(parse_new(text, prefix));
    }
    let command = match name.to_lowercase().as_str() {
        "help" => DmCommand::Help,
        "sessions" => match argument.to_lowercase().as_str() {
            "" => DmCommand::Sessions { all: false },
            "all" => DmCommand::Sessions { all: true },
            _ => unexpected("sessions", argument),
        },
        "board" => match argument.to_lowercase().as_str() {
            "" | "on" => DmCommand::Board { on: true },
            "off" => DmCommand::Board { on: false },
            _ => unexpected("board", argument),
        },
        "attach" if argument.is_empty() => DmCommand::MissingArgument {
            command: "attach",
            usage: usage("attach"),
        },
        "attach" if argument.contains(char::is_whitespace) => unexpected("attach", argument),
        "attach" => DmCommand::Attach {
            query: argument.to_string(),
        },
        _ => DmCommand::Unknown {
            name: name.to_string(),
        },
    };
    Some(command)
}

/// `new <directory> [title]` on the first line, the first prompt on the lines after it. The directory
/// may be quoted with `"` when it has spaces; an unclosed quote takes the rest of the line.
fn parse_new(text: &str, prefix: &str) -> DmCommand {
    let text = text.trim();
    let (first_line, rest) = text.split_once('\n').unwrap_or((text, ""));
    let argument = split_command(first_line, prefix).map_or("", |(_, argument)| argument);
    let (directory, title) = match argument.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
        None => argument
            .split_once(char::is_whitespace)
            .unwrap_or((argument, "")),
    };
    if directory.trim().is_empty() {
        return DmCommand::MissingArgument {
            command: "new",
            usage: usage("new"),
        };
    }
    DmCommand::New {
        directory: directory.to_string(),
        title: non_empty(title.trim()),
        prompt: non_empty(rest.trim()),
    }
}

/// Parses a reply in a session's thread, with the same conventions as `parse_dm`: `None` for a plain
/// message, case-insensitive names, extra words after an argument-less command are
/// `UnexpectedArgument` (so `!stop it now` does not stop anything by surprise).
pub fn parse_thread(text: &str, prefix: &str) -> Option<ThreadCommand> {
    let (name, argument) = split_command(text, prefix)?;
    let name_lower = name.to_lowercase();
    let Some(&(command, usage, _)) = THREAD_USAGE.iter().find(|(n, _, _)| *n == name_lower) else {
        return Some(ThreadCommand::Unknown {
            name: name.to_string(),
        });
    };
    let single_word = |build: fn(Option<String>) -> ThreadCommand| {
        if argument.contains(char::is_whitespace) {
            thread_unexpected(command, usage, argument)
        } else {
            build(non_empty(argument))
        }
    };
    let parsed = match command {
        "deny" => ThreadCommand::Deny {
            message: non_empty(argument),
        },
        "model" => single_word(|choice| ThreadCommand::Model { choice }),
        "agent" => single_word(|name| ThreadCommand::Agent { name }),
        "help" => ThreadCommand::Help,
        "rename" | "file" | "steer" if argument.is_empty() => {
            ThreadCommand::MissingArgument { command, usage }
        }
        "rename" => ThreadCommand::Rename {
            title: argument.split_whitespace().collect::<Vec<_>>().join(" "),
        },
        "file" => ThreadCommand::File {
            path: unquote(argument).to_string(),
        },
        "steer" => ThreadCommand::Steer {
            text: argument.to_string(),
        },
        _ if !argument.is_empty() => thread_unexpected(command, usage, argument),
        "allow" => ThreadCommand::Allow,
        "always" => ThreadCommand::Always,
        "skip" => ThreadCommand::Skip,
        "stop" => ThreadCommand::Stop,
        "status" => ThreadCommand::Status,
        "todo" => ThreadCommand::Todo,
        "compact" => ThreadCommand::Compact,
        "diff" => ThreadCommand::Diff,
        _ => ThreadCommand::Unknown {
            name: name.to_string(),
        },
    };
    Some(parsed)
}

/// Skin-tone variants of an emoji mean the same as the plain one.
const SKIN_TONES: &[&str] = &[
    "_light_skin_tone",
    "_medium_light_skin_tone",
    "_medium_skin_tone",
    "_medium_dark_skin_tone",
    "_dark_skin_tone",
];

const DIGITS: [&str; 9] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// What an emoji reaction means, by Mattermost's short name. 👍 and 👎 arrive as `+1`/`-1` or
/// `thumbsup`/`thumbsdown` depending on the client, so both are accepted.
pub fn reaction_meaning(emoji_name: &str) -> Option<ReactionMeaning> {
    let name = SKIN_TONES
        .iter()
        .find_map(|tone| emoji_name.strip_suffix(tone))
        .unwrap_or(emoji_name);
    let meaning = match name {
        "white_check_mark" | "+1" | "thumbsup" => ReactionMeaning::Allow,
        "unlock" => ReactionMeaning::Always,
        "x" | "-1" | "thumbsdown" => ReactionMeaning::Reject,
        "octagonal_sign" => ReactionMeaning::Stop,
        "repeat" => ReactionMeaning::Retry,
        _ => {
            let index = DIGITS.iter().position(|digit| *digit == name)?;
            ReactionMeaning::Choice(u8::try_from(index + 1).ok()?)
        }
    };
    Some(meaning)
}

/// The emoji name of an option number's reaction (`one` for 1), for texts and for the bot's own marks.
pub fn choice_emoji(number: usize) -> Option<&'static str> {
    DIGITS.get(number.checked_sub(1)?).copied()
}

fn thread_unexpected(command: &'static str, usage: &'static str, argument: &str) -> ThreadCommand {
    ThreadCommand::UnexpectedArgument {
        command,
        usage,
        argument: argument.to_string(),
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

/// `"a b"` → `a b`; anything else unchanged.
fn unquote(text: &str) -> &str {
    text.strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .filter(|inner| !inner.is_empty())
        .unwrap_or(text)
}

/// Finds the session `query` names. Accepted, from most to least specific:
/// 1. the full id;
/// 2. the short id (the last 8 characters of the id) or the slug (case-insensitive);
/// 3. a prefix of the id, with or without its `ses_`, or a suffix of the id.
///
/// A match at one level wins over any at a later level; several at the same level are `Ambiguous`. Ids
/// are compared case-sensitively. An empty query is `NotFound`.
pub fn resolve_session(query: &str, sessions: &[SessionRef<'_>]) -> Resolution {
    let query = query.trim();
    if query.is_empty() {
        return Resolution::NotFound;
    }
    let query_lower = query.to_lowercase();
    let with_ses = format!("ses_{query}");
    let levels: [&dyn Fn(&SessionRef<'_>) -> bool; 3] = [
        &|session| session.id == query,
        &|session| short_id(session.id) == query || session.slug.to_lowercase() == query_lower,
        &|session| {
            session.id.starts_with(query)
                || (!query.starts_with("ses_") && session.id.starts_with(&with_ses))
                || session.id.ends_with(query)
        },
    ];
    for matches in levels {
        let found: Vec<usize> = sessions
            .iter()
            .enumerate()
            .filter(|(_, session)| matches(session))
            .map(|(index, _)| index)
            .collect();
        match found.len() {
            0 => continue,
            1 => return Resolution::One(found[0]),
            _ => return Resolution::Ambiguous(found),
        }
    }
    Resolution::NotFound
}

/// The short form of a session id: its last 8 characters, or the whole id when it is shorter. The end is
/// used because ids begin with a timestamp, so sessions made close together share a long prefix.
pub fn short_id(session_id: &str) -> &str {
    match session_id.char_indices().rev().nth(7) {
        Some((start, _)) => &session_id[start..],
        None => session_id,
    }
}

/// Splits `<prefix><name> <argument>` into the name and the trimmed argument.
fn split_command<'t>(text: &'t str, prefix: &str) -> Option<(&'t str, &'t str)> {
    let rest = text.trim().strip_prefix(prefix)?;
    if rest.is_empty() || rest.starts_with(char::is_whitespace) {
        return None;
    }
    let (name, argument) = rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()));
    Some((name, argument.trim()))
}

fn usage(command: &str) -> &'static str {
    DM_USAGE
        .iter()
        .find(|(name, _)| *name == command)
        .map_or("", |(_, usage)| usage)
}

fn unexpected(command: &'static str, argument: &str) -> DmCommand {
    DmCommand::UnexpectedArgument {
        command,
        usage: usage(command),
        argument: argument.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_dm(text: &str, expected: Option<DmCommand>) {
        assert_eq!(parse_dm(text, "!"), expected, "text {text:?}");
    }

    #[test]
    fn parse_dm_commands() {
        check_dm("!help", Some(DmCommand::Help));
        check_dm("  !HeLp  \n", Some(DmCommand::Help));
        check_dm("!help me please", Some(DmCommand::Help));
        check_dm("!sessions", Some(DmCommand::Sessions { all: false }));
        check_dm("!sessions all", Some(DmCommand::Sessions { all: true }));
        check_dm("!SESSIONS   ALL ", Some(DmCommand::Sessions { all: true }));
        check_dm("!board", Some(DmCommand::Board { on: true }));
        check_dm("!Board OFF", Some(DmCommand::Board { on: false }));
        check_dm(
            "!board now",
            Some(DmCommand::UnexpectedArgument {
                command: "board",
                usage: "board [off]",
                argument: "now".to_string(),
            }),
        );
        check_dm(
            "!attach neon-eagle",
            Some(DmCommand::Attach {
                query: "neon-eagle".to_string(),
            }),
        );
        check_dm(
            "!attach\tAbCd1234\n",
            Some(DmCommand::Attach {
                query: "AbCd1234".to_string(),
            }),
        );
    }

    #[test]
    fn parse_dm_mistakes() {
        check_dm(
            "!attach",
            Some(DmCommand::MissingArgument {
                command: "attach",
                usage: "attach <session>",
            }),
        );
        check_dm(
            "!attach   ",
            Some(DmCommand::MissingArgument {
                command: "attach",
                usage: "attach <session>",
            }),
        );
        check_dm(
            "!attach one two",
            Some(DmCommand::UnexpectedArgument {
                command: "attach",
                usage: "attach <session>",
                argument: "one two".to_string(),
            }),
        );
        check_dm(
            "!sessions everything",
            Some(DmCommand::UnexpectedArgument {
                command: "sessions",
                usage: "sessions [all]",
                argument: "everything".to_string(),
            }),
        );
        check_dm(
            "!Frobnicate now",
            Some(DmCommand::Unknown {
                name: "Frobnicate".to_string(),
            }),
        );
    }

    #[test]
    fn parse_dm_non_commands() {
        check_dm("help", None);
        check_dm("", None);
        check_dm("   ", None);
        check_dm("!", None);
        check_dm("! help", None);
        check_dm("hello !help", None);
        assert_eq!(parse_dm("!help", ".."), None);
        assert_eq!(parse_dm("..help", ".."), Some(DmCommand::Help));
        assert_eq!(parse_dm("ÄÖhelp", "ÄÖ"), Some(DmCommand::Help));
    }

    fn new_command(directory: &str, title: Option<&str>, prompt: Option<&str>) -> DmCommand {
        DmCommand::New {
            directory: directory.to_string(),
            title: title.map(str::to_string),
            prompt: prompt.map(str::to_string),
        }
    }

    #[test]
    fn parse_dm_new() {
        check_dm("!new ~/src/app", Some(new_command("~/src/app", None, None)));
        check_dm(
            "!NEW /srv/x Fix the   login bug ",
            Some(new_command("/srv/x", Some("Fix the   login bug"), None)),
        );
        check_dm(
            "!new \"/home/a/my project\" Title here\n  explain the build\n\n    step two  \n",
            Some(new_command(
                "/home/a/my project",
                Some("Title here"),
                Some("explain the build\n\n    step two"),
            )),
        );
        check_dm(
            "!new /tmp\nwhat is here?",
            Some(new_command("/tmp", None, Some("what is here?"))),
        );
        check_dm(
            "!new \"/unclosed dir",
            Some(new_command("/unclosed dir", None, None)),
        );
        let missing = Some(DmCommand::MissingArgument {
            command: "new",
            usage: "new <directory> [title]",
        });
        check_dm("!new", missing.clone());
        check_dm("!new   ", missing.clone());
        check_dm("!new \"\" title", missing.clone());
        // The directory belongs on the first line; a prompt alone is not enough.
        check_dm("!new\n/tmp do it", missing);
    }

    fn check_thread(text: &str, expected: Option<ThreadCommand>) {
        assert_eq!(parse_thread(text, "!"), expected, "text {text:?}");
    }

    #[test]
    fn parse_thread_commands() {
        let plain = [
            ("allow", ThreadCommand::Allow),
            ("always", ThreadCommand::Always),
            ("skip", ThreadCommand::Skip),
            ("stop", ThreadCommand::Stop),
            ("status", ThreadCommand::Status),
            ("todo", ThreadCommand::Todo),
            ("compact", ThreadCommand::Compact),
            ("diff", ThreadCommand::Diff),
            ("help", ThreadCommand::Help),
            ("deny", ThreadCommand::Deny { message: None }),
            ("model", ThreadCommand::Model { choice: None }),
            ("agent", ThreadCommand::Agent { name: None }),
        ];
        for (name, expected) in plain {
            check_thread(&format!("!{name}"), Some(expected.clone()));
            check_thread(
                &format!("  !{}\n", name.to_uppercase()),
                Some(expected.clone()),
            );
        }
        check_thread(
            "!deny not in prod\nuse the staging db",
            Some(ThreadCommand::Deny {
                message: Some("not in prod\nuse the staging db".into()),
            }),
        );
        check_thread(
            "!model anthropic/claude-sonnet-4",
            Some(ThreadCommand::Model {
                choice: Some("anthropic/claude-sonnet-4".into()),
            }),
        );
        check_thread(
            "!Agent plan",
            Some(ThreadCommand::Agent {
                name: Some("plan".into()),
            }),
        );
        check_thread(
            "!rename  Login   bug\nhunt ",
            Some(ThreadCommand::Rename {
                title: "Login bug hunt".into(),
            }),
        );
        check_thread(
            "!file src/main.rs",
            Some(ThreadCommand::File {
                path: "src/main.rs".into(),
            }),
        );
        check_thread(
            "!file \"docs/my notes.md\"",
            Some(ThreadCommand::File {
                path: "docs/my notes.md".into(),
            }),
        );
        check_thread("!help me", Some(ThreadCommand::Help));
        check_thread(
            "!steer use the staging db\nnot prod",
            Some(ThreadCommand::Steer {
                text: "use the staging db\nnot prod".into(),
            }),
        );
        check_thread(
            "!steer",
            Some(ThreadCommand::MissingArgument {
                command: "steer",
                usage: "steer <text>",
            }),
        );
    }

    #[test]
    fn parse_thread_mistakes() {
        check_thread(
            "!stop it now",
            Some(ThreadCommand::UnexpectedArgument {
                command: "stop",
                usage: "stop",
                argument: "it now".into(),
            }),
        );
        check_thread(
            "!allow\nplease",
            Some(ThreadCommand::UnexpectedArgument {
                command: "allow",
                usage: "allow",
                argument: "please".into(),
            }),
        );
        check_thread(
            "!model gpt 4",
            Some(ThreadCommand::UnexpectedArgument {
                command: "model",
                usage: "model [provider/model]",
                argument: "gpt 4".into(),
            }),
        );
        check_thread(
            "!rename",
            Some(ThreadCommand::MissingArgument {
                command: "rename",
                usage: "rename <title>",
            }),
        );
        check_thread(
            "!file  ",
            Some(ThreadCommand::MissingArgument {
                command: "file",
                usage: "file <path>",
            }),
        );
        check_thread(
            "!retry",
            Some(ThreadCommand::Unknown {
                name: "retry".into(),
            }),
        );
        for plain in ["allow", "", "!", "! stop", "please !stop", "   "] {
            check_thread(plain, None);
        }
        assert_eq!(parse_thread("..stop", ".."), Some(ThreadCommand::Stop));
        assert_eq!(parse_thread("!stop", ".."), None);
    }

    #[test]
    fn every_thread_command_in_the_usage_table_parses() {
        for (name, usage, description) in THREAD_USAGE {
            assert!(usage.starts_with(name), "{usage}");
            assert!(!description.is_empty());
            let parsed = parse_thread(&format!("!{name} x"), "!");
            assert!(
                !matches!(parsed, None | Some(ThreadCommand::Unknown { .. })),
                "{name}: {parsed:?}"
            );
        }
    }

    #[test]
    fn reaction_names() {
        use ReactionMeaning::*;
        for (name, meaning) in [
            ("white_check_mark", Some(Allow)),
            ("+1", Some(Allow)),
            ("thumbsup", Some(Allow)),
            ("+1_medium_dark_skin_tone", Some(Allow)),
            ("unlock", Some(Always)),
            ("x", Some(Reject)),
            ("-1", Some(Reject)),
            ("thumbsdown", Some(Reject)),
            ("thumbsdown_light_skin_tone", Some(Reject)),
            ("octagonal_sign", Some(Stop)),
            ("repeat", Some(Retry)),
            ("one", Some(Choice(1))),
            ("five", Some(Choice(5))),
            ("nine", Some(Choice(9))),
            ("ten", None),
            ("keycap_ten", None),
            ("zero", None),
            ("smile", None),
            ("", None),
            ("_light_skin_tone", None),
            ("X", None),
        ] {
            assert_eq!(reaction_meaning(name), meaning, "{name}");
        }
        for number in 1..=9 {
            let emoji = choice_emoji(number).unwrap();
            assert_eq!(reaction_meaning(emoji), Some(Choice(number as u8)));
        }
        assert_eq!(choice_emoji(0), None);
        assert_eq!(choice_emoji(10), None);
    }

    /// A small deterministic generator, so the loops below cover many inputs without a new crate.
    fn pseudo_random_texts(count: usize) -> Vec<String> {
        const PIECES: &[&str] = &[
            "!", "!!", "..", " ", "\n", "\t", "\"", "new", "NeW", "deny", "stop", "file", "rename",
            "model", "a/b", "~", "é", "🦀", "\r\n", "x", "sessions", "attach", "all", "  ",
        ];
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let length = (state % 9) as usize;
                (0..length)
                    .map(|i| PIECES[((state >> (i * 5)) % PIECES.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    #[test]
    fn parsers_never_panic_and_round_trip() {
        let (mut news, mut denials) = (0, 0);
        let random = pseudo_random_texts(3000);
        let commands = random
            .iter()
            .flat_map(|tail| [format!("!new {tail}"), format!("!deny{tail}")]);
        for text in random.iter().cloned().chain(commands) {
            for prefix in ["!", "..", "é"] {
                let dm = parse_dm(&text, prefix);
                let thread = parse_thread(&text, prefix);
                if !text.trim().starts_with(prefix) {
                    assert_eq!(dm, None, "{text:?}");
                    assert_eq!(thread, None, "{text:?}");
                }
                // What a command carries is text the owner typed, never invented.
                if let Some(DmCommand::New {
                    directory,
                    title,
                    prompt,
                }) = &dm
                {
                    news += 1;
                    assert!(!directory.trim().is_empty());
                    assert!(text.contains(directory.as_str()), "{text:?}");
                    for part in [title, prompt].into_iter().flatten() {
                        assert!(text.contains(part.as_str()), "{text:?} {part:?}");
                    }
                }
                if let Some(ThreadCommand::Deny {
                    message: Some(message),
                }) = &thread
                {
                    denials += 1;
                    assert!(text.contains(message.as_str()));
                }
            }
        }
        assert!(
            news > 1000 && denials > 300,
            "too few cases: {news} new, {denials} deny"
        );
        // Rebuilding a `new` from its parts parses back to the same parts.
        for (directory, title, prompt) in [
            ("/a", None, None),
            ("/with space/dir", Some("t i"), Some("line1\nline2")),
            ("rel", Some("🦀 crab"), None),
            ("~/x", None, Some("p")),
        ] {
            let quoted = if directory.contains(' ') {
                format!("\"{directory}\"")
            } else {
                directory.to_string()
            };
            let text = format!(
                "!new {quoted} {}\n{}",
                title.unwrap_or(""),
                prompt.unwrap_or("")
            );
            check_dm(&text, Some(new_command(directory, title, prompt)));
        }
        for name in pseudo_random_texts(2000) {
            let _ = reaction_meaning(&name);
        }
    }

    const SESSIONS: &[(&str, &str)] = &[
        ("ses_1a2b3c4d5e6fAAAAAAAAAAAAAA", "neon-eagle"),
        ("ses_1a2b3c4d5e6fBBBBBBBBBBBBBB", "quiet-river"),
        ("ses_1a2b3c4d5e70CCCCCCCCxyz123", "Bold-Fox"),
        ("ses_9f00aa11bb22DDDDDDDDDDDDDD", "xyz12345"),
    ];

    fn check_resolve(query: &str, expected: Resolution) {
        let sessions: Vec<SessionRef<'_>> = SESSIONS
            .iter()
            .map(|(id, slug)| SessionRef { id, slug })
            .collect();
        assert_eq!(
            resolve_session(query, &sessions),
            expected,
            "query {query:?}"
        );
    }

    #[test]
    fn resolve_exact_forms() {
        check_resolve("ses_1a2b3c4d5e6fAAAAAAAAAAAAAA", Resolution::One(0));
        check_resolve("AAAAAAAA", Resolution::One(0));
        check_resolve("BBBBBBBB", Resolution::One(1));
        check_resolve("neon-eagle", Resolution::One(0));
        check_resolve("NEON-EAGLE", Resolution::One(0));
        check_resolve("bold-fox", Resolution::One(2));
        check_resolve("  quiet-river ", Resolution::One(1));
    }

    #[test]
    fn resolve_prefixes_and_suffixes() {
        check_resolve("ses_1a2b3c4d5e70", Resolution::One(2));
        check_resolve("1a2b3c4d5e70", Resolution::One(2));
        check_resolve("9f00", Resolution::One(3));
        check_resolve("Cxyz123", Resolution::One(2));
        check_resolve("1a2b3c4d5e6f", Resolution::Ambiguous(vec![0, 1]));
        check_resolve("ses_", Resolution::Ambiguous(vec![0, 1, 2, 3]));
        check_resolve("DDDD", Resolution::One(3));
        check_resolve("aaaaaaaa", Resolution::NotFound);
        check_resolve("nothing", Resolution::NotFound);
        check_resolve("", Resolution::NotFound);
        check_resolve("   ", Resolution::NotFound);
    }

    #[test]
    fn exact_matches_win_over_prefix_and_suffix_matches() {
        // The slug of one session is a suffix of another's id, and the short id of one session is a
        // prefix of another's id: in both cases the exact form wins.
        let sessions = [
            SessionRef {
                id: "ses_aaaaaaaaaaaaaaaaaaaaaaaaaa",
                slug: "neon",
            },
            SessionRef {
                id: "ses_bbbbbbbbbbbbbbbbbbbbb-neon",
                slug: "other",
            },
        ];
        assert_eq!(resolve_session("neon", &sessions), Resolution::One(0));
        let sessions = [
            SessionRef {
                id: "ses_cccccccccccccccccc12345678",
                slug: "a",
            },
            SessionRef {
                id: "ses_12345678dddddddddddddddddd",
                slug: "b",
            },
        ];
        assert_eq!(resolve_session("12345678", &sessions), Resolution::One(0));
    }

    #[test]
    fn short_id_is_the_last_eight_chars() {
        assert_eq!(short_id("ses_1a2b3c4d5e6fAAAAAAAAAAAAAA"), "AAAAAAAA");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id(""), "");
        assert_eq!(short_id("12345678"), "12345678");
        assert_eq!(short_id("x123456789"), "23456789");
        assert_eq!(short_id("ses_éééééééé"), "éééééééé");
        assert_eq!(short_id("🦀🦀🦀🦀🦀🦀🦀🦀🦀"), "🦀🦀🦀🦀🦀🦀🦀🦀");
    }
}
