//! The posts that show a turn's reply, and the plan that makes them show a new body: a pure function
//! from what the posts show now to the edits, new posts and removals needed, so the worker only
//! carries the plan out (and handles what Mattermost answers).

use std::time::Instant;

use crate::render::{MAX_POST_CHARS, split_post};

/// The posts showing the running turn's reply, and when they were last edited.
#[derive(Default)]
pub(super) struct ReplyPosts {
    pub(super) posts: Vec<SentPost>,
    /// The id of the user message this reply answers (`PROMPT_PROP`), once known.
    pub(super) key: Option<String>,
    pub(super) text_shown: bool,
    pub(super) last_sent: Option<Instant>,
    pub(super) dirty: bool,
    /// Counts the reply as open in the shared budget until the turn ends (dropped with the value).
    pub(super) stream: Option<crate::mattermost::rest::StreamGuard>,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct SentPost {
    pub(super) id: String,
    pub(super) text: String,
}

/// One step of showing a reply body, by the index of the post it concerns.
#[derive(Debug, PartialEq)]
pub(super) enum PostStep {
    /// The post at `index` shows `text` instead.
    Edit { index: usize, text: String },
    /// A new post, after the others, shows `text`.
    Create { index: usize, text: String },
    /// The post at `index` is no longer needed (only for the final body).
    Delete { index: usize },
}

/// What makes `shown` show `body`: posts whose text already matches are left alone, changed ones
/// edited, missing ones created. Only the `last` (final) body removes posts it no longer needs: a
/// streaming body that shrank (a part was removed) may grow again.
pub(super) fn plan(shown: &[SentPost], body: &str, last: bool) -> Vec<PostStep> {
    let chunks = split_post(body, MAX_POST_CHARS);
    let needed = chunks.len();
    let mut steps: Vec<PostStep> = chunks
        .into_iter()
        .enumerate()
        .filter_map(|(index, text)| match shown.get(index) {
            Some(sent) if sent.text == text => None,
            Some(_) => Some(PostStep::Edit { index, text }),
            None => Some(PostStep::Create { index, text }),
        })
        .collect();
    if last {
        steps.extend((needed..shown.len()).map(|index| PostStep::Delete { index }));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(texts: &[&str]) -> Vec<SentPost> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| SentPost {
                id: format!("p{i}"),
                text: t.to_string(),
            })
            .collect()
    }

    fn edit(index: usize, text: &str) -> PostStep {
        PostStep::Edit {
            index,
            text: text.into(),
        }
    }

    fn create(index: usize, text: &str) -> PostStep {
        PostStep::Create {
            index,
            text: text.into(),
        }
    }

    #[test]
    fn a_first_body_creates_its_post_and_an_unchanged_one_does_nothing() {
        assert_eq!(plan(&[], "Hello", false), [create(0, "Hello")]);
        assert_eq!(plan(&shown(&["Hello"]), "Hello", true), []);
    }

    #[test]
    fn a_changed_body_edits_only_the_post_that_changed() {
        assert_eq!(
            plan(&shown(&["Hello"]), "Hello there", false),
            [edit(0, "Hello there")]
        );
    }

    #[test]
    fn a_body_past_one_post_continues_in_new_posts_and_keeps_the_full_ones() {
        let first = "a".repeat(MAX_POST_CHARS);
        let body = format!("{first}\n\nmore");
        let steps = plan(&shown(&[&first]), &body, false);
        match steps.as_slice() {
            [PostStep::Create { index: 1, text }] => assert!(text.contains("more"), "{text}"),
            [
                PostStep::Edit { index: 0, .. },
                PostStep::Create { index: 1, .. },
            ] => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_final_body_removes_posts_it_no_longer_needs() {
        let posts = shown(&["one", "two", "three"]);
        assert_eq!(plan(&posts, "one", false), []);
        assert_eq!(
            plan(&posts, "uno", true),
            [
                edit(0, "uno"),
                PostStep::Delete { index: 1 },
                PostStep::Delete { index: 2 }
            ]
        );
    }
}
