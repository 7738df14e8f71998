//! The release bridge as a separate process: spawned with its settings in the environment, its log
//! lines timestamped as they arrive, its memory, threads and CPU read from `/proc`, and stopped with
//! SIGTERM (SIGKILL if it does not stop) whenever the handle is dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

pub struct BridgeProcess {
    child: Child,
    pub pid: u32,
    pub spawned_at: Instant,
    lines: Receiver<(Instant, String)>,
    /// Every log line so far, for the warnings count and for failures.
    log: Arc<Mutex<Vec<String>>>,
}

/// What the bridge is pointed at.
pub struct Target<'a> {
    pub mattermost_url: &'a str,
    pub token: &'a str,
    pub owner: &'a str,
    pub opencode_url: &'a str,
    pub state_dir: &'a Path,
}

/// The binary under test: `BENCH_BINARY` (for example the static build of `make static`), else
/// cargo's release build.
pub fn bridge_binary() -> String {
    std::env::var("BENCH_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_opencode-mattermost").to_string())
}

impl BridgeProcess {
    pub fn spawn(target: &Target) -> BridgeProcess {
        BridgeProcess::spawn_with(target, &[])
    }

    /// `spawn` with more variables (`OPENCODE_MM_LINKS_DIR` for the links pass).
    pub fn spawn_with(target: &Target, extra_env: &[(&str, String)]) -> BridgeProcess {
        let binary = bridge_binary();
        let spawned_at = Instant::now();
        let mut child = Command::new(&binary)
            .arg("run")
            .env_clear()
            .envs(extra_env.iter().map(|(k, v)| (k, v)))
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MATTERMOST_URL", target.mattermost_url)
            .env("MATTERMOST_TOKEN", target.token)
            .env("MATTERMOST_OWNER", target.owner)
            .env("OPENCODE_URL", target.opencode_url)
            .env("OPENCODE_MM_STATE_DIR", target.state_dir)
            .env("OPENCODE_MM_LOG", "info")
            // Passed through for allocator experiments (see BENCHMARKS.md).
            .envs(std::env::var("MALLOC_ARENA_MAX").map(|v| ("MALLOC_ARENA_MAX", v)))
            .envs(std::env::var("GLIBC_TUNABLES").map(|v| ("GLIBC_TUNABLES", v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = crossbeam_channel::unbounded();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_for_reader = Arc::clone(&log);
        thread::Builder::new()
            .name("bridge-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    let at = Instant::now();
                    if std::env::var_os("BENCH_LOG").is_some() {
                        eprintln!("  bridge| {line}");
                    }
                    log_for_reader
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.clone());
                    let _ = tx.send((at, line));
                }
            })
            .expect("spawn the stderr reader");
        BridgeProcess {
            child,
            pid,
            spawned_at,
            lines,
            log,
        }
    }

    /// When the bridge logged its `ready:` line (router.rs `check_ready`).
    pub fn wait_ready(&self, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok((at, line)) if line.contains(" ready: ") => return at,
                Ok(_) => {}
                Err(_) => panic!(
                    "the bridge did not log `ready` within {timeout:?}; its log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Lines logged at WARN or ERROR.
    pub fn problems(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .cloned()
            .collect()
    }

    /// Resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    /// The most resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_field("VmHWM:")
    }

    /// Resets `VmHWM` to the current RSS (`/proc/<pid>/clear_refs`, Linux ≥ 4.0), so the next
    /// `peak_rss_kib` is the peak of what follows; false where the kernel refuses.
    pub fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// Polls `VmRSS` every 10 ms on its own thread until `RssSampler::stop`.
    pub fn sample_rss(&self) -> RssSampler {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let path = format!("/proc/{}/status", self.pid);
        let handle = thread::Builder::new()
            .name("bench-rss".into())
            .spawn(move || {
                let mut peak = 0;
                let mut samples = 0;
                loop {
                    let status = std::fs::read_to_string(&path).unwrap_or_default();
                    peak = peak.max(field(&status, "VmRSS:"));
                    samples += 1;
                    if stopped.recv_timeout(Duration::from_millis(10)).is_ok() {
                        return (peak, samples);
                    }
                }
            })
            .expect("spawn the RSS sampler");
        RssSampler { stop, handle }
    }

    /// OS threads (`Threads`).
    pub fn threads(&self) -> u64 {
        self.status_field("Threads:")
    }

    /// User plus system CPU time so far, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/stat: {e}", self.pid));
        // The command name may hold spaces; the fields after it are space-separated.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        utime + stime
    }

