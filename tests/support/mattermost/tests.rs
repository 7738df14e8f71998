//! Tests of the fake itself, against what the captures of a real 5.36.1 server show. They talk to
//! it the way the bridge does: ureq for REST, tungstenite for the websocket.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use super::{FakeMattermost, RateLimit};

/// Deadline for every wait on the fake.
const WAIT: Duration = Duration::from_secs(3);

/// Keys of `post_create_response` in recorded-core.json.
const POST_KEYS: &[&str] = &[
    "id",
    "create_at",
    "update_at",
    "edit_at",
    "delete_at",
    "is_pinned",
    "user_id",
    "channel_id",
    "root_id",
    "parent_id",
    "original_id",
    "message",
    "type",
    "props",
    "hashtags",
    "pending_post_id",
    "reply_count",
    "last_reply_at",
    "participants",
    "is_following",
    "metadata",
];

/// Keys of `ws_posted_reply.data` in recorded-core.json.
const POSTED_DATA_KEYS: &[&str] = &[
    "channel_display_name",
    "channel_name",
    "channel_type",
    "mentions",
    "post",
    "sender_name",
    "set_online",
    "team_id",
];

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn new(fake: &FakeMattermost) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WAIT))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: fake.url(),
        }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        self.raw(method, path, token, "application/json", bytes.as_deref())
    }

    fn get(&self, path: &str, token: &str) -> Reply {
        self.call("GET", path, Some(token), None)
    }

    fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Option<&[u8]>,
    ) -> Reply {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
        let result = match method {
            "GET" | "DELETE" => {
                let mut request = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if token.is_some() {
                    request = request.header("Authorization", &auth);
                }
                request.call()
            }
            _ => {
                let mut request = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    other => panic!("unsupported method {other}"),
                };
                if token.is_some() {
                    request = request.header("Authorization", &auth);
                }
                match body {
                    Some(body) => request.header("Content-Type", content_type).send(body),
                    None => request.send_empty(),
                }
            }
        };
        let mut response = result.unwrap();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        Reply {
            status: response.status().as_u16(),
            headers,
            body: response.body_mut().read_to_vec().unwrap(),
        }
    }

    fn post(&self, token: &str, channel_id: &str, root_id: &str, message: &str) -> Reply {
        let body = json!({"channel_id": channel_id, "root_id": root_id, "message": message});
        self.call("POST", "/api/v4/posts", Some(token), Some(&body))
    }

    fn dm(&self, token: &str, a: &str, b: &str) -> String {
        let reply = self.call(
            "POST",
            "/api/v4/channels/direct",
            Some(token),
            Some(&json!([a, b])),
        );
        assert_eq!(reply.status, 201, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_owned()
    }
}

type Ws = WebSocket<TcpStream>;

fn ws_connect(fake: &FakeMattermost, token: Option<&str>, query: &str) -> Ws {
    let stream = TcpStream::connect(fake.url().trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request = format!("{}{query}", fake.websocket_url())
        .into_client_request()
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    }
    tungstenite::client(request, stream).unwrap().0
}

fn next_frame(ws: &mut Ws) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            _ => continue,
        }
    }
}

fn next_event(ws: &mut Ws, event: &str) -> Value {
    loop {
        let frame = next_frame(ws);
        if frame["event"] == event {
            return frame;
        }
    }
}

/// Reads until the connection ends, which must be without a close frame.
fn assert_dropped(ws: &mut Ws) {
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => panic!("the real server sends no close frame"),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the connection is still open")
            }
            Err(_) => return,
        }
    }
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

fn key_set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

fn embedded(value: &Value) -> Value {
    serde_json::from_str(value.as_str().unwrap()).unwrap()
}

