//! Sessions run by another OpenCode process on the same store (issue 13): `opencode run` in a terminal
//! continues a session that has a thread; no live event of it reaches the bridge's server, so the poll
//! notices the session moved and the worker posts the finished turn from the store, once.

use std::time::Duration;

use crate::e2e::{World, completion_lines};
use crate::support::llm::Step;

/// Two polls (20 s apart) and the catch-up: the first poll records the session, the next sees it move.
const TWO_POLLS: Duration = Duration::from_secs(90);

#[test]
fn a_turn_run_in_a_terminal_appears_in_the_thread_once() {
    let mut world = World::started();
    let (session_id, _) = world.new_session("terminal");
    let root = world.wait_root(&session_id);
    world.llm.script(
        "from the terminal",
        vec![vec![Step::Text("answered in the terminal".to_string())]],
    );
    let output = world
        .opencode
        .run_in_terminal(Some(&session_id), "question from the terminal");
    eprintln!(
        "TERMINAL: {output}\nSESSIONS: {}",
        world.opencode.get("/session")
    );
    let answer = |world: &World| {
        world
            .bot_posts_in_thread(&root.id)
            .into_iter()
            .filter(|p| p.message.contains("answered in the terminal"))
            .count()
    };
    let shown = world.mattermost.wait_until(TWO_POLLS, |view| {
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
