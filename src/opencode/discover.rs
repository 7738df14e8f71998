//! Finds OpenCode servers of this user that listen on a loopback port, from `/proc` alone (issue 13,
//! "Discovery (auto)"). Pure file reading under a given root, so tests run it on a fake tree.
//!
//! A listener is kept when: its socket is in LISTEN state in `net/tcp` or `net/tcp6` on a loopback address
//! (127.0.0.0/8, `::1`, `::ffff:127.x`), its inode is an open fd of a process owned by `uid`, and that
//! process's command line is an OpenCode server (`opencode serve`, `opencode web`, `opencode --port N`).

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discovery {
    /// Sorted by port, one entry per (pid, port).
    pub listeners: Vec<Listener>,
    /// Other users' processes are hidden (`hidepid`): only this user's servers can be found, which is all
    /// we look for, but it is worth saying in a diagnostic.
    pub hidden: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    pub port: u16,
    /// The command line, arguments joined by spaces, for logs and root posts.
    pub command: String,
}

impl Listener {
    /// The URL the bridge would use for this server.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The real uid of the process that owns `proc_root/self` (the bridge itself on the real `/proc`).
pub fn own_uid(proc_root: &Path) -> Option<u32> {
    status_uid(&fs::read_to_string(proc_root.join("self/status")).ok()?)
}

/// The OpenCode servers of `uid` that listen on loopback, read from `proc_root` (normally `/proc`).
/// Unreadable entries are skipped: processes come and go while we read.
pub fn loopback_listeners(proc_root: &Path, uid: u32) -> Discovery {
    // inode -> port, for loopback LISTEN sockets owned by uid.
    let mut sockets: HashMap<u64, u16> = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = fs::read_to_string(proc_root.join(table)) {
            for socket in text.lines().skip(1).filter_map(parse_tcp_line) {
                if socket.uid == uid {
                    sockets.insert(socket.inode, socket.port);
                }
            }
        }
    }
    // pid 1 always exists; missing or unreadable means hidepid is on.
    let hidden = fs::read_to_string(proc_root.join("1/status")).is_err();
    let mut listeners = Vec::new();
    if !sockets.is_empty() {
        for entry in fs::read_dir(proc_root).into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(found) = process_listeners(&entry.path(), pid, uid, &sockets) {
                listeners.extend(found);
            }
        }
    }
    listeners.sort_by_key(|l| (l.port, l.pid));
    listeners.dedup();
    Discovery { listeners, hidden }
}

fn process_listeners(
    dir: &Path,
    pid: u32,
    uid: u32,
    sockets: &HashMap<u64, u16>,
) -> Option<Vec<Listener>> {
    if status_uid(&fs::read_to_string(dir.join("status")).ok()?)? != uid {
        return None;
    }
    let raw = fs::read(dir.join("cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !is_opencode_server(&args) {
        return None;
    }
    let command = args.join(" ");
    let mut found = Vec::new();
    for fd in fs::read_dir(dir.join("fd")).ok()?.flatten() {
        let Ok(target) = fs::read_link(fd.path()) else {
            continue;
        };
        let Some(inode) = socket_inode(&target.to_string_lossy()) else {
            continue;
        };
        if let Some(&port) = sockets.get(&inode) {
            found.push(Listener {
                pid,
                port,
                command: command.clone(),
            });
        }
    }
    Some(found)
}

/// `socket:[1742259]` -> 1742259.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The real uid, the first number of the `Uid:` line.
fn status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line["Uid:".len()..].split_whitespace().next()?.parse().ok()
}

/// Whether argv is an OpenCode process that serves HTTP: the native binary (`…/opencode serve`) or a
/// script run by node/bun (`node …/bin/opencode web`). The TUI without `--port`, `run` and `attach` serve
/// no port, so they are not servers.
pub fn is_opencode_server(args: &[String]) -> bool {
    let name = |arg: &String| arg.rsplit('/').next().unwrap_or(arg).to_string();
    let Some(first) = args.first() else {
        return false;
    };
    let rest = match name(first).as_str() {
        "opencode" | "opencode.exe" => &args[1..],
        "node" | "bun" | "nodejs"
            if args.get(1).is_some_and(|a| name(a).starts_with("opencode")) =>
        {
            &args[2..]
        }
        _ => return false,
    };
    let has_port = rest
        .iter()
        .any(|a| a == "--port" || a.starts_with("--port="));
    match rest
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(String::as_str)
    {
        Some("serve") | Some("web") => true,
        // A subcommand word (run, attach, auth, …) that is not a server; a number is --port's value and a
        // path is the TUI's project argument.
        Some(word)
            if word.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !word.is_empty() =>
        {
            false
        }
        _ => has_port,
    }
}

struct TcpSocket {
    port: u16,
    uid: u32,
    inode: u64,
}

