//! The fake server's world: users, channels, posts, reactions, files and websocket sessions, and
//! the rules a real Mattermost 5.36 applies to them. REST handlers and the test-facing helpers both
//! go through these methods, so validation and broadcasts are the same either way.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::{Map, Value, json};

use super::ratelimit::Limiter;
use super::util::{is_valid_id, new_id, now_ms};
use super::wire::{WireBroadcast, WireEvent, WirePostList, to_json, wire_file_info, wire_reaction};
use super::{Post, PostVersion, Request};

/// `MaxPostSize` of a PostgreSQL-backed 5.36 server, counted in runes.
pub(super) const MAX_POST_SIZE: usize = 16383;
pub(super) const VERSION: &str = "5.36.1";
pub(super) const BUILD_NUMBER: &str = "5.36.1-local";
/// The `X-Version-Id` header and the `hello` event's `server_version`, as captured.
pub(super) const SERVER_VERSION: &str =
    "5.36.1.5.36.1-local.9f4c5ce823f43ddf5bc6ebfcf28934e3.false";
pub(super) const DEFAULT_MAX_FILE_SIZE: u64 = 100 * 1024 * 1024;
/// Mattermost keeps the last 128 sent events of a reliable connection (its "dead queue").
const REPLAY_BUFFER: usize = 128;
/// How long a disconnected reliable session stays resumable.
const INACTIVE_SESSION_TTL: Duration = Duration::from_secs(300);
/// Mattermost deduplicates `pending_post_id` for 30 s.
const PENDING_POST_TTL: Duration = Duration::from_secs(30);
const POST_PROPS_MAX_RUNES: usize = 800_000;
const POST_FILE_IDS_MAX_RUNES: usize = 300;
const EMOJI_NAME_MAX_LENGTH: usize = 64;

pub(super) struct User {
    pub(super) id: String,
    pub(super) username: String,
    pub(super) token: String,
    pub(super) is_bot: bool,
    /// System admins hold every permission, so they can read and post in any channel, DMs included.
    pub(super) system_admin: bool,
    pub(super) first_name: String,
    pub(super) bot_description: String,
    pub(super) create_at: i64,
}

pub(super) struct Channel {
    pub(super) id: String,
    pub(super) kind: char,
    pub(super) name: String,
    pub(super) display_name: String,
    pub(super) team_id: String,
    pub(super) members: Vec<String>,
    pub(super) creator_id: String,
    pub(super) create_at: i64,
    pub(super) last_post_at: i64,
    pub(super) total_msg_count: i64,
    pub(super) total_msg_count_root: i64,
}

pub(super) struct PostRecord {
    pub(super) post: Post,
    pub(super) is_pinned: bool,
    pub(super) kind: String,
    pub(super) hashtags: String,
    pub(super) has_reactions: bool,
}

#[derive(Clone)]
pub(super) struct ReactionRecord {
    pub(super) user_id: String,
    pub(super) post_id: String,
    pub(super) emoji_name: String,
    pub(super) create_at: i64,
    pub(super) update_at: i64,
}

pub(super) struct FileRecord {
    pub(super) id: String,
    pub(super) user_id: String,
    pub(super) post_id: String,
    pub(super) create_at: i64,
    pub(super) update_at: i64,
    pub(super) delete_at: i64,
    pub(super) name: String,
    pub(super) extension: String,
    pub(super) mime_type: String,
    pub(super) bytes: Vec<u8>,
}

/// What a websocket connection thread is told to do.
pub(super) enum WsOut {
    /// Send this text frame.
    Frame(String),
    /// Write these bytes as they are: frames tungstenite's reading side produced (pongs, the
    /// close reply), so that only the writer thread ever writes to the socket.
    Raw(Vec<u8>),
    /// Close the TCP connection at once, without a close frame.
    Drop,
}

/// A websocket session: one per connection, kept after a disconnect while reliable websockets
/// are on, so that a reconnect with its `connection_id` can resume.
struct WsSession {
    connection_id: String,
    user_id: String,
    next_seq: i64,
    buffer: VecDeque<(i64, String)>,
    sender: Option<Sender<WsOut>>,
    inactive_since: Option<Instant>,
}

/// A Mattermost `AppError` before the request id is added.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: u16,
    pub(super) id: String,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: u16, id: &str, message: &str) -> ApiError {
        ApiError {
            status,
            id: id.to_owned(),
            message: message.to_owned(),
        }
    }

    pub(super) fn permissions() -> ApiError {
        ApiError::new(
            403,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        )
    }

    /// `c.SetInvalidParam`: used for bodies and for query parameters alike.
    pub(super) fn invalid_body(name: &str) -> ApiError {
        ApiError::new(
            400,
            "api.context.invalid_body_param.app_error",
            &format!("Invalid or missing {name} in request body."),
        )
    }

    pub(super) fn invalid_url(name: &str) -> ApiError {
        ApiError::new(
            400,
            "api.context.invalid_url_param.app_error",
            &format!("Invalid or missing {name} parameter in request URL."),
        )
    }

    pub(super) fn post_not_found() -> ApiError {
        ApiError::new(404, "app.post.get.app_error", "Unable to get the post.")
    }

    fn invalid_message() -> ApiError {
        ApiError::new(400, "model.post.is_valid.msg.app_error", "Invalid message.")
    }
}

/// A post to create, as decoded from `POST /api/v4/posts`.
pub(super) struct NewPost {
    pub(super) channel_id: String,
    pub(super) message: String,
    pub(super) root_id: String,
    pub(super) props: Map<String, Value>,
    pub(super) file_ids: Vec<String>,
    pub(super) kind: String,
    pub(super) pending_post_id: String,
    pub(super) set_online: bool,
}

/// The result of creating a post: its id, and the pending id to echo back.
pub(super) struct CreatedPost {
    pub(super) id: String,
    pub(super) pending_post_id: String,
}

#[derive(Default)]
pub(super) struct PostChanges {
    pub(super) message: Option<String>,
    pub(super) props: Option<Map<String, Value>>,
    pub(super) is_pinned: Option<bool>,
}

/// Query of `GET /channels/{id}/posts`.
pub(super) struct PostsQuery {
    pub(super) page: usize,
    pub(super) per_page: usize,
    pub(super) since: i64,
    pub(super) after: String,
    pub(super) before: String,
}

