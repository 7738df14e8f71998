//! Who gets the next Mattermost call when the rate budget is short: what the owner waits for goes
//! first. Pure: a function of its state and the `Instant` it is given; `mattermost/rest.rs` wraps it
//! in a Mutex and a Condvar for the calling threads.
//!
//! Calls of classes 1–3 and 5 wait in line, the higher class first and first come, first served
//! within a class. Every worker has at most one call under way, so a FIFO line is fair across
//! sessions: none can pass another twice. An intermediate edit (class 4) never waits: it goes only
//! when nobody of a higher class waits and the bucket keeps enough for what open replies will still
//! need (their final text and completion line); otherwise it is not sent, and the worker sends the
//! reply's newer state later. So a superseded edit is never queued.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ratelimit::TokenBucket;

/// The class of a Mattermost call, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// 1: a post that asks the owner for something (permission, question), a failure notice, and
    /// what answers the owner (commands, the router's notices and look-ups).
    Ask,
    /// 2: the final text of a part, the completion line, the "ended" notice.
    Final,
    /// 3: the first post of a reply; a thread's root post.
    First,
    /// 4: an intermediate edit of a streaming reply: sent only from what is left over.
    Progress,
    /// 5: root-post edits and todo refreshes.
    Background,
}

/// The classes that wait in line, in the order they are served.
const WAITING: [Priority; 4] = [
    Priority::Ask,
    Priority::Final,
    Priority::First,
    Priority::Background,
];

/// Calls an open reply will still make outside class 4: its final text and its completion line.
const RESERVE_PER_STREAM: f64 = 2.0;
/// Mattermost's default rate limit, assumed once the server shows it limits (10 requests a second,
/// bursts of 100); its headers then lower the burst and the tokens to what it says.
pub const SERVER_PER_SECOND: f64 = 10.0;
pub const SERVER_BURST: f64 = 100.0;
/// `OPENCODE_MM_MAX_RPS`'s default.
pub const DEFAULT_MAX_RPS: u32 = 20;

/// A place in line, from [`Scheduler::join`].
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    id: u64,
    line: usize,
}

/// What a waiting call does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// It has its token: go.
    Go,
    /// First in line: the bucket has a token after this long.
    Wait(Duration),
    /// Others are ahead of it: wait until a grant changes the line.
    Behind,
}

#[derive(Debug)]
pub struct Scheduler {
    bucket: TokenBucket,
    /// The server has sent `X-Ratelimit-*` headers: its limit applies instead of the ceiling.
    server_limited: bool,
    lines: [VecDeque<u64>; 4],
    next_id: u64,
    /// Replies of running turns, which will still post their final text and completion line.
    streams: usize,
}

impl Scheduler {
    /// A server not known to limit: at most `max_rps` calls a second, with bursts of as many.
    pub fn new(max_rps: u32, now: Instant) -> Scheduler {
        let rps = f64::from(max_rps.max(1));
        Scheduler {
            bucket: TokenBucket::new(rps, rps, now),
            server_limited: false,
            lines: Default::default(),
            next_id: 0,
            streams: 0,
        }
    }

    /// Takes a place in line for a call of `priority` (any class but `Progress`, which never
    /// waits: see [`Scheduler::try_spare`]).
    pub fn join(&mut self, priority: Priority) -> Ticket {
        let line = WAITING.iter().position(|p| *p == priority).unwrap_or(0);
        self.next_id += 1;
        self.lines[line].push_back(self.next_id);
        Ticket {
            id: self.next_id,
            line,
        }
    }

    /// Whether the ticket's call may go now. Only the first in the first non-empty line takes
    /// tokens; a ticket that goes leaves the line.
    pub fn poll(&mut self, ticket: &Ticket, now: Instant) -> Poll {
        let first = self.lines.iter().find_map(|line| line.front());
        if first != Some(&ticket.id) {
            return Poll::Behind;
        }
        match self.bucket.try_take(now) {
            Ok(()) => {
                self.lines[ticket.line].pop_front();
                Poll::Go
            }
            Err(wait) => Poll::Wait(wait),
        }
    }

