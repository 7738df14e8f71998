//! `make demo`: the whole chain without a Mattermost account. It starts the project's fake
//! Mattermost, a real `opencode serve` whose LLM is scripted, and the bridge; plays a short
//! conversation; and prints the DM thread as a reader would see it. Any broken link fails it with
//! exit code 1, so it doubles as a smoke test (`cargo test` runs it too).

// Without the test harness, the support modules' own #[test] functions are dropped and leave
// their imports unused.
#[allow(unused_imports)]
#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use support::bridge::Bridge;
use support::llm::{FakeLlm, Step};
use support::mattermost::{FakeMattermost, Post};
use support::opencode::OpenCode;
use support::{SOON, TempDir};

/// What the owner types, and what the scripted model answers.
const PROMPT: &str = "What is in the project directory?";

/// Fields drop in order: the bridge stops before the servers it talks to.
struct Demo {
    bridge: Option<Bridge>,
    llm: FakeLlm,
    opencode: OpenCode,
    mattermost: FakeMattermost,
    _state: TempDir,
    dm: String,
    session_id: String,
    root: Option<Post>,
}

/// One scene of the conversation. A step that fails ends the demo with its message.
struct Scene {
    title: &'static str,
    play: fn(&mut Demo) -> Result<(), String>,
}

/// The conversation, in order.
const SCENES: &[Scene] = &[
    Scene {
        title: "a session starts in OpenCode, and the bridge opens a thread for it",
        play: session_starts,
    },
    Scene {
        title: "the owner replies in the thread: that is the prompt",
        play: owner_prompts,
    },
    Scene {
        title: "the agent asks before running a command; the owner allows it with a ✅ reaction",
        play: permission_answered,
    },
    Scene {
        title: "the answer streams into one post, edited in place, with its tool call",
        play: reply_streams,
    },
    Scene {
        title: "a completion line follows as a new post, so the phone is notified",
        play: completion_line,
    },
];

fn main() {
    let started = Instant::now();
    println!("Starting the fake Mattermost, `opencode serve` with a scripted LLM, and the bridge…");
    let mut demo = Demo::start();
    println!(
        "Ready in {:.1}s. DM between @{} (the bot) and @{} (the owner):\n",
        started.elapsed().as_secs_f64(),
        demo.mattermost.bot().username,
        demo.mattermost.owner().username
    );
    for (number, scene) in SCENES.iter().enumerate() {
        println!("── {}. {}", number + 1, scene.title);
        if let Err(problem) = (scene.play)(&mut demo) {
            eprintln!("\ndemo FAILED at step {}: {problem}", number + 1);
            std::process::exit(1);
        }
        println!();
    }
    if let Some(bridge) = demo.bridge.take()
        && let Err(e) = bridge.stop()
    {
        eprintln!("demo FAILED: the bridge did not stop cleanly: {e}");
        std::process::exit(1);
    }
    println!(
        "demo passed in {:.1}s: session → thread → prompt → permission → streamed reply → completion line",
        started.elapsed().as_secs_f64()
    );
}

impl Demo {
    fn start() -> Demo {
        let llm = FakeLlm::start();
        // Commands need the owner's permission, as a cautious set-up would have it.
        let opencode = OpenCode::start(&llm, json!({"permission": {"bash": "ask"}}));
        let mattermost = FakeMattermost::start();
        let state = TempDir::new("demo");
        let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
        let bridge = Bridge::start(&mattermost, &opencode.url(), state.path());
        Demo {
            bridge: Some(bridge),
            llm,
            opencode,
            mattermost,
            _state: state,
            dm,
            session_id: String::new(),
            root: None,
        }
    }

    fn root_id(&self) -> Result<String, String> {
        self.root
            .as_ref()
            .map(|root| root.id.clone())
            .ok_or_else(|| "no thread yet".to_string())
    }

    /// Bot posts in the thread other than the root, oldest first.
    fn bot_replies(&self) -> Result<Vec<Post>, String> {
        let root_id = self.root_id()?;
        let bot = self.mattermost.bot().id;
        Ok(self
            .mattermost
            .thread(&root_id)
            .into_iter()
            .filter(|post| post.user_id == bot && post.id != root_id)
            .collect())
    }
}