#[test]
fn posted_events_have_the_captured_shape() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let mut ws = ws_connect(&fake, Some(&bot.token), "");
    let hello = next_frame(&mut ws);
    assert_eq!(hello["event"], "hello");
    assert_eq!(hello["seq"], 0);
    assert_eq!(hello["broadcast"]["user_id"], bot.id.as_str());
    assert_eq!(hello["data"]["connection_id"].as_str().unwrap().len(), 26);
    let online = next_frame(&mut ws);
    assert_eq!(online["event"], "status_change");
    assert_eq!(online["seq"], 1);
    assert_eq!(
        online["data"],
        json!({"status": "online", "user_id": bot.id})
    );

    let channel = client.dm(&alice.token, &alice.id, &bot.id);
    assert_eq!(
        client.dm(&alice.token, &alice.id, &bot.id),
        channel,
        "idempotent"
    );
    let info = client
        .get(&format!("/api/v4/channels/{channel}"), &bot.token)
        .json();
    let mut pair = [alice.id.clone(), bot.id.clone()];
    pair.sort();
    assert_eq!(info["name"], format!("{}__{}", pair[0], pair[1]));
    assert_eq!(
        (info["type"].as_str(), info["team_id"].as_str()),
        (Some("D"), Some(""))
    );

    let root = client.post(&alice.token, &channel, "", "hello bot");
    assert_eq!(root.status, 201);
    let root = root.json();
    assert_eq!(keys(&root), key_set(POST_KEYS));
    assert_eq!(root["props"], json!({}));
    let event = next_event(&mut ws, "posted");
    assert_eq!(
        keys(&event),
        key_set(&["event", "data", "broadcast", "seq"])
    );
    assert_eq!(keys(&event["data"]), key_set(POSTED_DATA_KEYS));
    assert_eq!(event["data"]["channel_display_name"], "@alice");
    assert_eq!(event["data"]["sender_name"], "@alice");
    assert_eq!(event["data"]["channel_type"], "D");
    assert_eq!(event["data"]["team_id"], "");
    assert_eq!(event["data"]["set_online"], true);
    assert_eq!(embedded(&event["data"]["mentions"]), json!([bot.id]));
    assert_eq!(embedded(&event["data"]["post"]), root);
    assert_eq!(
        event["broadcast"],
        json!({"omit_users": null, "user_id": "", "channel_id": channel, "team_id": ""})
    );

    let reply = client.post(
        &alice.token,
        &channel,
        root["id"].as_str().unwrap(),
        "a reply in thread",
    );
    let event = next_event(&mut ws, "posted");
    assert_eq!(keys(&event["data"]), key_set(POSTED_DATA_KEYS));
    let post = embedded(&event["data"]["post"]);
    assert_eq!(post["root_id"], root["id"]);
    assert_eq!(post["parent_id"], root["id"]);
    assert_eq!(post["reply_count"], 1);
    assert_eq!(post["id"], reply.json()["id"]);

    // The bot receives its own post, marked from_bot.
    let own = client.post(
        &bot.token,
        &channel,
        root["id"].as_str().unwrap(),
        "bot reply",
    );
    assert_eq!(own.json()["props"], json!({"from_bot": "true"}));
    let event = next_event(&mut ws, "posted");
    assert_eq!(event["data"]["sender_name"], "@testbot");
    assert_eq!(event["data"]["channel_display_name"], "@testbot");
    assert_eq!(embedded(&event["data"]["mentions"]), json!([alice.id]));
    assert_eq!(embedded(&event["data"]["post"])["reply_count"], 2);
    let seqs = event["seq"].as_i64().unwrap();
    assert!(seqs >= 4, "seq counts every event: {seqs}");

    let thread = fake.thread(root["id"].as_str().unwrap());
    let messages: Vec<&str> = thread.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(messages, ["hello bot", "a reply in thread", "bot reply"]);
}

#[test]
fn message_length_is_counted_in_runes() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let accepted = client.post(&bot.token, &channel, "", &"é".repeat(16383));
    assert_eq!(accepted.status, 201);
    let rejected = client.post(&bot.token, &channel, "", &"é".repeat(16384));
    assert_eq!(rejected.status, 400);
    let request_id = rejected.header("X-Request-Id").unwrap().to_owned();
    assert_eq!(
        rejected.json(),
        json!({
            "id": "model.post.is_valid.msg.app_error",
            "message": "Invalid message.",
            "detailed_error": "",
            "request_id": request_id,
            "status_code": 400
        })
    );
    let post_id = accepted.json()["id"].as_str().unwrap().to_owned();
    let patch = json!({"message": "x".repeat(16384)});
    let path = format!("/api/v4/posts/{post_id}/patch");
    assert_eq!(
        client
            .call("PUT", &path, Some(&bot.token), Some(&patch))
            .status,
        400
    );
    assert_eq!(fake.posts_in(&channel).len(), 1);
}

#[test]
fn root_id_must_name_a_live_root_in_the_same_channel() {
    let fake = FakeMattermost::start();
    let (bot, alice, mallory) = (fake.bot(), fake.owner(), fake.stranger());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let other = fake.dm_channel(&mallory.id, &bot.id);
    let root = fake.post_as(&alice.id, &channel, "", "root").unwrap();
    let reply = fake
        .post_as(&alice.id, &channel, &root.id, "reply")
        .unwrap();
    let error_of = |reply: Reply| {
        (
            reply.status,
            reply.json()["id"].as_str().unwrap().to_owned(),
        )
    };
    let root_error = (400, "api.post.create_post.root_id.app_error".to_owned());
    let missing = "a".repeat(26);
    assert_eq!(
        error_of(client.post(&bot.token, &channel, &missing, "x")),
        root_error
    );
    assert_eq!(
        error_of(client.post(&bot.token, &channel, &reply.id, "x")),
        root_error
    );
    assert_eq!(
        error_of(client.post(&bot.token, &other, &root.id, "x")),
        (
            400,
            "api.post.create_post.channel_root_id.app_error".to_owned()
        )
    );
    assert_eq!(
        error_of(client.post(&mallory.token, &channel, "", "x")),
        (403, "api.context.permissions.app_error".to_owned())
    );
    fake.delete_as(&alice.id, &root.id).unwrap();
    assert_eq!(
        error_of(client.post(&bot.token, &channel, &root.id, "x")),
        root_error
    );
    assert_eq!(
        fake.post_as(&bot.id, &channel, &root.id, "x").unwrap_err(),
        root_error
    );
    // Deleting a root deletes its replies.
    assert!(fake.post(&reply.id).unwrap().delete_at > 0);
    assert_eq!(
        client
            .get(&format!("/api/v4/posts/{}", reply.id), &bot.token)
            .status,
        404
    );
}

