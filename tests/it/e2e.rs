//! End to end: the bridge in-process, the project's fake Mattermost, and a real `opencode serve` whose
//! LLM is the scripted fake. Each test has its own servers and state directory.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use opencode_mattermost::RunError;
use opencode_mattermost::config::Secret;

use crate::support::bridge::{self, Bridge};
use crate::support::llm::{FakeLlm, Gate, Step};
use crate::support::mattermost::{FakeMattermost, Post};
use crate::support::opencode::OpenCode;
use crate::support::{SOON, TempDir};

/// Fields drop in order: the bridge stops before the servers it talks to.
pub(crate) struct World {
    pub(crate) bridge: Option<Bridge>,
    pub(crate) llm: FakeLlm,
    pub(crate) opencode: OpenCode,
    pub(crate) mattermost: FakeMattermost,
    pub(crate) state: TempDir,
    pub(crate) dm: String,
}

impl World {
    pub(crate) fn new() -> World {
        let llm = FakeLlm::start();
        let opencode = OpenCode::start(&llm, json!({}));
        World::with(llm, opencode)
    }

    pub(crate) fn with(llm: FakeLlm, opencode: OpenCode) -> World {
        let mattermost = FakeMattermost::start();
        let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
        World {
            llm,
            opencode,
            mattermost,
            state: TempDir::new("state"),
            dm,
            bridge: None,
        }
    }

    pub(crate) fn started() -> World {
        let mut world = World::new();
        world.start_bridge();
        world
    }

    pub(crate) fn start_bridge(&mut self) {
        assert!(self.bridge.is_none());
        self.bridge = Some(Bridge::start(
            &self.mattermost,
            &self.opencode.bridge_url(),
            self.state.path(),
        ));
    }

    /// The bridge as its own process (the built binary), so a test can SIGKILL it.
    pub(crate) fn spawn_binary(&self) -> crate::cli::Running {
        let mut command = std::process::Command::new(crate::cli::BINARY);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MATTERMOST_URL", self.mattermost.url())
            .env("MATTERMOST_TOKEN", self.mattermost.bot().token)
            .env("MATTERMOST_OWNER", self.mattermost.owner().id)
            .env("OPENCODE_URL", self.opencode.bridge_url())
            .env("OPENCODE_MM_STATE_DIR", self.state.path())
            .env(
                "OPENCODE_MM_LOG",
                std::env::var("TEST_BINARY_LOG").unwrap_or("info".into()),
            );
        if crate::support::dialect() == crate::support::Dialect::V2 {
            command.env("OPENCODE_API", "v2");
        }
        crate::cli::Running::start(command)
    }

    pub(crate) fn stop_bridge(&mut self) {
        let bridge = self.bridge.take().expect("bridge running");
        bridge.stop().expect("clean stop");
    }

    pub(crate) fn new_session(&self, title: &str) -> (String, String) {
        let session = self
            .opencode
            .create_session(self.opencode.project_dir(), Some(title));
        let id = session["id"].as_str().expect("session id").to_string();
        let slug = session["slug"].as_str().unwrap_or_default().to_string();
        (id, slug)
    }

    /// The root post of the session's thread, once the bridge has made it.
    pub(crate) fn wait_root(&self, session_id: &str) -> Post {
        let dm = self.dm.clone();
        self.mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm)
                    .into_iter()
                    .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            })
            .unwrap_or_else(|| panic!("no thread root for {session_id}"))
    }

    pub(crate) fn roots_for(&self, session_id: &str) -> Vec<Post> {
        self.mattermost
            .posts_in(&self.dm)
            .into_iter()
            .filter(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            .collect()
    }

    pub(crate) fn owner_says(&self, root_id: &str, message: &str) -> Post {
        self.mattermost
            .post_as(&self.mattermost.owner().id, &self.dm, root_id, message)
            .expect("owner post accepted")
    }

    /// Waits for a bot post in the thread (or the main DM for "") that satisfies `f`.
    pub(crate) fn wait_bot_post(
        &self,
        root_id: &str,
        what: &str,
        f: impl Fn(&Post) -> bool,
    ) -> Post {
        let bot = self.mattermost.bot().id;
        let dm = self.dm.clone();
        self.mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm)
                    .into_iter()
                    .find(|p| p.user_id == bot && p.root_id == root_id && f(p))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no bot post {what} in {root_id:?}; posts: {:#?}",
                    self.mattermost
                        .posts_in(&self.dm)
                        .iter()
                        .map(|p| (&p.root_id, &p.user_id, &p.message))
                        .collect::<Vec<_>>()
                )
            })
    }

    pub(crate) fn bot_posts_in_thread(&self, root_id: &str) -> Vec<Post> {
        let bot = self.mattermost.bot().id;
        self.mattermost
            .thread(root_id)
            .into_iter()
            .filter(|p| p.user_id == bot && p.id != root_id)
            .collect()
    }

    /// The user texts the LLM was sent, in order (title generation requests excluded).
    pub(crate) fn prompts_seen_by_llm(&self) -> Vec<String> {
        let mut prompts = Vec::new();
        for request in self.llm.requests() {
            if request["tools"].as_array().is_none_or(|t| t.is_empty()) {
                continue;
            }
            if let Some(text) = last_user_text(&request) {
                prompts.push(text);
            }
        }
        prompts
    }
}

