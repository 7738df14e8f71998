//! Turns argv, the environment and an optional env file into a validated `Config`, so that nothing starts
//! on bad input and every mistake is reported once, with its fix, before any connection is made.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub mod links;

pub use links::Dirs;

/// The version printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A credential. Its `Debug` and `Display` print `<redacted>` so that it never reaches a log line or an
/// error message by accident; call `expose` at the one place that sends it.
#[derive(Clone)]
pub struct Secret(String);

/// Defined by `log`, which must not depend on the configuration: imports run from `config` to `log`.
pub use crate::log::{LogFormat, LogLevel};

/// Everything the daemon needs to start, already validated and normalised.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL without a trailing slash or `/api/v4`, like `https://chat.example.com`.
    pub mattermost_url: String,
    pub mattermost_token: Secret,
    /// Lowercased username without the leading `@`, or a 26-character user id.
    pub owner: String,
    /// OPENCODE_URL's servers, in the order given (empty when only `auto`).
    pub opencode_servers: Vec<ServerEntry>,
    /// OPENCODE_URL has `auto` (or is unset): OpenCode processes on this machine are found.
    pub opencode_auto: bool,
    pub opencode_username: String,
    /// OPENCODE_SERVER_PASSWORD: for every server without its own.
    pub opencode_password: Option<Secret>,
    /// OPENCODE_API: which OpenCode API to speak; `Auto` probes the server at every connect.
    pub opencode_api: crate::opencode::ApiChoice,
    pub state_dir: PathBuf,
    pub command_prefix: String,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    /// PEM files whose certificates are the trusted roots for https:// and wss:// (from
    /// OPENCODE_MM_CA_FILE, then SSL_CERT_FILE). Empty means the bundled web PKI roots.
    pub ca_files: Vec<PathBuf>,
    /// OPENCODE_MM_ALLOW_INSECURE_HTTP=1: a plain http:// Mattermost URL to another host is allowed.
    pub allow_insecure_http: bool,
    /// The most bytes of attached files one post may carry in total.
    pub max_file_size: u64,
    /// Prompts recovered after downtime that are older than this are not run.
    pub catchup_max_age: Duration,
    /// Records of sessions that ended longer ago than this are dropped from `state.json`.
    pub forget_after: Duration,
    /// The most Mattermost requests a second while the server sends no rate-limit headers.
    pub max_rps: u32,
    /// OPENCODE_MM_NOTIFY and OPENCODE_MM_NOTIFY_DONE_AFTER: which posts mention the owner.
    pub notify: Notify,
    /// OPENCODE_MM_DIRS: the directories whose sessions this bridge (or link) takes.
    pub dirs: Dirs,
}

/// Which posts mention the owner, so Mattermost notifies them even in a thread they do not follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    /// Permission requests and questions.
    pub asks: bool,
    /// Failed or interrupted answers, and sessions that ended.
    pub errors: bool,
    /// Completion lines of turns that ran at least `done_after`; None: never.
    pub done_after: Option<Duration>,
}

impl Default for Notify {
    fn default() -> Notify {
        Notify {
            asks: true,
            errors: true,
            done_after: Some(DEFAULT_NOTIFY_DONE_AFTER),
        }
    }
}

impl Notify {
    /// No post mentions anyone.
    pub const NONE: Notify = Notify {
        asks: false,
        errors: false,
        done_after: None,
    };

    /// Whether a turn that ran `elapsed` and ended well mentions the owner.
    pub fn mentions_done(&self, elapsed: Duration) -> bool {
        self.done_after.is_some_and(|after| elapsed >= after)
    }
}

/// One OpenCode server named in OPENCODE_URL.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    /// `NAME` of `NAME=URL`, else `host:port`.
    pub name: String,
    /// Base URL without a trailing slash, like `http://127.0.0.1:4096`.
    pub url: String,
    /// OPENCODE_SERVER_PASSWORD_<NAME> (or its _FILE form): overrides OPENCODE_SERVER_PASSWORD.
    pub password: Option<Secret>,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Invocation {
    Run(Config),
    /// OPENCODE_MM_LINKS_DIR is set: one bridge per link file.
    RunLinks(links::LinkSet),
    /// `check` with OPENCODE_MM_LINKS_DIR: per link, its settings or what is wrong with them.
    CheckLinks(Result<links::LinkSet, ConfigError>),
    /// `check`: the configuration is one of the things checked, so its error is reported as a
    /// check line rather than ending the program.
    Check(Result<Config, ConfigError>),
    /// `status`: only the state directory is needed.
    Status {
        state_dir: PathBuf,
        json: bool,
        /// OPENCODE_MM_LINKS_DIR: the status of each link's state directory.
        links_dir: Option<PathBuf>,
    },
    Help,
    Version,
}

