//! The router's decisions as plain values: inputs in, effects out, no sockets. The servers named
//! here are never called (nothing these tests do starts a worker).

use std::path::PathBuf;

use super::*;
use crate::config::Secret;
use crate::store::ThreadRecord;

const DM: &str = "dm-channel";
const OWNER: &str = "owner-user";
const BOT: &str = "bot-user";

struct Fixture {
    router: Router,
    server: ServerKey,
    dir: PathBuf,
    _inputs: Receiver<Input>,
    _typing: Receiver<WsAction>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(|_, _| {})
    }

    /// `prepare` fills the state the router starts from.
    fn with(prepare: impl FnOnce(&mut State, &ServerKey)) -> Fixture {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ocmm-router-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, mut state, _) = Store::open(&dir, crate::log::now_ms()).expect("store");
        // Nothing on this port answers; the router must not call it anyway.
        let opencode = Arc::new(OpenCodeClient::new("http://127.0.0.1:9", "opencode", None));
        let server = opencode.key.clone();
        prepare(&mut state, &server);
        let (inputs, inputs_rx) = crossbeam_channel::bounded(INPUT_QUEUE);
        let (typing, typing_rx) = crossbeam_channel::bounded(1);
        let router = Router::new(Setup {
            command_prefix: "!".to_string(),
            mattermost: Arc::new(MattermostClient::new(
                "http://127.0.0.1:9",
                &Secret::new("token".into()),
            )),
            identity: Identity {
                bot_user_id: BOT.to_string(),
                bot_username: "bot".to_string(),
                owner_user_id: OWNER.to_string(),
                owner_username: "owner".to_string(),
                dm_channel_id: DM.to_string(),
            },
            servers: BTreeMap::from([(server.clone(), opencode)]),
            store,
            state,
            inputs,
            ready: None,
            typing,
            max_file_size: 1 << 20,
            catchup_max_age: Duration::from_secs(3600),
            forget_after: Duration::from_secs(30 * 86_400),
            notify: crate::config::Notify::default(),
        });
        Fixture {
            router,
            server,
            dir,
            _inputs: inputs_rx,
            _typing: typing_rx,
        }
    }

    fn posted(&mut self, post: Post) -> Vec<Effect> {
        self.router
            .handle(Input::from(WsUpdate::Event(WsEvent::Posted(post))))
    }

    fn found(&mut self, found: Found) -> Vec<Effect> {
        self.router.handle(Input::from(found))
    }

    fn key(&self, session_id: &str) -> SessionKey {
        SessionKey {
            server: self.server.clone(),
            session_id: session_id.to_string(),
        }
    }
}

fn owner_post(id: &str, root_id: &str, message: &str) -> Post {
    Post {
        id: id.to_string(),
        create_at: crate::log::now_ms() as i64,
        user_id: OWNER.to_string(),
        channel_id: DM.to_string(),
        root_id: root_id.to_string(),
        message: message.to_string(),
        ..Post::default()
    }
}

fn notice(root_id: &str, contains: &str, effects: &[Effect]) {
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Notice(n)
            if n.root_id == root_id && n.message.contains(contains))),
        "no notice in {root_id:?} saying {contains:?}: {effects:#?}"
    );
}

fn ended_record(state: &mut State, server: &ServerKey, session_id: &str, root: &str) {
    state
        .servers
        .entry(server.0.clone())
        .or_default()
        .sessions
        .insert(
            session_id.to_string(),
            ThreadRecord {
                root_post_id: root.to_string(),
                channel_id: DM.to_string(),
                ended_ms: Some(crate::log::now_ms() - 1000),
                delivered_at_ms: 1,
                ..ThreadRecord::default()
            },
        );
}