/// Who receives a published event.
enum Target {
    User(String),
    Channel {
        channel_id: String,
        omit_user: Option<String>,
    },
}

pub(super) struct State {
    pub(super) users: Vec<User>,
    pub(super) channels: HashMap<String, Channel>,
    pub(super) team_id: String,
    pub(super) team_members: HashSet<String>,
    pub(super) posts: HashMap<String, PostRecord>,
    /// Post ids in creation order; `create_at` strictly increases along it.
    pub(super) post_order: Vec<String>,
    pub(super) reactions: Vec<ReactionRecord>,
    pub(super) files: HashMap<String, FileRecord>,
    sessions: HashMap<u64, WsSession>,
    next_session_key: u64,
    online: HashSet<String>,
    pub(super) requests: Vec<Request>,
    /// Every message a post took, as created and after each edit, with when it was accepted.
    pub(super) post_versions: Vec<PostVersion>,
    pub(super) typing: Vec<(String, String, String)>,
    pending_posts: HashMap<String, (String, Instant)>,
    /// How far `advance_clock` has moved the server's notion of time (its memories: pending post
    /// ids, inactive websocket sessions) ahead of the real one.
    clock_offset: Duration,
    /// Connections and requests turned away while `set_down` was on.
    pub(super) refused_while_down: u64,
    last_post_ms: i64,
    pub(super) limiter: Option<Limiter>,
    pub(super) fail_next: (u32, u16),
    /// The next `n` REST requests are handled, then their connection is closed without an answer.
    pub(super) lose_next: u32,
    /// The next `n` REST requests are handled, then answered only after this delay.
    pub(super) delay_next: (u32, Duration),
    /// Requests matching a rule are handled, then answered only after its delay (`delay_matching`).
    pub(super) delay_rules: Vec<super::DelayRule>,
    /// How many answers the rules have delayed so far.
    pub(super) delayed_by_rules: u32,
    /// How many posts were really created (not deduplicated) per non-empty `pending_post_id`.
    pub(super) created_per_pending_id: HashMap<String, u32>,
    pub(super) reliable_websockets: bool,
    pub(super) max_file_size: u64,
    pub(super) open_websockets: usize,
    /// Every `@username` mention of a user in a created post, in order. Mattermost parses mentions
    /// only when a post is created (an edit notifies no one), and an explicit mention is what
    /// makes a user follow a thread with collapsed reply threads, so it reaches their phone.
    pub(super) mention_log: Vec<super::Mention>,
}

impl State {
    pub(super) fn new() -> State {
        let now = now_ms();
        let user = |username: &str, is_bot: bool, first_name: &str, bot_description: &str| User {
            id: new_id(),
            username: username.to_owned(),
            token: new_id(),
            is_bot,
            system_admin: username == "sysadmin",
            first_name: first_name.to_owned(),
            bot_description: bot_description.to_owned(),
            create_at: now,
        };
        State {
            users: vec![
                user("testbot", true, "Test Bot", "bot for client tests"),
                user("alice", false, "", ""),
                user("mallory", false, "", ""),
                user("sysadmin", false, "", ""),
            ],
            channels: HashMap::new(),
            team_id: new_id(),
            team_members: HashSet::new(),
            posts: HashMap::new(),
            post_order: Vec::new(),
            reactions: Vec::new(),
            files: HashMap::new(),
            sessions: HashMap::new(),
            next_session_key: 0,
            online: HashSet::new(),
            requests: Vec::new(),
            post_versions: Vec::new(),
            typing: Vec::new(),
            pending_posts: HashMap::new(),
            clock_offset: Duration::ZERO,
            refused_while_down: 0,
            last_post_ms: 0,
            limiter: None,
            fail_next: (0, 500),
            lose_next: 0,
            delay_next: (0, Duration::ZERO),
            delay_rules: Vec::new(),
            delayed_by_rules: 0,
            created_per_pending_id: HashMap::new(),
            reliable_websockets: true,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            open_websockets: 0,
            mention_log: Vec::new(),
        }
    }

    // ----- users -----

    pub(super) fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub(super) fn user_by_token(&self, token: &str) -> Option<&User> {
        self.users.iter().find(|u| u.token == token)
    }

