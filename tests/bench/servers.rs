//! One bridge following several OpenCode servers (issue 13): 4 fake servers × 25 sessions, each
//! created one after another. Thread-creation latency, idle CPU with four readers, and RSS.

use std::time::{Duration, Instant};

use serde_json::json;

use super::report::{Report, Samples, mib};
use super::support::TempDir;
use super::support::fake_opencode::FakeOpenCode;
use super::{Fakes, WAIT};

const SERVERS: usize = 4;
const PER_SERVER: usize = 25;
/// Apart enough that each root post is measured alone, not queued behind the one before.
const CREATE_EVERY: Duration = Duration::from_millis(150);

pub fn pass(fakes: &Fakes, idle_secs: u64, report: &mut Report) {
    println!("{SERVERS} OpenCode servers × {PER_SERVER} sessions");
    let servers: Vec<FakeOpenCode> = (0..SERVERS).map(|_| FakeOpenCode::start()).collect();
    let list = servers
        .iter()
        .enumerate()
        .map(|(i, server)| format!("oc{i}={}", server.url()))
        .collect::<Vec<_>>()
        .join(",");
    let state = TempDir::new("bench-servers");
    let bridge = fakes.spawn_bridge_to(&state, &list);
    bridge.wait_ready(WAIT);
    // The readers' post-connect polls run first, so the creations below are measured alone.
    std::thread::sleep(Duration::from_secs(1));

    let mut created = Samples::default();
    let mut misnamed = 0;
    for index in 0..SERVERS * PER_SERVER {
        let server = index % SERVERS;
        let started = Instant::now();
        let (session_id, created_at) =
            servers[server].create_session(&format!("server {server} session {index}"));
        let (root_id, root_at) = fakes.wait_root(&session_id);
        created.push(root_at - created_at);
        let names_its_server = fakes
            .mattermost
            .post(&root_id)
            .is_some_and(|root| root.message.contains(&format!("oc{server}")));
        if !names_its_server {
            misnamed += 1;
        }
        if let Some(rest) = CREATE_EVERY.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    report.latency(
        &format!(
            "{SERVERS} servers × {PER_SERVER} sessions: session.created emitted → root post accepted"
        ),
        &created,
        "p99 ≤ 100 ms",
        (99.0, 100.0),
    );
    report.row(
        &format!("{SERVERS} servers × {PER_SERVER} sessions: root posts naming their server"),
        format!(
            "{} of {}",
            SERVERS * PER_SERVER - misnamed,
            SERVERS * PER_SERVER
        ),
        "all",
        Some(misnamed == 0),
        json!({"misnamed": misnamed}),
    );

    super::idle_cpu_row(
        &bridge,
        idle_secs,
        &format!("{SERVERS} servers: CPU while idle with {SERVERS} readers ({idle_secs} s)"),
        report,
    );
    let (rss, threads) = (bridge.rss_kib(), bridge.threads());
    report.row(
        &format!(
            "{SERVERS} servers: RSS with {} live sessions",
            SERVERS * PER_SERVER
        ),
        format!("{:.1} MiB, {threads} threads", mib(rss)),
        "≤ 10 MiB",
        Some(mib(rss) <= 10.0),
        json!({"rss_kib": rss, "threads": threads}),
    );
    let problems = bridge.problems();
    if !problems.is_empty() {
        report.note(format!(
            "the bridge logged {} warning(s)/error(s) in the servers run; first: {}",
            problems.len(),
            problems[0]
        ));
    }
    bridge.stop();
}
