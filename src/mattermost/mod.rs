//! Everything that knows Mattermost's JSON, HTTP and websocket: the REST client, the websocket reader
//! thread, and the decoding of wire events into the domain types below.

pub mod rest;
pub mod search;
pub mod ws;

use serde::Deserialize;
use serde_json::Value;

/// The ids of one Mattermost connection: who the bot is, who it answers to, and where they talk.
#[derive(Debug, Clone)]
pub struct Identity {
    pub bot_user_id: String,
    pub bot_username: String,
    pub owner_user_id: String,
    pub owner_username: String,
    pub dm_channel_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Post {
    pub id: String,
    #[serde(default)]
    pub create_at: i64,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub channel_id: String,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub message: String,
    /// System posts ("alice joined the channel") have a type; people's posts do not.
    #[serde(default, rename = "type")]
    pub post_type: String,
    #[serde(default)]
    pub file_ids: Option<Vec<String>>,
    #[serde(default)]
    pub props: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct User {
    pub id: String,
    pub username: String,
    #[serde(default)]
    pub is_bot: bool,
    #[serde(default)]
    pub delete_at: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reaction {
    pub user_id: String,
    pub post_id: String,
    pub emoji_name: String,
}

/// A file's metadata (`GET /api/v4/files/{id}/info`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FileInfo {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mime_type: String,
    #[serde(default)]
    pub extension: String,
}

/// Something the bridge sends over the websocket rather than REST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsAction {
    /// `user_typing` in a channel; `parent_id` makes it show in that thread.
    Typing {
        channel_id: String,
        parent_id: String,
    },
}

/// One websocket event, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    Hello {
        connection_id: String,
        server_version: String,
    },
    Posted(Post),
    PostEdited(Post),
    PostDeleted(Post),
    ReactionAdded(Reaction),
    ReactionRemoved(Reaction),
    /// Any other event type: typing, status changes, channel updates.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed mattermost event: {}", self.0)
    }
}

/// A websocket frame: an event with its sequence number, or a reply to one of our actions (`None`).
pub fn decode_ws_frame(text: &str) -> Result<Option<(Option<u64>, WsEvent)>, DecodeError> {
    let frame: Value =
        serde_json::from_str(text).map_err(|e| DecodeError(format!("not JSON ({e})")))?;
    if frame.get("seq_reply").is_some() {
        return Ok(None);
    }
    let kind = frame
        .get("event")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError("frame without \"event\"".into()))?;
    let seq = frame.get("seq").and_then(Value::as_u64);
    let data = frame.get("data").unwrap_or(&Value::Null);
    let event = match kind {
        "hello" => WsEvent::Hello {
            connection_id: string_field(data, "connection_id"),
            server_version: string_field(data, "server_version"),
        },
        "posted" => WsEvent::Posted(embedded(data, "post")?),
        "post_edited" => WsEvent::PostEdited(embedded(data, "post")?),
        "post_deleted" => WsEvent::PostDeleted(embedded(data, "post")?),
        "reaction_added" => WsEvent::ReactionAdded(embedded(data, "reaction")?),
        "reaction_removed" => WsEvent::ReactionRemoved(embedded(data, "reaction")?),
        other => WsEvent::Other(other.to_string()),
    };
    Ok(Some((seq, event)))
}

/// Mattermost sends posts and reactions inside events as JSON-encoded strings.
fn embedded<T: for<'de> Deserialize<'de>>(data: &Value, key: &str) -> Result<T, DecodeError> {
    match data.get(key) {
        Some(Value::String(json)) => serde_json::from_str(json)
            .map_err(|e| DecodeError(format!("data.{key} is not a valid {key} ({e})"))),
        // Tolerate an object too, in case a server stops double-encoding.
        Some(object @ Value::Object(_)) => T::deserialize(object)
            .map_err(|e| DecodeError(format!("data.{key} is not a valid {key} ({e})"))),
        _ => Err(DecodeError(format!("no data.{key}"))),
    }
}

