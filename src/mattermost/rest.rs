//! The Mattermost REST client. Every outbound call of one Mattermost connection goes through
//! `MattermostClient::call`, which spends from one shared rate budget, learns the server's limit from its
//! `X-Ratelimit-*` headers, honours 429s and retries transient failures.
//!
//! Two flavours share that budget: the default client gives up after a few attempts (for callers that
//! must not block long, like the router), and `patient()` retries transient failures until they succeed
//! or `shut_down` is called (for session workers, whose replies must arrive after an outage).

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{FileInfo, Post, User};
use crate::budget::{DEFAULT_MAX_RPS, Poll, Priority, Scheduler};
use crate::config::Secret;
use crate::http::{self, Backoff, percent_encode};

/// The props key that carries a create's `pending_post_id`, for that look-up.
const PENDING_PROP: &str = "ocmm_pending_post_id";
/// Attempts of an impatient call; also the point where a patient call logs that it is waiting out an
/// outage.
const MAX_ATTEMPTS: u32 = 6;
/// Backoff between retries. A patient call caps lower than a reconnect would, so that delivery resumes
/// within ~10 s of the server coming back.
const RETRY_BASE: Duration = Duration::from_millis(250);
const IMPATIENT_RETRY_CAP: Duration = Duration::from_secs(8);
/// Short enough that replies follow within seconds once Mattermost is back; the shared budget keeps
/// many waiting workers from hammering a server that is down.
const PATIENT_RETRY_CAP: Duration = Duration::from_secs(3);
/// Waits are cut into steps this long so that `shut_down` ends them promptly.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Mattermost accepts at most 200 posts per page.
const MAX_PER_PAGE: u32 = 200;
/// The most a JSON answer may be; posts are at most 16383 characters, so this is generous.
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;
const MAX_ERROR_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub enum MmError {
    /// No answer (connection refused, timeout, reset): retryable.
    Unreachable(String),
    /// The server refused the call. `id` is Mattermost's error id, such as
    /// `model.post.is_valid.msg.app_error`. 5xx and 429 are retryable; the rest are not.
    Http {
        status: u16,
        id: String,
        message: String,
    },
    /// The answer was not what the API documents.
    Decode(String),
    /// A download was larger than the caller allows; not retryable.
    TooLarge { what: String, limit: u64 },
    /// An intermediate edit (`Priority::Progress`) found the budget short and was not sent: the
    /// caller sends a newer state later. Not retryable.
    Deferred,
    /// `shut_down` was called while the call waited; not retryable.
    Stopping,
}

impl MmError {
    pub fn is_retryable(&self) -> bool {
        match self {
            MmError::Unreachable(_) => true,
            MmError::Http { status, .. } => *status == 429 || *status >= 500,
            MmError::Decode(_)
            | MmError::TooLarge { .. }
            | MmError::Deferred
            | MmError::Stopping => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MmError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for MmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MmError::Unreachable(e) => write!(f, "mattermost unreachable: {e}"),
            MmError::Http {
                status,
                id,
                message,
            } if id.is_empty() => write!(f, "mattermost answered {status}: {message}"),
            MmError::Http {
                status,
                id,
                message,
            } => write!(f, "mattermost answered {status}: {message} ({id})"),
            MmError::Decode(e) => write!(f, "unexpected answer from mattermost: {e}"),
            MmError::TooLarge { what, limit } => {
                write!(f, "{what} is larger than the {limit}-byte limit")
            }
            MmError::Deferred => write!(
                f,
                "the rate budget is short, so the intermediate edit was left for a later one"
            ),
            MmError::Stopping => write!(
                f,
                "the bridge is stopping, so the mattermost call was abandoned"
            ),
        }
    }
}

/// Counts of what this client did, for the logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallStats {
    /// HTTP requests sent, retries included.
    pub calls: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Attempts repeated after a transient failure (429 included).
    pub retries: u64,
    /// Patient calls that kept failing past the impatient limit and then succeeded.
    pub outages_waited: u64,
}

/// Clonable handle on one Mattermost connection. Clones (and `patient()`, `at()`) share the rate
/// budget, the stats, the shutdown flag and the HTTP connection pool.
#[derive(Clone)]
pub struct MattermostClient {
    base: String,
    authorization: String,
    agent: ureq::Agent,
    shared: Arc<Shared>,
    /// Retry transient failures until success or shutdown, instead of `MAX_ATTEMPTS` times.
    patient: bool,
    /// Per-request deadline instead of the agent's (tests make calls hang past it).
    call_timeout: Option<Duration>,
    /// First and longest delay between retries of a transient failure.
    retry_delays: (Duration, Duration),
    /// The class of this client's calls in the shared budget (`at()` picks another).
    priority: Priority,
}

/// The rate budget of one Mattermost account. Links on one bot and server share one
/// (`MattermostClient::with_budget`): the server limits the account, not the link.
#[derive(Clone)]
pub struct SharedBudget(Arc<Rate>);

struct Rate {
    budget: Mutex<Scheduler>,
    /// Signalled whenever a call took its token or left the line, so the next in line looks again.
    line_moved: Condvar,
}

impl SharedBudget {
    /// At most `max_rps` calls a second while the server sends no rate-limit headers.
    pub fn new(max_rps: u32) -> SharedBudget {
        SharedBudget(Arc::new(Rate {
            budget: Mutex::new(Scheduler::new(max_rps, Instant::now())),
            line_moved: Condvar::new(),
        }))
    }

