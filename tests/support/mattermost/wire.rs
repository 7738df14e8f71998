//! JSON shapes exactly as Mattermost 5.36 writes them, field order included, built from the fake's
//! records. Go marshals maps with sorted keys; serde_json's default `Map` does the same.

use serde::Serialize;
use serde_json::{Map, Value};

use super::state::{Channel, FileRecord, PostRecord, ReactionRecord, State, User};

/// Mattermost's `model.AppError`, the body of every JSON error.
#[derive(Serialize)]
pub(super) struct WireError<'a> {
    pub(super) id: &'a str,
    pub(super) message: &'a str,
    pub(super) detailed_error: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(super) request_id: &'a str,
    pub(super) status_code: u16,
}

#[derive(Serialize)]
pub(super) struct WirePost {
    id: String,
    create_at: i64,
    update_at: i64,
    edit_at: i64,
    delete_at: i64,
    is_pinned: bool,
    user_id: String,
    channel_id: String,
    root_id: String,
    parent_id: String,
    original_id: String,
    message: String,
    #[serde(rename = "type")]
    kind: String,
    props: Value,
    hashtags: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    file_ids: Vec<String>,
    pending_post_id: String,
    #[serde(skip_serializing_if = "is_false")]
    has_reactions: bool,
    reply_count: i64,
    last_reply_at: i64,
    participants: Option<()>,
    is_following: bool,
    metadata: WireMetadata,
}

#[derive(Serialize)]
struct WireMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<WireFileInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reactions: Option<Vec<WireReaction>>,
}

#[derive(Serialize)]
pub(super) struct WireFileInfo {
    id: String,
    user_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    post_id: String,
    channel_id: String,
    create_at: i64,
    update_at: i64,
    delete_at: i64,
    name: String,
    extension: String,
    size: usize,
    mime_type: String,
    mini_preview: Option<()>,
    remote_id: String,
}

#[derive(Serialize)]
pub(super) struct WireReaction {
    user_id: String,
    post_id: String,
    emoji_name: String,
    create_at: i64,
    update_at: i64,
    delete_at: i64,
    remote_id: String,
}

#[derive(Serialize)]
pub(super) struct WireUser {
    id: String,
    create_at: i64,
    update_at: i64,
    delete_at: i64,
    username: String,
    auth_data: String,
    auth_service: String,
    email: String,
    nickname: String,
    first_name: String,
    last_name: String,
    position: String,
    roles: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify_props: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_password_update: Option<i64>,
    locale: String,
    timezone: Value,
    #[serde(skip_serializing_if = "is_false")]
    is_bot: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    bot_description: String,
    disable_welcome_email: bool,
}

#[derive(Serialize)]
pub(super) struct WireChannel {
    id: String,
    create_at: i64,
    update_at: i64,
    delete_at: i64,
    team_id: String,
    #[serde(rename = "type")]
    kind: String,
    display_name: String,
    name: String,
    header: String,
    purpose: String,
    last_post_at: i64,
    total_msg_count: i64,
    extra_update_at: i64,
    creator_id: String,
    scheme_id: Option<()>,
    props: Option<()>,
    group_constrained: Option<()>,
    shared: bool,
    total_msg_count_root: i64,
    policy_id: Option<()>,
}

/// Mattermost's `model.PostList`.
#[derive(Serialize)]
pub(super) struct WirePostList {
    pub(super) order: Vec<String>,
    pub(super) posts: std::collections::BTreeMap<String, WirePost>,
    pub(super) next_post_id: String,
    pub(super) prev_post_id: String,
}

/// One websocket event: `{"event","data","broadcast","seq"}`.
#[derive(Serialize)]
pub(super) struct WireEvent<'a> {
    pub(super) event: &'a str,
    pub(super) data: &'a Map<String, Value>,
    pub(super) broadcast: WireBroadcast<'a>,
    pub(super) seq: i64,
}

