//! Attention (issue 15): posts that need the owner mention them when created, so Mattermost
//! notifies their phone even in a thread they do not follow; short turns do not.

use opencode_mattermost::config::Notify;
use serde_json::json;

use crate::e2e::{World, completion_lines, text, wait_for};
use crate::support::bridge::{Bridge, config};
use crate::support::llm::{FakeLlm, Step};
use crate::support::mattermost::Post;
use crate::support::opencode::OpenCode;

fn world_with_notify(opencode_config: serde_json::Value, notify: Notify) -> World {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start(&llm, opencode_config);
    let mut world = World::with(llm, opencode);
    restart_with(&mut world, notify);
    world
}

/// (Re)starts the bridge with `notify`; the thread records carry over.
fn restart_with(world: &mut World, notify: Notify) {
    if world.bridge.is_some() {
        world.stop_bridge();
    }
    let mut settings = config(
        &world.mattermost,
        &world.opencode.bridge_url(),
        world.state.path(),
    );
    settings.notify = notify;
    world.bridge = Some(Bridge::start_with(settings));
}

fn bash(command: &str) -> Step {
    Step::ToolCall {
        name: "bash".into(),
        arguments: json!({"command": command, "description": "run it"}),
    }
}

fn question() -> Step {
    Step::ToolCall {
        name: "question".into(),
        arguments: json!({"questions": [
            {"question": "Which colour?", "header": "Colour",
             "options": [{"label": "Red", "description": ""}, {"label": "Teal", "description": ""}]}
        ]}),
    }
}

/// The posts that mention the owner, as Mattermost recorded them on creation.
fn mentioned(world: &World) -> Vec<String> {
    let owner = world.mattermost.owner().id;
    (world.mattermost.mentions_of(&owner).into_iter())
        .map(|m| m.message)
        .collect()
}

fn mentions(world: &World, post: &Post) -> bool {
    let owner = world.mattermost.owner().id;
    world
        .mattermost
        .mentions_of(&owner)
        .iter()
        .any(|m| m.post_id == post.id)
}

/// A permission request, then its short turn's completion line, then a question, then the
/// session's unexpected end: each waits on `wait`, and `expect(kind)` says whether it mentions.
fn run_asks_and_end(world: &World, expect: impl Fn(&str) -> bool) {
    let (id, _) = world.new_session("Attention");
    let root = world.wait_root(&id);
    assert!(!mentions(world, &root), "a new thread needs no one");

    world.llm.script(
        "needs permission",
        vec![vec![bash("printf 'att-%s' one")], vec![text("Ran it.")]],
    );
    world.owner_says(&root.id, "needs permission");
    let ask = world.wait_bot_post(&root.id, "permission request", |p| {
        p.message.contains("Permission") && p.message.contains("att-%s")
    });
    assert_eq!(
        mentions(world, &ask),
        expect("asks"),
        "{:#?}",
        mentioned(world)
    );
    world.owner_says(&root.id, "!allow");
    wait_for("the first completion line", || {
        !completion_lines(world, &root).is_empty()
    });
    let done = completion_lines(world, &root).remove(0);
    assert!(done.message.starts_with("✅ Done"), "{}", done.message);
    assert_eq!(mentions(world, &done), expect("done"), "{}", done.message);
    // The request post was edited to show the decision: an edit never mentions.
    let asked = mentioned(world).len();

    world
        .llm
        .script("ask me", vec![vec![question()], vec![text("Teal it is.")]]);
    world.owner_says(&root.id, "ask me");
    let asked_post = world.wait_bot_post(&root.id, "question", |p| {
        p.message.contains("Which colour?")
    });
    assert_eq!(mentions(world, &asked_post), expect("asks"));
    world.owner_says(&root.id, "2");
    wait_for("the second completion line", || {
        completion_lines(world, &root).len() >= 2
    });
    assert!(mentioned(world).len() <= asked + 2);

    world
        .opencode
        .delete_session(&id, world.opencode.project_dir());
    let ended = world.wait_bot_post(&root.id, "end notice", |p| {
        p.message.contains("This session ended after")
    });
    assert_eq!(
        mentions(world, &ended),
        expect("errors"),
        "{}",
        ended.message
    );
    let owner = world.mattermost.owner().username;
    for post in world.bot_posts_in_thread(&root.id) {
        if post.message.contains(&format!("@{owner}")) {
            assert!(
                mentions(world, &post),
                "a mention added by an edit notifies no one: {}",
                post.message
            );
        }
    }
}

#[test]
fn asks_and_ends_mention_the_owner_and_a_short_turn_does_not() {
    let world = world_with_notify(json!({"permission": {"bash": "ask"}}), Notify::default());
    run_asks_and_end(&world, |kind| kind != "done");
}

#[test]
fn with_done_after_zero_every_completion_line_mentions_the_owner() {
    let notify = Notify {
        done_after: Some(std::time::Duration::ZERO),
        ..Notify::default()
    };
    let world = world_with_notify(json!({"permission": {"bash": "ask"}}), notify);
    run_asks_and_end(&world, |_| true);
}

#[test]
fn notify_none_mentions_nothing() {
    let world = world_with_notify(json!({"permission": {"bash": "ask"}}), Notify::NONE);
    run_asks_and_end(&world, |_| false);
    assert!(mentioned(&world).is_empty(), "{:#?}", mentioned(&world));
}