/// A configuration or usage error. The caller prints it and exits with code 2.
#[derive(Debug)]
pub struct ConfigError {
    pub message: String,
}

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// What the log must never show: the token, the OpenCode password and the basic-auth header made
    /// from it.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.mattermost_token.expose().to_string()];
        let passwords = self
            .opencode_servers
            .iter()
            .filter_map(|s| s.password.as_ref());
        for password in self.opencode_password.iter().chain(passwords) {
            secrets.push(password.expose().to_string());
            let header = crate::http::basic_auth(&self.opencode_username, password.expose());
            if let Some(encoded) = header.strip_prefix("Basic ") {
                secrets.push(encoded.to_string());
            }
        }
        secrets
    }

    /// The password `server` is called with: its own, else OPENCODE_SERVER_PASSWORD.
    pub fn password_for<'a>(&'a self, server: &'a ServerEntry) -> Option<&'a Secret> {
        server.password.as_ref().or(self.opencode_password.as_ref())
    }

    /// The servers to call at start: OPENCODE_URL's list (those `auto` finds come at run time).
    pub fn start_servers(&self) -> Vec<ServerEntry> {
        self.opencode_servers.clone()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// `parse` for the process's own arguments (without argv[0]) and environment, which need not be UTF-8:
/// a non-UTF-8 argument or variable is a usage error naming it, rather than a panic or a variable
/// silently taken as unset. Neither value is shown: it may be a secret.
pub fn parse_os(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Invocation, ConfigError> {
    let mut utf8_args = Vec::new();
    for (position, arg) in args.into_iter().enumerate() {
        match arg.into_string() {
            Ok(arg) => utf8_args.push(arg),
            Err(_) => {
                return Err(usage_error(format!(
                    "argument {} is not valid UTF-8; pass settings as UTF-8 text (a path with other \
                     bytes can be reached through a symlink with a UTF-8 name)",
                    position + 1
                )));
            }
        }
    }
    let not_utf8 = std::cell::RefCell::new(None);
    let utf8_env = |name: &str| match env(name)?.into_string() {
        Ok(value) => Some(value),
        Err(_) => {
            not_utf8
                .borrow_mut()
                .get_or_insert_with(|| name.to_string());
            None
        }
    };
    let env_names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with(PASSWORD_PREFIX) && env(name).is_some())
        .collect();
    let parsed = parse_with_names(&utf8_args, &utf8_env, &env_names);
    // Checked first: the variable read as unset may be what `parse` complains about.
    if let Some(name) = not_utf8.into_inner() {
        return Err(error(format!(
            "{name} is not valid UTF-8; set it to UTF-8 text (a path with other bytes can be reached \
             through a symlink with a UTF-8 name)"
        )));
    }
    parsed
}

/// Parses the arguments (without argv[0]) and the environment into an `Invocation`.
///
/// `--help` and `--version` win wherever they appear, even after a bad flag. The only IO is reading the
/// file named by `--env-file` and the one named by `MATTERMOST_TOKEN_FILE`.
pub fn parse(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Invocation, ConfigError> {
    parse_with_names(args, env, &[])
}

/// `parse`, also given the environment's variable names, so that a per-server password variable
/// for a server OPENCODE_URL does not name is reported rather than ignored.
pub fn parse_with_names(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    env_names: &[String],
) -> Result<Invocation, ConfigError> {
    let command_line = parse_args(args);
    match command_line.early_exit {
        Some(EarlyExit::Help) => return Ok(Invocation::Help),
        Some(EarlyExit::Version) => return Ok(Invocation::Version),
        None => {}
    }
    if let Some(error) = command_line.error {
        return Err(error);
    }
    let env_file = match &command_line.env_file {
        Some(path) => Some(EnvFile::load(path)?),
        None => None,
    };
    let sources = Sources {
        flags: &command_line.flags,
        env,
        env_file: env_file.as_ref(),
        env_names,
        link: None,
    };
    let links_dir = links_dir(&sources)?;
    match (command_line.subcommand, links_dir) {
        (Subcommand::Run, None) => build_config(&sources).map(Invocation::Run),
        (Subcommand::Check, None) => Ok(Invocation::Check(build_config(&sources))),
        (Subcommand::Run, Some(dir)) => {
            let base = links::Base::new(dir, &sources)?;
            links::LinkSet::load_for_start(base).map(Invocation::RunLinks)
        }
        (Subcommand::Check, Some(dir)) => {
            let base = links::Base::new(dir, &sources)?;
            Ok(Invocation::CheckLinks(links::LinkSet::load(base)))
        }
        (Subcommand::Status, links_dir) => Ok(Invocation::Status {
            state_dir: state_dir(&sources)?,
            json: command_line.json,
            links_dir,
        }),
    }
}

/// True when `url` is plain http:// to a host other than this machine, where a token would cross
/// the network in clear.
pub fn is_insecure_remote_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// The text printed by `--help`.
pub fn help_text() -> String {
    let mut text = format!(
        "opencode-mattermost {VERSION}\n\
         Drive OpenCode sessions from Mattermost direct messages, one thread per session.\n\
         \n\
         USAGE:\n    opencode-mattermost [run|check|status] [OPTIONS]\n\
         \n\
         SUBCOMMANDS:\n    \
         run              Connect to Mattermost and OpenCode and serve the owner (the default)\n    \
         check            Check the configuration, both servers and the state directory, one line each\n    \
         status           Show from the state directory whether a bridge runs, when it last heard\n                     \
         from each side, and its sessions; exit 0 only if one runs and is healthy\n\
         \n\
         OPTIONS:\n    --env-file PATH  Read KEY=VALUE lines (systemd EnvironmentFile syntax) from PATH\n    \
         --json           With status: print JSON for scripts\n    \
         -h, --help       Print this help and exit\n    -V, --version    Print the version and exit\n\
         \n\
         VARIABLES (a flag beats the environment, which beats the env file; an empty value counts as unset):\n"
    );
    for var in ALL_VARS {
        if var.flag.is_empty() {
            text.push_str(&format!("    {}\n        {}", var.name, var.about));
        } else {
            text.push_str(&format!(
                "    {:<28} {} {}\n        {}",
                var.name, var.flag, var.placeholder, var.about
            ));
        }
        if let Some(default) = var.default {
            text.push_str(&format!(" [default: {default}]"));
        }
        text.push('\n');
    }
    text.push_str(
        "\nEXIT CODES:\n    0    clean stop (SIGINT or SIGTERM); check: every check passed; status: running and healthy\n    \
         1    fatal runtime error; check: a check failed; status: not running or not healthy\n    \
         2    configuration or usage error\n    \
         3    another opencode-mattermost already runs on the state directory\n    \
         4    a bug: a thread other than a session worker panicked (the log has the message)\n",
    );
    text
}

// ---------------------------------------------------------------------------------------------------------
// Private: the variable table, argument parsing, sources and validation.
// ---------------------------------------------------------------------------------------------------------

/// One setting: its environment variable, its flag and the words `--help` uses for it.
struct Var {
    name: &'static str,
    flag: &'static str,
    placeholder: &'static str,
    about: &'static str,
    default: Option<&'static str>,
}

const MATTERMOST_URL: Var = Var {
    name: "MATTERMOST_URL",
    flag: "--mattermost-url",
    placeholder: "URL",
    about: "Mattermost base URL, like https://chat.example.com (required)",
    default: None,
};
const MATTERMOST_TOKEN: Var = Var {
    name: "MATTERMOST_TOKEN",
    flag: "--mattermost-token",
    placeholder: "TOKEN",
    about: "access token the daemon posts with; this or MATTERMOST_TOKEN_FILE is required, and both are \
            safer than the flag, which other users can see in ps",
    default: None,
};
const MATTERMOST_TOKEN_FILE: Var = Var {
    name: "MATTERMOST_TOKEN_FILE",
    flag: "--mattermost-token-file",
    placeholder: "PATH",
    about: "file holding the access token, instead of MATTERMOST_TOKEN",
    default: None,
};
const MATTERMOST_OWNER: Var = Var {
    name: "MATTERMOST_OWNER",
    flag: "--mattermost-owner",
    placeholder: "USER",
    about: "the only Mattermost user the daemon obeys: @username or user id (required)",
    default: None,
};
const OPENCODE_URL: Var = Var {
    name: "OPENCODE_URL",
    flag: "--opencode-url",
    placeholder: "URL",
    about: "OpenCode servers, comma-separated: URL, NAME=URL (NAME: a-z, 0-9 and -, at most 20), or \
            auto to find OpenCode processes of this user on this machine; \
            OPENCODE_SERVER_PASSWORD_<NAME> (or _<NAME>_FILE) gives one server its own password",
    default: Some("auto"),
};
const OPENCODE_SERVER_USERNAME: Var = Var {
    name: "OPENCODE_SERVER_USERNAME",
    flag: "--opencode-username",
    placeholder: "NAME",
    about: "basic-auth user name for `opencode serve`",
    default: Some(DEFAULT_OPENCODE_USERNAME),
};
const OPENCODE_SERVER_PASSWORD: Var = Var {
    name: "OPENCODE_SERVER_PASSWORD",
    flag: "--opencode-password",
    placeholder: "PASSWORD",
    about: "basic-auth password for `opencode serve`; unset means none (prefer the environment to the \
            flag, which other users can see in ps)",
    default: None,
};
const OPENCODE_API: Var = Var {
    name: "OPENCODE_API",
    flag: "--opencode-api",
    placeholder: "API",
    about: "OpenCode API to speak: auto (v1 on 1.x servers, v2 when only /api/* answers), v1 or v2",
    default: Some("auto"),
};
const OPENCODE_MM_STATE_DIR: Var = Var {
    name: "OPENCODE_MM_STATE_DIR",
    flag: "--state-dir",
    placeholder: "DIR",
    about: "absolute directory for the daemon's state",
    default: Some("$XDG_STATE_HOME/opencode-mattermost, else ~/.local/state/opencode-mattermost"),
};
const OPENCODE_MM_COMMAND_PREFIX: Var = Var {
    name: "OPENCODE_MM_COMMAND_PREFIX",
    flag: "--command-prefix",
    placeholder: "PREFIX",
    about: "what starts a command in a message: 1 to 8 characters, no whitespace",
    default: Some(DEFAULT_COMMAND_PREFIX),
};
const OPENCODE_MM_LOG: Var = Var {
    name: "OPENCODE_MM_LOG",
    flag: "--log",
    placeholder: "LEVEL",
    about: "log level: error, warn, info, debug or trace",
    default: Some("info"),
};

const OPENCODE_MM_LOG_FORMAT: Var = Var {
    name: "OPENCODE_MM_LOG_FORMAT",
    flag: "--log-format",
    placeholder: "FORMAT",
    about: "log line format: text, or json for one JSON object per line",
    default: Some("text"),
};
const OPENCODE_MM_CA_FILE: Var = Var {
    name: "OPENCODE_MM_CA_FILE",
    flag: "--ca-file",
    placeholder: "PATH",
    about: "PEM file of the CA certificates to trust for https:// and wss:// instead of the bundled \
            web PKI roots (for a private CA)",
    default: None,
};
const SSL_CERT_FILE: Var = Var {
    name: "SSL_CERT_FILE",
    flag: "",
    placeholder: "",
    about: "honoured like OpenSSL does: a PEM bundle to trust instead of the bundled web PKI roots; \
            trusted together with OPENCODE_MM_CA_FILE when both are set",
    default: None,
};
const OPENCODE_MM_ALLOW_INSECURE_HTTP: Var = Var {
    name: "OPENCODE_MM_ALLOW_INSECURE_HTTP",
    flag: "",
    placeholder: "",
    about: "set to 1 to allow a plain http:// MATTERMOST_URL to a host other than this machine, which \
            sends the token in clear (a warning is logged)",
    default: Some("0"),
};
const OPENCODE_MM_MAX_FILE_SIZE: Var = Var {
    name: "OPENCODE_MM_MAX_FILE_SIZE",
    flag: "--max-file-size",
    placeholder: "SIZE",
    about: "the most bytes of attached files one post may carry in total: bytes, or with K, M, G \
            (or KiB, MiB, GiB) for units of 1024",
    default: Some("20MiB"),
};
const OPENCODE_MM_CATCHUP_MAX_AGE: Var = Var {
    name: "OPENCODE_MM_CATCHUP_MAX_AGE",
    flag: "--catchup-max-age",
    placeholder: "AGE",
    about: "prompts posted while the bridge was down and older than this are not run: like 90s, 30m, \
            24h or 2d",
    default: Some("24h"),
};
const OPENCODE_MM_FORGET_AFTER: Var = Var {
    name: "OPENCODE_MM_FORGET_AFTER",
    flag: "--forget-after",
    placeholder: "AGE",
    about: "the state file forgets sessions that ended longer ago than this: like 12h, 7d or 30d",
    default: Some("30d"),
};

const OPENCODE_MM_MAX_RPS: Var = Var {
    name: "OPENCODE_MM_MAX_RPS",
    flag: "--max-rps",
    placeholder: "N",
    about: "the most requests a second to a Mattermost that sends no rate-limit headers (its \
            default: rate limiting off); a server that sends them is followed instead",
    default: Some("20"),
};

const OPENCODE_MM_NOTIFY: Var = Var {
    name: "OPENCODE_MM_NOTIFY",
    flag: "--notify",
    placeholder: "KINDS",
    about: "which posts mention the owner so their phone is notified: a comma list of asks, errors \
            and done, or none",
    default: Some("asks,errors,done"),
};
const OPENCODE_MM_NOTIFY_DONE_AFTER: Var = Var {
    name: "OPENCODE_MM_NOTIFY_DONE_AFTER",
    flag: "--notify-done-after",
    placeholder: "AGE",
    about: "a completion line mentions the owner when the turn took at least this long: like 60s or \
            5m; 0 always, off never",
    default: Some("60s"),
};

const OPENCODE_MM_LINKS_DIR: Var = Var {
    name: "OPENCODE_MM_LINKS_DIR",
    flag: "--links-dir",
    placeholder: "DIR",
    about: "serve several links (a Mattermost bot, an owner and their OpenCode servers): each NAME.env \
            in DIR is link NAME, which may set MATTERMOST_URL, MATTERMOST_TOKEN(_FILE), \
            MATTERMOST_OWNER, OPENCODE_URL, OPENCODE_SERVER_PASSWORD..., OPENCODE_MM_COMMAND_PREFIX and \
            OPENCODE_MM_DIRS (other settings are the process's); SIGHUP reads DIR again. Unset: one \
            link from these settings",
    default: None,
};
const OPENCODE_MM_DIRS: Var = Var {
    name: "OPENCODE_MM_DIRS",
    flag: "",
    placeholder: "",
    about: "comma-separated absolute directories: only sessions under one of them are taken; links \
            on one OpenCode server must have disjoint lists",
    default: Some("every directory"),
};

const ALL_VARS: [&Var; 23] = [
    &MATTERMOST_URL,
    &MATTERMOST_TOKEN,
    &MATTERMOST_TOKEN_FILE,
    &MATTERMOST_OWNER,
    &OPENCODE_URL,
    &OPENCODE_SERVER_USERNAME,
    &OPENCODE_SERVER_PASSWORD,
    &OPENCODE_API,
    &OPENCODE_MM_STATE_DIR,
    &OPENCODE_MM_COMMAND_PREFIX,
    &OPENCODE_MM_LOG,
    &OPENCODE_MM_LOG_FORMAT,
    &OPENCODE_MM_CA_FILE,
    &SSL_CERT_FILE,
    &OPENCODE_MM_ALLOW_INSECURE_HTTP,
    &OPENCODE_MM_MAX_FILE_SIZE,
    &OPENCODE_MM_CATCHUP_MAX_AGE,
    &OPENCODE_MM_FORGET_AFTER,
    &OPENCODE_MM_MAX_RPS,
    &OPENCODE_MM_NOTIFY,
    &OPENCODE_MM_NOTIFY_DONE_AFTER,
    &OPENCODE_MM_LINKS_DIR,
    &OPENCODE_MM_DIRS,
];

const DEFAULT_OPENCODE_URL: &str = "http://127.0.0.1:4096";
const OPENCODE_SERVER_PASSWORD_FILE: &str = "OPENCODE_SERVER_PASSWORD_FILE";
const PASSWORD_PREFIX: &str = "OPENCODE_SERVER_PASSWORD_";
const MAX_SERVER_NAME: usize = 20;
const DEFAULT_OPENCODE_USERNAME: &str = "opencode";
const DEFAULT_COMMAND_PREFIX: &str = "!";
const STATE_SUBDIR: &str = "opencode-mattermost";
const SEE_HELP: &str = "see opencode-mattermost --help";
const DEFAULT_MAX_FILE_SIZE: u64 = 20 * 1024 * 1024;
const DEFAULT_NOTIFY_DONE_AFTER: Duration = Duration::from_secs(60);
const DEFAULT_CATCHUP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

enum EarlyExit {
    Help,
    Version,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Subcommand {
    Run,
    Check,
    Status,
}

/// The command line after the first pass. A usage error is kept rather than returned at once, so that a
/// later `--help` still prints help.
struct CommandLine {
    early_exit: Option<EarlyExit>,
    error: Option<ConfigError>,
    subcommand: Subcommand,
    /// `--json`, for `status`.
    json: bool,
    /// Flag values by variable name.
    flags: HashMap<&'static str, String>,
    env_file: Option<String>,
}

/// Where a value came from, for messages that must tell the user which one to remove.
enum Origin {
    Flag(&'static str),
    Environment,
    EnvFile(String),
    LinkFile(String),
}

/// The result of looking a variable up in all sources.
enum Lookup {
    Value(String, Origin),
    /// Set somewhere, but only to an empty value.
    Empty,
    Unset,
}

struct Sources<'a> {
    flags: &'a HashMap<&'static str, String>,
    env: &'a dyn Fn(&str) -> Option<String>,
    env_file: Option<&'a EnvFile>,
    /// The environment's variable names, for the per-server ones whose names are not known ahead.
    env_names: &'a [String],
    /// A link's file (OPENCODE_MM_LINKS_DIR): its values come before every other source.
    link: Option<&'a EnvFile>,
}

/// The parsed `--env-file`: its path (for messages) and its assignments, the last one winning.
#[derive(Clone)]
struct EnvFile {
    path: String,
    values: HashMap<String, String>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Environment => f.write_str("the environment"),
            Origin::EnvFile(path) => write!(f, "--env-file {path}"),
            Origin::LinkFile(path) => write!(f, "link file {path}"),
        }
    }
}

impl<'a> Sources<'a> {
    /// Looks `var` up by precedence: flag, then environment, then env file. An empty value counts as
    /// unset and falls through to the next source. `trim` strips surrounding whitespace first; passwords
    /// are taken as they are.
    fn lookup(&self, var: &Var, trim: bool) -> Lookup {
        let candidates = [
            (
                self.link
                    .and_then(|file| file.values.get(var.name).cloned()),
                Origin::LinkFile(self.link.map(|f| f.path.clone()).unwrap_or_default()),
            ),
            (self.flags.get(var.name).cloned(), Origin::Flag(var.flag)),
            ((self.env)(var.name), Origin::Environment),
            (
                self.env_file
                    .and_then(|file| file.values.get(var.name).cloned()),
                Origin::EnvFile(
                    self.env_file
                        .map(|file| file.path.clone())
                        .unwrap_or_default(),
                ),
            ),
        ];
        let mut seen_empty = false;
        for (value, origin) in candidates {
            let Some(value) = value else { continue };
            let value = if trim {
                value.trim().to_string()
            } else {
                value
            };
            if value.is_empty() {
                seen_empty = true;
            } else {
                return Lookup::Value(value, origin);
            }
        }
        if seen_empty {
            Lookup::Empty
        } else {
            Lookup::Unset
        }
    }

    fn optional(&self, var: &Var) -> Option<String> {
        match self.lookup(var, true) {
            Lookup::Value(value, _) => Some(value),
            Lookup::Empty | Lookup::Unset => None,
        }
    }

    /// A variable with no flag whose name is made at run time (per-server passwords): environment,
    /// then env file; empty counts as unset. Taken as it is.
    fn dynamic(&self, name: &str) -> Option<String> {
        let from_link = self
            .link
            .and_then(|file| file.values.get(name).cloned())
            .filter(|v| !v.is_empty());
        if from_link.is_some() {
            return from_link;
        }
        (self.env)(name).filter(|v| !v.is_empty()).or_else(|| {
            self.env_file
                .and_then(|file| file.values.get(name).cloned())
                .filter(|v| !v.is_empty())
        })
    }

    /// Names of set variables starting with `prefix`, from the environment and the env file.
    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        // A link's own servers are checked against its own file only: the process's variables
        // may name the servers of other links.
        if let Some(link) = self.link {
            let mut names: Vec<String> = link
                .values
                .keys()
                .filter(|name| name.starts_with(prefix))
                .cloned()
                .collect();
            names.sort();
            return names;
        }
        let file_names = self.env_file.into_iter().flat_map(|f| f.values.keys());
        let mut names: Vec<String> = self
            .env_names
            .iter()
            .chain(file_names)
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Only the link file, when it sets one of `vars`: a pair like MATTERMOST_TOKEN and its _FILE
    /// form is one setting, which a link's file replaces as a whole.
    fn link_only(&self, vars: &[&Var]) -> Option<Sources<'a>> {
        let link = self.link?;
        let sets = vars.iter().any(|var| {
            link.values
                .get(var.name)
                .is_some_and(|v| !v.trim().is_empty())
        });
        sets.then_some(Sources {
            flags: &NO_FLAGS,
            env: &no_env,
            env_file: None,
            env_names: &[],
            link: Some(link),
        })
    }

    /// A required variable; `what` describes a good value for the message, like "the Mattermost base
    /// URL, like https://chat.example.com".
    fn required(&self, var: &Var, what: &str) -> Result<String, ConfigError> {
        match self.lookup(var, true) {
            Lookup::Value(value, _) => Ok(value),
            Lookup::Empty => Err(error(format!("{} is empty; set it to {what}", var.name))),
            Lookup::Unset => Err(error(format!(
                "{} is not set; set it (or pass {}) to {what}",
                var.name, var.flag
            ))),
        }
    }
}