    /// Whether both are the one budget.
    pub fn same(&self, other: &SharedBudget) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What every client of one connection shares.
struct Shared {
    rate: SharedBudget,
    stats: Mutex<CallStats>,
    stopping: AtomicBool,
    /// When calls started failing, while an outage is being waited out; logged once per outage.
    outage_since: Mutex<Option<Instant>>,
    /// The bot's user id once `me()` has answered; the `pending_post_id` prefix.
    user_id: OnceLock<String>,
    /// Prefix before `me()` answered: random per process.
    instance_id: String,
}

impl Shared {
    fn new(rate: SharedBudget) -> Shared {
        Shared {
            rate,
            stats: Mutex::new(CallStats::default()),
            stopping: AtomicBool::new(false),
            outage_since: Mutex::new(None),
            user_id: OnceLock::new(),
            instance_id: random_id(),
        }
    }
}

impl MattermostClient {
    pub fn new(base_url: &str, token: &Secret) -> MattermostClient {
        MattermostClient::with_tls(base_url, token, &http::Tls::default())
    }

    /// `new`, trusting `tls`'s roots for https://.
    pub fn with_tls(base_url: &str, token: &Secret, tls: &http::Tls) -> MattermostClient {
        MattermostClient::with_budget(base_url, token, tls, SharedBudget::new(DEFAULT_MAX_RPS))
    }

    /// `with_tls`, spending from `budget`, which other clients (another link's) may share.
    pub fn with_budget(
        base_url: &str,
        token: &Secret,
        tls: &http::Tls,
        budget: SharedBudget,
    ) -> MattermostClient {
        MattermostClient {
            base: base_url.to_string(),
            authorization: format!("Bearer {}", token.expose()),
            agent: http::agent_with_tls(Duration::from_secs(30), tls),
            shared: Arc::new(Shared::new(budget)),
            patient: false,
            call_timeout: None,
            retry_delays: (RETRY_BASE, IMPATIENT_RETRY_CAP),
            priority: Priority::Ask,
        }
    }

    /// While the server sends no rate-limit headers, at most `max_rps` calls a second
    /// (`OPENCODE_MM_MAX_RPS`); once it does, its limit applies. Call before the first request.
    pub fn set_max_rps(&self, max_rps: u32) {
        if let Ok(mut budget) = self.shared.rate.0.budget.lock() {
            *budget = Scheduler::new(max_rps, Instant::now());
        }
    }

    /// This client with its calls in class `priority` of the shared budget (see `budget.rs`).
    /// `Priority::Progress` calls never wait for the budget: they fail with `MmError::Deferred`.
    pub fn at(&self, priority: Priority) -> MattermostClient {
        MattermostClient {
            priority,
            ..self.clone()
        }
    }

    /// Counts a running turn's reply as open until the guard is dropped: intermediate edits leave
    /// the budget its final text and completion line need.
    pub fn open_stream(&self) -> StreamGuard {
        if let Ok(mut budget) = self.shared.rate.0.budget.lock() {
            budget.stream_opened();
        }
        StreamGuard {
            shared: self.shared.clone(),
        }
    }

    /// A client that shares this one's budget, stats and connections, and retries timeouts, 5xx and
    /// 429 (honouring `Retry-After`) with jittered backoff until they succeed or `shut_down` is called.
    /// Other 4xx fail at once. For session workers: a reply waits out an outage and arrives after it.
    pub fn patient(&self) -> MattermostClient {
        MattermostClient {
            patient: true,
            retry_delays: (RETRY_BASE, PATIENT_RETRY_CAP),
            ..self.clone()
        }
    }

    /// This client with other retry delays (jittered, doubling from `first` up to `longest`); tests
    /// use short ones.
    pub fn with_retry_delays(&self, first: Duration, longest: Duration) -> MattermostClient {
        MattermostClient {
            retry_delays: (first, longest),
            ..self.clone()
        }
    }

    /// This client with a per-request deadline instead of the default 30 s.
    pub fn with_call_timeout(&self, timeout: Duration) -> MattermostClient {
        MattermostClient {
            call_timeout: Some(timeout),
            ..self.clone()
        }
    }

    pub fn is_patient(&self) -> bool {
        self.patient
    }

