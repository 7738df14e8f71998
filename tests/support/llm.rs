//! A scripted OpenAI-compatible chat-completions server, so a real OpenCode can run whole turns offline
//! and the tests decide exactly what the "model" says, when it calls a tool and when it stalls.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The model id the fake answers with; `OpenCode` configures it as `fake/fake-model`.
pub const MODEL_ID: &str = "fake-model";

/// A running fake LLM bound to `127.0.0.1:0`. Dropping it stops the server and its connections.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// One piece of a scripted assistant turn, streamed in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// Streamed as `delta.content`, in deltas of about 20 characters.
    Text(String),
    /// Streamed as `delta.reasoning_content`, which OpenCode turns into a `reasoning` part.
    Reasoning(String),
    /// A function call; the turn then finishes with `finish_reason: "tool_calls"`.
    ToolCall { name: String, arguments: Value },
    /// Stalls the stream, with everything before it already sent.
    Pause(Duration),
    /// Stalls the stream, with everything before it already sent, until the test calls `Gate::open`.
    Gate(Gate),
}

/// A latch that holds a scripted stream until the test opens it. Once open it stays open.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    open: Mutex<bool>,
    changed: Condvar,
}

struct Shared {
    stop: AtomicBool,
    scripts: Mutex<Vec<Script>>,
    requests: Mutex<Vec<Value>>,
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

struct Script {
    trigger: String,
    turns: Vec<Vec<Step>>,
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// What one chat-completions request is answered with.
struct Reply {
    steps: Vec<Step>,
    prompt_tokens: u64,
}

/// Longer than any test waits for anything (`support::SOON`).
const GATE_LIMIT: Duration = Duration::from_secs(120);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn open(&self) {
        *lock(&self.0.open) = true;
        self.0.changed.notify_all();
    }

