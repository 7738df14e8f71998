//! Delivery guarantees of the Mattermost client against the fake Mattermost's fault controls: patient
//! calls wait out outages, 503 runs and 429 storms and deliver exactly once; `shut_down` ends their
//! wait; `posts_after` catches up over REST; the websocket reader skips frames it cannot read and
//! reports resumed and fresh connections as they are.

use std::time::{Duration, Instant};

use opencode_mattermost::config::Secret;
use opencode_mattermost::mattermost::rest::{MattermostClient, MmError};

use crate::support::mattermost::{FakeMattermost, RateLimit};
use crate::support::{SOON, spawn_bounded};

/// Short retry delays, so a run of failures takes seconds, not minutes.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const LONGEST_RETRY: Duration = Duration::from_millis(200);

fn patient_client(mattermost: &FakeMattermost) -> MattermostClient {
    MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.bot().token))
        .patient()
        .with_retry_delays(FIRST_RETRY, LONGEST_RETRY)
}

fn dm(mattermost: &FakeMattermost) -> String {
    mattermost.dm_channel(&mattermost.bot().id, &mattermost.owner().id)
}

/// Waits until the server, while down, has turned away `n` connections or requests.
fn refused_at_least(mattermost: &FakeMattermost, n: u64) {
    mattermost
        .wait_until(SOON, |view| (view.refused_while_down() >= n).then_some(()))
        .unwrap_or_else(|| panic!("the client did not try {n} times during the outage"));
}

fn post_creates(mattermost: &FakeMattermost) -> usize {
    mattermost
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .count()
}

#[test]
fn a_patient_create_waits_out_a_server_that_is_down() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    mattermost.set_down(true);
    let sender = client.clone();
    let target = channel.clone();
    let create = spawn_bounded("the create", move || {
        sender.create_post(&target, "", "after the outage", None)
    });
    // The call has to keep retrying through the outage.
    refused_at_least(&mattermost, 3);
    assert!(
        !create.is_finished(),
        "the create gave up during the outage"
    );
    mattermost.set_down(false);
    let post = create
        .join_within(SOON)
        .expect("delivered once the server is back");
    let posts = mattermost.posts_in(&channel);
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].id, post.id);
    assert_eq!(posts[0].message, "after the outage");
    let stats = client.stats();
    assert!(stats.retries >= 1, "{stats:?}");
    assert!(mattermost.duplicated_pending_ids().is_empty());
}

#[test]
fn twenty_503s_in_a_row_then_one_post() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    mattermost.fail_next(20, 503);
    let post = client
        .create_post(&channel, "", "through the 503s", None)
        .expect("delivered after the 503s");
    assert_eq!(mattermost.posts_in(&channel).len(), 1);
    assert_eq!(
        mattermost.post(&post.id).unwrap().message,
        "through the 503s"
    );
    assert_eq!(post_creates(&mattermost), 21);
    let stats = client.stats();
    assert_eq!(stats.retries, 20, "{stats:?}");
    assert_eq!(stats.outages_waited, 1, "{stats:?}");
}

#[test]
fn an_impatient_client_still_gives_up_and_a_4xx_fails_at_once() {
    let mattermost = FakeMattermost::start();
    let impatient = MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.bot().token))
        .with_retry_delays(FIRST_RETRY, LONGEST_RETRY);
    let channel = dm(&mattermost);
    mattermost.fail_next(20, 503);
    let error = impatient
        .create_post(&channel, "", "never", None)
        .unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
    assert_eq!(post_creates(&mattermost), 6);

    // A permanent refusal is not retried, however patient the client.
    mattermost.fail_next(0, 503);
    let patient = impatient
        .patient()
        .with_retry_delays(FIRST_RETRY, LONGEST_RETRY);
    let error = patient
        .create_post("no-such-channel-id-at-all0", "", "refused", None)
        .unwrap_err();
    assert_eq!(error.status(), Some(403), "{error}");
    assert_eq!(post_creates(&mattermost), 7);
}

#[test]
fn a_lost_answer_is_retried_without_a_duplicate_post() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    // The server stores the post, then the connection drops before the answer.
    mattermost.lose_next_responses(1);
    let post = client
        .create_post(&channel, "", "answer lost once", None)
        .expect("the retry finds the stored post");
    // Found by the look-up: the server's `pending_post_id` memory is not relied on.
    assert_eq!(post_creates(&mattermost), 1);
    let posts = mattermost.posts_in(&channel);
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].id, post.id);
    assert!(mattermost.duplicated_pending_ids().is_empty());

    // An answer slower than the client's deadline: the same, through a timeout.
    mattermost.delay_next_responses(1, Duration::from_secs(3));
    let hurried = client.with_call_timeout(Duration::from_millis(500));
    let slow = hurried
        .create_post(&channel, &post.id, "answer too slow", None)
        .expect("the retry finds the stored reply");
    let posts = mattermost.posts_in(&channel);
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(posts[1].id, slow.id);
    assert!(mattermost.duplicated_pending_ids().is_empty());

    // Files go the same way.
    let file = client
        .upload_file(&channel, "a.txt", b"hello")
        .expect("upload");
    mattermost.lose_next_responses(1);
    let with_file = client
        .create_post_with_files(&channel, "", "with a file", std::slice::from_ref(&file.id))
        .expect("the retry finds the stored post");
    let posts = mattermost.posts_in(&channel);
    assert_eq!(posts.len(), 3, "{posts:?}");
    assert_eq!(posts[2].id, with_file.id);
    assert_eq!(posts[2].file_ids, vec![file.id]);
    assert!(mattermost.duplicated_pending_ids().is_empty());
}