    /// For a stopping bridge: every client of this connection stops waiting. A call waiting to retry
    /// returns `MmError::Stopping` within ~100 ms; from now on each call makes one attempt, without
    /// waiting for the rate budget, and fails with `Stopping` instead of retrying, so final edits still
    /// go out when the server is fine. A request already on the wire runs to its timeout.
    pub fn shut_down(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_shut_down(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    pub fn stats(&self) -> CallStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub fn me(&self) -> Result<User, MmError> {
        let me: User = self.get_json("/users/me")?;
        let _ = self.shared.user_id.set(me.id.clone());
        Ok(me)
    }

    /// A fresh `pending_post_id`, as Mattermost's own clients make them: `<user_id>:<unix millis>`,
    /// the millis strictly increasing so that every logical post gets its own. The server answers a
    /// create that repeats one (within 30 s) with the post already made, so a retried create never
    /// duplicates.
    pub fn new_pending_post_id(&self) -> String {
        // One sequence for the whole process: links on one bot are separate clients, and the same
        // `<bot id>:<millis>` from two of them would make the server hand one link the other's post.
        static LAST_PENDING_MS: AtomicI64 = AtomicI64::new(0);
        let now = crate::log::now_ms() as i64;
        let previous = LAST_PENDING_MS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        let stamp = now.max(previous + 1);
        let prefix = self
            .shared
            .user_id
            .get()
            .unwrap_or(&self.shared.instance_id);
        format!("{prefix}:{stamp}")
    }

    pub fn user_by_id(&self, user_id: &str) -> Result<User, MmError> {
        self.get_json(&format!("/users/{}", percent_encode(user_id)))
    }

    pub fn user_by_username(&self, username: &str) -> Result<User, MmError> {
        self.get_json(&format!("/users/username/{}", percent_encode(username)))
    }

    /// The DM channel between two users; Mattermost creates it on first use and returns it after.
    pub fn direct_channel(&self, user_a: &str, user_b: &str) -> Result<String, MmError> {
        let channel: Value =
            self.call_json("POST", "/channels/direct", Some(&json!([user_a, user_b])))?;
        channel
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| MmError::Decode("direct channel without id".into()))
    }

    /// Creates a post; `root_id` empty for a root post. `props` is attached as-is.
    pub fn create_post(
        &self,
        channel_id: &str,
        root_id: &str,
        message: &str,
        props: Option<Value>,
    ) -> Result<Post, MmError> {
        let body = json!({
            "channel_id": channel_id,
            "root_id": root_id,
            "message": message,
        });
        self.create(body, props)
    }

    /// `POST /posts` of `body`, with a `pending_post_id` that is the same for every retry: one post
    /// however many tries. Mattermost's memory of that id is short and per node, so the id also goes
    /// in the props, and a retry after a try that may have reached the server first looks for the
    /// post among the channel's latest.
    fn create(&self, mut body: Value, props: Option<Value>) -> Result<Post, MmError> {
        let pending_post_id = self.new_pending_post_id();
        let mut props = match props {
            Some(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        props.insert(PENDING_PROP.into(), json!(pending_post_id));
        body["pending_post_id"] = json!(pending_post_id);
        body["props"] = Value::Object(props);
        let channel_id = body["channel_id"].as_str().unwrap_or_default().to_string();
        let json = body.to_string();
        let find = || self.find_created(&channel_id, &pending_post_id);
        let bytes = self.call_bytes_recovering(
            "POST",
            "/posts",
            Body::Json(&json),
            MAX_JSON_BYTES,
            Some(&find),
        )?;
        serde_json::from_slice(&bytes).map_err(|e| MmError::Decode(format!("POST /posts: {e}")))
    }

    /// The post a create with `pending_post_id` made, if any, among the channel's latest 200: one
    /// attempt. `Err` when the look-up failed: the post may exist, so the create must not be sent.
    fn find_created(
        &self,
        channel_id: &str,
        pending_post_id: &str,
    ) -> Result<Option<Vec<u8>>, Attempt> {
        let path = format!(
            "/channels/{}/posts?page=0&per_page=200",
            percent_encode(channel_id)
        );
        let bytes = self.attempt("GET", &path, Body::None, MAX_JSON_BYTES)?;
        // Up to 200 whole posts: only their props are read, so that 50 workers looking at once
        // after an outage do not each hold the page as a tree of values.
        let probe: PendingProbe = serde_json::from_slice(&bytes).unwrap_or_default();
        let made_here = |post: &PostProbe| {
            post.props
                .as_ref()
                .and_then(|props| props.pending_post_id.as_ref())
                .is_some_and(|id| id.as_str() == Some(pending_post_id))
        };
        if !probe.posts.values().any(made_here) {
            return Ok(None);
        }
        let list: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let Some(post) = list["posts"].as_object().and_then(|posts| {
            posts
                .values()
                .find(|p| p["props"][PENDING_PROP] == pending_post_id)
        }) else {
            return Ok(None);
        };
        crate::info!(
            "a post whose create had no answer was found ({}); not posting it again",
            post["id"].as_str().unwrap_or_default()
        );
        Ok(serde_json::to_vec(post).ok())
    }

    pub fn patch_post(&self, post_id: &str, message: &str) -> Result<Post, MmError> {
        self.call_json(
            "PUT",
            &format!("/posts/{}/patch", percent_encode(post_id)),
            Some(&json!({"message": message})),
        )
    }

    pub fn delete_post(&self, post_id: &str) -> Result<(), MmError> {
        self.call(
            "DELETE",
            &format!("/posts/{}", percent_encode(post_id)),
            None,
        )
        .map(drop)
    }

    pub fn get_post(&self, post_id: &str) -> Result<Post, MmError> {
        self.get_json(&format!("/posts/{}", percent_encode(post_id)))
    }

    /// Every post of a channel created after `after_post_id`, oldest first, thread replies included
    /// (they are channel posts too). Pages with `after=<newest seen>` (at most 200 a page) until a
    /// page comes back short, so posts created while paging are picked up too. `since=` is not used:
    /// it is known to miss posts. Deleted posts are not listed; a deleted anchor still works.
    pub fn posts_after(
        &self,
        channel_id: &str,
        after_post_id: &str,
        per_page: u32,
    ) -> Result<Vec<Post>, MmError> {
        let mut posts: Vec<Post> = Vec::new();
        self.posts_after_pages(channel_id, after_post_id, per_page, |page| {
            posts.extend(page);
            true
        })?;
        Ok(posts)
    }

    /// `posts_after`, one page at a time (oldest first), so a caller need not hold them all: `page`
    /// returns false to stop early. Only the current page is in memory.
    pub fn posts_after_pages(
        &self,
        channel_id: &str,
        after_post_id: &str,
        per_page: u32,
        mut page: impl FnMut(Vec<Post>) -> bool,
    ) -> Result<(), MmError> {
        let per_page = per_page.clamp(1, MAX_PER_PAGE);
        let mut cursor = after_post_id.to_string();
        loop {
            let path = format!(
                "/channels/{}/posts?after={}&per_page={per_page}",
                percent_encode(channel_id),
                percent_encode(&cursor)
            );
            let list: PostList = self.get_json(&path)?;
            let posts = list.oldest_first();
            let full = posts.len() >= per_page as usize;
            let newest = posts.last().map(|post| post.id.clone());
            if !posts.is_empty() && !page(posts) {
                return Ok(());
            }
            match newest {
                // A server that ignored `after` would repeat the same page forever.
                Some(newest) if full && newest != cursor => cursor = newest,
                _ => return Ok(()),
            }
        }
    }

    /// The newest post of a channel (a reply or a root), to start a catch-up cursor from; `None` for
    /// an empty channel.
    pub fn latest_post(&self, channel_id: &str) -> Result<Option<Post>, MmError> {
        let path = format!(
            "/channels/{}/posts?page=0&per_page=1",
            percent_encode(channel_id)
        );
        let list: PostList = self.get_json(&path)?;
        Ok(list.oldest_first().pop())
    }

    /// A file's name, size and type (`GET /files/{id}/info`).
    pub fn file_info(&self, file_id: &str) -> Result<FileInfo, MmError> {
        self.get_json(&format!("/files/{}/info", percent_encode(file_id)))
    }

    /// A file's bytes (`GET /files/{id}`). Refuses, without reading further, a file larger than
    /// `max_bytes`.
    pub fn download_file(&self, file_id: &str, max_bytes: u64) -> Result<Vec<u8>, MmError> {
        let path = format!("/files/{}", percent_encode(file_id));
        self.call_bytes("GET", &path, Body::None, max_bytes)
            .map_err(|error| match error {
                MmError::TooLarge { limit, .. } => MmError::TooLarge {
                    what: format!("file {file_id}"),
                    limit,
                },
                other => other,
            })
    }

    /// Uploads one file into a channel (`POST /files`), to attach to a post with
    /// `create_post_with_files`.
    pub fn upload_file(
        &self,
        channel_id: &str,
        filename: &str,
        bytes: &[u8],
    ) -> Result<FileInfo, MmError> {
        let boundary = multipart_boundary(bytes);
        let body = multipart_body(&boundary, channel_id, filename, bytes);
        let text = self.call_body(
            "POST",
            "/files",
            Body::Multipart {
                boundary: &boundary,
                bytes: &body,
            },
        )?;
        let uploaded: UploadAnswer = serde_json::from_str(&text)
            .map_err(|e| MmError::Decode(format!("POST /files: {e}")))?;
        uploaded.file_infos.into_iter().next().ok_or_else(|| {
            MmError::Decode("POST /files answered without a file_infos entry".into())
        })
    }

    /// Creates a post with uploaded files attached; `root_id` empty for a root post.
    pub fn create_post_with_files(
        &self,
        channel_id: &str,
        root_id: &str,
        message: &str,
        file_ids: &[String],
    ) -> Result<Post, MmError> {
        let body = json!({
            "channel_id": channel_id,
            "root_id": root_id,
            "message": message,
            "file_ids": file_ids,
        });
        self.create(body, None)
    }

    /// Reacts to a post as `user_id` (the bot itself: a user can only react as themselves).
    pub fn add_reaction(
        &self,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<(), MmError> {
        let body = json!({"user_id": user_id, "post_id": post_id, "emoji_name": emoji_name});
        self.call("POST", "/reactions", Some(&body)).map(drop)
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, MmError> {
        self.call_json("GET", path, None)
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, MmError> {
        let text = self.call(method, path, body)?;
        serde_json::from_str(&text).map_err(|e| MmError::Decode(format!("{method} {path}: {e}")))
    }

    /// One API call under the shared budget, retried on 429, 5xx and transport failures.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<String, MmError> {
        let json;
        let body = match body {
            Some(value) => {
                json = value.to_string();
                Body::Json(&json)
            }
            None => Body::None,
        };
        self.call_body(method, path, body)
    }

    fn call_body(&self, method: &str, path: &str, body: Body<'_>) -> Result<String, MmError> {
        let bytes = self.call_bytes(method, path, body, MAX_JSON_BYTES)?;
        String::from_utf8(bytes)
            .map_err(|_| MmError::Decode(format!("{method} {path}: the answer is not UTF-8")))
    }

    /// `call` for any body and answer: the answer's bytes, at most `max_bytes` of them.
    fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, MmError> {
        self.call_bytes_recovering(method, path, body, max_bytes, None)
    }

    /// `call_bytes`; after a failure that may have reached the server, `find_done` is asked before
    /// each retry whether the call took effect after all, and its answer is then the call's.
    /// Mattermost's own `pending_post_id` check is no guarantee: it is a bounded cache kept per
    /// server node for 30 s of the server's time, none of which the client can observe.
    fn call_bytes_recovering(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        max_bytes: u64,
        find_done: Option<&dyn Fn() -> Result<Option<Vec<u8>>, Attempt>>,
    ) -> Result<Vec<u8>, MmError> {
        let mut backoff = Backoff::new(self.retry_delays.0, self.retry_delays.1);
        let mut failures = 0;
        // Failures other than 429: only these mean the server is in trouble.
        let mut outage_failures = 0;
        let mut in_outage = false;
        // Whether an attempt may have reached the server (its answer was lost or an error).
        let mut maybe_done = false;
        loop {
            let looked = match find_done {
                Some(find_done) if maybe_done => {
                    self.wait_for_budget()?;
                    find_done()
                }
                _ => Ok(None),
            };
            let result = match looked {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => {
                    self.wait_for_budget()?;
                    self.attempt(method, path, body, max_bytes)
                }
                // Whether the call took effect is unknown: sending it again could do it twice.
                Err(failed) => Err(failed),
            };
            let error = match result {
                Ok(bytes) => {
                    self.recovered(in_outage);
                    return Ok(bytes);
                }
                Err(Attempt::RateLimited(wait)) => {
                    self.count(|s| s.rate_limited += 1);
                    if let Ok(mut budget) = self.shared.rate.0.budget.lock() {
                        budget.pause_until(Instant::now() + wait);
                    }
                    self.shared.rate.0.line_moved.notify_all();
                    crate::debug!("{method} {path}: 429, waiting {wait:?}");
                    MmError::Http {
                        status: 429,
                        id: String::new(),
                        message: "rate limited".into(),
                    }
                }
                Err(Attempt::Failed(error)) => {
                    maybe_done = true;
                    error
                }
                Err(Attempt::NeverSent(error)) => error,
            };
            failures += 1;
            let step = next_step(self.patient, failures, &error);
            if step != Step::GiveUp && self.is_shut_down() {
                return Err(MmError::Stopping);
            }
            match step {
                Step::GiveUp => return Err(error),
                Step::AfterPause => {}
                Step::Backoff => {
                    let delay = backoff.next_delay();
                    crate::debug!("{method} {path}: {error}; retrying in {delay:?}");
                    self.pause(delay)?;
                }
            }
            if error.status() != Some(429) {
                outage_failures += 1;
            }
            if self.patient && !in_outage && outage_failures >= MAX_ATTEMPTS {
                in_outage = true;
                self.outage_started(method, path, &error);
            }
            self.count(|s| s.retries += 1);
        }
    }

    /// The first patient call to keep failing logs the outage; the others join it silently.
    fn outage_started(&self, method: &str, path: &str, error: &MmError) {
        let Ok(mut since) = self.shared.outage_since.lock() else {
            return;
        };
        if since.is_none() {
            *since = Some(Instant::now());
            crate::warn!(
                "mattermost keeps failing ({method} {path}: {error}); holding replies and retrying \
                 until it answers again"
            );
        }
    }

    /// A call succeeded: ends the outage (logged once) and counts a patient call that waited it out.
    fn recovered(&self, waited_out_outage: bool) {
        if waited_out_outage {
            self.count(|s| s.outages_waited += 1);
        }
        let ended = match self.shared.outage_since.lock() {
            Ok(mut since) => since.take(),
            Err(_) => None,
        };
        if let Some(started) = ended {
            crate::info!(
                "mattermost answers again after {}s; delivering held replies",
                started.elapsed().as_secs()
            );
        }
    }

    /// Sleeps `total` in short steps; `Err(Stopping)` as soon as `shut_down` is called.
    fn pause(&self, total: Duration) -> Result<(), MmError> {
        if total >= Duration::from_secs(1) {
            // A worker waiting out an outage holds only its turn: what its calls used goes back.
            crate::memory::return_unused_stack();
            crate::memory::return_free_heap();
        }
        let deadline = Instant::now() + total;
        loop {
            if self.is_shut_down() {
                return Err(MmError::Stopping);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(STOP_CHECK));
        }
    }

    /// Waits for a token of the shared budget (a 429 pauses it for everyone), in line by this
    /// client's class. An intermediate edit does not wait: `Err(Deferred)` when the budget is
    /// short. After `shut_down` it does not wait: the last calls of a stopping bridge go out at once.
    fn wait_for_budget(&self) -> Result<(), MmError> {
        if self.is_shut_down() {
            return Ok(());
        }
        let Ok(mut budget) = self.shared.rate.0.budget.lock() else {
            return Ok(());
        };
        if self.priority == Priority::Progress {
            return match budget.try_spare(Instant::now()) {
                true => Ok(()),
                false => Err(MmError::Deferred),
            };
        }
        let ticket = budget.join(self.priority);
        loop {
            if self.is_shut_down() {
                budget.leave(&ticket);
                drop(budget);
                self.shared.rate.0.line_moved.notify_all();
                return Ok(());
            }
            let wait = match budget.poll(&ticket, Instant::now()) {
                Poll::Go => {
                    drop(budget);
                    self.shared.rate.0.line_moved.notify_all();
                    return Ok(());
                }
                Poll::Wait(wait) => wait.clamp(Duration::from_millis(1), STOP_CHECK),
                Poll::Behind => STOP_CHECK,
            };
            budget = match self.shared.rate.0.line_moved.wait_timeout(budget, wait) {
                Ok((guard, _)) => guard,
                Err(_) => return Ok(()),
            };
        }
    }

    fn attempt(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, Attempt> {
        self.count(|s| s.calls += 1);
        let url = format!("{}/api/v4{}", self.base, path);
        let result = match (method, body) {
            ("GET", _) => deadline(self.agent.get(&url), self.call_timeout)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", _) => deadline(self.agent.delete(&url), self.call_timeout)
                .header("Authorization", &self.authorization)
                .call(),
            (_, body) => {
                let request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                let request = deadline(request, self.call_timeout)
                    .header("Authorization", &self.authorization);
                match body {
                    Body::None => request
                        .header("Content-Type", "application/json")
                        .send(&[][..]),
                    Body::Json(json) => request
                        .header("Content-Type", "application/json")
                        .send(json.as_bytes()),
                    Body::Multipart { boundary, bytes } => request
                        .header(
                            "Content-Type",
                            &format!("multipart/form-data; boundary={boundary}"),
                        )
                        .send(bytes),
                }
            }
        };
        let mut response = result.map_err(|e| {
            let error = MmError::Unreachable(e.to_string());
            if never_sent(&e) {
                Attempt::NeverSent(error)
            } else {
                Attempt::Failed(error)
            }
        })?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .map(str::to_string)
        };
        let limit = header("x-ratelimit-limit").and_then(|v| v.parse().ok());
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.parse().ok());
        let reset = header("x-ratelimit-reset").and_then(|v| v.parse().ok());
        let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
        if let Ok(mut budget) = self.shared.rate.0.budget.lock() {
            budget.observe(limit, remaining, reset, Instant::now());
        }
        if status == 429 {
            // Retry-After is the server's own advice; the reset time is the fallback.
            let wait = retry_after.or(reset).unwrap_or(1).clamp(1, 60);
            return Err(Attempt::RateLimited(Duration::from_secs(wait)));
        }
        if status == 503 {
            // "Unable to handle the request" (RFC 9110): Mattermost's busy answer and a proxy's
            // "no upstream" alike come before any work, so a retry cannot make a second post.
            return Err(Attempt::NeverSent(error_answer(status, &mut response)));
        }
        if !(200..300).contains(&status) {
            return Err(Attempt::Failed(error_answer(status, &mut response)));
        }
        // A declared length over the limit is refused before reading anything.
        let declared = header("content-length").and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_bytes) {
            return Err(Attempt::Failed(too_large(method, path, max_bytes)));
        }
        // ureq fails a read that reaches its limit, even at the body's end: allow one byte more.
        match response
            .body_mut()
            .with_config()
            .limit(max_bytes.saturating_add(1))
            .read_to_vec()
        {
            Ok(bytes) if bytes.len() as u64 > max_bytes => {
                Err(Attempt::Failed(too_large(method, path, max_bytes)))
            }
            Ok(bytes) => Ok(bytes),
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                Err(Attempt::Failed(too_large(method, path, max_bytes)))
            }
            Err(e) => Err(Attempt::Failed(MmError::Unreachable(e.to_string()))),
        }
    }

    fn count(&self, update: impl FnOnce(&mut CallStats)) {
        if let Ok(mut stats) = self.shared.stats.lock() {
            update(&mut stats);
        }
    }
}

/// An open reply in the shared budget, from `MattermostClient::open_stream`; closes when dropped.
pub struct StreamGuard {
    shared: Arc<Shared>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Ok(mut budget) = self.shared.rate.0.budget.lock() {
            budget.stream_closed();
        }
        // Edits may go again; nobody waits on that, but a waiting class-5 call may look sooner.
        self.shared.rate.0.line_moved.notify_all();
    }
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamGuard")
    }
}

/// The error a non-2xx answer carries. Only its start is read: the message is cut to 200 chars.
fn error_answer(status: u16, response: &mut ureq::http::Response<ureq::Body>) -> MmError {
    let mut bytes = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(MAX_ERROR_BYTES)
        .read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |key: &str| {
        error
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut message = field("message");
    if message.is_empty() {
        message = crate::render::truncate_chars(text.trim(), 200);
    }
    MmError::Http {
        status,
        id: field("id"),
        message,
    }
}

enum Attempt {
    RateLimited(Duration),
    Failed(MmError),
    /// The server cannot have acted on it: it failed before the request left (refused, no such
    /// host, no connection in time), or the server answered 503.
    NeverSent(MmError),
}

/// A page of posts as `find_created` reads it: nothing but each post's create marker.
#[derive(Deserialize, Default)]
struct PendingProbe {
    #[serde(default)]
    posts: std::collections::HashMap<String, PostProbe>,
}

#[derive(Deserialize)]
struct PostProbe {
    #[serde(default)]
    props: Option<PropsProbe>,
}

#[derive(Deserialize)]
struct PropsProbe {
    #[serde(rename = "ocmm_pending_post_id", default)]
    pending_post_id: Option<Value>,
}

/// Whether a transport failure happened before any byte of the request reached the server.
fn never_sent(error: &ureq::Error) -> bool {
    use ureq::Timeout;
    match error {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(Timeout::Resolve | Timeout::Connect) => true,
        // A refused connection is a fresh one: a reused one fails otherwise.
        ureq::Error::Io(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// What a call does after its `failures`-th failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    GiveUp,
    /// Retry once the budget allows: a 429 has paused it for the server's `Retry-After`.
    AfterPause,
    /// Retry after the next backoff delay.
    Backoff,
}

/// Pure retry policy: permanent errors fail at once; transient ones are retried `MAX_ATTEMPTS` times,
/// or forever when patient (shutdown ends a patient wait, through `pause` and `wait_for_budget`).
fn next_step(patient: bool, failures: u32, error: &MmError) -> Step {
    if !error.is_retryable() || (!patient && failures >= MAX_ATTEMPTS) {
        Step::GiveUp
    } else if error.status() == Some(429) {
        Step::AfterPause
    } else {
        Step::Backoff
    }
}

/// `request` with its own overall deadline, when one is set.
fn deadline<B>(
    request: ureq::RequestBuilder<B>,
    timeout: Option<Duration>,
) -> ureq::RequestBuilder<B> {
    match timeout {
        Some(timeout) => request.config().timeout_global(Some(timeout)).build(),
        None => request,
    }
}

/// 26 lowercase letters and digits, like a Mattermost id; random enough to tell processes apart.
fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let state = std::collections::hash_map::RandomState::new();
    (0..26u64)
        .map(|i| {
            let mut hasher = state.build_hasher();
            hasher.write_u64(i);
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            ALPHABET[(hasher.finish() % 36) as usize] as char
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Json(&'a str),
    Multipart { boundary: &'a str, bytes: &'a [u8] },
}

/// `GET /channels/{id}/posts`: `order` lists the page's posts newest first; `posts` holds them and,
/// besides, every post of their threads, which are not part of the page.
#[derive(Deserialize, Default)]
struct PostList {
    #[serde(default)]
    order: Vec<String>,
    #[serde(default)]
    posts: std::collections::HashMap<String, Post>,
}

impl PostList {
    /// The page's posts, oldest first; an id in `order` missing from `posts` is skipped.
    fn oldest_first(mut self) -> Vec<Post> {
        let mut page: Vec<Post> = self
            .order
            .iter()
            .filter_map(|id| self.posts.remove(id))
            .collect();
        page.reverse();
        page
    }
}

#[derive(Deserialize)]
struct UploadAnswer {
    #[serde(default)]
    file_infos: Vec<FileInfo>,
}

fn too_large(method: &str, path: &str, limit: u64) -> MmError {
    MmError::TooLarge {
        what: format!("the answer to {method} {path}"),
        limit,
    }
}

/// A `multipart/form-data` body as `POST /files` reads it: `channel_id` first (the server needs it
/// before any file), then the one `files` part.
pub fn multipart_body(boundary: &str, channel_id: &str, filename: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(bytes.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\n{channel_id}\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n",
            quoted_filename(filename)
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A boundary that does not occur in `content`, so the body cannot be misread.
pub fn multipart_boundary(content: &[u8]) -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (0u64..)
        .map(|n| {
            format!(
                "opencode-mattermost-{:016x}",
                seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            )
        })
        .find(|boundary| !contains(content, boundary.as_bytes()))
        .unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The filename as a quoted-string: backslash and quote escaped, line breaks and other controls
/// replaced so the header stays one line.
fn quoted_filename(filename: &str) -> String {
    let mut out = String::with_capacity(filename.len());
    for c in filename.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        "file".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed port refuses before anything is sent; a server that takes the request and hangs up
    /// may have acted on it.
    #[test]
    fn only_a_failure_before_sending_counts_as_never_sent() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_url = format!("http://{}/", closed.local_addr().expect("address"));
        drop(closed);
        let agent = http::agent(Duration::from_secs(5));
        let refused = agent
            .post(&closed_url)
            .send(&b"{}"[..])
            .expect_err("refused");
        assert!(never_sent(&refused), "{refused:?}");

        let hangs_up = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", hangs_up.local_addr().expect("address"));
        let server = std::thread::spawn(move || {
            let (mut stream, _) = hangs_up.accept().expect("accept");
            let mut head = [0u8; 512];
            let _ = stream.read(&mut head);
        });
        let lost = agent.post(&url).send(&b"{}"[..]).expect_err("no answer");
        server.join().expect("server");
        assert!(!never_sent(&lost), "{lost:?}");
    }

    fn split_parts(body: &[u8], boundary: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(body).into_owned();
        text.split(&format!("--{boundary}"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn multipart_body_has_channel_then_file() {
        let body = multipart_body("BOUND", "chan1", "notes.txt", b"hello\r\nworld");
        let expected = "--BOUND\r\nContent-Disposition: form-data; name=\"channel_id\"\r\n\r\nchan1\r\n\
            --BOUND\r\nContent-Disposition: form-data; name=\"files\"; filename=\"notes.txt\"\r\n\
            Content-Type: application/octet-stream\r\n\r\nhello\r\nworld\r\n--BOUND--\r\n";
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    #[test]
    fn multipart_body_keeps_binary_content_intact() {
        let content: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let boundary = multipart_boundary(&content);
        let body = multipart_body(&boundary, "c", "bin", &content);
        let start = body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .and_then(|after_first| {
                body[after_first..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| after_first + i + 4)
            })
            .unwrap();
        let end = body.len() - format!("\r\n--{boundary}--\r\n").len();
        assert_eq!(&body[start..end], &content[..]);
        assert_eq!(
            split_parts(&body, &boundary).len(),
            4,
            "preamble, two parts, closing"
        );
    }

    #[test]
    fn boundary_never_occurs_in_the_content() {
        for _ in 0..50 {
            let first = multipart_boundary(b"");
            // Content that contains the boundary just chosen must get a different one.
            let content = format!("x--{first}y");
            let second = multipart_boundary(content.as_bytes());
            assert!(!content.contains(&second), "{second} in {content}");
            assert!(second.starts_with("opencode-mattermost-"));
        }
    }

    /// A server that answers one request with `response` as raw bytes; its base URL.
    fn serve_once(response: Vec<u8>) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let _ = stream.write_all(&response);
        });
        format!("http://{address}")
    }

    fn chunked(status: &str, body: &[u8]) -> Vec<u8> {
        let mut response =
            format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                .into_bytes();
        for chunk in body.chunks(1000) {
            response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            response.extend_from_slice(chunk);
            response.extend_from_slice(b"\r\n");
        }
        response.extend_from_slice(b"0\r\n\r\n");
        response
    }

    fn client(base: &str) -> MattermostClient {
        MattermostClient::new(base, &Secret::new("test-token".into()))
    }

    #[test]
    fn a_download_without_a_length_stops_at_the_limit() {
        let body = vec![b'z'; 5000];
        let base = serve_once(chunked("200 OK", &body));
        let error = client(&base).download_file("abc", 4999).unwrap_err();
        assert!(
            matches!(&error, MmError::TooLarge { what, limit: 4999 } if what == "file abc"),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        let base = serve_once(chunked("200 OK", &body));
        assert_eq!(client(&base).download_file("abc", 5000).unwrap(), body);
    }

    #[test]
    fn an_error_answer_is_reported_whatever_the_download_limit() {
        let body = br#"{"id":"app.file_info.get.app_error","message":"Unable to find the file.","status_code":404}"#;
        let base = serve_once(chunked("404 Not Found", body));
        let error = client(&base).download_file("abc", 10).unwrap_err();
        assert_eq!(error.status(), Some(404), "{error:?}");
        assert_eq!(
            error.to_string(),
            "mattermost answered 404: Unable to find the file. (app.file_info.get.app_error)"
        );
        // A huge error body is read only in part, and still reported as the error it is.
        let base = serve_once(chunked("403 Forbidden", &vec![b'e'; 300_000]));
        let error = client(&base).file_info("abc").unwrap_err();
        assert_eq!(error.status(), Some(403), "{error:?}");
    }

    #[test]
    fn filenames_cannot_break_the_header() {
        assert_eq!(quoted_filename("a\"b\\c.txt"), "a\\\"b\\\\c.txt");
        assert_eq!(quoted_filename("evil\r\nX-Header: 1"), "evil__X-Header: 1");
        assert_eq!(quoted_filename("résumé 📄.pdf"), "résumé 📄.pdf");
        assert_eq!(quoted_filename(""), "file");
        let body = multipart_body("B", "c", "x\"\r\n", b"");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("filename=\"x\\\"__\""), "{text}");
    }

    fn http_error(status: u16) -> MmError {
        MmError::Http {
            status,
            id: String::new(),
            message: String::new(),
        }
    }

    #[test]
    fn retry_policy_separates_patient_from_impatient_calls() {
        let unreachable = MmError::Unreachable("refused".into());
        assert_eq!(next_step(false, 1, &unreachable), Step::Backoff);
        assert_eq!(next_step(false, MAX_ATTEMPTS, &unreachable), Step::GiveUp);
        assert_eq!(next_step(true, 10_000, &unreachable), Step::Backoff);
        assert_eq!(next_step(true, 10_000, &http_error(503)), Step::Backoff);
        assert_eq!(next_step(true, 10_000, &http_error(429)), Step::AfterPause);
        assert_eq!(next_step(false, 1, &http_error(429)), Step::AfterPause);
        for permanent in [400, 401, 403, 404, 413] {
            assert_eq!(next_step(true, 1, &http_error(permanent)), Step::GiveUp);
        }
        assert_eq!(next_step(true, 1, &MmError::Stopping), Step::GiveUp);
        assert_eq!(
            next_step(true, 1, &MmError::Decode("bad".into())),
            Step::GiveUp
        );
    }

    #[test]
    fn pending_post_ids_are_unique_and_shaped_like_the_web_clients() {
        let c = client("http://127.0.0.1:9");
        let ids: Vec<String> = (0..1000).map(|_| c.new_pending_post_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // A patient clone draws from the same sequence.
        let patient = c.patient();
        assert!(!ids.contains(&patient.new_pending_post_id()));
        let (prefix, millis) = ids[0].split_once(':').unwrap();
        assert_eq!(prefix.len(), 26);
        assert!(millis.parse::<i64>().unwrap() > 1_600_000_000_000);
    }

    /// Two links on one bot: separate clients, one user id, never the same id.
    #[test]
    fn clients_of_one_bot_never_hand_out_the_same_pending_post_id() {
        let (a, b) = (client("http://127.0.0.1:9"), client("http://127.0.0.1:9"));
        for c in [&a, &b] {
            c.shared.user_id.set("u".repeat(26)).unwrap();
        }
        let ids: Vec<String> = (0..500)
            .flat_map(|_| [a.new_pending_post_id(), b.new_pending_post_id()])
            .collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn shut_down_ends_a_wait_and_every_later_retry() {
        let c = client("http://127.0.0.1:9").patient();
        let other = c.clone();
        let waiter = std::thread::spawn(move || other.pause(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        c.shut_down();
        assert!(matches!(waiter.join().unwrap(), Err(MmError::Stopping)));
        // One attempt (nothing listens on port 9), then no retry.
        let error = c.me().unwrap_err();
        assert!(matches!(error, MmError::Stopping), "{error:?}");
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("stopping"));
    }

    #[test]
    fn post_lists_come_out_oldest_first_without_thread_extras() {
        let list: PostList = serde_json::from_value(json!({
            "order": ["c", "b", "a"],
            "posts": {
                "a": {"id": "a", "create_at": 1},
                "b": {"id": "b", "create_at": 2, "root_id": "root"},
                "c": {"id": "c", "create_at": 3},
                "root": {"id": "root", "create_at": 0}
            },
            "next_post_id": "",
            "prev_post_id": "x"
        }))
        .unwrap();
        let ids: Vec<String> = list.oldest_first().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let empty: PostList = serde_json::from_str(r#"{"order":[],"posts":{}}"#).unwrap();
        assert!(empty.oldest_first().is_empty());
    }
}