#[test]
fn main_dm_commands_become_look_ups_and_answers_become_notices() {
    let mut fixture = Fixture::new();
    assert_eq!(
        fixture.posted(owner_post("p1", "", "!sessions all")),
        vec![Effect::Lookup(Lookup::ListSessions {
            then: Listing::Sessions { all: true }
        })]
    );
    assert_eq!(
        fixture.posted(owner_post("p2", "", "!attach neon")),
        vec![Effect::Lookup(Lookup::ListSessions {
            then: Listing::Attach {
                query: "neon".to_string()
            }
        })]
    );
    assert_eq!(
        fixture.posted(owner_post("p3", "", "!new /srv/app Fix it\nfirst prompt")),
        vec![Effect::Lookup(Lookup::NewSession {
            post_id: "p3".to_string(),
            server: None,
            directory: "/srv/app".to_string(),
            title: Some("Fix it".to_string()),
            prompt: Some("first prompt".to_string()),
        })]
    );
    assert_eq!(
        fixture.posted(owner_post("p3b", "", "!new build-1:/srv/app")),
        vec![Effect::Lookup(Lookup::NewSession {
            post_id: "p3b".to_string(),
            server: Some("build-1".to_string()),
            directory: "/srv/app".to_string(),
            title: None,
            prompt: None,
        })]
    );
    // Decided without asking anyone.
    let effects = fixture.posted(owner_post("p4", "", "!new srv/app"));
    assert_eq!(effects.len(), 1, "{effects:#?}");
    notice("", "is not an absolute path", &effects);

    let listed = SessionInfo {
        id: "ses_0123456789abcdefghijkl".to_string(),
        slug: "neon-eagle".to_string(),
        title: "Refactor the parser".to_string(),
        directory: "/srv/app".to_string(),
        ..SessionInfo::default()
    };
    let server = fixture.server.clone();
    let effects = fixture.found(Found::Sessions {
        lists: vec![(server.clone(), Ok(vec![listed.clone()]))],
        then: Listing::Sessions { all: false },
    });
    notice("", "**Refactor the parser**", &effects);
    notice("", "`!attach efghijkl`", &effects);

    let effects = fixture.found(Found::Sessions {
        lists: vec![(server, Ok(vec![listed]))],
        then: Listing::Attach {
            query: "nothing-like-it".to_string(),
        },
    });
    notice("", "No session matches `nothing-like-it`", &effects);

    let effects = fixture.found(Found::NewSession {
        post_id: "p3".to_string(),
        directory: "/srv/app".to_string(),
        prompt: None,
        created: Err("⚠️ Could not create the session: boom".to_string()),
    });
    assert_eq!(
        effects,
        vec![Effect::Notice(Notice {
            root_id: String::new(),
            message: "⚠️ Could not create the session: boom".to_string()
        })]
    );
}

#[test]
fn a_reply_in_an_unknown_thread_is_looked_up_then_answered() {
    let mut fixture = Fixture::new();
    let reply = owner_post("p1", "root-1", "hello?");
    assert_eq!(
        fixture.posted(reply.clone()),
        vec![Effect::Lookup(Lookup::ThreadRoot {
            root_id: "root-1".to_string(),
            then: Waiting::Reply(reply.clone()),
        })]
    );
    let effects = fixture.found(Found::ThreadRoot {
        root_id: "root-1".to_string(),
        session: None,
        then: Waiting::Reply(reply),
    });
    assert_eq!(effects.len(), 1, "{effects:#?}");
    notice("root-1", "not linked to any OpenCode session", &effects);
}

#[test]
fn a_reaction_reads_its_post_off_the_loop() {
    let mut fixture = Fixture::new();
    let effects = fixture
        .router
        .handle(Input::from(WsUpdate::Event(WsEvent::ReactionAdded(
            Reaction {
                user_id: OWNER.to_string(),
                post_id: "p9".to_string(),
                emoji_name: "octagonal_sign".to_string(),
            },
        ))));
    assert_eq!(
        effects,
        vec![Effect::Lookup(Lookup::ReactedPost {
            post_id: "p9".to_string(),
            meaning: ReactionMeaning::Stop,
        })]
    );
    // Someone else's reaction means nothing.
    let effects = fixture
        .router
        .handle(Input::from(WsUpdate::Event(WsEvent::ReactionAdded(
            Reaction {
                user_id: "stranger".to_string(),
                post_id: "p9".to_string(),
                emoji_name: "octagonal_sign".to_string(),
            },
        ))));
    assert_eq!(effects, vec![]);
}