    pub(super) fn user_by_name(&self, username: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.username.eq_ignore_ascii_case(username))
    }

    fn username(&self, id: &str) -> String {
        self.user(id)
            .map(|u| u.username.clone())
            .unwrap_or_default()
    }

    // ----- channels -----

    /// `GetOrCreateDirectChannel`; `creator` is the user asking. Publishes `direct_added` when new.
    pub(super) fn direct_channel(&mut self, creator: &str, other: &str) -> String {
        let mut pair = [creator.to_owned(), other.to_owned()];
        pair.sort();
        let name = format!("{}__{}", pair[0], pair[1]);
        if let Some(channel) = self.channels.values().find(|c| c.name == name) {
            return channel.id.clone();
        }
        let mut members = vec![creator.to_owned()];
        if other != creator {
            members.push(other.to_owned());
        }
        let channel = Channel {
            id: new_id(),
            kind: 'D',
            name,
            display_name: String::new(),
            team_id: String::new(),
            members,
            creator_id: creator.to_owned(),
            create_at: now_ms(),
            last_post_at: 0,
            total_msg_count: 0,
            total_msg_count_root: 0,
        };
        let id = channel.id.clone();
        self.channels.insert(id.clone(), channel);
        let mut data = Map::new();
        data.insert("teammate_id".into(), Value::from(other));
        self.publish(
            "direct_added",
            data,
            Target::Channel {
                channel_id: id.clone(),
                omit_user: None,
            },
        );
        id
    }

    pub(super) fn open_channel(&mut self, display_name: &str, members: &[&str]) -> String {
        let name: String = display_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let channel = Channel {
            id: new_id(),
            kind: 'O',
            name,
            display_name: display_name.to_owned(),
            team_id: self.team_id.clone(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            creator_id: members.first().map(|m| (*m).to_owned()).unwrap_or_default(),
            create_at: now_ms(),
            last_post_at: 0,
            total_msg_count: 0,
            total_msg_count_root: 0,
        };
        self.team_members
            .extend(members.iter().map(|m| (*m).to_owned()));
        let id = channel.id.clone();
        self.channels.insert(id.clone(), channel);
        id
    }

    fn is_member(&self, user_id: &str, channel_id: &str) -> bool {
        self.channels
            .get(channel_id)
            .is_some_and(|c| c.members.iter().any(|m| m == user_id))
    }

    /// `read_channel`, or `read_public_channel` through team membership for open channels.
    pub(super) fn can_read_channel(&self, user_id: &str, channel_id: &str) -> bool {
        if self.user(user_id).is_some_and(|u| u.system_admin) {
            return self.channels.contains_key(channel_id);
        }
        match self.channels.get(channel_id) {
            Some(c) if c.kind == 'O' => {
                self.is_member(user_id, channel_id) || self.team_members.contains(user_id)
            }
            Some(_) => self.is_member(user_id, channel_id),
            None => false,
        }
    }

    /// `create_post`, or `create_post_public` through team membership for open channels.
    pub(super) fn can_post(&self, user_id: &str, channel_id: &str) -> bool {
        self.can_read_channel(user_id, channel_id)
    }

    // ----- posts -----

    /// `reply_count` as Mattermost computes it: replies in the post's thread that are not deleted.
    pub(super) fn reply_count(&self, post: &Post) -> i64 {
        let root = if post.root_id.is_empty() {
            &post.id
        } else {
            &post.root_id
        };
        self.posts
            .values()
            .filter(|r| r.post.root_id == *root && r.post.delete_at == 0)
            .count() as i64
    }

    fn live_post(&self, id: &str) -> Option<&PostRecord> {
        self.posts.get(id).filter(|r| r.post.delete_at == 0)
    }

    /// The server's clock for what it remembers a while: the real one plus `advance_clock`.
    fn now(&self) -> Instant {
        Instant::now() + self.clock_offset
    }

    pub(super) fn advance_clock(&mut self, by: Duration) {
        self.clock_offset += by;
    }

    /// A fresh `create_at`: wall-clock milliseconds, but strictly increasing, so that
    /// `after=<post_id>` (which compares `create_at`) never skips a post created in the same ms.
    fn next_post_time(&mut self) -> i64 {
        self.last_post_ms = now_ms().max(self.last_post_ms + 1);
        self.last_post_ms
    }

    /// `createPost` + `CreatePostAsUser` + `CreatePost`, in the order the real server checks.
    pub(super) fn create_post(
        &mut self,
        author: &str,
        new: NewPost,
    ) -> Result<CreatedPost, ApiError> {
        let now = self.now();
        self.pending_posts
            .retain(|_, (_, at)| now.duration_since(*at) < PENDING_POST_TTL);
        if let Some((id, _)) = self.pending_posts.get(&new.pending_post_id)
            && self.posts.get(id).is_some_and(|r| r.post.user_id == author)
        {
            return Ok(CreatedPost {
                id: id.clone(),
                pending_post_id: new.pending_post_id,
            });
        }
        if !self.can_post(author, &new.channel_id) {
            return Err(ApiError::permissions());
        }
        if new.kind.starts_with("system_") {
            return Err(ApiError::new(
                400,
                "api.context.invalid_param.app_error",
                "Invalid post.type parameter.",
            ));
        }
        if !new.root_id.is_empty() {
            let root_error = || {
                ApiError::new(
                    400,
                    "api.post.create_post.root_id.app_error",
                    "Invalid RootId parameter.",
                )
            };
            let root = self.live_post(&new.root_id).ok_or_else(root_error)?;
            if root.post.channel_id != new.channel_id {
                return Err(ApiError::new(
                    400,
                    "api.post.create_post.channel_root_id.app_error",
                    "Invalid ChannelId for RootId parameter.",
                ));
            }
            if !root.post.root_id.is_empty() {
                return Err(root_error());
            }
        }
        let mut props = new.props;
        if self.user(author).is_some_and(|u| u.is_bot) {
            props.insert("from_bot".into(), Value::from("true"));
        }
        let props = Value::Object(props);
        validate_post(&new.message, &new.kind, &props, &new.file_ids)?;

        let create_at = self.next_post_time();
        let id = new_id();
        let mut attached = Vec::new();
        for file_id in &new.file_ids {
            if attached.contains(file_id) {
                continue;
            }
            if let Some(file) = self.files.get_mut(file_id)
                && file.user_id == author
                && file.post_id.is_empty()
                && file.delete_at == 0
            {
                file.post_id = id.clone();
                attached.push(file_id.clone());
            }
        }
        let hashtags = parse_hashtags(&new.message);
        let record = PostRecord {
            post: Post {
                id: id.clone(),
                create_at,
                update_at: create_at,
                edit_at: 0,
                delete_at: 0,
                user_id: author.to_owned(),
                channel_id: new.channel_id.clone(),
                root_id: new.root_id.clone(),
                message: new.message,
                props,
                file_ids: attached,
                edit_count: 0,
            },
            is_pinned: false,
            kind: new.kind,
            hashtags,
            has_reactions: false,
        };
        self.post_versions.push(PostVersion::of(&record.post, now));
        self.posts.insert(id.clone(), record);
        self.post_order.push(id.clone());
        if let Some(channel) = self.channels.get_mut(&new.channel_id) {
            channel.last_post_at = create_at;
            channel.total_msg_count += 1;
            if new.root_id.is_empty() {
                channel.total_msg_count_root += 1;
            }
        }
        if !new.pending_post_id.is_empty() {
            self.pending_posts
                .insert(new.pending_post_id.clone(), (id.clone(), now));
            *self
                .created_per_pending_id
                .entry(new.pending_post_id.clone())
                .or_default() += 1;
        }
        self.publish_posted(&id, &new.pending_post_id, new.set_online);
        if new.set_online {
            self.set_status(author, true);
        }
        Ok(CreatedPost {
            id,
            pending_post_id: new.pending_post_id,
        })
    }

    fn publish_posted(&mut self, post_id: &str, pending_post_id: &str, set_online: bool) {
        let Some(record) = self.posts.get(post_id) else {
            return;
        };
        let post = &record.post;
        let Some(channel) = self.channels.get(&post.channel_id) else {
            return;
        };
        let sender = self.username(&post.user_id);
        let mut data = Map::new();
        let display_name = if channel.kind == 'D' {
            format!("@{sender}")
        } else {
            channel.display_name.clone()
        };
        data.insert("channel_display_name".into(), display_name.into());
        data.insert("channel_name".into(), channel.name.clone().into());
        data.insert("channel_type".into(), channel.kind.to_string().into());
        let mentions = self.mentions(channel, &post.user_id, &post.message);
        if !mentions.is_empty() {
            data.insert("mentions".into(), to_json(&mentions).into());
        }
        for user_id in self.named_mentions(channel, &post.user_id, &post.message) {
            self.mention_log.push(super::Mention {
                user_id,
                post_id: post.id.clone(),
                root_id: post.root_id.clone(),
                message: post.message.clone(),
            });
        }
        if !post.file_ids.is_empty() {
            data.insert("otherFile".into(), "true".into());
            let any_image = post.file_ids.iter().any(|id| {
                self.files
                    .get(id)
                    .is_some_and(|f| f.mime_type.starts_with("image/"))
            });
            if any_image {
                data.insert("image".into(), "true".into());
            }
        }
        data.insert(
            "post".into(),
            to_json(&self.wire_post(record, pending_post_id)).into(),
        );
        let sender_name = if record.kind.starts_with("system_") {
            "System".to_owned()
        } else {
            format!("@{sender}")
        };
        data.insert("sender_name".into(), sender_name.into());
        data.insert("set_online".into(), Value::Bool(set_online));
        data.insert("team_id".into(), channel.team_id.clone().into());
        let channel_id = channel.id.clone();
        self.publish(
            "posted",
            data,
            Target::Channel {
                channel_id,
                omit_user: None,
            },
        );
    }

    /// Who a post mentions: the other member of a DM, `@username`s and `@channel`/`@all`/`@here`
    /// among members elsewhere; never the sender.
    fn mentions(&self, channel: &Channel, sender: &str, message: &str) -> Vec<String> {
        if channel.kind == 'D' {
            return channel
                .members
                .iter()
                .filter(|m| *m != sender)
                .cloned()
                .collect();
        }
        self.named_mentions(channel, sender, message)
    }

    /// The members a message names with `@username` (or `@channel`/`@all`/`@here` outside DMs);
    /// never the sender. `@alice.` and `@alice,` name alice, as Mattermost trims the punctuation.
    fn named_mentions(&self, channel: &Channel, sender: &str, message: &str) -> Vec<String> {
        let mut mentioned: Vec<String> = Vec::new();
        let mut add = |id: &str| {
            if id != sender && !mentioned.iter().any(|m| m == id) {
                mentioned.push(id.to_owned());
            }
        };
        for word in message.split('@').skip(1) {
            let name: String = word
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .collect();
            let name = name.trim_end_matches(['.', '_', '-']);
            let lower = name.to_ascii_lowercase();
            if matches!(lower.as_str(), "channel" | "all" | "here") && channel.kind != 'D' {
                for member in &channel.members {
                    if lower != "here" || self.online.contains(member) {
                        add(member);
                    }
                }
            } else if let Some(user) = self.user_by_name(name)
                && channel.members.contains(&user.id)
            {
                add(&user.id);
            }
        }
        mentioned
    }

    /// `PATCH`/`PUT` of a post by `caller`: only the author may edit (no one here has
    /// `edit_others_posts`), a missing or deleted post is a permission error as in 5.36.
    pub(super) fn edit_post(
        &mut self,
        caller: &str,
        post_id: &str,
        changes: PostChanges,
    ) -> Result<(), ApiError> {
        let record = self.live_post(post_id).ok_or_else(ApiError::permissions)?;
        if record.post.user_id != caller || !self.can_post(caller, &record.post.channel_id) {
            return Err(ApiError::permissions());
        }
        let message = changes
            .message
            .clone()
            .unwrap_or_else(|| record.post.message.clone());
        let props = changes
            .props
            .clone()
            .map(Value::Object)
            .unwrap_or_else(|| record.post.props.clone());
        validate_post(&message, &record.kind, &props, &record.post.file_ids)?;
        let now = now_ms();
        let Some(record) = self.posts.get_mut(post_id) else {
            return Err(ApiError::permissions());
        };
        let now = now.max(record.post.update_at + 1);
        if message != record.post.message {
            record.post.edit_at = now;
            record.hashtags = parse_hashtags(&message);
            record.post.message = message;
        }
        record.post.props = props;
        if let Some(pinned) = changes.is_pinned {
            record.is_pinned = pinned;
        }
        record.post.update_at = now;
        record.post.edit_count += 1;
        self.post_versions
            .push(PostVersion::of(&record.post, Instant::now()));
        let mut data = Map::new();
        let record = &self.posts[post_id];
        data.insert("post".into(), to_json(&self.wire_post(record, "")).into());
        let channel_id = record.post.channel_id.clone();
        self.publish(
            "post_edited",
            data,
            Target::Channel {
                channel_id,
                omit_user: None,
            },
        );
        Ok(())
    }

    /// `DELETE /posts/{id}`: soft-deletes the post and, for a root, its replies; the event carries
    /// the post as it was before deletion, as captured.
    pub(super) fn delete_post(&mut self, caller: &str, post_id: &str) -> Result<(), ApiError> {
        let record = self.live_post(post_id).ok_or_else(ApiError::permissions)?;
        if record.post.user_id != caller || !self.can_post(caller, &record.post.channel_id) {
            return Err(ApiError::permissions());
        }
        let snapshot = to_json(&self.wire_post(record, ""));
        let channel_id = record.post.channel_id.clone();
        let is_root = record.post.root_id.is_empty();
        let now = now_ms();
        for record in self.posts.values_mut() {
            let hit = record.post.id == post_id || (is_root && record.post.root_id == post_id);
            if hit && record.post.delete_at == 0 {
                record.post.delete_at = now;
                record.post.update_at = now.max(record.post.update_at);
            }
        }
        for file in self.files.values_mut() {
            if file.post_id == post_id && file.delete_at == 0 {
                file.delete_at = now;
            }
        }
        let mut data = Map::new();
        data.insert("post".into(), snapshot.into());
        self.publish(
            "post_deleted",
            data,
            Target::Channel {
                channel_id,
                omit_user: None,
            },
        );
        Ok(())
    }

    /// `GET /channels/{id}/posts`, following `GetPostsSince`/`GetPostsAfterPost`/
    /// `GetPostsBeforePost`/`GetPostsPage` and `AddCursorIdsForPostList` of 5.36.
    pub(super) fn channel_posts(&self, channel_id: &str, query: &PostsQuery) -> WirePostList {
        let visible: Vec<&PostRecord> = self
            .post_order
            .iter()
            .filter_map(|id| self.posts.get(id))
            .filter(|r| r.post.channel_id == channel_id && r.post.delete_at == 0)
            .collect();
        let anchor_time = |id: &str| self.posts.get(id).map(|r| r.post.create_at);
        let offset = query.page.saturating_mul(query.per_page);
        let mut next_post_id = None;
        let mut prev_post_id = None;
        let selected: Vec<&PostRecord> = if query.since > 0 {
            next_post_id = Some(String::new());
            prev_post_id = Some(String::new());
            let mut updated: Vec<&PostRecord> = visible
                .iter()
                .copied()
                .filter(|r| r.post.update_at > query.since)
                .collect();
            updated.truncate(1000);
            updated.reverse();
            updated
        } else if !query.after.is_empty() {
            if query.page == 0 {
                prev_post_id = Some(query.after.clone());
            }
            match anchor_time(&query.after) {
                Some(t) => visible
                    .iter()
                    .copied()
                    .filter(|r| r.post.create_at > t)
                    .skip(offset)
                    .take(query.per_page)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect(),
                None => Vec::new(),
            }
        } else if !query.before.is_empty() {
            if query.page == 0 {
                next_post_id = Some(query.before.clone());
            }
            match anchor_time(&query.before) {
                Some(t) => visible
                    .iter()
                    .rev()
                    .copied()
                    .filter(|r| r.post.create_at < t)
                    .skip(offset)
                    .take(query.per_page)
                    .collect(),
                None => Vec::new(),
            }
        } else {
            visible
                .iter()
                .rev()
                .copied()
                .skip(offset)
                .take(query.per_page)
                .collect()
        };
        if query.since <= 0 && !query.after.is_empty() && selected.len() < query.per_page {
            next_post_id = Some(String::new());
        }
        if query.since <= 0 && !query.before.is_empty() && selected.len() < query.per_page {
            prev_post_id = Some(String::new());
        }
        let next_post_id = next_post_id.unwrap_or_else(|| {
            selected
                .first()
                .and_then(|first| {
                    visible
                        .iter()
                        .find(|r| r.post.create_at > first.post.create_at)
                        .map(|r| r.post.id.clone())
                })
                .unwrap_or_default()
        });
        let prev_post_id = prev_post_id.unwrap_or_else(|| {
            selected
                .last()
                .and_then(|last| {
                    visible
                        .iter()
                        .rev()
                        .find(|r| r.post.create_at < last.post.create_at)
                        .map(|r| r.post.id.clone())
                })
                .unwrap_or_default()
        });
        let mut list = WirePostList {
            order: selected.iter().map(|r| r.post.id.clone()).collect(),
            posts: Default::default(),
            next_post_id,
            prev_post_id,
        };
        // Like the real server, `posts` also holds the whole thread of every listed post.
        let roots: HashSet<&str> = selected
            .iter()
            .flat_map(|r| [r.post.id.as_str(), r.post.root_id.as_str()])
            .filter(|id| !id.is_empty())
            .collect();
        for record in self.posts.values() {
            let post = &record.post;
            let in_thread =
                roots.contains(post.id.as_str()) || roots.contains(post.root_id.as_str());
            if post.delete_at == 0 && in_thread {
                list.posts
                    .insert(post.id.clone(), self.wire_post(record, ""));
            }
        }
        list
    }

    /// `GET /posts/{id}/thread`: the post first, then the rest of its thread oldest first.
    pub(super) fn thread_list(&self, post_id: &str) -> Option<WirePostList> {
        let record = self.live_post(post_id)?;
        let root = if record.post.root_id.is_empty() {
            record.post.id.clone()
        } else {
            record.post.root_id.clone()
        };
        let mut list = WirePostList {
            order: vec![post_id.to_owned()],
            posts: Default::default(),
            next_post_id: String::new(),
            prev_post_id: String::new(),
        };
        for id in &self.post_order {
            let Some(other) = self.live_post(id) else {
                continue;
            };
            if other.post.id == root || other.post.root_id == root {
                if other.post.id != post_id {
                    list.order.push(other.post.id.clone());
                }
                list.posts
                    .insert(other.post.id.clone(), self.wire_post(other, ""));
            }
        }
        Some(list)
    }

    /// Non-deleted posts of a channel, oldest first.
    pub(super) fn posts_in(&self, channel_id: &str) -> Vec<Post> {
        self.post_order
            .iter()
            .filter_map(|id| self.live_post(id))
            .filter(|r| r.post.channel_id == channel_id)
            .map(|r| r.post.clone())
            .collect()
    }

    /// The non-deleted root then its non-deleted replies, oldest first.
    pub(super) fn thread(&self, root_id: &str) -> Vec<Post> {
        if self.live_post(root_id).is_none() {
            return Vec::new();
        }
        self.post_order
            .iter()
            .filter_map(|id| self.live_post(id))
            .filter(|r| r.post.id == root_id || r.post.root_id == root_id)
            .map(|r| r.post.clone())
            .collect()
    }

    // ----- reactions -----

    /// `saveReaction` + `SaveReactionForPost`.
    pub(super) fn save_reaction(
        &mut self,
        caller: &str,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<ReactionRecord, ApiError> {
        if !is_valid_id(user_id)
            || !is_valid_id(post_id)
            || emoji_name.is_empty()
            || emoji_name.len() > EMOJI_NAME_MAX_LENGTH
        {
            return Err(ApiError::new(
                400,
                "api.reaction.save_reaction.invalid.app_error",
                "Reaction is not valid.",
            ));
        }
        if user_id != caller {
            return Err(ApiError::new(
                403,
                "api.reaction.save_reaction.user_id.app_error",
                "You cannot save reaction for the other user.",
            ));
        }
        let channel_id = self
            .posts
            .get(post_id)
            .map(|r| r.post.channel_id.clone())
            .filter(|c| self.can_post(caller, c))
            .ok_or_else(ApiError::permissions)?;
        if self.live_post(post_id).is_none() {
            return Err(ApiError::post_not_found());
        }
        if !is_valid_emoji_name(emoji_name) {
            return Err(ApiError::new(
                400,
                "model.reaction.is_valid.emoji_name.app_error",
                "Invalid emoji name.",
            ));
        }
        let now = now_ms();
        let existing = self
            .reactions
            .iter_mut()
            .find(|r| r.user_id == user_id && r.post_id == post_id && r.emoji_name == emoji_name);
        let reaction = match existing {
            Some(reaction) => {
                reaction.update_at = now;
                reaction.clone()
            }
            None => {
                let reaction = ReactionRecord {
                    user_id: user_id.to_owned(),
                    post_id: post_id.to_owned(),
                    emoji_name: emoji_name.to_owned(),
                    create_at: now,
                    update_at: now,
                };
                self.reactions.push(reaction.clone());
                reaction
            }
        };
        if let Some(record) = self.posts.get_mut(post_id) {
            record.has_reactions = true;
            record.post.update_at = now.max(record.post.update_at);
        }
        let mut data = Map::new();
        data.insert("reaction".into(), to_json(&wire_reaction(&reaction)).into());
        self.publish(
            "reaction_added",
            data,
            Target::Channel {
                channel_id,
                omit_user: None,
            },
        );
        Ok(reaction)
    }

    /// `deleteReaction` + `DeleteReactionForPost`; like 5.36 it answers OK and broadcasts even
    /// when there was no such reaction.
    pub(super) fn delete_reaction(
        &mut self,
        caller: &str,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<(), ApiError> {
        let channel_id = self
            .posts
            .get(post_id)
            .map(|r| r.post.channel_id.clone())
            .filter(|c| self.can_post(caller, c))
            .ok_or_else(ApiError::permissions)?;
        if user_id != caller {
            return Err(ApiError::permissions());
        }
        if self.live_post(post_id).is_none() {
            return Err(ApiError::post_not_found());
        }
        self.reactions.retain(|r| {
            !(r.user_id == user_id && r.post_id == post_id && r.emoji_name == emoji_name)
        });
        let now = now_ms();
        let remaining = self.reactions.iter().any(|r| r.post_id == post_id);
        if let Some(record) = self.posts.get_mut(post_id) {
            record.has_reactions = remaining;
            record.post.update_at = now.max(record.post.update_at);
        }
        let removed = ReactionRecord {
            user_id: user_id.to_owned(),
            post_id: post_id.to_owned(),
            emoji_name: emoji_name.to_owned(),
            create_at: 0,
            update_at: now,
        };
        let mut data = Map::new();
        data.insert("reaction".into(), to_json(&wire_reaction(&removed)).into());
        self.publish(
            "reaction_removed",
            data,
            Target::Channel {
                channel_id,
                omit_user: None,
            },
        );
        Ok(())
    }

    // ----- files -----

    pub(super) fn upload_file(
        &mut self,
        caller: &str,
        channel_id: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<String, ApiError> {
        if !self.can_post(caller, channel_id) {
            return Err(ApiError::permissions());
        }
        if bytes.len() as u64 > self.max_file_size {
            return Err(file_too_large(name, bytes.len() as u64, self.max_file_size));
        }
        let name = name.rsplit(['/', '\\']).next().unwrap_or(name).to_owned();
        let extension = match name.rfind('.') {
            Some(dot) => name[dot + 1..].to_ascii_lowercase(),
            None => String::new(),
        };
        let now = now_ms();
        let file = FileRecord {
            id: new_id(),
            user_id: caller.to_owned(),
            post_id: String::new(),
            create_at: now,
            update_at: now,
            delete_at: 0,
            mime_type: mime_type(&extension).to_owned(),
            extension,
            name,
            bytes,
        };
        let id = file.id.clone();
        self.files.insert(id.clone(), file);
        Ok(id)
    }

    /// `getFile`/`getFileInfo` access: the uploader, or a reader of the post it is attached to.
    pub(super) fn readable_file(
        &self,
        caller: &str,
        file_id: &str,
    ) -> Result<&FileRecord, ApiError> {
        let file = self
            .files
            .get(file_id)
            .filter(|f| f.delete_at == 0)
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "app.file_info.get.app_error",
                    "Unable to get the file info.",
                )
            })?;
        let via_post = self
            .posts
            .get(&file.post_id)
            .is_some_and(|r| self.can_read_channel(caller, &r.post.channel_id));
        if file.user_id == caller || via_post {
            Ok(file)
        } else {
            Err(ApiError::permissions())
        }
    }

    pub(super) fn file_infos_json(&self, ids: &[String]) -> Vec<super::wire::WireFileInfo> {
        ids.iter()
            .filter_map(|id| self.files.get(id))
            .map(wire_file_info)
            .collect()
    }

    // ----- websocket sessions -----

    /// Registers a fresh authenticated connection and sends its `hello` (seq 0). The caller then
    /// calls `mark_online`, which may add a `status_change`.
    pub(super) fn ws_open(&mut self, user_id: &str, sender: Sender<WsOut>) -> u64 {
        let key = self.next_session_key;
        self.next_session_key += 1;
        let connection_id = if self.reliable_websockets {
            new_id()
        } else {
            String::new()
        };
        self.sessions.insert(
            key,
            WsSession {
                connection_id,
                user_id: user_id.to_owned(),
                next_seq: 0,
                buffer: VecDeque::new(),
                sender: Some(sender),
                inactive_since: None,
            },
        );
        self.send_hello(key);
        key
    }

    pub(super) fn mark_online(&mut self, user_id: &str) {
        self.set_status(user_id, true);
    }

    /// A reconnect with `connection_id`/`sequence_number` (header auth, reliable websockets on),
    /// as `PopulateWebConnConfig` and the write pump of 5.36 handle it. `Err` means: close the
    /// TCP connection at once.
    pub(super) fn ws_resume(
        &mut self,
        user_id: &str,
        connection_id: &str,
        sequence_number: Option<&str>,
        sender: Sender<WsOut>,
    ) -> Result<u64, ()> {
        if !is_valid_id(connection_id) {
            return Err(());
        }
        self.expire_sessions(INACTIVE_SESSION_TTL);
        let found = self
            .sessions
            .iter()
            .find(|(_, s)| s.connection_id == connection_id && s.user_id == user_id)
            .map(|(key, _)| *key);
        let Some(key) = found else {
            let key = self.ws_open(user_id, sender);
            self.set_status(user_id, true);
            return Ok(key);
        };
        let sequence: i64 = sequence_number.and_then(|s| s.parse().ok()).ok_or(())?;
        let Some(session) = self.sessions.get_mut(&key) else {
            return Err(());
        };
        if let Some(old) = session.sender.replace(sender.clone()) {
            let _ = old.send(WsOut::Drop);
        }
        session.inactive_since = None;
        let first = session
            .buffer
            .front()
            .map(|(seq, _)| *seq)
            .unwrap_or(session.next_seq);
        if sequence == session.next_seq {
            // Nothing was missed.
        } else if first <= sequence && sequence < session.next_seq {
            for (seq, frame) in &session.buffer {
                if *seq >= sequence {
                    let _ = sender.send(WsOut::Frame(frame.clone()));
                }
            }
        } else {
            session.connection_id = new_id();
            session.next_seq = 0;
            session.buffer.clear();
            self.send_hello(key);
        }
        self.set_status(user_id, true);
        Ok(key)
    }

    /// The connection of session `key` ended. A reliable session stays resumable; the user goes
    /// offline once no connection of theirs is active.
    pub(super) fn ws_close(&mut self, key: u64, sender_of_this_connection: &Sender<WsOut>) {
        let now = self.now();
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        // A resume may already have moved the session to a newer connection.
        let is_current = session
            .sender
            .as_ref()
            .is_some_and(|s| s.same_channel(sender_of_this_connection));
        if !is_current {
            return;
        }
        let user_id = session.user_id.clone();
        if self.reliable_websockets && !session.connection_id.is_empty() {
            session.sender = None;
            session.inactive_since = Some(now);
        } else {
            self.sessions.remove(&key);
        }
        let still_active = self
            .sessions
            .values()
            .any(|s| s.user_id == user_id && s.sender.is_some());
        if !still_active {
            self.set_status(&user_id, false);
        }
    }

    /// Forgets disconnected sessions older than `ttl`, so their reconnects get a fresh `hello`.
    pub(super) fn expire_sessions(&mut self, ttl: Duration) {
        let now = self.now();
        self.sessions.retain(|_, s| match s.inactive_since {
            Some(since) => now.duration_since(since) < ttl,
            None => true,
        });
    }

    /// The `user_typing` action: `Err` becomes a FAIL reply.
    pub(super) fn user_typing(
        &mut self,
        user_id: &str,
        channel_id: Option<&str>,
        parent_id: &str,
    ) -> Result<(), ApiError> {
        let invalid = || {
            ApiError::new(
                400,
                "api.websocket_handler.invalid_param.app_error",
                "Invalid channel_id parameter.",
            )
        };
        let channel_id = channel_id.filter(|c| is_valid_id(c)).ok_or_else(invalid)?;
        if !self.can_post(user_id, channel_id) {
            return Err(invalid());
        }
        self.typing.push((
            user_id.to_owned(),
            channel_id.to_owned(),
            parent_id.to_owned(),
        ));
        let mut data = Map::new();
        data.insert("parent_id".into(), parent_id.into());
        data.insert("user_id".into(), user_id.into());
        self.publish(
            "typing",
            data,
            Target::Channel {
                channel_id: channel_id.to_owned(),
                omit_user: Some(user_id.to_owned()),
            },
        );
        Ok(())
    }

    /// Sends `raw` as a text frame, as it is, to every connected websocket; `seq` is not touched.
    pub(super) fn inject_ws_frame(&mut self, raw: &str) -> usize {
        let mut sent = 0;
        for session in self.sessions.values() {
            if let Some(sender) = &session.sender
                && sender.send(WsOut::Frame(raw.to_owned())).is_ok()
            {
                sent += 1;
            }
        }
        sent
    }

    fn send_hello(&mut self, key: u64) {
        let Some(session) = self.sessions.get(&key) else {
            return;
        };
        let mut data = Map::new();
        data.insert("connection_id".into(), session.connection_id.clone().into());
        data.insert("server_version".into(), SERVER_VERSION.into());
        let user_id = session.user_id.clone();
        self.emit(key, "hello", &data, None, &user_id, "");
    }

    fn set_status(&mut self, user_id: &str, online: bool) {
        let changed = if online {
            self.online.insert(user_id.to_owned())
        } else {
            self.online.remove(user_id)
        };
        if changed {
            let mut data = Map::new();
            data.insert(
                "status".into(),
                (if online { "online" } else { "offline" }).into(),
            );
            data.insert("user_id".into(), user_id.into());
            self.publish("status_change", data, Target::User(user_id.to_owned()));
        }
    }

    /// Sends an event to every session it is for, live or (reliable) waiting for a resume.
    fn publish(&mut self, event: &str, data: Map<String, Value>, target: Target) {
        let (user_id, channel_id, omit_user, members) = match &target {
            Target::User(user) => (user.as_str(), "", None, vec![user.clone()]),
            Target::Channel {
                channel_id,
                omit_user,
            } => {
                let members = self
                    .channels
                    .get(channel_id)
                    .map(|c| c.members.clone())
                    .unwrap_or_default();
                ("", channel_id.as_str(), omit_user.as_deref(), members)
            }
        };
        let keys: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| members.contains(&s.user_id) && Some(s.user_id.as_str()) != omit_user)
            .map(|(key, _)| *key)
            .collect();
        let user_id = user_id.to_owned();
        let channel_id = channel_id.to_owned();
        let omit_user = omit_user.map(str::to_owned);
        for key in keys {
            self.emit(
                key,
                event,
                &data,
                omit_user.as_deref(),
                &user_id,
                &channel_id,
            );
        }
    }

    fn emit(
        &mut self,
        key: u64,
        event: &str,
        data: &Map<String, Value>,
        omit_user: Option<&str>,
        user_id: &str,
        channel_id: &str,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let seq = session.next_seq;
        session.next_seq += 1;
        let omit_users = omit_user.map(|user| {
            let mut map = Map::new();
            map.insert(user.to_owned(), Value::Bool(true));
            map
        });
        let frame = to_json(&WireEvent {
            event,
            data,
            broadcast: WireBroadcast {
                omit_users,
                user_id,
                channel_id,
                team_id: "",
            },
            seq,
        });
        if !session.connection_id.is_empty() {
            session.buffer.push_back((seq, frame.clone()));
            while session.buffer.len() > REPLAY_BUFFER {
                session.buffer.pop_front();
            }
        }
        if let Some(sender) = &session.sender {
            let _ = sender.send(WsOut::Frame(frame));
        }
    }

    pub(super) fn set_reliable_websockets(&mut self, on: bool) {
        self.reliable_websockets = on;
        if !on {
            self.sessions.retain(|_, s| s.sender.is_some());
        }
    }

    pub(super) fn reaction_names(&self, post_id: &str) -> Vec<(String, String)> {
        self.reactions
            .iter()
            .filter(|r| r.post_id == post_id)
            .map(|r| (r.user_id.clone(), r.emoji_name.clone()))
            .collect()
    }

    pub(super) fn reactions_json(&self, post_id: &str) -> Vec<super::wire::WireReaction> {
        self.reactions
            .iter()
            .filter(|r| r.post_id == post_id)
            .map(wire_reaction)
            .collect()
    }

    pub(super) fn is_online(&self, user_id: &str) -> bool {
        self.online.contains(user_id)
    }
}

