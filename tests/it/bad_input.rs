//! Bad input, end to end: none of it panics, stalls other sessions or loses data. The pure decoders
//! and parsers are fuzzed in `properties.rs`; here the running bridge meets the bad input.

use std::time::Duration;

use serde_json::json;

use crate::e2e::{World, wait_for};
use crate::support::bridge::Bridge;
use crate::support::fake_opencode::{FakeOpenCode, Pace};
use crate::support::mattermost::{FakeMattermost, Post};
use crate::support::{SOON, TempDir};

/// A prompt in the thread still gets its answer: the bridge came through whatever happened before.
fn still_answers(world: &World, root_id: &str, prompt: &str) {
    world.owner_says(root_id, prompt);
    world.wait_bot_post(root_id, "echo after bad input", |p| {
        p.message.contains(&format!("echo: {prompt}"))
    });
}

#[test]
fn malformed_unknown_and_oversized_websocket_frames_are_skipped() {
    let world = World::started();
    let (id, _) = world.new_session("Bad frames");
    let root = world.wait_root(&id);
    let frames = [
        "{not json at all".to_string(),
        r#"{"event":"a_brand_new_event","data":{"x":1},"broadcast":{},"seq":9000}"#.to_string(),
        // A `posted` event whose post is not valid JSON, and one with a lone surrogate escape.
        r#"{"event":"posted","data":{"post":"{\"id\":"},"broadcast":{},"seq":9001}"#.to_string(),
        r#"{"event":"posted","data":{"post":"{\"id\":\"x\",\"message\":\"\\ud800\"}"},"broadcast":{},"seq":9002}"#
            .to_string(),
        // Over the reader's frame limit.
        format!(r#"{{"event":"posted","data":{{"post":"{}"}}}}"#, "x".repeat(5 * 1024 * 1024)),
    ];
    for frame in &frames {
        assert!(
            world.mattermost.inject_ws_frame(frame) > 0,
            "no websocket to inject into"
        );
    }
    still_answers(&world, &root.id, "after the bad frames");
}

#[test]
fn a_hundred_kilobyte_prompt_in_an_event_reaches_the_session_whole() {
    let world = World::started();
    let (id, _) = world.new_session("Huge prompt");
    let root = world.wait_root(&id);
    // Mattermost itself caps posts at 16383 characters; an event can still carry more (a plugin, a
    // changed limit), and the bridge must pass it on whole rather than cut or choke on it.
    // A short answer: echoing 100 KB back would only measure the fake LLM's streaming.
    world.llm.script(
        "HUGE-START",
        vec![vec![crate::e2e::text("Got the huge prompt.")]],
    );
    let message = format!(
        "HUGE-START {} HUGE-END",
        "lorem ipsum ".repeat(100 * 1024 / 12)
    );
    let post = json!({
        "id": "hugepost0000000000000000ab",
        "create_at": 1,
        "user_id": world.mattermost.owner().id,
        "channel_id": world.dm,
        "root_id": root.id,
        "message": message,
        "type": "",
    });
    let frame = json!({
        "event": "posted",
        "data": {"post": post.to_string(), "channel_type": "D"},
        "broadcast": {"channel_id": world.dm},
        "seq": 9100,
    });
    world.mattermost.inject_ws_frame(&frame.to_string());
    crate::e2e::wait_until_llm_saw(&world, "HUGE-END");
    let longest = world
        .prompts_seen_by_llm()
        .into_iter()
        .find(|p| p.contains("HUGE-START"))
        .expect("the huge prompt");
    assert!(
        longest.len() >= 100 * 1024 - 64,
        "cut to {} bytes",
        longest.len()
    );
    still_answers(&world, &root.id, "after the huge prompt");
}

#[test]
fn reactions_on_unknown_posts_do_nothing_harmful() {
    let world = World::started();
    let (id, _) = world.new_session("Stray reactions");
    let root = world.wait_root(&id);
    let owner = world.mattermost.owner().id;
    // The owner's own main-DM message and the bot's answer to it belong to no session.
    let stray = world
        .mattermost
        .post_as(&owner, &world.dm, "", "just chatting")
        .expect("post accepted");
    let answer = world.wait_bot_post("", "main-DM answer", |_| true);
    for (post, emoji) in [
        (&stray.id, "octagonal_sign"),
        (&stray.id, "repeat"),
        (&answer.id, "white_check_mark"),
        (&answer.id, "one"),
    ] {
        world
            .mattermost
            .react_as(&owner, post, emoji)
            .expect("reaction accepted");
    }
    // A reaction in a channel the bot is not part of never reaches a session.
    let other = world.mattermost.create_channel("elsewhere", &[&owner]);
    let elsewhere = world
        .mattermost
        .post_as(&owner, &other, "", "not the DM")
        .expect("post accepted");
    world
        .mattermost
        .react_as(&owner, &elsewhere.id, "octagonal_sign")
        .expect("reaction accepted");
    still_answers(&world, &root.id, "after stray reactions");
    assert_eq!(
        world.prompts_seen_by_llm(),
        vec!["after stray reactions"],
        "a stray 🔁 resent something"
    );
}

#[test]
fn a_deleted_thread_root_gives_the_session_a_new_thread() {
    let world = World::started();
    let (id, _) = world.new_session("Root deleted");
    let root = world.wait_root(&id);
    still_answers(&world, &root.id, "before the deletion");
    // The first turn is over before its thread goes.
    world.wait_bot_post(&root.id, "completion line", |p| {
        p.message.starts_with("✅ Done")
    });
    world
        .mattermost
        .delete_as(&world.mattermost.bot().id, &root.id)
        .expect("root deleted");
    // The session goes on from a terminal; its answer must land somewhere the owner sees.
    world.opencode.prompt(
        &id,
        world.opencode.project_dir(),
        "from the terminal after deletion",
    );
    let new_root = world
        .mattermost
        .wait_until(crate::support::SOON, |view| {
            view.posts_in(&world.dm).into_iter().find(|p| {
                p.root_id.is_empty() && p.id != root.id && p.props["opencode_session_id"] == id
            })
        })
        .expect("a new thread root");
    world.wait_bot_post(&new_root.id, "the answer in the new thread", |p| {
        p.message.contains("echo: from the terminal after deletion")
    });
    still_answers(&world, &new_root.id, "in the new thread");
}

#[test]
fn a_thread_naming_a_session_the_bridge_does_not_know_is_refused_clearly() {
    let world = World::started();
    let bot = world.mattermost.bot();
    // A root that looks like a session thread, for a session id in no state file and on no server.
    let body = json!({
        "channel_id": world.dm,
        "message": "an old thread",
        "props": {"opencode_session_id": "ses_notinthestatefile00000", "opencode_server": world.opencode.bridge_url()},
    });
    let mut response = ureq::post(&format!("{}/api/v4/posts", world.mattermost.url()))
        .header("Authorization", &format!("Bearer {}", bot.token))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("root accepted");
    let root: serde_json::Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
    let root_id = root["id"].as_str().expect("root id").to_string();
    world.owner_says(&root_id, "hello stranger thread");
    world.wait_bot_post(&root_id, "refusal", |p| {
        p.message.contains("not linked to any OpenCode session")
    });
    assert!(world.prompts_seen_by_llm().is_empty());
}

/// The bridge between the fake Mattermost and the fake OpenCode, with one session and its thread.
struct FakeWorld {
    opencode: FakeOpenCode,
    mattermost: FakeMattermost,
    dm: String,
    bridge: Bridge,
    session_id: String,
    root: Post,
    _state: TempDir,
}

impl FakeWorld {
    fn start(label: &str) -> FakeWorld {
        let opencode = FakeOpenCode::start();
        let mattermost = FakeMattermost::start();
        let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
        let state = TempDir::new(label);
        let bridge = Bridge::start(&mattermost, &opencode.url(), state.path());
        let (session_id, _) = opencode.create_session(label);
        let root = mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm).into_iter().find(|p| {
                    p.root_id.is_empty() && p.props["opencode_session_id"] == session_id.as_str()
                })
            })
            .expect("the session's thread");
        FakeWorld {
            opencode,
            mattermost,
            dm,
            bridge,
            session_id,
            root,
            _state: state,
        }
    }

    /// The owner prompts in the thread; waits until OpenCode has it (the `skip`+1-th of the session).
    fn prompt(&self, text: &str, skip: usize) {
        self.mattermost
            .post_as(&self.mattermost.owner().id, &self.dm, &self.root.id, text)
            .expect("owner post accepted");
        self.opencode
            .wait_for_prompt(&self.session_id, skip, SOON)
            .expect("the prompt reached OpenCode");
    }

    /// OpenCode answers `text`, and the answer shows in the thread.
    fn answer(&self, text: &str) {
        let pace = Pace {
            delta_chars: 8,
            interval: Duration::from_millis(5),
            finish_gap: Duration::from_millis(20),
        };
        self.opencode.reply(&[(&self.session_id, text)], pace);
        self.wait_bot_post(
            &format!("the answer {text:?}"),
            Duration::from_secs(20),
            |p| p.message.contains(text),
        );
    }

    fn wait_bot_post(&self, what: &str, timeout: Duration, f: impl Fn(&Post) -> bool) {
        let bot = self.mattermost.bot().id;
        self.mattermost
            .wait_until(timeout, |view| {
                view.thread(&self.root.id)
                    .into_iter()
                    .find(|p| p.user_id == bot && f(p))
            })
            .unwrap_or_else(|| panic!("no {what} in the thread"));
    }
}