#[test]
fn posts_from_others_from_elsewhere_or_seen_before_decide_nothing() {
    let mut fixture = Fixture::new();
    let mut stranger = owner_post("p1", "", "!sessions");
    stranger.user_id = "stranger".to_string();
    assert_eq!(fixture.posted(stranger), vec![]);
    let mut elsewhere = owner_post("p2", "", "!sessions");
    elsewhere.channel_id = "town-square".to_string();
    assert_eq!(fixture.posted(elsewhere), vec![]);
    let mut own = owner_post("p3", "", "!sessions");
    own.user_id = BOT.to_string();
    assert_eq!(fixture.posted(own), vec![]);
    assert_eq!(fixture.posted(owner_post("p4", "", "!sessions")).len(), 1);
    assert_eq!(fixture.posted(owner_post("p4", "", "!sessions")), vec![]);
}

#[test]
fn a_reply_in_an_ended_thread_is_refused_without_asking_anyone() {
    let mut fixture = Fixture::with(|state, server| ended_record(state, server, "ses_a", "root-a"));
    let effects = fixture.posted(owner_post("p1", "root-a", "one more thing"));
    assert_eq!(effects.len(), 1, "{effects:#?}");
    notice("root-a", "This session has ended", &effects);
}

#[test]
fn a_session_missing_from_the_poll_is_confirmed_one_look_up_at_a_time() {
    let mut fixture = Fixture::with(|state, server| {
        ended_record(state, server, "ses_gone", "root-g");
        let record = state
            .servers
            .get_mut(&server.0)
            .and_then(|s| s.sessions.get_mut("ses_gone"))
            .unwrap();
        record.ended_ms = None;
        record.directory = "/srv/app".to_string();
    });
    let server = fixture.server.clone();
    let snapshot = |router: &mut Router| {
        router.handle(Input::from((
            server.clone(),
            WatchEvent::Snapshot {
                sessions: Vec::new(),
                statuses: HashMap::new(),
            },
        )))
    };
    let confirm = Effect::Lookup(Lookup::ConfirmGone {
        key: fixture.key("ses_gone"),
        directory: "/srv/app".to_string(),
    });
    assert_eq!(snapshot(&mut fixture.router), vec![confirm.clone()]);
    // The next poll while the first look-up runs asks nothing more.
    assert_eq!(snapshot(&mut fixture.router), vec![]);
    let key = fixture.key("ses_gone");
    assert_eq!(fixture.found(Found::NotGone { key }), vec![]);
    assert_eq!(snapshot(&mut fixture.router), vec![confirm]);
}

#[test]
fn websocket_posts_wait_for_the_catch_up_to_keep_their_order() {
    let mut fixture = Fixture::with(|state, _| {
        state.mattermost.last_post_id = "cursor".to_string();
        state.mattermost.last_post_at = 1;
    });
    let effects = fixture.router.handle(Input::from(WsUpdate::Connected {
        resumed: false,
        server_version: "9.11".to_string(),
    }));
    assert_eq!(
        effects,
        vec![Effect::Lookup(Lookup::PostsAfter {
            cursor: crate::store::MattermostCursor {
                last_post_id: "cursor".to_string(),
                last_post_at: 1,
            }
        })]
    );
    // Written after the ones the catch-up will find: it waits for them.
    assert_eq!(fixture.posted(owner_post("live", "", "!sessions")), vec![]);
    let effects = fixture.found(Found::Posts {
        posts: vec![owner_post("missed", "", "!help")],
        last: false,
        error: None,
    });
    notice("", "connects this DM to OpenCode", &effects);
    let effects = fixture.found(Found::Posts {
        posts: Vec::new(),
        last: true,
        error: None,
    });
    assert_eq!(
        effects,
        vec![Effect::Lookup(Lookup::ListSessions {
            then: Listing::Sessions { all: false }
        })]
    );
    assert_eq!(fixture.router.registry.cursor().last_post_id, "live");
}

#[test]
fn a_refused_look_up_the_owner_asked_for_says_so() {
    let mut fixture = Fixture::new();
    let effects = fixture
        .router
        .handle(Input::Refused(Box::new(Lookup::ListSessions {
            then: Listing::Sessions { all: false },
        })));
    notice("", "busy", &effects);
    let effects = fixture
        .router
        .handle(Input::Refused(Box::new(Lookup::ThreadRoot {
            root_id: "root-1".to_string(),
            then: Waiting::Reply(owner_post("p1", "root-1", "hi")),
        })));
    notice("root-1", "busy", &effects);
}

