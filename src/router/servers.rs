//! The server set at run time: a server found (by discovery, or given at start) gets its own
//! `opencode-watch-<name>` reader; one let go loses its reader, and its threads wait for it.

use super::*;
use crate::heartbeat::Heard;
use lookup::SharedServers;

/// What the router needs to change the server set: the look-ups' view of it, each reader's stop
/// (dropping the sender stops that reader), and the liveness stamp readers share.
#[derive(Default)]
pub struct ServerSet {
    pub shared: SharedServers,
    pub stops: HashMap<ServerKey, Sender<()>>,
    pub heard: Heard,
    /// Each server's own stamp (inside `heard`), for the heartbeat's per-server lines.
    pub servers_heard: crate::heartbeat::Servers,
}

impl Router {
    /// Hands the router the server set's moving parts; without it (unit tests) servers stay fixed.
    /// Readers start here, for the servers given at start too.
    /// Only sessions under `dirs` are taken (OPENCODE_MM_DIRS); the others are not even listed.
    pub fn with_dirs(mut self, dirs: crate::config::Dirs) -> Router {
        self.dirs = dirs;
        self
    }

    pub fn with_server_set(mut self, set: ServerSet) -> Router {
        self.server_set = set;
        let clients: Vec<Arc<OpenCodeClient>> = self.servers.values().cloned().collect();
        for client in clients {
            self.spawn_reader(&client);
        }
        self.publish_servers();
        self
    }

    /// A server to follow from now on; one already followed (same URL) is left as it is.
    pub(super) fn add_server(&mut self, client: Arc<OpenCodeClient>) {
        if self.servers.contains_key(&client.key) {
            return;
        }
        crate::info!("opencode: following {} at {}", client.name, client.key.0);
        if self.spawn_reader(&client) {
            self.servers.insert(client.key.clone(), client);
            self.publish_servers();
        }
    }

    /// Starts `client`'s reader; false (logged) when the thread cannot start.
    fn spawn_reader(&mut self, client: &Arc<OpenCodeClient>) -> bool {
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let stop_recent = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("opencode-watch-{}", client.name))
            .stack_size(256 * 1024)
            .spawn({
                let (client, out, heard) = (
                    client.clone(),
                    self.inputs.clone(),
                    self.server_set
                        .servers_heard
                        .add(&client.name, &self.server_set.heard),
                );
                crate::log::inherit(move || crate::opencode::watch::run(client, out, stop, heard))
            });
        if let Err(e) = spawned {
            crate::error!("cannot start the reader of {}: {e}", client.name);
            return false;
        }
        // The light poll ends with the reader: both hold the one stop receiver.
        let recent = std::thread::Builder::new()
            .name(format!("opencode-recent-{}", client.name))
            .stack_size(128 * 1024)
            .spawn({
                let (client, out) = (client.clone(), self.inputs.clone());
                move || crate::opencode::watch::run_recent(client, out, stop_recent)
            });
        if let Err(e) = recent {
            crate::warn!(
                "cannot start the light poll of {}: {e}; terminal sessions wait for the 20 s poll",
                client.name
            );
        }
        self.server_set.stops.insert(client.key.clone(), stop_tx);
        true
    }

    /// A server no longer followed (its process stopped): its reader ends, its threads are told
    /// once, and they wait, with their queued prompts, until it is found again.
    pub(super) fn remove_server(&mut self, key: &ServerKey) {
        let Some(client) = self.servers.remove(key) else {
            return;
        };
        crate::info!("opencode: let go of {} at {}", client.name, key.0);
        self.server_set.stops.remove(key);
        self.server_set.servers_heard.remove(&client.name);
        self.stream_up.remove(key);
        self.catch_up_due.remove(key);
        self.down_since.remove(key);
        if self.told_down.insert(key.clone()) {
            for session in self.workers_of(key) {
                self.deliver(&session, SessionMsg::ServerDown);
            }
        }
        // Back later, it reconnects as a server that was down: threads are told it is back.
        self.down_since.insert(key.clone(), Instant::now());
        self.publish_servers();
    }

    /// Writes the set for the look-ups, and whether root posts name their server.
    fn publish_servers(&mut self) {
        let several = self.servers.len() > 1;
        for client in self.servers.values() {
            client.set_named(several);
        }
        *self
            .server_set
            .shared
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = self.servers.clone();
    }
}
