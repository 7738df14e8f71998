//! The OpenCode client's thread-control calls (permissions, questions, abort, diff, files, todos,
//! models, agents, session commands, prompts with attachments) against a real `opencode serve` and
//! the scripted LLM, without the bridge.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use opencode_mattermost::files;
use opencode_mattermost::opencode::rest::{FileRead, OcError, OpenCodeClient, Refusal};
use opencode_mattermost::opencode::{ModelRef, PermissionReply, PromptInput, Role};

use crate::support::SOON;
use crate::support::llm::{FakeLlm, Gate, MODEL_ID, Step};
use crate::support::opencode::OpenCode;

/// A valid 1×1 PNG: OpenCode decodes images, and a prompt with one it cannot decode is dropped.
const PNG: &[u8] = b"\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90\x77\x53\xde\x00\x00\x00\x0c\x49\x44\x41\x54\x78\x9c\x63\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00\x49\x45\x4e\x44\xae\x42\x60\x82";

fn client(server: &OpenCode) -> OpenCodeClient {
    OpenCodeClient::new(&server.url(), "opencode", None)
}

fn dir(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn new_session(client: &OpenCodeClient, directory: &str) -> String {
    client
        .create_session(directory, Some("api test"))
        .expect("create a session")
        .id
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

/// The content of every `tool` message the LLM has been sent, in arrival order.
fn tool_results(llm: &FakeLlm) -> Vec<String> {
    llm.requests()
        .iter()
        .flat_map(|request| request["messages"].as_array().cloned().unwrap_or_default())
        .filter(|message| message["role"] == "tool")
        .map(|message| match &message["content"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn wait_tool_result(llm: &FakeLlm, needle: &str) -> String {
    wait_for(&format!("a tool result containing {needle:?}"), || {
        tool_results(llm).into_iter().find(|r| r.contains(needle))
    })
}

fn wait_idle(client: &OpenCodeClient, session_id: &str, directory: &str) {
    wait_for(&format!("session {session_id} to be idle"), || {
        let statuses = client.session_status(directory).ok()?;
        (!statuses.contains_key(session_id)).then_some(())
    });
}

fn bash(command: &str) -> Step {
    Step::ToolCall {
        name: "bash".into(),
        arguments: json!({"command": command, "description": "Run a test command"}),
    }
}

#[test]
fn permission_requests_are_listed_and_answered_once_reject_and_always() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({"permission": {"bash": "ask"}}));
    let client = client(&server);
    let directory = dir(server.project_dir());

    // Once: the command runs and its output goes back to the model. `printf` keeps the output
    // ("ran-once") apart from the command text.
    llm.script(
        "perm-once",
        vec![
            vec![bash("printf 'ran-%s' once")],
            vec![Step::Text("ok".into())],
        ],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "perm-once").unwrap();
    let request = wait_for("the permission request", || {
        let pending = client.permissions(&directory).ok()?;
        pending.into_iter().find(|p| p.session_id == session)
    });
    assert_eq!(request.permission, "bash");
    assert!(request.id.starts_with("per"), "{request:?}");
    assert_eq!(request.patterns, vec!["printf 'ran-%s' once".to_string()]);
    assert!(
        request
            .metadata
            .iter()
            .any(|(k, v)| k == "command" && v == "printf 'ran-%s' once"),
        "{request:?}"
    );
    assert!(!request.always.is_empty(), "{request:?}");
    client
        .reply_permission(&request.id, &directory, PermissionReply::Once, None)
        .unwrap();
    wait_tool_result(&llm, "ran-once");
    wait_idle(&client, &session, &directory);
    // Answered twice: the request is gone, which is not the session being gone.
    match client.reply_permission(&request.id, &directory, PermissionReply::Once, None) {
        Err(OcError::NotFound(message)) => assert!(message.contains(&request.id), "{message}"),
        other => panic!("a second reply should be NotFound, got {other:?}"),
    }

    // Reject with a message: the model gets the message as feedback instead of the output.
    llm.script(
        "perm-reject",
        vec![
            vec![bash("printf 'ran-%s' rejected")],
            vec![Step::Text("ok".into())],
        ],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "perm-reject").unwrap();
    let request = wait_for("the second permission request", || {
        let pending = client.permissions(&directory).ok()?;
        pending.into_iter().find(|p| p.session_id == session)
    });
    client
        .reply_permission(
            &request.id,
            &directory,
            PermissionReply::Reject,
            Some("use ls-feedback-marker instead"),
        )
        .unwrap();
    wait_tool_result(&llm, "ls-feedback-marker");
    wait_idle(&client, &session, &directory);
    assert!(
        !tool_results(&llm)
            .iter()
            .any(|r| r.contains("ran-rejected"))
    );

    // Always: a second matching command in the same session runs without asking.
    llm.script(
        "perm-always",
        vec![
            vec![bash("printf 'ran-%s' always1")],
            vec![bash("printf 'ran-%s' always2")],
            vec![Step::Text("ok".into())],
        ],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "perm-always").unwrap();
    let request = wait_for("the third permission request", || {
        let pending = client.permissions(&directory).ok()?;
        pending.into_iter().find(|p| p.session_id == session)
    });
    client
        .reply_permission(&request.id, &directory, PermissionReply::Always, None)
        .unwrap();
    wait_tool_result(&llm, "ran-always2");
    assert!(client.permissions(&directory).unwrap().is_empty());
}

#[test]
fn question_requests_are_listed_answered_and_rejected() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({}));
    let client = client(&server);
    let directory = dir(server.project_dir());
    let ask = Step::ToolCall {
        name: "question".into(),
        arguments: json!({"questions": [
            {"question": "Which colour?", "header": "Colour", "options": [
                {"label": "Red", "description": "warm"},
                {"label": "Blue", "description": "cool"},
            ]},
            {"question": "Which sizes?", "header": "Size", "multiple": true, "options": [
                {"label": "Small", "description": "s"},
                {"label": "Large", "description": "l"},
            ]},
        ]}),
    };
    llm.script(
        "ask-me",
        vec![vec![ask.clone()], vec![Step::Text("ok".into())]],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "ask-me").unwrap();
    let request = wait_for("the question request", || {
        let pending = client.questions(&directory).ok()?;
        pending.into_iter().find(|q| q.session_id == session)
    });
    assert!(request.id.starts_with("que"), "{request:?}");
    assert_eq!(request.questions.len(), 2);
    assert_eq!(request.questions[0].question, "Which colour?");
    assert_eq!(request.questions[0].header, "Colour");
    let labels: Vec<&str> = request.questions[0]
        .options
        .iter()
        .map(|o| o.label.as_str())
        .collect();
    assert_eq!(labels, ["Red", "Blue"]);
    assert_eq!(request.questions[0].options[1].description, "cool");
    assert!(request.questions[1].multiple);
    client
        .reply_question(
            &request.id,
            &directory,
            &[
                vec!["Blue".to_string()],
                vec!["Small".to_string(), "Large".to_string()],
            ],
        )
        .unwrap();
    let result = wait_tool_result(&llm, "Blue");
    assert!(
        result.contains("Small") && result.contains("Large"),
        "{result}"
    );
    wait_idle(&client, &session, &directory);

    llm.script("ask-again", vec![vec![ask], vec![Step::Text("ok".into())]]);
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "ask-again").unwrap();
    let request = wait_for("the second question request", || {
        let pending = client.questions(&directory).ok()?;
        pending.into_iter().find(|q| q.session_id == session)
    });
    client.reject_question(&request.id, &directory).unwrap();
    wait_idle(&client, &session, &directory);
    assert!(client.questions(&directory).unwrap().is_empty());
    assert!(matches!(
        client.reject_question(&request.id, &directory),
        Err(OcError::NotFound(_))
    ));
}

