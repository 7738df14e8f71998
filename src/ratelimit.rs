//! Paces every outbound Mattermost call so the bridge stays under the server's rate limit.
//!
//! Pure: every method is a function of the bucket and the `Instant` it is given, with no IO,
//! threads or sleeping. The caller sleeps for the `Duration` that [`TokenBucket::try_take`]
//! returns.

use std::time::{Duration, Instant};

/// Refills at a steady rate up to a burst size, learns from Mattermost's `X-Ratelimit-*` headers
/// and can be paused after a 429.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    /// The configured burst; the bucket never holds more.
    burst: f64,
    /// The burst the server last told us it allows, never above `burst`.
    capacity: f64,
    /// Tokens available at `updated`.
    tokens: f64,
    updated: Instant,
    paused_until: Option<Instant>,
}

/// The slowest refill and smallest burst accepted, so that a wait is always finite and one token
/// always fits.
const MIN_PER_SECOND: f64 = 0.001;
const MIN_BURST: f64 = 1.0;
/// Absorbs floating-point rounding, so that waiting exactly the returned duration always yields a
/// token.
const EPSILON: f64 = 1e-9;

impl TokenBucket {
    /// A full bucket refilling at `per_second` tokens per second and holding at most `burst`
    /// tokens. Values that are not finite or below 0.001 tokens per second and 1 token of burst are
    /// raised to those minimums.
    pub fn new(per_second: f64, burst: f64, now: Instant) -> TokenBucket {
        let per_second = if per_second.is_finite() {
            per_second.max(MIN_PER_SECOND)
        } else {
            MIN_PER_SECOND
        };
        let burst = if burst.is_finite() {
            burst.max(MIN_BURST)
        } else {
            MIN_BURST
        };
        TokenBucket {
            per_second,
            burst,
            capacity: burst,
            tokens: burst,
            updated: now,
            paused_until: None,
        }
    }