    /// Blocks until the test opens the gate, or for at most `GATE_LIMIT`, so a test that fails before
    /// opening it does not leave the stream's thread blocked forever.
    fn wait(&self) {
        let deadline = Instant::now() + GATE_LIMIT;
        let mut open = lock(&self.0.open);
        while !*open {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            open = self
                .0
                .changed
                .wait_timeout(open, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl FakeLlm {
    pub fn start() -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake llm: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake llm: local_addr");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            scripts: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fake-llm-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("fake llm: spawn acceptor")
        };
        FakeLlm {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The OpenAI-style base URL, `http://127.0.0.1:P/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// When the latest user message of a request contains `trigger`, answer with `turns[k]`, where `k` is
    /// the number of assistant messages after that user message in the request. A tool-call turn is thus
    /// followed by the next entry once OpenCode sends the tool result back. Past the end the answer is a
    /// short plain "done". A later script for an overlapping trigger takes precedence.
    pub fn script(&self, trigger: &str, turns: Vec<Vec<Step>>) {
        lock(&self.shared.scripts).push(Script {
            trigger: trigger.to_owned(),
            turns,
        });
    }

    /// Every chat-completions request body received so far, side requests included, in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Release streams held at a gate, then cut every connection so their threads see an error and end.
        for script in lock(&self.shared.scripts).iter() {
            for step in script.turns.iter().flatten() {
                if let Step::Gate(gate) = step {
                    gate.open();
                }
            }
        }
        for stream in lock(&self.shared.connections).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // The acceptor is blocked in accept(); a connection of our own wakes it to see the stop flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("fake-llm-conn-{id}"))
            .spawn(move || {
                let _ = serve_connection(stream, &shared);
                lock(&shared.connections).remove(&id);
            });
        if spawned.is_err() {
            eprintln!("fake llm: could not spawn a connection thread");
        }
    }
}

/// Serves requests on one keep-alive connection until the client closes it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader)? {
        let close = header(&request, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        match (
            request.method.as_str(),
            request.path.split('?').next().unwrap_or(""),
        ) {
            ("GET", "/v1/models") => {
                let models = json!({"object": "list", "data": [
                    {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}
                ]});
                write_simple(
                    &mut writer,
                    "200 OK",
                    "application/json",
                    &models.to_string(),
                )?;
            }
            ("POST", "/v1/chat/completions") => {
                let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
                    let error = json!({"error": {"message": "body is not JSON", "type": "invalid_request_error"}});
                    write_simple(
                        &mut writer,
                        "400 Bad Request",
                        "application/json",
                        &error.to_string(),
                    )?;
                    continue;
                };
                lock(&shared.requests).push(body.clone());
                let reply = plan_reply(shared, &body);
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                if body["stream"].as_bool() == Some(true) {
                    write_stream(&mut writer, id, &reply)?;
                } else {
                    write_whole(&mut writer, id, &reply)?;
                }
            }
            _ => {
                let error = json!({"error": {"message": format!("no route for {} {}", request.method, request.path)}});
                write_simple(
                    &mut writer,
                    "404 Not Found",
                    "application/json",
                    &error.to_string(),
                )?;
            }
        }
        if close {
            break;
        }
    }
    Ok(())
}

/// Reads one HTTP/1.1 request, or `None` when the client closed the connection between requests.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let path = words.next().unwrap_or("").to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let mut request = Request {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if header(&request, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        request.body = read_chunked(reader)?;
    } else if let Some(length) = header(&request, "content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| io::Error::other("bad content-length"))?;
        request.body = vec![0; length];
        reader.read_exact(&mut request.body)?;
    }
    Ok(Some(request))
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = line.trim().split(';').next().unwrap_or("");
        let size =
            usize::from_str_radix(size, 16).map_err(|_| io::Error::other("bad chunk size"))?;
        if size == 0 {
            // Skip trailers up to the blank line that ends the body.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}

fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn plan_reply(shared: &Shared, body: &Value) -> Reply {
    let prompt_tokens = (body.to_string().len() as u64 / 4).max(1);
    let messages = body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let latest_user = messages.iter().rposition(|m| m["role"] == "user");
    let user_text = latest_user
        .map(|i| message_text(&messages[i]))
        .unwrap_or_default();
    if let Some(answer) = side_request_answer(body, &user_text) {
        return Reply {
            steps: vec![Step::Text(answer)],
            prompt_tokens,
        };
    }
    let assistants_after = latest_user
        .map(|i| {
            messages[i + 1..]
                .iter()
                .filter(|m| m["role"] == "assistant")
                .count()
        })
        .unwrap_or(0);
    let scripts = lock(&shared.scripts);
    let steps = match scripts
        .iter()
        .rev()
        .find(|s| user_text.contains(&s.trigger))
    {
        Some(script) => script
            .turns
            .get(assistants_after)
            .cloned()
            .unwrap_or_else(|| vec![Step::Text("done".into())]),
        None => vec![Step::Text(format!("echo: {user_text}"))],
    };
    Reply {
        steps,
        prompt_tokens,
    }
}

/// OpenCode's own side requests (a title for a new session, a summary for compaction) carry no `tools` and
/// their own system prompt. They get a short answer and never consume a scripted turn: a title is the
/// first five words of the prompt, anything else a one-line summary.
fn side_request_answer(body: &Value, user_text: &str) -> Option<String> {
    let has_tools = body["tools"]
        .as_array()
        .is_some_and(|tools| !tools.is_empty());
    if has_tools {
        return None;
    }
    let system = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "system")
        .map(message_text)
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase();
    // OpenCode 1.18.33 sends "You are a title generator…" with the prompt as the latest user message.
    if system.contains("title generator") {
        return Some(title_words(user_text));
    }
    Some("Summary: the conversation so far.".into())
}

/// The first few words of the user's text, ignoring OpenCode's framing lines, as a plausible title.
fn title_words(user_text: &str) -> String {
    let words: Vec<&str> = user_text
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with("Generate a title"))
        .flat_map(str::split_whitespace)
        .take(5)
        .collect();
    let title = words.join(" ");
    let title = title.trim_end_matches(|c: char| c.is_ascii_punctuation());
    if title.is_empty() {
        "Untitled".into()
    } else {
        title.to_owned()
    }
}

/// The text of a chat message whose `content` is either a string or an array of typed parts.
fn message_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn write_simple(
    writer: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    writer.flush()
}

/// Streams the reply as SSE `chat.completion.chunk` events in a chunked response, then `[DONE]`.
fn write_stream(writer: &mut TcpStream, id: u64, reply: &Reply) -> io::Result<()> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )?;
    writer.flush()?;
    let chunk_id = format!("chatcmpl-{id}");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let event = |delta: Value, finish_reason: Value| {
        json!({
            "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    };
    send_event(
        writer,
        &event(json!({"role": "assistant", "content": ""}), Value::Null),
    )?;
    let mut completion_chars = 0;
    let mut tool_calls = 0;
    for step in &reply.steps {
        match step {
            Step::Text(text) | Step::Reasoning(text) => {
                let field = if matches!(step, Step::Text(_)) {
                    "content"
                } else {
                    "reasoning_content"
                };
                for piece in split_text(text, 20) {
                    send_event(writer, &event(json!({ field: piece }), Value::Null))?;
                }
                completion_chars += text.chars().count();
            }
            Step::ToolCall { name, arguments } => {
                let arguments = arguments.to_string();
                let head = json!({"tool_calls": [{
                    "index": tool_calls, "id": format!("call_{id}_{tool_calls}"), "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]});
                send_event(writer, &event(head, Value::Null))?;
                for piece in split_text(&arguments, 20) {
                    let more = json!({"tool_calls": [{"index": tool_calls, "function": {"arguments": piece}}]});
                    send_event(writer, &event(more, Value::Null))?;
                }
                completion_chars += arguments.len();
                tool_calls += 1;
            }
            Step::Pause(duration) => thread::sleep(*duration),
            Step::Gate(gate) => gate.wait(),
        }
    }
    let finish_reason = if tool_calls > 0 { "tool_calls" } else { "stop" };
    send_event(writer, &event(json!({}), json!(finish_reason)))?;
    let completion_tokens = (completion_chars as u64 / 4).max(1);
    let usage = json!({
        "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID, "choices": [],
        "usage": {
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": reply.prompt_tokens + completion_tokens,
        },
    });
    send_event(writer, &usage)?;
    send_chunk(writer, b"data: [DONE]\n\n")?;
    send_chunk(writer, b"")
}

/// Answers a request without `stream:true` as one `chat.completion` object, honouring pauses and gates.
fn write_whole(writer: &mut TcpStream, id: u64, reply: &Reply) -> io::Result<()> {
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for step in &reply.steps {
        match step {
            Step::Text(text) => content.push_str(text),
            Step::Reasoning(text) => reasoning.push_str(text),
            Step::ToolCall { name, arguments } => tool_calls.push(json!({
                "id": format!("call_{id}_{}", tool_calls.len()), "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()},
            })),
            Step::Pause(duration) => thread::sleep(*duration),
            Step::Gate(gate) => gate.wait(),
        }
    }
    let completion_tokens = ((content.len() + reasoning.len()) as u64 / 4).max(1);
    let mut message = json!({"role": "assistant", "content": content});
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    let finish_reason = if tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    if !tool_calls.is_empty() {
        message["tool_calls"] = json!(tool_calls);
    }
    let body = json!({
        "id": format!("chatcmpl-{id}"), "object": "chat.completion", "model": MODEL_ID,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": reply.prompt_tokens + completion_tokens,
        },
    });
    write_simple(writer, "200 OK", "application/json", &body.to_string())
}

fn send_event(writer: &mut TcpStream, data: &Value) -> io::Result<()> {
    send_chunk(writer, format!("data: {data}\n\n").as_bytes())
}

/// Writes one chunk of a chunked body and flushes it, so the client sees each delta as it is produced.
/// An empty chunk ends the body.
fn send_chunk(writer: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    write!(writer, "{:x}\r\n", bytes.len())?;
    writer.write_all(bytes)?;
    writer.write_all(b"\r\n")?;
    writer.flush()
}

/// Splits text into pieces of at most `size` characters, on character boundaries.
fn split_text(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size)
        .map(|piece| piece.iter().collect())
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{RecvTimeoutError, unbounded};
    use std::time::Instant;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Posts a streaming request and returns the parsed `data:` payloads, `[DONE]` included.
    fn post(llm: &FakeLlm, messages: Value, tools: bool) -> Vec<String> {
        let (sender, receiver) = unbounded();
        let _reader = stream_in_background(llm, messages, tools, sender);
        let mut events = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let event: String = receiver
                .recv_deadline(deadline)
                .expect("stream ended in time");
            events.push(event.clone());
            if event == "[DONE]" {
                return events;
            }
        }
    }

    fn stream_in_background(
        llm: &FakeLlm,
        messages: Value,
        tools: bool,
        sender: crossbeam_channel::Sender<String>,
    ) -> JoinHandle<()> {
        let url = format!("{}/chat/completions", llm.base_url());
        let mut body = json!({"model": MODEL_ID, "stream": true, "messages": messages});
        if tools {
            body["tools"] =
                json!([{"type": "function", "function": {"name": "bash", "parameters": {}}}]);
        }
        thread::spawn(move || {
            let response = ureq::post(&url)
                .header("content-type", "application/json")
                .send(body.to_string())
                .expect("post chat completion");
            // A read error ends the stream like EOF does: the receiver then sees a disconnect.
            for line in BufReader::new(response.into_body().into_reader()).lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data: ")
                    && sender.send(data.to_owned()).is_err()
                {
                    return;
                }
            }
        })
    }

    /// The text streamed as `delta.content`, and the tool calls as (name, arguments) pairs.
    fn collect(events: &[String]) -> (String, Vec<(String, String)>, Option<String>) {
        let mut text = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        let mut finish = None;
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Value = serde_json::from_str(event).expect("chunk is JSON");
            let Some(choice) = chunk["choices"].get(0) else {
                continue;
            };
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            for call in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let index = call["index"].as_u64().unwrap() as usize;
                if calls.len() <= index {
                    calls.push((
                        call["function"]["name"].as_str().unwrap().to_owned(),
                        String::new(),
                    ));
                }
                calls[index]
                    .1
                    .push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
        (text, calls, finish)
    }

    #[test]
    fn scripted_turns_follow_the_tool_result_and_unscripted_requests_echo() {
        let llm = FakeLlm::start();
        let arguments = json!({"command": "echo hi", "description": "say hi"});
        llm.script(
            "run it",
            vec![
                vec![Step::ToolCall {
                    name: "bash".into(),
                    arguments: arguments.clone(),
                }],
                vec![Step::Text(
                    "The command printed hi, and this sentence is long.".into(),
                )],
            ],
        );

        let first = post(
            &llm,
            json!([{"role": "user", "content": [{"type": "text", "text": "please run it"}]}]),
            true,
        );
        let (text, calls, finish) = collect(&first);
        assert_eq!(text, "");
        assert_eq!(calls, vec![("bash".to_owned(), arguments.to_string())]);
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        let usage: Value = serde_json::from_str(&first[first.len() - 2]).unwrap();
        assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        let after_tool = json!([
            {"role": "user", "content": "please run it"},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "tool_call_id": "call_1", "content": "hi"},
        ]);
        let second = post(&llm, after_tool, true);
        assert!(
            second.len() > 4,
            "long text arrives in several deltas: {second:?}"
        );
        let (text, _, finish) = collect(&second);
        assert_eq!(text, "The command printed hi, and this sentence is long.");
        assert_eq!(finish.as_deref(), Some("stop"));

        let past_end = json!([
            {"role": "user", "content": "please run it"},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]);
        assert_eq!(collect(&post(&llm, past_end, true)).0, "done");
        assert_eq!(
            collect(&post(
                &llm,
                json!([{"role": "user", "content": "hello"}]),
                true
            ))
            .0,
            "echo: hello"
        );

        let title = json!([
            {"role": "system", "content": "You are a title generator."},
            {"role": "user", "content": "Generate a title for this conversation:\n"},
            {"role": "user", "content": "please run it"},
        ]);
        assert_eq!(collect(&post(&llm, title, false)).0, "please run it");
        assert_eq!(llm.requests().len(), 5);
    }

    #[test]
    fn a_gate_holds_one_stream_while_others_are_served() {
        let llm = FakeLlm::start();
        let gate = Gate::new();
        llm.script(
            "hold",
            vec![vec![
                Step::Text("before".into()),
                Step::Gate(gate.clone()),
                Step::Text(" after".into()),
            ]],
        );

        let (sender, held) = unbounded();
        let reader = stream_in_background(
            &llm,
            json!([{"role": "user", "content": "hold"}]),
            true,
            sender,
        );
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while collect(&seen).0 != "before" {
            seen.push(
                held.recv_deadline(deadline)
                    .expect("text before the gate arrives"),
            );
        }

        let other = post(
            &llm,
            json!([{"role": "user", "content": "meanwhile"}]),
            true,
        );
        assert_eq!(collect(&other).0, "echo: meanwhile");
        assert_eq!(
            held.recv_timeout(Duration::from_millis(100)),
            Err(RecvTimeoutError::Timeout)
        );

        gate.open();
        loop {
            let event = held
                .recv_deadline(deadline)
                .expect("stream ends after the gate opens");
            seen.push(event.clone());
            if event == "[DONE]" {
                break;
            }
        }
        assert_eq!(collect(&seen).0, "before after");
        reader.join().unwrap();
    }

    #[test]
    fn dropping_the_server_releases_a_held_stream() {
        let llm = FakeLlm::start();
        llm.script("hold", vec![vec![Step::Gate(Gate::new())]]);
        let (sender, held) = unbounded();
        let reader = stream_in_background(
            &llm,
            json!([{"role": "user", "content": "hold"}]),
            true,
            sender,
        );
        held.recv_timeout(DEADLINE).expect("the stream starts");
        drop(llm);
        let deadline = Instant::now() + DEADLINE;
        while held.recv_deadline(deadline) != Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        {
        }
        let _ = reader.join();
    }
}