static NO_FLAGS: std::sync::LazyLock<HashMap<&'static str, String>> =
    std::sync::LazyLock::new(HashMap::new);

fn no_env(_: &str) -> Option<String> {
    None
}

impl EnvFile {
    fn load(path: &str) -> Result<EnvFile, ConfigError> {
        let contents = std::fs::read_to_string(path).map_err(|err| {
            error(format!(
                "--env-file: cannot read {path:?}: {err}; check the path and its permissions"
            ))
        })?;
        EnvFile::parse(path, &contents, "--env-file")
    }

    /// `contents` of the file at `path`; `what` names it in messages (`--env-file`, `link file`).
    fn parse(path: &str, contents: &str, what: &str) -> Result<EnvFile, ConfigError> {
        let mut values = HashMap::new();
        for (number, line) in logical_lines(contents) {
            let line_error =
                |problem: &str| error(format!("{what} {path:?} line {number}: {problem}"));
            if let Some((key, value)) = parse_env_line(&line).map_err(|p| line_error(&p))? {
                values.insert(key, value);
            }
        }
        Ok(EnvFile {
            path: path.to_string(),
            values,
        })
    }
}

fn error(message: String) -> ConfigError {
    ConfigError { message }
}

fn usage_error(problem: String) -> ConfigError {
    error(format!("{problem}; {SEE_HELP}"))
}

fn parse_args(args: &[String]) -> CommandLine {
    let mut command_line = CommandLine {
        early_exit: None,
        error: None,
        subcommand: Subcommand::Run,
        json: false,
        flags: HashMap::new(),
        env_file: None,
    };
    let mut subcommand_seen = false;
    // After `--`, every argument is a positional one (the subcommand), whatever it starts with.
    let mut flags_ended = false;
    let mut index = 0;
    while index < args.len() {
        let arg = args[index].as_str();
        index += 1;
        let problem = match arg {
            "--" if !flags_ended => {
                flags_ended = true;
                None
            }
            _ if flags_ended => positional(&mut command_line, &mut subcommand_seen, arg),
            "-h" | "--help" => {
                command_line.early_exit.get_or_insert(EarlyExit::Help);
                None
            }
            "-V" | "--version" => {
                command_line.early_exit.get_or_insert(EarlyExit::Version);
                None
            }
            "--json" => {
                command_line.json = true;
                None
            }
            _ if arg.starts_with("--") => {
                let (flag, inline_value) = match arg.split_once('=') {
                    Some((flag, value)) => (flag, Some(value.to_string())),
                    None => (arg, None),
                };
                let target = if flag == "--env-file" {
                    Some(None)
                } else {
                    ALL_VARS
                        .iter()
                        .find(|var| !var.flag.is_empty() && var.flag == flag)
                        .map(|var| Some(var.name))
                };
                match target {
                    None => Some(format!("unknown flag {flag:?}")),
                    Some(target) => {
                        let value = match inline_value {
                            Some(value) => Some(value),
                            // The next argument is the value, unless it asks for help or the version:
                            // `--log --help` should print help rather than complain about the level.
                            // A following flag is never taken as a value: `--mattermost-url
                            // --mattermost-token T` must not turn the token into a stray argument.
                            None => match args.get(index) {
                                Some(next)
                                    if !is_early_exit_flag(next) && !next.starts_with("--") =>
                                {
                                    index += 1;
                                    Some(next.clone())
                                }
                                _ => None,
                            },
                        };
                        match (value, target) {
                            (None, _)
                                if args.get(index).is_some_and(|next| next.starts_with('-')) =>
                            {
                                Some(format!(
                                    "{flag} needs a value; for a value that starts with -, write {flag}=VALUE"
                                ))
                            }
                            (None, _) => Some(format!("{flag} needs a value")),
                            (Some(value), Some(name)) => {
                                command_line.flags.insert(name, value);
                                None
                            }
                            (Some(value), None) => {
                                command_line.env_file = Some(value);
                                None
                            }
                        }
                    }
                }
            }
            _ if arg.starts_with('-') && arg != "-" => Some(format!("unknown flag {arg:?}")),
            _ => positional(&mut command_line, &mut subcommand_seen, arg),
        };
        if let Some(problem) = problem {
            command_line.error.get_or_insert(usage_error(problem));
        }
    }
    if command_line.json && command_line.subcommand != Subcommand::Status {
        command_line
            .error
            .get_or_insert(usage_error("--json goes with status only".to_string()));
    }
    command_line
}

/// The subcommand, or the problem with a positional argument.
fn positional(
    command_line: &mut CommandLine,
    subcommand_seen: &mut bool,
    arg: &str,
) -> Option<String> {
    match arg {
        "run" | "check" | "status" if !*subcommand_seen => {
            *subcommand_seen = true;
            command_line.subcommand = match arg {
                "check" => Subcommand::Check,
                "status" => Subcommand::Status,
                _ => Subcommand::Run,
            };
            None
        }
        // A stray argument may be a secret pasted in the wrong place: name it only if it looks
        // like a word someone meant as a subcommand.
        _ if *subcommand_seen => Some(format!("unexpected argument {}", quote_if_word(arg))),
        _ => Some(format!("unknown subcommand {}", quote_if_word(arg))),
    }
}

fn quote_if_word(arg: &str) -> String {
    let word = arg.len() <= 16
        && arg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '-' || c == '_');
    if word {
        format!("{arg:?}")
    } else {
        "(not shown)".to_string()
    }
}

fn is_early_exit_flag(arg: &str) -> bool {
    matches!(arg, "-h" | "--help" | "-V" | "--version")
}

/// Parses one line of a systemd EnvironmentFile: `KEY=VALUE`, with whitespace around `=` ignored, the
/// value optionally in single quotes (taken literally) or double quotes (where a backslash escapes `"`,
/// `\`, `$` and `` ` ``). Comments start with `#` or `;`. Returns `None` for comments and blank lines.
/// The problem never quotes the value, because the value may be a token.
fn parse_env_line(line: &str) -> Result<Option<(String, String)>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
        return Ok(None);
    }
    let Some((key, value)) = line.split_once('=') else {
        return Err("expected KEY=VALUE; fix the line or comment it out with #".to_string());
    };
    let key = key.trim();
    let key_is_valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key_is_valid {
        return Err(format!(
            "{key:?} is not a valid variable name; use letters, digits and _ as in MATTERMOST_URL=…"
        ));
    }
    let value = value.trim();
    let value = match value.chars().next() {
        Some(quote @ ('"' | '\'')) => unquote(&value[1..], quote)?,
        _ => unescape_unquoted(value),
    };
    Ok(Some((key.to_string(), value)))
}

/// As systemd reads an unquoted value: a backslash makes the next character literal.
fn unescape_unquoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Physical lines joined where one ends in a backslash (systemd's line continuation), each with the
/// number of its first physical line. Comment lines never continue.
fn logical_lines(contents: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, line) in contents.lines().enumerate() {
        let (number, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        let is_comment = joined.is_empty() && {
            let trimmed = line.trim_start();
            trimmed.starts_with('#') || trimmed.starts_with(';')
        };
        let trailing_backslashes = line.len() - line.trim_end_matches('\\').len();
        if !is_comment && trailing_backslashes % 2 == 1 {
            joined.push_str(&line[..line.len() - 1]);
            pending = Some((number, joined));
        } else {
            joined.push_str(line);
            lines.push((number, joined));
        }
    }
    if let Some(last) = pending {
        lines.push(last);
    }
    lines
}

/// Reads a quoted value whose opening quote has been removed; only whitespace may follow the closing one.
fn unquote(rest: &str, quote: char) -> Result<String, String> {
    let mut value = String::new();
    let mut chars = rest.char_indices();
    while let Some((index, c)) = chars.next() {
        if c == quote {
            let after = &rest[index + c.len_utf8()..];
            if !after.trim().is_empty() {
                return Err(format!(
                    "unexpected text after the closing {quote}; quote the whole value"
                ));
            }
            return Ok(value);
        }
        if c == '\\' && quote == '"' {
            match chars.next() {
                Some((_, escaped @ ('"' | '\\' | '$' | '`'))) => value.push(escaped),
                Some((_, other)) => {
                    value.push('\\');
                    value.push(other);
                }
                None => value.push('\\'),
            }
            continue;
        }
        value.push(c);
    }
    Err(format!(
        "missing closing {quote}; values cannot span lines, so close the quote on the same line"
    ))
}

fn build_config(sources: &Sources<'_>) -> Result<Config, ConfigError> {
    let mattermost_url = sources.required(
        &MATTERMOST_URL,
        "the Mattermost base URL, like https://chat.example.com",
    )?;
    let mattermost_url = normalize_url(MATTERMOST_URL.name, &mattermost_url, true)?;
    let mattermost_token = match sources.link_only(&[&MATTERMOST_TOKEN, &MATTERMOST_TOKEN_FILE]) {
        Some(link) => mattermost_token(&link)?,
        None => mattermost_token(sources)?,
    };
    let owner = sources.required(
        &MATTERMOST_OWNER,
        "the Mattermost username the daemon obeys, like @alice",
    )?;
    let owner = validate_owner(&owner)?;
    let (mut opencode_servers, opencode_auto) = match sources.optional(&OPENCODE_URL) {
        Some(list) => parse_server_list(&list)?,
        None => (Vec::new(), true),
    };
    let opencode_username = sources
        .optional(&OPENCODE_SERVER_USERNAME)
        .unwrap_or_else(|| DEFAULT_OPENCODE_USERNAME.to_string());
    if opencode_username.contains(':') {
        return Err(error(format!(
            "{}: {opencode_username:?} contains ':'; basic-auth user names cannot contain a colon",
            OPENCODE_SERVER_USERNAME.name
        )));
    }
    let global_file = OPENCODE_SERVER_PASSWORD_FILE;
    let names_file = opencode_servers.iter().any(|s| s.name == "file");
    let link_password_file = sources
        .link
        .and_then(|link| link.values.get(global_file))
        .filter(|path| !path.is_empty() && !names_file);
    let opencode_password = match sources.lookup(&OPENCODE_SERVER_PASSWORD, false) {
        // A link's own password file beats the process's password.
        _ if link_password_file.is_some() => Some(read_password_file(
            global_file,
            link_password_file.map_or("", String::as_str),
        )?),
        Lookup::Value(password, _) => Some(Secret::new(password)),
        Lookup::Empty | Lookup::Unset if !names_file => match sources.dynamic(global_file) {
            Some(path) => Some(read_password_file(global_file, &path)?),
            None => None,
        },
        Lookup::Empty | Lookup::Unset => None,
    };
    server_passwords(sources, &mut opencode_servers)?;
    let opencode_api = match sources.optional(&OPENCODE_API) {
        Some(api) => parse_api(&api)?,
        None => crate::opencode::ApiChoice::Auto,
    };
    let state_dir = state_dir(sources)?;
    let command_prefix = sources
        .optional(&OPENCODE_MM_COMMAND_PREFIX)
        .unwrap_or_else(|| DEFAULT_COMMAND_PREFIX.to_string());
    validate_command_prefix(&command_prefix)?;
    let log_level = match sources.optional(&OPENCODE_MM_LOG) {
        Some(level) => parse_log_level(&level)?,
        None => LogLevel::Info,
    };
    let log_format = match sources.optional(&OPENCODE_MM_LOG_FORMAT) {
        Some(format) => parse_log_format(&format)?,
        None => LogFormat::Text,
    };
    let allow_insecure_http = match sources.optional(&OPENCODE_MM_ALLOW_INSECURE_HTTP) {
        Some(value) => parse_flag_value(&OPENCODE_MM_ALLOW_INSECURE_HTTP, &value)?,
        None => false,
    };
    if is_insecure_remote_http(&mattermost_url) && !allow_insecure_http {
        return Err(error(format!(
            "MATTERMOST_URL: {mattermost_url} is plain http to another host, so the token would cross \
             the network in clear; use https://, or set OPENCODE_MM_ALLOW_INSECURE_HTTP=1 if the \
             network is trusted"
        )));
    }
    let mut ca_files = Vec::new();
    for var in [&OPENCODE_MM_CA_FILE, &SSL_CERT_FILE] {
        if let Some(path) = sources.optional(var) {
            crate::http::read_ca_file(std::path::Path::new(&path))
                .map_err(|problem| error(format!("{}: {problem}", var.name)))?;
            ca_files.push(PathBuf::from(path));
        }
    }
    let max_file_size = match sources.optional(&OPENCODE_MM_MAX_FILE_SIZE) {
        Some(size) => parse_size(&size).map_err(|problem| {
            error(format!(
                "{}: {size:?} {problem}",
                OPENCODE_MM_MAX_FILE_SIZE.name
            ))
        })?,
        None => DEFAULT_MAX_FILE_SIZE,
    };
    let catchup_max_age = match sources.optional(&OPENCODE_MM_CATCHUP_MAX_AGE) {
        Some(age) => parse_age(&age).map_err(|problem| {
            error(format!(
                "{}: {age:?} {problem}",
                OPENCODE_MM_CATCHUP_MAX_AGE.name
            ))
        })?,
        None => DEFAULT_CATCHUP_MAX_AGE,
    };
    let forget_after = match sources.optional(&OPENCODE_MM_FORGET_AFTER) {
        Some(age) => parse_age(&age).map_err(|problem| {
            error(format!(
                "{}: {age:?} {problem}",
                OPENCODE_MM_FORGET_AFTER.name
            ))
        })?,
        None => DEFAULT_FORGET_AFTER,
    };
    let max_rps = match sources.optional(&OPENCODE_MM_MAX_RPS) {
        Some(raw) => parse_max_rps(&raw)
            .map_err(|problem| error(format!("{}: {raw:?} {problem}", OPENCODE_MM_MAX_RPS.name)))?,
        None => crate::budget::DEFAULT_MAX_RPS,
    };
    let notify = parse_notify(
        sources.optional(&OPENCODE_MM_NOTIFY).as_deref(),
        sources.optional(&OPENCODE_MM_NOTIFY_DONE_AFTER).as_deref(),
    )
    .map_err(error)?;
    let dirs = match sources.optional(&OPENCODE_MM_DIRS) {
        Some(raw) => Dirs::parse(&raw)
            .map_err(|problem| error(format!("{}: {problem}", OPENCODE_MM_DIRS.name)))?,
        None => Dirs::default(),
    };
    Ok(Config {
        mattermost_url,
        mattermost_token,
        owner,
        opencode_servers,
        opencode_auto,
        opencode_username,
        opencode_password,
        opencode_api,
        state_dir,
        command_prefix,
        log_level,
        log_format,
        ca_files,
        allow_insecure_http,
        max_file_size,
        catchup_max_age,
        forget_after,
        max_rps,
        notify,
        dirs,
    })
}

/// OPENCODE_MM_LINKS_DIR, checked to be a readable directory.
fn links_dir(sources: &Sources<'_>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(dir) = sources.optional(&OPENCODE_MM_LINKS_DIR) else {
        return Ok(None);
    };
    let path = PathBuf::from(&dir);
    if !path.is_absolute() {
        return Err(error(format!(
            "{}: {dir:?} is not an absolute path; use one like /etc/opencode-mattermost/links",
            OPENCODE_MM_LINKS_DIR.name
        )));
    }
    Ok(Some(path))
}

