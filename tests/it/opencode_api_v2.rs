//! The OpenCode client in the v2 dialect (`/api/*`) against a real `opencode serve` 1.18.33 and the
//! scripted LLM, without the bridge: the probe, a prompt with the bridge's own id streamed on
//! `/api/event`, the durable log, permissions, interrupt, model and agent, files.

use std::io::Read;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::json;

use opencode_mattermost::opencode::rest::{FileRead, OcError, OpenCodeClient};
use opencode_mattermost::opencode::sse::SseParser;
use opencode_mattermost::opencode::v2::decode::V2Decoder;
use opencode_mattermost::opencode::{
    ApiChoice, Delivery, Dialect, Event, PartBody, PermissionReply, PromptInput, Role, ToolStatus,
};

use crate::support::SOON;
use crate::support::llm::{FakeLlm, Gate, Step};
use crate::support::opencode::OpenCode;

fn v2_client(server: &OpenCode) -> OpenCodeClient {
    OpenCodeClient::new(&server.url(), "opencode", None).with_api(ApiChoice::V2)
}

fn dir(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Polls `probe` until it returns something, failing the test after `SOON`.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Polling with a deadline: the server has no call that blocks until this changes.
        thread::sleep(Duration::from_millis(100));
    }
}

/// `/api/event`, decoded, on a thread; events come out of the receiver until the test ends.
fn subscribe(client: &OpenCodeClient) -> Receiver<Event> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let agent = client.stream_agent(Duration::from_secs(30));
    let url = format!("{}/api/event", client.base_url());
    let (up_tx, up) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let Ok(response) = agent.get(&url).call() else {
            return;
        };
        let mut reader = response.into_body().into_reader();
        let mut parser = SseParser::new(8 << 20);
        let mut decoder = V2Decoder::live();
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                return;
            }
            for sse in parser.feed(&buffer[..n]) {
                for envelope in decoder.decode(&sse.data).unwrap_or_default() {
                    if matches!(envelope.event, Event::Connected) {
                        let _ = up_tx.try_send(());
                    }
                    if tx.send(envelope.event).is_err() {
                        return;
                    }
                }
            }
        }
    });
    up.recv_timeout(SOON).expect("/api/event connects");
    rx
}

/// Events of `session` until `stop` says so, failing after `SOON`.
fn events_until(
    events: &Receiver<Event>,
    session: &str,
    mut stop: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + SOON;
    let mut seen = Vec::new();
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(event) if event.session_id() == Some(session) => {
                let done = stop(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!("timed out; saw {seen:#?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the stream ended; saw {seen:#?}"),
        }
    }
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::PartUpdated { part, .. } => match &part.body {
                PartBody::Text(text) if !text.is_empty() => Some(text.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A prompt id as the bridge makes one, for a made-up post.
fn bridge_id(post: &str) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    opencode_mattermost::opencode::ids::prompt_message_id(post, now_ms, None)
}

fn prompt(text: &str, id: &str, delivery: Delivery) -> PromptInput {
    PromptInput {
        text: text.into(),
        message_id: Some(id.into()),
        delivery,
        ..PromptInput::default()
    }
}

#[test]
fn the_probe_keeps_v1_on_1x_and_a_forced_v2_speaks_v2() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({}));
    let auto = OpenCodeClient::new(&server.url(), "opencode", None);
    let probe = auto.probe().unwrap();
    assert_eq!(probe.dialect, Dialect::V1);
    assert_eq!(probe.version.as_deref(), Some("1.18.33"));
    assert!(probe.reason.contains("/global/health"), "{probe:?}");
    let forced = v2_client(&server);
    assert_eq!(forced.dialect(), Dialect::V2);
    let probe = forced.probe().unwrap();
    assert_eq!(probe.dialect, Dialect::V2);
    assert!(probe.reason.contains("OPENCODE_API=v2"), "{probe:?}");
}

