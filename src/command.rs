//! Parses the commands the owner types and resolves the session names they use, as pure functions so
//! that every spelling can be tested without a server.

/// A command typed in the main DM (outside any session thread).
#[derive(Debug, PartialEq, Eq)]
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
#[derive(Debug, PartialEq, Eq)]
pub enum ThreadCommand {
    /// `allow`: allow the oldest pending permission request once.
    Allow,
    /// `always`: allow it, and its pattern from now on in this session.
    Always,
    /// `deny [message]`: reject it; a message is passed on to the agent.
    Deny { message: Option<String> },
    /// `skip`: reject the pending question.
    Skip,
    /// `stop`: abort the session's current run.
    Stop,
    /// `status`.
    Status,
    /// `model [provider/model]`: list, or choose for this session's next prompts.
    Model { choice: Option<String> },
    /// `agent [name]`: list, or choose.
    Agent { name: Option<String> },
    /// `todo`.
    Todo,
    /// `compact`: summarise the session.
    Compact,
    /// `rename <title>`.
    Rename { title: String },
    /// `diff`: the session's current changes.
    Diff,
    /// `file <path>`: attach a file from the session's directory.
    File { path: String },
    /// `help`.
    Help,
    Unknown { name: String },
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
];

/// Parses a main-DM message. `None` when `text` does not start with `prefix`, or when the prefix is
/// followed by nothing or by whitespace (`! really?` is a message, not a command). Leading and trailing
/// whitespace is ignored and command names are case-insensitive.
pub fn parse_dm(text: &str, prefix: &str) -> Option<DmCommand> {
    let (name, argument) = split_command(text, prefix)?;
    let command = match name.to_lowercase().as_str() {
        "help" => DmCommand::Help,
        "sessions" => match argument.to_lowercase().as_str() {
            "" => DmCommand::Sessions { all: false },
            "all" => DmCommand::Sessions { all: true },
            _ => unexpected("sessions", argument),
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
