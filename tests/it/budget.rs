//! The shared Mattermost budget under a tight rate limit (issue 14): several sessions stream at once
//! through the fake OpenCode while the fake Mattermost allows only a few requests a second. What
//! the owner waits for goes first: every reply still ends exact and complete, a permission post
//! goes ahead of the streaming replies' intermediate edits, and a finished text does not wait
//! behind other sessions' intermediate edits. Correctness only: the figures are `make bench`'s.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::TempDir;
use crate::support::bridge::Bridge;
use crate::support::fake_opencode::{FakeOpenCode, Pace, ReplyTimes};
use crate::support::mattermost::{FakeMattermost, PostVersion, RateLimit};

const WAIT: Duration = Duration::from_secs(90);
const DONE_PREFIX: &str = "✅ Done";
/// Edits already granted a token when a more urgent call joins the line are still on the wire:
/// at a few requests a second, at most one or two of them.
const IN_FLIGHT: usize = 2;

/// Fields drop in order: the bridge stops before the fakes go.
struct World {
    _bridge: Bridge,
    mattermost: FakeMattermost,
    opencode: FakeOpenCode,
    bot_id: String,
    _state: TempDir,
}

impl World {
    fn start(limit: RateLimit) -> World {
        let mattermost = FakeMattermost::start();
        let opencode = FakeOpenCode::start();
        let state = TempDir::new("budget");
        let bridge = Bridge::start(&mattermost, &opencode.url(), state.path());
        mattermost.set_rate_limit(Some(limit));
        World {
            bot_id: mattermost.bot().id,
            mattermost,
            opencode,
            _bridge: bridge,
            _state: state,
        }
    }

    /// `n` new sessions, each with its thread: (session id, root post id).
    fn sessions(&self, n: usize) -> Vec<(String, String)> {
        let ids: Vec<String> = (0..n)
            .map(|i| self.opencode.create_session(&format!("budget {i}")).0)
            .collect();
        ids.into_iter()
            .map(|id| {
                let root = self
                    .mattermost
                    .wait_until(WAIT, |view| {
                        view.post_versions()
                            .iter()
                            .find(|v| v.props["opencode_session_id"] == id.as_str())
                            .map(|v| v.post_id.clone())
                    })
                    .unwrap_or_else(|| panic!("no thread root for {id} within {WAIT:?}"));
                (id, root)
            })
            .collect()
    }

    /// Waits until every thread holds its completion line.
    fn wait_all_done(&self, roots: &[&str]) {
        let bot = self.bot_id.clone();
        let done = self.mattermost.wait_until(WAIT, |view| {
            roots
                .iter()
                .all(|root| {
                    view.thread(root)
                        .iter()
                        .any(|p| p.user_id == bot && p.message.starts_with(DONE_PREFIX))
                })
                .then_some(())
        });
        assert!(done.is_some(), "not every reply completed within {WAIT:?}");
    }

    /// The bot's posts and edits in `root`'s thread, oldest first.
    fn versions_in(&self, root: &str) -> Vec<PostVersion> {
        self.mattermost
            .post_versions()
            .into_iter()
            .filter(|v| v.root_id == root && v.user_id == self.bot_id)
            .collect()
    }

    /// The bot's REST calls answered in `(from, to)`, 429s included.
    fn calls_between(&self, from: Instant, to: Instant) -> usize {
        self.mattermost
            .requests()
            .iter()
            .filter(|r| r.user_id.as_deref() == Some(self.bot_id.as_str()) && r.status != 101)
            .filter(|r| r.at > from && r.at < to)
            .count()
    }

    /// Edits of streaming replies (not their first post, not their final text) accepted in
    /// `(from, to)`, over the threads of `replies`.
    fn intermediate_edits(&self, replies: &[(&str, &str)], from: Instant, to: Instant) -> usize {
        replies
            .iter()
            .map(|(root, text)| {
                let versions = self.versions_in(root);
                versions
                    .iter()
                    .enumerate()
                    .filter(|(i, v)| {
                        let edit = versions[..*i].iter().any(|e| e.post_id == v.post_id);
                        edit && v.at > from && v.at < to && v.message != *text
                    })
                    .count()
            })
            .sum()
    }
}

/// A reply unique to its session: every sentence starts with the session's marker.
fn reply_text(session: usize, chars: usize) -> String {
    let mut text = String::new();
    let mut n = 0;
    while text.chars().count() < chars {
        text.push_str(&format!(
            "[B{session:02}] budget sentence {n} of the reply. "
        ));
        n += 1;
    }
    let mut text: String = text.chars().take(chars - 1).collect();
    text.push('.');
    text
}

/// 8 characters every 20 ms, as the benchmark streams.
const PACE: Pace = Pace {
    delta_chars: 8,
    interval: Duration::from_millis(20),
    finish_gap: Duration::from_millis(120),
};

fn assert_exact_and_complete(world: &World, sessions: &[(String, String)], texts: &[String]) {
    for ((_, root), text) in sessions.iter().zip(texts) {
        let thread = world.mattermost.thread(root);
        let bot: Vec<_> = thread
            .iter()
            .filter(|p| p.user_id == world.bot_id)
            .collect();
        assert!(
            bot.iter().any(|p| p.message == *text),
            "the thread {root} does not end with its exact text: {:?}",
            bot.iter().map(|p| &p.message).collect::<Vec<_>>()
        );
        let done = bot
            .iter()
            .filter(|p| p.message.starts_with(DONE_PREFIX))
            .count();
        assert_eq!(done, 1, "completion lines in {root}");
        let marker = &text[..5];
        for post in &thread {
            for (other, other_text) in texts.iter().enumerate() {
                if other_text != text {
                    assert!(
                        !post.message.contains(&other_text[..5]),
                        "{marker}'s thread shows session {other}'s text"
                    );
                }
            }
        }
    }
}

