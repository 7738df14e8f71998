//! Links (OPENCODE_MM_LINKS_DIR): the real binary serving several owners from one process, against
//! the fake Mattermost and a real OpenCode. Isolation is the invariant: a link's sessions, posts
//! and outages stay its own; SIGHUP adds and removes links without touching the others.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::json;

use crate::cli::{BINARY, Finish, Running};
use crate::e2e::text;
use crate::support::llm::{FakeLlm, Gate, Step};
use crate::support::mattermost::{FakeMattermost, Post};
use crate::support::opencode::OpenCode;
use crate::support::{SOON, TempDir};

/// One OpenCode server shared by a team, one fake Mattermost, and a links directory.
struct Team {
    running: Option<Running>,
    llm: FakeLlm,
    opencode: OpenCode,
    mattermost: FakeMattermost,
    state: TempDir,
    links: TempDir,
}

/// One link's owner, as the tests see it.
struct Member {
    name: &'static str,
    /// Who the link's bot is: its user id and token.
    bot_id: String,
    bot_token: String,
    owner_id: String,
    dm: String,
    dir: PathBuf,
}

impl Team {
    fn new() -> Team {
        let llm = FakeLlm::start();
        let opencode = OpenCode::start(&llm, json!({}));
        Team {
            running: None,
            llm,
            opencode,
            mattermost: FakeMattermost::start(),
            state: TempDir::new("links-state"),
            links: TempDir::new("links-dir"),
        }
    }

    /// A member owning the directory `projects/NAME` on the shared server, with `bot` as the
    /// link's bot (the fake's bot account, or any user standing in for a second bot).
    fn member(&self, name: &'static str, owner: &str, bot: (&str, &str)) -> Member {
        let dm = self.mattermost.dm_channel(bot.0, owner);
        Member {
            name,
            bot_id: bot.0.to_string(),
            bot_token: bot.1.to_string(),
            owner_id: owner.to_string(),
            dm,
            dir: self.opencode.new_project_dir(name),
        }
    }

    fn write_link(&self, member: &Member) {
        let contents = format!(
            "MATTERMOST_OWNER={}\nMATTERMOST_TOKEN={}\nOPENCODE_MM_DIRS={}\n",
            member.owner_id,
            member.bot_token,
            member.dir.display()
        );
        std::fs::write(self.link_file(member.name), contents).expect("write link file");
    }

    fn link_file(&self, name: &str) -> PathBuf {
        self.links.path().join(format!("{name}.env"))
    }

    fn command(&self) -> Command {
        let mut command = Command::new(BINARY);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MATTERMOST_URL", self.mattermost.url())
            .env("OPENCODE_URL", self.opencode.bridge_url())
            .env("OPENCODE_MM_STATE_DIR", self.state.path())
            .env("OPENCODE_MM_LINKS_DIR", self.links.path())
            .env("OPENCODE_MM_LOG", "info");
        if crate::support::dialect() == crate::support::Dialect::V2 {
            command.env("OPENCODE_API", "v2");
        }
        command
    }

    /// Starts the binary and waits until every named link is connected to both sides.
    fn start(&mut self, ready: &[&str]) {
        let mut running = Running::start(self.command());
        for name in ready {
            wait_for_line(
                &mut running,
                &[&format!("({name})"), "event stream connected"],
            );
        }
        self.running = Some(running);
    }

    fn running(&mut self) -> &mut Running {
        self.running.as_mut().expect("the bridge runs")
    }

    fn hangup(&mut self) {
        let pid = self.running().child.id().to_string();
        let status = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn new_session(&self, member: &Member, title: &str) -> String {
        let session = self.opencode.create_session(&member.dir, Some(title));
        session["id"].as_str().expect("session id").to_string()
    }

    fn roots(&self, dm: &str, session_id: &str) -> Vec<Post> {
        self.mattermost
            .posts_in(dm)
            .into_iter()
            .filter(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            .collect()
    }

    fn wait_root(&self, member: &Member, session_id: &str) -> Post {
        let dm = member.dm.clone();
        self.mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm)
                    .into_iter()
                    .find(|p| p.root_id.is_empty() && p.props["opencode_session_id"] == session_id)
            })
            .unwrap_or_else(|| panic!("no thread root for {session_id} in {}'s DM", member.name))
    }

    /// Waits for a bot post in `root`'s thread whose text contains `needle`.
    fn wait_reply(&self, member: &Member, root: &Post, needle: &str) -> Post {
        let (dm, root_id, bot) = (member.dm.clone(), root.id.clone(), member.bot_id.clone());
        self.mattermost
            .wait_until(SOON, |view| {
                view.posts_in(&dm).into_iter().find(|p| {
                    p.user_id == bot && p.root_id == root_id && p.message.contains(needle)
                })
            })
            .unwrap_or_else(|| panic!("no reply containing {needle:?} in {}'s thread", member.name))
    }

    fn says(&self, member: &Member, root_id: &str, message: &str) -> Post {
        self.mattermost
            .post_as(&member.owner_id, &member.dm, root_id, message)
            .expect("owner post accepted")
    }

    /// Every user text the session's history holds.
    fn history_text(&self, member: &Member, session_id: &str) -> String {
        self.opencode.messages(session_id, &member.dir).to_string()
    }
}

