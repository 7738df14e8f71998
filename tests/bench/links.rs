//! Two links in one process (issue 15, OPENCODE_MM_LINKS_DIR): one bot, two owners, each link on
//! its own fake OpenCode server. RSS and idle CPU with both links connected. The idle window is
//! half the others' (`BENCH_IDLE_SECS / 2`), to keep the bench's added time near half a minute.

use serde_json::json;

use super::process::{BridgeProcess, Target};
use super::report::{Report, mib};
use super::support::TempDir;
use super::support::fake_opencode::FakeOpenCode;
use super::{Fakes, WAIT};

pub fn pass(fakes: &Fakes, idle_secs: u64, report: &mut Report) {
    println!("2 links (one bot, two owners, a fake OpenCode each)");
    let servers = [FakeOpenCode::start(), FakeOpenCode::start()];
    let owners = [fakes.mattermost.owner(), fakes.mattermost.stranger()];
    let bot = fakes.mattermost.bot();
    let links = TempDir::new("bench-links");
    for (index, (server, owner)) in servers.iter().zip(&owners).enumerate() {
        let file = links.path().join(format!("link{index}.env"));
        let contents = format!(
            "MATTERMOST_OWNER={}\nOPENCODE_URL=oc{index}={}\n",
            owner.username,
            server.url()
        );
        std::fs::write(&file, contents).expect("write a link file");
    }
    let state = TempDir::new("bench-links-state");
    let (url, token) = (fakes.mattermost.url(), bot.token.clone());
    let bridge = BridgeProcess::spawn_with(
        &Target {
            mattermost_url: &url,
            token: &token,
            owner: &owners[0].username,
            opencode_url: &servers[0].url(),
            state_dir: state.path(),
        },
        &[("OPENCODE_MM_LINKS_DIR", links.path().display().to_string())],
    );
    bridge.wait_ready(WAIT);
    bridge.wait_ready(WAIT);

    // One session each, so both links have a thread and a worker has come and gone.
    let mut threads_in_own_dm = 0;
    for (server, owner) in servers.iter().zip(&owners) {
        let (session_id, _) = server.create_session("a link's session");
        let (root_id, _) = fakes.wait_root(&session_id);
        let dm = fakes.mattermost.dm_channel(&bot.id, &owner.id);
        if fakes
            .mattermost
            .post(&root_id)
            .is_some_and(|root| root.channel_id == dm)
        {
            threads_in_own_dm += 1;
        }
    }
    report.row(
        "2 links: each session's thread in its own owner's DM",
        format!("{threads_in_own_dm} of 2"),
        "all",
        Some(threads_in_own_dm == 2),
        json!({"in_own_dm": threads_in_own_dm}),
    );

    let window = (idle_secs / 2).max(5);
    super::idle_cpu_row(
        &bridge,
        window,
        &format!("2 links: CPU while idle ({window} s)"),
        report,
    );
    let (rss, threads) = (bridge.rss_kib(), bridge.threads());
    report.row(
        "2 links: RSS, both connected",
        format!("{:.1} MiB, {threads} threads", mib(rss)),
        "≤ 10 MiB",
        Some(mib(rss) <= 10.0),
        json!({"rss_kib": rss, "threads": threads}),
    );
    let problems = bridge.problems();
    if !problems.is_empty() {
        report.note(format!(
            "the bridge logged {} warning(s)/error(s) in the links run; first: {}",
            problems.len(),
            problems[0]
        ));
    }
    bridge.stop();
}