/// OPENCODE_MM_NOTIFY (`asks,errors,done` or `none`) and OPENCODE_MM_NOTIFY_DONE_AFTER (a duration,
/// `0` or `off`); None is the default.
fn parse_notify(kinds: Option<&str>, done_after: Option<&str>) -> Result<Notify, String> {
    let mut notify = Notify::NONE;
    let mut done = false;
    let kinds = kinds.unwrap_or("asks,errors,done");
    if kinds.trim().eq_ignore_ascii_case("none") {
        return Ok(Notify::NONE);
    }
    for kind in kinds.split(',').map(str::trim) {
        match kind.to_ascii_lowercase().as_str() {
            "asks" => notify.asks = true,
            "errors" => notify.errors = true,
            "done" => done = true,
            _ => {
                return Err(format!(
                    "{}: {kind:?} is not a kind of post; use a comma list of asks, errors and done, \
                     like asks,errors,done, or none",
                    OPENCODE_MM_NOTIFY.name
                ));
            }
        }
    }
    let after = match done_after.map(str::trim) {
        None => Some(DEFAULT_NOTIFY_DONE_AFTER),
        Some(raw) if raw.eq_ignore_ascii_case("off") => None,
        Some(raw) => Some(parse_age(raw).map_err(|_| {
            format!(
                "{}: {raw:?} is not a duration; use a number with s, m or h like 60s or 5m, 0 to \
                 always mention the owner, or off to never",
                OPENCODE_MM_NOTIFY_DONE_AFTER.name
            )
        })?),
    };
    notify.done_after = after.filter(|_| done);
    Ok(notify)
}

/// OPENCODE_URL: comma-separated `URL`, `NAME=URL` or `auto`. Names and URLs must be unique.
fn parse_server_list(list: &str) -> Result<(Vec<ServerEntry>, bool), ConfigError> {
    let var = OPENCODE_URL.name;
    let mut servers: Vec<ServerEntry> = Vec::new();
    let mut auto = false;
    for (index, entry) in list.split(',').map(str::trim).enumerate() {
        let number = index + 1;
        if entry.is_empty() {
            return Err(error(format!(
                "{var}: entry {number} is empty; remove the extra comma"
            )));
        }
        if entry.eq_ignore_ascii_case("auto") {
            auto = true;
            continue;
        }
        let (name, raw_url) = match entry.split_once('=') {
            Some((name, url)) if !name.contains("://") => (Some(name.trim()), url.trim()),
            _ => (None, entry),
        };
        let url = normalize_url(var, raw_url, false)?;
        let name = match name {
            Some(name) => {
                validate_server_name(name)?;
                name.to_string()
            }
            None => default_server_name(&url),
        };
        if let Some(other) = servers.iter().find(|s| s.name == name) {
            return Err(error(format!(
                "{var}: the name {name:?} is given to {} and {url}; give each server its own \
                 name, like home={} and build={url}",
                other.url, other.url
            )));
        }
        if let Some(other) = servers.iter().find(|s| s.url == url) {
            return Err(error(format!(
                "{var}: {url} is listed twice (as {} and {name}); list each server once",
                other.name
            )));
        }
        servers.push(ServerEntry {
            name,
            url,
            password: None,
        });
    }
    Ok((servers, auto))
}

/// `NAME` of `NAME=URL`: what `🖥 NAME` and `!new NAME:/dir` show, and part of a variable name.
fn validate_server_name(name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_SERVER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        return Ok(());
    }
    Err(error(format!(
        "{}: server name {name:?} is not 1 to {MAX_SERVER_NAME} of lower-case letters, digits and \
         '-'; use a name like home or build-1",
        OPENCODE_URL.name
    )))
}

/// `host:port` of a normalised URL, the port filled in from the scheme when absent.
pub fn default_server_name(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split('/').next().unwrap_or(rest);
    let has_port = match authority.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => authority.contains(':'),
    };
    if has_port {
        authority.to_string()
    } else if scheme == "https" {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    }
}

/// OPENCODE_SERVER_PASSWORD_<NAME>: upper-case, every other character as `_`.
pub fn password_var(server_name: &str) -> String {
    let suffix: String = server_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{PASSWORD_PREFIX}{suffix}")
}

/// Fills in each server's own password, and refuses a password variable naming no server.
fn server_passwords(sources: &Sources<'_>, servers: &mut [ServerEntry]) -> Result<(), ConfigError> {
    for server in servers.iter_mut() {
        let var = password_var(&server.name);
        let file_var = format!("{var}_FILE");
        server.password = match (sources.dynamic(&var), sources.dynamic(&file_var)) {
            (Some(_), Some(_)) => {
                return Err(error(format!(
                    "{var} and {file_var} are both set; set only one of them"
                )));
            }
            (Some(password), None) => Some(Secret::new(password)),
            (None, Some(path)) => Some(read_password_file(&file_var, &path)?),
            (None, None) => None,
        };
    }
    for name in sources.names_with_prefix(PASSWORD_PREFIX) {
        if name == OPENCODE_SERVER_PASSWORD_FILE {
            continue;
        }
        let known = servers.iter().any(|server| {
            let var = password_var(&server.name);
            name == var || name == format!("{var}_FILE")
        });
        if !known {
            let listed: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
            let listed = if listed.is_empty() {
                "no named servers".to_string()
            } else {
                format!("servers {}", listed.join(", "))
            };
            return Err(error(format!(
                "{name}: OPENCODE_URL names no such server (it has {listed}); name the server in \
                 OPENCODE_URL as NAME=URL, or unset {name}"
            )));
        }
    }
    Ok(())
}

/// A password file: its contents without the final line break. Neither is ever quoted.
fn read_password_file(var: &str, path: &str) -> Result<Secret, ConfigError> {
    let contents = std::fs::read_to_string(path).map_err(|err| {
        error(format!(
            "{var}: cannot read {path:?}: {err}; check the path and its permissions"
        ))
    })?;
    let password = contents
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&contents);
    if password.is_empty() {
        return Err(error(format!(
            "{var}: {path:?} is empty; put the password in it"
        )));
    }
    Ok(Secret::new(password.to_string()))
}

/// A request rate: a whole number from 1 to 1000.
fn parse_max_rps(raw: &str) -> Result<u32, String> {
    match raw.trim().parse::<u64>() {
        Ok(0) => Err("is zero, which would stop every request; use a rate like 20".into()),
        Ok(n) if n > 1000 => Err("is more than 1000 requests a second; use at most 1000".into()),
        Ok(n) => Ok(n as u32),
        Err(_) => Err("is not a whole number of requests a second; use a rate like 20".into()),
    }
}

/// Checks a base URL and normalises it: lowercase scheme, no trailing slashes, and (for Mattermost,
/// `strip_api`) no trailing `/api/v4`.
fn normalize_url(name: &str, raw: &str, strip_api: bool) -> Result<String, ConfigError> {
    // Mattermost is usually behind TLS; `opencode serve` usually listens on plain HTTP locally.
    let (suggested_scheme, example) = if strip_api {
        ("https", "https://chat.example.com")
    } else {
        ("http", DEFAULT_OPENCODE_URL)
    };
    // Look for credentials before quoting the value anywhere, since they must not reach the terminal.
    let after_scheme = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        let fix = if strip_api {
            "put the token in MATTERMOST_TOKEN instead"
        } else {
            "use OPENCODE_SERVER_USERNAME and OPENCODE_SERVER_PASSWORD instead"
        };
        return Err(error(format!(
            "{name} must not contain a user name or password; {fix}"
        )));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(error(format!(
            "{name}: {raw:?} contains whitespace; use a URL like {example}"
        )));
    }
    let Some((scheme, rest)) = raw.split_once("://") else {
        let suggestion = format!("{suggested_scheme}://{}", raw.trim_end_matches('/'));
        return Err(error(format!(
            "{name}: {raw:?} has no scheme; use {suggestion}"
        )));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(error(format!(
            "{name}: {raw:?} has scheme {scheme:?}; use http:// or https://, like {example}"
        )));
    }
    if rest.contains(['?', '#']) {
        return Err(error(format!(
            "{name}: {raw:?} has a query or fragment; use only the base URL, like {example}"
        )));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((address, after)) if !address.is_empty() => {
                let port = match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None if after.is_empty() => None,
                    None => Some(after),
                };
                (address, port)
            }
            _ => ("", None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(error(format!(
            "{name}: {raw:?} has no host; use a URL like {example}"
        )));
    }
    let host_is_valid = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'));
    if !host_is_valid || (host.contains(':') && !authority.starts_with('[')) {
        return Err(error(format!(
            "{name}: {raw:?} has an invalid host {host:?}; use a URL like {example}"
        )));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(error(format!(
            "{name}: {raw:?} has an invalid port {port:?}; use a number from 1 to 65535"
        )));
    }
    let mut path = path.trim_end_matches('/');
    if strip_api {
        path = path.strip_suffix("/api/v4").unwrap_or(path);
        path = path.trim_end_matches('/');
    }
    Ok(format!("{scheme}://{authority}{path}"))
}

