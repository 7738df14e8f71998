//! The Mattermost client's file, reaction and typing calls against the fake Mattermost, without the
//! bridge: uploads, downloads with a size limit, posts with files, the bot's reactions, and typing
//! sent over the websocket.

use std::thread;

use crossbeam_channel::{Receiver, Sender};

use opencode_mattermost::config::Secret;
use opencode_mattermost::mattermost::rest::{MattermostClient, MmError};
use opencode_mattermost::mattermost::ws::{self, WsSettings, WsUpdate};
use opencode_mattermost::mattermost::{WsAction, WsEvent};

use crate::support::SOON;
use crate::support::mattermost::FakeMattermost;

fn bot_client(mattermost: &FakeMattermost) -> MattermostClient {
    MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.bot().token))
}

fn dm(mattermost: &FakeMattermost) -> String {
    mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id)
}

#[test]
fn upload_attach_and_download_a_file() {
    let mattermost = FakeMattermost::start();
    let client = bot_client(&mattermost);
    let channel = dm(&mattermost);
    // Every byte value, and the text of a multipart delimiter, to show nothing is misread.
    let mut content: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    content.extend_from_slice(b"\r\n--boundary\r\n");
    let filename = "résumé \"v2\".bin";

    let uploaded = client
        .upload_file(&channel, filename, &content)
        .expect("upload");
    assert_eq!(uploaded.name, filename);
    assert_eq!(uploaded.size, content.len() as u64);
    assert_eq!(
        mattermost.file(&uploaded.id),
        Some((filename.to_string(), content.clone()))
    );

    let info = client.file_info(&uploaded.id).expect("file info");
    assert_eq!(info.name, filename);
    assert_eq!(info.size, content.len() as u64);
    assert_eq!(info.extension, "bin");

    let post = client
        .create_post_with_files(&channel, "", "the file", std::slice::from_ref(&uploaded.id))
        .expect("post with file");
    assert_eq!(post.file_ids, Some(vec![uploaded.id.clone()]));
    let stored = mattermost.post(&post.id).expect("stored post");
    assert_eq!(stored.file_ids, vec![uploaded.id.clone()]);
    assert_eq!(stored.message, "the file");

    let downloaded = client
        .download_file(&uploaded.id, content.len() as u64)
        .expect("download at exactly the limit");
    assert_eq!(downloaded, content);
}

#[test]
fn a_file_over_the_limit_is_refused_without_retrying() {
    let mattermost = FakeMattermost::start();
    let client = bot_client(&mattermost);
    let channel = dm(&mattermost);
    // The owner sends a file; the bot may read it because it is attached to a post in their DM.
    let owner = MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.owner().token));
    let file_id = mattermost.upload_as(&mattermost.owner().id, &channel, "big.txt", &[b'a'; 5000]);
    owner
        .create_post_with_files(&channel, "", "here", std::slice::from_ref(&file_id))
        .expect("owner's post");

    let error = client.download_file(&file_id, 4999).unwrap_err();
    assert!(
        matches!(error, MmError::TooLarge { limit: 4999, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains(&file_id) && text.contains("4999"), "{text}");
    let downloads = mattermost
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == format!("/api/v4/files/{file_id}"))
        .count();
    assert_eq!(downloads, 1, "a too-large file is not asked for again");

    let bytes = client.download_file(&file_id, 1 << 20).expect("download");
    assert_eq!(bytes, vec![b'a'; 5000]);
    let missing = client.file_info("abcdefghijklmnopqrstuvwxyz").unwrap_err();
    assert_eq!(missing.status(), Some(404), "{missing}");
}

#[test]
fn the_bot_reacts_to_a_post() {
    let mattermost = FakeMattermost::start();
    let client = bot_client(&mattermost);
    let channel = dm(&mattermost);
    let owner = mattermost.owner().id;
    let post = mattermost
        .post_as(&owner, &channel, "", "rm -rf target?")
        .expect("owner's post")
        .id;
    let bot = mattermost.bot().id;
    client
        .add_reaction(&bot, &post, "white_check_mark")
        .expect("reaction");
    client.add_reaction(&bot, &post, "+1").expect("reaction");
    assert_eq!(
        mattermost.reactions(&post),
        vec![
            (bot.clone(), "white_check_mark".to_string()),
            (bot.clone(), "+1".to_string())
        ]
    );
    // A bot cannot react in someone else's name.
    let refused = client.add_reaction(&owner, &post, "x").unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
}

