//! The smaller pass against a real `opencode serve` answering with the scripted LLM: the same
//! latencies, with OpenCode's own timing in the loop, once per dialect. v1 is the bridge on the server
//! itself; v2 the bridge behind `support::v2proxy` (every v1 route 404, so its probe picks v2). The
//! bench reads the server's own event stream (`/global/event`, `/api/event`) beside the bridge, to
//! know when each event was sent.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opencode_mattermost::opencode::sse::SseParser;
use opencode_mattermost::opencode::{Event, Role, decode_global_event};
use serde_json::{Value, json};

use crate::process::{BridgeProcess, Target};
use crate::report::{Report, Samples};
use crate::support::llm::{FakeLlm, Step};
use crate::support::mattermost::FakeMattermost;
use crate::support::opencode::{OpenCode, opencode_binary};
use crate::support::v2proxy::V2Proxy;
use crate::support::{Dialect, TempDir};
use crate::{DONE_PREFIX, MATTERMOST_LIMIT};

const ROUNDS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

/// What the bench needs of the server's events, in either dialect.
#[derive(Clone, Debug)]
enum Mark {
    /// A session was created; the event as JSON, to find the session's id in.
    Created(String),
    /// The owner's prompt reached the session as a user message.
    User(String),
    Delta(String, String),
    /// The turn ended: `session.idle` in v1, a `step.ended` other than for tool calls in v2.
    Idle(String),
}

/// Events of the real server as the bench saw them arrive.
type Seen = Arc<Mutex<Vec<(Instant, Mark)>>>;

pub fn pass(report: &mut Report) {
    let installed = std::panic::catch_unwind(opencode_binary);
    if installed.is_err() {
        report.note("real OpenCode pass skipped: opencode is not installed (run `make test` once, or set OPENCODE_BIN)".into());
        return;
    }
    for dialect in [Dialect::V1, Dialect::V2] {
        pass_in(report, dialect);
    }
}