#[test]
fn channel_posts_page_after_a_post_id() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let ids: Vec<String> = (0..8)
        .map(|i| {
            fake.post_as(&alice.id, &channel, "", &format!("m{i}"))
                .unwrap()
                .id
        })
        .collect();
    let reply = fake
        .post_as(&bot.id, &channel, &ids[1], "reply to m1")
        .unwrap();
    fake.delete_as(&alice.id, &ids[4]).unwrap();
    let expected: Vec<&str> = ["m1", "m2", "m3", "m5", "m6", "m7", "reply to m1"].to_vec();

    let mut seen = Vec::new();
    let mut after = ids[0].clone();
    for _ in 0..10 {
        let path = format!("/api/v4/channels/{channel}/posts?after={after}&per_page=3");
        let page = client.get(&path, &bot.token).json();
        assert_eq!(
            keys(&page),
            key_set(&["order", "posts", "next_post_id", "prev_post_id"])
        );
        assert_eq!(page["prev_post_id"], after.as_str());
        let order: Vec<String> = page["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        // Newest first within a page.
        for id in order.iter().rev() {
            seen.push(page["posts"][id]["message"].as_str().unwrap().to_owned());
        }
        if order.is_empty() {
            break;
        }
        after = order[0].clone();
        if page["next_post_id"] == "" {
            break;
        }
        assert_eq!(order.len(), 3);
    }
    assert_eq!(seen, expected);

    // The posts map carries whole threads, beyond the page.
    let path = format!(
        "/api/v4/channels/{channel}/posts?after={}&per_page=1",
        ids[6]
    );
    let page = client.get(&path, &bot.token).json();
    assert_eq!(page["order"], json!([ids[7]]));
    assert_eq!(page["next_post_id"], reply.id.as_str());
    let path = format!(
        "/api/v4/channels/{channel}/posts?after={}&per_page=1",
        ids[7]
    );
    let page = client.get(&path, &bot.token).json();
    assert_eq!(page["order"], json!([reply.id]));
    assert!(page["posts"].get(&ids[1]).is_some());
    assert_eq!(page["next_post_id"], "");

    // Without a cursor: newest first, deleted posts left out.
    let page = client
        .get(&format!("/api/v4/channels/{channel}/posts"), &bot.token)
        .json();
    assert_eq!(page["order"].as_array().unwrap().len(), 8);
    assert!(page["posts"].get(&ids[4]).is_none());
    assert_eq!(
        client
            .get(
                &format!("/api/v4/channels/{channel}/posts?after=bad"),
                &bot.token
            )
            .status,
        400
    );
    assert_eq!(
        client
            .get(
                &format!("/api/v4/channels/{channel}/posts"),
                &fake.stranger().token
            )
            .status,
        403
    );
}

