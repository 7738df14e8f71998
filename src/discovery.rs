//! The `discovery` thread of OPENCODE_URL=auto: every ~2 s it asks `scan` which OpenCode processes
//! of this user listen on a loopback port, tells the router of each one that appears
//! (`Input::ServerAdded`) and of each one that is gone (`Input::ServerRemoved`). Servers named in
//! OPENCODE_URL are never added or let go by it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::opencode::ServerKey;
use crate::opencode::rest::OpenCodeClient;
use crate::router::Input;

/// Found within 5 s of starting: a scan every 2 s leaves room for the server to start listening.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);

/// One scan's answer: the loopback addresses of matching processes (with their pid, for the log),
/// and whether other processes' `/proc` entries were hidden (`hidepid`), so some may be missed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub listeners: Vec<(u32, SocketAddr)>,
    pub hidden: bool,
}

/// Runs until `stop` fires or disconnects. `client` makes the client of a found URL (credentials,
/// TLS, API choice from the configuration); `fixed` are the URLs OPENCODE_URL names.
pub fn run(
    scan: impl Fn() -> Scan,
    client: impl Fn(&str) -> OpenCodeClient,
    fixed: BTreeSet<String>,
    out: Sender<Input>,
    stop: Receiver<()>,
) {
    let mut found: BTreeMap<String, (u32, ServerKey)> = BTreeMap::new();
    let mut told_hidden = false;
    loop {
        let now = scan();
        if now.hidden && !told_hidden {
            told_hidden = true;
            crate::warn!(
                "discovery: other processes' /proc entries are hidden (hidepid); OpenCode servers \
                 of this user that it cannot see are missed: name them in OPENCODE_URL"
            );
        }
        let urls: BTreeMap<String, u32> = now
            .listeners
            .iter()
            .map(|&(pid, address)| (url_of(address), pid))
            .filter(|(url, _)| !fixed.contains(url))
            .collect();
        for (url, &pid) in &urls {
            if found.contains_key(url) {
                continue;
            }
            crate::info!("discovery: found OpenCode (pid {pid}) at {url}");
            let client = Arc::new(client(url));
            found.insert(url.clone(), (pid, client.key.clone()));
            if out.send(Input::ServerAdded(client)).is_err() {
                return;
            }
        }
        let gone: Vec<String> = found
            .keys()
            .filter(|url| !urls.contains_key(*url))
            .cloned()
            .collect();
        for url in gone {
            if let Some((pid, key)) = found.remove(&url) {
                crate::info!("discovery: OpenCode (pid {pid}) at {} stopped", key.0);
                if out.send(Input::ServerRemoved(key)).is_err() {
                    return;
                }
            }
        }
        if crate::stopped(&stop, SCAN_EVERY) {
            return;
        }
    }
}

/// Starts the `discovery` thread for `config` (only meaningful with `auto`): found servers get the
/// shared credentials and API choice. `scan` is the `/proc` reader (`opencode::discover`).
pub fn spawn(
    config: &crate::config::Config,
    tls: &crate::http::Tls,
    scan: impl Fn() -> Scan + Send + 'static,
    out: Sender<Input>,
    stop: Receiver<()>,
) -> std::io::Result<()> {
    let fixed: BTreeSet<String> = config
        .opencode_servers
        .iter()
        .map(|s| s.url.clone())
        .collect();
    let (username, password, api, tls) = (
        config.opencode_username.clone(),
        config.opencode_password.clone(),
        config.opencode_api,
        tls.clone(),
    );
    let client = move |url: &str| {
        OpenCodeClient::with_tls(url, &username, password.as_ref(), &tls).with_api(api)
    };
    std::thread::Builder::new()
        .name("discovery".into())
        .stack_size(256 * 1024)
        .spawn(crate::log::inherit(move || {
            run(scan, client, fixed, out, stop)
        }))
        .map(drop)
}

/// The `/proc` scan of `opencode::discover` for this process's user, as a `Scan`; None when
/// `/proc/self` cannot be read (no procfs), so nothing can be found.
pub fn proc_scanner() -> Option<impl Fn() -> Scan + Send + 'static> {
    let proc_root = std::path::Path::new("/proc");
    let uid = crate::opencode::discover::own_uid(proc_root)?;
    Some(move || {
        let found = crate::opencode::discover::loopback_listeners(proc_root, uid);
        Scan {
            listeners: found
                .listeners
                .iter()
                .map(|l| (l.pid, SocketAddr::new(l.address, l.port)))
                .collect(),
            hidden: found.hidden,
        }
    })
}

/// The URL of a loopback listener: `http://127.0.0.1:PORT`, or `http://[::1]:PORT` for a server
/// listening only on IPv6 loopback.
pub fn url_of(address: SocketAddr) -> String {
    format!("http://{address}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn found_servers_are_added_once_and_let_go_when_they_stop() {
        let v4 = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let v6 = |port| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let scans = Arc::new(Mutex::new(vec![
            Scan {
                listeners: vec![
                    (10, v4(4096)),
                    (11, v4(5000)),
                    (12, v4(6000)),
                    (13, v6(7000)),
                ],
                hidden: false,
            },
            Scan {
                listeners: vec![(11, v4(5000)), (12, v4(6000)), (13, v6(7000))],
                hidden: true,
            },
        ]));
        let (out, inputs) = crossbeam_channel::unbounded();
        let (stop_tx, stop) = crossbeam_channel::bounded(0);
        let fixed = BTreeSet::from([url_of(v4(6000))]);
        let scanner = {
            let scans = scans.clone();
            move || {
                let mut scans = scans.lock().unwrap();
                if scans.len() > 1 {
                    scans.remove(0)
                } else {
                    scans[0].clone()
                }
            }
        };
        let thread = std::thread::spawn(move || {
            run(
                scanner,
                |url| OpenCodeClient::new(url, "opencode", None),
                fixed,
                out,
                stop,
            )
        });
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let input = inputs
                .recv_timeout(Duration::from_secs(10))
                .expect("discovery reported within 10 s");
            seen.push(match input {
                Input::ServerAdded(client) => format!("+{}", client.key.0),
                Input::ServerRemoved(key) => format!("-{}", key.0),
                other => panic!("unexpected {other:?}"),
            });
        }
        drop(stop_tx);
        thread.join().unwrap();
        assert_eq!(
            seen,
            [
                "+http://127.0.0.1:4096",
                "+http://127.0.0.1:5000",
                "+http://[::1]:7000",
                "-http://127.0.0.1:4096"
            ]
        );
        assert!(inputs.try_recv().is_err(), "a server reported twice");
    }
}