/// The checks of `Post.IsValid` that a client can trip.
fn validate_post(
    message: &str,
    kind: &str,
    props: &Value,
    file_ids: &[String],
) -> Result<(), ApiError> {
    if message.chars().count() > MAX_POST_SIZE {
        return Err(ApiError::invalid_message());
    }
    if !(kind.is_empty() || kind.starts_with("custom_") || kind.starts_with("system_")) {
        return Err(ApiError::new(
            400,
            "model.post.is_valid.type.app_error",
            "Invalid type.",
        ));
    }
    if to_json(&file_ids).chars().count() > POST_FILE_IDS_MAX_RUNES {
        return Err(ApiError::new(
            400,
            "model.post.is_valid.file_ids.app_error",
            "Invalid file ids. Note that uploads are limited to 10 files maximum. Please use additional posts for more files.",
        ));
    }
    if to_json(props).chars().count() > POST_PROPS_MAX_RUNES {
        return Err(ApiError::new(
            400,
            "model.post.is_valid.props.app_error",
            "Invalid props.",
        ));
    }
    Ok(())
}

pub(super) fn file_too_large(name: &str, length: u64, limit: u64) -> ApiError {
    ApiError::new(
        413,
        "api.file.upload_file.too_large_detailed.app_error",
        &format!(
            "Unable to upload file {name}. {length} bytes exceeds the maximum allowed {limit} bytes."
        ),
    )
}

