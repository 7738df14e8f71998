//! Finds OpenCode servers of this user listening on loopback, from /proc only (issue 13, discovery).
//! A listener is a LISTEN socket in /proc/net/tcp{,6} on 127.0.0.0/8 or ::1, owned (through
//! /proc/PID/fd -> `socket:[inode]`) by a process of `uid` whose cmdline is an OpenCode server.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    pub port: u16,
    /// The loopback address it listens on: 127.0.0.1 (or another of 127/8), or ::1 for a server
    /// listening only there (its URL is then `http://[::1]:PORT`).
    pub address: IpAddr,
    /// The process's cmdline, arguments joined by spaces.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discovery {
    pub listeners: Vec<Listener>,
    /// Other processes' /proc entries are not readable (procfs mounted with hidepid), so servers of this
    /// user may be missed only if ours are hidden too; callers say so rather than report "none found".
    pub hidden: bool,
}

/// The real uid of this process, from `<proc_root>/self/status`.
pub fn own_uid(proc_root: &Path) -> Option<u32> {
    status_uid(&fs::read_to_string(proc_root.join("self/status")).ok()?)
}

pub fn loopback_listeners(proc_root: &Path, uid: u32) -> Discovery {
    let mut sockets: HashMap<u64, Vec<SocketAddr>> = HashMap::new();
    for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
        if let Ok(text) = fs::read_to_string(proc_root.join(file)) {
            for (inode, address) in loopback_listen_sockets(&text, v6) {
                sockets.entry(inode).or_default().push(address);
            }
        }
    }
    let mut found = Discovery::default();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    let mut saw_init = false;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let status = match fs::read_to_string(dir.join("status")) {
            Ok(status) => status,
            Err(e) => {
                // A process that exited meanwhile is NotFound; anything else means we may not look.
                found.hidden |= e.kind() != ErrorKind::NotFound;
                continue;
            }
        };
        saw_init |= pid == 1;
        if status_uid(&status) != Some(uid) || sockets.is_empty() {
            continue;
        }
        let Ok(cmdline) = fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !is_opencode_server(&args) {
            continue;
        }
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut addresses: Vec<SocketAddr> = fds
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .filter_map(|target| socket_inode(target.to_str()?))
            .filter_map(|inode| sockets.get(&inode))
            .flatten()
            .copied()
            .collect();
        // One listener per port: IPv4 first, so a server on both 127.0.0.1 and ::1 is reached
        // the usual way.
        addresses.sort_unstable_by_key(|a| (a.port(), a.is_ipv6(), a.ip()));
        addresses.dedup_by_key(|a| a.port());
        let command = args.join(" ");
        found
            .listeners
            .extend(addresses.into_iter().map(|address| Listener {
                pid,
                port: address.port(),
                address: address.ip(),
                command: command.clone(),
            }));
    }
    // Under hidepid=2 other users' processes, init included, are simply absent from the listing.
    found.hidden |= !saw_init;
    found.listeners.sort_by_key(|l| (l.pid, l.port));
    found
}

fn status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line["Uid:".len()..].split_whitespace().next()?.parse().ok()
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// (inode, address) of each LISTEN socket on a loopback address in a /proc/net/tcp or tcp6 text; an
/// IPv4-mapped one (`::ffff:127.0.0.1`) as its IPv4 address.
fn loopback_listen_sockets(text: &str, v6: bool) -> Vec<(u64, SocketAddr)> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != LISTEN {
                return None;
            }
            let (addr, port) = fields[1].split_once(':')?;
            let ip = if v6 {
                ipv6_loopback(addr)?
            } else {
                Some(ipv4(addr)?)
                    .filter(Ipv4Addr::is_loopback)
                    .map(IpAddr::V4)
            }?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((fields[9].parse().ok()?, SocketAddr::new(ip, port)))
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address in host order, so native bytes give network order.
fn ipv4(hex: &str) -> Option<Ipv4Addr> {
    if hex.len() != 8 {
        return None;
    }
    Some(Ipv4Addr::from(
        u32::from_str_radix(hex, 16).ok()?.to_ne_bytes(),
    ))
}