fn string_field(data: &Value, key: &str) -> String {
    data.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as recorded from a real Mattermost 5.36.1 server (shared/mattermost/recorded-core.json).
    const POSTED_REPLY: &str = r#"{"event":"posted","data":{"channel_display_name":"@alice","channel_name":"7fa6dsx4if8o3bb7eb6ntqzgmc__jch78zf1w3drdbkcm4agiedash","channel_type":"D","mentions":"[\"7fa6dsx4if8o3bb7eb6ntqzgmc\"]","post":"{\"id\":\"35mzrpedx3fgzqc4pbshjncp6h\",\"create_at\":1795323990881,\"update_at\":1795323990881,\"edit_at\":0,\"delete_at\":0,\"is_pinned\":false,\"user_id\":\"jch78zf1w3drdbkcm4agiedash\",\"channel_id\":\"fo3x6htxg7nr9yyub6cowtocjo\",\"root_id\":\"fqtmqdr3338u8f46y1om6oww7w\",\"parent_id\":\"fqtmqdr3338u8f46y1om6oww7w\",\"original_id\":\"\",\"message\":\"a reply in thread\",\"type\":\"\",\"props\":{},\"hashtags\":\"\",\"pending_post_id\":\"\",\"reply_count\":1,\"last_reply_at\":0,\"participants\":null,\"is_following\":false,\"metadata\":{}}","sender_name":"@alice","set_online":true,"team_id":""},"broadcast":{"omit_users":null,"user_id":"","channel_id":"fo3x6htxg7nr9yyub6cowtocjo","team_id":""},"seq":3}"#;

    #[test]
    fn posted_carries_the_post_as_a_json_string() {
        let (seq, event) = decode_ws_frame(POSTED_REPLY).unwrap().unwrap();
        assert_eq!(seq, Some(3));
        let WsEvent::Posted(post) = event else {
            panic!("not a post: {event:?}")
        };
        assert_eq!(post.id, "35mzrpedx3fgzqc4pbshjncp6h");
        assert_eq!(post.root_id, "fqtmqdr3338u8f46y1om6oww7w");
        assert_eq!(post.user_id, "jch78zf1w3drdbkcm4agiedash");
        assert_eq!(post.message, "a reply in thread");
    }

    #[test]
    fn hello_reaction_and_replies_decode() {
        let hello = r#"{"event":"hello","data":{"connection_id":"gzj6gd47hin65brkzan6m5bnze","server_version":"5.36.1"},"broadcast":{"omit_users":null,"user_id":"x","channel_id":"","team_id":""},"seq":0}"#;
        assert_eq!(
            decode_ws_frame(hello).unwrap(),
            Some((
                Some(0),
                WsEvent::Hello {
                    connection_id: "gzj6gd47hin65brkzan6m5bnze".into(),
                    server_version: "5.36.1".into()
                }
            ))
        );
        let reaction = r#"{"event":"reaction_added","data":{"reaction":"{\"user_id\":\"u\",\"post_id\":\"p\",\"emoji_name\":\"+1\",\"create_at\":1}"},"broadcast":{},"seq":5}"#;
        let Some((_, WsEvent::ReactionAdded(r))) = decode_ws_frame(reaction).unwrap() else {
            panic!("reaction not decoded")
        };
        assert_eq!(r.emoji_name, "+1");
        assert_eq!(
            decode_ws_frame(r#"{"status":"OK","seq_reply":1}"#).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"event":"posted","data":{"post":"{broken"}}"#,
            r#"{"event":"posted","data":{}}"#,
            r#"{"event":5}"#,
            r#"{"event":"posted","data":{"post":"{\"message\":\"no id\"}"}}"#,
        ] {
            assert!(decode_ws_frame(bad).is_err(), "{bad:?} should be an error");
        }
        assert_eq!(
            decode_ws_frame(r#"{"event":"typing","data":{},"seq":9}"#).unwrap(),
            Some((Some(9), WsEvent::Other("typing".into())))
        );
    }
}
