//! A worker's inbox: bounded, and never blocking its sender. While the worker is busy (or stuck on a
//! Mattermost outage), what waits for it is folded: the streamed deltas of a part become one delta, a
//! part's or message's newer update replaces the older one in place (and drops the deltas it
//! supersedes), and a newer poll replaces an older one. Everything else keeps its order. So a stuck
//! worker holds about one copy of each part, not every delta, and past `MAX_STREAM_ENTRIES` further
//! stream events are dropped: the turn's end re-reads the stored messages, and the status poll ends a
//! turn whose idle event was lost. What the owner sent (prompts, commands, reactions) is never dropped.
//!
//! The worker's side closes the inbox when the worker ends or retires, under the same lock that
//! senders take: a message sent after that is handed back, and its sender starts a new worker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::opencode::Event;

use super::SessionMsg;

/// Most stream events (session and subagent events) one inbox holds; enough for every part of a
/// long turn, each folded to one entry.
pub const MAX_STREAM_ENTRIES: usize = 1024;

/// The sending side of a worker's inbox. `send` never blocks the caller (the router).
#[derive(Clone)]
pub struct Inbox {
    shared: Arc<Mutex<Queue>>,
    /// A bounded(1) wake-up: a token already waiting is enough.
    wake: Sender<()>,
}

/// The worker's side. Dropping it closes the inbox.
pub(super) struct Mailbox {
    shared: Arc<Mutex<Queue>>,
    wake: Receiver<()>,
}

/// What a wait for the next message ended with.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Something may be waiting: look.
    Woken,
    Timeout,
    /// Every sender is gone; what is queued is still there to take.
    Disconnected,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<SessionMsg>,
    /// How many of `messages` are stream events (droppable).
    stream_entries: usize,
    /// Stream events dropped since the worker last asked.
    dropped: u64,
    closed: bool,
}

pub(super) fn channel() -> (Inbox, Mailbox) {
    let shared = Arc::new(Mutex::new(Queue::default()));
    let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
    (
        Inbox {
            shared: shared.clone(),
            wake: wake_tx,
        },
        Mailbox {
            shared,
            wake: wake_rx,
        },
    )
}