/// Malformed JSON, unknown event types, events of the wrong shape, a 9 MiB event and a stream cut in
/// the middle of an event, all on OpenCode's event stream: the bridge skips them, reconnects, and the
/// session's next prompt is answered in its thread.
#[test]
fn malformed_unknown_oversized_and_truncated_opencode_events_are_skipped() {
    let world = FakeWorld::start("bad-opencode-events");
    let (opencode, id) = (&world.opencode, &world.session_id);
    let envelope = |payload: serde_json::Value| {
        format!(
            "data: {}\n\n",
            json!({"directory": opencode.directory(), "payload": payload})
        )
    };
    opencode.emit_raw("data: {this is not json\n\n");
    opencode.emit_raw("data: [1, 2\n\n");
    opencode.emit_raw(&envelope(
        json!({"type": "brand.new.event", "properties": {"sessionID": id}}),
    ));
    opencode.emit_raw(&envelope(json!({"type": "message.updated", "properties": {"sessionID": id, "info": "not an object"}})));
    opencode.emit_raw(&envelope(
        json!({"type": "message.part.delta", "properties": {"sessionID": id, "delta": 7}}),
    ));
    opencode.emit_raw(&envelope(json!({"type": "session.status", "properties": {"sessionID": id, "status": {"type": "sideways"}}})));
    // Over the 8 MiB an event may have.
    let huge = "x".repeat(9 << 20);
    opencode.emit_raw(&envelope(json!({"type": "message.part.delta", "properties": {"sessionID": id, "messageID": "msg_1", "partID": "prt_1", "field": "text", "delta": huge}})));
    opencode.cut_streams_mid_event();
    // The bridge reconnects to the stream by itself.
    wait_for("the bridge to reconnect to the event stream", || {
        opencode.subscriber_count() > 0
    });
    world.prompt("still there?", 0);
    world.answer("Yes, all good after the bad events.");
    world.wait_bot_post("completion line", SOON, |p| {
        p.message.starts_with("✅ Done")
    });
    world.bridge.stop().expect("a clean stop");
}

/// OpenCode takes a prompt (204) and never starts on it, as it does with an image it cannot decode:
/// the thread says so instead of waiting forever or showing an empty answer as done, and the next
/// prompt is sent and answered.
#[test]
fn a_prompt_opencode_never_starts_is_reported_and_the_next_one_goes_through() {
    let world = FakeWorld::start("never-started");
    world.prompt("ignored by opencode", 0);
    // Given up after 15 s without a start, at the next status poll (every 20 s).
    world.wait_bot_post(
        "notice that OpenCode never started",
        Duration::from_secs(60),
        |p| p.message.contains("has not started on it"),
    );
    let bot = world.mattermost.bot().id;
    assert!(
        !world
            .mattermost
            .thread(&world.root.id)
            .iter()
            .any(|p| p.user_id == bot && p.message.starts_with("✅ Done")),
        "an unstarted prompt was shown as done"
    );
    world.prompt("second try", 1);
    world.answer("Answered the second try.");
    world.bridge.stop().expect("a clean stop");
}
