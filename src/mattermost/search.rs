//! Finding posts the bridge made but may not have recorded: a crash between posting a thread's root
//! and saving it must not give the session a second thread.

use serde::Deserialize;
use std::collections::HashMap;

use super::Post;
use super::rest::{MattermostClient, MmError};
use crate::http::percent_encode;

/// `GET /channels/{id}/posts` answers a post list: the page's ids newest first and the posts keyed by
/// id (which may also hold thread roots outside the page).
#[derive(Deserialize)]
struct PostList {
    #[serde(default)]
    order: Vec<String>,
    #[serde(default)]
    posts: HashMap<String, Post>,
}

/// Posts per page when looking back, Mattermost's maximum.
const PAGE: usize = 200;
/// Looking back stops this far before `since_ms`: the bridge's clock and Mattermost's may disagree.
const CLOCK_SKEW_MS: i64 = 60 * 60 * 1000;
/// And after this many pages, so a busy channel costs a bounded number of calls.
const MAX_PAGES: usize = 25;

/// The root post `user_id` made in `channel_id` for the OpenCode session `session_id` (its props
/// name the session), looking back from the newest post to about `since_ms`, when the bridge meant
/// to post it.
///
/// Pages back by post id (`before=<id>&per_page=200`) rather than asking for `since=`, which can miss
/// posts (mattermost#13846) and trusts that both clocks agree; the time only says where to stop,
/// an hour early. `before` compares `create_at`, so the next page is anchored on the page's oldest
/// post that is newer than the page's oldest time: posts sharing a millisecond across pages are
/// seen again rather than skipped. One page at a time is held.
pub fn find_thread_root(
    client: &MattermostClient,
    channel_id: &str,
    user_id: &str,
    session_id: &str,
    since_ms: u64,
) -> Result<Option<Post>, MmError> {
    let stop_before = (since_ms as i64).saturating_sub(CLOCK_SKEW_MS);
    let channel = percent_encode(channel_id);
    let mut found: Option<Post> = None;
    let mut anchor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let path = match &anchor {
            None => format!("/channels/{channel}/posts?page=0&per_page={PAGE}"),
            Some(id) => format!(
                "/channels/{channel}/posts?before={}&per_page={PAGE}",
                percent_encode(id)
            ),
        };
        let mut list = fetch(client, &path)?;
        // A short page is the channel's start. (`prev_post_id` would say so too, but a full last
        // page costs only one more, empty, answer, and it is not needed then.)
        let at_start = list.order.len() < PAGE;
        // `posts` may also hold older thread roots of the page's replies: only `order` is the page.
        let page: Vec<Post> = list
            .order
            .iter()
            .filter_map(|id| list.posts.remove(id))
            .collect();
        let Some(oldest) = page.iter().map(|p| p.create_at).min() else {
            break;
        };
        let next_anchor = page
            .iter()
            .filter(|p| p.create_at > oldest)
            .min_by_key(|p| p.create_at)
            .or_else(|| page.iter().find(|p| p.create_at == oldest))
            .map(|p| p.id.clone());
        if let Some(root) = pick_root(page.into_iter(), user_id, session_id)
            && found.as_ref().is_none_or(|f| root.create_at < f.create_at)
        {
            found = Some(root);
        }
        if at_start || oldest < stop_before || next_anchor == anchor {
            break;
        }
        anchor = next_anchor;
    }
    Ok(found)
}

/// The channel's posts changed since `since_ms`, oldest first. Only for a cursor that has no post
/// to page from yet (an empty DM): `since` can miss posts, so `posts_after` is used whenever it can be.
pub fn posts_since(
    client: &MattermostClient,
    channel_id: &str,
    since_ms: u64,
) -> Result<Vec<Post>, MmError> {
    let path = format!(
        "/channels/{}/posts?since={since_ms}",
        percent_encode(channel_id)
    );
    let mut posts: Vec<Post> = post_list(client, &path)?
        .filter(|p| p.create_at > since_ms as i64)
        .collect();
    posts.sort_by_key(|p| p.create_at);
    Ok(posts)
}

/// A thread's posts, root included, oldest first (`GET /posts/{id}/thread`).
pub fn thread_posts(client: &MattermostClient, root_id: &str) -> Result<Vec<Post>, MmError> {
    let path = format!("/posts/{}/thread", percent_encode(root_id));
    let mut posts: Vec<Post> = post_list(client, &path)?.collect();
    posts.sort_by_key(|p| p.create_at);
    Ok(posts)
}

/// The posts of a post-list answer (`{"order": […], "posts": {id: post}}`), in no order.
fn post_list(client: &MattermostClient, path: &str) -> Result<impl Iterator<Item = Post>, MmError> {
    Ok(fetch(client, path)?.posts.into_values())
}

fn fetch(client: &MattermostClient, path: &str) -> Result<PostList, MmError> {
    let text = client.call("GET", path, None)?;
    serde_json::from_str(&text).map_err(|e| MmError::Decode(format!("GET {path}: {e}")))
}

fn pick_root(posts: impl Iterator<Item = Post>, user_id: &str, session_id: &str) -> Option<Post> {
    posts
        .filter(|p| p.user_id == user_id && p.root_id.is_empty())
        .filter(|p| p.props.get("opencode_session_id").and_then(|v| v.as_str()) == Some(session_id))
        .min_by_key(|p| p.create_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn post(id: &str, user: &str, root: &str, session: &str, at: i64) -> Post {
        Post {
            id: id.into(),
            user_id: user.into(),
            root_id: root.into(),
            create_at: at,
            props: json!({"opencode_session_id": session}),
            ..Post::default()
        }
    }

    #[test]
    fn the_oldest_root_of_the_bot_for_the_session_is_found() {
        let posts = vec![
            post("reply", "bot", "r1", "ses_a", 1),
            post("other-user", "alice", "", "ses_a", 2),
            post("other-session", "bot", "", "ses_b", 3),
            post("r2", "bot", "", "ses_a", 9),
            post("r1", "bot", "", "ses_a", 5),
        ];
        let found = pick_root(posts.into_iter(), "bot", "ses_a").expect("root");
        assert_eq!(found.id, "r1");
        assert!(pick_root(std::iter::empty(), "bot", "ses_a").is_none());
    }
}
