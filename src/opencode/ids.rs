//! The message ids the bridge gives its prompts. OpenCode accepts a `messageID` with a prompt and
//! keeps it as the user message's id, so each prompt can carry the Mattermost post it came from:
//! a restarted bridge then knows for certain whether a prompt reached its session, and the worker
//! knows which stream events answer its prompt and which are late echoes of an earlier turn.
//!
//! The shape is OpenCode's own (`msg_`, 12 hex digits of `ms × 4096 + counter` in 48 bits, then 14
//! more characters), because OpenCode orders a session's messages by id.

const PREFIX: &str = "msg_";
const TIME_DIGITS: usize = 12;
const TAIL_CHARS: usize = 14;
const TIME_MASK: u64 = 0xffff_ffff_ffff;

/// The id for the prompt from post `post_id`, sent at `now_ms`. It sorts after `newest`, the newest
/// message id seen in the session, even when this host's clock is behind OpenCode's.
pub fn prompt_message_id(post_id: &str, now_ms: u64, newest: Option<&str>) -> String {
    let by_clock = now_ms.wrapping_mul(4096) & TIME_MASK;
    let after_newest = newest
        .and_then(time_part)
        .map_or(0, |t| (t + 1).min(TIME_MASK));
    format!(
        "{PREFIX}{:012x}{}",
        by_clock.max(after_newest),
        tail(post_id)
    )
}

/// Whether `message_id` is a prompt this bridge sent for post `post_id` at `since_ms` or later.
pub fn is_prompt_of(message_id: &str, post_id: &str, since_ms: u64) -> bool {
    let Some(time) = time_part(message_id) else {
        return false;
    };
    let since = since_ms.wrapping_mul(4096) & TIME_MASK;
    // Ids wrap every 2^36 ms (about two years): compare the distance, not the raw numbers.
    let not_before = time.wrapping_sub(since) & TIME_MASK < (1 << 47);
    not_before && message_id[PREFIX.len() + TIME_DIGITS..] == tail(post_id)
}

/// The 48-bit time-and-counter number of an OpenCode id, if it has OpenCode's shape.
fn time_part(message_id: &str) -> Option<u64> {
    let digits = message_id.strip_prefix(PREFIX)?.get(..TIME_DIGITS)?;
    u64::from_str_radix(digits, 16).ok()
}

/// The post id's first characters (Mattermost ids are 26 lowercase letters and digits).
fn tail(post_id: &str) -> String {
    let mut tail: String = post_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(TAIL_CHARS)
        .collect();
    while tail.len() < TAIL_CHARS {
        tail.push('0');
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &str = "xzr3twrbtyi6b453dy5ccqdgxr";

    #[test]
    fn an_id_has_opencodes_shape_and_the_posts_tail() {
        // 1795343294477 ms is 0x202cca00d000 in OpenCode's 48-bit time part.
        let id = prompt_message_id(POST, 1_795_343_294_477, None);
        assert_eq!(id, "msg_202cca00d000xzr3twrbtyi6b4");
        assert_eq!(id.len(), 30);
    }

    #[test]
    fn an_id_sorts_after_the_newest_message_even_with_a_slow_clock() {
        let newest = "msg_202cca00d005AbCdEfGhIjKlMn";
        let id = prompt_message_id(POST, 1_795_343_294_000, Some(newest));
        assert_eq!(id, "msg_202cca00d006xzr3twrbtyi6b4");
        assert!(id.as_str() > newest);
        // A clock ahead of the newest id wins.
        let later = prompt_message_id(POST, 1_795_343_295_000, Some(newest));
        assert!(later > id);
        // An id not of OpenCode's shape is no floor.
        assert_eq!(
            prompt_message_id(POST, 1_795_343_294_477, Some("msg_x")),
            "msg_202cca00d000xzr3twrbtyi6b4"
        );
    }

    #[test]
    fn a_prompt_is_recognised_by_its_post_and_not_before_it_was_owed() {
        let id = prompt_message_id(POST, 1_795_343_294_477, None);
        assert!(is_prompt_of(&id, POST, 1_795_343_294_477));
        assert!(is_prompt_of(&id, POST, 1_795_343_290_000));
        // Sent before a later resend of the same post was owed: not that resend.
        assert!(!is_prompt_of(&id, POST, 1_795_343_300_000));
        assert!(!is_prompt_of(&id, "another0post0id0000000000", 0));
        assert!(!is_prompt_of("msg_202cca00d000AbCdEfGhIjKlMn", POST, 0));
        assert!(!is_prompt_of("prt_zz", POST, 0));
    }

    #[test]
    fn short_or_odd_post_ids_still_give_a_full_id() {
        let id = prompt_message_id("ab-c", 1, None);
        assert_eq!(id, "msg_000000001000abc00000000000");
        assert!(is_prompt_of(&id, "ab-c", 0));
    }
}