#[test]
fn a_v2_prompt_with_the_bridges_id_streams_ends_and_is_in_context_and_the_durable_log() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({}));
    let client = v2_client(&server);
    let directory = dir(server.project_dir());
    let session = client.create_session(&directory, None).unwrap();
    assert_eq!(session.directory, directory);
    assert!(
        client
            .list_sessions()
            .unwrap()
            .iter()
            .any(|s| s.id == session.id)
    );
    assert_eq!(
        client
            .get_session(&session.id, &directory)
            .unwrap_or_else(|e| panic!("{e}"))
            .id,
        session.id
    );
    let events = subscribe(&client);
    let id = bridge_id("v2post1aaaaaaaaaaaaaaaaaaa");
    let id = id.as_str();
    client
        .prompt_with(
            &session.id,
            &directory,
            &prompt("v2-hello", id, Delivery::Queue),
        )
        .unwrap();
    let seen = events_until(&events, &session.id, |e| {
        matches!(e, Event::SessionIdle { .. })
    });
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::MessageUpdated { message, .. }
            if message.role == Role::User && message.id == id)),
        "the prompt shows with the bridge's id: {seen:#?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, Event::PartDelta { .. })),
        "deltas stream live: {seen:#?}"
    );
    assert_eq!(
        texts(&seen).last().map(String::as_str),
        Some("echo: v2-hello")
    );

    let messages = client.messages(&session.id, &directory, 10).unwrap();
    let user = messages
        .iter()
        .position(|(m, _)| m.id == id)
        .expect("the prompt is stored");
    let (answer, parts) = &messages[user + 1];
    assert_eq!(answer.role, Role::Assistant);
    assert!(answer.completed_ms.is_some(), "{answer:?}");
    assert_eq!(answer.parent_id.as_deref(), Some(id));
    assert_eq!(parts[0].body, PartBody::Text("echo: v2-hello".into()));

    // The durable log replays the turn without deltas, each event once, in seq order.
    let (items, more) =
        opencode_mattermost::opencode::v2::rest::history(&client, &session.id, 0).unwrap();
    assert!(!more);
    let mut decoder = V2Decoder::durable();
    let replayed: Vec<_> = items
        .iter()
        .flat_map(|item| decoder.decode_value(item).unwrap())
        .collect();
    assert!(replayed.iter().all(|e| e.seq.is_some()));
    let replayed: Vec<Event> = replayed.into_iter().map(|e| e.event).collect();
    assert_eq!(texts(&replayed), vec!["echo: v2-hello".to_string()]);
    assert!(
        !replayed
            .iter()
            .any(|e| matches!(e, Event::PartDelta { .. }))
    );
    // Read again from the last seq: nothing more.
    let last = decoder.last_seq(&session.id).unwrap();
    let (after, _) =
        opencode_mattermost::opencode::v2::rest::history(&client, &session.id, last).unwrap();
    assert!(after.is_empty(), "{after:?}");
}

#[test]
fn v2_permissions_are_listed_and_answered_and_interrupt_stops_a_turn() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({"permission": {"bash": "ask"}}));
    let client = v2_client(&server);
    let directory = dir(server.project_dir());
    let session = client.create_session(&directory, None).unwrap().id;
    llm.script(
        "v2-perm",
        vec![
            vec![Step::ToolCall {
                name: "bash".into(),
                arguments: json!({"command": "printf 'ran-%s' v2", "description": "test"}),
            }],
            vec![Step::Text("after the tool".into())],
        ],
    );
    let events = subscribe(&client);
    client
        .prompt_with(
            &session,
            &directory,
            &prompt(
                "v2-perm",
                &bridge_id("v2post2aaaaaaaaaaaaaaaaaaa"),
                Delivery::Queue,
            ),
        )
        .unwrap();
    let request = wait_for("the v2 permission request", || {
        client
            .permissions(&directory)
            .ok()?
            .into_iter()
            .find(|p| p.session_id == session)
    });
    assert_eq!(request.permission, "bash");
    assert_eq!(request.patterns, vec!["printf 'ran-%s' v2".to_string()]);
    client
        .reply_permission(&request.id, &directory, PermissionReply::Once, None)
        .unwrap();
    let seen = events_until(&events, &session, |e| {
        matches!(e, Event::SessionIdle { .. })
    });
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::PermissionAsked(r) if r.id == request.id)),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::PartUpdated { part, .. }
            if matches!(&part.body, PartBody::Tool(t) if t.status == ToolStatus::Completed
                && t.main_argument == "printf 'ran-%s' v2"))),
        "{seen:#?}"
    );
    assert_eq!(
        texts(&seen).last().map(String::as_str),
        Some("after the tool")
    );
    // Answered: a second reply finds nothing pending.
    assert!(matches!(
        client.reply_permission(&request.id, &directory, PermissionReply::Once, None),
        Err(OcError::NotFound(_))
    ));

    // A turn held at the LLM is running until interrupted, and then ends.
    let gate = Gate::new();
    llm.script(
        "v2-hold",
        vec![vec![
            Step::Text("early ".into()),
            Step::Gate(gate.clone()),
            Step::Text("late".into()),
        ]],
    );
    client
        .prompt_with(
            &session,
            &directory,
            &prompt(
                "v2-hold",
                &bridge_id("v2post3aaaaaaaaaaaaaaaaaaa"),
                Delivery::Queue,
            ),
        )
        .unwrap();
    // Interrupted once the step has started: before it, the server ends the turn with no event
    // at all (only `/api/session/active` shows it, which the bridge's poll reads).
    events_until(&events, &session, |e| matches!(e, Event::PartDelta { .. }));
    assert!(
        client
            .session_status(&directory)
            .unwrap()
            .contains_key(&session)
    );
    client.abort(&session, &directory).unwrap();
    let seen = events_until(&events, &session, |e| {
        matches!(e, Event::SessionIdle { .. })
    });
    gate.open();
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::MessageUpdated { message, .. }
            if message.error.as_ref().is_some_and(|(name, _)| name == "MessageAbortedError"))),
        "{seen:#?}"
    );
    wait_for("the session to stop", || {
        (!client
            .session_status(&directory)
            .ok()?
            .contains_key(&session))
        .then_some(())
    });
}