/// Polls `f` until it holds, for up to `SOON`; panics naming `what` otherwise.
pub(crate) fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Waits until some request to the LLM contains `needle`.
pub(crate) fn wait_until_llm_saw(world: &World, needle: &str) {
    wait_for(&format!("the LLM to see {needle:?}"), || {
        world
            .llm
            .requests()
            .iter()
            .any(|r| r.to_string().contains(needle))
    });
}

/// The completion lines of a thread: one per finished turn.
pub(crate) fn completion_lines(world: &World, root: &Post) -> Vec<Post> {
    world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .filter(|p| {
            p.message.starts_with("✅ Done")
                || p.message.starts_with("⏹️ Stopped")
                || p.message.starts_with("⚠️ Failed")
                || p.message.starts_with("⚠️ Interrupted")
        })
        .collect()
}

pub(crate) fn last_user_text(request: &Value) -> Option<String> {
    let messages = request["messages"].as_array()?;
    let user = messages.iter().rev().find(|m| m["role"] == "user")?;
    match &user["content"] {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

pub(crate) fn post_json(url: &str, body: Value) -> Value {
    let mut response = ureq::post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("opencode answers");
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).expect("json")
}

pub(crate) fn text(s: &str) -> Step {
    Step::Text(s.to_string())
}

#[test]
fn a_password_protected_opencode_works_and_a_wrong_password_stops_start_up() {
    let llm = FakeLlm::start();
    let opencode = OpenCode::start_with_password(&llm, json!({}), "open-sesame-1");
    let mut world = World::with(llm, opencode);
    let mut config = bridge::config(
        &world.mattermost,
        &world.opencode.bridge_url(),
        world.state.path(),
    );

    config.opencode_password = Some(Secret::new("wrong-password-2".into()));
    match Bridge::spawn(config.clone()).wait_exit(SOON) {
        Err(RunError::Config(message)) => {
            assert!(message.contains("OPENCODE_SERVER_PASSWORD"), "{message}");
            assert!(!message.contains("wrong-password-2"), "{message}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }

    config.opencode_password = Some(Secret::new("open-sesame-1".into()));
    world.bridge = Some(Bridge::start_with(config));
    let (id, _) = world.new_session("Behind a password");
    let root = world.wait_root(&id);
    world.owner_says(&root.id, "authenticated hello");
    world.wait_bot_post(&root.id, "echo", |p| {
        p.message.contains("echo: authenticated hello")
    });
}

#[test]
fn new_session_gets_a_thread_with_its_details() {
    let world = World::started();
    let created = Instant::now();
    let (id, slug) = world.new_session("Refactor the parser");
    let root = world.wait_root(&id);
    eprintln!(
        "METRIC thread_creation_ms={}",
        created.elapsed().as_millis()
    );
    let short = &id[id.len() - 8..];
    let message = &root.message;
    assert!(message.contains("Refactor the parser"), "{message}");
    // A v2 session has no slug (SessionV2Info), so only v1 can show it.
    if crate::support::dialect() == crate::support::Dialect::V1 {
        assert!(message.contains(&format!("`{slug}`")), "{message}");
    }
    assert!(message.contains(&format!("`{short}`")), "{message}");
    let directory = world.opencode.project_dir().to_string_lossy().to_string();
    assert!(message.contains(&directory), "{message}");
    assert!(message.contains("UTC"), "{message}");
    assert!(
        message.contains("Replies in this thread go to this session"),
        "{message}"
    );
    assert_eq!(root.user_id, world.mattermost.bot().id);
    assert_eq!(world.roots_for(&id).len(), 1);
}

#[test]
fn sessions_in_other_directories_get_threads_and_subagents_do_not() {
    let world = World::started();
    let other = world.opencode.new_project_dir("elsewhere");
    let session = world.opencode.create_session(&other, Some("Far away"));
    let id = session["id"].as_str().unwrap().to_string();
    let root = world.wait_root(&id);
    assert!(root.message.contains(&*other.to_string_lossy()));

    let child = post_json(
        &format!(
            "{}/session?directory={}",
            world.opencode.url(),
            other.to_string_lossy()
        ),
        json!({"title": "child", "parentID": id}),
    );
    let child_id = child["id"].as_str().expect("child session id").to_string();
    // A later top-level session proves the bridge has seen everything before it.
    let (later, _) = world.new_session("Later");
    world.wait_root(&later);
    assert!(
        world.roots_for(&child_id).is_empty(),
        "a subagent got a thread"
    );
}

#[test]
fn prompt_round_trip_streams_the_answer_and_posts_a_completion_line() {
    let world = World::started();
    let (id, _) = world.new_session("Round trip");
    let root = world.wait_root(&id);
    world.llm.script(
        "What is 6 times 7?",
        vec![vec![
            Step::Reasoning("The user wants a product. Six sevens are forty-two.".into()),
            text("The answer is **42**. "),
            Step::Pause(Duration::from_millis(300)),
            text("That is all."),
        ]],
    );
    let sent = Instant::now();
    let prompt = "What is 6 times 7?\n\n  (keep *this* exactly)  ";
    world.owner_says(&root.id, prompt);
    world.wait_bot_post(&root.id, "with the first text", |p| {
        p.message.contains("The answer is")
    });
    eprintln!(
        "METRIC prompt_to_first_text_ms={}",
        sent.elapsed().as_millis()
    );
    let done = world.wait_bot_post(&root.id, "with the completion line", |p| {
        p.message.starts_with("✅ Done")
    });
    assert!(done.message.contains("tokens"), "{}", done.message);

    // The text reached OpenCode exactly as written.
    assert_eq!(world.prompts_seen_by_llm(), vec![prompt.to_string()]);

    let replies = world.bot_posts_in_thread(&root.id);
    let answer = replies
        .iter()
        .find(|p| p.message.contains("The answer is"))
        .expect("answer post");
    assert!(
        answer
            .message
            .contains("The answer is **42**. That is all."),
        "{}",
        answer.message
    );
    assert!(
        answer.message.contains("> 💭"),
        "reasoning summary missing: {}",
        answer.message
    );
    assert!(
        !answer.message.contains("⏳"),
        "status line left behind: {}",
        answer.message
    );
    // Answer, then the completion line as a new post (which notifies), nothing else.
    assert_eq!(replies.len(), 2, "{replies:#?}");
    assert!(replies[1].create_at >= replies[0].create_at);
}

#[test]
fn consecutive_prompts_in_one_thread_are_each_answered_at_once() {
    let world = World::started();
    let (id, _) = world.new_session("Conversation");
    let root = world.wait_root(&id);
    for round in 1..=3 {
        let sent = Instant::now();
        world.owner_says(&root.id, &format!("round {round}"));
        world.wait_bot_post(&root.id, "echo", |p| {
            p.message.contains(&format!("echo: round {round}"))
        });
        if round > 1 {
            eprintln!(
                "METRIC followup_prompt_to_text_ms={}",
                sent.elapsed().as_millis()
            );
        }
        let completions = |world: &World| {
            world
                .bot_posts_in_thread(&root.id)
                .iter()
                .filter(|p| p.message.starts_with("✅ Done"))
                .count()
        };
        let bot = world.mattermost.bot().id;
        world
            .mattermost
            .wait_until(SOON, |view| {
                let done = view
                    .thread(&root.id)
                    .iter()
                    .filter(|p| p.user_id == bot && p.message.starts_with("✅ Done"))
                    .count();
                (done == round).then_some(())
            })
            .unwrap_or_else(|| panic!("round {round}: {} completion lines", completions(&world)));
    }
    let posts = world.bot_posts_in_thread(&root.id);
    assert!(
        posts.iter().all(|p| !p.message.contains("Queued")),
        "a prompt after a finished turn was queued: {posts:#?}"
    );
    assert_eq!(
        world.prompts_seen_by_llm(),
        vec!["round 1", "round 2", "round 3"]
    );
}

#[test]
fn streamed_text_is_edited_in_place_at_most_about_twice_a_second() {
    let world = World::started();
    let (id, _) = world.new_session("Streaming");
    let root = world.wait_root(&id);
    // About 3 s of steady streaming: 30 pieces, 100 ms apart.
    let mut steps = Vec::new();
    for i in 0..30 {
        steps.push(text(&format!("piece{i} ")));
        steps.push(Step::Pause(Duration::from_millis(100)));
    }
    world.llm.script("stream slowly", vec![steps]);
    let sent = Instant::now();
    world.owner_says(&root.id, "stream slowly");
    world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
    let elapsed = sent.elapsed();
    let answer = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .find(|p| p.message.contains("piece0"))
        .expect("answer");
    assert!(answer.message.contains("piece29"), "{}", answer.message);
    // Edited in place while streaming, not just written once at the end...
    assert!(answer.edit_count >= 3, "only {} edits", answer.edit_count);
    // ...and never faster than about two edits a second (plus the final one).
    let allowed = (elapsed.as_secs_f64() * 2.0).ceil() as u32 + 2;
    assert!(
        answer.edit_count <= allowed,
        "{} edits in {elapsed:?}; at most {allowed} expected",
        answer.edit_count
    );
}

#[test]
fn tool_calls_get_a_one_line_summary() {
    let world = World::started();
    let (id, _) = world.new_session("Tools");
    let root = world.wait_root(&id);
    world.llm.script(
        "list the files",
        vec![
            vec![Step::ToolCall {
                name: "bash".into(),
                arguments: json!({"command": "echo tool-ran", "description": "print"}),
            }],
            vec![text("The command printed tool-ran.")],
        ],
    );
    world.owner_says(&root.id, "list the files");
    world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
    let answer = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .find(|p| p.message.contains("The command printed"))
        .expect("answer");
    assert!(
        answer.message.contains("🔧 **bash** `echo tool-ran` · ✓"),
        "{}",
        answer.message
    );
}

#[test]
fn subagents_show_in_the_parents_reply_and_get_no_thread() {
    if crate::support::dialect() == crate::support::Dialect::V2 {
        // A v2 session has no `task` tool ("Unknown tool: task"), so no subagents; a child session
        // getting no thread is checked in v2 by sessions_in_other_directories_get_threads....
        eprintln!("skipped in v2: v2 sessions have no task tool");
        return;
    }
    let world = World::started();
    let (id, _) = world.new_session("Delegation");
    let root = world.wait_root(&id);
    world.llm.script(
        "delegate the inspection",
        vec![
            vec![Step::ToolCall {
                name: "task".into(),
                arguments: json!({
                    "description": "inspect things",
                    "prompt": "subtask-inspect the repository",
                    "subagent_type": "general"
                }),
            }],
            vec![text("The subagent reported back.")],
        ],
    );
    world
        .llm
        .script("subtask-inspect", vec![vec![text("inspection complete")]]);
    world.owner_says(&root.id, "delegate the inspection");
    world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
    let answer = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .find(|p| p.message.contains("The subagent reported back."))
        .expect("answer");
    assert!(answer.message.contains("🔧 **task**"), "{}", answer.message);
    assert!(answer.message.contains("🤖 subagent"), "{}", answer.message);

    let sessions = world.opencode.get("/experimental/session");
    let children: Vec<&str> = sessions
        .as_array()
        .expect("session list")
        .iter()
        .filter(|s| s["parentID"] == id.as_str())
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(!children.is_empty(), "OpenCode made no subagent session");
    for child in children {
        assert!(
            world.roots_for(child).is_empty(),
            "subagent {child} got a thread"
        );
    }
}

#[test]
fn three_sessions_stream_in_parallel_without_cross_talk() {
    let world = World::started();
    let gate = Gate::new();
    let mut threads = Vec::new();
    for name in ["alpha", "bravo", "charlie"] {
        let (id, _) = world.new_session(name);
        let root = world.wait_root(&id);
        world.llm.script(
            &format!("speak {name}"),
            vec![vec![
                text(&format!("{name} begins. ")),
                Step::Gate(gate.clone()),
                text(&format!("{name} ends.")),
            ]],
        );
        threads.push((name, root));
    }
    for (name, root) in &threads {
        world.owner_says(&root.id, &format!("speak {name}"));
    }
    // All three are mid-stream at once before any may finish.
    for (name, root) in &threads {
        world.wait_bot_post(&root.id, "with its first words", |p| {
            p.message.contains(&format!("{name} begins."))
        });
    }
    gate.open();
    for (name, root) in &threads {
        world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
        let posts = world.bot_posts_in_thread(&root.id);
        let all: String = posts.iter().map(|p| p.message.clone()).collect();
        assert!(
            all.contains(&format!("{name} begins. {name} ends.")),
            "{all}"
        );
        for (other, _) in &threads {
            if other != name {
                assert!(!all.contains(other), "{other} leaked into {name}: {all}");
            }
        }
    }
}

#[test]
fn a_reply_streaming_when_the_bridge_stops_says_so() {
    let mut world = World::started();
    let (id, _) = world.new_session("Interrupted");
    let root = world.wait_root(&id);
    let gate = Gate::new();
    world.llm.script(
        "long job",
        vec![vec![
            text("halfway there. "),
            Step::Gate(gate.clone()),
            text("done."),
        ]],
    );
    world.owner_says(&root.id, "long job");
    let streaming = world.wait_bot_post(&root.id, "first text", |p| {
        p.message.contains("halfway there")
    });
    assert!(streaming.message.contains("⏳"), "{}", streaming.message);
    world.stop_bridge();
    gate.open();
    let after = world.mattermost.post(&streaming.id).expect("reply post");
    assert!(!after.message.contains("⏳"), "{}", after.message);
    assert!(
        after.message.contains("halfway there."),
        "{}",
        after.message
    );
    assert!(
        after
            .message
            .contains("stopped while this reply was streaming"),
        "{}",
        after.message
    );
}

#[test]
fn a_message_sent_while_busy_is_queued_and_sent_after() {
    let world = World::started();
    let (id, _) = world.new_session("Queue");
    let root = world.wait_root(&id);
    let gate = Gate::new();
    world.llm.script(
        "first job",
        vec![vec![
            text("first working. "),
            Step::Gate(gate.clone()),
            text("first finished."),
        ]],
    );
    world
        .llm
        .script("second job", vec![vec![text("second finished.")]]);
    world.owner_says(&root.id, "first job");
    world.wait_bot_post(&root.id, "first text", |p| {
        p.message.contains("first working")
    });
    world.owner_says(&root.id, "second job");
    world.wait_bot_post(&root.id, "queued notice", |p| {
        p.message.contains("Queued behind the running turn")
    });
    gate.open();
    world.wait_bot_post(&root.id, "second answer", |p| {
        p.message.contains("second finished.")
    });
    assert_eq!(world.prompts_seen_by_llm(), vec!["first job", "second job"]);
}

#[test]
fn long_replies_continue_in_new_posts_without_cutting_code_open() {
    let world = World::started();
    let (id, _) = world.new_session("Long");
    let root = world.wait_root(&id);
    let paragraph = "word ".repeat(200);
    let mut reply = String::new();
    for i in 0..12 {
        reply.push_str(&format!("Paragraph {i}: {paragraph}\n\n"));
    }
    reply.push_str("```rust\n");
    for i in 0..400 {
        reply.push_str(&format!("let line_{i} = {i};\n"));
    }
    reply.push_str("```\nEND-OF-REPLY");
    let chunks: Vec<Step> = reply
        .as_bytes()
        .chunks(2000)
        .map(|c| text(std::str::from_utf8(c).unwrap()))
        .collect();
    world.llm.script("write a lot", vec![chunks]);
    world.owner_says(&root.id, "write a lot");
    world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
    let posts: Vec<Post> = world
        .bot_posts_in_thread(&root.id)
        .into_iter()
        .filter(|p| !p.message.starts_with("✅"))
        .collect();
    assert!(
        posts.len() >= 2,
        "expected a continuation post, got {}",
        posts.len()
    );
    for post in &posts {
        assert!(post.message.chars().count() <= 16383);
        let fences = post
            .message
            .lines()
            .filter(|l| l.starts_with("```"))
            .count();
        assert_eq!(
            fences % 2,
            0,
            "a code block was cut open:\n{}",
            post.message
        );
    }
    assert!(posts.last().unwrap().message.contains("END-OF-REPLY"));
    let joined: String = posts
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(joined.contains("let line_0 = 0;") && joined.contains("let line_399 = 399;"));
}

#[test]
fn main_dm_commands_help_sessions_attach_and_errors() {
    let mut world = World::new();
    // A session from before the bridge's first start gets no thread automatically.
    let (old_id, old_slug) = world.new_session("Old work");
    world.start_bridge();
    let (new_id, _) = world.new_session("New work");
    let new_root = world.wait_root(&new_id);
    assert!(world.roots_for(&old_id).is_empty());

    let owner = world.mattermost.owner().id;
    let dm = world.dm.clone();
    let say = |text: &str| world.mattermost.post_as(&owner, &dm, "", text).unwrap();

    say("!help");
    world.wait_bot_post("", "help", |p| p.message.contains("!attach <session>"));

    say("!sessions");
    let list = world.wait_bot_post("", "session list", |p| {
        p.message.starts_with("**Sessions**")
    });
    assert!(
        list.message.contains(&new_id[new_id.len() - 8..]),
        "{}",
        list.message
    );
    assert!(
        list.message.contains(&new_root.id),
        "thread link missing: {}",
        list.message
    );
    assert!(
        list.message
            .contains(&format!("!attach {}", &old_id[old_id.len() - 8..])),
        "{}",
        list.message
    );
    assert!(list.message.contains("idle"), "{}", list.message);

    // A v2 session has no slug: attach it by the end of its id.
    let old_name = if crate::support::is_v2() {
        old_id[old_id.len() - 8..].to_string()
    } else {
        old_slug
    };
    say(&format!("!attach {old_name}"));
    let old_root = world.wait_root(&old_id);
    world.wait_bot_post("", "attach confirmation", |p| {
        p.message.contains("is attached") && p.message.contains(&old_root.id)
    });
    say(&format!("!attach {}", &old_id[old_id.len() - 8..]));
    world.wait_bot_post("", "already attached", |p| {
        p.message.contains("already has a thread")
    });

    // Sessions made in the same hour share the start of their ids: a prefix is ambiguous.
    say("!attach ses_");
    world.wait_bot_post("", "ambiguity", |p| {
        p.message.contains("matches 2 sessions")
    });
    say("!attach nothing-like-this");
    world.wait_bot_post("", "not found", |p| {
        p.message.contains("No session matches")
    });

    say("!frobnicate");
    world.wait_bot_post("", "unknown command", |p| {
        p.message.contains("Unknown command `!frobnicate`") && p.message.contains("!help")
    });
    say("please fix the bug");
    world.wait_bot_post("", "where prompts go", |p| {
        p.message.contains("Prompts go in a session's thread")
    });
    assert!(
        world.prompts_seen_by_llm().is_empty(),
        "a main-DM message reached OpenCode"
    );

    // An attached thread routes prompts like any other.
    world.owner_says(&old_root.id, "hello old session");
    world.wait_bot_post(&old_root.id, "echo", |p| {
        p.message.contains("echo: hello old session")
    });
}

#[test]
fn replies_in_unknown_threads_get_a_notice() {
    let world = World::started();
    let owner = world.mattermost.owner().id;
    let stray_root = world
        .mattermost
        .post_as(&owner, &world.dm, "", "!help")
        .unwrap();
    world.wait_bot_post("", "help", |p| p.message.contains("!attach"));
    world.owner_says(&stray_root.id, "is anyone there?");
    world.wait_bot_post(&stray_root.id, "notice", |p| {
        p.message.contains("not linked to any OpenCode session")
    });
    assert!(world.prompts_seen_by_llm().is_empty());
}

#[test]
fn deleted_session_ends_its_thread_and_later_replies_are_refused() {
    let world = World::started();
    let (id, _) = world.new_session("Short lived");
    let root = world.wait_root(&id);
    world
        .opencode
        .delete_session(&id, world.opencode.project_dir());
    world.wait_bot_post(&root.id, "end notice", |p| {
        p.message.contains("This session ended after")
    });
    world.owner_says(&root.id, "are you still there?");
    world.wait_bot_post(&root.id, "refusal", |p| {
        p.message.contains("This session has ended")
    });
    assert!(
        world.prompts_seen_by_llm().is_empty(),
        "a prompt went to an ended session"
    );
}

#[test]
fn restart_keeps_routing_and_creates_no_duplicate_threads() {
    let mut world = World::started();
    let (first, _) = world.new_session("Before restart");
    let first_root = world.wait_root(&first);
    world.stop_bridge();

    // Created while the bridge was stopped: its thread appears when it starts again.
    let (second, _) = world.new_session("While stopped");
    world.start_bridge();
    let second_root = world.wait_root(&second);

    world.owner_says(&first_root.id, "still there?");
    world.wait_bot_post(&first_root.id, "echo", |p| {
        p.message.contains("echo: still there?")
    });
    world.owner_says(&second_root.id, "and you?");
    world.wait_bot_post(&second_root.id, "echo", |p| {
        p.message.contains("echo: and you?")
    });

    world.stop_bridge();
    // Deleted while the bridge was stopped: its thread says so when the bridge is back.
    world
        .opencode
        .delete_session(&second, world.opencode.project_dir());
    world.start_bridge();
    world.wait_bot_post(&second_root.id, "end notice", |p| {
        p.message.contains("This session ended after")
    });
    let (third, _) = world.new_session("After second restart");
    world.wait_root(&third);
    assert_eq!(world.roots_for(&first).len(), 1);
    assert_eq!(world.roots_for(&second).len(), 1);
    let state = std::fs::read_to_string(world.state.path().join("state.json")).unwrap();
    assert!(state.contains(&first_root.id) && state.contains(&second_root.id));
    world.owner_says(&first_root.id, "first still works");
    world.wait_bot_post(&first_root.id, "echo", |p| {
        p.message.contains("echo: first still works")
    });
}

#[test]
fn after_sigkill_threads_keep_routing_and_no_root_is_duplicated() {
    let world = World::new();
    let binary = || world.spawn_binary();
    let mut bridge = binary();
    bridge.wait_for_line("ready");
    let (first, _) = world.new_session("Survives a kill");
    let first_root = world.wait_root(&first);
    world.owner_says(&first_root.id, "before the kill");
    world.wait_bot_post(&first_root.id, "completion", |p| {
        p.message.starts_with("✅ Done")
    });
    bridge.kill();

    // Created while the bridge was dead: it gets a thread when the bridge is back, and only one.
    let (second, _) = world.new_session("Born while dead");
    let mut bridge = binary();
    bridge.wait_for_line("ready");
    let second_root = world.wait_root(&second);
    world.owner_says(&first_root.id, "after the kill");
    world.wait_bot_post(&first_root.id, "echo", |p| {
        p.message.contains("echo: after the kill")
    });
    world.owner_says(&second_root.id, "new thread works");
    world.wait_bot_post(&second_root.id, "echo", |p| {
        p.message.contains("echo: new thread works")
    });
    // Figures for the record, not assertions: the benchmark is where resource use is judged.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", bridge.child.id())).unwrap_or_default();
    for (field, name) in [("VmRSS:", "debug_build_rss_kb"), ("Threads:", "threads")] {
        if let Some(value) = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
        {
            eprintln!("METRIC {name}={value}");
        }
    }
    let (code, _) = bridge.terminate();
    assert_eq!(code, 0);
    assert_eq!(world.roots_for(&first).len(), 1);
    assert_eq!(world.roots_for(&second).len(), 1);
    assert_eq!(
        world.prompts_seen_by_llm(),
        vec!["before the kill", "after the kill", "new thread works"]
    );
}

#[test]
fn a_dropped_websocket_resumes_and_replays_what_was_missed() {
    let world = World::started();
    let (id, _) = world.new_session("Resume");
    let root = world.wait_root(&id);
    let upgrades = |view: &[crate::support::mattermost::Request]| {
        view.iter().filter(|r| r.status == 101).count()
    };
    // The fake logs an upgrade before it holds the socket that `drop_websockets` shuts; a drop in
    // between would miss the new connection. The old socket is gone within moments of its drop,
    // long before the bridge's reconnect (backoff from 1 s), so one open socket is the new one.
    let wait_reconnect = |before: usize| {
        world
            .mattermost
            .wait_until(SOON, |view| {
                (upgrades(view.requests()) > before && view.ws_connection_count() == 1)
                    .then_some(())
            })
            .expect("the bridge never reconnected");
    };

    // A resumed connection gets no new hello. Staying quiet past the 5 s hello deadline is the
    // scenario itself: the bridge must not take it for a rejected token and reconnect. Mattermost's
    // side alone, so the v1 run checks it and the v2 run does not wait for it again.
    let before = upgrades(&world.mattermost.requests());
    world.mattermost.drop_websockets();
    wait_reconnect(before);
    let resumed = upgrades(&world.mattermost.requests());
    if crate::support::dialect() == crate::support::Dialect::V1 {
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(
            upgrades(&world.mattermost.requests()),
            resumed,
            "a quiet resumed websocket was dropped"
        );
    }

    // Posted while the bridge is disconnected: the resumed connection replays it.
    world.mattermost.drop_websockets();
    world.owner_says(&root.id, "sent during the gap");
    wait_reconnect(resumed);
    world.wait_bot_post(&root.id, "echo", |p| {
        p.message.contains("echo: sent during the gap")
    });
    assert_eq!(world.prompts_seen_by_llm(), vec!["sent during the gap"]);
}

#[test]
fn posts_by_anyone_but_the_owner_never_reach_opencode() {
    let world = World::started();
    let (id, _) = world.new_session("Guarded");
    let root = world.wait_root(&id);
    let mattermost = &world.mattermost;
    let stranger = mattermost.stranger();
    let bot = mattermost.bot().id;

    // A plain user cannot post in the owner's DM at all; the server refuses.
    assert!(
        mattermost
            .post_as(&stranger.id, &world.dm, &root.id, "run rm -rf")
            .is_err()
    );
    // A system admin can, in the session's thread and in the main DM: the bridge must ignore both.
    let admin = mattermost.admin();
    mattermost
        .post_as(&admin.id, &world.dm, &root.id, "admin prompt")
        .expect("admins may post anywhere");
    mattermost
        .post_as(&admin.id, &world.dm, "", "!sessions")
        .unwrap();
    // The stranger's own DM with the bot, and a public channel, are not the owner DM.
    let stranger_dm = mattermost.dm_channel(&bot, &stranger.id);
    mattermost
        .post_as(&stranger.id, &stranger_dm, "", "!sessions")
        .unwrap();
    let channel =
        mattermost.create_channel("town-square", &[&stranger.id, &bot, &mattermost.owner().id]);
    let public = mattermost
        .post_as(&stranger.id, &channel, "", "!help @testbot")
        .unwrap();
    // Not even the owner is obeyed outside the owner DM.
    mattermost
        .post_as(
            &mattermost.owner().id,
            &channel,
            &public.id,
            "owner prompt elsewhere",
        )
        .unwrap();
    mattermost
        .post_as(&mattermost.owner().id, &channel, "", "!sessions")
        .unwrap();

    // The owner's own prompt afterwards is answered; everything before it was ignored.
    world.owner_says(&root.id, "only me");
    world.wait_bot_post(&root.id, "echo", |p| p.message.contains("echo: only me"));
    world.wait_bot_post(&root.id, "completion", |p| p.message.starts_with("✅ Done"));
    assert_eq!(world.prompts_seen_by_llm(), vec!["only me"]);
    let bot_posts: Vec<Post> = [&world.dm, &stranger_dm, &channel]
        .iter()
        .flat_map(|channel| mattermost.posts_in(channel))
        .filter(|p| p.user_id == bot && p.id != root.id)
        .collect();
    // Exactly the answer and the completion line: no command reply, no notice, anywhere.
    assert_eq!(
        bot_posts.len(),
        2,
        "the bot answered someone else: {bot_posts:#?}"
    );
    assert!(bot_posts.iter().all(|p| p.root_id == root.id));
}
