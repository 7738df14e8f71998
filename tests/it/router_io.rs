//! The router never waits on a server: a slow look-up (a post, the DM's post list) holds up only
//! itself, not the other sessions' streams or new threads.

use std::time::{Duration, Instant};

use crate::e2e::{World, text, wait_for, wait_until_llm_saw};
use crate::support::llm::Step;

/// Far longer than any answer in this test takes, far shorter than the client's 30 s timeout.
const SLOW: Duration = Duration::from_secs(20);

#[test]
fn a_slow_look_up_holds_up_neither_a_streaming_session_nor_a_new_thread() {
    let world = World::started();
    let (streaming, _) = world.new_session("Streaming");
    let root = world.wait_root(&streaming);
    world.llm.script(
        "stream please",
        vec![vec![
            text("part one. "),
            Step::Pause(Duration::from_millis(700)),
            text("part two. "),
            Step::Pause(Duration::from_millis(700)),
            text("part three."),
        ]],
    );
    // The calls look-ups make, and no other: reading one post, and listing the DM's posts. (A
    // worker reads its thread, `/posts/{id}/thread`, at its first reply: not a look-up.)
    world
        .mattermost
        .delay_matching("GET", "/api/v4/posts/*", SLOW);
    world
        .mattermost
        .delay_matching("GET", &format!("/api/v4/channels/{}/posts", world.dm), SLOW);

    let sent = Instant::now();
    world.owner_says(&root.id, "stream please");
    world.wait_bot_post(&root.id, "with the first part", |p| {
        p.message.contains("part one")
    });
    // A reply in a thread no session owns: the bridge reads its root to learn whose it is.
    let stray = world.owner_says("", "a note to self");
    world.owner_says(&stray.id, "does this go anywhere?");
    wait_for("the thread root's look-up to be held up", || {
        world.mattermost.delayed_by_rules() >= 1
    });
    let held = Instant::now();

    let created = Instant::now();
    let (second, _) = world.new_session("Second");
    world.wait_root(&second);
    let thread_after = created.elapsed();
    assert!(
        thread_after < Duration::from_secs(1),
        "the second session's thread took {thread_after:?} while a look-up was slow"
    );

    world.wait_bot_post(&root.id, "with the completion line", |p| {
        p.message.starts_with("✅ Done")
    });
    // A router waiting on the look-up would hold the answer's events until the look-up returns;
    // the answer finishes while it is still held up (a loaded machine may make it slow, not late).
    assert!(
        held.elapsed() < SLOW,
        "the streaming answer took {:?}, {:?} after a look-up was held up for {SLOW:?}",
        sent.elapsed(),
        held.elapsed()
    );
    let answer = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .find(|p| p.message.contains("part one"))
        .expect("answer post");
    assert!(
        answer.message.contains("part one. part two. part three."),
        "{}",
        answer.message
    );
}

/// `state.json` as the bridge last wrote it.
fn on_disk(world: &World) -> serde_json::Value {
    std::fs::read(world.state.path().join("state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The thread's notices that the session is gone: the worker's, when a prompt finds it deleted, and
/// the end notice.
fn end_notices(world: &World, root_id: &str) -> Vec<String> {
    world
        .bot_posts_in_thread(root_id)
        .into_iter()
        .map(|p| p.message)
        .filter(|m| m.contains("no longer exists") || m.contains("This session ended after"))
        .collect()
}

#[test]
fn a_session_deleted_while_the_bridge_was_away_is_announced_once() {
    let mut world = World::started();
    let (id, _) = world.new_session("Short lived");
    let root = world.wait_root(&id);
    world.stop_bridge();
    world
        .opencode
        .delete_session(&id, world.opencode.project_dir());
    // Caught up after the restart, the prompt finds the session gone before the poll does.
    world.owner_says(&root.id, "are you still there?");
    world.start_bridge();
    world.wait_bot_post(&root.id, "saying the session is gone", |p| {
        p.message.contains("no longer exists") || p.message.contains("This session ended after")
    });
    wait_for("the thread to be recorded as ended", || {
        on_disk(&world)["servers"]
            .as_object()
            .into_iter()
            .flat_map(|servers| servers.values())
            .any(|server| server["sessions"][&id]["ended_ms"].is_u64())
    });
    // Stopping waits for the workers: a second notice on its way is posted by then.
    world.stop_bridge();
    let notices = end_notices(&world, &root.id);
    assert_eq!(notices.len(), 1, "{notices:#?}");
    // The prompt that found the session gone is the one "not sent", not also a queued one.
    assert!(
        !(notices[0].contains("no longer exists") && notices[0].contains("queued message")),
        "{notices:#?}"
    );
    assert!(
        world.prompts_seen_by_llm().is_empty(),
        "a prompt went to a deleted session"
    );
}

#[test]
fn the_first_prompt_of_new_survives_a_crash_before_its_thread_exists() {
    let mut world = World::new();
    let mut bridge = world.spawn_binary();
    bridge.wait_for_line("ready");
    let dir = world.opencode.new_project_dir("fresh");
    // The thread's root is held up, so the first prompt is still waiting when the bridge dies.
    world
        .mattermost
        .delay_matching("POST", "/api/v4/posts", SLOW);
    let command = world
        .mattermost
        .post_as(
            &world.mattermost.owner().id,
            &world.dm,
            "",
            &format!(
                "!new {} Crash test\nfirst words after the crash",
                dir.display()
            ),
        )
        .expect("post accepted");
    wait_for("the new session's root to be under way", || {
        world.mattermost.delayed_by_rules() >= 1
    });
    wait_for("the first prompt to be owed on disk", || {
        on_disk(&world)["servers"]
            .as_object()
            .into_iter()
            .flat_map(|servers| servers.values())
            .any(|server| server["pending_prompts"][&command.id].is_object())
    });
    bridge.kill();
    world.mattermost.clear_delays();

    world.start_bridge();
    wait_until_llm_saw(&world, "first words after the crash");
    let sent = world
        .prompts_seen_by_llm()
        .iter()
        .filter(|p| p.contains("first words after the crash"))
        .count();
    assert_eq!(sent, 1);
}

#[test]
fn the_catch_up_holds_one_page_at_a_time_and_can_stop_early() {
    use crate::support::mattermost::FakeMattermost;
    use opencode_mattermost::config::Secret;
    use opencode_mattermost::mattermost::rest::MattermostClient;

    let mattermost = FakeMattermost::start();
    let client = MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.bot().token));
    let owner = mattermost.owner().id;
    let channel = mattermost.dm_channel(&mattermost.bot().id, &owner);
    let anchor = mattermost
        .post_as(&owner, &channel, "", "before the gap")
        .unwrap();
    for i in 0..450 {
        mattermost
            .post_as(&owner, &channel, "", &format!("post {i}"))
            .unwrap();
    }
    let mut pages = Vec::new();
    client
        .posts_after_pages(&channel, &anchor.id, 200, |page| {
            pages.push(page.iter().map(|p| p.message.clone()).collect::<Vec<_>>());
            true
        })
        .expect("catch-up");
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![200, 200, 50]);
    assert_eq!(pages[0][0], "post 0");
    assert_eq!(pages[2][49], "post 449");

    let mut seen = 0;
    client
        .posts_after_pages(&channel, &anchor.id, 200, |_| {
            seen += 1;
            false
        })
        .expect("catch-up");
    assert_eq!(seen, 1, "paging went on after the caller stopped");
}
