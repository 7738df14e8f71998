//! The bridge running in-process on a thread, pointed at the fake Mattermost and a real OpenCode.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use opencode_mattermost::RunError;
use opencode_mattermost::config::{Config, LogLevel, Secret};

use super::mattermost::FakeMattermost;

pub struct Bridge {
    stop: Option<Sender<()>>,
    done: Receiver<Result<(), RunError>>,
    pub ready: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    pub state_dir: PathBuf,
}

/// The bridge's settings. Under `TEST_OPENCODE_API=v2` the tests pass `OpenCode::bridge_url`, the
/// proxy where every v1 route is 404, so the bridge's own probe has to find v2 there.
pub fn config(mattermost: &FakeMattermost, opencode_url: &str, state_dir: &Path) -> Config {
    Config {
        mattermost_url: mattermost.url(),
        mattermost_token: Secret::new(mattermost.bot().token),
        owner: mattermost.owner().username,
        opencode_servers: vec![opencode_mattermost::config::ServerEntry {
            name: opencode_mattermost::config::default_server_name(opencode_url),
            url: opencode_url.to_string(),
            password: None,
        }],
        opencode_auto: false,
        opencode_username: "opencode".into(),
        opencode_password: None,
        // In front of the v2 proxy the bridge is told v2 (as `OPENCODE_API=v2`); elsewhere, such as
        // the fake OpenCode of bad_input, it probes.
        opencode_api: if super::v2proxy::is_proxy(opencode_url) {
            opencode_mattermost::opencode::ApiChoice::V2
        } else {
            opencode_mattermost::opencode::ApiChoice::Auto
        },
        state_dir: state_dir.to_path_buf(),
        command_prefix: "!".into(),
        log_level: match std::env::var("TEST_LOG").as_deref() {
            Ok("debug") => LogLevel::Debug,
            Ok("trace") => LogLevel::Trace,
            Ok("info") => LogLevel::Info,
            _ => LogLevel::Warn,
        },
        log_format: opencode_mattermost::config::LogFormat::Text,
        ca_files: Vec::new(),
        allow_insecure_http: false,
        max_file_size: 20 * 1024 * 1024,
        catchup_max_age: Duration::from_secs(24 * 3600),
        forget_after: Duration::from_secs(30 * 24 * 3600),
        max_rps: opencode_mattermost::budget::DEFAULT_MAX_RPS,
        notify: opencode_mattermost::config::Notify::default(),
        dirs: Default::default(),
    }
}

/// `config` for several named servers: `(name, url)` each.
pub fn config_for_servers(
    mattermost: &FakeMattermost,
    servers: &[(&str, String)],
    state_dir: &Path,
) -> Config {
    let mut config = config(mattermost, &servers[0].1, state_dir);
    config.opencode_servers = servers
        .iter()
        .map(|(name, url)| opencode_mattermost::config::ServerEntry {
            name: name.to_string(),
            url: url.clone(),
            password: None,
        })
        .collect();
    config
}

impl Bridge {
    pub fn start(mattermost: &FakeMattermost, opencode_url: &str, state_dir: &Path) -> Bridge {
        Bridge::start_with(config(mattermost, opencode_url, state_dir))
    }

    /// Starts the bridge and waits until it is connected to both sides.
    pub fn start_with(config: Config) -> Bridge {
        let bridge = Bridge::spawn(config);
        crossbeam_channel::select! {
            recv(bridge.ready) -> _ => {}
            recv(crossbeam_channel::after(Duration::from_secs(30))) -> _ => panic!("the bridge was not ready within 30 s"),
        }
        bridge
    }

    /// Starts the bridge without waiting for it to connect.
    pub fn spawn(config: Config) -> Bridge {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        let state_dir = config.state_dir.clone();
        let (result, done) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("bridge-under-test".into())
            .spawn(move || {
                let _ = result.send(opencode_mattermost::run_with_ready(
                    config,
                    stopped,
                    Some(ready_tx),
                ));
            })
            .expect("spawn bridge");
        Bridge {
            stop: Some(stop),
            done,
            ready,
            thread: Some(thread),
            state_dir,
        }
    }

    /// Stops the bridge as SIGTERM would, and checks it stops promptly.
    pub fn stop(mut self) -> Result<(), RunError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), RunError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = self
            .done
            .recv_timeout(Duration::from_secs(5))
            .expect("the bridge did not stop within 5 s of being asked");
        thread.join().expect("bridge thread panicked");
        result
    }

    /// Waits for `run` to return on its own (start-up failures).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(), RunError> {
        let result = self
            .done
            .recv_timeout(timeout)
            .expect("the bridge kept running");
        if let Some(thread) = self.thread.take() {
            thread.join().expect("bridge thread panicked");
        }
        result
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            let _ = self.stop_inner();
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
