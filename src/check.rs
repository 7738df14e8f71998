//! `opencode-mattermost check`: a doctor that tries, one at a time, everything the bridge needs at
//! start-up and prints one line per check, ✓ or ✗ with the fix. A check whose prerequisite failed is
//! shown as skipped rather than failing a second time for the same reason.

use std::path::Path;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::http::{self, Tls};
use crate::mattermost::User;
use crate::mattermost::rest::MattermostClient;
use crate::mattermost::ws::{self, WsSettings};
use crate::opencode::rest::{OcError, OpenCodeClient};
use crate::store;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not tried because an earlier check it depends on failed.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub outcome: Outcome,
    /// A short name such as `token`, the same in every run, for scripts and the README.
    pub name: &'static str,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match self.outcome {
            Outcome::Pass => "✓",
            Outcome::Fail => "✗",
            Outcome::Skipped => "-",
        };
        write!(f, "{mark} {:<11} {}", self.name, self.detail)
    }
}

/// Runs every check, handing each line to `report` as soon as it is known. Returns the exit code:
/// 0 when all passed, 2 when the configuration is wrong, 1 when another check failed.
pub fn run(config: &Result<Config, ConfigError>, report: &mut dyn FnMut(&CheckLine)) -> i32 {
    let mut failed = false;
    let mut emit = |outcome: Outcome, name: &'static str, detail: String| {
        failed |= outcome == Outcome::Fail;
        report(&CheckLine {
            outcome,
            name,
            detail,
        });
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            emit(Outcome::Fail, "config", e.to_string());
            return 2;
        }
    };
    let tls = match Tls::from_files(&config.ca_files) {
        Ok(tls) => tls,
        Err(e) => {
            emit(Outcome::Fail, "config", e);
            return 2;
        }
    };
    emit(Outcome::Pass, "config", config_summary(config));
    check_mattermost(config, &tls, &mut emit);
    check_opencode(config, &tls, &mut emit);
    check_state_dir(&config.state_dir, &mut emit);
    i32::from(failed)
}

/// `check` with OPENCODE_MM_LINKS_DIR: a `links` line, then each link's `link` line and its
/// checks as `run` makes them. Returns 2 when a link file is wrong or two links conflict, 1 when
/// another check failed, else 0.
pub fn run_links(
    set: &Result<crate::config::links::LinkSet, ConfigError>,
    report: &mut dyn FnMut(&CheckLine),
) -> i32 {
    let line = |outcome: Outcome, name: &'static str, detail: String| CheckLine {
        outcome,
        name,
        detail,
    };
    let set = match set {
        Ok(set) => set,
        Err(e) => {
            report(&line(Outcome::Fail, "links", e.to_string()));
            return 2;
        }
    };
    let count = set.links.len() + set.broken.len();
    report(&line(
        Outcome::Pass,
        "links",
        format!(
            "{}: {count} link file(s); each NAME.env is one link (the environment's own \
             MATTERMOST_* settings are not one), read again on SIGHUP",
            set.base.dir.display()
        ),
    ));
    let mut code = 0;
    for conflict in &set.conflicts {
        report(&line(Outcome::Fail, "links", conflict.clone()));
        code = 2;
    }
    let mut all: Vec<(&str, Result<&Config, &ConfigError>, &Path)> = set
        .links
        .iter()
        .map(|l| (l.name.as_str(), Ok(&l.config), l.file.as_path()))
        .chain(
            set.broken
                .iter()
                .map(|b| (b.name.as_str(), Err(&b.error), b.file.as_path())),
        )
        .collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    for (name, config, file) in all {
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                report(&line(Outcome::Fail, "link", format!("{name}: {e}")));
                code = 2;
                continue;
            }
        };
        report(&line(
            Outcome::Pass,
            "link",
            format!(
                "{name} ({}): directories {}, state in {}",
                file.display(),
                config.dirs,
                config.state_dir.display()
            ),
        ));
        let link_code = run(&Ok(config.clone()), report);
        code = code.max(link_code);
    }
    if code == 2 { 2 } else { code.min(1) }
}

fn config_summary(config: &Config) -> String {
    let trust = if config.ca_files.is_empty() {
        "the bundled web PKI roots".to_string()
    } else {
        config
            .ca_files
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "valid; Mattermost {}, owner @{}, OpenCode {}; TLS trusts {trust}",
        config.mattermost_url,
        config.owner,
        server_list(config)
    )
}

type Emit<'a> = dyn FnMut(Outcome, &'static str, String) + 'a;