#[test]
fn rate_limit_answers_429_as_captured() {
    let fake = FakeMattermost::start();
    let bot = fake.bot();
    let client = Client::new(&fake);
    let plain = client.get("/api/v4/users/me", &bot.token);
    assert_eq!(plain.header("X-Ratelimit-Limit"), None);
    assert_eq!(
        plain.header("X-Version-Id"),
        Some(super::state::SERVER_VERSION)
    );
    fake.set_rate_limit(Some(RateLimit {
        per_second: 10,
        burst: 100,
    }));
    let started = std::time::Instant::now();
    let first = client.get("/api/v4/users/me", &bot.token);
    assert_eq!(
        (
            first.header("X-Ratelimit-Limit"),
            first.header("X-Ratelimit-Remaining"),
            first.header("X-Ratelimit-Reset")
        ),
        (Some("101"), Some("100"), Some("1"))
    );
    let mut allowed = 1;
    let limited = loop {
        let reply = client.get("/api/v4/users/me", &bot.token);
        if reply.status == 429 {
            break reply;
        }
        allowed += 1;
        assert!(allowed < 200, "never limited");
    };
    // The bucket refills at 10/s while the loop runs; on a quiet machine this is the captured
    // 101 allowed and `X-Ratelimit-Reset: 11`.
    let refilled = (started.elapsed().as_secs_f64() * 10.0).ceil() as i64;
    assert!((101..=102 + refilled).contains(&allowed), "{allowed}");
    assert_eq!(
        limited.header("Content-Type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(limited.header("Retry-After"), Some("1"));
    assert_eq!(limited.header("X-Ratelimit-Remaining"), Some("0"));
    let reset: i64 = limited
        .header("X-Ratelimit-Reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!((10 - refilled / 10..=11).contains(&reset), "{reset}");
    assert_eq!(limited.header("X-Request-Id"), None);
    assert_eq!(limited.text(), "limit exceeded\n");
    // Per token: another user is not limited.
    assert_eq!(
        client.get("/api/v4/users/me", &fake.owner().token).status,
        200
    );
    fake.set_rate_limit(None);
    assert_eq!(client.get("/api/v4/users/me", &bot.token).status, 200);
}

#[test]
fn reliable_reconnect_replays_or_says_hello_again() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let mut ws = ws_connect(&fake, Some(&bot.token), "");
    let connection_id = next_event(&mut ws, "hello")["data"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(next_frame(&mut ws)["seq"], 1);
    fake.drop_websockets();
    assert_dropped(&mut ws);
    fake.wait_until(WAIT, |v| (v.ws_connection_count() == 0).then_some(()))
        .unwrap();
    fake.post_as(&alice.id, &channel, "", "while disconnected 1")
        .unwrap();
    fake.post_as(&alice.id, &channel, "", "while disconnected 2")
        .unwrap();

    let query = format!("?connection_id={connection_id}&sequence_number=2");
    let mut ws = ws_connect(&fake, Some(&bot.token), &query);
    let frames: Vec<Value> = (0..4).map(|_| next_frame(&mut ws)).collect();
    let summary: Vec<(String, i64)> = frames
        .iter()
        .map(|f| {
            (
                f["event"].as_str().unwrap().to_owned(),
                f["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("status_change", 2),
            ("posted", 3),
            ("posted", 4),
            ("status_change", 5)
        ]
        .map(|(e, s)| (e.to_owned(), s))
    );
    assert_eq!(frames[0]["data"]["status"], "offline");
    assert_eq!(
        embedded(&frames[2]["data"]["post"])["message"],
        "while disconnected 2"
    );
    drop(ws);

    // An unknown id gets a fresh hello with a new id.
    let unknown = format!("?connection_id={}&sequence_number=7", "u".repeat(26));
    let mut ws = ws_connect(&fake, Some(&bot.token), &unknown);
    let hello = next_frame(&mut ws);
    assert_eq!(
        (hello["event"].as_str(), hello["seq"].as_i64()),
        (Some("hello"), Some(0))
    );
    assert_ne!(hello["data"]["connection_id"], connection_id.as_str());
    drop(ws);

    // Expired sessions too.
    fake.wait_until(WAIT, |v| (v.ws_connection_count() == 0).then_some(()))
        .unwrap();
    fake.expire_websocket_sessions();
    let mut ws = ws_connect(&fake, Some(&bot.token), &query);
    assert_eq!(next_frame(&mut ws)["event"], "hello");

    // 5.36 defaults: no connection id, no replay.
    fake.set_reliable_websockets(false);
    let mut ws = ws_connect(&fake, Some(&bot.token), &query);
    let hello = next_frame(&mut ws);
    assert_eq!(hello["data"]["connection_id"], "");
    assert_eq!(hello["seq"], 0);
}

#[test]
fn bad_header_token_is_silent_and_challenge_auth_works() {
    let fake = FakeMattermost::start();
    let bot = fake.bot();
    let mut ws = ws_connect(&fake, Some("not-a-token"), "");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e)) => assert!(matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        other => panic!("expected silence, got {other:?}"),
    }
    ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    let challenge =
        json!({"seq": 1, "action": "authentication_challenge", "data": {"token": bot.token}});
    ws.send(Message::text(challenge.to_string())).unwrap();
    let hello = next_frame(&mut ws);
    assert_eq!(hello["event"], "hello");
    assert_eq!(next_frame(&mut ws), json!({"status": "OK", "seq_reply": 1}));

    let mut ws = ws_connect(&fake, None, "");
    let bad = json!({"seq": 1, "action": "authentication_challenge", "data": {"token": "nope"}});
    ws.send(Message::text(bad.to_string())).unwrap();
    assert_dropped(&mut ws);
}

#[test]
fn typing_goes_to_the_other_members() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let mut bot_ws = ws_connect(&fake, Some(&bot.token), "");
    next_event(&mut bot_ws, "hello");
    let mut alice_ws = ws_connect(&fake, Some(&alice.token), "");
    next_event(&mut alice_ws, "hello");
    let root = fake.post_as(&alice.id, &channel, "", "q").unwrap();
    let typing = json!({"seq": 1, "action": "user_typing", "data": {"channel_id": channel, "parent_id": root.id}});
    bot_ws.send(Message::text(typing.to_string())).unwrap();
    let event = next_event(&mut alice_ws, "typing");
    assert_eq!(
        event["data"],
        json!({"parent_id": root.id, "user_id": bot.id})
    );
    assert_eq!(
        event["broadcast"],
        json!({"omit_users": {bot.id.clone(): true}, "user_id": "", "channel_id": channel, "team_id": ""})
    );
    loop {
        let frame = next_frame(&mut bot_ws);
        assert_ne!(frame["event"], "typing", "the typist is omitted");
        if frame.get("seq_reply").is_some() {
            assert_eq!(frame, json!({"status": "OK", "seq_reply": 1}));
            break;
        }
    }
    assert_eq!(
        fake.typing_events(),
        [(bot.id.clone(), channel.clone(), root.id.clone())]
    );
    let bad = json!({"seq": 2, "action": "user_typing", "data": {"channel_id": "x"}});
    bot_ws.send(Message::text(bad.to_string())).unwrap();
    let reply = next_frame(&mut bot_ws);
    assert_eq!(reply["status"], "FAIL");
    assert_eq!(
        reply["error"]["id"],
        "api.websocket_handler.invalid_param.app_error"
    );
    bot_ws.send(Message::Ping(vec![1, 2].into())).unwrap();
    loop {
        if let Message::Pong(payload) = bot_ws.read().unwrap() {
            assert_eq!(&payload[..], [1, 2]);
            break;
        }
    }
}

#[test]
fn reactions_edits_and_deletes_are_broadcast() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let mut ws = ws_connect(&fake, Some(&bot.token), "");
    next_event(&mut ws, "hello");
    let post = fake.post_as(&bot.id, &channel, "", "status").unwrap();

    let body = json!({"user_id": alice.id, "post_id": post.id, "emoji_name": "+1"});
    let saved = client.call("POST", "/api/v4/reactions", Some(&alice.token), Some(&body));
    assert_eq!(saved.status, 200, "{}", saved.text());
    assert_eq!(
        keys(&saved.json()),
        key_set(&[
            "user_id",
            "post_id",
            "emoji_name",
            "create_at",
            "update_at",
            "delete_at",
            "remote_id"
        ])
    );
    let added = next_event(&mut ws, "reaction_added");
    assert_eq!(embedded(&added["data"]["reaction"])["emoji_name"], "+1");
    assert_eq!(added["broadcast"]["channel_id"], channel.as_str());
    let other = json!({"user_id": bot.id, "post_id": post.id, "emoji_name": "x"});
    assert_eq!(
        client
            .call(
                "POST",
                "/api/v4/reactions",
                Some(&alice.token),
                Some(&other)
            )
            .status,
        403
    );
    let path = format!("/api/v4/users/{}/posts/{}/reactions/+1", alice.id, post.id);
    assert_eq!(
        client
            .call("DELETE", &path, Some(&alice.token), None)
            .json(),
        json!({"status": "OK"})
    );
    let removed = embedded(&next_event(&mut ws, "reaction_removed")["data"]["reaction"]);
    assert_eq!(removed["create_at"], 0);
    assert!(fake.reactions(&post.id).is_empty());

    let patch = format!("/api/v4/posts/{}/patch", post.id);
    let edit = json!({"message": "status (edited)", "file_ids": ["ignored"]});
    assert_eq!(
        client
            .call("PUT", &patch, Some(&alice.token), Some(&edit))
            .status,
        403
    );
    let edited = client
        .call("PUT", &patch, Some(&bot.token), Some(&edit))
        .json();
    assert_eq!(edited["message"], "status (edited)");
    assert!(edited["edit_at"].as_i64().unwrap() > 0);
    let event = embedded(&next_event(&mut ws, "post_edited")["data"]["post"]);
    assert_eq!(event["message"], "status (edited)");
    assert_eq!(fake.post(&post.id).unwrap().edit_count, 1);

    let path = format!("/api/v4/posts/{}", post.id);
    assert_eq!(
        client.call("DELETE", &path, Some(&bot.token), None).status,
        200
    );
    let deleted = embedded(&next_event(&mut ws, "post_deleted")["data"]["post"]);
    assert_eq!(
        (deleted["id"].as_str(), deleted["delete_at"].as_i64()),
        (Some(post.id.as_str()), Some(0))
    );
    assert_eq!(client.get(&path, &bot.token).status, 404);
    assert_eq!(
        client.call("DELETE", &path, Some(&bot.token), None).status,
        403
    );
    assert!(fake.posts_in(&channel).is_empty());
}

#[test]
fn files_upload_download_and_limits() {
    let fake = FakeMattermost::start();
    let (bot, alice) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let boundary = "XyZboundary";
    let content = b"hello file\n".repeat(20);
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\n{channel}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"hello world.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let upload = client.raw(
        "POST",
        "/api/v4/files",
        Some(&bot.token),
        &content_type,
        Some(&body),
    );
    assert_eq!(upload.status, 201, "{}", upload.text());
    let upload = upload.json();
    assert_eq!(upload["client_ids"], json!([]));
    let info = &upload["file_infos"][0];
    assert_eq!(
        (
            info["name"].as_str(),
            info["extension"].as_str(),
            info["size"].as_u64()
        ),
        (Some("hello world.txt"), Some("txt"), Some(220))
    );
    assert_eq!(info["mime_type"], "text/plain; charset=utf-8");
    let file_id = info["id"].as_str().unwrap().to_owned();

    let download = client.get(&format!("/api/v4/files/{file_id}"), &bot.token);
    assert_eq!(download.body, content);
    assert_eq!(
        download.header("Content-Disposition"),
        Some("attachment;filename=\"hello%20world.txt\"; filename*=UTF-8''hello%20world.txt")
    );
    assert_eq!(download.header("Cache-Control"), Some("private, no-cache"));
    // Not attached yet: only the uploader may read it.
    assert_eq!(
        client
            .get(&format!("/api/v4/files/{file_id}/info"), &alice.token)
            .status,
        403
    );

    let mut ws = ws_connect(&fake, Some(&alice.token), "");
    next_event(&mut ws, "hello");
    let post = json!({"channel_id": channel, "message": "file attached", "file_ids": [file_id]});
    let created = client
        .call("POST", "/api/v4/posts", Some(&bot.token), Some(&post))
        .json();
    assert_eq!(created["file_ids"], json!([file_id]));
    assert_eq!(created["metadata"]["files"][0]["post_id"], created["id"]);
    let event = next_event(&mut ws, "posted");
    assert_eq!(event["data"]["otherFile"], "true");
    let info = client
        .get(&format!("/api/v4/files/{file_id}/info"), &alice.token)
        .json();
    assert_eq!(info["post_id"], created["id"]);

    fake.set_max_file_size(100);
    let small = fake.upload_as(&bot.id, &channel, "ok.bin", &[0; 100]);
    assert_eq!(fake.file(&small).unwrap().1.len(), 100);
    let too_big = client.raw(
        "POST",
        "/api/v4/files",
        Some(&bot.token),
        &content_type,
        Some(&body),
    );
    assert_eq!(too_big.status, 413);
    assert_eq!(
        too_big.json()["id"],
        "api.file.upload_file.too_large_detailed.app_error"
    );
    let simple = format!("/api/v4/files?channel_id={channel}&filename=a.txt");
    assert_eq!(
        client
            .raw(
                "POST",
                &simple,
                Some(&bot.token),
                "text/plain",
                Some(b"abc")
            )
            .status,
        201
    );
    let stranger = client.raw(
        "POST",
        &simple,
        Some(&fake.stranger().token),
        "text/plain",
        Some(b"abc"),
    );
    assert_eq!(stranger.status, 403);
}

