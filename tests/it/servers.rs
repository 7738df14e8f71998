//! Several OpenCode servers behind one bridge (issue 13): each session's thread names its server,
//! prompts go to the server that has the session, one server's outage leaves the others alone, and
//! servers sharing one store give a session one thread.

use serde_json::json;

use crate::e2e::{text, wait_for};
use crate::support::bridge::{self, Bridge};
use crate::support::llm::FakeLlm;
use crate::support::mattermost::{FakeMattermost, Post};
use crate::support::opencode::OpenCode;
use crate::support::{SOON, TempDir};

/// Fields drop in order: the bridge stops before the servers it talks to.
struct Servers {
    bridge: Option<Bridge>,
    llm: FakeLlm,
    home: OpenCode,
    build: OpenCode,
    mattermost: FakeMattermost,
    state: TempDir,
    dm: String,
}

impl Servers {
    fn new(home: OpenCode, build: OpenCode, llm: FakeLlm) -> Servers {
        let mattermost = FakeMattermost::start();
        let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
        Servers {
            bridge: None,
            llm,
            home,
            build,
            mattermost,
            state: TempDir::new("state"),
            dm,
        }
    }

    fn start_bridge(&mut self) {
        let config = bridge::config_for_servers(
            &self.mattermost,
            &[
                ("home", self.home.bridge_url()),
                ("build", self.build.bridge_url()),
            ],
            self.state.path(),
        );
        self.bridge = Some(Bridge::start_with(config));
    }

    fn session_on(&self, server: &OpenCode, title: &str) -> String {
        let session = server.create_session(server.project_dir(), Some(title));
        session["id"].as_str().expect("session id").to_string()
    }

    fn roots_for(&self, session_id: &str) -> Vec<Post> {
        self.mattermost
            .posts_in(&self.dm)
            .into_iter()
            .filter(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            .collect()
    }

    fn wait_root(&self, session_id: &str) -> Post {
        let dm = self.dm.clone();
        self.mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm)
                    .into_iter()
                    .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            })
            .unwrap_or_else(|| panic!("no thread root for {session_id}"))
    }

    fn owner_says(&self, root_id: &str, message: &str) {
        self.mattermost
            .post_as(&self.mattermost.owner().id, &self.dm, root_id, message)
            .expect("owner post accepted");
    }

    fn wait_bot_post(&self, root_id: &str, what: &str, f: impl Fn(&Post) -> bool) -> Post {
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
                        .map(|p| (&p.root_id, &p.message))
                        .collect::<Vec<_>>()
                )
            })
    }

    /// Sends `prompt` in the thread and waits for its scripted answer there.
    fn round_trip(&self, root: &Post, prompt: &str, answer: &str) {
        self.llm.script(prompt, vec![vec![text(answer)]]);
        self.owner_says(&root.id, prompt);
        self.wait_bot_post(&root.id, "with the answer", |p| p.message.contains(answer));
    }
}

/// The short id the bridge shows: the last 8 characters.
fn short(id: &str) -> &str {
    &id[id.len() - 8..]
}

/// True when `server` stores `needle` in session `id` (a prompt): v1 keeps turns under
/// `…/message`, v2 under `/api/session/{id}/context`.
fn server_has_prompt(server: &OpenCode, id: &str, needle: &str) -> bool {
    let stored = if crate::support::dialect() == crate::support::Dialect::V2 {
        server.get(&format!("/api/session/{id}/context"))
    } else {
        server.messages(id, server.project_dir())
    };
    stored.to_string().contains(needle)
}

