//! The fully static binary that `make static` builds: `file` and `ldd` agree it is static, it fits
//! the size budget, and it starts against the fakes with a host name to resolve and TLS to talk.
//! Slow (it needs the static build), so it is ignored by default; `make static-check` runs it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::{Running, bridge_env};
use crate::support::TempDir;
use crate::support::llm::FakeLlm;
use crate::support::mattermost::FakeMattermost;
use crate::support::opencode::OpenCode;
use crate::support::tls::{TestCa, TlsProxy};

const SIZE_BUDGET: u64 = 5 * 1024 * 1024;
const START_RUNS: usize = 5;

fn static_binary() -> PathBuf {
    match std::env::var_os("STATIC_BINARY") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-gnu/release/opencode-mattermost"),
    }
}

fn run_tool(tool: &str, binary: &PathBuf) -> String {
    let output = Command::new(tool)
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
#[ignore = "needs `make static`; run with `make static-check`"]
fn the_static_binary_is_static_small_and_starts_with_dns_and_tls() {
    let binary = static_binary();
    assert!(
        binary.is_file(),
        "{} is missing; run `make static` first",
        binary.display()
    );
    let size = std::fs::metadata(&binary).expect("binary metadata").len();
    let file = run_tool("file", &binary);
    let ldd = run_tool("ldd", &binary);
    println!("size: {size} bytes\nfile: {}ldd: {}", file, ldd);
    assert!(size <= SIZE_BUDGET, "{size} bytes is over the 5 MB budget");
    assert!(file.contains("statically linked"), "{file}");
    assert!(!ldd.contains("=>"), "ldd found libraries: {ldd}");

    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, json!({}));
    let mattermost = FakeMattermost::start();
    let ca = TestCa::new("static");
    let upstream = mattermost
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("fake mattermost address");
    let proxy = TlsProxy::start(&ca, upstream);
    let state = TempDir::new("static");
    let pem = ca.write_pem(state.path(), "ca.pem");
    // Both URLs by name, so that start-up needs the resolver of the static glibc.
    let mattermost_url = proxy.url().replace("127.0.0.1", "localhost");
    let opencode_url = opencode.url().replace("127.0.0.1", "localhost");

    let mut times = Vec::new();
    for _ in 0..START_RUNS {
        let mut bridge = Command::new(&binary);
        bridge.env_clear();
        bridge_env(&mut bridge, &mattermost, &mattermost.bot().token);
        bridge
            .env("OPENCODE_MM_STATE_DIR", state.path())
            .env("MATTERMOST_URL", &mattermost_url)
            .env("OPENCODE_MM_CA_FILE", &pem)
            .env("OPENCODE_URL", &opencode_url)
            .env("OPENCODE_MM_LOG", "info");
        let started = Instant::now();
        let mut running = Running::start(bridge);
        running.wait_for_line("ready:");
        times.push(started.elapsed());
        let (code, _) = running.terminate();
        assert_eq!(code, 0, "{}", running.seen.join("\n"));
    }
    times.sort();
    let median: Duration = times[times.len() / 2];
    println!(
        "start-up to ready over https://localhost and http://localhost, {START_RUNS} runs: median \
         {:.0} ms (all: {:?})",
        median.as_secs_f64() * 1000.0,
        times
            .iter()
            .map(|t| format!("{:.0} ms", t.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
    );
}