#[test]
fn bad_requests_get_mattermost_errors() {
    let fake = FakeMattermost::start();
    let bot = fake.bot();
    let client = Client::new(&fake);
    let unauthenticated = client.call("GET", "/api/v4/users/me", None, None);
    assert_eq!(unauthenticated.status, 401);
    let request_id = unauthenticated.header("X-Request-Id").unwrap().to_owned();
    assert_eq!(
        unauthenticated.json(),
        json!({
            "id": "api.context.session_expired.app_error",
            "message": "Invalid or expired session, please login again.",
            "detailed_error": "",
            "request_id": request_id,
            "status_code": 401
        })
    );
    let token_form = client
        .agent
        .get(format!("{}/api/v4/users/me", fake.url()))
        .header("Authorization", format!("Token {}", bot.token))
        .call()
        .unwrap();
    assert_eq!(token_form.status(), 200);
    let me = client.get("/api/v4/users/me", &bot.token).json();
    assert_eq!(
        (me["username"].as_str(), me["is_bot"].as_bool()),
        (Some("testbot"), Some(true))
    );
    assert_eq!(
        client
            .get("/api/v4/users/username/nobody", &bot.token)
            .status,
        404
    );
    let by_name = client
        .get("/api/v4/users/username/alice", &bot.token)
        .json();
    assert_eq!(by_name["id"], fake.owner().id.as_str());
    assert!(by_name.get("notify_props").is_none());
    let ids = json!([fake.owner().id, "z".repeat(26)]);
    let users = client
        .call("POST", "/api/v4/users/ids", Some(&bot.token), Some(&ids))
        .json();
    assert_eq!(users.as_array().unwrap().len(), 1);
    assert_eq!(
        client.get("/api/v4/nope", &bot.token).json()["id"],
        "api.context.404.app_error"
    );
    assert_eq!(
        client
            .call("DELETE", "/api/v4/system/ping", Some(&bot.token), None)
            .status,
        405
    );
    let config = client
        .get("/api/v4/config/client?format=old", &bot.token)
        .json();
    assert_eq!(
        (config["Version"].as_str(), config["MaxPostSize"].as_str()),
        (Some("5.36.1"), Some("16383"))
    );
    assert_eq!(
        client.call("GET", "/api/v4/system/ping", None, None).json()["status"],
        "OK"
    );

    let malformed = client.raw(
        "POST",
        "/api/v4/posts",
        Some(&bot.token),
        "application/json",
        Some(b"{\"message\": 3"),
    );
    assert_eq!(
        malformed.json()["id"],
        "api.context.invalid_body_param.app_error"
    );
    let not_utf8 = client.raw(
        "POST",
        "/api/v4/posts",
        Some(&bot.token),
        "application/json",
        Some(&[0xff, 0xfe]),
    );
    assert_eq!(not_utf8.status, 400);
    assert_eq!(
        client
            .get(&format!("/api/v4/posts/{}", "short"), &bot.token)
            .status,
        400
    );

    // A chunked body, written by hand.
    let channel = fake.dm_channel(&fake.owner().id, &bot.id);
    let body = json!({"channel_id": channel, "message": "chunked"}).to_string();
    let (first, second) = body.split_at(10);
    let mut stream = TcpStream::connect(fake.url().trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "POST /api/v4/posts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        bot.token,
        first.len(),
        second.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 201 Created\r\n"),
        "{response}"
    );
    assert_eq!(fake.posts_in(&channel)[0].message, "chunked");

    let mut stream = TcpStream::connect(fake.url().trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"NOT HTTP\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

#[test]
fn fault_controls() {
    let fake = FakeMattermost::start();
    let bot = fake.bot();
    let client = Client::new(&fake);
    fake.fail_next(2, 503);
    assert_eq!(client.get("/api/v4/users/me", &bot.token).status, 503);
    assert_eq!(client.get("/api/v4/users/me", &bot.token).status, 503);
    assert_eq!(client.get("/api/v4/users/me", &bot.token).status, 200);

    let mut ws = ws_connect(&fake, Some(&bot.token), "");
    next_event(&mut ws, "hello");
    fake.set_down(true);
    assert_dropped(&mut ws);
    fake.wait_until(WAIT, |v| (v.ws_connection_count() == 0).then_some(()))
        .unwrap();
    let url = format!("{}/api/v4/users/me", fake.url());
    assert!(
        client
            .agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", bot.token))
            .call()
            .is_err()
    );
    fake.wait_until(WAIT, |v| (v.refused_while_down() >= 1).then_some(()))
        .expect("the refused request is counted");
    fake.set_down(false);
    assert_eq!(client.get("/api/v4/users/me", &bot.token).status, 200);
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 2);
    assert!(statuses.contains(&101));
}

#[test]
fn pending_post_ids_are_remembered_30_seconds_of_the_fakes_clock() {
    let fake = FakeMattermost::start();
    let (bot, owner) = (fake.bot(), fake.owner());
    let client = Client::new(&fake);
    let dm = fake.dm_channel(&owner.id, &bot.id);
    let body =
        json!({"channel_id": dm, "message": "once", "pending_post_id": format!("{}:1", bot.id)});
    let create = || {
        let reply = client.call("POST", "/api/v4/posts", Some(&bot.token), Some(&body));
        assert_eq!(reply.status, 201);
        reply.json()["id"].as_str().unwrap().to_string()
    };
    let first = create();
    fake.advance_clock(Duration::from_secs(29));
    assert_eq!(create(), first, "still remembered");
    fake.advance_clock(Duration::from_secs(2));
    assert_ne!(create(), first, "forgotten after 30 s");
    assert_eq!(fake.posts_in(&dm).len(), 2);
}

#[test]
fn other_reads_and_open_channels() {
    let fake = FakeMattermost::start();
    let (bot, alice, mallory) = (fake.bot(), fake.owner(), fake.stranger());
    let client = Client::new(&fake);
    let dm = fake.dm_channel(&alice.id, &bot.id);
    let root = fake.post_as(&alice.id, &dm, "", "root #topic").unwrap();
    let reply = fake.post_as(&bot.id, &dm, &root.id, "reply").unwrap();
    let later = fake.post_as(&alice.id, &dm, "", "later").unwrap();

    let thread = client
        .get(&format!("/api/v4/posts/{}/thread", reply.id), &alice.token)
        .json();
    assert_eq!(thread["order"], json!([reply.id, root.id]));
    assert_eq!(thread["posts"][&root.id]["hashtags"], "#topic");
    assert_eq!(
        client
            .get(&format!("/api/v4/posts/{}/thread", root.id), &mallory.token)
            .status,
        403
    );

    let before = client
        .get(
            &format!("/api/v4/channels/{dm}/posts?before={}", later.id),
            &bot.token,
        )
        .json();
    assert_eq!(before["order"], json!([reply.id, root.id]));
    assert_eq!(
        (
            before["next_post_id"].as_str(),
            before["prev_post_id"].as_str()
        ),
        (Some(later.id.as_str()), Some(""))
    );
    let since = client
        .get(
            &format!("/api/v4/channels/{dm}/posts?since={}", reply.create_at),
            &bot.token,
        )
        .json();
    assert_eq!(since["order"], json!([later.id]));

    let update = json!({"id": root.id, "message": "root, updated"});
    let path = format!("/api/v4/posts/{}", root.id);
    let updated = client.call("PUT", &path, Some(&alice.token), Some(&update));
    assert_eq!(updated.status, 200);
    assert_eq!(updated.json()["message"], "root, updated");
    let wrong_id = json!({"id": reply.id, "message": "x"});
    assert_eq!(
        client
            .call("PUT", &path, Some(&alice.token), Some(&wrong_id))
            .status,
        400
    );

    // Events of an open channel reach its members only.
    let town = fake.create_channel("Town Test", &[&alice.id, &mallory.id]);
    let mut ws = ws_connect(&fake, Some(&bot.token), "");
    next_event(&mut ws, "hello");
    let mut mallory_ws = ws_connect(&fake, Some(&mallory.token), "");
    next_event(&mut mallory_ws, "hello");
    fake.post_as(&alice.id, &town, "", "hey @mallory look")
        .unwrap();
    let event = next_event(&mut mallory_ws, "posted");
    assert_eq!(event["data"]["channel_type"], "O");
    assert_eq!(event["data"]["channel_display_name"], "Town Test");
    assert_eq!(event["data"]["channel_name"], "town-test");
    assert_eq!(embedded(&event["data"]["mentions"]), json!([mallory.id]));
    assert_ne!(event["data"]["team_id"], "");
    fake.post_as(&alice.id, &dm, "", "in the dm").unwrap();
    let next = next_event(&mut ws, "posted");
    assert_eq!(
        embedded(&next["data"]["post"])["message"],
        "in the dm",
        "nothing from the open channel"
    );
    assert_eq!(fake.post_as(&bot.id, &town, "", "x").unwrap_err().0, 403);

    let nothing = fake.wait_until(Duration::from_millis(20), |v| {
        v.posts_in(&town).get(5).cloned()
    });
    assert!(nothing.is_none());
}

/// Mattermost parses `@username` only when a post is created: the mention is recorded then, and an
/// edit that adds one notifies no one (its `post_edited` carries no `mentions`).
#[test]
fn mentions_are_recorded_on_create_never_on_edit() {
    let fake = FakeMattermost::start();
    let (bot, alice, mallory) = (fake.bot(), fake.owner(), fake.stranger());
    let client = Client::new(&fake);
    let channel = fake.dm_channel(&alice.id, &bot.id);
    let mut ws = ws_connect(&fake, Some(&alice.token), "");
    next_event(&mut ws, "hello");

    let root = client.post(&bot.token, &channel, "", "a new thread").json();
    let root_id = root["id"].as_str().unwrap();
    let event = next_event(&mut ws, "posted");
    assert_eq!(
        embedded(&event["data"]["mentions"]),
        json!([alice.id]),
        "a DM's other member is always in `mentions`"
    );
    assert!(
        fake.mentions_of(&alice.id).is_empty(),
        "but only @username names them"
    );

    let named = client
        .post(&bot.token, &channel, root_id, "needs you\n@alice.")
        .json();
    next_event(&mut ws, "posted");
    let mentions = fake.mentions_of(&alice.id);
    assert_eq!(mentions.len(), 1, "{mentions:?}");
    assert_eq!(mentions[0].post_id, named["id"].as_str().unwrap());
    assert_eq!(mentions[0].root_id, root_id);
    assert_eq!(mentions[0].message, "needs you\n@alice.");
    // Not a member of this DM, and a name that is no user: no one.
    client.post(&bot.token, &channel, root_id, "@mallory @nobody @ALICE");
    next_event(&mut ws, "posted");
    assert!(fake.mentions_of(&mallory.id).is_empty());
    assert_eq!(fake.mentions_of(&alice.id).len(), 2, "case-insensitive");
    // The sender never mentions themself.
    client.post(&alice.token, &channel, root_id, "me, @alice");
    next_event(&mut ws, "posted");
    assert_eq!(fake.mentions_of(&alice.id).len(), 2);

    let patch = format!("/api/v4/posts/{root_id}/patch");
    let edit = json!({"message": "a new thread @alice"});
    let edited = client.call("PUT", &patch, Some(&bot.token), Some(&edit));
    assert_eq!(edited.status, 200, "{}", edited.text());
    let event = next_event(&mut ws, "post_edited");
    assert_eq!(
        keys(&event["data"]),
        key_set(&["post"]),
        "no mentions on edit"
    );
    assert_eq!(
        embedded(&event["data"]["post"])["message"],
        "a new thread @alice"
    );
    assert_eq!(
        fake.mentions_of(&alice.id).len(),
        2,
        "an edit mentions no one"
    );
}