#[test]
fn two_servers_each_session_names_its_server_and_an_outage_stays_with_its_server() {
    let llm = FakeLlm::start();
    let home = OpenCode::start(&llm, json!({}));
    let build = OpenCode::start(&llm, json!({}));
    let mut world = Servers::new(home, build, llm);
    // From before the bridge's first start: it gets a thread only when asked (here by `!use`).
    let old_id = world.session_on(&world.build, "Older work");
    world.start_bridge();

    let home_id = world.session_on(&world.home, "At home");
    let build_id = world.session_on(&world.build, "On the build box");
    let home_root = world.wait_root(&home_id);
    let build_root = world.wait_root(&build_id);
    assert!(
        home_root.message.contains("🖥 home"),
        "{}",
        home_root.message
    );
    assert!(
        build_root.message.contains("🖥 build"),
        "{}",
        build_root.message
    );

    world.round_trip(&home_root, "home question one", "home answer one");
    world.round_trip(&build_root, "build question one", "build answer one");
    assert!(server_has_prompt(
        &world.home,
        &home_id,
        "home question one"
    ));
    assert!(server_has_prompt(
        &world.build,
        &build_id,
        "build question one"
    ));
    assert!(!server_has_prompt(
        &world.home,
        &home_id,
        "build question one"
    ));

    // `!sessions` groups by server.
    world.owner_says("", "!sessions");
    let listing = world.wait_bot_post("", "listing the sessions", |p| {
        p.message.starts_with("**Sessions**")
    });
    let home_at = listing.message.find("🖥 **home**").expect("home heading");
    let build_at = listing.message.find("🖥 **build**").expect("build heading");
    let home_line = listing.message.find("At home").expect("home session");
    let build_line = listing
        .message
        .find("On the build box")
        .expect("build session");
    assert!(
        (build_at < build_line) && (home_at < home_line),
        "{}",
        listing.message
    );

    // `!use` links a thread, making it first when there is none; `!current` names the session.
    world.owner_says("", &format!("!use {}", short(&build_id)));
    world.wait_bot_post("", "linking the build thread", |p| {
        p.message.contains("On the build box") && p.message.contains(&build_root.id)
    });
    assert!(world.roots_for(&old_id).is_empty());
    world.owner_says("", &format!("!use {}", short(&old_id)));
    let old_root = world.wait_root(&old_id);
    assert!(old_root.message.contains("🖥 build"), "{}", old_root.message);
    world.wait_bot_post("", "linking the new thread", |p| {
        p.message.contains("Older work") && p.message.contains(&old_root.id)
    });
    world.owner_says(&home_root.id, "!current");
    let current = world.wait_bot_post(&home_root.id, "answering !current", |p| {
        p.message.contains(&home_id)
    });
    for needle in [
        "At home",
        &format!("`{}`", short(&home_id)),
        "🖥 home",
        &world.home.bridge_url(),
        &world.home.project_dir().display().to_string(),
        "state: idle",
    ] {
        assert!(
            current.message.contains(needle),
            "{needle:?} missing: {}",
            current.message
        );
    }

    // One server down: the other keeps answering, and its threads hear nothing of the outage.
    // (A prompt sent while a server is down is queued; that is the faults suite's subject. Here the
    // v2 proxy would make such a send ambiguous rather than refused.)
    world.build.kill();
    world.round_trip(&home_root, "home question two", "home answer two");
    world.build.restart();
    world.round_trip(&build_root, "build question two", "build answer two");
    assert!(
        !world
            .mattermost
            .thread(&home_root.id)
            .iter()
            .any(|p| p.message.contains("unreachable")),
        "the home thread heard of the build server's outage"
    );
    assert!(server_has_prompt(
        &world.build,
        &build_id,
        "build question two"
    ));
    assert_eq!(world.roots_for(&home_id).len(), 1);
    assert_eq!(world.roots_for(&build_id).len(), 1);
}

#[test]
fn two_servers_on_one_home_give_a_session_one_thread() {
    let llm = FakeLlm::start();
    let home = OpenCode::start(&llm, json!({}));
    let build = home.start_sharing();
    let mut world = Servers::new(home, build, llm);
    world.start_bridge();

    let id = world.session_on(&world.home, "Shared store");
    let root = world.wait_root(&id);
    world.round_trip(&root, "shared question", "shared answer");

    // A restart makes both servers list the session at once: still one thread, listed once.
    world
        .bridge
        .take()
        .expect("bridge")
        .stop()
        .expect("clean stop");
    world.start_bridge();
    world.owner_says("", "!sessions");
    let listing = world.wait_bot_post("", "listing the sessions", |p| {
        p.message.starts_with("**Sessions**")
    });
    assert_eq!(
        listing.message.matches("Shared store").count(),
        1,
        "{}",
        listing.message
    );
    world.round_trip(&root, "shared question two", "shared answer two");
    wait_for("the answer to be posted once", || {
        world
            .mattermost
            .thread(&root.id)
            .iter()
            .filter(|p| p.message.contains("shared answer two"))
            .count()
            == 1
    });
    assert_eq!(world.roots_for(&id).len(), 1);
}

