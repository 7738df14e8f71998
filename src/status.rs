//! `opencode-mattermost status`: what the state directory says about the bridge, for watchdogs and
//! people. It connects nowhere: the running bridge's lock, its heartbeat file and `state.json` are
//! the whole story.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::store::{self, Heartbeat};

/// A heartbeat older than this means the bridge is hung (it writes one every 30 s).
pub const HEARTBEAT_STALE_AFTER: Duration = Duration::from_secs(90);
/// Silence from a side longer than this is unhealthy: the websocket answers our 30 s pings and
/// OpenCode's event stream sends a heartbeat every ~10 s, so a live connection is never this quiet.
pub const SIDE_SILENT_AFTER: Duration = Duration::from_secs(120);

/// Everything `status` reports; the JSON output is this value.
#[derive(Debug, Serialize)]
pub struct Report {
    pub state_dir: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub healthy: bool,
    /// Why it is not healthy, one sentence each.
    pub problems: Vec<String>,
    pub heartbeat: Option<Side>,
    pub mattermost: Option<Side>,
    pub opencode: Option<Side>,
    /// Per OpenCode server followed, by name: when it was last heard from (None: never).
    pub opencode_servers: Vec<ServerHeard>,
    /// Per OpenCode server: the API the bridge speaks to it and why (`v1: …`, `v2: …`).
    pub opencode_api: Vec<ServerApi>,
    pub sessions: Vec<SessionLine>,
}

#[derive(Debug, Serialize)]
pub struct ServerHeard {
    pub server: String,
    pub heard: Option<Side>,
}

#[derive(Debug, Serialize)]
pub struct ServerApi {
    pub server: String,
    pub api: String,
}

/// A moment and how long ago it was.
#[derive(Debug, Serialize)]
pub struct Side {
    pub at_ms: u64,
    pub at: String,
    pub seconds_ago: u64,
}

#[derive(Debug, Serialize)]
pub struct SessionLine {
    pub server: String,
    pub session_id: String,
    pub short_id: String,
    pub thread_id: String,
    pub title: String,
    /// `active`, or `ended` once the session was deleted.
    pub state: &'static str,
}