fn mattermost_token(sources: &Sources<'_>) -> Result<Secret, ConfigError> {
    let token = sources.lookup(&MATTERMOST_TOKEN, true);
    let token_file = sources.lookup(&MATTERMOST_TOKEN_FILE, true);
    match (token, token_file) {
        (Lookup::Value(_, token_origin), Lookup::Value(_, file_origin)) => Err(error(format!(
            "MATTERMOST_TOKEN (from {token_origin}) and MATTERMOST_TOKEN_FILE (from {file_origin}) \
             are both set; set only one of them"
        ))),
        (Lookup::Value(token, _), _) => {
            if has_whitespace_or_control(&token) {
                return Err(error(
                    "MATTERMOST_TOKEN contains whitespace or control characters; set it to the \
                     access token alone"
                        .to_string(),
                ));
            }
            Ok(Secret::new(token))
        }
        (_, Lookup::Value(path, _)) => read_token_file(&path),
        (Lookup::Empty, _) => Err(error(
            "MATTERMOST_TOKEN is empty; set it to the access token, or set MATTERMOST_TOKEN_FILE \
             to a file holding it"
                .to_string(),
        )),
        (_, Lookup::Empty) => Err(error(
            "MATTERMOST_TOKEN_FILE is empty; set it to the path of a file holding the access token"
                .to_string(),
        )),
        (Lookup::Unset, Lookup::Unset) => Err(error(
            "MATTERMOST_TOKEN is not set; set it (or pass --mattermost-token) to the access token, \
             or set MATTERMOST_TOKEN_FILE (or pass --mattermost-token-file) to a file holding it"
                .to_string(),
        )),
    }
}

fn read_token_file(path: &str) -> Result<Secret, ConfigError> {
    let contents = std::fs::read_to_string(path).map_err(|err| {
        error(format!(
            "MATTERMOST_TOKEN_FILE: cannot read {path:?}: {err}; check the path and its permissions"
        ))
    })?;
    let token = contents.trim();
    if token.is_empty() {
        return Err(error(format!(
            "MATTERMOST_TOKEN_FILE: {path:?} is empty; put the access token in it"
        )));
    }
    if has_whitespace_or_control(token) {
        return Err(error(format!(
            "MATTERMOST_TOKEN_FILE: {path:?} holds more than the token; put only the access token in it"
        )));
    }
    Ok(Secret::new(token.to_string()))
}

fn has_whitespace_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Mattermost usernames are 1 to 64 of `a-z 0-9 . - _`; user ids (26 lowercase alphanumerics) fit the
/// same rule. Uppercase is accepted because Mattermost compares usernames case-insensitively.
fn validate_owner(raw: &str) -> Result<String, ConfigError> {
    let owner = raw.strip_prefix('@').unwrap_or(raw).to_lowercase();
    let fix = "use the owner's Mattermost username, like @alice, or their 26-character user id";
    if owner.is_empty() {
        return Err(error(format!("MATTERMOST_OWNER is empty; {fix}")));
    }
    if owner.chars().count() > 64 {
        return Err(error(format!(
            "MATTERMOST_OWNER: {raw:?} is longer than 64 characters; {fix}"
        )));
    }
    let is_valid = owner
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if !is_valid {
        return Err(error(format!(
            "MATTERMOST_OWNER: {raw:?} is not a valid username; {fix}"
        )));
    }
    Ok(owner)
}

fn state_dir(sources: &Sources<'_>) -> Result<PathBuf, ConfigError> {
    let home = (sources.env)("HOME").filter(|home| !home.is_empty());
    let path = match sources.optional(&OPENCODE_MM_STATE_DIR) {
        Some(dir) => match dir.strip_prefix('~') {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => match &home {
                Some(home) => format!("{}{rest}", home.trim_end_matches('/')),
                None => {
                    return Err(error(format!(
                        "OPENCODE_MM_STATE_DIR: {dir:?} starts with ~ but HOME is not set; use an \
                         absolute path"
                    )));
                }
            },
            _ => dir,
        },
        None => {
            // The XDG base directory spec says to ignore a relative XDG_STATE_HOME.
            let xdg_state_home = (sources.env)("XDG_STATE_HOME")
                .filter(|dir| !dir.is_empty() && dir.starts_with('/'));
            match (xdg_state_home, &home) {
                (Some(xdg), _) => format!("{}/{STATE_SUBDIR}", xdg.trim_end_matches('/')),
                (None, Some(home)) => {
                    format!("{}/.local/state/{STATE_SUBDIR}", home.trim_end_matches('/'))
                }
                (None, None) => {
                    return Err(error(
                        "OPENCODE_MM_STATE_DIR is not set and neither XDG_STATE_HOME nor HOME is set; \
                         set OPENCODE_MM_STATE_DIR (or pass --state-dir) to an absolute directory"
                            .to_string(),
                    ));
                }
            }
        }
    };
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(error(format!(
            "OPENCODE_MM_STATE_DIR: {:?} is not an absolute path; use one like \
             /var/lib/opencode-mattermost",
            path.display().to_string()
        )));
    }
    Ok(path)
}

fn validate_command_prefix(prefix: &str) -> Result<(), ConfigError> {
    let fix = "use 1 to 8 characters without whitespace, like !";
    if prefix.chars().any(char::is_whitespace) {
        return Err(error(format!(
            "OPENCODE_MM_COMMAND_PREFIX: {prefix:?} contains whitespace; {fix}"
        )));
    }
    if prefix.chars().count() > 8 {
        return Err(error(format!(
            "OPENCODE_MM_COMMAND_PREFIX: {prefix:?} is longer than 8 characters; {fix}"
        )));
    }
    Ok(())
}

fn parse_log_level(raw: &str) -> Result<LogLevel, ConfigError> {
    match raw.to_ascii_lowercase().as_str() {
        "error" => Ok(LogLevel::Error),
        "warn" => Ok(LogLevel::Warn),
        "info" => Ok(LogLevel::Info),
        "debug" => Ok(LogLevel::Debug),
        "trace" => Ok(LogLevel::Trace),
        _ => Err(error(format!(
            "OPENCODE_MM_LOG: {raw:?} is not a log level; use error, warn, info, debug or trace"
        ))),
    }
}

fn parse_api(raw: &str) -> Result<crate::opencode::ApiChoice, ConfigError> {
    use crate::opencode::ApiChoice;
    match raw.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(ApiChoice::Auto),
        "v1" | "1" => Ok(ApiChoice::V1),
        "v2" | "2" => Ok(ApiChoice::V2),
        _ => Err(error(format!(
            "OPENCODE_API: {raw:?} is not an OpenCode API; use auto (the default: v1 on OpenCode \
             1.x, v2 when the server serves only /api/*), v1 or v2"
        ))),
    }
}

fn parse_log_format(raw: &str) -> Result<LogFormat, ConfigError> {
    match raw.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(error(format!(
            "OPENCODE_MM_LOG_FORMAT: {raw:?} is not a log format; use text or json"
        ))),
    }
}

fn parse_flag_value(var: &Var, raw: &str) -> Result<bool, ConfigError> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(error(format!(
            "{}: {raw:?} is not a yes/no value; use 1 or 0",
            var.name
        ))),
    }
}

/// `1048576`, `512K`, `20M`, `1G`, `20MiB`, `20 MB`: the suffixes count in units of 1024, as file
/// size limits usually do.
fn parse_size(raw: &str) -> Result<u64, String> {
    let fix = "is not a size; use bytes, or a number with K, M or G (or KiB, MiB, GiB), like 20MiB";
    let text = raw.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| fix.to_string())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(fix.to_string()),
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| fix.to_string())?;
    if bytes == 0 {
        return Err("is zero; use a size like 20MiB".to_string());
    }
    Ok(bytes)
}