/// A post stored while its answer was lost, then an outage longer than the 30 s Mattermost remembers
/// a `pending_post_id`: the retry finds the stored post instead of making a second one. The fake's
/// clock jumps past its memory, so the outage takes no real time; without the look-up the retry
/// makes a second post.
#[test]
fn a_lost_answer_then_a_long_outage_still_makes_one_post() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    let root = client
        .create_post(&channel, "", "the thread", None)
        .expect("root");
    // Stored, then its answer held long enough for the test to take the server down under it.
    mattermost.delay_next_responses(1, Duration::from_secs(5));
    let creating = {
        let client = client.clone();
        let channel = channel.clone();
        let root = root.id.clone();
        spawn_bounded("the create", move || {
            client.create_post(&channel, &root, "stored, answer lost", None)
        })
    };
    mattermost
        .wait_until(SOON, |view| {
            view.thread(&root.id)
                .into_iter()
                .find(|p| p.message == "stored, answer lost")
        })
        .expect("the first try stored the post");
    mattermost.set_down(true);
    mattermost.advance_clock(Duration::from_secs(31));
    mattermost
        .wait_until(SOON, |view| (view.refused_while_down() >= 4).then_some(()))
        .expect("the create kept trying during the outage");
    mattermost.set_down(false);
    let post = creating
        .join_within(SOON)
        .expect("delivered after the outage");
    let copies: Vec<_> = mattermost
        .thread(&root.id)
        .into_iter()
        .filter(|p| p.message == "stored, answer lost")
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].id, post.id);
}