fn lock(shared: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A panic while holding the lock leaves the queue consistent (every change is one step).
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inbox {
    /// Hands a message to the worker without waiting; gives it back when the worker has exited or
    /// retired.
    #[allow(clippy::result_large_err)] // the message itself, handed back to be sent elsewhere
    pub fn send(&self, message: SessionMsg) -> Result<(), SessionMsg> {
        {
            let mut queue = lock(&self.shared);
            if queue.closed {
                return Err(message);
            }
            queue.push(message);
        }
        // Full: a wake-up is already waiting. Disconnected: the worker is ending and closes the inbox.
        let _ = self.wake.try_send(());
        Ok(())
    }

    /// How many messages wait for the worker (after folding).
    pub fn backlog(&self) -> usize {
        lock(&self.shared).messages.len()
    }
}

impl Mailbox {
    /// The oldest message waiting, if any.
    pub(super) fn pop(&self) -> Option<SessionMsg> {
        lock(&self.shared).pop()
    }

    /// The oldest message waiting, if `wanted` accepts it; otherwise it stays first in line.
    pub(super) fn pop_if(&self, wanted: impl FnOnce(&SessionMsg) -> bool) -> Option<SessionMsg> {
        let mut queue = lock(&self.shared);
        if !wanted(queue.messages.front()?) {
            return None;
        }
        queue.pop()
    }

    /// Waits until something is sent, `deadline` passes, or every sender is gone.
    pub(super) fn wait(&self, deadline: Instant) -> Wait {
        match self.wake.recv_deadline(deadline) {
            Ok(()) => Wait::Woken,
            Err(RecvTimeoutError::Timeout) => Wait::Timeout,
            Err(RecvTimeoutError::Disconnected) => Wait::Disconnected,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        lock(&self.shared).messages.is_empty()
    }

    /// Closes the inbox if nothing waits in it: the worker may then retire, since anything sent
    /// from now on is handed back to its sender. False when a message came in first.
    pub(super) fn close_if_empty(&self) -> bool {
        let mut queue = lock(&self.shared);
        if queue.messages.is_empty() {
            queue.closed = true;
        }
        queue.closed
    }

    /// How many stream events were dropped since the last call.
    pub(super) fn take_dropped(&self) -> u64 {
        std::mem::take(&mut lock(&self.shared).dropped)
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let mut queue = lock(&self.shared);
        queue.closed = true;
        queue.messages.clear();
        queue.stream_entries = 0;
    }
}

impl Queue {
    fn pop(&mut self) -> Option<SessionMsg> {
        let message = self.messages.pop_front()?;
        if is_stream(&message) {
            self.stream_entries -= 1;
        }
        Some(message)
    }

    fn push(&mut self, message: SessionMsg) {
        let Some(message) = self.fold(message) else {
            return;
        };
        if is_stream(&message) {
            if self.stream_entries >= MAX_STREAM_ENTRIES {
                self.dropped += 1;
                return;
            }
            self.stream_entries += 1;
        }
        self.messages.push_back(message);
    }

    /// Folds `message` into what is waiting; returns it when it must still be queued.
    fn fold(&mut self, message: SessionMsg) -> Option<SessionMsg> {
        match message {
            SessionMsg::Event(Event::PartDelta {
                session_id,
                message_id,
                part_id,
                field,
                delta,
            }) => {
                // Every waiting delta of a part comes after its latest waiting update (an update
                // drops the deltas before it), so appending to it keeps the text in order.
                let waiting = self.messages.iter_mut().rev().find_map(|m| match m {
                    SessionMsg::Event(Event::PartDelta {
                        part_id: p,
                        field: f,
                        delta,
                        ..
                    }) if *p == part_id && *f == field => Some(delta),
                    _ => None,
                });
                match waiting {
                    Some(waiting) => {
                        waiting.push_str(&delta);
                        None
                    }
                    None => Some(SessionMsg::Event(Event::PartDelta {
                        session_id,
                        message_id,
                        part_id,
                        field,
                        delta,
                    })),
                }
            }
            SessionMsg::Event(Event::PartUpdated { session_id, part }) => {
                // A part's update carries its whole state: the deltas before it are in it.
                self.remove_where(|m| {
                    matches!(m, SessionMsg::Event(Event::PartDelta { part_id, .. }) if *part_id == part.id)
                });
                let message = SessionMsg::Event(Event::PartUpdated { session_id, part });
                self.replace_in_place(message, |waiting, new| match (waiting, new) {
                    (
                        SessionMsg::Event(Event::PartUpdated { part: a, .. }),
                        SessionMsg::Event(Event::PartUpdated { part: b, .. }),
                    ) => a.id == b.id,
                    _ => false,
                })
            }
            // What a removal removes need not wait; a later update of the same id then comes after it.
            SessionMsg::Event(Event::PartRemoved {
                session_id,
                part_id,
            }) => {
                self.remove_where(|m| match m {
                    SessionMsg::Event(Event::PartUpdated { part, .. }) => part.id == part_id,
                    SessionMsg::Event(Event::PartDelta { part_id: p, .. }) => *p == part_id,
                    _ => false,
                });
                Some(SessionMsg::Event(Event::PartRemoved {
                    session_id,
                    part_id,
                }))
            }
            SessionMsg::Event(Event::MessageRemoved {
                session_id,
                message_id,
            }) => {
                self.remove_where(|m| match m {
                    SessionMsg::Event(Event::MessageUpdated { message, .. }) => {
                        message.id == message_id
                    }
                    SessionMsg::Event(Event::PartUpdated { part, .. }) => {
                        part.message_id == message_id
                    }
                    SessionMsg::Event(Event::PartDelta { message_id: m, .. }) => *m == message_id,
                    _ => false,
                });
                Some(SessionMsg::Event(Event::MessageRemoved {
                    session_id,
                    message_id,
                }))
            }
            message @ SessionMsg::Event(Event::MessageUpdated { .. }) => {
                self.replace_in_place(message, |waiting, new| match (waiting, new) {
                    (
                        SessionMsg::Event(Event::MessageUpdated { message: a, .. }),
                        SessionMsg::Event(Event::MessageUpdated { message: b, .. }),
                    ) => a.id == b.id,
                    _ => false,
                })
            }
            message @ (SessionMsg::Event(Event::SessionUpdated(_))
            | SessionMsg::Event(Event::TodoUpdated { .. })) => {
                // The session's info and its todo list come whole: the newest is all that matters.
                self.replace_in_place(message, |waiting, new| {
                    matches!(
                        (waiting, new),
                        (SessionMsg::Event(a), SessionMsg::Event(b))
                            if std::mem::discriminant(a) == std::mem::discriminant(b)
                    )
                })
            }
            // The worker acts on none of these.
            SessionMsg::Event(Event::Connected | Event::Heartbeat | Event::Other { .. }) => None,
            SessionMsg::Child { event, .. }
                if !crate::turn::child_event_matters(&event)
                    && !super::pending::is_for_owner(&event) =>
            {
                None
            }
            SessionMsg::Child {
                child_id,
                event: Event::PartUpdated { session_id, part },
            } => {
                let message = SessionMsg::Child {
                    child_id,
                    event: Event::PartUpdated { session_id, part },
                };
                self.replace_in_place(message, |waiting, new| match (waiting, new) {
                    (
                        SessionMsg::Child {
                            child_id: a,
                            event: Event::PartUpdated { part: pa, .. },
                        },
                        SessionMsg::Child {
                            child_id: b,
                            event: Event::PartUpdated { part: pb, .. },
                        },
                    ) => a == b && pa.id == pb.id,
                    _ => false,
                })
            }
            message @ SessionMsg::Polled(_) => {
                // A newer poll supersedes an older one, and comes after what was sent before it.
                self.remove_where(|m| matches!(m, SessionMsg::Polled(_)));
                Some(message)
            }
            SessionMsg::CatchUp
                if self
                    .messages
                    .iter()
                    .any(|m| matches!(m, SessionMsg::CatchUp)) =>
            {
                None
            }
            message => Some(message),
        }
    }

    /// Puts `message` in the place of a waiting one `same` matches; returns it when there is none.
    fn replace_in_place(
        &mut self,
        message: SessionMsg,
        same: impl Fn(&SessionMsg, &SessionMsg) -> bool,
    ) -> Option<SessionMsg> {
        match self.messages.iter_mut().find(|m| same(m, &message)) {
            Some(slot) => {
                *slot = message;
                None
            }
            None => Some(message),
        }
    }

    fn remove_where(&mut self, remove: impl Fn(&SessionMsg) -> bool) {
        let mut removed_stream = 0;
        self.messages.retain(|m| {
            let gone = remove(m);
            removed_stream += usize::from(gone && is_stream(m));
            !gone
        });
        self.stream_entries -= removed_stream;
    }
}

/// Stream events may be dropped past the bound; what the owner sent or must answer never is.
fn is_stream(message: &SessionMsg) -> bool {
    match message {
        SessionMsg::Event(event) | SessionMsg::Child { event, .. } => {
            !super::pending::is_for_owner(event)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::{Part, PartBody, Status};
    use std::time::Duration;

    fn delta(part_id: &str, text: &str) -> SessionMsg {
        SessionMsg::Event(Event::PartDelta {
            session_id: "ses".into(),
            message_id: "msg".into(),
            part_id: part_id.into(),
            field: "text".into(),
            delta: text.into(),
        })
    }

    fn updated(part_id: &str, text: &str) -> SessionMsg {
        SessionMsg::Event(Event::PartUpdated {
            session_id: "ses".into(),
            part: Part {
                id: part_id.into(),
                message_id: "msg".into(),
                body: PartBody::Text(text.into()),
            },
        })
    }

    fn prompt(post_id: &str) -> SessionMsg {
        SessionMsg::Prompt {
            post_id: post_id.into(),
            text: post_id.into(),
            file_ids: Vec::new(),
            recovered_since_ms: None,
        }
    }

    /// Each waiting message in a short, comparable form.
    fn drain(mailbox: &Mailbox) -> Vec<String> {
        std::iter::from_fn(|| mailbox.pop())
            .map(|m| match m {
                SessionMsg::Event(Event::PartDelta { part_id, delta, .. }) => {
                    format!("delta {part_id} {delta}")
                }
                SessionMsg::Event(Event::PartUpdated { part, .. }) => match part.body {
                    PartBody::Text(text) => format!("part {} {text}", part.id),
                    _ => unreachable!(),
                },
                SessionMsg::Prompt { post_id, .. } => format!("prompt {post_id}"),
                SessionMsg::Polled(status) => format!("polled {status:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn deltas_of_a_part_fold_into_one_and_everything_else_keeps_its_order() {
        let (inbox, mailbox) = channel();
        for message in [
            prompt("p1"),
            delta("a", "Hel"),
            delta("b", "x"),
            prompt("p2"),
            delta("a", "lo"),
            delta("b", "y"),
            delta("a", "!"),
        ] {
            inbox.send(message).expect("open");
        }
        assert_eq!(inbox.backlog(), 4);
        assert_eq!(
            drain(&mailbox),
            ["prompt p1", "delta a Hello!", "delta b xy", "prompt p2"]
        );
    }

    #[test]
    fn a_full_update_supersedes_the_deltas_before_it_but_not_those_after() {
        let (inbox, mailbox) = channel();
        for message in [
            updated("a", ""),
            prompt("p1"),
            delta("a", "Hel"),
            delta("a", "lo"),
            updated("a", "Hello"),
            delta("a", " there"),
            updated("b", "other"),
        ] {
            inbox.send(message).expect("open");
        }
        // The newer update takes the older one's place; the delta after it stays after it.
        assert_eq!(
            drain(&mailbox),
            [
                "part a Hello",
                "prompt p1",
                "delta a  there",
                "part b other"
            ]
        );
    }

    #[test]
    fn a_part_updated_again_after_its_removal_comes_after_the_removal() {
        let (inbox, mailbox) = channel();
        let removed = || {
            SessionMsg::Event(Event::PartRemoved {
                session_id: "ses".into(),
                part_id: "a".into(),
            })
        };
        for message in [
            updated("a", "old"),
            delta("a", "x"),
            removed(),
            updated("a", "new"),
        ] {
            inbox.send(message).expect("open");
        }
        let drained = drain(&mailbox);
        assert_eq!(drained.len(), 2, "{drained:?}");
        assert!(drained[0].starts_with("Event(PartRemoved"), "{drained:?}");
        assert_eq!(drained[1], "part a new");
    }

    #[test]
    fn a_newer_poll_replaces_an_older_one_at_the_end() {
        let (inbox, mailbox) = channel();
        for message in [
            SessionMsg::Polled(Status::Busy),
            prompt("p1"),
            SessionMsg::Polled(Status::Idle),
        ] {
            inbox.send(message).expect("open");
        }
        assert_eq!(drain(&mailbox), ["prompt p1", "polled Idle"]);
    }

    #[test]
    fn stream_events_past_the_bound_are_dropped_and_counted_but_prompts_never_are() {
        let (inbox, mailbox) = channel();
        for n in 0..MAX_STREAM_ENTRIES + 10 {
            inbox.send(updated(&format!("p{n}"), "text")).expect("open");
            // Folding still works at the bound.
            inbox.send(delta(&format!("p{n}"), "more")).expect("open");
        }
        inbox.send(prompt("owner")).expect("open");
        assert_eq!(inbox.backlog(), MAX_STREAM_ENTRIES + 1);
        assert!(mailbox.take_dropped() >= 10);
        assert_eq!(mailbox.take_dropped(), 0);
        let drained = drain(&mailbox);
        assert_eq!(drained.last().map(String::as_str), Some("prompt owner"));
        // Room again once the worker has taken what waited.
        inbox.send(updated("late", "text")).expect("open");
        assert_eq!(drain(&mailbox), ["part late text"]);
    }

    #[test]
    fn a_message_the_worker_does_not_want_now_stays_first() {
        let (inbox, mailbox) = channel();
        inbox.send(prompt("p1")).expect("open");
        inbox.send(delta("a", "x")).expect("open");
        assert!(mailbox.pop_if(|_| false).is_none());
        assert_eq!(drain(&mailbox), ["prompt p1", "delta a x"]);
    }

    /// Defect 9: a prompt sent while the worker decides to retire is never lost in a retiring worker.
    #[test]
    fn a_worker_retires_only_with_nothing_waiting_and_later_messages_are_handed_back() {
        let (inbox, mailbox) = channel();
        inbox.send(prompt("p1")).expect("open");
        assert!(!mailbox.close_if_empty(), "a message waits: no retiring");
        assert_eq!(drain(&mailbox), ["prompt p1"]);
        assert!(mailbox.close_if_empty());
        match inbox.send(prompt("p2")) {
            Err(SessionMsg::Prompt { post_id, .. }) => assert_eq!(post_id, "p2"),
            other => panic!("the retired worker's inbox took a prompt: {other:?}"),
        }
    }

    #[test]
    fn an_ended_worker_hands_messages_back() {
        let (inbox, mailbox) = channel();
        drop(mailbox);
        assert!(inbox.send(prompt("p1")).is_err());
    }

    #[test]
    fn the_worker_wakes_for_a_message_times_out_without_one_and_sees_the_senders_go() {
        let (inbox, mailbox) = channel();
        let soon = || Instant::now() + Duration::from_millis(20);
        assert_eq!(mailbox.wait(soon()), Wait::Timeout);
        inbox.send(prompt("p1")).expect("open");
        inbox.send(prompt("p2")).expect("open");
        assert_eq!(mailbox.wait(soon()), Wait::Woken);
        drop(inbox);
        // Queued messages outlive their senders.
        assert_eq!(mailbox.wait(soon()), Wait::Disconnected);
        assert!(!mailbox.is_empty());
        assert_eq!(drain(&mailbox), ["prompt p1", "prompt p2"]);
    }
}