/// Emoji names as `Reaction.IsValid` accepts them: `^[a-zA-Z0-9\-\+_]+$`.
pub(super) fn is_valid_emoji_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= EMOJI_NAME_MAX_LENGTH
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'_'))
}

/// Go's `mime.TypeByExtension` for the common cases; unknown extensions give "".
fn mime_type(extension: &str) -> &'static str {
    match extension {
        "txt" | "text" | "log" => "text/plain; charset=utf-8",
        "md" | "markdown" => "text/markdown; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "text/xml; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "bmp" => "image/bmp",
        _ => "",
    }
}

/// `model.ParseHashtags`: words like `#topic`, space separated.
fn parse_hashtags(message: &str) -> String {
    let mut tags: Vec<String> = Vec::new();
    for word in message.split_whitespace() {
        let word = word.trim_start_matches(|c: char| !c.is_alphanumeric() && c != '#');
        let word = word.trim_end_matches(|c: char| !c.is_alphanumeric());
        let Some(body) = word.strip_prefix('#') else {
            continue;
        };
        let body = body.trim_start_matches('#');
        let valid = body.chars().next().is_some_and(char::is_alphabetic)
            && body
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            tags.push(format!("#{body}"));
        }
    }
    tags.join(" ")
}

/// Go-like decoding of an optional JSON string field: absent or null is "".
pub(super) fn string_field(object: &Map<String, Value>, key: &str) -> Result<String, ()> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(()),
    }
}

