//! Sessions run by another OpenCode process on the same store (issue 13): `opencode run` in a terminal
//! creates or continues a session; no live event of it reaches the bridge's server, so the light poll
//! (every 4 s) finds it or notices it moved, and the worker posts each finished turn from the store,
//! its prompt quoted, once.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::e2e::{World, completion_lines};
use crate::support::llm::Step;
use crate::support::mattermost::Post;

/// The goal for a terminal session's thread and for each finished turn to appear (a light
/// poll every 4 s); tests check correctness only, so they wait longer and print the figures.
const PATIENCE: Duration = crate::support::SOON;

#[test]
fn a_turn_run_in_a_terminal_appears_in_the_thread_once() {
    let mut world = World::started();
    let (session_id, _) = world.new_session("terminal");
    let root = world.wait_root(&session_id);
    world.llm.script(
        "from the terminal",
        vec![vec![Step::Text("answered in the terminal".to_string())]],
    );
    world
        .opencode
        .run_in_terminal(Some(&session_id), "question from the terminal");
    let answer = |world: &World| {
        world
            .bot_posts_in_thread(&root.id)
            .into_iter()
            .filter(|p| p.message.contains("answered in the terminal"))
            .count()
    };
    // The light poll sees the session move with no event here, and the catch-up posts the turn.
    let shown = world.mattermost.wait_until(PATIENCE, |view| {
        let bot = world.mattermost.bot().id;
        view.thread(&root.id)
            .into_iter()
            .find(|p| p.user_id == bot && p.message.contains("answered in the terminal"))
    });
    assert!(
        shown.is_some(),
        "the terminal's answer never reached the thread"
    );
    crate::e2e::wait_for("the completion line", || {
        !completion_lines(&world, &root).is_empty()
    });
    assert_eq!(answer(&world), 1);
    // A reply runs it on the bridge's server, after a note that the terminal will not show it.
    world.llm.script(
        "from the thread",
        vec![vec![Step::Text("answered in the thread".to_string())]],
    );
    world.owner_says(&root.id, "question from the thread");
    world.wait_bot_post(&root.id, "the reply's answer", |p| {
        p.message.contains("answered in the thread")
    });
    let notes = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .filter(|p| p.message.contains("the terminal will not show it"))
        .count();
    assert_eq!(notes, 1, "the terminal note, once");
    // A restart does not post it again.
    world.stop_bridge();
    world.start_bridge();
    let marker = world.owner_says(&root.id, "!status");
    world.wait_bot_post(&root.id, "answering !status", |p| {
        p.create_at >= marker.create_at
    });
    assert_eq!(answer(&world), 1, "reposted after the restart");
}

/// The bot posts of the thread whose message contains `needle`.
fn count(world: &World, root: &Post, needle: &str) -> usize {
    world
        .bot_posts_in_thread(&root.id)
        .iter()
        .filter(|p| p.message.contains(needle))
        .count()
}

/// Waits at most `within` for a bot post in the thread that contains `needle`.
fn within(world: &World, root: &Post, within: Duration, needle: &str) -> Post {
    let bot = world.mattermost.bot().id;
    world
        .mattermost
        .wait_until(within, |view| {
            view.thread(&root.id)
                .into_iter()
                .find(|p| p.user_id == bot && p.message.contains(needle))
        })
        .unwrap_or_else(|| {
            panic!(
                "no post with {needle:?} within {within:?}: {:#?}",
                world.bot_posts_in_thread(&root.id)
            )
        })
}