    /// Take one token if available; otherwise return how long to wait before one is.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until - now);
            }
            self.paused_until = None;
        }
        self.refill(now);
        if self.tokens + EPSILON >= 1.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        // Rounded up to whole nanoseconds so the caller never wakes just short of the token.
        let nanos = (missing / self.per_second * 1e9).ceil();
        let wait = Duration::try_from_secs_f64(nanos / 1e9).unwrap_or(Duration::MAX);
        // Time measured from `updated`, which a pause may have put after `now`.
        Err(wait.saturating_add(self.updated.saturating_duration_since(now)))
    }

    /// Learn from the server's headers: `X-Ratelimit-Limit` (burst + 1 on Mattermost),
    /// `X-Ratelimit-Remaining` and `X-Ratelimit-Reset` (seconds). Lowers our tokens to what the
    /// server says remains and our capacity to the server's burst; never raises either above the
    /// configured burst.
    ///
    /// `reset_secs` is the time until the server's bucket is full again. Our own refill rate
    /// already models that, and Mattermost rounds it to whole seconds, so it is accepted but not
    /// used.
    pub fn observe(
        &mut self,
        limit: Option<u32>,
        remaining: Option<u32>,
        reset_secs: Option<u64>,
        now: Instant,
    ) {
        let _ = reset_secs;
        self.refill(now);
        if let Some(limit) = limit {
            let server_burst = f64::from(limit.saturating_sub(1)).max(MIN_BURST);
            self.capacity = server_burst.min(self.burst);
            self.tokens = self.tokens.min(self.capacity);
        }
        if let Some(remaining) = remaining {
            // When a pause has moved `updated` past `now`, what remains now will have refilled by
            // then.
            let ahead = self.updated.saturating_duration_since(now).as_secs_f64();
            let remaining_at_updated = f64::from(remaining) + ahead * self.per_second;
            self.tokens = self.tokens.min(remaining_at_updated);
        }
    }

    /// A 429 happened: no tokens until `until`. One request may go at `until`; after that the
    /// normal rate applies.
    pub fn pause_until(&mut self, until: Instant) {
        if self.paused_until.is_some_and(|paused| paused >= until) {
            return;
        }
        self.paused_until = Some(until);
        if until > self.updated {
            self.updated = until;
        }
        self.tokens = 1.0;
    }

    /// The most tokens the bucket holds now: the configured burst, or the server's if smaller.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Take one token only if at least `keep` tokens are left after it; never waits. For calls that
    /// may use only what others will not need.
    pub fn try_take_keeping(&mut self, keep: f64, now: Instant) -> bool {
        if self.paused_until.is_some_and(|until| now < until) {
            return false;
        }
        self.refill(now);
        if self.tokens + EPSILON >= 1.0 + keep.max(0.0) {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return true;
        }
        false
    }

    /// Another rate and burst (the server turned out to announce its limit): full at the new burst,
    /// which `observe` then lowers to what the server says remains. A pause stands.
    pub fn retune(&mut self, per_second: f64, burst: f64, now: Instant) {
        let fresh = TokenBucket::new(per_second, burst, now);
        self.refill(now);
        self.per_second = fresh.per_second;
        self.burst = fresh.burst;
        self.capacity = fresh.burst;
        self.tokens = fresh.burst;
    }

    /// Adds the tokens earned since `updated`. Instants older than `updated` change nothing.
    fn refill(&mut self, now: Instant) {
        if now <= self.updated {
            return;
        }
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Takes until the bucket refuses and returns how many were granted and the wait it asked for.
    fn drain(bucket: &mut TokenBucket, now: Instant) -> (usize, Duration) {
        for taken in 0..10_000 {
            if let Err(wait) = bucket.try_take(now) {
                return (taken, wait);
            }
        }
        panic!("bucket never ran dry");
    }

    #[test]
    fn starts_full_then_refills_at_the_rate() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        assert_eq!(drain(&mut bucket, base), (100, ms(100)));
        assert_eq!(bucket.try_take(base + ms(40)), Err(ms(60)));
        assert_eq!(bucket.try_take(base + ms(100)), Ok(()));
        assert_eq!(bucket.try_take(base + ms(100)), Err(ms(100)));
        // One second later ten tokens have come back.
        assert_eq!(drain(&mut bucket, base + ms(1100)), (10, ms(100)));
    }

    #[test]
    fn waiting_exactly_the_returned_duration_always_yields_a_token() {
        let base = Instant::now();
        for rate in [3.0, 7.0, 10.0, 0.3, 1234.5] {
            let mut bucket = TokenBucket::new(rate, 1.0, base);
            let mut now = base;
            for _ in 0..1000 {
                match bucket.try_take(now) {
                    Ok(()) => {}
                    Err(wait) => {
                        now += wait;
                        assert_eq!(bucket.try_take(now), Ok(()), "rate {rate}");
                    }
                }
            }
        }
    }

    #[test]
    fn never_holds_more_than_the_burst() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5.0, base);
        assert_eq!(drain(&mut bucket, base + Duration::from_secs(3600)).0, 5);
    }

    #[test]
    fn older_instants_do_not_add_tokens() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 1.0, base + ms(500));
        assert_eq!(bucket.try_take(base + ms(500)), Ok(()));
        // The next token comes 100 ms after the latest instant seen, not after the older one.
        assert_eq!(bucket.try_take(base), Err(ms(600)));
        assert_eq!(bucket.try_take(base + ms(600)), Ok(()));
    }

    #[test]
    fn observe_lowers_tokens_to_what_remains() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        bucket.observe(Some(101), Some(2), Some(10), base);
        assert_eq!(drain(&mut bucket, base), (2, ms(100)));
    }

    #[test]
    fn observe_never_raises_tokens() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        drain(&mut bucket, base);
        bucket.observe(Some(101), Some(100), Some(0), base);
        assert_eq!(bucket.try_take(base), Err(ms(100)));
    }

    #[test]
    fn observe_learns_a_smaller_server_burst_but_never_a_larger_one() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        bucket.observe(Some(11), None, None, base);
        assert_eq!(drain(&mut bucket, base + Duration::from_secs(60)).0, 10);
        bucket.observe(Some(1001), None, None, base + Duration::from_secs(60));
        assert_eq!(drain(&mut bucket, base + Duration::from_secs(120)).0, 100);
    }

    #[test]
    fn observe_with_no_headers_changes_nothing() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0, base);
        bucket.observe(None, None, None, base);
        assert_eq!(drain(&mut bucket, base).0, 3);
    }

    #[test]
    fn pause_blocks_until_its_end_then_lets_one_through() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        bucket.pause_until(base + Duration::from_secs(2));
        assert_eq!(bucket.try_take(base), Err(Duration::from_secs(2)));
        assert_eq!(bucket.try_take(base + ms(1500)), Err(ms(500)));
        assert_eq!(bucket.try_take(base + Duration::from_secs(2)), Ok(()));
        assert_eq!(bucket.try_take(base + Duration::from_secs(2)), Err(ms(100)));
        assert_eq!(bucket.try_take(base + ms(2100)), Ok(()));
    }

    #[test]
    fn an_earlier_pause_does_not_shorten_a_later_one() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        bucket.pause_until(base + Duration::from_secs(5));
        bucket.pause_until(base + Duration::from_secs(1));
        assert_eq!(
            bucket.try_take(base + Duration::from_secs(1)),
            Err(Duration::from_secs(4))
        );
    }

    #[test]
    fn observe_during_a_pause_keeps_the_pause() {
        let base = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 100.0, base);
        bucket.pause_until(base + ms(300));
        bucket.observe(Some(101), Some(0), Some(10), base + ms(100));
        assert_eq!(bucket.try_take(base + ms(100)), Err(ms(200)));
        // Remaining 0 was older news than the pause end, so the one token at the end still stands.
        assert_eq!(bucket.try_take(base + ms(299)), Err(ms(1)));
        assert_eq!(bucket.try_take(base + ms(300)), Ok(()));
    }

    #[test]
    fn nonsense_settings_do_not_panic_and_give_finite_waits() {
        let base = Instant::now();
        for (rate, burst) in [
            (0.0, 0.0),
            (-1.0, -5.0),
            (f64::NAN, f64::NAN),
            (f64::INFINITY, f64::INFINITY),
        ] {
            let mut bucket = TokenBucket::new(rate, burst, base);
            let (_, wait) = drain(&mut bucket, base);
            assert!(
                wait <= Duration::from_secs(1000),
                "rate {rate} burst {burst}: {wait:?}"
            );
            bucket.observe(Some(0), Some(0), Some(u64::MAX), base);
            bucket.observe(Some(u32::MAX), Some(u32::MAX), None, base);
        }
    }
}