fn pass_in(report: &mut Report, dialect: Dialect) {
    let api = dialect.name();
    println!("real OpenCode pass ({api}): {ROUNDS} sessions");
    let llm = FakeLlm::start();
    let reply: String = (0..6)
        .map(|i| format!("Sentence {i} of a real answer, streamed by the scripted model. "))
        .collect();
    let reply = reply.trim_end().to_string();
    llm.script("bench question", vec![vec![Step::Text(reply.clone())]]);
    let opencode = OpenCode::start(&llm, json!({}));
    let proxy = (dialect == Dialect::V2).then(|| V2Proxy::start(&opencode.url()));
    let bridge_url = proxy.as_ref().map_or_else(|| opencode.url(), V2Proxy::url);
    let seen = listen(&opencode.url(), dialect);
    // OpenCode 1.18 attaches a new stream shortly after `server.connected`.
    std::thread::sleep(Duration::from_millis(600));

    let mattermost = FakeMattermost::start();
    mattermost.set_rate_limit(Some(MATTERMOST_LIMIT));
    let (bot, owner) = (mattermost.bot(), mattermost.owner());
    let dm = mattermost.dm_channel(&bot.id, &owner.id);
    let state = TempDir::new("bench-real");
    let bridge = BridgeProcess::spawn(&Target {
        mattermost_url: &mattermost.url(),
        token: &bot.token,
        owner: &owner.username,
        opencode_url: &bridge_url,
        state_dir: state.path(),
    });
    let ready = bridge.wait_ready(WAIT);
    let ready_ms = (ready - bridge.spawned_at).as_secs_f64() * 1000.0;
    // The bridge is ready at `server.connected`, but OpenCode may drop an event of the next
    // moments; the bridge's poll 0.5 s later finds such a session. Measure the steady state.
    std::thread::sleep(Duration::from_millis(600));

    let mut thread_created = Samples::default();
    let mut routing = Samples::default();
    let mut first_text = Samples::default();
    let mut final_from_chunk = Samples::default();
    let mut final_from_idle = Samples::default();
    let mut calls_per_reply = Vec::new();
    for index in 0..ROUNDS {
        let round_started = Instant::now();
        let created =
            opencode.create_session(opencode.project_dir(), Some(&format!("bench {index}")));
        let session_id = created["id"].as_str().unwrap_or_default().to_string();
        let created_at = wait_event(
            &seen,
            |e| matches!(e, Mark::Created(raw) if raw.contains(&session_id)),
        );
        let (root_id, root_at) = mattermost
            .wait_until(WAIT, |view| {
                view.post_versions()
                    .iter()
                    .find(|v| v.props["opencode_session_id"] == session_id.as_str())
                    .map(|v| (v.post_id.clone(), v.at))
            })
            .unwrap_or_else(|| panic!("real pass: no thread for {session_id}"));
        if let Some(created_at) = created_at {
            thread_created.push(root_at.saturating_duration_since(created_at));
        }

        let posted_at = Instant::now();
        mattermost
            .post_as(&owner.id, &dm, &root_id, &format!("bench question {index}"))
            .unwrap_or_else(|e| panic!("owner post refused: {e:?}"));
        let user_at = wait_event(&seen, |e| matches!(e, Mark::User(s) if *s == session_id));
        if let Some(at) = user_at {
            routing.push(at.saturating_duration_since(posted_at));
        }
        let done = mattermost.wait_until(WAIT, |view| {
            view.post_versions()
                .iter()
                .find(|v| v.root_id == root_id && v.message.starts_with(DONE_PREFIX))
                .map(|v| v.at)
        });
        if done.is_none() {
            // The rest would most likely wait as long again for nothing.
            report.note(format!(
                "real pass ({api}): reply {index} did not complete within {WAIT:?}; the pass stops"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let events = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let deltas: Vec<(Instant, String)> = events
            .iter()
            .filter_map(|(at, e)| match e {
                Mark::Delta(s, delta) if *s == session_id => Some((*at, delta.clone())),
                _ => None,
            })
            .collect();
        let idle_at = events
            .iter()
            .find_map(|(at, e)| matches!(e, Mark::Idle(s) if *s == session_id).then_some(*at));
        let versions = mattermost.post_versions();
        let bot_versions: Vec<_> = versions
            .iter()
            .filter(|v| v.root_id == root_id && v.user_id == bot.id && v.at >= posted_at)
            .collect();
        let showing = |text: &str| {
            bot_versions
                .iter()
                .find(|v| v.message.contains(text))
                .map(|v| v.at)
        };
        if let (Some((first_at, first)), Some(shown)) = (
            deltas.first(),
            deltas.first().and_then(|(_, d)| showing(d.trim())),
        ) {
            let _ = first;
            first_text.push(shown.saturating_duration_since(*first_at));
        }
        if let Some(final_at) = showing(&reply) {
            if let Some((last_at, _)) = deltas.last() {
                final_from_chunk.push(final_at.saturating_duration_since(*last_at));
            }
            if let Some(idle_at) = idle_at {
                final_from_idle.push(final_at.saturating_duration_since(idle_at));
            }
        }
        let calls = mattermost
            .requests()
            .iter()
            .filter(|r| {
                r.at >= posted_at && r.user_id.as_deref() == Some(&bot.id) && r.status != 101
            })
            .count();
        calls_per_reply.push(calls);
        let spent = round_started.elapsed();
        if spent < Duration::from_millis(600) {
            std::thread::sleep(Duration::from_millis(600) - spent);
        }
    }
    let rss = bridge.rss_kib();
    let threads = bridge.threads();
    let limited = mattermost
        .requests()
        .iter()
        .filter(|r| r.status == 429)
        .count();
    bridge.stop();
    drop(proxy);

    let figure = |name: &str| format!("real OpenCode {api}: {name}");
    let turn_end = match dialect {
        Dialect::V1 => "session.idle",
        Dialect::V2 => "last step.ended",
    };
    report.row(
        &figure("start to ready"),
        format!("{ready_ms:.1} ms (one start)"),
        "≤ 50 ms",
        Some(ready_ms <= 50.0),
        json!({"ms": ready_ms}),
    );
    report.latency(
        &figure("thread-creation delay (session.created seen → root post accepted)"),
        &thread_created,
        "p99 ≤ 100 ms",
        (99.0, 100.0),
    );
    report.latency(
        &figure("owner's post → OpenCode's user-message event (includes OpenCode's own handling)"),
        &routing,
        "reported (fake pass: p99 ≤ 20 ms)",
        (99.0, f64::INFINITY),
    );
    report.latency(
        &figure("first visible text (first delta seen → shown)"),
        &first_text,
        "p95 ≤ 100 ms",
        (95.0, 100.0),
    );
    report.latency(
        &figure("final text (last delta seen → complete text shown)"),
        &final_from_chunk,
        "p99 ≤ 50 ms",
        (99.0, 50.0),
    );
    report.latency(
        &figure(&format!(
            "final text ({turn_end} seen → complete text shown)"
        )),
        &final_from_idle,
        "reported",
        (99.0, f64::INFINITY),
    );
    let max_calls = calls_per_reply.iter().copied().max().unwrap_or(0);
    report.row(
        &figure("Mattermost API calls per reply (~370 characters, streamed by OpenCode)"),
        format!("max {max_calls} over {} replies; {limited} × 429; RSS {:.1} MiB, {threads} threads", calls_per_reply.len(), rss as f64 / 1024.0),
        "reported",
        None,
        json!({"calls": calls_per_reply, "rate_limited": limited, "rss_kib": rss, "threads": threads}),
    );
}

/// Reads the server's event stream on a thread, noting when each event arrived.
fn listen(url: &str, dialect: Dialect) -> Seen {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let url = match dialect {
        Dialect::V1 => format!("{url}/global/event"),
        Dialect::V2 => format!("{url}/api/event"),
    };
    let sink = Arc::clone(&seen);
    std::thread::Builder::new()
        .name("bench-events".into())
        .spawn(move || {
            let Ok(response) = ureq::get(&url).call() else {
                return;
            };
            let mut reader = response.into_body().into_reader();
            let mut parser = SseParser::new(8 << 20);
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    return;
                }
                let at = Instant::now();
                for sse in parser.feed(&buffer[..n]) {
                    let mark = match dialect {
                        Dialect::V1 => v1_mark(&sse.data),
                        Dialect::V2 => v2_mark(&sse.data),
                    };
                    if let Some(mark) = mark {
                        sink.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((at, mark));
                    }
                }
            }
        })
        .expect("spawn the event reader");
    seen
}

fn v1_mark(data: &str) -> Option<Mark> {
    match decode_global_event(data).ok()??.event {
        Event::SessionCreated(info) => Some(Mark::Created(info.id)),
        Event::MessageUpdated {
            session_id,
            message,
        } if message.role == Role::User => Some(Mark::User(session_id)),
        Event::PartDelta {
            session_id, delta, ..
        } => Some(Mark::Delta(session_id, delta)),
        Event::SessionIdle { session_id } => Some(Mark::Idle(session_id)),
        _ => None,
    }
}

/// The v2 events the bench needs, read as JSON (the fixtures in tests/fixtures/v2 show them).
fn v2_mark(data: &str) -> Option<Mark> {
    let event: Value = serde_json::from_str(data).ok()?;
    let body = &event["data"];
    let session = || body["sessionID"].as_str().unwrap_or_default().to_string();
    match event["type"].as_str()? {
        "session.created" => Some(Mark::Created(data.to_string())),
        "session.next.prompted" => Some(Mark::User(session())),
        "session.next.text.delta" => Some(Mark::Delta(
            session(),
            body["delta"].as_str().unwrap_or_default().to_string(),
        )),
        "session.next.step.ended" if body["finish"] != "tool-calls" => Some(Mark::Idle(session())),
        "session.next.step.failed" => Some(Mark::Idle(session())),
        _ => None,
    }
}

/// When the first event matching `wanted` arrived, waiting up to `WAIT` for it.
fn wait_event(seen: &Seen, wanted: impl Fn(&Mark) -> bool) -> Option<Instant> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let found = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, e)| wanted(e))
            .map(|(at, _)| *at);
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}