#[test]
fn session_commands_work_against_a_real_server() {
    let llm = FakeLlm::start();
    let server = OpenCode::start(&llm, json!({}));
    let client = client(&server);
    let directory = dir(server.project_dir());

    let models = client.models(&directory).unwrap();
    let fake = models
        .iter()
        .find(|m| m.model.provider_id == "fake" && m.model.model_id == MODEL_ID)
        .unwrap_or_else(|| panic!("fake model missing from {models:?}"));
    assert!(fake.is_default);
    assert_eq!(fake.name, "Fake Model");

    let agents = client.agents(&directory).unwrap();
    for name in ["build", "plan"] {
        let agent = agents.iter().find(|a| a.name == name);
        assert_eq!(
            agent.map(|a| a.mode.as_str()),
            Some("primary"),
            "{agents:?}"
        );
    }
    assert!(
        !agents.iter().any(|a| a.name == "title"),
        "hidden agents are left out"
    );

    let other = server.new_project_dir("other");
    let other = dir(&other);
    assert!(client.directory_exists(&other).unwrap());
    assert!(
        !client
            .directory_exists(&format!("{other}/missing"))
            .unwrap()
    );
    assert!(
        !client
            .directory_exists(&format!("{other}/opencode.json"))
            .unwrap()
    );
    let created = client.create_session(&other, Some("elsewhere")).unwrap();
    assert_eq!(created.directory, other);
    assert_eq!(created.title, "elsewhere");
    let renamed = client.rename(&created.id, &other, "new name").unwrap();
    assert_eq!(renamed.title, "new name");
    assert_eq!(
        client.get_session(&created.id, &other).unwrap().title,
        "new name"
    );
    assert!(matches!(
        client.rename("ses_doesnotexist000000000", &other, "x"),
        Err(OcError::SessionNotFound(_))
    ));

    // Todos.
    llm.script(
        "plan-todos",
        vec![
            vec![Step::ToolCall {
                name: "todowrite".into(),
                arguments: json!({"todos": [
                    {"content": "write the tests", "status": "in_progress", "priority": "high"},
                    {"content": "ship it", "status": "pending", "priority": "low"},
                ]}),
            }],
            vec![Step::Text("ok".into())],
        ],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "plan-todos").unwrap();
    wait_idle_after_llm(&llm, &client, &session, &directory);
    let todos = client.todos(&session, &directory).unwrap();
    let summary: Vec<(&str, &str, &str)> = todos
        .iter()
        .map(|t| (t.content.as_str(), t.status.as_str(), t.priority.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("write the tests", "in_progress", "high"),
            ("ship it", "pending", "low")
        ]
    );

    // Diff after the model writes a file.
    // The harness leaves opencode.json uncommitted, so it shows up too.
    let before = client.diff(&session, &directory).unwrap();
    assert!(!before.contains("hello.txt"), "{before}");
    let written = server.project_dir().join("hello.txt");
    llm.script(
        "write-file",
        vec![
            vec![Step::ToolCall {
                name: "write".into(),
                arguments: json!({"filePath": written, "content": "hello\nworld\n"}),
            }],
            vec![Step::Text("ok".into())],
        ],
    );
    client.prompt(&session, &directory, "write-file").unwrap();
    let diff = wait_for("the session diff", || {
        let diff = client.diff(&session, &directory).ok()?;
        diff.contains("+world").then_some(diff)
    });
    assert!(diff.contains("+++ b/hello.txt\n"), "{diff}");
    assert!(diff.contains("@@ -0,0 +1,2 @@\n+hello\n+world\n"), "{diff}");

    // Files.
    let project = server.project_dir();
    std::fs::create_dir_all(project.join("notes")).unwrap();
    std::fs::write(project.join("notes/readme.txt"), "line one\nline two\n").unwrap();
    std::fs::write(project.join("notes/pixel.png"), PNG).unwrap();
    const LIMIT: u64 = 1024 * 1024;
    let read = |path: &str| client.read_file(&directory, path, LIMIT);
    let content = |path: &str| match read(path) {
        Ok(FileRead::Content(content)) => content,
        other => panic!("{path}: {other:?}"),
    };
    let text = content("notes/readme.txt");
    // OpenCode trims the trailing newline of text files.
    assert_eq!(text.bytes, b"line one\nline two");
    assert_eq!(text.mime, "text/plain");
    let image = content("notes/pixel.png");
    assert_eq!(image.bytes, PNG);
    assert_eq!(image.mime, "image/png");
    assert!(matches!(
        read("notes/missing.txt"),
        Err(OcError::NotFound(_))
    ));
    assert!(matches!(
        read("notes"),
        Ok(FileRead::Refused(Refusal::Directory))
    ));
    // Over the limit, whether the server sends it base64-encoded or as text: refused, and the body is
    // read no further than the limit allows.
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(project.join("notes/big.bin"), &big).unwrap();
    assert!(matches!(read("notes/big.bin"), Ok(FileRead::TooLarge)));
    std::fs::write(project.join("notes/big.txt"), "x".repeat(1024 * 1024 + 1)).unwrap();
    assert!(matches!(read("notes/big.txt"), Ok(FileRead::TooLarge)));
    std::fs::write(project.join("notes/fits.txt"), "y".repeat(1024 * 1024)).unwrap();
    assert_eq!(content("notes/fits.txt").bytes.len(), 1024 * 1024);
    // A symlink leading outside: the server refuses it, and so does the textual check for "..".
    let outside = server.new_project_dir("outside");
    std::fs::write(outside.join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), project.join("leak.txt")).unwrap();
    assert!(matches!(
        read("leak.txt"),
        Ok(FileRead::Refused(Refusal::NotARegularFile))
    ));
    assert!(files::checked_relative_path("../outside/secret.txt").is_err());
    assert!(!matches!(
        read("../outside/secret.txt"),
        Ok(FileRead::Content(_))
    ));

    // Summarize.
    let model = ModelRef {
        provider_id: "fake".into(),
        model_id: MODEL_ID.into(),
    };
    client.summarize(&session, &directory, &model).unwrap();

    // Abort a turn held at a gate.
    let gate = Gate::new();
    llm.script(
        "hold-on",
        vec![vec![
            Step::Text("thinking".into()),
            Step::Gate(gate.clone()),
        ]],
    );
    let session = new_session(&client, &directory);
    client.prompt(&session, &directory, "hold-on").unwrap();
    wait_for("the turn to start", || {
        let statuses = client.session_status(&directory).ok()?;
        statuses.contains_key(&session).then_some(())
    });
    client.abort(&session, &directory).unwrap();
    wait_idle(&client, &session, &directory);
    gate.open();
    let messages = client.messages(&session, &directory, 10).unwrap();
    let last = messages.last().map(|(info, _)| info.clone()).unwrap();
    assert_eq!(last.role, Role::Assistant);
    assert_eq!(
        last.error.map(|(name, _)| name).as_deref(),
        Some("MessageAbortedError")
    );
    assert_eq!(last.agent.as_deref(), Some("build"));
}