#[test]
fn a_429_storm_delivers_every_post_once() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    // Slower than the client's own default pace (10/s), so the server has to push back.
    mattermost.set_rate_limit(Some(RateLimit {
        per_second: 8,
        burst: 4,
    }));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            let channel = channel.clone();
            spawn_bounded("a storm thread", move || {
                for i in 0..50 {
                    client
                        .create_post(&channel, "", &format!("storm {t}-{i}"), None)
                        .expect("delivered through the storm");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join_within(Duration::from_secs(120));
    }
    mattermost.set_rate_limit(None);
    let posts = mattermost.posts_in(&channel);
    assert_eq!(posts.len(), 200);
    let mut messages: Vec<String> = posts.iter().map(|p| p.message.clone()).collect();
    messages.sort();
    messages.dedup();
    assert_eq!(messages.len(), 200, "a message was posted twice");
    // Each thread's posts arrive in its own order.
    for t in 0..4 {
        let prefix = format!("storm {t}-");
        let order: Vec<u32> = posts
            .iter()
            .filter_map(|p| p.message.strip_prefix(&prefix))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(order, (0..50).collect::<Vec<u32>>());
    }
    assert!(mattermost.duplicated_pending_ids().is_empty());
    let refused = mattermost
        .requests()
        .iter()
        .filter(|r| r.status == 429)
        .count() as u64;
    let stats = client.stats();
    assert!(refused > 0, "the storm never hit the limit: {stats:?}");
    assert_eq!(stats.rate_limited, refused, "{stats:?}");
    assert_eq!(stats.outages_waited, 0, "429s are not an outage: {stats:?}");
}

#[test]
fn shut_down_ends_a_patient_wait() {
    let mattermost = FakeMattermost::start();
    let client =
        MattermostClient::new(&mattermost.url(), &Secret::new(mattermost.bot().token)).patient();
    let channel = dm(&mattermost);
    mattermost.set_down(true);
    let sender = client.clone();
    let waiting = spawn_bounded("the create", move || {
        sender.create_post(&channel, "", "never sent", None)
    });
    // Let it fail a few times first, so the shutdown finds it waiting.
    refused_at_least(&mattermost, 2);
    let asked = Instant::now();
    client.shut_down();
    let result = waiting.join_within(Duration::from_secs(10));
    let took = asked.elapsed();
    eprintln!("shut_down ended the wait after {took:?}");
    assert!(matches!(result, Err(MmError::Stopping)), "{result:?}");
    // Far more than it takes (~100 ms), far less than waiting for the server.
    assert!(took < Duration::from_secs(10), "{took:?}");
    // A stopping bridge still gets one attempt per call (final edits), but never a retry.
    assert!(matches!(client.me(), Err(MmError::Stopping)));
    mattermost.set_down(false);
    let me = client
        .me()
        .expect("one attempt still goes out after shut_down");
    assert_eq!(me.id, mattermost.bot().id);
    mattermost.fail_next(1, 503);
    assert!(matches!(client.me(), Err(MmError::Stopping)));
}

#[test]
fn posts_after_pages_through_everything_oldest_first() {
    let mattermost = FakeMattermost::start();
    let client = patient_client(&mattermost);
    let channel = dm(&mattermost);
    let owner = mattermost.owner();
    let bot = mattermost.bot();
    assert!(client.latest_post(&channel).unwrap().is_none());
    let anchor = mattermost
        .post_as(&owner.id, &channel, "", "before the gap")
        .unwrap();
    let mut roots = Vec::new();
    for i in 0..450 {
        let author = if i % 2 == 0 { &owner.id } else { &bot.id };
        // Every third post is a reply to an earlier root, some of them older than the anchor.
        let root = match (i % 3, roots.last()) {
            (2, Some(root)) => String::clone(root),
            (2, None) => anchor.id.clone(),
            _ => String::new(),
        };
        let post = mattermost
            .post_as(author, &channel, &root, &format!("post {i}"))
            .unwrap();
        if root.is_empty() {
            roots.push(post.id);
        }
    }
    let expected: Vec<String> = mattermost
        .posts_in(&channel)
        .into_iter()
        .skip(1)
        .map(|p| p.id)
        .collect();
    assert_eq!(expected.len(), 450);
    for per_page in [100, 200, 7] {
        let got: Vec<String> = client
            .posts_after(&channel, &anchor.id, per_page)
            .expect("catch-up")
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(got, expected, "per_page {per_page}");
    }
    let replies = client
        .posts_after(&channel, &anchor.id, 200)
        .unwrap()
        .into_iter()
        .filter(|p| !p.root_id.is_empty())
        .count();
    assert_eq!(replies, 150);
    let latest = client
        .latest_post(&channel)
        .unwrap()
        .expect("a newest post");
    assert_eq!(Some(&latest.id), expected.last());
    assert!(
        client
            .posts_after(&channel, &latest.id, 60)
            .unwrap()
            .is_empty()
    );
    // A deleted cursor post still anchors the catch-up.
    let middle = expected[300].clone();
    mattermost.delete_as(&owner.id, &middle).ok();
    let after_deleted = client.posts_after(&channel, &middle, 60).unwrap();
    assert_eq!(after_deleted.len(), 149);
    assert_eq!(after_deleted[0].id, expected[301]);
}

#[test]
fn unreadable_websocket_frames_are_skipped_and_events_keep_coming() {
    let mattermost = FakeMattermost::start();
    let channel = dm(&mattermost);
    let owner = mattermost.owner();
    let socket = crate::mattermost_api::Socket::start(&mattermost);
    assert!(!socket.next_connected());
    for bad in [
        "not json",
        "{\"event\":\"posted\",\"data\":{\"post\":\"{broken\"}}",
        "{\"event\":\"posted\",\"data\":{}}",
        "[1,2,3]",
        "{\"event\":\"a_new_kind_of_event\",\"data\":{}}",
    ] {
        assert_eq!(mattermost.inject_ws_frame(bad), 1);
    }
    mattermost
        .post_as(&owner.id, &channel, "", "after the junk")
        .unwrap();
    socket.wait_for_post("after the junk");

    // Larger than the reader accepts: refused before its payload is read, then a fresh connection.
    let huge = format!(
        "{{\"event\":\"posted\",\"data\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(5 * 1024 * 1024)
    );
    assert_eq!(mattermost.inject_ws_frame(&huge), 1);
    assert!(
        !socket.next_connected(),
        "after an unreadable frame the connection is fresh, so the caller catches up"
    );
    mattermost
        .post_as(&owner.id, &channel, "", "after the huge frame")
        .unwrap();
    socket.wait_for_post("after the huge frame");
}

#[test]
fn resumed_and_fresh_connections_are_reported_as_such() {
    let mattermost = FakeMattermost::start();
    let channel = dm(&mattermost);
    let owner = mattermost.owner();
    let socket = crate::mattermost_api::Socket::start(&mattermost);
    assert!(!socket.next_connected(), "the first connection is fresh");

    mattermost.drop_websockets();
    assert!(socket.next_connected(), "the server kept the session");
    mattermost
        .post_as(&owner.id, &channel, "", "on the resumed one")
        .unwrap();
    socket.wait_for_post("on the resumed one");

    // The server forgets the session while the bridge is away: its resume is refused.
    mattermost.set_down(true);
    mattermost
        .wait_until(SOON, |view| (view.ws_connection_count() == 0).then_some(()))
        .expect("websocket closed");
    mattermost.expire_websocket_sessions();
    mattermost.set_down(false);
    assert!(
        !socket.next_connected(),
        "a refused resume is a fresh connection"
    );
    mattermost
        .post_as(&owner.id, &channel, "", "on the fresh one")
        .unwrap();
    socket.wait_for_post("on the fresh one");
}
