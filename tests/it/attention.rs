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
/// session's unexpected end; `expect(kind)` says whether each kind mentions the owner.
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

/// The board post in the main DM: the only bot root post that starts with the board's heading.
fn board_posts(world: &World) -> Vec<Post> {
    let bot = world.mattermost.bot().id;
    (world.mattermost.posts_in(&world.dm).into_iter())
        .filter(|p| p.user_id == bot && p.root_id.is_empty())
        .filter(|p| p.message.starts_with("📋 **Sessions board**"))
        .collect()
}

/// Waits until the board post shows a line with all of `needles`.
fn wait_board_line(world: &World, needles: &[&str]) -> Post {
    let bot = world.mattermost.bot().id;
    let dm = world.dm.clone();
    world
        .mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&dm).into_iter().find(|p| {
                p.user_id == bot
                    && p.root_id.is_empty()
                    && p.message.starts_with("📋 **Sessions board**")
                    && p.message
                        .lines()
                        .any(|line| needles.iter().all(|n| line.contains(n)))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "the board never showed {needles:?}: {:#?}",
                board_posts(world)
                    .iter()
                    .map(|p| &p.message)
                    .collect::<Vec<_>>()
            )
        })
}

#[test]
fn the_board_follows_states_paced_and_survives_a_restart() {
    let mut world = world_with_notify(json!({"permission": {"bash": "ask"}}), Notify::NONE);
    let (id, _) = world.new_session("Board one");
    let root = world.wait_root(&id);
    let owner = world.mattermost.owner().id;
    world
        .mattermost
        .post_as(&owner, &world.dm, "", "!board")
        .expect("command accepted");
    let board = wait_board_line(&world, &["💤 idle", "Board one", "/_redirect/pl/"]);
    assert!(
        board
            .message
            .contains(&format!("/_redirect/pl/{})", root.id)),
        "links the thread: {}",
        board.message
    );

    // Working while the answer streams.
    let gate = crate::support::llm::Gate::new();
    world.llm.script(
        "hold on",
        vec![vec![text("Thinking about it"), Step::Gate(gate.clone())]],
    );
    world.owner_says(&root.id, "hold on");
    wait_board_line(&world, &["⚙️ working", "Board one"]);
    gate.open();
    wait_for("the held turn's completion line", || {
        !completion_lines(&world, &root).is_empty()
    });

    // Waiting for the owner while a permission request is open.
    world.llm.script(
        "board permission",
        vec![vec![bash("printf 'brd-%s' x")], vec![text("Ran.")]],
    );
    world.owner_says(&root.id, "board permission");
    wait_board_line(&world, &["waiting for you", "Board one"]);
    world.owner_says(&root.id, "!allow");
    wait_board_line(&world, &["💤 idle", "Board one"]);

    // At most one edit every 5 s (less a little for the requests' own latency).
    let edits: Vec<_> = (world.mattermost.post_versions().into_iter())
        .filter(|v| v.post_id == board.id)
        .collect();
    assert!(
        edits.len() >= 4,
        "created and edited thrice: {}",
        edits.len()
    );
    for pair in edits.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= std::time::Duration::from_millis(4_500),
            "board edits {gap:?} apart"
        );
    }

    // After a restart the same post goes on; `!board` again posts no second one.
    restart_with(&mut world, Notify::NONE);
    let (second, _) = world.new_session("Board two");
    world.wait_root(&second);
    let after = wait_board_line(&world, &["Board two"]);
    assert_eq!(after.id, board.id, "the same board post continues");
    world
        .mattermost
        .post_as(&owner, &world.dm, "", "!board")
        .expect("command accepted");
    world.wait_bot_post("", "the board's link", |p| {
        p.message.contains("The board is [here]")
    });
    assert_eq!(board_posts(&world).len(), 1, "one board, never two");
    world
        .opencode
        .delete_session(&second, world.opencode.project_dir());
    wait_board_line(&world, &["🏁 ended", "Board two"]);

    world
        .mattermost
        .post_as(&owner, &world.dm, "", "!board off")
        .expect("command accepted");
    world.wait_bot_post("", "stop confirmation", |p| {
        p.message.contains("The board is stopped")
    });
    let stopped = world
        .mattermost
        .wait_until(crate::support::SOON, |view| {
            view.post(&board.id)
                .filter(|p| p.message.contains("stopped"))
                .cloned()
        })
        .expect("the board says it stopped");
    assert!(
        !stopped.message.contains("Board one"),
        "{}",
        stopped.message
    );
}

/// An answer OpenCode never finished (it was restarted mid-answer) ends in a new "Interrupted"
/// completion line, and that post mentions the owner.
#[test]
fn an_interrupted_answer_mentions_the_owner() {
    let mut world = world_with_notify(json!({}), Notify::default());
    let (id, _) = world.new_session("Cut off");
    let root = world.wait_root(&id);
    let gate = crate::support::llm::Gate::new();
    world.llm.script(
        "cut me off",
        vec![vec![text("Working on it"), Step::Gate(gate.clone())]],
    );
    world.owner_says(&root.id, "cut me off");
    world.wait_bot_post(&root.id, "partial reply", |p| {
        p.message.contains("Working on it")
    });
    world.opencode.kill();
    gate.open();
    world.opencode.restart();
    wait_for("the interrupted turn's completion line", || {
        !completion_lines(&world, &root).is_empty()
    });
    let line = completion_lines(&world, &root).remove(0);
    assert!(
        line.message.starts_with("⚠️ Interrupted"),
        "{}",
        line.message
    );
    assert!(mentions(&world, &line), "{}", line.message);
}