/// Waits until the LLM has answered a request for the session's prompt and the session is idle again.
fn wait_idle_after_llm(llm: &FakeLlm, client: &OpenCodeClient, session: &str, directory: &str) {
    wait_for("the LLM to be asked", || {
        (!llm.requests().is_empty()).then_some(())
    });
    wait_for("the turn to end", || {
        let messages = client.messages(session, directory, 20).ok()?;
        let done = messages.iter().any(|(info, _)| {
            info.role == Role::Assistant && info.completed_ms.is_some() && info.error.is_none()
        }) && !client.session_status(directory).ok()?.contains_key(session);
        done.then_some(())
    });
}

#[test]
fn prompt_with_sends_images_text_files_model_and_agent() {
    let llm = FakeLlm::start();
    // Declares the fake model able to read images, as a real vision model would be.
    let server = OpenCode::start(
        &llm,
        json!({"provider": {"fake": {"models": {MODEL_ID: {
            "attachment": true,
            "modalities": {"input": ["text", "image", "pdf"], "output": ["text"]},
        }}}}}),
    );
    let client = client(&server);
    let directory = dir(server.project_dir());
    let session = new_session(&client, &directory);
    let input = PromptInput {
        text: "look-at-these".into(),
        files: vec![
            files::attachment("pixel.png", PNG),
            files::attachment("lib.rs", b"fn secret_marker_fn() {}\n"),
        ],
        model: Some(ModelRef {
            provider_id: "fake".into(),
            model_id: MODEL_ID.into(),
        }),
        agent: Some("plan".into()),
        message_id: None,
        delivery: Default::default(),
    };
    client.prompt_with(&session, &directory, &input).unwrap();
    let request = wait_for("the prompt to reach the LLM", || {
        llm.requests()
            .into_iter()
            .find(|r| r.to_string().contains("look-at-these") && r["tools"].is_array())
    });
    let user = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .cloned()
        .unwrap();
    let parts = user["content"].as_array().cloned().unwrap_or_default();
    let image_url = format!("data:image/png;base64,{}", files::base64_encode(PNG));
    assert!(
        parts
            .iter()
            .any(|p| p["type"] == "image_url" && p["image_url"]["url"] == image_url.as_str()),
        "no image part in {user}"
    );
    let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(text.contains("fn secret_marker_fn() {}"), "{user}");
    wait_idle(&client, &session, &directory);
    let messages = client.messages(&session, &directory, 10).unwrap();
    let (first, _) = &messages[0];
    assert_eq!(first.role, Role::User);
    assert_eq!(first.agent.as_deref(), Some("plan"));
    assert_eq!(
        first.model, None,
        "user messages carry the model in another shape"
    );
}
