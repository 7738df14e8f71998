//! The supervisor of OPENCODE_MM_LINKS_DIR: one bridge per link, each on its own threads with its
//! own stop channel, so nothing crosses links and one link's outage or refused token never holds
//! up another. SIGHUP reads the directory again: new links start, removed ones stop, changed ones
//! restart, and the others are left alone.
//!
//! Links on the same Mattermost server and token share one rate budget: the server limits the
//! account, not the link.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::RunError;
use crate::config::links::{Link, LinkSet, conflict};
use crate::mattermost::rest::SharedBudget;

/// Runs every link of `set` until `stop`; `reload` (SIGHUP) reads the directory again.
///
/// A link whose bridge stops with an error (a refused token, another process on its state
/// directory) stays down, logged, until the next reload tries it again; the others go on. Only when
/// the process started with a single link that fails before it first connected does the process
/// stop, with that error's exit code, as a bridge without links does.
pub fn run(set: LinkSet, stop: Receiver<()>, reload: Receiver<()>) -> Result<(), RunError> {
    if let Some(first) = set.links.first() {
        crate::log::set_level(first.config.log_level);
        crate::log::set_format(first.config.log_format);
    }
    for link in &set.links {
        crate::log::redact(link.config.secrets());
    }
    let (done_tx, done) = crossbeam_channel::unbounded::<Done>();
    let mut supervisor = Supervisor {
        base: set.base,
        running: BTreeMap::new(),
        restarting: BTreeMap::new(),
        budgets: HashMap::new(),
        done_tx,
        next_generation: 0,
    };
    let single = set.links.len() == 1;
    crate::info!(
        "{} link(s) from {}: {}",
        set.links.len(),
        supervisor.base.dir.display(),
        names(&set.links)
    );
    for link in set.links {
        supervisor.start(link);
    }
    loop {
        crossbeam_channel::select! {
            recv(done) -> ended => {
                let Ok(ended) = ended else { break };
                if let Some(error) = supervisor.ended(ended, single) {
                    supervisor.stop_all();
                    return Err(error);
                }
            }
            recv(reload) -> signal => {
                if signal.is_ok() {
                    supervisor.reload();
                }
            }
            recv(stop) -> _ => break,
        }
    }
    supervisor.stop_all();
    // Each bridge returns within its own 1.8 s of being told; they stop side by side.
    let deadline = Instant::now() + crate::SHUTDOWN_DEADLINE + Duration::from_millis(100);
    while !supervisor.running.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(ended) => {
                supervisor.running.remove(&ended.name);
            }
            Err(_) => break,
        }
    }
    Ok(())
}

struct Supervisor {
    base: crate::config::links::Base,
    running: BTreeMap<String, Running>,
    /// Changed links waiting for their old bridge to end (it holds the state directory's lock).
    restarting: BTreeMap<String, Link>,
    /// One per Mattermost account (server URL and token).
    budgets: HashMap<(String, String), SharedBudget>,
    done_tx: Sender<Done>,
    next_generation: u64,
}

struct Running {
    link: Link,
    generation: u64,
    stop: Sender<()>,
    /// Told once, when the link's bridge is first connected to both sides.
    ready: Receiver<()>,
    /// Asked to stop (removed, changed, or the process stops): its end is no failure.
    stopping: bool,
}

/// A link's bridge returned.
struct Done {
    name: String,
    generation: u64,
    result: Result<(), RunError>,
}

impl Supervisor {
    fn start(&mut self, link: Link) {
        let name = link.name.clone();
        crate::log::redact(link.config.secrets());
        let budget = budget_for(&mut self.budgets, &link.config);
        let (stop_tx, stop) = crossbeam_channel::bounded(1);
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        self.next_generation += 1;
        let generation = self.next_generation;
        let (config, done, thread_name) = (link.config.clone(), self.done_tx.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("link-{name}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                crate::log::set_link(Some(&thread_name));
                let result = crate::run_bridge(config, stop, Some(ready_tx), Some(budget));
                let _ = done.send(Done {
                    name: thread_name,
                    generation,
                    result,
                });
            });
        if let Err(e) = spawned {
            crate::error!("link {name}: cannot start its thread: {e}; it stays down");
            return;
        }
        crate::info!(
            "link {name}: started from {} (@{} on {}, directories: {})",
            link.file.display(),
            link.config.owner,
            link.config.mattermost_url,
            link.config.dirs
        );
        self.running.insert(
            name,
            Running {
                link,
                generation,
                stop: stop_tx,
                ready,
                stopping: false,
            },
        );
    }

    fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.get_mut(name) {
            running.stopping = true;
            let _ = running.stop.try_send(());
        }
    }

    fn stop_all(&mut self) {
        self.restarting.clear();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name);
        }
    }

    /// A link's bridge returned. Some(error) when the process must stop with it.
    fn ended(&mut self, ended: Done, single: bool) -> Option<RunError> {
        let current = self
            .running
            .get(&ended.name)
            .is_some_and(|r| r.generation == ended.generation);
        if !current {
            return None;
        }
        let running = self.running.remove(&ended.name)?;
        let name = ended.name;
        if let Some(link) = self.restarting.remove(&name) {
            crate::info!("link {name}: restarting with its changed file");
            self.start(link);
            return None;
        }
        if running.stopping {
            crate::info!("link {name}: stopped");
            return None;
        }
        let was_ready = running.ready.try_recv().is_ok();
        match ended.result {
            // The first bridge of a process started with one link: as without links.
            Err(error) if single && ended.generation == 1 && !was_ready => Some(error),
            Err(error) => {
                crate::error!(
                    "link {name}: {error}; this link stays down until the next SIGHUP \
                     (systemctl reload) starts it again; the other links go on"
                );
                None
            }
            Ok(()) => {
                crate::warn!("link {name}: its bridge ended; it stays down until a reload");
                None
            }
        }
    }

    /// SIGHUP: the directory again. A broken file leaves its link as it is (running with its
    /// previous settings, or down); so does a changed file that would conflict with another link.
    fn reload(&mut self) {
        let dir = self.base.dir.display().to_string();
        crate::info!("SIGHUP: reading {dir} again");
        let (links, broken) = match self.base.read_links() {
            Ok(read) => read,
            Err(e) => {
                crate::error!("{e}; every link keeps running as it is");
                return;
            }
        };
        for problem in &broken {
            let fate = if self.running.contains_key(&problem.name) {
                "it keeps running with its previous settings"
            } else {
                "it stays down"
            };
            crate::error!(
                "link {}: {}; {fate} until the file is fixed and SIGHUP comes again",
                problem.name,
                problem.error
            );
        }
        let listed = |name: &str| {
            links.iter().any(|l| l.name == name) || broken.iter().any(|b| b.name == name)
        };
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| !listed(name))
            .cloned()
            .collect();
        for name in removed {
            crate::info!(
                "link {name}: its file is gone; stopping it (its threads stay as they are)"
            );
            self.restarting.remove(&name);
            self.stop(&name);
        }
        // Links that stay as they are: unchanged ones and those whose file is broken now.
        let mut kept: Vec<Link> = self
            .running
            .values()
            .filter(|r| !r.stopping)
            .filter(|r| {
                broken.iter().any(|b| b.name == r.link.name)
                    || links.iter().any(|l| l.same_as(&r.link))
            })
            .map(|r| r.link.clone())
            .collect();
        for link in links {
            let old = self.running.get(&link.name).filter(|r| !r.stopping);
            if old.is_some_and(|r| r.link.same_as(&link)) {
                continue;
            }
            if let Some(other) = kept.iter().find_map(|k| conflict(&link, k)) {
                let fate = if old.is_some() {
                    "it keeps running with its previous settings"
                } else {
                    "it stays down"
                };
                crate::error!("link {}: {other}; {fate}", link.name);
                if let Some(old) = old {
                    kept.push(old.link.clone());
                }
                continue;
            }
            kept.push(link.clone());
            if old.is_some() {
                crate::info!("link {}: its file changed; restarting it", link.name);
                let name = link.name.clone();
                self.restarting.insert(name.clone(), link);
                self.stop(&name);
            } else if let Some(stopping) = self.running.get(&link.name) {
                // Still stopping from an earlier reload: start once it has ended.
                let _ = stopping;
                self.restarting.insert(link.name.clone(), link);
            } else {
                self.start(link);
            }
        }
    }
}

/// The rate budget of `config`'s Mattermost account (server and token), shared by its links.
fn budget_for(
    budgets: &mut HashMap<(String, String), SharedBudget>,
    config: &crate::config::Config,
) -> SharedBudget {
    let account = (
        config.mattermost_url.clone(),
        config.mattermost_token.expose().to_string(),
    );
    budgets
        .entry(account)
        .or_insert_with(|| SharedBudget::new(config.max_rps))
        .clone()
}

fn names(links: &[Link]) -> String {
    links
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Invocation, Secret};

    fn config() -> crate::config::Config {
        let env = |name: &str| match name {
            "MATTERMOST_URL" => Some("https://chat.example.com".to_string()),
            "MATTERMOST_TOKEN" => Some("tokenofthebot0123456789ab".to_string()),
            "MATTERMOST_OWNER" => Some("alice".to_string()),
            "HOME" => Some("/home/alice".to_string()),
            _ => None,
        };
        match crate::config::parse(&[], &env) {
            Ok(Invocation::Run(config)) => config,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn links_on_one_bot_and_server_share_a_budget_and_other_accounts_do_not() {
        let mut budgets = HashMap::new();
        let alice = config();
        let mut bob = config();
        bob.owner = "bob".into();
        let mut other_bot = config();
        other_bot.mattermost_token = Secret::new("anotherbottoken0123456789".into());
        let mut other_server = config();
        other_server.mattermost_url = "https://chat.other.example.com".into();
        let shared = budget_for(&mut budgets, &alice);
        assert!(shared.same(&budget_for(&mut budgets, &bob)));
        assert!(!shared.same(&budget_for(&mut budgets, &other_bot)));
        assert!(!shared.same(&budget_for(&mut budgets, &other_server)));
        assert_eq!(budgets.len(), 3);
    }
}