fn session_starts(demo: &mut Demo) -> Result<(), String> {
    let session = demo
        .opencode
        .create_session(demo.opencode.project_dir(), Some("Tour of the project"));
    demo.session_id = session["id"]
        .as_str()
        .ok_or("OpenCode returned a session without an id")?
        .to_string();
    let (dm, session_id) = (demo.dm.clone(), demo.session_id.clone());
    let root = demo
        .mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
        })
        .ok_or("the bridge made no thread for the new session")?;
    show(&demo.mattermost.bot().username, &root.message, false);
    demo.root = Some(root);
    Ok(())
}

fn owner_prompts(demo: &mut Demo) -> Result<(), String> {
    demo.llm.script(
        PROMPT,
        vec![
            vec![
                Step::Reasoning("The owner wants a listing; ls will do.".into()),
                Step::ToolCall {
                    name: "bash".into(),
                    arguments: json!({"command": "ls", "description": "List the project"}),
                },
            ],
            vec![Step::Text(
                "The project directory is a fresh checkout with nothing in it yet. \
                 Ask me to scaffold something and I will."
                    .into(),
            )],
        ],
    );
    let root_id = demo.root_id()?;
    let post = demo
        .mattermost
        .post_as(&demo.mattermost.owner().id, &demo.dm, &root_id, PROMPT)
        .map_err(|(status, body)| format!("the owner's post was refused: {status} {body}"))?;
    show(&demo.mattermost.owner().username, &post.message, true);
    Ok(())
}

fn permission_answered(demo: &mut Demo) -> Result<(), String> {
    let root_id = demo.root_id()?;
    let bot = demo.mattermost.bot().id;
    let request = demo
        .mattermost
        .wait_until(SOON, |view| {
            view.thread(&root_id)
                .into_iter()
                .find(|p| p.user_id == bot && p.message.contains("Permission"))
        })
        .ok_or("the bridge posted no permission request")?;
    show(&demo.mattermost.bot().username, &request.message, true);
    demo.mattermost
        .react_as(&demo.mattermost.owner().id, &request.id, "white_check_mark")
        .map_err(|(status, body)| format!("the reaction was refused: {status} {body}"))?;
    println!("   (@{} reacts ✅)", demo.mattermost.owner().username);
    let request_id = request.id.clone();
    let decided = demo
        .mattermost
        .wait_until(SOON, |view| {
            view.post(&request_id)
                .filter(|p| p.message != request.message)
                .cloned()
        })
        .ok_or("the permission post never showed the decision")?;
    println!("   (edited)");
    show(&demo.mattermost.bot().username, &decided.message, true);
    Ok(())
}

fn reply_streams(demo: &mut Demo) -> Result<(), String> {
    let bot = demo.mattermost.bot().username;
    let deadline = Instant::now() + SOON;
    let mut shown = String::new();
    loop {
        let reply = demo
            .bot_replies()?
            .into_iter()
            .find(|post| !post.message.starts_with("✅") && !post.message.contains("Permission"));
        if let Some(reply) = reply {
            if reply.message != shown {
                let label = if shown.is_empty() { "posted" } else { "edited" };
                println!("   ({label})");
                show(&bot, &reply.message, true);
                shown = reply.message.clone();
            }
            if reply.message.contains("scaffold something") && reply.message.contains("bash") {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the reply never showed the tool call and the final text; last seen: {shown:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn completion_line(demo: &mut Demo) -> Result<(), String> {
    let root_id = demo.root_id()?;
    let bot = demo.mattermost.bot().id;
    let dm = demo.dm.clone();
    let done = demo
        .mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.user_id == bot && p.root_id == root_id && p.message.starts_with("✅"))
        })
        .ok_or("no completion line")?;
    show(&demo.mattermost.bot().username, &done.message, true);
    Ok(())
}

/// Prints a post the way a chat client lays it out: author, then the text, indented; thread
/// replies one step further in.
fn show(author: &str, message: &str, in_thread: bool) {
    let indent = if in_thread { "   ↳ " } else { "" };
    let pad = " ".repeat(indent.chars().count() + 2);
    println!("{indent}@{author}");
    for line in message.lines() {
        println!("{pad}{line}");
    }
}
