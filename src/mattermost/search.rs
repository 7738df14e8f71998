//! Finding posts the bridge made but may not have recorded: a crash between posting a thread's root
//! and saving it must not give the session a second thread.

use serde::Deserialize;
use std::collections::HashMap;

use super::Post;
use super::rest::{MattermostClient, MmError};
use crate::http::percent_encode;

/// `GET /channels/{id}/posts?since=…` answers a post list: posts keyed by id, plus their order.
#[derive(Deserialize)]
struct PostList {
    #[serde(default)]
    posts: HashMap<String, Post>,
}

/// The root post `user_id` made in `channel_id` since `since_ms` for the OpenCode session
/// `session_id`, if there is one (its props name the session).
pub fn find_thread_root(
    client: &MattermostClient,
    channel_id: &str,
    user_id: &str,
    session_id: &str,
    since_ms: u64,
) -> Result<Option<Post>, MmError> {
    let path = format!(
        "/channels/{}/posts?since={since_ms}",
        percent_encode(channel_id)
    );
    Ok(pick_root(post_list(client, &path)?, user_id, session_id))
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
    let text = client.call("GET", path, None)?;
    let list: PostList =
        serde_json::from_str(&text).map_err(|e| MmError::Decode(format!("GET {path}: {e}")))?;
    Ok(list.posts.into_values())
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