#[test]
fn v2_models_agents_files_and_what_v2_lacks() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({}));
    let client = v2_client(&server);
    let directory = dir(server.project_dir());
    std::fs::write(server.project_dir().join("notes.txt"), "v2 file body\n").unwrap();
    std::fs::create_dir_all(server.project_dir().join("sub")).unwrap();
    let models = client.models(&directory).unwrap();
    assert!(
        models.iter().any(|m| m.model.provider_id == "fake"),
        "{models:?}"
    );
    let agents = client.agents(&directory).unwrap();
    assert!(agents.iter().any(|a| a.name == "build"), "{agents:?}");
    match client.read_file(&directory, "notes.txt", 1024).unwrap() {
        FileRead::Content(content) => assert_eq!(content.bytes, b"v2 file body\n"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.read_file(&directory, "notes.txt", 4).unwrap(),
        FileRead::TooLarge
    ));
    assert!(matches!(
        client.read_file(&directory, "missing.txt", 1024),
        Err(OcError::NotFound(_))
    ));
    assert!(matches!(
        client.read_file(&directory, "sub", 1024).unwrap(),
        FileRead::Refused(_)
    ));
    assert!(client.directory_exists(&directory).unwrap());
    assert!(!client.directory_exists("/nonexistent/v2-dir").unwrap());
    let session = client.create_session(&directory, None).unwrap().id;
    assert!(matches!(
        client.diff(&session, &directory),
        Err(OcError::Unsupported(_))
    ));
    assert!(matches!(
        client.rename(&session, &directory, "new title"),
        Err(OcError::Unsupported(_))
    ));
}

/// The bridge, forced to v2, on a fresh world.
fn v2_world() -> crate::e2e::World {
    let mut world = crate::e2e::World::new();
    start_v2_bridge(&mut world);
    world
}

fn start_v2_bridge(world: &mut crate::e2e::World) {
    let mut config = crate::support::bridge::config(
        &world.mattermost,
        &world.opencode.url(),
        world.state.path(),
    );
    config.opencode_api = ApiChoice::V2;
    world.bridge = Some(crate::support::bridge::Bridge::start_with(config));
}

#[test]
fn answers_finished_while_the_bridge_was_away_are_posted_once_from_the_durable_log() {
    let mut world = v2_world();
    let (id, _) = world.new_session("Away");
    let root = world.wait_root(&id);
    world.owner_says(&root.id, "before the stop");
    world.wait_bot_post(&root.id, "the first completion line", |p| {
        p.message.starts_with("✅ Done")
    });
    world.stop_bridge();
    // A turn run while no bridge watches (from another client).
    let client = v2_client(&world.opencode);
    let directory = dir(world.opencode.project_dir());
    client
        .prompt_with(
            &id,
            &directory,
            &prompt(
                "while away",
                &bridge_id("v2awayaaaaaaaaaaaaaaaaaaaa"),
                Delivery::Queue,
            ),
        )
        .unwrap();
    wait_for("the turn to end on the server", || {
        let messages = client.messages(&id, &directory, 10).ok()?;
        messages
            .iter()
            .any(|(m, parts)| {
                m.completed_ms.is_some()
                    && parts
                        .iter()
                        .any(|p| p.body == PartBody::Text("echo: while away".into()))
            })
            .then_some(())
    });
    let count = |world: &crate::e2e::World, needle: &str| {
        world
            .bot_posts_in_thread(&root.id)
            .iter()
            .filter(|p| p.message.contains(needle))
            .count()
    };
    let completions = |world: &crate::e2e::World| {
        world
            .bot_posts_in_thread(&root.id)
            .iter()
            .filter(|p| p.message.starts_with("✅ Done"))
            .count()
    };
    start_v2_bridge(&mut world);
    world.wait_bot_post(&root.id, "the answer given while away", |p| {
        p.message.contains("echo: while away")
    });
    crate::e2e::wait_for("two completion lines", || completions(&world) == 2);
    world.stop_bridge();
    // Again: nothing new after the saved position. A prompt answered after the restart shows the
    // catch-up (done at connect, before it) had its chance to repeat something.
    start_v2_bridge(&mut world);
    world.owner_says(&root.id, "after the restarts");
    world.wait_bot_post(&root.id, "the answer after the restarts", |p| {
        p.message.contains("echo: after the restarts")
    });
    crate::e2e::wait_for("three completion lines", || completions(&world) >= 3);
    assert_eq!(count(&world, "echo: while away"), 1);
    assert_eq!(count(&world, "echo: before the stop"), 1);
    assert_eq!(completions(&world), 3);
    let state = std::fs::read_to_string(world.state.path().join("state.json")).unwrap();
    assert!(state.contains("\"delivered_seq\""), "{state}");
}