#[test]
fn every_reply_ends_exact_and_complete_under_a_tight_budget() {
    let world = World::start(RateLimit {
        per_second: 5,
        burst: 10,
    });
    let sessions = world.sessions(6);
    let texts: Vec<String> = (0..sessions.len()).map(|i| reply_text(i, 800)).collect();
    let replies: Vec<(&str, &str)> = sessions
        .iter()
        .zip(&texts)
        .map(|((id, _), text)| (id.as_str(), text.as_str()))
        .collect();
    world.opencode.reply(&replies, PACE);
    let roots: Vec<&str> = sessions.iter().map(|(_, root)| root.as_str()).collect();
    world.wait_all_done(&roots);
    assert_exact_and_complete(&world, &sessions, &texts);
    assert!(
        world.mattermost.duplicated_pending_ids().is_empty(),
        "a post was created twice"
    );
}

#[test]
fn a_permission_post_goes_ahead_of_intermediate_edits() {
    let world = World::start(RateLimit {
        per_second: 2,
        burst: 4,
    });
    let sessions = world.sessions(13);
    let (asking, asking_root) = sessions[0].clone();
    let streaming = &sessions[1..];
    let texts: Vec<String> = (1..=streaming.len()).map(|i| reply_text(i, 1600)).collect();
    let replies: Vec<(&str, &str)> = streaming
        .iter()
        .zip(&texts)
        .map(|((id, _), text)| (id.as_str(), text.as_str()))
        .collect();
    let roots: Vec<&str> = streaming.iter().map(|(_, root)| root.as_str()).collect();
    let asked_at = std::thread::scope(|scope| {
        let streams = scope.spawn(|| world.opencode.reply(&replies, PACE));
        // Mid-stream: once every reply has its first post, edits compete for the budget.
        let started = world.mattermost.wait_until(WAIT, |view| {
            roots
                .iter()
                .all(|root| view.thread(root).iter().any(|p| p.user_id == world.bot_id))
                .then_some(())
        });
        assert!(
            started.is_some(),
            "the replies did not start within {WAIT:?}"
        );
        let asked_at = Instant::now();
        let event = json!({
            "directory": world.opencode.directory(),
            "payload": {"id": "evt_budget_permission", "type": "permission.asked", "properties": {
                "id": "per_budget_1", "sessionID": asking, "permission": "bash",
                "patterns": ["echo hi"], "metadata": {"command": "echo hi"},
                "always": ["echo *"],
            }},
        });
        world.opencode.emit_raw(&format!("data: {event}\n\n"));
        let _: Vec<ReplyTimes> = streams.join().expect("the fake OpenCode's streams");
        asked_at
    });
    let posted_at = world
        .mattermost
        .wait_until(WAIT, |view| {
            view.post_versions()
                .iter()
                .find(|v| v.root_id == asking_root && v.message.contains("echo hi"))
                .map(|v| v.at)
        })
        .expect("the permission request was not posted");
    world.wait_all_done(&roots);
    let texts_by_root: Vec<(&str, &str)> = roots
        .iter()
        .copied()
        .zip(texts.iter().map(String::as_str))
        .collect();
    // Whatever else went out meanwhile had its token before the request joined the line.
    let overtaken = world.intermediate_edits(&texts_by_root, asked_at, posted_at);
    let went_ahead = world.calls_between(asked_at, posted_at);
    assert!(
        overtaken <= IN_FLIGHT && went_ahead <= IN_FLIGHT,
        "{went_ahead} calls ({overtaken} intermediate edits) went out while the permission request waited"
    );
    assert_exact_and_complete(&world, streaming, &texts);
}

#[test]
fn a_finished_text_does_not_wait_behind_other_sessions_edits() {
    let world = World::start(RateLimit {
        per_second: 2,
        burst: 8,
    });
    let sessions = world.sessions(6);
    // The first session's answer is short: it ends while the others still stream.
    let texts: Vec<String> = (0..sessions.len())
        .map(|i| reply_text(i, if i == 0 { 160 } else { 1600 }))
        .collect();
    let replies: Vec<(&str, &str)> = sessions
        .iter()
        .zip(&texts)
        .map(|((id, _), text)| (id.as_str(), text.as_str()))
        .collect();
    let times = world.opencode.reply(&replies, PACE);
    let roots: Vec<&str> = sessions.iter().map(|(_, root)| root.as_str()).collect();
    world.wait_all_done(&roots);
    assert_exact_and_complete(&world, &sessions, &texts);
    let short = &times[0];
    let final_at = world
        .versions_in(roots[0])
        .iter()
        .find(|v| v.message == texts[0])
        .map(|v| v.at)
        .expect("the short reply's final text");
    let others: Vec<(&str, &str)> = roots[1..]
        .iter()
        .copied()
        .zip(texts[1..].iter().map(String::as_str))
        .collect();
    let ahead = world.intermediate_edits(&others, short.last_delta_at, final_at);
    assert!(
        ahead <= IN_FLIGHT,
        "{ahead} intermediate edits of other sessions went out while a finished text waited"
    );
}