/// Reads stderr lines until one holds every needle (earlier lines count too).
fn wait_for_line(running: &mut Running, needles: &[&str]) -> String {
    let matches = |line: &str| needles.iter().all(|n| line.contains(n));
    if let Some(line) = running.seen.iter().find(|l| matches(l)) {
        return line.clone();
    }
    let deadline = Instant::now() + SOON;
    loop {
        match running.lines.recv_deadline(deadline) {
            Ok(line) => {
                running.seen.push(line.clone());
                if matches(&line) {
                    return line;
                }
            }
            Err(_) => panic!(
                "no line with {needles:?}; stderr so far:\n{}",
                running.seen.join("\n")
            ),
        }
    }
}

fn members(team: &Team) -> (Member, Member) {
    let (bot, alice, mallory) = (
        team.mattermost.bot(),
        team.mattermost.owner(),
        team.mattermost.stranger(),
    );
    (
        team.member("alice", &alice.id, (&bot.id, &bot.token)),
        team.member("mallory", &mallory.id, (&bot.id, &bot.token)),
    )
}

#[test]
fn one_bot_two_owners_each_sees_only_their_own_sessions_and_prompts() {
    let mut team = Team::new();
    let (alice, mallory) = members(&team);
    team.write_link(&alice);
    team.write_link(&mallory);
    team.start(&["alice", "mallory"]);

    let alice_session = team.new_session(&alice, "Alice's work");
    let mallory_session = team.new_session(&mallory, "Mallory's work");
    let alice_root = team.wait_root(&alice, &alice_session);
    let mallory_root = team.wait_root(&mallory, &mallory_session);
    assert!(team.roots(&mallory.dm, &alice_session).is_empty());
    assert!(team.roots(&alice.dm, &mallory_session).is_empty());
    assert_eq!(team.roots(&alice.dm, &alice_session).len(), 1);

    team.llm
        .script("from alice", vec![vec![text("Alice's answer")]]);
    team.llm
        .script("from mallory", vec![vec![text("Mallory's answer")]]);
    team.says(&alice, &alice_root.id, "a prompt from alice");
    team.says(&mallory, &mallory_root.id, "a prompt from mallory");
    team.wait_reply(&alice, &alice_root, "Alice's answer");
    team.wait_reply(&mallory, &mallory_root, "Mallory's answer");
    let (alice_history, mallory_history) = (
        team.history_text(&alice, &alice_session),
        team.history_text(&mallory, &mallory_session),
    );
    assert!(alice_history.contains("a prompt from alice"));
    assert!(
        !alice_history.contains("a prompt from mallory"),
        "{alice_history}"
    );
    assert!(mallory_history.contains("a prompt from mallory"));
    assert!(
        !mallory_history.contains("a prompt from alice"),
        "{mallory_history}"
    );

    // `!sessions` lists only the link's own directories.
    let listing = team.says(&alice, "", "!sessions");
    let (dm, bot) = (alice.dm.clone(), alice.bot_id.clone());
    let answer = team
        .mattermost
        .wait_until(SOON, |view| {
            view.posts_in(&dm).into_iter().find(|p| {
                p.user_id == bot
                    && p.root_id.is_empty()
                    && p.create_at >= listing.create_at
                    && p.message.contains("**Sessions**")
            })
        })
        .expect("alice's !sessions answered");
    assert!(
        answer.message.contains("Alice's work"),
        "{}",
        answer.message
    );
    assert!(
        !answer.message.contains("Mallory's work"),
        "{}",
        answer.message
    );
    // Nothing of one link ever landed in the other's DM.
    let strays = |member: &Member, other: &str| {
        team.mattermost
            .posts_in(&member.dm)
            .into_iter()
            .filter(|p| p.message.contains(other))
            .count()
    };
    assert_eq!(strays(&alice, "Mallory"), 0);
    assert_eq!(strays(&mallory, "Alice"), 0);

    let (code, _) = team.running().terminate();
    assert_eq!(code, 0, "{}", team.running().log_so_far());
}