pub(super) fn json_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    }
}

/// A `StringInterface` field: absent or null is an empty map, anything but an object is an error.
pub(super) fn props_field(
    object: &Map<String, Value>,
    key: &str,
) -> Result<Option<Map<String, Value>>, ()> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Map::new())),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(_) => Err(()),
    }
}

pub(super) fn string_list_field(object: &Map<String, Value>, key: &str) -> Result<Vec<String>, ()> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or(()))
            .collect(),
        Some(_) => Err(()),
    }
}

/// The limited client config an anonymous caller gets, and the full one for a session.
pub(super) fn client_config(state: &State, authenticated: bool, site_url: &str) -> Value {
    let mut config = json!({
        "BuildDate": "",
        "BuildEnterpriseReady": "false",
        "BuildHash": "9f4c5ce823f43ddf5bc6ebfcf28934e3",
        "BuildHashEnterprise": "none",
        "BuildNumber": BUILD_NUMBER,
        "DiagnosticId": "",
        "DiagnosticsEnabled": "false",
        "EnableBotAccountCreation": "true",
        "EnableSignUpWithEmail": "true",
        "SiteName": "Mattermost",
        "SiteURL": site_url,
        "Version": VERSION,
        "WebsocketPort": "80",
        "WebsocketSecurePort": "443",
        "WebsocketURL": "",
    });
    if authenticated && let Value::Object(map) = &mut config {
        map.insert("MaxPostSize".into(), MAX_POST_SIZE.to_string().into());
        map.insert("MaxFileSize".into(), state.max_file_size.to_string().into());
        map.insert("EnableUserAccessTokens".into(), "true".into());
        map.insert("EnableFileAttachments".into(), "true".into());
        map.insert(
            "EnableReliableWebSockets".into(),
            state.reliable_websockets.to_string().into(),
        );
    }
    config
}