fn open_record(state: &mut State, server: &ServerKey, session_id: &str, root: &str) {
    ended_record(state, server, session_id, root);
    let record = state
        .servers
        .get_mut(&server.0)
        .and_then(|s| s.sessions.get_mut(session_id))
        .unwrap();
    record.ended_ms = None;
}

#[test]
fn a_worker_that_said_its_session_is_gone_is_not_followed_by_a_second_notice() {
    let mut fixture = Fixture::with(|state, server| open_record(state, server, "ses_a", "root-a"));
    let key = fixture.key("ses_a");
    let effects = fixture
        .router
        .handle(Input::from(Report::Gone { key: key.clone() }));
    assert_eq!(effects, vec![]);
    assert!(fixture.router.registry.is_ended(&key));
    // No worker was started to say it again; the deletion event that follows changes nothing.
    assert!(fixture.router.workers.is_empty());
    let server = fixture.server.clone();
    fixture.router.handle(Input::from((
        server,
        WatchEvent::Event(crate::opencode::Envelope {
            directory: Box::default(),
            event: Event::SessionDeleted {
                session_id: "ses_a".to_string(),
            },
            seq: None,
        }),
    )));
    assert!(fixture.router.workers.is_empty());
}

#[test]
fn the_first_prompt_of_new_is_owed_as_soon_as_the_session_exists() {
    let mut fixture = Fixture::new();
    // A server this router has no client for: no worker starts, the decision is what counts.
    let elsewhere = ServerKey("http://elsewhere".to_string());
    let info = SessionInfo {
        id: "ses_new".to_string(),
        directory: "/srv/app".to_string(),
        ..SessionInfo::default()
    };
    fixture.found(Found::NewSession {
        post_id: "cmd".to_string(),
        directory: "/srv/app".to_string(),
        prompt: Some("first words".to_string()),
        created: Ok((elsewhere.clone(), info)),
    });
    let owed = fixture.router.registry.owed_prompts();
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0].0, "cmd");
    assert_eq!(owed[0].1.session_id, "ses_new");
}

#[test]
fn a_reply_waiting_on_its_thread_look_up_is_on_disk_until_answered_and_recovered_after_a_crash() {
    let mut fixture = Fixture::new();
    let reply = owner_post("p1", "root-1", "hello?");
    fixture.posted(reply.clone());
    let state_file = fixture.dir.join("state.json");
    let on_disk =
        || -> State { serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap() };
    // The cursor has passed it; what it is owed is not known yet.
    let saved = on_disk();
    assert_eq!(saved.mattermost.last_post_id, "p1");
    assert!(saved.unresolved_posts.contains_key("p1"), "{saved:?}");

    // A restart (a new router on the same state) reads it again before catching up.
    let mut restarted = Fixture::with(|state, _| {
        *state = saved.clone();
    });
    let effects = restarted.router.handle(Input::from(WsUpdate::Connected {
        resumed: false,
        server_version: "9.11".to_string(),
    }));
    assert_eq!(
        effects.first(),
        Some(&Effect::Lookup(Lookup::UnresolvedPost {
            post_id: "p1".to_string()
        })),
        "{effects:#?}"
    );

    fixture.found(Found::ThreadRoot {
        root_id: "root-1".to_string(),
        session: None,
        then: Waiting::Reply(reply),
    });
    assert!(on_disk().unresolved_posts.is_empty());
}

#[test]
fn board_command_posts_one_board_and_off_stops_it() {
    use super::board::{BoardEvent, BoardJob};
    let mut fixture = Fixture::new();
    let effects = fixture.posted(owner_post("b1", "", "!board"));
    assert!(
        matches!(effects.as_slice(), [Effect::Board(BoardJob::Show { post_id: None, text })]
            if text.starts_with("📋 **Sessions board**")),
        "{effects:#?}"
    );
    assert!(
        fixture.posted(owner_post("b2", "", "!board")).is_empty(),
        "asked again while it is being posted: no second post"
    );
    fixture.router.handle(Input::Board(BoardEvent::Posted {
        post_id: "board1".to_string(),
    }));
    assert_eq!(fixture.router.registry.board_post_id(), Some("board1"));
    let effects = fixture.posted(owner_post("b3", "", "!board"));
    notice("", "The board is [here]", &effects);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Board(BoardJob::Show { post_id: None, .. }))),
        "{effects:#?}"
    );
    let effects = fixture.posted(owner_post("b4", "", "!board off"));
    assert!(
        effects.iter().any(
            |e| matches!(e, Effect::Board(BoardJob::Stop { post_id, .. }) if post_id == "board1")
        ),
        "{effects:#?}"
    );
    notice("", "The board is stopped", &effects);
    assert_eq!(fixture.router.registry.board_post_id(), None);
    notice(
        "",
        "No board is running",
        &fixture.posted(owner_post("b5", "", "!board off")),
    );
}