#[test]
fn a_revoked_token_or_a_refused_one_leaves_the_other_link_working() {
    let mut team = Team::new();
    let (bot, admin) = (team.mattermost.bot(), team.mattermost.admin());
    let alice = team.member("alice", &team.mattermost.owner().id, (&bot.id, &bot.token));
    // mallory's link has a bot of its own (a regular account standing in for a second bot).
    let mallory = team.member(
        "mallory",
        &team.mattermost.stranger().id,
        (&admin.id, &admin.token),
    );
    team.write_link(&alice);
    team.write_link(&mallory);
    // A third link whose token is refused from the start stays down; the others run.
    std::fs::write(
        team.link_file("refused"),
        format!(
            "MATTERMOST_OWNER={}\nMATTERMOST_TOKEN=not-a-valid-token-000000\nOPENCODE_MM_DIRS=/nowhere\n",
            team.mattermost.owner().id
        ),
    )
    .unwrap();
    team.start(&["alice", "mallory"]);
    wait_for_line(
        team.running(),
        &["link refused:", "rejected the token (401)", "stays down"],
    );

    team.mattermost.revoke_token(&admin.id);
    // The revoked link posts nothing more (its session gets no thread); alice's goes on.
    let mallory_session = team.new_session(&mallory, "Nobody hears this");
    let alice_session = team.new_session(&alice, "Alice carries on");
    let alice_root = team.wait_root(&alice, &alice_session);
    team.llm
        .script("still there", vec![vec![text("Yes, still here")]]);
    team.says(&alice, &alice_root.id, "are you still there?");
    team.wait_reply(&alice, &alice_root, "Yes, still here");
    assert!(team.roots(&mallory.dm, &mallory_session).is_empty());
    assert!(team.roots(&alice.dm, &mallory_session).is_empty());

    let (code, _) = team.running().terminate();
    assert_eq!(code, 0, "{}", team.running().log_so_far());
}