    /// Where the resident memory is, from `/proc/<pid>/smaps`, in KiB: thread stacks (anonymous
    /// mappings of a worker's or reader's stack size), the main heap, other anonymous memory
    /// (malloc's per-thread arenas), and file-backed pages (the binary, libc).
    pub fn memory_breakdown(&self) -> MemoryBreakdown {
        let smaps =
            std::fs::read_to_string(format!("/proc/{}/smaps", self.pid)).unwrap_or_default();
        let mut breakdown = MemoryBreakdown::default();
        let mut kind = Region::File;
        let mut size_kib = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                let fields: Vec<&str> = line.split_whitespace().collect();
                kind = match fields.get(5) {
                    Some(&"[heap]") => Region::Heap,
                    Some(&"[stack]") => Region::Stack,
                    Some(_) => Region::File,
                    None => Region::Anonymous,
                };
            } else if let Some(value) = line.strip_prefix("Size:") {
                size_kib = kib(value);
            } else if let Some(value) = line.strip_prefix("Rss:") {
                let rss = kib(value);
                match kind {
                    Region::Heap => breakdown.heap += rss,
                    Region::Stack => breakdown.stacks += rss,
                    // Thread stacks are 256 KiB (workers, readers) or 1 MiB (the bridge thread);
                    // malloc arenas reserve 64 MiB at a time.
                    Region::Anonymous
                        if size_kib == 256 || size_kib == 1024 || size_kib == 2048 =>
                    {
                        breakdown.stacks += rss
                    }
                    Region::Anonymous => breakdown.anonymous += rss,
                    Region::File => breakdown.file += rss,
                }
            }
        }
        breakdown
    }

    fn status_field(&self, name: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/status: {e}", self.pid));
        field(&status, name)
    }

    /// SIGTERM, then SIGKILL after 3 s; how long it took to exit.
    pub fn stop(mut self) -> Duration {
        self.terminate()
    }

    fn terminate(&mut self) -> Duration {
        let asked = Instant::now();
        if let Ok(Some(_)) = self.child.try_wait() {
            return Duration::ZERO;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        while asked.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return asked.elapsed();
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        asked.elapsed()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A `/proc/<pid>/status` field in KiB (or a count), 0 when missing.
fn field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub struct RssSampler {
    stop: crossbeam_channel::Sender<()>,
    handle: thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    /// The largest `VmRSS` seen, in KiB, and how many samples were taken.
    pub fn stop(self) -> (u64, u64) {
        let _ = self.stop.send(());
        self.handle.join().unwrap_or((0, 0))
    }
}

/// Clock ticks per second, for `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryBreakdown {
    pub stacks: u64,
    pub heap: u64,
    pub anonymous: u64,
    pub file: u64,
}

impl std::fmt::Display for MemoryBreakdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "thread stacks {:.1} MiB, main heap {:.1} MiB, other anonymous (malloc arenas) {:.1} MiB, file-backed {:.1} MiB",
            self.stacks as f64 / 1024.0,
            self.heap as f64 / 1024.0,
            self.anonymous as f64 / 1024.0,
            self.file as f64 / 1024.0
        )
    }
}

enum Region {
    Heap,
    Stack,
    Anonymous,
    File,
}

fn kib(value: &str) -> u64 {
    value
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