#[test]
fn servers_sharing_a_store_give_a_session_one_owner() {
    let mut fixture = Fixture::with(|state, server| open_record(state, server, "ses_a", "root-a"));
    let first = fixture.server.clone();
    let other = Arc::new(OpenCodeClient::new("http://127.0.0.1:10", "opencode", None));
    let second = other.key.clone();
    fixture.router.servers.insert(second.clone(), other);
    let router = &mut fixture.router;
    // Recorded under the first server: the second's listing of it is not a second session.
    assert_eq!(router.owner_of(&second, "ses_a"), first);
    // Unknown: whoever reports it first owns it.
    assert_eq!(router.owner_of(&second, "ses_new"), second);
    let info = |id: &str| SessionInfo {
        id: id.to_string(),
        directory: "/srv".to_string(),
        ..SessionInfo::default()
    };
    router.reconcile(
        second.clone(),
        vec![info("ses_a"), info("ses_b")],
        HashMap::new(),
    );
    assert_eq!(router.owner_of(&first, "ses_b"), second);
    router.reconcile(
        first.clone(),
        vec![info("ses_a"), info("ses_b")],
        HashMap::new(),
    );
    let keys: Vec<(String, String)> = router
        .live
        .keys()
        .map(|k| (k.server.0.clone(), k.session_id.clone()))
        .collect();
    let mut keys = keys;
    keys.sort();
    let mut expected = vec![
        (first.0.clone(), "ses_a".to_string()),
        (second.0.clone(), "ses_b".to_string()),
    ];
    expected.sort();
    assert_eq!(keys, expected);
}

#[test]
fn current_in_a_thread_names_the_session_and_its_server() {
    let mut fixture =
        Fixture::with(|state, server| open_record(state, server, "ses_abcdefgh12345678", "root-c"));
    let effects = fixture.posted(owner_post("p1", "root-c", "!current"));
    notice("root-c", "`ses_abcdefgh12345678`", &effects);
    notice("root-c", "short `12345678`", &effects);
    notice("root-c", "🖥 127.0.0.1:9", &effects);
    notice("root-c", "state: idle", &effects);
}

/// The input channel's slots are allocated, and touched, when it is made: a large `Input` makes
/// every one of its `INPUT_QUEUE` slots large, resident for the process's life.
#[test]
fn an_input_is_small_because_the_input_queue_holds_its_slots_up_front() {
    let size = std::mem::size_of::<Input>();
    assert!(size <= 48, "Input is {size} bytes: box the large variant");
}

#[test]
fn sessions_outside_opencode_mm_dirs_are_neither_listed_nor_created() {
    let mut fixture = Fixture::new();
    let dirs = crate::config::Dirs::parse("/home/alice").unwrap();
    fixture.router.dirs = dirs;
    let info = |id: &str, title: &str, directory: &str| SessionInfo {
        id: id.to_string(),
        title: title.to_string(),
        directory: directory.to_string(),
        ..SessionInfo::default()
    };
    let server = fixture.server.clone();
    let effects = fixture.found(Found::Sessions {
        lists: vec![(
            server,
            Ok(vec![
                info("ses_alice", "Alice's work", "/home/alice/app"),
                info("ses_bob", "Bob's work", "/home/alicex/app"),
            ]),
        )],
        then: Listing::Sessions { all: false },
    });
    notice("", "Alice's work", &effects);
    assert!(
        !format!("{effects:?}").contains("Bob's work"),
        "{effects:#?}"
    );
    let effects = fixture.posted(owner_post("p1", "", "!new /home/bob/app"));
    assert_eq!(effects.len(), 1, "{effects:#?}");
    notice(
        "",
        "is outside this bridge's directories (/home/alice",
        &effects,
    );
}