/// `90s`, `30m`, `24h`, `2d`; a bare number is seconds.
fn parse_age(raw: &str) -> Result<Duration, String> {
    let fix = "is not a duration; use a number with s, m, h or d, like 90s, 30m, 24h or 2d";
    let text = raw.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| fix.to_string())?;
    let seconds: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(fix.to_string()),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| fix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cr3ttokenvalue0123456789";

    /// A scratch directory per test, so that tests running in parallel do not share files.
    fn scratch_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "opencode-mattermost-config-{}-{test}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_file(test: &str, name: &str, contents: &str) -> String {
        let path = scratch_dir(test).join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The smallest valid environment changed by `extra`: `Some` sets a variable, `None` removes it.
    fn env_with(extra: &[(&str, Option<&str>)]) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            ("MATTERMOST_URL", "https://chat.example.com"),
            ("MATTERMOST_TOKEN", TOKEN),
            ("MATTERMOST_OWNER", "alice"),
            ("HOME", "/home/alice"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in extra {
            match value {
                Some(value) => env.insert(key.to_string(), value.to_string()),
                None => env.remove(*key),
            };
        }
        env
    }

    fn first_url(config: &Config) -> String {
        match config.start_servers().first() {
            Some(server) => server.url.clone(),
            None => "auto".to_string(),
        }
    }

    fn run(argv: &[&str], env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let lookup = |name: &str| env.get(name).cloned();
        let names: Vec<String> = env.keys().cloned().collect();
        match parse_with_names(&args(argv), &lookup, &names)? {
            Invocation::Run(config) => Ok(config),
            other => panic!("expected a config, got {other:?}"),
        }
    }

    fn run_ok(argv: &[&str], env: &HashMap<String, String>) -> Config {
        match run(argv, env) {
            Ok(config) => config,
            Err(err) => panic!("unexpected error: {err}"),
        }
    }

    /// Checks the exact message of the error that `argv` and `env` produce.
    fn check_error(argv: &[&str], env: &HashMap<String, String>, expected: &str) {
        match run(argv, env) {
            Ok(config) => panic!("expected {expected:?}, got {config:?}"),
            Err(err) => {
                assert_eq!(err.to_string(), expected);
                assert!(!err.to_string().contains(TOKEN));
                assert!(!format!("{err:?}").contains(TOKEN));
            }
        }
    }

    fn check_error_env(extra: &[(&str, Option<&str>)], expected: &str) {
        check_error(&[], &env_with(extra), expected);
    }

    #[test]
    fn defaults() {
        let config = run_ok(&[], &env_with(&[]));
        assert_eq!(config.mattermost_url, "https://chat.example.com");
        assert_eq!(config.mattermost_token.expose(), TOKEN);
        assert_eq!(config.owner, "alice");
        assert_eq!(first_url(&config), "auto");
        assert_eq!(config.opencode_username, "opencode");
        assert!(config.opencode_password.is_none());
        assert_eq!(
            config.state_dir,
            PathBuf::from("/home/alice/.local/state/opencode-mattermost")
        );
        assert_eq!(config.command_prefix, "!");
        assert_eq!(config.log_level, LogLevel::Info);
    }

    #[test]
    fn every_variable_from_the_environment() {
        let env = env_with(&[
            ("MATTERMOST_URL", Some("http://127.0.0.1:8065/")),
            ("MATTERMOST_OWNER", Some("@Bob.Smith")),
            ("OPENCODE_URL", Some("http://10.0.0.2:5000/")),
            ("OPENCODE_SERVER_USERNAME", Some("me")),
            ("OPENCODE_SERVER_PASSWORD", Some(" pass word ")),
            ("OPENCODE_MM_STATE_DIR", Some("/var/lib/ocmm")),
            ("OPENCODE_MM_COMMAND_PREFIX", Some("..")),
            ("OPENCODE_MM_LOG", Some("TRACE")),
        ]);
        let config = run_ok(&[], &env);
        assert_eq!(config.mattermost_url, "http://127.0.0.1:8065");
        assert_eq!(config.owner, "bob.smith");
        assert_eq!(first_url(&config), "http://10.0.0.2:5000");
        assert_eq!(config.opencode_username, "me");
        assert_eq!(
            config.opencode_password.as_ref().map(Secret::expose),
            Some(" pass word ")
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/ocmm"));
        assert_eq!(config.command_prefix, "..");
        assert_eq!(config.log_level, LogLevel::Trace);
    }

    #[test]
    fn every_flag_in_both_forms() {
        let env = env_with(&[
            ("MATTERMOST_URL", None),
            ("MATTERMOST_TOKEN", None),
            ("MATTERMOST_OWNER", None),
        ]);
        let config = run_ok(
            &[
                "run",
                "--mattermost-url",
                "https://mm.example.org/api/v4",
                "--mattermost-token=tok",
                "--mattermost-owner",
                "carol",
                "--opencode-url=https://oc.example.org",
                "--opencode-username",
                "u",
                "--opencode-password=p",
                "--state-dir",
                "/srv/state",
                "--command-prefix=/",
                "--log",
                "debug",
            ],
            &env,
        );
        assert_eq!(config.mattermost_url, "https://mm.example.org");
        assert_eq!(config.mattermost_token.expose(), "tok");
        assert_eq!(config.owner, "carol");
        assert_eq!(first_url(&config), "https://oc.example.org");
        assert_eq!(config.opencode_username, "u");
        assert_eq!(
            config.opencode_password.as_ref().map(Secret::expose),
            Some("p")
        );
        assert_eq!(config.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(config.command_prefix, "/");
        assert_eq!(config.log_level, LogLevel::Debug);
    }

    #[test]
    fn precedence_is_flag_then_environment_then_file() {
        let file = write_file(
            "precedence",
            "env",
            "OPENCODE_MM_LOG=trace\nOPENCODE_MM_COMMAND_PREFIX=%\nOPENCODE_SERVER_USERNAME=from-file\n",
        );
        let env = env_with(&[
            ("OPENCODE_MM_LOG", Some("warn")),
            ("OPENCODE_MM_COMMAND_PREFIX", Some("$")),
        ]);
        let config = run_ok(&["--env-file", &file, "--log", "error"], &env);
        assert_eq!(config.log_level, LogLevel::Error, "flag beats environment");
        assert_eq!(config.command_prefix, "$", "environment beats file");
        assert_eq!(config.opencode_username, "from-file", "file beats default");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let file = write_file("empty-unset", "env", "OPENCODE_MM_LOG=debug\n");
        let env = env_with(&[
            ("OPENCODE_MM_LOG", Some("")),
            ("OPENCODE_URL", Some("  ")),
            ("OPENCODE_SERVER_PASSWORD", Some("")),
        ]);
        let config = run_ok(&["--env-file", &file, "--command-prefix="], &env);
        assert_eq!(
            config.log_level,
            LogLevel::Debug,
            "empty falls through to the file"
        );
        assert_eq!(first_url(&config), "auto");
        assert!(config.opencode_password.is_none());
        assert_eq!(config.command_prefix, "!");
    }

    #[test]
    fn required_variables_missing_or_empty() {
        check_error_env(
            &[("MATTERMOST_URL", None)],
            "MATTERMOST_URL is not set; set it (or pass --mattermost-url) to the Mattermost base URL, \
             like https://chat.example.com",
        );
        check_error_env(
            &[("MATTERMOST_URL", Some(" "))],
            "MATTERMOST_URL is empty; set it to the Mattermost base URL, like https://chat.example.com",
        );
        check_error_env(
            &[("MATTERMOST_OWNER", None)],
            "MATTERMOST_OWNER is not set; set it (or pass --mattermost-owner) to the Mattermost \
             username the daemon obeys, like @alice",
        );
        check_error_env(
            &[("MATTERMOST_OWNER", Some("@"))],
            "MATTERMOST_OWNER is empty; use the owner's Mattermost username, like @alice, or their \
             26-character user id",
        );
        check_error_env(
            &[("MATTERMOST_TOKEN", None)],
            "MATTERMOST_TOKEN is not set; set it (or pass --mattermost-token) to the access token, or \
             set MATTERMOST_TOKEN_FILE (or pass --mattermost-token-file) to a file holding it",
        );
        check_error_env(
            &[("MATTERMOST_TOKEN", Some(""))],
            "MATTERMOST_TOKEN is empty; set it to the access token, or set MATTERMOST_TOKEN_FILE to a \
             file holding it",
        );
    }

    #[test]
    fn mattermost_url_normalisation() {
        let check = |input: &str, expected: &str| {
            let config = run_ok(&["--mattermost-url", input], &env_with(&[]));
            assert_eq!(config.mattermost_url, expected, "input {input:?}");
        };
        check("https://chat.example.com", "https://chat.example.com");
        check("https://chat.example.com/", "https://chat.example.com");
        check("https://chat.example.com//", "https://chat.example.com");
        check(
            "https://chat.example.com/api/v4",
            "https://chat.example.com",
        );
        check(
            "https://chat.example.com/api/v4/",
            "https://chat.example.com",
        );
        check(
            "HTTPS://chat.example.com/mm/api/v4/",
            "https://chat.example.com/mm",
        );
        check("http://127.0.0.1:8065", "http://127.0.0.1:8065");
        check("http://[::1]:8065/", "http://[::1]:8065");
        check("  http://localhost  ", "http://localhost");
    }

    #[test]
    fn opencode_url_keeps_api_paths() {
        let env = env_with(&[("OPENCODE_URL", Some("http://oc.local/api/v4/"))]);
        assert_eq!(first_url(&run_ok(&[], &env)), "http://oc.local/api/v4");
    }

    #[test]
    fn url_errors() {
        let check = |url: &str, expected: &str| {
            check_error_env(&[("MATTERMOST_URL", Some(url))], expected);
        };
        check(
            "chat.example.com",
            r#"MATTERMOST_URL: "chat.example.com" has no scheme; use https://chat.example.com"#,
        );
        check(
            "ftp://chat.example.com",
            r#"MATTERMOST_URL: "ftp://chat.example.com" has scheme "ftp"; use http:// or https://, like https://chat.example.com"#,
        );
        check(
            "https://",
            r#"MATTERMOST_URL: "https://" has no host; use a URL like https://chat.example.com"#,
        );
        check(
            "https://chat.example.com:99999",
            r#"MATTERMOST_URL: "https://chat.example.com:99999" has an invalid port "99999"; use a number from 1 to 65535"#,
        );
        check(
            "https://chat.example.com/?x=1",
            r#"MATTERMOST_URL: "https://chat.example.com/?x=1" has a query or fragment; use only the base URL, like https://chat.example.com"#,
        );
        check(
            "https://chat example.com",
            r#"MATTERMOST_URL: "https://chat example.com" contains whitespace; use a URL like https://chat.example.com"#,
        );
        check(
            "https://bob:hunter2@chat.example.com",
            "MATTERMOST_URL must not contain a user name or password; put the token in MATTERMOST_TOKEN instead",
        );
        check(
            "https://ch*t.example.com",
            r#"MATTERMOST_URL: "https://ch*t.example.com" has an invalid host "ch*t.example.com"; use a URL like https://chat.example.com"#,
        );
        check_error_env(
            &[("OPENCODE_URL", Some("localhost:4096"))],
            r#"OPENCODE_URL: "localhost:4096" has no scheme; use http://localhost:4096"#,
        );
    }

    #[test]
    fn token_from_file_is_trimmed() {
        let path = write_file("token-file", "token", &format!("\n  {TOKEN}\n"));
        let env = env_with(&[
            ("MATTERMOST_TOKEN", None),
            ("MATTERMOST_TOKEN_FILE", Some(&path)),
        ]);
        assert_eq!(run_ok(&[], &env).mattermost_token.expose(), TOKEN);
    }

    #[test]
    fn token_file_errors() {
        let empty = write_file("token-errors", "empty", " \n");
        check_error_env(
            &[
                ("MATTERMOST_TOKEN", None),
                ("MATTERMOST_TOKEN_FILE", Some(&empty)),
            ],
            &format!("MATTERMOST_TOKEN_FILE: {empty:?} is empty; put the access token in it"),
        );
        let two_words = write_file("token-errors", "two", &format!("{TOKEN} {TOKEN}\n"));
        check_error_env(
            &[
                ("MATTERMOST_TOKEN", None),
                ("MATTERMOST_TOKEN_FILE", Some(&two_words)),
            ],
            &format!(
                "MATTERMOST_TOKEN_FILE: {two_words:?} holds more than the token; put only the access \
                 token in it"
            ),
        );
        let missing = "/nonexistent/opencode-mattermost/token";
        let err = run(
            &[],
            &env_with(&[
                ("MATTERMOST_TOKEN", None),
                ("MATTERMOST_TOKEN_FILE", Some(missing)),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(&format!("MATTERMOST_TOKEN_FILE: cannot read {missing:?}: ")),
            "{err}"
        );
        assert!(
            err.ends_with("; check the path and its permissions"),
            "{err}"
        );
    }

    #[test]
    fn both_tokens_is_an_error_naming_where_each_came_from() {
        let path = write_file("both-tokens", "token", TOKEN);
        check_error(
            &["--mattermost-token-file", &path],
            &env_with(&[]),
            "MATTERMOST_TOKEN (from the environment) and MATTERMOST_TOKEN_FILE (from \
             --mattermost-token-file) are both set; set only one of them",
        );
    }

    #[test]
    fn token_never_appears_in_errors_or_debug_output() {
        check_error_env(
            &[("MATTERMOST_TOKEN", Some(&format!("{TOKEN} x")))],
            "MATTERMOST_TOKEN contains whitespace or control characters; set it to the access token alone",
        );
        let file = write_file(
            "token-hidden",
            "env",
            &format!("MATTERMOST_TOKEN={TOKEN}\n{TOKEN}\n"),
        );
        check_error(
            &["--env-file", &file],
            &env_with(&[("MATTERMOST_TOKEN", None)]),
            &format!(
                "--env-file {file:?} line 2: expected KEY=VALUE; fix the line or comment it out with #"
            ),
        );
        // A flag missing its value does not swallow the next flag and strand the token.
        let stranded = run(
            &["--mattermost-url", "--mattermost-token", TOKEN],
            &env_with(&[]),
        )
        .expect_err("a flag without a value");
        assert!(!stranded.to_string().contains(TOKEN), "{stranded}");
        assert!(
            stranded
                .to_string()
                .contains("--mattermost-url needs a value"),
            "{stranded}"
        );
        let pasted = run(&[TOKEN], &env_with(&[])).expect_err("a stray argument");
        assert!(!pasted.to_string().contains(TOKEN), "{pasted}");
        let config = run_ok(&["--opencode-password", "pw-secret"], &env_with(&[]));
        let debug = format!("{config:?}");
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(!debug.contains("pw-secret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_eq!(config.mattermost_token.to_string(), "<redacted>");
    }

    #[test]
    fn env_file_syntax() {
        let file = write_file(
            "env-syntax",
            "env",
            "# a comment\n\
             ; another comment\n\
             \n\
             MATTERMOST_URL = \"https://chat.example.com/api/v4/\"\n\
             \tMATTERMOST_OWNER='@Dave'  \r\n\
             OPENCODE_SERVER_PASSWORD=\"a \\\"quoted\\\" \\\\ pass # not a comment\"\n\
             OPENCODE_MM_COMMAND_PREFIX=  #!  \n\
             UNRELATED_VARIABLE=ignored\n",
        );
        let env = env_with(&[("MATTERMOST_URL", None), ("MATTERMOST_OWNER", None)]);
        let config = run_ok(&["--env-file", &file], &env);
        assert_eq!(config.mattermost_url, "https://chat.example.com");
        assert_eq!(config.owner, "dave");
        assert_eq!(
            config.opencode_password.as_ref().map(Secret::expose),
            Some(r#"a "quoted" \ pass # not a comment"#)
        );
        assert_eq!(config.command_prefix, "#!");
    }

    #[test]
    fn env_file_backslashes_follow_systemd() {
        let file = write_file(
            "env-backslash",
            "env",
            "OPENCODE_SERVER_PASSWORD=pa\\ss\\\\word\n\
             OPENCODE_SERVER_USERNAME=long\\\n\
             name\n\
             # a comment ending in a backslash \\\n\
             OPENCODE_MM_COMMAND_PREFIX=?\n",
        );
        let config = run_ok(&["--env-file", &file], &env_with(&[]));
        assert_eq!(
            config.opencode_password.as_ref().map(Secret::expose),
            Some("pass\\word")
        );
        assert_eq!(config.opencode_username, "longname");
        assert_eq!(config.command_prefix, "?");
    }

    #[test]
    fn env_file_line_parsing() {
        let check = |line: &str, expected: Result<Option<(&str, &str)>, &str>| {
            let actual = parse_env_line(line);
            let expected = expected
                .map(|kv| kv.map(|(k, v)| (k.to_string(), v.to_string())))
                .map_err(str::to_string);
            assert_eq!(actual, expected, "line {line:?}");
        };
        check("A=b", Ok(Some(("A", "b"))));
        check("  A  =  b c  ", Ok(Some(("A", "b c"))));
        check("A=", Ok(Some(("A", ""))));
        check(
            "A='it''s'",
            Err("unexpected text after the closing '; quote the whole value"),
        );
        check("A='$HOME \\n'", Ok(Some(("A", "$HOME \\n"))));
        check("A=\"\\$x \\n\"", Ok(Some(("A", "$x \\n"))));
        check("   # comment", Ok(None));
        check(";comment", Ok(None));
        check("", Ok(None));
        check(
            "A=\"open",
            Err(
                "missing closing \"; values cannot span lines, so close the quote on the same line",
            ),
        );
        check(
            "export A=b",
            Err(
                r#""export A" is not a valid variable name; use letters, digits and _ as in MATTERMOST_URL=…"#,
            ),
        );
        check(
            "1A=b",
            Err(
                r#""1A" is not a valid variable name; use letters, digits and _ as in MATTERMOST_URL=…"#,
            ),
        );
        check(
            "just words",
            Err("expected KEY=VALUE; fix the line or comment it out with #"),
        );
    }

    #[test]
    fn env_file_errors_name_the_file_and_line() {
        let file = write_file("env-errors", "env", "# ok\nA=1\nB='unterminated\n");
        check_error(
            &["--env-file", &file],
            &env_with(&[]),
            &format!(
                "--env-file {file:?} line 3: missing closing '; values cannot span lines, so close the \
                 quote on the same line"
            ),
        );
        let err = run(&["--env-file=/nonexistent/x.env"], &env_with(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(r#"--env-file: cannot read "/nonexistent/x.env": "#),
            "{err}"
        );
    }

    #[test]
    fn owner_forms() {
        let check = |input: &str, expected: &str| {
            let config = run_ok(&["--mattermost-owner", input], &env_with(&[]));
            assert_eq!(config.owner, expected);
        };
        check("@alice", "alice");
        check("alice", "alice");
        check("@Alice_B-2.x", "alice_b-2.x");
        check("4xp9fdt3pbbhb8ed1ytmy5qd5e", "4xp9fdt3pbbhb8ed1ytmy5qd5e");
        check_error_env(
            &[("MATTERMOST_OWNER", Some("al ice"))],
            r#"MATTERMOST_OWNER: "al ice" is not a valid username; use the owner's Mattermost username, like @alice, or their 26-character user id"#,
        );
        let long = "a".repeat(65);
        check_error_env(
            &[("MATTERMOST_OWNER", Some(&long))],
            &format!(
                "MATTERMOST_OWNER: {long:?} is longer than 64 characters; use the owner's Mattermost \
                 username, like @alice, or their 26-character user id"
            ),
        );
    }

    #[test]
    fn state_dir_defaults_and_errors() {
        let check = |extra: &[(&str, Option<&str>)], expected: &str| {
            assert_eq!(
                run_ok(&[], &env_with(extra)).state_dir,
                PathBuf::from(expected)
            );
        };
        check(
            &[("XDG_STATE_HOME", Some("/xdg/state/"))],
            "/xdg/state/opencode-mattermost",
        );
        check(
            &[("XDG_STATE_HOME", Some("relative"))],
            "/home/alice/.local/state/opencode-mattermost",
        );
        check(
            &[("OPENCODE_MM_STATE_DIR", Some("~/state"))],
            "/home/alice/state",
        );
        check_error_env(
            &[("HOME", None)],
            "OPENCODE_MM_STATE_DIR is not set and neither XDG_STATE_HOME nor HOME is set; set \
             OPENCODE_MM_STATE_DIR (or pass --state-dir) to an absolute directory",
        );
        check_error_env(
            &[("OPENCODE_MM_STATE_DIR", Some("state"))],
            r#"OPENCODE_MM_STATE_DIR: "state" is not an absolute path; use one like /var/lib/opencode-mattermost"#,
        );
        check_error_env(
            &[("OPENCODE_MM_STATE_DIR", Some("~/x")), ("HOME", None)],
            r#"OPENCODE_MM_STATE_DIR: "~/x" starts with ~ but HOME is not set; use an absolute path"#,
        );
    }

    #[test]
    fn command_prefix_log_level_and_username_errors() {
        check_error_env(
            &[("OPENCODE_MM_COMMAND_PREFIX", Some("a b"))],
            r#"OPENCODE_MM_COMMAND_PREFIX: "a b" contains whitespace; use 1 to 8 characters without whitespace, like !"#,
        );
        check_error_env(
            &[("OPENCODE_MM_COMMAND_PREFIX", Some("123456789"))],
            r#"OPENCODE_MM_COMMAND_PREFIX: "123456789" is longer than 8 characters; use 1 to 8 characters without whitespace, like !"#,
        );
        check_error_env(
            &[("OPENCODE_MM_LOG", Some("verbose"))],
            r#"OPENCODE_MM_LOG: "verbose" is not a log level; use error, warn, info, debug or trace"#,
        );
        check_error_env(
            &[("OPENCODE_SERVER_USERNAME", Some("a:b"))],
            r#"OPENCODE_SERVER_USERNAME: "a:b" contains ':'; basic-auth user names cannot contain a colon"#,
        );
    }

    #[test]
    fn log_levels_are_ordered_by_verbosity() {
        assert!(LogLevel::Error < LogLevel::Warn);
        assert!(LogLevel::Warn < LogLevel::Info);
        assert!(LogLevel::Info < LogLevel::Debug);
        assert!(LogLevel::Debug < LogLevel::Trace);
    }

    #[test]
    fn help_and_version_win_anywhere() {
        let env: HashMap<String, String> = HashMap::new();
        let lookup = |name: &str| env.get(name).cloned();
        let check = |argv: &[&str], expected: &str| {
            let actual = match parse(&args(argv), &lookup) {
                Ok(Invocation::Help) => "help".to_string(),
                Ok(Invocation::Version) => "version".to_string(),
                Ok(Invocation::Run(_)) => "run".to_string(),
                Ok(Invocation::Check(_)) => "check".to_string(),
                Ok(Invocation::RunLinks(_) | Invocation::CheckLinks(_)) => "links".to_string(),
                Ok(Invocation::Status { json, .. }) => format!("status json={json}"),
                Err(err) => err.to_string(),
            };
            assert_eq!(actual, expected, "argv {argv:?}");
        };
        check(&["--help"], "help");
        check(&["-h"], "help");
        check(&["run", "--bogus", "-h"], "help");
        check(&["--log", "--help"], "help");
        check(&["-V"], "version");
        check(&["run", "--version"], "version");
        check(&["--version", "--help"], "version");
        check(
            &["--bogus"],
            r#"unknown flag "--bogus"; see opencode-mattermost --help"#,
        );
        check(
            &["--bogus=secret"],
            r#"unknown flag "--bogus"; see opencode-mattermost --help"#,
        );
        check(
            &["-x"],
            r#"unknown flag "-x"; see opencode-mattermost --help"#,
        );
        check(
            &["serve"],
            r#"unknown subcommand "serve"; see opencode-mattermost --help"#,
        );
        check(
            &["run", "now"],
            r#"unexpected argument "now"; see opencode-mattermost --help"#,
        );
        check(
            &["--log"],
            "--log needs a value; see opencode-mattermost --help",
        );
        check(
            &["--json"],
            "--json goes with status only; see opencode-mattermost --help",
        );
        check(
            &["status", "--json", "--state-dir", "/s"],
            "status json=true",
        );
        check(&["status", "--state-dir=/s"], "status json=false");
        check(
            &["--env-file"],
            "--env-file needs a value; see opencode-mattermost --help",
        );
    }

    #[test]
    fn arguments_and_variables_that_are_not_utf8_are_usage_errors_naming_them() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(b"/srv/caf\xe9".to_vec());
        let os_args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        let env = env_with(&[]);
        let lookup = |name: &str| env.get(name).map(OsString::from);
        let mut argv = os_args(&["--state-dir"]);
        argv.push(bad());
        let err = parse_os(argv, &lookup).expect_err("a non-UTF-8 argument");
        assert_eq!(
            err.to_string(),
            "argument 2 is not valid UTF-8; pass settings as UTF-8 text (a path with other bytes can be \
             reached through a symlink with a UTF-8 name); see opencode-mattermost --help"
        );
        let lookup_bad = |name: &str| match name {
            "OPENCODE_MM_STATE_DIR" => Some(bad()),
            _ => env.get(name).map(OsString::from),
        };
        let err = parse_os(os_args(&["run"]), &lookup_bad).expect_err("a non-UTF-8 variable");
        assert!(
            err.to_string()
                .starts_with("OPENCODE_MM_STATE_DIR is not valid UTF-8; set it to UTF-8 text"),
            "{err}"
        );
        // A missing MATTERMOST_URL would be the first complaint; the bad bytes are the real one.
        let lookup_bad_url = |name: &str| match name {
            "MATTERMOST_URL" => Some(bad()),
            _ => env.get(name).map(OsString::from),
        };
        let err = parse_os(os_args(&["run"]), &lookup_bad_url).expect_err("a non-UTF-8 URL");
        assert!(
            err.to_string()
                .starts_with("MATTERMOST_URL is not valid UTF-8"),
            "{err}"
        );
        assert!(matches!(
            parse_os(os_args(&["run"]), &lookup),
            Ok(Invocation::Run(_))
        ));
    }

    #[test]
    fn double_dash_ends_the_flags_and_a_value_starting_with_a_dash_goes_after_equals() {
        let env = env_with(&[]);
        let lookup = |name: &str| env.get(name).cloned();
        let outcome = |argv: &[&str]| match parse(&args(argv), &lookup) {
            Ok(Invocation::Run(_)) => "run".to_string(),
            Ok(Invocation::Check(_)) => "check".to_string(),
            Ok(Invocation::Status { .. }) => "status".to_string(),
            Ok(other) => format!("{other:?}"),
            Err(err) => err.to_string(),
        };
        assert_eq!(outcome(&["--", "check"]), "check");
        assert_eq!(outcome(&["--log", "debug", "--", "run"]), "run");
        assert_eq!(outcome(&["--"]), "run");
        assert_eq!(
            outcome(&["--", "--help"]),
            r#"unknown subcommand "--help"; see opencode-mattermost --help"#
        );
        assert_eq!(
            outcome(&["run", "--", "--log"]),
            r#"unexpected argument "--log"; see opencode-mattermost --help"#
        );
        assert_eq!(
            outcome(&["--opencode-password", "--starts-with-dashes"]),
            "--opencode-password needs a value; for a value that starts with -, write \
             --opencode-password=VALUE; see opencode-mattermost --help"
        );
        let config = run_ok(&["--opencode-password=--starts-with-dashes"], &env);
        assert_eq!(
            config.opencode_password.as_ref().map(|p| p.expose()),
            Some("--starts-with-dashes")
        );
    }

    #[test]
    fn check_keeps_a_config_error_as_a_result_and_status_needs_only_the_state_dir() {
        let lookup_none = |_: &str| None;
        match parse(&args(&["check"]), &lookup_none) {
            Ok(Invocation::Check(Err(err))) => {
                assert!(
                    err.to_string().starts_with("MATTERMOST_URL is not set"),
                    "{err}"
                )
            }
            other => panic!("expected a check with a config error, got {other:?}"),
        }
        let env = env_with(&[("MATTERMOST_URL", None), ("MATTERMOST_TOKEN", None)]);
        let lookup = |name: &str| env.get(name).cloned();
        match parse(&args(&["status", "--state-dir", "/srv/s"]), &lookup) {
            Ok(Invocation::Status {
                state_dir, json, ..
            }) => {
                assert_eq!(state_dir, PathBuf::from("/srv/s"));
                assert!(!json);
            }
            other => panic!("expected status, got {other:?}"),
        }
    }

    #[test]
    fn insecure_http_is_refused_for_other_hosts_unless_allowed() {
        for local in [
            "http://127.0.0.1:8065",
            "http://localhost:8065",
            "http://[::1]:8065",
            "http://127.9.9.9",
            "http://mm.localhost",
        ] {
            let config = run_ok(&[], &env_with(&[("MATTERMOST_URL", Some(local))]));
            assert_eq!(config.mattermost_url, local);
            assert!(!config.allow_insecure_http);
        }
        check_error_env(
            &[("MATTERMOST_URL", Some("http://chat.example.com"))],
            "MATTERMOST_URL: http://chat.example.com is plain http to another host, so the token \
             would cross the network in clear; use https://, or set OPENCODE_MM_ALLOW_INSECURE_HTTP=1 \
             if the network is trusted",
        );
        let allowed = run_ok(
            &[],
            &env_with(&[
                ("MATTERMOST_URL", Some("http://10.1.2.3:8065")),
                ("OPENCODE_MM_ALLOW_INSECURE_HTTP", Some("1")),
            ]),
        );
        assert!(allowed.allow_insecure_http);
        assert!(is_insecure_remote_http(&allowed.mattermost_url));
        assert!(!is_insecure_remote_http("https://chat.example.com"));
        check_error_env(
            &[("OPENCODE_MM_ALLOW_INSECURE_HTTP", Some("maybe"))],
            r#"OPENCODE_MM_ALLOW_INSECURE_HTTP: "maybe" is not a yes/no value; use 1 or 0"#,
        );
    }

    #[test]
    fn sizes_ages_and_log_format() {
        let config = run_ok(&[], &env_with(&[]));
        assert_eq!(config.max_file_size, 20 * 1024 * 1024);
        assert_eq!(config.catchup_max_age, Duration::from_secs(86_400));
        assert_eq!(config.forget_after, Duration::from_secs(30 * 86_400));
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(config.ca_files.is_empty());
        for (raw, bytes) in [
            ("1048576", 1_048_576),
            ("512K", 512 * 1024),
            ("20M", 20 * 1024 * 1024),
            ("20MiB", 20 * 1024 * 1024),
            ("1 GiB", 1024 * 1024 * 1024),
            ("3kb", 3 * 1024),
        ] {
            assert_eq!(parse_size(raw), Ok(bytes), "{raw}");
        }
        for (raw, seconds) in [
            ("90s", 90),
            ("30m", 1800),
            ("24h", 86_400),
            ("2d", 172_800),
            ("45", 45),
        ] {
            assert_eq!(parse_age(raw), Ok(Duration::from_secs(seconds)), "{raw}");
        }
        check_error_env(
            &[("OPENCODE_MM_MAX_FILE_SIZE", Some("20 parsecs"))],
            r#"OPENCODE_MM_MAX_FILE_SIZE: "20 parsecs" is not a size; use bytes, or a number with K, M or G (or KiB, MiB, GiB), like 20MiB"#,
        );
        check_error_env(
            &[("OPENCODE_MM_MAX_FILE_SIZE", Some("0"))],
            r#"OPENCODE_MM_MAX_FILE_SIZE: "0" is zero; use a size like 20MiB"#,
        );
        check_error_env(
            &[("OPENCODE_MM_CATCHUP_MAX_AGE", Some("1w"))],
            r#"OPENCODE_MM_CATCHUP_MAX_AGE: "1w" is not a duration; use a number with s, m, h or d, like 90s, 30m, 24h or 2d"#,
        );
        check_error_env(
            &[("OPENCODE_MM_FORGET_AFTER", Some("soon"))],
            r#"OPENCODE_MM_FORGET_AFTER: "soon" is not a duration; use a number with s, m, h or d, like 90s, 30m, 24h or 2d"#,
        );
        let config = run_ok(&[], &env_with(&[("OPENCODE_MM_FORGET_AFTER", Some("7d"))]));
        assert_eq!(config.forget_after, Duration::from_secs(7 * 86_400));
        assert_eq!(run_ok(&[], &env_with(&[])).max_rps, 20);
        let config = run_ok(&[], &env_with(&[("OPENCODE_MM_MAX_RPS", Some("50"))]));
        assert_eq!(config.max_rps, 50);
        check_error_env(
            &[("OPENCODE_MM_MAX_RPS", Some("fast"))],
            r#"OPENCODE_MM_MAX_RPS: "fast" is not a whole number of requests a second; use a rate like 20"#,
        );
        check_error_env(
            &[("OPENCODE_MM_MAX_RPS", Some("0"))],
            r#"OPENCODE_MM_MAX_RPS: "0" is zero, which would stop every request; use a rate like 20"#,
        );
        check_error_env(
            &[("OPENCODE_API", Some("v3"))],
            r#"OPENCODE_API: "v3" is not an OpenCode API; use auto (the default: v1 on OpenCode 1.x, v2 when the server serves only /api/*), v1 or v2"#,
        );
        let config = run_ok(&[], &env_with(&[]));
        assert_eq!(config.opencode_api, crate::opencode::ApiChoice::Auto);
        let config = run_ok(&["--opencode-api", "V2"], &env_with(&[]));
        assert_eq!(config.opencode_api, crate::opencode::ApiChoice::V2);
        let config = run_ok(&[], &env_with(&[("OPENCODE_API", Some("v1"))]));
        assert_eq!(config.opencode_api, crate::opencode::ApiChoice::V1);
        check_error_env(
            &[("OPENCODE_MM_LOG_FORMAT", Some("xml"))],
            r#"OPENCODE_MM_LOG_FORMAT: "xml" is not a log format; use text or json"#,
        );
        let config = run_ok(
            &[
                "--max-file-size",
                "5M",
                "--catchup-max-age=2d",
                "--log-format",
                "JSON",
            ],
            &env_with(&[]),
        );
        assert_eq!(config.max_file_size, 5 * 1024 * 1024);
        assert_eq!(config.catchup_max_age, Duration::from_secs(172_800));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let missing = "/nonexistent/ca.pem";
        let err = run(&[], &env_with(&[("OPENCODE_MM_CA_FILE", Some(missing))]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("OPENCODE_MM_CA_FILE: cannot read /nonexistent/ca.pem: "),
            "{err}"
        );
        let not_pem = write_file("ca-files", "not.pem", "hello\n");
        check_error_env(
            &[("SSL_CERT_FILE", Some(&not_pem))],
            &format!(
                "SSL_CERT_FILE: {not_pem} holds no certificate; use a PEM file with -----BEGIN \
                 CERTIFICATE----- blocks"
            ),
        );
    }

    #[test]
    fn notify_kinds_and_done_after() {
        let config = run_ok(&[], &env_with(&[]));
        assert_eq!(config.notify, Notify::default());
        assert_eq!(
            config.notify.done_after,
            Some(Duration::from_secs(60)),
            "default 60s"
        );
        assert!(!config.notify.mentions_done(Duration::from_secs(59)));
        assert!(config.notify.mentions_done(Duration::from_secs(60)));
        for (kinds, after, expected) in [
            (Some("none"), None, Notify::NONE),
            (Some(" None "), Some("0"), Notify::NONE),
            (
                Some("asks"),
                Some("0"),
                Notify {
                    asks: true,
                    ..Notify::NONE
                },
            ),
            (
                Some("errors, done"),
                Some("0"),
                Notify {
                    errors: true,
                    done_after: Some(Duration::ZERO),
                    ..Notify::NONE
                },
            ),
            (
                Some("asks,errors,done"),
                Some("off"),
                Notify {
                    done_after: None,
                    ..Notify::default()
                },
            ),
            (
                None,
                Some("5m"),
                Notify {
                    done_after: Some(Duration::from_secs(300)),
                    ..Notify::default()
                },
            ),
        ] {
            assert_eq!(
                parse_notify(kinds, after),
                Ok(expected),
                "{kinds:?} {after:?}"
            );
        }
        let zero = parse_notify(Some("done"), Some("0")).unwrap();
        assert!(zero.mentions_done(Duration::ZERO), "0 always mentions");
        let env = env_with(&[
            ("OPENCODE_MM_NOTIFY", Some("asks")),
            ("OPENCODE_MM_NOTIFY_DONE_AFTER", Some("2m")),
        ]);
        let config = run_ok(&[], &env);
        assert!(config.notify.asks && !config.notify.errors);
        assert_eq!(config.notify.done_after, None, "done not chosen");
        check_error_env(
            &[("OPENCODE_MM_NOTIFY", Some("asks,phone"))],
            r#"OPENCODE_MM_NOTIFY: "phone" is not a kind of post; use a comma list of asks, errors and done, like asks,errors,done, or none"#,
        );
        check_error_env(
            &[("OPENCODE_MM_NOTIFY_DONE_AFTER", Some("never"))],
            r#"OPENCODE_MM_NOTIFY_DONE_AFTER: "never" is not a duration; use a number with s, m or h like 60s or 5m, 0 to always mention the owner, or off to never"#,
        );
    }

    #[test]
    fn the_readme_and_the_example_env_file_know_every_variable() {
        let root = env!("CARGO_MANIFEST_DIR");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let example = format!("{root}/contrib/opencode-mattermost.env.example");
        let example_text = std::fs::read_to_string(&example).unwrap();
        for var in ALL_VARS {
            assert!(
                readme.contains(&format!("| `{}`", var.name))
                    || readme.contains(&format!("/ `{}`", var.name)),
                "README.md has no table row for {}",
                var.name
            );
            if var.name != SSL_CERT_FILE.name {
                assert!(
                    example_text.contains(var.name),
                    "the example env file does not mention {}",
                    var.name
                );
            }
        }
        // The example, as shipped, is a valid configuration.
        let env: HashMap<String, String> = [("HOME".to_string(), "/home/dev".to_string())]
            .into_iter()
            .collect();
        let config = run_ok(&["--env-file", &example], &env);
        assert_eq!(config.mattermost_url, "https://chat.example.com");
        assert_eq!(config.owner, "you");
    }

    #[test]
    fn help_text_lists_every_variable_flag_and_exit_code() {
        let help = help_text();
        for var in ALL_VARS {
            assert!(help.contains(var.name), "{} missing", var.name);
            assert!(help.contains(var.flag), "{} missing", var.flag);
        }
        for needle in [
            "--env-file",
            "--help",
            "--version",
            "run",
            "[default: auto]",
            "[default: opencode]",
            "[default: !]",
            "[default: info]",
            "[default: 20MiB]",
            "[default: 24h]",
            "check",
            "status",
            "--json",
            "0    clean stop",
            "1    fatal runtime error",
            "2    configuration or usage error",
            "3    another opencode-mattermost already runs",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
    }

    #[test]
    fn several_servers_with_names_and_auto() {
        let env = env_with(&[(
            "OPENCODE_URL",
            Some(" home=http://10.0.0.2:4096/ , http://build.lan:5000,auto,https://oc.example.org"),
        )]);
        let config = run_ok(&[], &env);
        assert!(config.opencode_auto);
        let listed: Vec<(&str, &str)> = config
            .opencode_servers
            .iter()
            .map(|s| (s.name.as_str(), s.url.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("home", "http://10.0.0.2:4096"),
                ("build.lan:5000", "http://build.lan:5000"),
                ("oc.example.org:443", "https://oc.example.org"),
            ]
        );
        let explicit = run_ok(&[], &env_with(&[("OPENCODE_URL", Some("a=http://h:1"))]));
        assert!(!explicit.opencode_auto);
        assert_eq!(explicit.start_servers().len(), 1);
        let unset = run_ok(&[], &env_with(&[]));
        assert!(unset.opencode_auto && unset.opencode_servers.is_empty());
    }

    #[test]
    fn bad_server_entries_name_the_entry_and_the_fix() {
        check_error_env(
            &[("OPENCODE_URL", Some("a=http://h:1,a=http://h:2"))],
            "OPENCODE_URL: the name \"a\" is given to http://h:1 and http://h:2; give each server its \
             own name, like home=http://h:1 and build=http://h:2",
        );
        check_error_env(
            &[("OPENCODE_URL", Some("http://h:1,b=http://h:1/"))],
            "OPENCODE_URL: http://h:1 is listed twice (as h:1 and b); list each server once",
        );
        check_error_env(
            &[("OPENCODE_URL", Some("Home=http://h:1"))],
            "OPENCODE_URL: server name \"Home\" is not 1 to 20 of lower-case letters, digits and '-'; \
             use a name like home or build-1",
        );
        check_error_env(
            &[("OPENCODE_URL", Some("a-very-long-server-name=http://h:1"))],
            "OPENCODE_URL: server name \"a-very-long-server-name\" is not 1 to 20 of lower-case \
             letters, digits and '-'; use a name like home or build-1",
        );
        check_error_env(
            &[("OPENCODE_URL", Some("home=h:1"))],
            r#"OPENCODE_URL: "h:1" has no scheme; use http://h:1"#,
        );
        check_error_env(
            &[("OPENCODE_URL", Some("http://h:1,,auto"))],
            "OPENCODE_URL: entry 2 is empty; remove the extra comma",
        );
        check_error_env(
            &[("OPENCODE_URL", Some("x=http://u:secret-pw@h:1"))],
            "OPENCODE_URL must not contain a user name or password; use OPENCODE_SERVER_USERNAME and \
             OPENCODE_SERVER_PASSWORD instead",
        );
        check_error_env(
            &[
                ("OPENCODE_URL", Some("home=http://h:1")),
                ("OPENCODE_SERVER_PASSWORD_BUILD", Some("secret-pw")),
            ],
            "OPENCODE_SERVER_PASSWORD_BUILD: OPENCODE_URL names no such server (it has servers \
             home); name the server in OPENCODE_URL as NAME=URL, or unset \
             OPENCODE_SERVER_PASSWORD_BUILD",
        );
        check_error_env(
            &[
                ("OPENCODE_URL", Some("home=http://h:1")),
                ("OPENCODE_SERVER_PASSWORD_HOME", Some("secret-pw")),
                ("OPENCODE_SERVER_PASSWORD_HOME_FILE", Some("/nonexistent")),
            ],
            "OPENCODE_SERVER_PASSWORD_HOME and OPENCODE_SERVER_PASSWORD_HOME_FILE are both set; \
             set only one of them",
        );
    }

    #[test]
    fn per_server_passwords_override_the_shared_one_and_stay_secret() {
        let file = write_file("server-password", "pw", "file-secret-pw\n");
        let env = env_with(&[
            (
                "OPENCODE_URL",
                Some("home=http://h:1,build-1=http://h:2,http://h:3"),
            ),
            ("OPENCODE_SERVER_PASSWORD", Some("shared-secret-pw")),
            ("OPENCODE_SERVER_PASSWORD_HOME", Some("home-secret-pw")),
            ("OPENCODE_SERVER_PASSWORD_BUILD_1_FILE", Some(file.as_str())),
        ]);
        let config = run_ok(&[], &env);
        let passwords: Vec<&str> = config
            .opencode_servers
            .iter()
            .map(|s| config.password_for(s).unwrap().expose())
            .collect();
        assert_eq!(
            passwords,
            ["home-secret-pw", "file-secret-pw", "shared-secret-pw"]
        );
        let shown = format!("{config:?}");
        for secret in ["home-secret-pw", "file-secret-pw", "shared-secret-pw"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
            assert!(config.secrets().iter().any(|s| s == secret));
        }
    }
}