/// Every bad OPENCODE_URL entry stops start-up with exit 2, naming the entry and the fix, and no
/// password reaches the output (the process's own environment is what is checked, unlike the
/// config unit tests).
#[test]
fn bad_opencode_url_entries_exit_2_naming_the_entry() {
    use crate::cli::{Finish, command};
    let state = TempDir::new("servers-cli");
    // (OPENCODE_URL, another variable, what the message says)
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case<'_>; 5] = [
        (
            "a=http://h:1,a=http://h:2",
            None,
            "the name \"a\" is given to",
        ),
        ("Home=http://h:1", None, "server name \"Home\""),
        ("home=ftp://h:1", None, "use http:// or https://"),
        (
            "home=http://u:pw-in-url-77@h:1",
            None,
            "must not contain a user name or password",
        ),
        (
            "home=http://h:1",
            Some(("OPENCODE_SERVER_PASSWORD_BUILD", "pw-in-var-77")),
            "OPENCODE_SERVER_PASSWORD_BUILD: OPENCODE_URL names no such server",
        ),
    ];
    for (list, extra, expected) in cases {
        let mut run = command(&state);
        run.env("MATTERMOST_URL", "http://127.0.0.1:9")
            .env("MATTERMOST_TOKEN", "sekrit-token-value")
            .env("MATTERMOST_OWNER", "alice")
            .env("OPENCODE_URL", list);
        if let Some((name, value)) = extra {
            run.env(name, value);
        }
        let output = run.finish();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{list}: {stderr}");
        assert!(stderr.contains(expected), "{list}: {stderr}");
        for secret in ["pw-in-url-77", "pw-in-var-77", "sekrit-token-value"] {
            assert!(!stderr.contains(secret), "{secret} printed: {stderr}");
        }
    }
}

/// `auto`: an `opencode serve` started after the bridge is found in `/proc` and followed; a session
/// made there gets its thread.
#[test]
fn auto_finds_a_server_started_after_the_bridge() {
    let llm = FakeLlm::start();
    let mattermost = FakeMattermost::start();
    let dm = mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id);
    let state = TempDir::new("state");
    let mut config = bridge::config(&mattermost, "http://127.0.0.1:9", state.path());
    config.opencode_servers.clear();
    config.opencode_auto = true;
    let bridge = Bridge::start_with(config);
    let server = OpenCode::start(&llm, json!({}));
    let session = server.create_session(server.project_dir(), Some("Found by auto"));
    let id = session["id"].as_str().expect("session id").to_string();
    let root = mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm)
                .into_iter()
                .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == id.as_str())
        })
        .expect("a thread for the session on the discovered server");
    assert!(root.message.contains("Found by auto"), "{}", root.message);
    drop(bridge);
}

/// What `status` says of each server: name → whether it was ever heard from.
fn heard_per_server(world: &Servers) -> Vec<(String, bool)> {
    let now = opencode_mattermost::log::now_ms();
    opencode_mattermost::status::report(world.state.path(), now)
        .opencode_servers
        .into_iter()
        .map(|s| (s.server, s.heard.is_some()))
        .collect()
}

#[test]
fn a_server_down_at_start_holds_neither_the_start_nor_the_other_server() {
    let llm = FakeLlm::start();
    let home = OpenCode::start(&llm, json!({}));
    let mut build = OpenCode::start(&llm, json!({}));
    build.kill();
    let mut world = Servers::new(home, build, llm);
    let started = std::time::Instant::now();
    world.start_bridge();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "ready only after {:?}",
        started.elapsed()
    );
    let home_id = world.session_on(&world.home, "At home");
    let home_root = world.wait_root(&home_id);
    world.round_trip(&home_root, "home while build is down", "home still answers");
    // `status` shows each server: one heard from, one never.
    wait_for("status to show both servers", || {
        heard_per_server(&world) == [("build".to_string(), false), ("home".to_string(), true)]
    });
    let (text, _) = opencode_mattermost::status::show(world.state.path(), false);
    assert!(
        text.contains("  opencode    build last heard never\n"),
        "{text}"
    );
    assert!(text.contains("  opencode    home last heard 20"), "{text}");

    // Back, the other server is followed like any other.
    world.build.restart();
    let build_id = world.session_on(&world.build, "On the build box");
    let build_root = world.wait_root(&build_id);
    world.round_trip(&build_root, "build question", "build answer");
    wait_for("status to show build heard", || {
        heard_per_server(&world) == [("build".to_string(), true), ("home".to_string(), true)]
    });
}