/// `Some(Some(ip))` for a loopback address (an IPv4-mapped one as IPv4), `Some(None)` for another
/// address, None when the text is not an address.
fn ipv6_loopback(hex: &str) -> Option<Option<IpAddr>> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let addr = Ipv6Addr::from(bytes);
    Some(match addr.to_ipv4_mapped() {
        Some(v4) => v4.is_loopback().then_some(IpAddr::V4(v4)),
        None => addr.is_loopback().then_some(IpAddr::V6(addr)),
    })
}

/// `opencode serve`, `opencode web` or `opencode … --port N` (N not 0), run as the native binary or
/// through node/bun with the npm package's `opencode` script.
fn is_opencode_server(args: &[String]) -> bool {
    let base = |a: &str| a.rsplit('/').next().unwrap_or(a).to_string();
    let start = match args.first().map(|a| base(a)) {
        Some(b) if b == "opencode" => 1,
        Some(b) if matches!(b.as_str(), "node" | "bun" | "nodejs") => {
            match args.get(1).map(|a| base(a)) {
                Some(b) if b == "opencode" || b == "opencode.js" => 2,
                _ => return false,
            }
        }
        _ => return false,
    };
    let rest = &args[start..];
    if let Some(sub) = rest.iter().find(|a| !a.starts_with('-'))
        && (sub == "serve" || sub == "web")
    {
        return true;
    }
    rest.iter().enumerate().any(|(i, a)| {
        let port = if a == "--port" {
            rest.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix("--port=")
        };
        port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const TCP_HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn tcp_line(local: &str, state: &str, inode: u64) -> String {
        format!(
            "   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
        )
    }

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> FakeProc {
            let root =
                std::env::temp_dir().join(format!("om-discover-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("net")).unwrap();
            fs::write(root.join("net/tcp"), TCP_HEADER).unwrap();
            fs::write(root.join("net/tcp6"), TCP_HEADER).unwrap();
            let proc = FakeProc(root);
            proc.process(1, 0, &["/sbin/init"], &[]);
            proc
        }
        fn tcp(&self, file: &str, local: &str, state: &str, inode: u64) {
            let path = self.0.join("net").join(file);
            let mut text = fs::read_to_string(&path).unwrap();
            text.push_str(&tcp_line(local, state, inode));
            fs::write(path, text).unwrap();
        }
        fn process(&self, pid: u32, uid: u32, args: &[&str], inodes: &[u64]) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(
                dir.join("status"),
                format!("Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
            fs::write(
                dir.join("cmdline"),
                args.iter().map(|a| format!("{a}\0")).collect::<String>(),
            )
            .unwrap();
            std::os::unix::fs::symlink("/dev/null", dir.join("fd/0")).unwrap();
            for (i, inode) in inodes.iter().enumerate() {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    dir.join(format!("fd/{}", i + 3)),
                )
                .unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_only_loopback_listeners_of_opencode_servers_of_the_uid() {
        let p = FakeProc::new("mixed");
        p.tcp("tcp", "0100007F:1000", "0A", 11); // 127.0.0.1:4096, serve
        p.tcp("tcp", "0100007F:1001", "01", 12); // established, not listening
        p.tcp("tcp", "00000000:1002", "0A", 13); // 0.0.0.0
        p.tcp("tcp6", "00000000000000000000000001000000:1003", "0A", 14); // ::1, web
        p.tcp("tcp", "0100007F:1004", "0A", 15); // other user's serve
        p.tcp("tcp", "0100007F:1005", "0A", 16); // not OpenCode
        p.tcp("tcp", "0101A8C0:1006", "0A", 17); // 192.168.1.1
        p.tcp("tcp", "0200007F:1007", "0A", 18); // 127.0.0.2, TUI with --port
        p.tcp("tcp6", "0000000000000000FFFF00000100007F:1008", "0A", 19); // ::ffff:127.0.0.1
        p.process(
            100,
            1000,
            &["/usr/bin/opencode", "serve", "--port", "4096"],
            &[11, 12, 13],
        );
        p.process(
            101,
            1000,
            &[
                "node",
                "/usr/lib/node_modules/opencode-ai/bin/opencode",
                "web",
            ],
            &[14],
        );
        p.process(102, 1001, &["opencode", "serve"], &[15]);
        p.process(103, 1000, &["python3", "-m", "http.server"], &[16]);
        p.process(104, 1000, &["opencode", "serve"], &[17]);
        p.process(105, 1000, &["opencode", "--port=4103", "/src"], &[18, 19]);
        p.process(106, 1000, &["opencode", "run", "hi"], &[]);
        let found = loopback_listeners(&p.0, 1000);
        let got: Vec<(u32, u16)> = found.listeners.iter().map(|l| (l.pid, l.port)).collect();
        assert_eq!(
            got,
            vec![(100, 0x1000), (101, 0x1003), (105, 0x1007), (105, 0x1008)]
        );
        assert_eq!(
            found.listeners[0].command,
            "/usr/bin/opencode serve --port 4096"
        );
        // Reached where it listens, not at 127.0.0.1; a mapped address as its IPv4 one.
        assert_eq!(found.listeners[2].address.to_string(), "127.0.0.2");
        assert_eq!(found.listeners[3].address.to_string(), "127.0.0.1");
        assert!(!found.hidden);
    }

    #[test]
    fn a_server_only_on_ipv6_loopback_is_found_with_its_address() {
        let p = FakeProc::new("ipv6");
        // `opencode serve --hostname ::1`: only in tcp6.
        p.tcp("tcp6", "00000000000000000000000001000000:1000", "0A", 21);
        // Both families on one port: reached over IPv4.
        p.tcp("tcp6", "00000000000000000000000001000000:1001", "0A", 22);
        p.tcp("tcp", "0100007F:1001", "0A", 23);
        // `::` (every address) and a global IPv6 address are not loopback.
        p.tcp("tcp6", "00000000000000000000000000000000:1002", "0A", 24);
        p.tcp("tcp6", "B80D0120000000000000000001000000:1003", "0A", 25);
        p.process(100, 1000, &["opencode", "serve"], &[21]);
        p.process(101, 1000, &["opencode", "web"], &[22, 23]);
        p.process(102, 1000, &["opencode", "serve"], &[24, 25]);
        let found = loopback_listeners(&p.0, 1000);
        let got: Vec<(u32, String)> = found
            .listeners
            .iter()
            .map(|l| (l.pid, SocketAddr::new(l.address, l.port).to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (100, "[::1]:4096".to_string()),
                (101, "127.0.0.1:4097".to_string())
            ]
        );
    }

    #[test]
    fn hidden_when_init_is_not_listed() {
        let p = FakeProc::new("hidepid");
        fs::remove_dir_all(p.0.join("1")).unwrap();
        p.tcp("tcp", "0100007F:1000", "0A", 11);
        p.process(100, 1000, &["opencode", "serve"], &[11]);
        let found = loopback_listeners(&p.0, 1000);
        assert!(found.hidden);
        assert_eq!(found.listeners.len(), 1);
    }

    #[test]
    fn cmdline_rules() {
        let ok = |args: &[&str]| {
            is_opencode_server(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert!(ok(&["opencode", "serve"]));
        assert!(ok(&["/x/bin/opencode", "--print-logs", "web"]));
        assert!(ok(&["opencode", "--port", "5000"]));
        assert!(ok(&["bun", "/x/opencode", "serve"]));
        assert!(!ok(&["opencode"]));
        assert!(!ok(&["opencode", "--port", "0"]));
        assert!(!ok(&["opencode", "attach", "http://127.0.0.1:1"]));
        assert!(!ok(&["opencode-mattermost", "serve"]));
        assert!(!ok(&["node", "server.js", "serve"]));
    }

    #[test]
    fn own_uid_reads_self_status() {
        let p = FakeProc::new("self");
        fs::create_dir_all(p.0.join("self")).unwrap();
        fs::write(
            p.0.join("self/status"),
            "Name:\tx\nUid:\t1234\t1234\t1234\t1234\n",
        )
        .unwrap();
        assert_eq!(own_uid(&p.0), Some(1234));
        assert!(own_uid(Path::new("/proc")).is_some());
    }
}