    /// A waiting call gave up (the bridge is stopping): it leaves the line.
    pub fn leave(&mut self, ticket: &Ticket) {
        self.lines[ticket.line].retain(|id| *id != ticket.id);
    }

    /// An intermediate edit may go now: nobody of classes 1–3 waits, and the bucket keeps what the
    /// open replies will still need (within its capacity, so that a lone edit can go when the
    /// bucket is full). Takes the token when it answers true.
    pub fn try_spare(&mut self, now: Instant) -> bool {
        if self.lines[..3].iter().any(|line| !line.is_empty()) {
            return false;
        }
        let keep = (self.streams as f64 * RESERVE_PER_STREAM).min(self.bucket.capacity() - 1.0);
        self.bucket.try_take_keeping(keep, now)
    }

    /// A running turn's reply opened (its first post went out) or closed.
    pub fn stream_opened(&mut self) {
        self.streams += 1;
    }

    pub fn stream_closed(&mut self) {
        self.streams = self.streams.saturating_sub(1);
    }

    /// Learns from the server's `X-Ratelimit-*` headers. The first time they come, the server's
    /// limit replaces the ceiling.
    pub fn observe(
        &mut self,
        limit: Option<u32>,
        remaining: Option<u32>,
        reset_secs: Option<u64>,
        now: Instant,
    ) {
        if limit.is_some() && !self.server_limited {
            self.server_limited = true;
            self.bucket.retune(SERVER_PER_SECOND, SERVER_BURST, now);
        }
        self.bucket.observe(limit, remaining, reset_secs, now);
    }

    /// A 429: no call goes before `until`.
    pub fn pause_until(&mut self, until: Instant) {
        self.bucket.pause_until(until);
    }