#[derive(Serialize)]
pub(super) struct WireBroadcast<'a> {
    pub(super) omit_users: Option<Map<String, Value>>,
    pub(super) user_id: &'a str,
    pub(super) channel_id: &'a str,
    pub(super) team_id: &'a str,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl State {
    /// A post as `PreparePostForClient` returns it: reply count, files and reactions filled in.
    pub(super) fn wire_post(&self, record: &PostRecord, pending_post_id: &str) -> WirePost {
        let post = &record.post;
        let files: Vec<WireFileInfo> = post
            .file_ids
            .iter()
            .filter_map(|id| self.files.get(id))
            .filter(|file| file.delete_at == 0 || post.delete_at != 0)
            .map(wire_file_info)
            .collect();
        let reactions: Vec<WireReaction> = self
            .reactions
            .iter()
            .filter(|reaction| reaction.post_id == post.id)
            .map(wire_reaction)
            .collect();
        WirePost {
            id: post.id.clone(),
            create_at: post.create_at,
            update_at: post.update_at,
            edit_at: post.edit_at,
            delete_at: post.delete_at,
            is_pinned: record.is_pinned,
            user_id: post.user_id.clone(),
            channel_id: post.channel_id.clone(),
            root_id: post.root_id.clone(),
            parent_id: post.root_id.clone(),
            original_id: String::new(),
            message: post.message.clone(),
            kind: record.kind.clone(),
            props: post.props.clone(),
            hashtags: record.hashtags.clone(),
            file_ids: post.file_ids.clone(),
            pending_post_id: pending_post_id.to_owned(),
            has_reactions: record.has_reactions,
            reply_count: self.reply_count(post),
            last_reply_at: 0,
            participants: None,
            is_following: false,
            metadata: WireMetadata {
                files: (!files.is_empty()).then_some(files),
                reactions: (!reactions.is_empty()).then_some(reactions),
            },
        }
    }

    /// A user as the API shows it: the caller sees their own notify props, others a sanitized
    /// profile (Mattermost's `SanitizeProfile`).
    pub(super) fn wire_user(&self, user: &User, is_self: bool) -> WireUser {
        let notify_props = serde_json::json!({
            "channel": "true",
            "comments": "never",
            "desktop": "mention",
            "desktop_sound": "true",
            "email": "true",
            "first_name": "false",
            "mention_keys": "",
            "push": "mention",
            "push_status": "away"
        });
        WireUser {
            id: user.id.clone(),
            create_at: user.create_at,
            update_at: user.create_at,
            delete_at: 0,
            username: user.username.clone(),
            auth_data: String::new(),
            auth_service: String::new(),
            email: format!("{}@localhost", user.username),
            nickname: String::new(),
            first_name: user.first_name.clone(),
            last_name: String::new(),
            position: String::new(),
            roles: if user.system_admin {
                "system_admin system_user"
            } else {
                "system_user"
            }
            .to_owned(),
            notify_props: is_self.then_some(notify_props),
            last_password_update: is_self.then_some(user.create_at),
            locale: "en".to_owned(),
            timezone: serde_json::json!({
                "automaticTimezone": "",
                "manualTimezone": "",
                "useAutomaticTimezone": "true"
            }),
            is_bot: user.is_bot,
            bot_description: user.bot_description.clone(),
            disable_welcome_email: false,
        }
    }
}

pub(super) fn wire_channel(channel: &Channel) -> WireChannel {
    WireChannel {
        id: channel.id.clone(),
        create_at: channel.create_at,
        update_at: channel.create_at,
        delete_at: 0,
        team_id: channel.team_id.clone(),
        kind: channel.kind.to_string(),
        display_name: channel.display_name.clone(),
        name: channel.name.clone(),
        header: String::new(),
        purpose: String::new(),
        last_post_at: channel.last_post_at,
        total_msg_count: channel.total_msg_count,
        extra_update_at: 0,
        creator_id: channel.creator_id.clone(),
        scheme_id: None,
        props: None,
        group_constrained: None,
        shared: false,
        total_msg_count_root: channel.total_msg_count_root,
        policy_id: None,
    }
}

pub(super) fn wire_file_info(file: &FileRecord) -> WireFileInfo {
    WireFileInfo {
        id: file.id.clone(),
        user_id: file.user_id.clone(),
        post_id: file.post_id.clone(),
        // Mattermost 5.36 never fills channel_id on file infos (it is not stored).
        channel_id: String::new(),
        create_at: file.create_at,
        update_at: file.update_at,
        delete_at: file.delete_at,
        name: file.name.clone(),
        extension: file.extension.clone(),
        size: file.bytes.len(),
        mime_type: file.mime_type.clone(),
        mini_preview: None,
        remote_id: String::new(),
    }
}

pub(super) fn wire_reaction(reaction: &ReactionRecord) -> WireReaction {
    WireReaction {
        user_id: reaction.user_id.clone(),
        post_id: reaction.post_id.clone(),
        emoji_name: reaction.emoji_name.clone(),
        create_at: reaction.create_at,
        update_at: reaction.update_at,
        delete_at: 0,
        remote_id: String::new(),
    }
}

/// Serializes a wire value; these types cannot fail to serialize.
pub(super) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
