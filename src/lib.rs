//! opencode-mattermost: drive OpenCode sessions from Mattermost direct messages, one thread per session.
//!
//! `run` wires the pieces together; ARCHITECTURE.md has the map of threads and channels.

pub mod asks;
pub mod board;
pub mod budget;
pub mod check;
pub mod command;
pub mod config;
pub mod discovery;
pub mod files;
pub mod heartbeat;
pub mod http;
pub mod links;
pub mod log;
pub mod mattermost;
pub mod memory;
pub mod opencode;
pub mod ratelimit;
pub mod render;
pub mod reply;
pub mod router;
pub mod session;
pub mod status;
pub mod store;
pub mod turn;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use config::Config;
use mattermost::Identity;
use mattermost::rest::{MattermostClient, MmError, SharedBudget};
use opencode::rest::OpenCodeClient;
use router::{Input, Router};
use store::Store;

/// Why the bridge stopped, mapped to an exit code in `main`.
#[derive(Debug)]
pub enum RunError {
    /// A setting is wrong (bad token, unknown owner): exit code 2.
    Config(String),
    /// Another instance holds the state directory: exit code 3.
    AlreadyRunning(String),
    /// Anything else that stops the bridge: exit code 1.
    Fatal(String),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => 2,
            RunError::AlreadyRunning(_) => 3,
            RunError::Fatal(_) => 1,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Config(m) | RunError::AlreadyRunning(m) | RunError::Fatal(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Runs the bridge until `stop` receives a message or disconnects.
pub fn run(config: Config, stop: Receiver<()>) -> Result<(), RunError> {
    run_with_ready(config, stop, None)
}

/// `run`, telling `ready` once the Mattermost websocket and the OpenCode event stream are both up.
pub fn run_with_ready(
    config: Config,
    stop: Receiver<()>,
    ready: Option<crossbeam_channel::Sender<()>>,
) -> Result<(), RunError> {
    log::set_level(config.log_level);
    log::set_format(config.log_format);
    run_bridge(config, stop, ready, None)
}

/// One bridge (the one of the environment, or one link's) until `stop`; `budget` is the rate
/// budget it shares with other links on the same bot, else it makes its own.
pub(crate) fn run_bridge(
    config: Config,
    stop: Receiver<()>,
    ready: Option<crossbeam_channel::Sender<()>>,
    budget: Option<SharedBudget>,
) -> Result<(), RunError> {
    log::redact(config.secrets());
    debug!("configuration: {config:?}");
    let (bridge_stop_tx, bridge_stop) = crossbeam_channel::bounded::<()>(1);
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("bridge".into())
        .stack_size(1024 * 1024)
        .spawn(log::inherit(move || {
            let _ = done_tx.send(bridge(config, bridge_stop, ready, budget));
        }))
        .map_err(|e| RunError::Fatal(format!("cannot start the bridge thread: {e}")))?;
    crossbeam_channel::select! {
        // No result means the bridge thread panicked: never a clean stop.
        recv(done) -> result => return result.unwrap_or_else(|_| {
            Err(RunError::Fatal("the bridge thread panicked (a bug; the log says where)".into()))
        }),
        recv(stop) -> _ => {}
    }
    let _ = bridge_stop_tx.send(());
    // Everything is saved as it changes, so a bridge stuck in a slow network call can be left behind.
    match done.recv_timeout(SHUTDOWN_DEADLINE) {
        Ok(result) => result,
        Err(_) => {
            warn!(
                "still busy {:.1}s after the stop signal (a slow network call); stopping anyway",
                SHUTDOWN_DEADLINE.as_secs_f64()
            );
            Ok(())
        }
    }
}

/// SIGTERM/SIGINT must stop the process within 2 s.
pub(crate) const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(1800);

fn bridge(
    config: Config,
    stop: Receiver<()>,
    ready: Option<crossbeam_channel::Sender<()>>,
    budget: Option<SharedBudget>,
) -> Result<(), RunError> {
    let (store, state, notes) =
        Store::open(&config.state_dir, log::now_ms()).map_err(|e| match e {
            store::StoreError::Locked { .. } => RunError::AlreadyRunning(e.to_string()),
            store::StoreError::FutureVersion { .. } => RunError::Config(e.to_string()),
            store::StoreError::Io { .. } => RunError::Fatal(e.to_string()),
        })?;
    for note in notes {
        warn!("{note}");
    }
    if config::is_insecure_remote_http(&config.mattermost_url) {
        warn!(
            "MATTERMOST_URL is plain http to another host (allowed by OPENCODE_MM_ALLOW_INSECURE_HTTP): \
             the token crosses the network in clear; use https:// unless the network is trusted"
        );
    }
    let tls = http::Tls::from_files(&config.ca_files).map_err(RunError::Config)?;
    if !config.ca_files.is_empty() {
        info!(
            "tls: trusting the certificates in {}",
            config
                .ca_files
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Readers and the heartbeat stop when this sender is dropped, which happens when `bridge` returns.
    let (_readers_stop, readers_stopped) = crossbeam_channel::bounded::<()>(0);
    let liveness = heartbeat::Liveness::default();
    spawn_named("heartbeat", {
        let (writer, liveness, stop) = (
            store.heartbeat_writer(),
            liveness.clone(),
            readers_stopped.clone(),
        );
        move || heartbeat::run(writer, liveness, stop)
    })?;

    let budget = budget.unwrap_or_else(|| SharedBudget::new(config.max_rps));
    let mattermost = Arc::new(MattermostClient::with_budget(
        &config.mattermost_url,
        &config.mattermost_token,
        &tls,
        budget,
    ));
    let Some(identity) = identify(&mattermost, &config, &stop)? else {
        return Ok(());
    };
    info!(
        "mattermost: bot @{} talks to @{} in channel {}",
        identity.bot_username, identity.owner_username, identity.dm_channel_id
    );

    let mut servers = BTreeMap::new();
    let entries = config.start_servers();
    let only_one = entries.len() == 1;
    for entry in entries {
        let client = OpenCodeClient::with_tls(
            &entry.url,
            &config.opencode_username,
            config.password_for(&entry),
            &tls,
        )
        .with_api(config.opencode_api)
        .with_name(&entry.name);
        // A server that refuses the password is a setting to fix, but only when it is the one
        // server: with several, nothing waits on one of them (its reader reports it).
        if !only_one {
            info!("opencode: {} at {}", entry.name, entry.url);
            servers.insert(client.key.clone(), Arc::new(client));
            continue;
        }
        match client.health() {
            Ok(version) => info!("opencode {version} at {} ({})", entry.url, entry.name),
            Err(opencode::rest::OcError::Unauthorized) if only_one => {
                return Err(RunError::Config(format!(
                    "{}: {} rejected the credentials (401); set OPENCODE_SERVER_USERNAME and {} to the \
                     values `opencode serve` runs with",
                    password_var_named(&entry),
                    entry.url,
                    password_var_named(&entry),
                )));
            }
            Err(e) => warn!(
                "opencode {} ({}): {e}; will keep trying",
                entry.name, entry.url
            ),
        }
        servers.insert(client.key.clone(), Arc::new(client));
    }
    if config.opencode_auto {
        info!(
            "opencode: OPENCODE_URL has auto; watching {}",
            opencode_names(&servers)
        );
    }

    // Bounded: a reader or worker waits when the router is behind; the router never sends to it.
    let (inputs_tx, inputs) = crossbeam_channel::bounded::<Input>(router::INPUT_QUEUE);

    let ws_settings = mattermost::ws::WsSettings {
        base_url: config.mattermost_url.clone(),
        authorization: mattermost.authorization().to_string(),
        tls: tls.clone(),
        heard: liveness.mattermost.clone(),
    };
    // Typing indicators go out over the websocket; bounded because they are worthless once late.
    // Send with `try_send`: a full queue means typing is already pending, so dropping is right.
    let (typing_actions, ws_actions) = crossbeam_channel::bounded::<mattermost::WsAction>(64);
    spawn_named("mattermost-ws", {
        let (out, stop) = (inputs_tx.clone(), readers_stopped.clone());
        move || mattermost::ws::run(ws_settings, out, ws_actions, stop)
    })?;
    if config.opencode_auto {
        match discovery::proc_scanner() {
            Some(scan) => discovery::spawn(
                &config,
                &tls,
                scan,
                inputs_tx.clone(),
                readers_stopped.clone(),
            )
            .map_err(|e| RunError::Fatal(format!("cannot start thread discovery: {e}")))?,
            None => warn!(
                "discovery: /proc/self is not readable, so OPENCODE_URL=auto finds nothing; name the \
                 servers in OPENCODE_URL"
            ),
        }
    }
    spawn_named("stop-forwarder", {
        let out = inputs_tx.clone();
        move || {
            let _ = stop.recv();
            let _ = out.send(Input::Stop);
        }
    })?;

    // The router's REST calls run on these two threads, so it never waits on a server. Both end
    // when the router drops its senders.
    let server_set = router::servers::ServerSet {
        heard: liveness.opencode.clone(),
        servers_heard: liveness.servers.clone(),
        ..Default::default()
    };
    let (lookups, lookup_jobs) = crossbeam_channel::bounded(router::lookup::QUEUE);
    spawn_named("lookup", {
        let lookup = router::lookup::Lookups {
            mattermost: mattermost.clone(),
            identity: identity.clone(),
            servers: server_set.shared.clone(),
        };
        let out = inputs_tx.clone();
        move || lookup.run(lookup_jobs, out)
    })?;
    let (notices, notice_jobs) = crossbeam_channel::bounded(router::lookup::QUEUE);
    spawn_named("notices", {
        let (client, dm) = (mattermost.clone(), identity.dm_channel_id.clone());
        move || router::lookup::run_notices(client, dm, notice_jobs)
    })?;
    let (boards, board_jobs) = crossbeam_channel::bounded(router::board::QUEUE);
    spawn_named("board", {
        let (client, dm) = (mattermost.clone(), identity.dm_channel_id.clone());
        let out = inputs_tx.clone();
        move || router::board::run_board(client, dm, board_jobs, out)
    })?;
    let router = Router::new(router::Setup {
        typing: typing_actions,
        max_file_size: config.max_file_size,
        catchup_max_age: config.catchup_max_age,
        forget_after: config.forget_after,
        notify: config.notify,
        command_prefix: config.command_prefix.clone(),
        mattermost,
        identity,
        servers,
        store,
        state,
        inputs: inputs_tx,
        ready,
    });
    // The router starts one reader per server (and per server found later), so a slow or dead
    // one never holds up another's events.
    let router = router
        .with_dirs(config.dirs.clone())
        .with_server_set(server_set);
    router.run(
        inputs,
        router::Shell {
            lookups,
            notices,
            boards,
        },
    );
    Ok(())
}

/// The password variable that applies to `entry`: its own when set, else the shared one.
fn password_var_named(entry: &config::ServerEntry) -> String {
    if entry.password.is_some() {
        config::password_var(&entry.name)
    } else {
        "OPENCODE_SERVER_PASSWORD".to_string()
    }
}

fn opencode_names(servers: &BTreeMap<opencode::ServerKey, Arc<OpenCodeClient>>) -> String {
    servers
        .values()
        .map(|c| format!("{} ({})", c.name, c.key.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds the bot, the owner and their DM channel, waiting out a Mattermost that is not up yet.
/// `Ok(None)` when asked to stop while waiting.
fn identify(
    client: &MattermostClient,
    config: &Config,
    stop: &Receiver<()>,
) -> Result<Option<Identity>, RunError> {
    let mut backoff = http::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match try_identify(client, config) {
            Ok(identity) => return Ok(Some(identity)),
            Err(Identify::Fatal(e)) => return Err(e),
            Err(Identify::Retry(e)) => {
                let delay = backoff.next_delay();
                let hint = http::tls_hint(&e.to_string())
                    .map(|hint| format!("; {hint}"))
                    .unwrap_or_default();
                warn!("{e}{hint}; retrying in {:.1}s", delay.as_secs_f64());
                if stopped(stop, delay) {
                    return Ok(None);
                }
            }
        }
    }
}

enum Identify {
    Retry(MmError),
    Fatal(RunError),
}

fn try_identify(client: &MattermostClient, config: &Config) -> Result<Identity, Identify> {
    let url = &config.mattermost_url;
    let classify = |e: MmError| {
        if e.is_retryable() {
            Identify::Retry(e)
        } else {
            Identify::Fatal(RunError::Config(format!("{e}")))
        }
    };
    let bot = client.me().map_err(|e| match e.status() {
        Some(401) => Identify::Fatal(RunError::Config(format!(
            "MATTERMOST_TOKEN: {url} rejected the token (401); create a new access token for the bot \
             (System Console > Integrations > Bot Accounts) and set MATTERMOST_TOKEN or MATTERMOST_TOKEN_FILE"
        ))),
        _ => classify(e),
    })?;
    if !bot.is_bot {
        warn!(
            "@{} is a regular user account, not a bot; the bridge works, but a bot account is recommended",
            bot.username
        );
    }
    let owner_query = config.owner.trim_start_matches('@');
    let by_id = if looks_like_id(owner_query) {
        match client.user_by_id(owner_query) {
            Ok(user) => Some(user),
            Err(e) if e.is_retryable() => return Err(Identify::Retry(e)),
            Err(_) => None,
        }
    } else {
        None
    };
    let owner = match by_id {
        Some(user) => user,
        None => client
            .user_by_username(&owner_query.to_lowercase())
            .map_err(|e| match e.status() {
                Some(404) | Some(400) => Identify::Fatal(RunError::Config(format!(
                    "MATTERMOST_OWNER: no user \"{owner_query}\" on {url}; set it to the owner's username or user id"
                ))),
                _ => classify(e),
            })?,
    };
    if owner.id == bot.id {
        return Err(Identify::Fatal(RunError::Config(format!(
            "MATTERMOST_OWNER: \"{owner_query}\" is the bot itself; set it to the person who controls the sessions"
        ))));
    }
    let dm_channel_id = client
        .direct_channel(&bot.id, &owner.id)
        .map_err(classify)?;
    Ok(Identity {
        bot_user_id: bot.id,
        bot_username: bot.username,
        owner_user_id: owner.id,
        owner_username: owner.username,
        dm_channel_id,
    })
}

/// Mattermost ids are 26 lowercase letters and digits.
pub(crate) fn looks_like_id(text: &str) -> bool {
    text.len() == 26
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Waits up to `wait` for the stop signal; true once the bridge is stopping (the sender sent or
/// was dropped).
pub(crate) fn stopped(stop: &Receiver<()>, wait: Duration) -> bool {
    match stop.recv_timeout(wait) {
        Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => true,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(256 * 1024)
        .spawn(log::inherit(f))
        .map(drop)
        .map_err(|e| RunError::Fatal(format!("cannot start thread {name}: {e}")))
}