fn check_mattermost(config: &Config, tls: &Tls, emit: &mut Emit<'_>) {
    let url = &config.mattermost_url;
    let later = ["token", "owner", "dm channel", "websocket"];
    match mattermost_version(url, tls) {
        Ok(version) => emit(
            Outcome::Pass,
            "mattermost",
            format!("{url} answers, version {version}"),
        ),
        Err(e) => {
            emit(Outcome::Fail, "mattermost", e);
            for name in later {
                emit(Outcome::Skipped, name, "skipped: needs Mattermost".into());
            }
            return;
        }
    }
    let client = MattermostClient::with_tls(url, &config.mattermost_token, tls);
    let bot = match client.me() {
        Ok(bot) if bot.is_bot => {
            emit(
                Outcome::Pass,
                "token",
                format!("accepted; @{} is a bot account", bot.username),
            );
            bot
        }
        Ok(user) => {
            emit(
                Outcome::Fail,
                "token",
                format!(
                    "accepted, but @{} is a regular user account; create a bot account (System \
                     Console > Integrations > Bot Accounts) and use its token",
                    user.username
                ),
            );
            user
        }
        Err(e) => {
            let detail = match e.status() {
                Some(401) => format!(
                    "{url} rejected the token (401); create a new access token for the bot and set \
                     MATTERMOST_TOKEN or MATTERMOST_TOKEN_FILE"
                ),
                _ => e.to_string(),
            };
            emit(Outcome::Fail, "token", detail);
            for name in ["owner", "dm channel", "websocket"] {
                emit(
                    Outcome::Skipped,
                    name,
                    "skipped: needs a valid token".into(),
                );
            }
            return;
        }
    };
    match find_owner(&client, &config.owner) {
        Ok(owner) if owner.id == bot.id => {
            emit(
                Outcome::Fail,
                "owner",
                format!(
                    "\"{}\" is the bot itself; set MATTERMOST_OWNER to the person who controls \
                     the sessions",
                    config.owner
                ),
            );
            emit(
                Outcome::Skipped,
                "dm channel",
                "skipped: needs the owner".into(),
            );
        }
        Ok(owner) => {
            emit(
                Outcome::Pass,
                "owner",
                format!("@{} found (id {})", owner.username, owner.id),
            );
            match client.direct_channel(&bot.id, &owner.id) {
                Ok(channel) => emit(
                    Outcome::Pass,
                    "dm channel",
                    format!("@{} ↔ @{}: channel {channel}", bot.username, owner.username),
                ),
                Err(e) => emit(
                    Outcome::Fail,
                    "dm channel",
                    format!(
                        "{e}; the bot needs permission to create direct messages (a bot account \
                         has it by default)"
                    ),
                ),
            }
        }
        Err(e) => {
            emit(Outcome::Fail, "owner", e);
            emit(
                Outcome::Skipped,
                "dm channel",
                "skipped: needs the owner".into(),
            );
        }
    }
    let settings = WsSettings {
        base_url: url.clone(),
        authorization: client.authorization().to_string(),
        tls: tls.clone(),
        heard: Default::default(),
    };
    match ws::handshake(&settings) {
        Ok(version) => emit(
            Outcome::Pass,
            "websocket",
            format!(
                "{} connected (server {})",
                ws::websocket_url(url),
                short_version(&version)
            ),
        ),
        Err(e) => emit(
            Outcome::Fail,
            "websocket",
            format!(
                "{}: {e}; a proxy in front of Mattermost must pass websocket upgrades",
                ws::websocket_url(url)
            ),
        ),
    }
}

/// One unauthenticated `GET /api/v4/system/ping`, without the client's retries: the version is in
/// the `X-Version-Id` header.
fn mattermost_version(url: &str, tls: &Tls) -> Result<String, String> {
    let agent = http::agent_with_tls(Duration::from_secs(10), tls);
    let unreachable = |problem: String| {
        let fix = http::tls_hint(&problem).unwrap_or(
            "check MATTERMOST_URL and that this machine can reach the server (DNS, firewall, proxy)",
        );
        format!("cannot reach {url}: {problem}; {fix}")
    };
    let response = agent
        .get(&format!("{url}/api/v4/system/ping"))
        .call()
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let version = response
        .headers()
        .get("x-version-id")
        .and_then(|value| value.to_str().ok())
        .map(short_version);
    match (status, version) {
        (200, Some(version)) => Ok(version),
        (200, None) => Err(format!(
            "{url} answered but is not Mattermost (no X-Version-Id header); check MATTERMOST_URL"
        )),
        (status, _) => Err(format!(
            "{url}/api/v4/system/ping answered {status}; check MATTERMOST_URL (the server's base \
             URL, without /api/v4)"
        )),
    }
}

/// `5.36.1.5.36.1-local.9f4c….false` → `5.36.1`.
fn short_version(full: &str) -> String {
    full.split('.').take(3).collect::<Vec<_>>().join(".")
}

fn find_owner(client: &MattermostClient, owner: &str) -> Result<User, String> {
    if crate::looks_like_id(owner)
        && let Ok(user) = client.user_by_id(owner)
    {
        return Ok(user);
    }
    client.user_by_username(owner).map_err(|e| match e.status() {
        Some(404) | Some(400) => format!(
            "no user \"{owner}\" on {}; set MATTERMOST_OWNER to the owner's username or user id",
            client.base_url()
        ),
        _ => e.to_string(),
    })
}

/// OPENCODE_URL as understood: `name=url` for each, and `auto`.
fn server_list(config: &Config) -> String {
    let mut names: Vec<String> = config
        .opencode_servers
        .iter()
        .map(|s| format!("{}={}", s.name, s.url))
        .collect();
    if config.opencode_auto {
        names.push("auto".into());
    }
    names.join(", ")
}