#[test]
fn a_session_created_in_a_terminal_gets_its_thread_and_every_turn_once() {
    let mut world = World::started();
    let prompt = "Terminal question: list the files";
    world.llm.script(
        prompt,
        vec![
            vec![Step::ToolCall {
                name: "bash".into(),
                arguments: json!({"command": "echo from-the-tool", "description": "list"}),
            }],
            vec![Step::Text("The terminal answer is **ready**.".into())],
        ],
    );
    world.opencode.run_in_terminal(None, prompt);
    let sessions = world.opencode.get("/session");
    let session = &sessions[0];
    let id = session["id"]
        .as_str()
        .expect("the terminal's session is listed");
    let created_ms = session["time"]["created"].as_i64().expect("created time");
    let root = world.wait_root(id);
    eprintln!(
        "METRIC terminal_thread_after_creation_ms={}",
        root.create_at - created_ms
    );
    // The turn that created the session: prompt quoted, answer with its tool line, completion line.
    let answer = within(&world, &root, PATIENCE, "**ready**");
    let done = within(&world, &root, PATIENCE, "✅ Done");
    // `opencode run` stores its argument in double quotes.
    let quote = format!("> \"{prompt}\"");
    assert!(answer.message.contains(&quote), "{}", answer.message);
    assert!(answer.message.contains("🔧 **bash**"), "{}", answer.message);
    assert!(
        answer.message.find(&quote) < answer.message.find("🔧 **bash**")
            && answer.message.find("🔧 **bash**") < answer.message.find("**ready**"),
        "{}",
        answer.message
    );
    assert!(done.create_at >= answer.create_at);
    assert!(
        done.message.contains("run in a terminal"),
        "{}",
        done.message
    );
    // The turn read from the store confirmed it: the root says so.
    let dm = world.dm.clone();
    world
        .mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.id == root.id && p.message.contains("Runs in a terminal"))
        })
        .expect("the root says the session runs in a terminal");

    // A second turn in the terminal appears too, after the first.
    let second = "Terminal follow-up: and now?";
    world.llm.script(
        second,
        vec![vec![Step::Text("Second terminal answer.".into())]],
    );
    world.opencode.run_in_terminal(Some(id), second);
    let finished = Instant::now();
    let answer2 = within(&world, &root, PATIENCE, "Second terminal answer.");
    eprintln!(
        "METRIC terminal_turn_after_finish_ms={}",
        finished.elapsed().as_millis()
    );
    assert!(
        answer2.message.contains(&format!("> \"{second}\"")),
        "{}",
        answer2.message
    );
    crate::e2e::wait_for("the second completion line", || {
        completion_lines(&world, &root).len() == 2
    });

    // A reply runs on the bridge's server; the thread says once that the terminal will not show it.
    world.llm.script(
        "From the thread",
        vec![vec![Step::Text("Thread answer one.".into())]],
    );
    world.owner_says(&root.id, "From the thread, first");
    within(&world, &root, crate::support::SOON, "Thread answer one.");
    world.llm.script(
        "Again from the thread",
        vec![vec![Step::Text("Thread answer two.".into())]],
    );
    world.owner_says(&root.id, "Again from the thread");
    within(&world, &root, crate::support::SOON, "Thread answer two.");
    crate::e2e::wait_for("four completion lines", || {
        completion_lines(&world, &root).len() >= 4
    });
    assert_eq!(count(&world, &root, "the terminal will not show it"), 1);

    // A terminal turn while the bridge is down appears once after its restart; nothing else is
    // posted again, and the note is not said twice.
    world.stop_bridge();
    let third = "Terminal while the bridge is away";
    world.llm.script(
        third,
        vec![vec![Step::Text("Third terminal answer.".into())]],
    );
    world.opencode.run_in_terminal(Some(id), third);
    world.start_bridge();
    within(
        &world,
        &root,
        crate::support::SOON,
        "Third terminal answer.",
    );
    world.llm.script(
        "After the restart",
        vec![vec![Step::Text("Thread answer three.".into())]],
    );
    world.owner_says(&root.id, "After the restart");
    within(&world, &root, crate::support::SOON, "Thread answer three.");
    crate::e2e::wait_for("six completion lines", || {
        completion_lines(&world, &root).len() >= 6
    });
    for (needle, expected) in [
        ("**ready**", 1),
        ("Second terminal answer.", 1),
        ("Third terminal answer.", 1),
        ("Thread answer one.", 1),
        ("Thread answer two.", 1),
        ("Thread answer three.", 1),
        ("In the terminal", 3),
        ("the terminal will not show it", 1),
    ] {
        assert_eq!(
            count(&world, &root, needle),
            expected,
            "{needle}: {:#?}",
            world.bot_posts_in_thread(&root.id)
        );
    }
    assert_eq!(completion_lines(&world, &root).len(), 6);
}

#[test]
fn a_terminal_session_created_while_the_bridge_is_down_gets_its_thread_and_first_turn_once() {
    let mut world = World::started();
    world.stop_bridge();
    let prompt = "Terminal question while the bridge is down";
    world.llm.script(
        prompt,
        vec![vec![Step::Text("Answered while away.".into())]],
    );
    world.opencode.run_in_terminal(None, prompt);
    world.start_bridge();
    let sessions = world.opencode.get("/session");
    let id = sessions[0]["id"].as_str().expect("the terminal's session");
    let root = world.wait_root(id);
    within(&world, &root, crate::support::SOON, "Answered while away.");
    crate::e2e::wait_for("its completion line", || {
        completion_lines(&world, &root).len() == 1
    });
    // A restart posts nothing again.
    world.stop_bridge();
    world.start_bridge();
    let marker = world.owner_says(&root.id, "!status");
    world.wait_bot_post(&root.id, "answering !status", |p| {
        p.create_at >= marker.create_at
    });
    assert_eq!(count(&world, &root, "Answered while away."), 1);
    assert_eq!(completion_lines(&world, &root).len(), 1);
}