#[test]
fn sighup_adds_a_link_and_removes_one_without_touching_the_others() {
    let mut team = Team::new();
    let (alice, mallory) = members(&team);
    let (bot, admin) = (team.mattermost.bot(), team.mattermost.admin());
    let carol = team.member("carol", &admin.id, (&bot.id, &bot.token));
    team.write_link(&alice);
    team.write_link(&mallory);
    team.start(&["alice", "mallory"]);
    let alice_before = team.new_session(&alice, "Before the reload");
    let alice_root = team.wait_root(&alice, &alice_before);

    std::fs::remove_file(team.link_file("mallory")).unwrap();
    team.write_link(&carol);
    team.hangup();
    wait_for_line(team.running(), &["link mallory: stopped"]);
    wait_for_line(team.running(), &["(carol)", "event stream connected"]);

    // Mallory's directory belongs to no link now; carol's new one works, and alice's too.
    let mallory_after = team.new_session(&mallory, "After mallory left");
    let carol_session = team.new_session(&carol, "Carol's first");
    team.wait_root(&carol, &carol_session);
    let alice_after = team.new_session(&alice, "After the reload");
    team.wait_root(&alice, &alice_after);
    assert!(team.roots(&mallory.dm, &mallory_after).is_empty());
    assert!(team.roots(&carol.dm, &mallory_after).is_empty());
    assert!(team.roots(&alice.dm, &carol_session).is_empty());

    // carol's owner (a system admin, who may post in any channel) replies in alice's thread:
    // neither link takes it. alice's own reply afterwards is the only prompt her session gets.
    team.mattermost
        .post_as(
            &carol.owner_id,
            &alice.dm,
            &alice_root.id,
            "carol sneaks in",
        )
        .expect("an admin may post in any channel");
    team.llm
        .script("alice again", vec![vec![text("Hello again, alice")]]);
    let again = team.says(&alice, &alice_root.id, "alice again");
    team.wait_reply(&alice, &alice_root, "Hello again, alice");
    // While alice's next answer runs, carol's owner reacts 🛑 on it and 🔁 on alice's prompt:
    // neither link acts. Then 🔁 on her own prompt, which her link does resend: its look-ups run
    // in order, so once that resend is seen, her link has dealt with the first two as well.
    team.llm
        .script("carol asks", vec![vec![text("Answer for carol")]]);
    let carol_root = team.wait_root(&carol, &carol_session);
    let carol_prompt = team.says(&carol, &carol_root.id, "carol asks");
    team.wait_reply(&carol, &carol_root, "Answer for carol");
    let gate = Gate::new();
    team.llm.script(
        "alice third",
        vec![vec![
            text("Third answer begins."),
            Step::Gate(gate.clone()),
            text(" Third answer ends."),
        ]],
    );
    team.says(&alice, &alice_root.id, "alice third");
    let running = team.wait_reply(&alice, &alice_root, "Third answer begins.");
    for (post, emoji) in [(&running.id, "octagonal_sign"), (&again.id, "repeat")] {
        team.mattermost
            .react_as(&carol.owner_id, post, emoji)
            .expect("an admin may react in any channel");
    }
    team.mattermost
        .react_as(&carol.owner_id, &carol_prompt.id, "repeat")
        .expect("reaction accepted");
    let asked = |prompt: &str| {
        team.llm
            .requests()
            .iter()
            .filter(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
            .filter_map(crate::e2e::last_user_text)
            .filter(|p| p == prompt)
            .count()
    };
    let deadline = Instant::now() + SOON;
    while asked("carol asks") < 2 {
        assert!(Instant::now() < deadline, "carol's own 🔁 was not acted on");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    gate.open();
    let finished = team.wait_reply(&alice, &alice_root, "Third answer ends.");
    assert!(
        !finished.message.contains("nterrupted"),
        "carol's 🛑 stopped alice's answer: {}",
        finished.message
    );
    assert_eq!(asked("alice again"), 1, "carol's 🔁 resent alice's prompt");
    let history = team.history_text(&alice, &alice_before);
    assert!(!history.contains("carol sneaks in"), "{history}");
    assert!(team.roots(&carol.dm, &alice_before).is_empty());

    // alice was left alone: started once, never stopped or restarted.
    let log = team.running().log_so_far();
    assert_eq!(log.matches("link alice: started").count(), 1, "{log}");
    assert!(!log.contains("link alice: stopped"), "{log}");
    assert!(!log.contains("link alice: its file changed"), "{log}");
    assert_eq!(
        log.matches("(alice) opencode event stream connected")
            .count(),
        1,
        "{log}"
    );

    // A changed file restarts its link (after the old one let go of its state directory).
    let carol_extra = team.opencode.new_project_dir("carol-extra");
    std::fs::write(
        team.link_file("carol"),
        format!(
            "MATTERMOST_OWNER={}\nMATTERMOST_TOKEN={}\nOPENCODE_MM_DIRS={},{}\n",
            carol.owner_id,
            carol.bot_token,
            carol.dir.display(),
            carol_extra.display()
        ),
    )
    .unwrap();
    team.hangup();
    wait_for_line(
        team.running(),
        &["link carol: its file changed; restarting it"],
    );
    wait_for_line(
        team.running(),
        &["link carol: restarting with its changed file"],
    );
    let extra = team
        .opencode
        .create_session(&carol_extra, Some("In carol's new directory"));
    let extra_id = extra["id"].as_str().expect("session id").to_string();
    team.wait_root(&carol, &extra_id);

    // `status` reports each link from its own state directory.
    let output = Command::new(BINARY)
        .env_clear()
        .env("OPENCODE_MM_STATE_DIR", team.state.path())
        .env("OPENCODE_MM_LINKS_DIR", team.links.path())
        .arg("status")
        .finish();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("link alice: running (pid"), "{stdout}");
    assert!(stdout.contains("link carol: running (pid"), "{stdout}");
    assert!(!stdout.contains("link mallory"), "{stdout}");

    // A broken file on reload: that link keeps its previous settings, the others go on.
    std::fs::write(
        team.link_file("carol"),
        "MATTERMOST_OWNER=carol\nOPENCODE_MM_LOG=debug\n",
    )
    .unwrap();
    team.hangup();
    wait_for_line(
        team.running(),
        &[
            "link carol:",
            "OPENCODE_MM_LOG cannot be set per link",
            "keeps running with its previous settings",
        ],
    );
    let carol_again = team.new_session(&carol, "Carol after the broken edit");
    team.wait_root(&carol, &carol_again);

    let (code, _) = team.running().terminate();
    assert_eq!(code, 0, "{}", team.running().log_so_far());
}

fn start_error(links: &Path, files: &[(&str, String)]) -> (i32, String) {
    for (name, contents) in files {
        std::fs::write(links.join(name), contents).unwrap();
    }
    let state = TempDir::new("links-start");
    let output = Command::new(BINARY)
        .env_clear()
        .env("MATTERMOST_URL", "http://127.0.0.1:9")
        .env("MATTERMOST_TOKEN", "processtoken0123456789abcd")
        .env("OPENCODE_URL", "http://127.0.0.1:9")
        .env("OPENCODE_MM_STATE_DIR", state.path())
        .env("OPENCODE_MM_LINKS_DIR", links)
        .finish();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!stderr.contains("processtoken0123456789abcd"), "{stderr}");
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn overlapping_dirs_and_a_broken_link_file_stop_the_start_with_exit_2() {
    let links = TempDir::new("links-overlap");
    let (code, stderr) = start_error(
        links.path(),
        &[
            (
                "alice.env",
                "MATTERMOST_OWNER=alice\nOPENCODE_MM_DIRS=/srv/team\n".into(),
            ),
            (
                "bob.env",
                "MATTERMOST_OWNER=bob\nOPENCODE_MM_DIRS=/home/bob,/srv/team/api\n".into(),
            ),
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    let dir = links.path().display();
    assert!(
        stderr.contains(&format!(
            "link files {dir}/alice.env and {dir}/bob.env: both take sessions"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("OPENCODE_MM_DIRS overlap"), "{stderr}");

    let links = TempDir::new("links-broken");
    let (code, stderr) = start_error(
        links.path(),
        &[
            ("alice.env", "MATTERMOST_OWNER=alice\n".into()),
            (
                "bob.env",
                "MATTERMOST_OWNER=bob\nOPENCODE_MM_STATE_DIR=/tmp/x\n".into(),
            ),
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    let bob_problem = format!(
        "link file {}/bob.env: OPENCODE_MM_STATE_DIR cannot be set per link",
        links.path().display()
    );
    assert!(stderr.contains(&bob_problem), "{stderr}");

    // `check` reports per link: alice is checked (and fails: nothing listens), bob is wrong.
    let state = TempDir::new("links-check");
    let output = Command::new(BINARY)
        .env_clear()
        .env("MATTERMOST_URL", "http://127.0.0.1:9")
        .env("MATTERMOST_TOKEN", "processtoken0123456789abcd")
        .env("OPENCODE_URL", "http://127.0.0.1:9")
        .env("OPENCODE_MM_STATE_DIR", state.path())
        .env("OPENCODE_MM_LINKS_DIR", links.path())
        .arg("check")
        .finish();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("✓ links"), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("✓ link ") && l.contains("alice (")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("✗ mattermost")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("✗ link ") && l.contains(&format!("bob: {bob_problem}"))),
        "{stdout}"
    );
}

#[test]
fn sighup_without_a_links_dir_only_logs() {
    let mattermost = FakeMattermost::start();
    let state = TempDir::new("links-hup");
    let mut command = crate::cli::command(&state);
    crate::cli::bridge_env(&mut command, &mattermost, &mattermost.bot().token);
    let mut running = Running::start(command);
    running.wait_for_line("talks to @alice");
    let pid = running.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    running.wait_for_line("SIGHUP: nothing to reload without OPENCODE_MM_LINKS_DIR");
    let (code, _) = running.terminate();
    assert_eq!(code, 0, "{}", running.log_so_far());
}

#[test]
fn a_single_link_whose_token_is_refused_exits_2_as_without_links() {
    let mattermost = FakeMattermost::start();
    let links = TempDir::new("links-single");
    std::fs::write(
        links.path().join("alice.env"),
        format!(
            "MATTERMOST_OWNER={}\nMATTERMOST_TOKEN=refusedtoken0123456789abcd\n",
            mattermost.owner().id
        ),
    )
    .unwrap();
    let state = TempDir::new("links-single-state");
    let output = Command::new(BINARY)
        .env_clear()
        .env("MATTERMOST_URL", mattermost.url())
        .env("OPENCODE_URL", "http://127.0.0.1:9")
        .env("OPENCODE_MM_STATE_DIR", state.path())
        .env("OPENCODE_MM_LINKS_DIR", links.path())
        .finish();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rejected the token (401)"), "{stderr}");
    assert!(!stderr.contains("refusedtoken0123456789abcd"), "{stderr}");
}