/// The websocket thread with its channels; dropping it stops the thread and waits for it.
pub(crate) struct Socket {
    updates: Receiver<WsUpdate>,
    actions: Sender<WsAction>,
    stop: Option<Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Socket {
    pub(crate) fn start(mattermost: &FakeMattermost) -> Socket {
        let client = bot_client(mattermost);
        let settings = WsSettings {
            base_url: mattermost.url(),
            authorization: client.authorization().to_string(),
            tls: Default::default(),
            heard: Default::default(),
        };
        let (out, updates) = crossbeam_channel::unbounded();
        let (actions, actions_rx) = crossbeam_channel::bounded(64);
        let (stop, stop_rx) = crossbeam_channel::bounded(0);
        let thread = thread::spawn(move || ws::run::<WsUpdate>(settings, out, actions_rx, stop_rx));
        Socket {
            updates,
            actions,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn wait_for(&self, wanted: impl Fn(&WsUpdate) -> bool) {
        loop {
            let update = self
                .updates
                .recv_timeout(SOON)
                .expect("websocket update in time");
            if wanted(&update) {
                return;
            }
        }
    }

    fn typing(&self, channel_id: &str, parent_id: &str) {
        self.actions
            .try_send(WsAction::Typing {
                channel_id: channel_id.into(),
                parent_id: parent_id.into(),
            })
            .expect("room in the action queue");
    }

    /// The next update that is not a disconnect report.
    pub(crate) fn next(&self) -> WsUpdate {
        loop {
            match self
                .updates
                .recv_timeout(SOON)
                .expect("websocket update in time")
            {
                WsUpdate::Disconnected(_) => continue,
                update => return update,
            }
        }
    }

    /// Whether the next connection was resumed; events before it (such as the status change that
    /// follows a hello) are passed over.
    pub(crate) fn next_connected(&self) -> bool {
        loop {
            match self.next() {
                WsUpdate::Connected { resumed, .. } => return resumed,
                WsUpdate::Event(WsEvent::Other(_)) => continue,
                other => panic!("expected a connection, got {other:?}"),
            }
        }
    }

    pub(crate) fn wait_for_post(&self, message: &str) {
        loop {
            if let WsUpdate::Event(WsEvent::Posted(post)) = self.next()
                && post.message == message
            {
                return;
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn typing_goes_out_over_the_websocket_with_its_thread() {
    let mattermost = FakeMattermost::start();
    let channel = dm(&mattermost);
    let bot = mattermost.bot().id;
    let root = mattermost
        .post_as(&bot, &channel, "", "session root")
        .expect("root post")
        .id;
    let socket = Socket::start(&mattermost);
    socket.wait_for(|u| matches!(u, WsUpdate::Connected { .. }));

    socket.typing(&channel, &root);
    socket.typing(&channel, "");
    let expected = vec![
        (bot.clone(), channel.clone(), root.clone()),
        (bot.clone(), channel.clone(), String::new()),
    ];
    let seen = mattermost.wait_until(SOON, |view| {
        (view.typing_events().len() >= 2).then(|| view.typing_events().to_vec())
    });
    assert_eq!(seen, Some(expected));
}

#[test]
fn typing_asked_for_while_disconnected_is_dropped() {
    let mattermost = FakeMattermost::start();
    let channel = dm(&mattermost);
    let bot = mattermost.bot().id;
    let socket = Socket::start(&mattermost);
    socket.wait_for(|u| matches!(u, WsUpdate::Connected { .. }));

    mattermost.set_down(true);
    socket.wait_for(|u| matches!(u, WsUpdate::Disconnected(_)));
    socket.typing(&channel, "stale");
    mattermost.set_down(false);
    socket.wait_for(|u| matches!(u, WsUpdate::Connected { .. }));
    socket.typing(&channel, "fresh");

    let seen = mattermost.wait_until(SOON, |view| {
        view.typing_events()
            .iter()
            .any(|(_, _, parent)| parent == "fresh")
            .then(|| view.typing_events().to_vec())
    });
    assert_eq!(seen, Some(vec![(bot, channel, "fresh".to_string())]));
}

/// A thread root posted before a crash is found by paging back through the channel by post id: across
/// pages, and even when Mattermost's clock is behind the bridge's (`since=` missed it then).
#[test]
fn an_unrecorded_thread_root_is_found_by_paging_back_by_post_id() {
    use opencode_mattermost::mattermost::search::find_thread_root;
    use serde_json::json;

    let mattermost = FakeMattermost::start();
    let client = bot_client(&mattermost);
    let channel = dm(&mattermost);
    let (bot, owner) = (mattermost.bot().id, mattermost.owner().id);
    mattermost
        .post_as(&owner, &channel, "", "older chatter")
        .expect("post");
    let other = client
        .create_post(
            &channel,
            "",
            "another session",
            Some(json!({"opencode_session_id": "ses_other"})),
        )
        .expect("other root");
    let root = client
        .create_post(
            &channel,
            "",
            "the root",
            Some(json!({"opencode_session_id": "ses_lost"})),
        )
        .expect("root");
    // More than two pages of posts after it, replies and roots.
    for i in 0..450 {
        let root_id = if i % 3 == 0 { root.id.as_str() } else { "" };
        mattermost
            .post_as(&owner, &channel, root_id, &format!("post {i}"))
            .expect("post");
    }
    let find = |session: &str, since_ms: i64| {
        find_thread_root(&client, &channel, &bot, session, since_ms as u64).expect("look-up")
    };
    let found = find("ses_lost", root.create_at).expect("the root");
    assert_eq!(found.id, root.id);
    // Mattermost's clock five minutes behind the bridge's.
    let found = find("ses_lost", root.create_at + 5 * 60 * 1000).expect("the root, despite skew");
    assert_eq!(found.id, root.id);
    assert_eq!(
        find("ses_other", other.create_at).map(|p| p.id),
        Some(other.id)
    );
    assert!(find("ses_never_posted", root.create_at).is_none());
    // Only the bot's own roots count.
    assert!(
        find_thread_root(&client, &channel, &owner, "ses_lost", root.create_at as u64)
            .expect("look-up")
            .is_none()
    );
}