/// One `opencode` and one `auth` line per server, each naming it when there are several.
fn check_opencode(config: &Config, tls: &Tls, emit: &mut Emit<'_>) {
    let mut servers = config.start_servers();
    if config.opencode_auto {
        let scan = crate::discovery::proc_scanner().map(|scan| scan());
        for (_, address) in scan.iter().flat_map(|s| s.listeners.iter()) {
            let url = crate::discovery::url_of(*address);
            if !servers.iter().any(|s| s.url == url) {
                servers.push(crate::config::ServerEntry {
                    name: crate::config::default_server_name(&url),
                    url,
                    password: None,
                });
            }
        }
        if servers.is_empty() {
            let hidden = if scan.is_some_and(|s| s.hidden) {
                " (other processes' /proc entries are hidden here)"
            } else {
                ""
            };
            emit(
                Outcome::Fail,
                "opencode",
                format!(
                    "OPENCODE_URL=auto found no OpenCode of this user listening on a loopback \
                     port{hidden}; start `opencode serve --port 4096`, or set OPENCODE_URL to where \
                     it listens"
                ),
            );
            emit(Outcome::Skipped, "auth", "skipped: needs OpenCode".into());
            return;
        }
    }
    let several = servers.len() > 1;
    for server in &servers {
        if several {
            let mut named = |outcome: Outcome, what: &'static str, detail: String| {
                emit(outcome, what, format!("{}: {detail}", server.name))
            };
            check_server(config, server, tls, &mut named);
        } else {
            check_server(config, server, tls, emit);
        }
    }
}

fn check_server(
    config: &Config,
    server: &crate::config::ServerEntry,
    tls: &Tls,
    emit: &mut Emit<'_>,
) {
    let url = &server.url;
    let password = config.password_for(server);
    let client = OpenCodeClient::with_tls(url, &config.opencode_username, password, tls)
        .with_api(config.opencode_api);
    match client.probe() {
        Ok(probe) => {
            let version = match &probe.version {
                Some(version) => format!("version {version}"),
                None => "no version (it serves only the v2 API)".to_string(),
            };
            emit(
                Outcome::Pass,
                "opencode",
                format!(
                    "{url} answers, {version}; the bridge speaks {} to it: {}",
                    probe.dialect.name(),
                    probe.reason
                ),
            );
            let detail = if password.is_some() {
                format!("credentials of {} accepted", config.opencode_username)
            } else {
                "no password set, and the server asks for none".to_string()
            };
            emit(Outcome::Pass, "auth", detail);
        }
        Err(OcError::Unauthorized) => {
            emit(
                Outcome::Pass,
                "opencode",
                format!("{url} answers (its version is behind the password)"),
            );
            emit(
                Outcome::Fail,
                "auth",
                format!(
                    "{url} rejected the credentials (401); set OPENCODE_SERVER_USERNAME and \
                     {} to the values `opencode serve` runs with",
                    if server.password.is_some() {
                        crate::config::password_var(&server.name)
                    } else {
                        "OPENCODE_SERVER_PASSWORD".to_string()
                    }
                ),
            );
        }
        Err(e @ OcError::Unsupported(_)) => {
            emit(Outcome::Fail, "opencode", format!("{url}: {e}"));
            emit(Outcome::Skipped, "auth", "skipped: needs OpenCode".into());
        }
        Err(e) => {
            let text = e.to_string();
            let fix = http::tls_hint(&text).unwrap_or(
                "start it with `opencode serve --port 4096` or set OPENCODE_URL to where it listens",
            );
            emit(Outcome::Fail, "opencode", format!("{url}: {text}; {fix}"));
            emit(Outcome::Skipped, "auth", "skipped: needs OpenCode".into());
        }
    }
}

fn check_state_dir(dir: &Path, emit: &mut Emit<'_>) {
    match store::probe_writable(dir) {
        Ok(()) => emit(
            Outcome::Pass,
            "state dir",
            format!("{} is writable", dir.display()),
        ),
        Err(e) => emit(Outcome::Fail, "state dir", e.to_string()),
    }
    match store::read_state(dir) {
        Ok(Some(state)) => {
            let sessions: usize = state.servers.values().map(|s| s.sessions.len()).sum();
            emit(
                Outcome::Pass,
                "state file",
                format!("readable, {sessions} thread(s) recorded"),
            );
        }
        Ok(None) => emit(
            Outcome::Pass,
            "state file",
            "none yet; the bridge creates it on first start".into(),
        ),
        Err(e) => emit(Outcome::Fail, "state file", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_mark_name_and_detail() {
        let line = |outcome, detail: &str| {
            CheckLine {
                outcome,
                name: "token",
                detail: detail.to_string(),
            }
            .to_string()
        };
        assert_eq!(line(Outcome::Pass, "ok"), "✓ token       ok");
        assert_eq!(line(Outcome::Fail, "bad; fix"), "✗ token       bad; fix");
        assert_eq!(line(Outcome::Skipped, "skipped"), "- token       skipped");
        assert_eq!(short_version("5.36.1.5.36.1-local.9f4c.false"), "5.36.1");
    }
}