/// One line of `/proc/net/tcp{,6}`: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode …`. Only
/// LISTEN (state 0A) sockets on a loopback address come back.
fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != "0A" {
        return None;
    }
    let (addr, port) = fields[1].split_once(':')?;
    if !is_loopback_hex(addr)? {
        return None;
    }
    Some(TcpSocket {
        port: u16::from_str_radix(port, 16).ok()?,
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// The kernel prints each 32-bit word of the address as a host-order number, hence `to_ne_bytes`.
fn is_loopback_hex(addr: &str) -> Option<bool> {
    let word = |i: usize| {
        u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    match addr.len() {
        8 => Some(Ipv4Addr::from(word(0)?).is_loopback()),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            Some(v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> FakeProc {
            let dir = std::env::temp_dir().join(format!("discover-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("net")).unwrap();
            fs::create_dir_all(dir.join("1")).unwrap();
            fs::write(dir.join("1/status"), "Name:\tinit\nUid:\t0\t0\t0\t0\n").unwrap();
            FakeProc(dir)
        }
        fn tcp(&self, table: &str, lines: &[&str]) {
            fs::write(
                self.0.join("net").join(table),
                format!("{HEADER}{}\n", lines.join("\n")),
            )
            .unwrap();
        }
        fn process(&self, pid: u32, uid: u32, argv: &[&str], inodes: &[u64]) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(
                dir.join("status"),
                format!("Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
            fs::write(
                dir.join("cmdline"),
                argv.iter().map(|a| format!("{a}\0")).collect::<String>(),
            )
            .unwrap();
            for (i, inode) in inodes.iter().enumerate() {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    dir.join("fd").join((10 + i).to_string()),
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

    fn v4(local: &str, state: &str, uid: u32, inode: u64) -> String {
        format!(
            "   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  {uid}        0 {inode} 1 0 100 0 0 10 0"
        )
    }

    #[test]
    fn finds_loopback_listeners_of_opencode_processes_of_the_uid() {
        let proc = FakeProc::new("main");
        let lines = [
            v4("0100007F:B043", "0A", 1000, 11), // 127.0.0.1:45123, opencode serve
            v4("0100007F:1000", "0A", 1000, 12), // 127.0.0.1:4096, opencode web under node
            v4("00000000:1001", "0A", 1000, 13), // 0.0.0.0: not loopback
            v4("0100007F:1002", "01", 1000, 14), // established, not listening
            v4("0100007F:1003", "0A", 1001, 15), // another user's
            v4("0100007F:1004", "0A", 1000, 16), // not opencode
            v4("0200007F:1005", "0A", 1000, 17), // 127.0.0.2 is loopback too
        ];
        proc.tcp("tcp", &lines.iter().map(String::as_str).collect::<Vec<_>>());
        proc.tcp(
            "tcp6",
            &[
                "   0: 00000000000000000000000001000000:1006 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 18 1",
                "   1: 00000000000000000000000000000000:1007 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 19 1",
            ],
        );
        proc.process(
            100,
            1000,
            &["/x/bin/opencode", "serve", "--port", "45123"],
            &[11],
        );
        proc.process(
            101,
            1000,
            &[
                "node",
                "/usr/lib/node_modules/opencode-ai/bin/opencode",
                "web",
            ],
            &[12, 13, 14],
        );
        proc.process(102, 1001, &["opencode", "serve"], &[15]);
        proc.process(103, 1000, &["python3", "-m", "http.server"], &[16]);
        proc.process(
            104,
            1000,
            &["opencode", "--port", "4101", "/home/me/p"],
            &[17, 18, 19],
        );
        let found = loopback_listeners(&proc.0, 1000);
        let ports: Vec<(u32, u16)> = found.listeners.iter().map(|l| (l.pid, l.port)).collect();
        assert_eq!(
            ports,
            vec![(101, 0x1000), (104, 0x1005), (104, 0x1006), (100, 0xB043)]
        );
        assert_eq!(
            found.listeners[3].command,
            "/x/bin/opencode serve --port 45123"
        );
        assert_eq!(found.listeners[3].url(), "http://127.0.0.1:45123");
        assert!(!found.hidden);
    }

    #[test]
    fn hidepid_is_reported_and_own_processes_still_found() {
        let proc = FakeProc::new("hidden");
        fs::remove_dir_all(proc.0.join("1")).unwrap();
        proc.tcp("tcp", &[&v4("0100007F:B043", "0A", 1000, 11)]);
        proc.process(100, 1000, &["opencode", "serve"], &[11]);
        let found = loopback_listeners(&proc.0, 1000);
        assert!(found.hidden);
        assert_eq!(found.listeners.len(), 1);
        assert_eq!(
            loopback_listeners(&proc.0.join("missing"), 1000),
            Discovery {
                listeners: vec![],
                hidden: true
            }
        );
    }

    #[test]
    fn command_lines() {
        let yes =
            |a: &[&str]| is_opencode_server(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(yes(&["opencode", "serve"]));
        assert!(yes(&["/a/opencode", "--print-logs", "web", "--port", "1"]));
        assert!(yes(&["opencode", "--port", "4096"]));
        assert!(yes(&["opencode", "--port=4096", "/home/me/p"]));
        assert!(yes(&["bun", "/a/opencode.js", "serve"]));
        assert!(!yes(&["opencode"]));
        assert!(!yes(&["opencode", "run", "--port", "4096", "hi"]));
        assert!(!yes(&["opencode", "attach", "http://127.0.0.1:4096"]));
        assert!(!yes(&["node", "server.js", "serve"]));
        assert!(!yes(&["opencode-mattermost", "serve"]));
        assert!(!yes(&[]));
    }

    #[test]
    fn own_uid_reads_self_status() {
        let uid = own_uid(Path::new("/proc")).expect("/proc/self/status has a Uid line");
        let proc = FakeProc::new("self");
        fs::create_dir_all(proc.0.join("self")).unwrap();
        fs::write(
            proc.0.join("self/status"),
            format!("Uid:\t{uid}\t0\t0\t0\n"),
        )
        .unwrap();
        assert_eq!(own_uid(&proc.0), Some(uid));
    }
}
