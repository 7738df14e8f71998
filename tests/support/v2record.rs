//! Records the v2 fixtures in `tests/fixtures/v2/` from a real `opencode serve` 1.18.33 and the
//! scripted LLM: for each scenario the live `/api/event` stream, the session's durable log as SSE
//! (`/api/session/{id}/event?after=0`) and as JSON (`/api/session/{id}/history?after=0`).
//!
//! An ignored test, run by hand to refresh them:
//! `cargo test --test it -- --ignored support::v2record --nocapture`.

#[cfg(test)]
mod record {
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use crossbeam_channel::{Receiver, RecvTimeoutError};
    use serde_json::{Value, json};

    use crate::support::llm::{FakeLlm, Gate, Step};
    use crate::support::opencode::OpenCode;

    /// A stream counts as finished once it has been quiet this long after the scenario ended (the v1
    /// fixtures used the same margin).
    const QUIET: Duration = Duration::from_millis(700);
    const DEADLINE: Duration = Duration::from_secs(60);

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2")
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(DEADLINE))
            .build()
            .into()
    }

    fn call(method: &str, url: &str, body: Option<Value>) -> (u16, String) {
        let agent = agent();
        let result = match (method, body) {
            ("GET", _) => agent.get(url).call(),
            ("POST", Some(body)) => agent
                .post(url)
                .header("content-type", "application/json")
                .send(body.to_string()),
            ("POST", None) => agent.post(url).send_empty(),
            _ => panic!("unsupported {method}"),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        assert!(status < 300, "{method} {url}: {status} {text}");
        (status, text)
    }

    /// The body bytes of an event stream as they arrive, after chunked decoding, read on a thread of
    /// its own (left to end when the server goes).
    struct Capture {
        chunks: Receiver<Vec<u8>>,
        bytes: Vec<u8>,
    }

    impl Capture {
        fn open(url: &str) -> Capture {
            let response = ureq::Agent::config_builder()
                .timeout_recv_body(Some(DEADLINE))
                .build()
                .new_agent()
                .get(url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let (sender, chunks) = crossbeam_channel::unbounded();
            std::thread::spawn(move || {
                let mut reader = response.into_body().into_reader();
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(n) = reader.read(&mut buffer) {
                    if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                        return;
                    }
                }
            });
            let mut capture = Capture {
                chunks,
                bytes: Vec::new(),
            };
            capture.wait_for("server.connected");
            capture
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.bytes).into_owned()
        }

        /// Waits until the stream holds `needle`; returns the line that has it.
        fn wait_for(&mut self, needle: &str) -> String {
            let deadline = Instant::now() + DEADLINE;
            loop {
                if let Some(line) = self.text().lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                match self.chunks.recv_deadline(deadline) {
                    Ok(chunk) => self.bytes.extend_from_slice(&chunk),
                    Err(_) => panic!(
                        "no {needle:?} in the stream within {DEADLINE:?}:\n{}",
                        self.text()
                    ),
                }
            }
        }

        /// Everything until the stream has been quiet for `QUIET`.
        fn finish(mut self) -> Vec<u8> {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match self.chunks.recv_timeout(QUIET) {
                    Ok(chunk) => self.bytes.extend_from_slice(&chunk),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                        return self.bytes;
                    }
                }
                assert!(Instant::now() < deadline, "the stream never went quiet");
            }
        }
    }

    struct Recorder {
        opencode: OpenCode,
        llm: FakeLlm,
    }

    impl Recorder {
        fn start(config: Value) -> Recorder {
            let llm = FakeLlm::start();
            let opencode = OpenCode::start(&llm, config);
            Recorder { opencode, llm }
        }

        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.opencode.url())
        }

        fn new_session(&self, title: &str) -> String {
            let (_, body) = call(
                "POST",
                &self.url("/api/session"),
                Some(json!({"title": title})),
            );
            let body: Value = serde_json::from_str(&body).expect("session json");
            body["data"]["id"].as_str().expect("session id").to_string()
        }

        fn prompt(&self, id: &str, text: &str) {
            call(
                "POST",
                &self.url(&format!("/api/session/{id}/prompt")),
                Some(json!({"prompt": {"text": text}, "delivery": "queue"})),
            );
        }

        /// Records one scenario: `act` runs with the live stream open and returns once the turn has
        /// ended; then the stream settles and the durable log is read.
        fn scenario(&self, name: &str, title: &str, act: impl FnOnce(&str, &mut Capture)) {
            let id = self.new_session(title);
            let mut live = Capture::open(&self.url("/api/event"));
            // Events right after `server.connected` can be lost; one request first avoids that (see
            // the v1 README).
            call("GET", &self.url("/api/health"), None);
            act(&id, &mut live);
            let live = live.finish();
            let log = Capture::open_log(&self.url(&format!("/api/session/{id}/event?after=0")));
            let (_, history) = call(
                "GET",
                &self.url(&format!("/api/session/{id}/history?after=0&limit=100")),
                None,
            );
            // Kept byte for byte; only checked to be JSON.
            serde_json::from_str::<Value>(&history).expect("history json");
            let dir = fixtures();
            std::fs::create_dir_all(&dir).expect("create fixtures dir");
            std::fs::write(dir.join(format!("{name}.event.sse")), live).expect("write");
            std::fs::write(dir.join(format!("{name}.log.sse")), log).expect("write");
            std::fs::write(dir.join(format!("{name}.history.json")), history).expect("write");
            eprintln!("recorded {name} ({id})");
        }
    }

    impl Capture {
        /// The durable log replays at once and then follows: what arrives before it goes quiet.
        fn open_log(url: &str) -> Vec<u8> {
            let response = ureq::Agent::config_builder()
                .timeout_recv_body(Some(DEADLINE))
                .build()
                .new_agent()
                .get(url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let (sender, chunks) = crossbeam_channel::unbounded();
            std::thread::spawn(move || {
                let mut reader = response.into_body().into_reader();
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(n) = reader.read(&mut buffer) {
                    if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                        return;
                    }
                }
            });
            Capture {
                chunks,
                bytes: Vec::new(),
            }
            .finish()
        }
    }

    fn text(s: &str) -> Step {
        Step::Text(s.to_string())
    }

    /// Waits for the session to leave `/api/session/active` (`…/wait` answers 503 "not available yet"
    /// on 1.18.33). Polling with a deadline: a recorder run by hand.
    fn wait_idle(recorder: &Recorder, id: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (_, active) = call("GET", &recorder.url("/api/session/active"), None);
            let active: Value = serde_json::from_str(&active).expect("active json");
            if active["data"].get(id).is_none() {
                return;
            }
            assert!(Instant::now() < deadline, "{id} still active: {active}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    #[ignore = "records tests/fixtures/v2 from a real server; run by hand"]
    fn record_v2_fixtures() {
        let recorder = Recorder::start(json!({}));
        let llm = &recorder.llm;
        llm.script(
            "say hello",
            vec![vec![text(
                "Hello from the fake model. This answer streams in a few deltas.",
            )]],
        );
        recorder.scenario("a-text", "text", |id, live| {
            recorder.prompt(id, "say hello");
            live.wait_for("session.next.text.ended");
            wait_idle(&recorder, id);
        });

        llm.script(
            "think first",
            vec![vec![
                Step::Reasoning("Let me think about it step by step.".into()),
                text("Here is the answer after thinking."),
            ]],
        );
        recorder.scenario("b-reasoning-text", "reasoning", |id, live| {
            recorder.prompt(id, "think first");
            live.wait_for("session.next.text.ended");
            wait_idle(&recorder, id);
        });

        llm.script(
            "please run echo",
            vec![
                vec![
                    text("I will run it."),
                    Step::ToolCall {
                        name: "bash".into(),
                        arguments: json!({"command": "echo hi", "description": "print hi"}),
                    },
                ],
                vec![text("It printed hi.")],
            ],
        );
        recorder.scenario("c-tool-call", "tool", |id, live| {
            recorder.prompt(id, "please run echo");
            live.wait_for("It printed hi.");
            wait_idle(&recorder, id);
        });

        llm.script(
            "ask me a question",
            vec![
                vec![Step::ToolCall {
                    name: "question".into(),
                    arguments: json!({"questions": [
                        {"question": "Which fruit?", "header": "Fruit",
                         "options": [{"label": "Apple", "description": "red"},
                                     {"label": "Banana", "description": "yellow"}]}
                    ]}),
                }],
                vec![text("Banana it is.")],
            ],
        );
        recorder.scenario("e-question", "question", |id, live| {
            recorder.prompt(id, "ask me a question");
            let asked: Value = sse_data(&live.wait_for("question.v2.asked"));
            let request = asked["data"]["id"].as_str().expect("question id");
            call(
                "POST",
                &recorder.url(&format!("/api/session/{id}/question/{request}/reply")),
                Some(json!({"answers": [["Banana"]]})),
            );
            live.wait_for("Banana it is.");
            wait_idle(&recorder, id);
        });

        let gate = Gate::new();
        llm.script(
            "a long answer",
            vec![vec![
                text("The first part arrives, "),
                Step::Gate(gate.clone()),
                text("and this part never does."),
            ]],
        );
        recorder.scenario("f-interrupted", "interrupt", |id, live| {
            recorder.prompt(id, "a long answer");
            live.wait_for("session.next.text.delta");
            call(
                "POST",
                &recorder.url(&format!("/api/session/{id}/interrupt")),
                None,
            );
            wait_idle(&recorder, id);
            gate.open();
        });
        drop(recorder);

        let recorder = Recorder::start(json!({"permission": {"bash": "ask"}}));
        recorder.llm.script(
            "please run echo",
            vec![
                vec![Step::ToolCall {
                    name: "bash".into(),
                    arguments: json!({"command": "echo hi", "description": "print hi"}),
                }],
                vec![text("It printed hi.")],
            ],
        );
        recorder.scenario("d-permission", "permission", |id, live| {
            recorder.prompt(id, "please run echo");
            let asked: Value = sse_data(&live.wait_for("permission.v2.asked"));
            let request = asked["data"]["id"].as_str().expect("permission id");
            call(
                "POST",
                &recorder.url(&format!("/api/session/{id}/permission/{request}/reply")),
                Some(json!({"reply": "once"})),
            );
            live.wait_for("It printed hi.");
            wait_idle(&recorder, id);
        });
    }

    /// The permission replies the first recording left out: a rejection with a message (the turn
    /// goes on, but the model is not shown the message), a bare rejection (the turn halts with no
    /// step end), and "always", whose `save` is the exact command on v2.
    #[test]
    #[ignore = "records tests/fixtures/v2 from a real server; run by hand"]
    fn record_v2_permission_replies() {
        let recorder = Recorder::start(json!({"permission": {"bash": "ask"}}));
        let bash = |command: &str| Step::ToolCall {
            name: "bash".into(),
            arguments: json!({"command": command, "description": "run it"}),
        };
        let reply = |id: &str, live: &mut Capture, body: Value| {
            let asked: Value = sse_data(&live.wait_for("permission.v2.asked"));
            let request = asked["data"]["id"].as_str().expect("permission id");
            call(
                "POST",
                &recorder.url(&format!("/api/session/{id}/permission/{request}/reply")),
                Some(body),
            );
            live.wait_for("permission.v2.replied");
        };
        recorder.llm.script(
            "please run date",
            vec![vec![bash("date")], vec![text("Not running it then.")]],
        );
        recorder.scenario("g-rejected-message", "rejected", |id, live| {
            recorder.prompt(id, "please run date");
            reply(
                id,
                live,
                json!({"reply": "reject", "message": "use the staging server instead"}),
            );
            wait_idle(&recorder, id);
        });
        recorder.llm.script(
            "please run uptime",
            vec![vec![bash("uptime")], vec![text("unreachable")]],
        );
        recorder.scenario("h-rejected", "rejected bare", |id, live| {
            recorder.prompt(id, "please run uptime");
            reply(id, live, json!({"reply": "reject"}));
            wait_idle(&recorder, id);
        });
        recorder.llm.script(
            "please echo twice",
            vec![
                vec![bash("echo again")],
                vec![bash("echo again")],
                vec![text("Both printed.")],
            ],
        );
        recorder.scenario("i-always", "always", |id, live| {
            recorder.prompt(id, "please echo twice");
            reply(id, live, json!({"reply": "always"}));
            live.wait_for("Both printed.");
            wait_idle(&recorder, id);
        });
    }

    fn sse_data(line: &str) -> Value {
        let data = line.strip_prefix("data: ").unwrap_or(line);
        serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

#[cfg(test)]
mod fixtures {
    use serde_json::Value;

    const NAMES: [&str; 9] = [
        "a-text",
        "b-reasoning-text",
        "c-tool-call",
        "d-permission",
        "e-question",
        "f-interrupted",
        "g-rejected-message",
        "h-rejected",
        "i-always",
    ];

    fn read(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/v2")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn events(sse: &str) -> Vec<Value> {
        sse.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).expect("each data line is JSON"))
            .collect()
    }

    /// What the v2 replay tests rely on: the durable log as SSE and as JSON are the same events,
    /// numbered 1, 2, 3… for one session, and every durable event of the live stream is in the log.
    #[test]
    fn the_recorded_durable_logs_are_whole_and_agree_with_the_live_streams() {
        for name in NAMES {
            let log = events(&read(&format!("{name}.log.sse")));
            let history: Value =
                serde_json::from_str(&read(&format!("{name}.history.json"))).expect("json");
            assert_eq!(history["data"].as_array(), Some(&log), "{name}");
            assert_eq!(history["hasMore"], false, "{name}");
            let seqs: Vec<u64> = log
                .iter()
                .map(|e| e["durable"]["seq"].as_u64().expect("seq"))
                .collect();
            assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>(), "{name}");
            let live: Vec<Value> = events(&read(&format!("{name}.event.sse")))
                .into_iter()
                .filter(|e| e.get("durable").is_some())
                .map(|mut e| {
                    // Live events also say where; the log's are all of one session.
                    e.as_object_mut().expect("object").remove("location");
                    e
                })
                .collect();
            assert_eq!(live, log, "{name}");
            let last = &log.last().expect("events")["type"];
            // A bare rejection halts the turn with no step end (1.18.33).
            let end = match name {
                "h-rejected" => last == "session.next.tool.failed",
                _ => last == "session.next.step.ended" || last == "session.next.step.failed",
            };
            assert!(end, "{name} ends with {last}");
        }
    }
}