    /// Whether anyone waits in line.
    pub fn is_idle(&self) -> bool {
        self.lines.iter().all(VecDeque::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A server-limited scheduler (10/s, burst `burst`) with no tokens left.
    fn drained(burst: u32, base: Instant) -> Scheduler {
        let mut s = Scheduler::new(1000, base);
        s.observe(Some(burst + 1), Some(0), None, base);
        s
    }

    /// Runs the line until it is empty, at the bucket's pace; the order the tickets went in.
    fn serve(s: &mut Scheduler, tickets: &[(&str, Ticket)], mut now: Instant) -> Vec<String> {
        let mut order = Vec::new();
        while order.len() < tickets.len() {
            let mut waited = None;
            for (name, ticket) in tickets {
                if order.iter().any(|o| o == name) {
                    continue;
                }
                match s.poll(ticket, now) {
                    Poll::Go => order.push(name.to_string()),
                    Poll::Wait(d) => waited = Some(d),
                    Poll::Behind => {}
                }
            }
            if let Some(d) = waited {
                now += d;
            }
        }
        order
    }

    #[test]
    fn higher_classes_go_first_whatever_the_arrival_order() {
        let base = Instant::now();
        let mut s = drained(10, base);
        let tickets = [
            ("root edit", s.join(Priority::Background)),
            ("first post", s.join(Priority::First)),
            ("final", s.join(Priority::Final)),
            ("permission", s.join(Priority::Ask)),
            ("completion", s.join(Priority::Final)),
        ];
        assert_eq!(
            serve(&mut s, &tickets, base),
            [
                "permission",
                "final",
                "completion",
                "first post",
                "root edit"
            ]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn within_a_class_first_come_first_served() {
        let base = Instant::now();
        let mut s = drained(10, base);
        let tickets: Vec<(&str, Ticket)> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|name| (name, s.join(Priority::Final)))
            .collect();
        assert_eq!(serve(&mut s, &tickets, base), ["a", "b", "c", "d"]);
    }

    #[test]
    fn only_the_first_in_line_waits_for_the_bucket() {
        let base = Instant::now();
        let mut s = drained(10, base);
        let a = s.join(Priority::Final);
        let b = s.join(Priority::Final);
        assert_eq!(s.poll(&b, base), Poll::Behind);
        assert_eq!(s.poll(&a, base), Poll::Wait(ms(100)));
        assert_eq!(s.poll(&a, base + ms(100)), Poll::Go);
        assert_eq!(s.poll(&b, base + ms(100)), Poll::Wait(ms(100)));
        // A later arrival of a higher class goes ahead of b.
        let ask = s.join(Priority::Ask);
        assert_eq!(s.poll(&b, base + ms(200)), Poll::Behind);
        assert_eq!(s.poll(&ask, base + ms(200)), Poll::Go);
    }

    #[test]
    fn a_ticket_that_leaves_lets_the_next_go() {
        let base = Instant::now();
        let mut s = Scheduler::new(20, base);
        let a = s.join(Priority::Ask);
        let b = s.join(Priority::Ask);
        s.leave(&a);
        assert_eq!(s.poll(&b, base), Poll::Go);
        assert!(s.is_idle());
    }

    #[test]
    fn intermediate_edits_never_take_from_a_waiting_higher_class() {
        let base = Instant::now();
        let mut s = Scheduler::new(20, base);
        let first = s.join(Priority::First);
        assert!(!s.try_spare(base));
        assert_eq!(s.poll(&first, base), Poll::Go);
        assert!(s.try_spare(base));
        // A waiting root edit (class 5) does not hold back a class-4 edit.
        let _root = s.join(Priority::Background);
        assert!(s.try_spare(base));
    }

    #[test]
    fn intermediate_edits_leave_what_open_replies_still_need() {
        let base = Instant::now();
        let mut s = Scheduler::new(1000, base);
        s.observe(Some(101), Some(30), None, base);
        for _ in 0..10 {
            s.stream_opened();
        }
        // 30 tokens, 20 kept for 10 replies: 10 edits, then none until the bucket refills.
        let spared = (0..100).take_while(|_| s.try_spare(base)).count();
        assert_eq!(spared, 10);
        assert!(s.try_spare(base + ms(100)));
        assert!(!s.try_spare(base + ms(100)));
        // The finals and completion lines of all ten still go at once.
        let tickets: Vec<Ticket> = (0..20).map(|_| s.join(Priority::Final)).collect();
        for t in &tickets {
            assert_eq!(s.poll(t, base + ms(100)), Poll::Go);
        }
        for _ in 0..10 {
            s.stream_closed();
        }
        assert!(s.try_spare(base + ms(200)));
    }

    #[test]
    fn with_many_open_replies_an_edit_still_goes_when_the_bucket_is_full() {
        let base = Instant::now();
        let mut s = Scheduler::new(20, base);
        for _ in 0..500 {
            s.stream_opened();
        }
        assert!(s.try_spare(base));
        assert!(!s.try_spare(base));
        assert!(s.try_spare(base + ms(50)));
    }

    #[test]
    fn without_headers_the_ceiling_applies_and_headers_replace_it() {
        let base = Instant::now();
        let mut s = Scheduler::new(20, base);
        let go = |s: &mut Scheduler, now| {
            let t = s.join(Priority::Ask);
            let poll = s.poll(&t, now);
            s.leave(&t);
            poll
        };
        for _ in 0..20 {
            assert_eq!(go(&mut s, base), Poll::Go);
        }
        assert_eq!(go(&mut s, base), Poll::Wait(ms(50)));
        // The server announces its limit: its burst (here 50) applies, at 10 a second.
        s.observe(Some(51), Some(50), Some(0), base);
        for _ in 0..50 {
            assert_eq!(go(&mut s, base), Poll::Go);
        }
        assert_eq!(go(&mut s, base), Poll::Wait(ms(100)));
    }

    #[test]
    fn a_pause_holds_every_class() {
        let base = Instant::now();
        let mut s = Scheduler::new(20, base);
        s.pause_until(base + ms(500));
        let t = s.join(Priority::Ask);
        assert_eq!(s.poll(&t, base), Poll::Wait(ms(500)));
        assert!(!s.try_spare(base));
        assert_eq!(s.poll(&t, base + ms(500)), Poll::Go);
    }
}