#[test]
fn steer_joins_the_running_turn_on_v2_and_is_a_plain_prompt_when_idle() {
    let world = v2_world();
    let (id, _) = world.new_session("Steer");
    let root = world.wait_root(&id);
    let gate = Gate::new();
    world.llm.script(
        "steer me",
        vec![vec![
            crate::e2e::text("Step one. "),
            Step::Gate(gate.clone()),
            crate::e2e::text("Step one done."),
        ]],
    );
    world.owner_says(&root.id, "steer me");
    world.wait_bot_post(&root.id, "the streaming reply", |p| {
        p.message.contains("Step one.")
    });
    world.owner_says(&root.id, "!steer also cheese");
    world.wait_bot_post(&root.id, "the steer notice", |p| {
        p.message.contains("Sent into the running turn")
    });
    gate.open();
    // The steer is read when the step ends: the next model request ends with it.
    world.wait_bot_post(&root.id, "the answer to the steer", |p| {
        p.message.contains("echo: also cheese")
    });
    let prompts = world.prompts_seen_by_llm();
    assert_eq!(
        prompts
            .iter()
            .filter(|p| p.as_str() == "also cheese")
            .count(),
        1,
        "{prompts:?}"
    );
    assert!(
        !world
            .bot_posts_in_thread(&root.id)
            .iter()
            .any(|p| p.message.contains("Queued")),
        "a steer is not queued"
    );
    // Idle: an ordinary prompt.
    crate::e2e::wait_for("the session to be idle", || {
        world
            .bot_posts_in_thread(&root.id)
            .iter()
            .any(|p| p.message.contains("echo: also cheese"))
            && world.opencode.get("/api/session/active")["data"]
                .as_object()
                .is_some_and(|m| m.is_empty())
    });
    world.owner_says(&root.id, "!steer when idle");
    world.wait_bot_post(&root.id, "the idle steer's answer", |p| {
        p.message.contains("echo: when idle")
    });
}

/// `!steer` is owed like a prompt until OpenCode has it: one accepted while OpenCode is down,
/// with the bridge then restarted, is still sent, once.
#[test]
fn a_steer_waiting_for_opencode_survives_a_bridge_restart() {
    let mut world = v2_world();
    let (id, _) = world.new_session("Steer owed");
    let root = world.wait_root(&id);
    world.opencode.kill();
    world.owner_says(&root.id, "!steer kept across the restart");
    world.wait_bot_post(&root.id, "the queued notice", |p| {
        p.message.contains("queued")
    });
    world.stop_bridge();
    world.opencode.restart();
    start_v2_bridge(&mut world);
    world.wait_bot_post(&root.id, "the steer's answer", |p| {
        p.message.contains("echo: kept across the restart")
    });
    let prompts = world.prompts_seen_by_llm();
    assert_eq!(
        prompts
            .iter()
            .filter(|p| p.as_str() == "kept across the restart")
            .count(),
        1,
        "{prompts:?}"
    );
}

#[test]
fn status_says_which_api_the_bridge_speaks_and_why() {
    let world = v2_world();
    crate::e2e::wait_for("status to name the API", || {
        let (text, _) = opencode_mattermost::status::show(world.state.path(), false);
        text.contains(" speaks v2: OPENCODE_API=v2")
    });
    let (json, _) = opencode_mattermost::status::show(world.state.path(), true);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["opencode_api"][0]["api"], "v2: OPENCODE_API=v2");
}
