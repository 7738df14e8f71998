//! The Mattermost REST client. Every outbound call of one Mattermost connection goes through
//! `MattermostClient::call`, which spends from one shared rate budget, learns the server's limit from its
//! `X-Ratelimit-*` headers, honours 429s and retries transient failures.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Post, User};
use crate::config::Secret;
use crate::http::{self, Backoff, percent_encode};
use crate::ratelimit::TokenBucket;

/// Mattermost's default rate limit: 10 requests a second with a burst of 100.
const DEFAULT_PER_SECOND: f64 = 10.0;
const DEFAULT_BURST: f64 = 100.0;
const MAX_ATTEMPTS: u32 = 6;

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
}

impl MmError {
    pub fn is_retryable(&self) -> bool {
        match self {
            MmError::Unreachable(_) => true,
            MmError::Http { status, .. } => *status == 429 || *status >= 500,
            MmError::Decode(_) => false,
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
        }
    }
}

/// Counts of what this client did, for the logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallStats {
    pub calls: u64,
    pub rate_limited: u64,
    pub retries: u64,
}

pub struct MattermostClient {
    base: String,
    authorization: String,
    agent: ureq::Agent,
    budget: Mutex<TokenBucket>,
    stats: Mutex<CallStats>,
}

impl MattermostClient {
    pub fn new(base_url: &str, token: &Secret) -> MattermostClient {
        MattermostClient::with_tls(base_url, token, &http::Tls::default())
    }

    /// `new`, trusting `tls`'s roots for https://.
    pub fn with_tls(base_url: &str, token: &Secret, tls: &http::Tls) -> MattermostClient {
        MattermostClient {
            base: base_url.to_string(),
            authorization: format!("Bearer {}", token.expose()),
            agent: http::agent_with_tls(Duration::from_secs(30), tls),
            budget: Mutex::new(TokenBucket::new(
                DEFAULT_PER_SECOND,
                DEFAULT_BURST,
                Instant::now(),
            )),
            stats: Mutex::new(CallStats::default()),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    pub fn stats(&self) -> CallStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub fn me(&self) -> Result<User, MmError> {
        self.get_json("/users/me")
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
        let mut body = json!({"channel_id": channel_id, "root_id": root_id, "message": message});
        if let Some(props) = props {
            body["props"] = props;
        }
        self.call_json("POST", "/posts", Some(&body))
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
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(8));
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_for_budget();
            let error = match self.attempt(method, path, body) {
                Ok(text) => return Ok(text),
                Err(Attempt::RateLimited(wait)) => {
                    self.count(|s| s.rate_limited += 1);
                    if let Ok(mut budget) = self.budget.lock() {
                        budget.pause_until(Instant::now() + wait);
                    }
                    crate::debug!("{method} {path}: 429, waiting {wait:?}");
                    MmError::Http {
                        status: 429,
                        id: String::new(),
                        message: "rate limited".into(),
                    }
                }
                Err(Attempt::Failed(error)) => error,
            };
            if !error.is_retryable() || attempt >= MAX_ATTEMPTS {
                return Err(error);
            }
            self.count(|s| s.retries += 1);
            if error.status() != Some(429) {
                let delay = backoff.next_delay();
                crate::debug!("{method} {path}: {error}; retrying in {delay:?}");
                std::thread::sleep(delay);
            }
        }
    }

    fn wait_for_budget(&self) {
        loop {
            let wait = match self.budget.lock() {
                Ok(mut budget) => match budget.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                },
                Err(_) => return,
            };
            std::thread::sleep(wait.max(Duration::from_millis(1)));
        }
    }

    fn attempt(&self, method: &str, path: &str, body: Option<&Value>) -> Result<String, Attempt> {
        self.count(|s| s.calls += 1);
        let url = format!("{}/api/v4{}", self.base, path);
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .call(),
            (_, body) => {
                let bytes = body.map(Value::to_string).unwrap_or_default();
                let request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                request
                    .header("Authorization", &self.authorization)
                    .header("Content-Type", "application/json")
                    .send(bytes.as_bytes())
            }
        };
        let mut response =
            result.map_err(|e| Attempt::Failed(MmError::Unreachable(e.to_string())))?;
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
        if let Ok(mut budget) = self.budget.lock() {
            budget.observe(limit, remaining, reset, Instant::now());
        }
        if status == 429 {
            // Retry-After is the server's own advice; the reset time is the fallback.
            let wait = retry_after.or(reset).unwrap_or(1).clamp(1, 60);
            return Err(Attempt::RateLimited(Duration::from_secs(wait)));
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(16 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| Attempt::Failed(MmError::Unreachable(e.to_string())))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
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
        Err(Attempt::Failed(MmError::Http {
            status,
            id: field("id"),
            message,
        }))
    }

    fn count(&self, update: impl FnOnce(&mut CallStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            update(&mut stats);
        }
    }
}

enum Attempt {
    RateLimited(Duration),
    Failed(MmError),
}