/// Reads the state directory at `now_ms`.
pub fn report(state_dir: &Path, now_ms: u64) -> Report {
    let mut problems = Vec::new();
    let pid = store::running_pid(state_dir).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let heartbeat = store::read_heartbeat(state_dir).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let state = store::read_state(state_dir).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    if pid.is_none() {
        problems.insert(
            0,
            "no bridge is running on this state directory".to_string(),
        );
    }
    let side = |ms: u64| {
        (ms != 0).then(|| Side {
            at_ms: ms,
            at: crate::log::utc_timestamp(ms),
            seconds_ago: now_ms.saturating_sub(ms) / 1000,
        })
    };
    // A heartbeat from an earlier run says nothing about the one running now.
    let current = heartbeat.filter(|beat| pid.is_some() && Some(beat.pid) == pid);
    if pid.is_some() {
        problems.extend(heartbeat_problems(current.as_ref(), now_ms));
    }
    let opencode_api = state
        .iter()
        .flat_map(|state| {
            state.servers.iter().filter_map(|(server, entry)| {
                Some(ServerApi {
                    server: server.clone(),
                    api: entry.api.clone()?,
                })
            })
        })
        .collect();
    let sessions = state
        .map(|state| {
            state
                .servers
                .iter()
                .flat_map(|(server, entry)| {
                    entry.sessions.iter().map(move |(id, record)| SessionLine {
                        server: server.clone(),
                        session_id: id.clone(),
                        short_id: crate::command::short_id(id).to_string(),
                        thread_id: record.root_post_id.clone(),
                        title: record.title.clone(),
                        state: if record.ended_ms.is_some() {
                            "ended"
                        } else {
                            "active"
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Report {
        state_dir: state_dir.display().to_string(),
        running: pid.is_some(),
        pid,
        healthy: problems.is_empty(),
        problems,
        heartbeat: current.as_ref().and_then(|beat| side(beat.written_ms)),
        mattermost: current
            .as_ref()
            .and_then(|beat| side(beat.mattermost_heard_ms)),
        opencode: current
            .as_ref()
            .and_then(|beat| side(beat.opencode_heard_ms)),
        opencode_servers: current
            .iter()
            .flat_map(|beat| &beat.opencode_servers)
            .map(|(server, &ms)| ServerHeard {
                server: server.clone(),
                heard: side(ms),
            })
            .collect(),
        opencode_api,
        sessions,
    }
}

/// What `status` prints (the text form, or JSON for scripts) and its exit code: 0 when a bridge
/// runs and is healthy, 1 otherwise.
pub fn show(state_dir: &Path, json: bool) -> (String, i32) {
    let report = report(state_dir, crate::log::now_ms());
    let code = if report.healthy { 0 } else { 1 };
    if !json {
        return (render_text(&report), code);
    }
    match serde_json::to_string_pretty(&report) {
        Ok(text) => (text + "\n", code),
        Err(e) => (
            format!("{{\"error\": \"cannot encode the status: {e}\"}}\n"),
            1,
        ),
    }
}

/// One link's status (OPENCODE_MM_LINKS_DIR).
#[derive(Debug, Serialize)]
pub struct LinkReport {
    pub link: String,
    #[serde(flatten)]
    pub report: Report,
}

/// `show` with OPENCODE_MM_LINKS_DIR: every `NAME.env` of `links_dir` is reported from its own
/// state directory, `STATE_DIR/links/NAME`. 0 only when every link runs and is healthy.
pub fn show_links(state_dir: &Path, links_dir: &Path, json: bool) -> (String, i32) {
    let mut names: Vec<String> = std::fs::read_dir(links_dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter_map(|file| Some(file.strip_suffix(".env")?.to_string()))
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let now_ms = crate::log::now_ms();
    let reports: Vec<LinkReport> = names
        .into_iter()
        .map(|name| LinkReport {
            report: report(&state_dir.join("links").join(&name), now_ms),
            link: name,
        })
        .collect();
    let healthy = !reports.is_empty() && reports.iter().all(|r| r.report.healthy);
    let code = if healthy { 0 } else { 1 };
    if json {
        let value =
            serde_json::json!({ "links_dir": links_dir.display().to_string(), "links": reports });
        return match serde_json::to_string_pretty(&value) {
            Ok(text) => (text + "\n", code),
            Err(e) => (
                format!("{{\"error\": \"cannot encode the status: {e}\"}}\n"),
                1,
            ),
        };
    }
    if reports.is_empty() {
        return (
            format!("no links: {} has no NAME.env files\n", links_dir.display()),
            1,
        );
    }
    let mut text = String::new();
    for link in &reports {
        text.push_str(&format!("link {}: ", link.link));
        text.push_str(&render_text(&link.report));
    }
    (text, code)
}

/// The human form of the report.
pub fn render_text(report: &Report) -> String {
    let mut text = match (report.pid, report.healthy) {
        (Some(pid), true) => format!("running (pid {pid}), healthy\n"),
        (Some(pid), false) => format!("running (pid {pid}), NOT healthy\n"),
        (None, _) => "not running\n".to_string(),
    };
    for problem in &report.problems {
        text.push_str(&format!("  ! {problem}\n"));
    }
    text.push_str(&format!("  state dir   {}\n", report.state_dir));
    let when = |side: &Option<Side>| match side {
        Some(side) => format!("{} ({}s ago)", side.at, side.seconds_ago),
        None => "never".to_string(),
    };
    if report.running {
        text.push_str(&format!("  heartbeat   {}\n", when(&report.heartbeat)));
        text.push_str(&format!(
            "  mattermost  last heard {}\n",
            when(&report.mattermost)
        ));
        text.push_str(&format!(
            "  opencode    last heard {}\n",
            when(&report.opencode)
        ));
        for server in &report.opencode_servers {
            text.push_str(&format!(
                "  opencode    {} last heard {}\n",
                server.server,
                when(&server.heard)
            ));
        }
    }
    for server in &report.opencode_api {
        text.push_str(&format!(
            "  opencode    {} speaks {}\n",
            server.server, server.api
        ));
    }
    text.push_str(&format!("sessions: {}\n", report.sessions.len()));
    for session in &report.sessions {
        text.push_str(&format!(
            "  {:<8}  {:<6}  thread {}  {}\n",
            session.short_id, session.state, session.thread_id, session.title
        ));
    }
    text
}

/// What is wrong with the running bridge's heartbeat, if anything.
fn heartbeat_problems(beat: Option<&Heartbeat>, now_ms: u64) -> Vec<String> {
    let Some(beat) = beat else {
        return vec!["the running bridge has written no heartbeat yet".to_string()];
    };
    let age = |ms: u64| Duration::from_millis(now_ms.saturating_sub(ms));
    let mut problems = Vec::new();
    if beat.stopped {
        problems.push("the bridge is stopping".to_string());
    }
    if age(beat.written_ms) > HEARTBEAT_STALE_AFTER {
        problems.push(format!(
            "the heartbeat is {}s old: the bridge may be hung",
            age(beat.written_ms).as_secs()
        ));
    }
    for (side, heard_ms) in [
        ("Mattermost", beat.mattermost_heard_ms),
        ("OpenCode", beat.opencode_heard_ms),
    ] {
        if heard_ms == 0 {
            problems.push(format!("nothing heard from {side} yet"));
        } else if age(heard_ms) > SIDE_SILENT_AFTER {
            problems.push(format!(
                "nothing heard from {side} for {}s",
                age(heard_ms).as_secs()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(written_ms: u64, mattermost: u64, opencode: u64) -> Heartbeat {
        Heartbeat {
            pid: 7,
            written_ms,
            mattermost_heard_ms: mattermost,
            opencode_heard_ms: opencode,
            ..Heartbeat::default()
        }
    }

    #[test]
    fn heartbeat_health() {
        let now = 1_000_000_000;
        assert!(
            heartbeat_problems(Some(&beat(now - 5_000, now - 1_000, now - 2_000)), now).is_empty()
        );
        assert_eq!(
            heartbeat_problems(Some(&beat(now - 91_000, now - 1_000, 0)), now),
            [
                "the heartbeat is 91s old: the bridge may be hung",
                "nothing heard from OpenCode yet"
            ]
        );
        assert_eq!(
            heartbeat_problems(Some(&beat(now, now - 121_000, now)), now),
            ["nothing heard from Mattermost for 121s"]
        );
        assert_eq!(
            heartbeat_problems(None, now),
            ["the running bridge has written no heartbeat yet"]
        );
    }

    #[test]
    fn each_server_has_its_last_heard_line() {
        let side = |at_ms: u64, seconds_ago: u64| Side {
            at_ms,
            at: crate::log::utc_timestamp(at_ms),
            seconds_ago,
        };
        let report = Report {
            state_dir: "/state".to_string(),
            running: true,
            pid: Some(7),
            healthy: true,
            problems: Vec::new(),
            heartbeat: Some(side(1_000_000, 1)),
            mattermost: Some(side(1_000_000, 1)),
            opencode: Some(side(1_000_000, 1)),
            opencode_servers: vec![
                ServerHeard {
                    server: "build".to_string(),
                    heard: None,
                },
                ServerHeard {
                    server: "home".to_string(),
                    heard: Some(side(1_000_000, 4)),
                },
            ],
            opencode_api: Vec::new(),
            sessions: Vec::new(),
        };
        let text = render_text(&report);
        assert!(
            text.contains("  opencode    build last heard never\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  opencode    home last heard {} (4s ago)\n",
                crate::log::utc_timestamp(1_000_000)
            )),
            "{text}"
        );
    }
}
