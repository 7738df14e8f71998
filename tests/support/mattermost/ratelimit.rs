//! The GCRA limiter Mattermost uses (throttled v2), so the headers and the 429 match the capture:
//! limit = burst + 1, remaining counts down from burst, reset is the ceiling of the wait until the
//! bucket is full again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::RateLimit;

pub(super) struct Limiter {
    emission: u128,
    tolerance: u128,
    limit: u32,
    origin: Instant,
    theoretical_arrival: HashMap<String, u128>,
}

pub(super) struct Decision {
    pub(super) limited: bool,
    pub(super) limit: u32,
    pub(super) remaining: u32,
    pub(super) reset_secs: u64,
    pub(super) retry_after_secs: u64,
}

impl Limiter {
    pub(super) fn new(config: &RateLimit) -> Limiter {
        let emission =
            (Duration::from_secs(1).as_nanos() / u128::from(config.per_second.max(1))).max(1);
        Limiter {
            emission,
            tolerance: emission * (u128::from(config.burst) + 1),
            limit: config.burst.saturating_add(1),
            origin: Instant::now(),
            theoretical_arrival: HashMap::new(),
        }
    }

    /// Counts one request for `key` at `now`, the way throttled's `GCRARateLimiter.RateLimit` does.
    pub(super) fn check(&mut self, key: &str, now: Instant) -> Decision {
        let now = now.saturating_duration_since(self.origin).as_nanos();
        let tat = match self.theoretical_arrival.get(key) {
            Some(&tat) => tat,
            None => now,
        };
        let new_tat = tat.max(now) + self.emission;
        let allow_at = new_tat.saturating_sub(self.tolerance);
        let (limited, ttl, retry_after) = if new_tat > self.tolerance && now < allow_at {
            (true, tat.saturating_sub(now), allow_at - now)
        } else {
            self.theoretical_arrival.insert(key.to_owned(), new_tat);
            (false, new_tat - now, 0)
        };
        let next = self.tolerance as i128 - ttl as i128;
        let remaining = if next > 0 {
            u32::try_from(next / self.emission as i128).unwrap_or(u32::MAX)
        } else {
            0
        };
        Decision {
            limited,
            limit: self.limit,
            remaining,
            reset_secs: ceil_secs(ttl),
            retry_after_secs: ceil_secs(retry_after),
        }
    }
}

fn ceil_secs(nanos: u128) -> u64 {
    u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}
