//! The router never waits on a server: a slow look-up (a post, the DM's post list) holds up only
//! itself, not the other sessions' streams or new threads.

use std::time::{Duration, Instant};

use crate::e2e::{World, text, wait_for};
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
    // The calls look-ups make, and no other: reading one post, and listing the DM's posts.
    world
        .mattermost
        .delay_matching("GET", "/api/v4/posts/", SLOW);
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
    let answered_after = sent.elapsed();
    assert!(
        answered_after < SLOW / 2,
        "the streaming answer took {answered_after:?} while a look-up was slow"
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
