//! What a session waits on the owner for: permission requests and questions. Each gets its own post,
//! answered by a reaction on it or by a thread command; the post is then edited to show the answer, and
//! later reactions on it do nothing. Requests answered elsewhere (the TUI) are shown as such.

use crate::asks::{self, DecidedBy};
use crate::command::ReactionMeaning;
use crate::opencode::rest::OcError;
use std::time::{Duration, Instant};

use crate::opencode::{
    Dialect, Event, PermissionReply, PermissionRequest, QuestionRequest, Status,
};

use super::Worker;

/// How soon, and how many times, a session is asked whether a bare v2 rejection halted its turn.
const HALT_CHECK: Duration = Duration::from_millis(500);
const HALT_CHECKS: u8 = 6;

#[derive(Default)]
pub(super) struct Waiting {
    /// Oldest first: `!allow` answers the first.
    permissions: Vec<PendingPermission>,
    questions: Vec<PendingQuestion>,
}

struct PendingPermission {
    request: PermissionRequest,
    /// Empty when the post could not be made; text commands still answer it.
    post_id: String,
}

struct PendingQuestion {
    request: QuestionRequest,
    post_id: String,
    /// The question being asked now; earlier ones are answered in `answers`.
    index: usize,
    answers: Vec<Vec<String>>,
}

impl Waiting {
    pub(super) fn any(&self) -> bool {
        !self.permissions.is_empty() || !self.questions.is_empty()
    }

    pub(super) fn has_question(&self) -> bool {
        !self.questions.is_empty()
    }

    pub(super) fn counts(&self) -> (usize, usize) {
        (self.permissions.len(), self.questions.len())
    }
}

/// Events that ask the owner something, or say it was answered: handled the same for the session's
/// own requests and its subagents'.
pub(super) fn is_for_owner(event: &Event) -> bool {
    matches!(
        event,
        Event::PermissionAsked(_)
            | Event::PermissionReplied { .. }
            | Event::QuestionAsked(_)
            | Event::QuestionReplied { .. }
            | Event::QuestionRejected { .. }
    )
}

impl Worker {
    pub(super) fn on_owner_event(&mut self, event: Event) {
        match event {
            Event::PermissionAsked(request) => self.permission_asked(request),
            Event::PermissionReplied {
                request_id, reply, ..
            } => self.permission_answered_elsewhere(&request_id, reply),
            Event::QuestionAsked(request) => self.question_asked(request),
            Event::QuestionReplied { request_id, .. } => {
                self.question_closed_elsewhere(&request_id, true)
            }
            Event::QuestionRejected { request_id, .. } => {
                self.question_closed_elsewhere(&request_id, false)
            }
            _ => {}
        }
    }

    /// Posts the requests that were already waiting when this worker started (after a restart of the
    /// bridge, or when the session was busy before it had a worker).
    pub(super) fn sync_waiting(&mut self) {
        let directory = self.info.directory.clone();
        match self.opencode.permissions(&directory) {
            Ok(requests) => {
                let ids: Vec<String> = requests.iter().map(|r| r.id.clone()).collect();
                self.forget_permissions_not_in(&ids);
                for request in requests {
                    if request.session_id == self.key.session_id {
                        self.permission_asked(request);
                    }
                }
            }
            Err(e) => crate::debug!("[{}] pending permissions not read: {e}", self.short()),
        }
        match self.opencode.questions(&directory) {
            Ok(requests) => {
                let ids: Vec<String> = requests.iter().map(|r| r.id.clone()).collect();
                let gone: Vec<String> = self
                    .waiting
                    .questions
                    .iter()
                    .filter(|q| !ids.contains(&q.request.id))
                    .map(|q| q.request.id.clone())
                    .collect();
                for id in gone {
                    self.question_closed_elsewhere(&id, true);
                }
                for request in requests {
                    if request.session_id == self.key.session_id {
                        self.question_asked(request);
                    }
                }
            }
            Err(e) => crate::debug!("[{}] pending questions not read: {e}", self.short()),
        }
    }

    /// Requests this thread still shows as waiting that the server no longer has were answered
    /// while the bridge could not see it.
    fn forget_permissions_not_in(&mut self, pending_ids: &[String]) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting.permissions)
            .into_iter()
            .partition(|p| !pending_ids.contains(&p.request.id));
        self.waiting.permissions = kept;
        for pending in gone {
            self.show_no_longer_waiting(&pending);
        }
    }

    fn show_no_longer_waiting(&self, pending: &PendingPermission) {
        let first_line =
            asks::permission_post(&pending.request, &self.info.directory, &self.prefix)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
        self.edit_post(
            &pending.post_id,
            &format!(
                "{first_line}\n\n_This request is no longer waiting; it was answered or withdrawn in OpenCode._"
            ),
        );
    }

    fn permission_asked(&mut self, request: PermissionRequest) {
        if self
            .waiting
            .permissions
            .iter()
            .any(|p| p.request.id == request.id)
        {
            return;
        }
        crate::info!(
            "[{}] permission asked: {} {:?}",
            self.short(),
            request.permission,
            request.patterns
        );
        let text = asks::permission_post(&request, &self.info.directory, &self.prefix);
        let text = self.mention_if(self.notify.asks, &text);
        let post_id = self.post_request(&request.id, &text).unwrap_or_default();
        self.waiting
            .permissions
            .push(PendingPermission { request, post_id });
    }

    /// `!allow`, `!always`, `!deny`: the oldest waiting request.
    pub(super) fn answer_oldest_permission(
        &mut self,
        reply: PermissionReply,
        message: Option<&str>,
    ) {
        if self.waiting.permissions.is_empty() {
            self.post_notice("ℹ️ No permission request is waiting in this session.");
            return;
        }
        self.answer_permission(0, reply, message);
    }

    fn answer_permission(&mut self, index: usize, reply: PermissionReply, message: Option<&str>) {
        let pending = self.waiting.permissions.remove(index);
        let directory = self.info.directory.clone();
        let message = message.map(str::trim).filter(|m| !m.is_empty());
        let v2_reject = reply == PermissionReply::Reject && self.opencode.dialect() == Dialect::V2;
        // v2 (1.18.33) takes a rejection's message but never shows it to the model: it goes into
        // the turn as a steered message of the owner's, sent first so that the step after the
        // rejection reads it.
        let steered = match message {
            Some(message) if v2_reject => Some(self.send_steer(
                &pending.request.id,
                format!(
                    "I rejected the {} request ({}): {message}",
                    pending.request.permission,
                    pending.request.patterns.join(", ")
                ),
            )),
            _ => None,
        };
        match self
            .opencode
            .reply_permission(&pending.request.id, &directory, reply, message)
        {
            Ok(()) => {
                crate::info!("[{}] permission answered: {reply:?}", self.short());
                let text = asks::permission_decided(
                    &pending.request,
                    &directory,
                    reply,
                    DecidedBy::Owner,
                    message,
                );
                self.edit_post(&pending.post_id, &text);
                match steered {
                    Some(Ok(())) => {
                        self.post_notice(
                            "ℹ️ OpenCode's v2 API does not pass a rejection's message to the agent, so your message was sent into the running turn as one of yours.",
                        );
                    }
                    Some(Err(e)) => {
                        self.post_notice(&format!(
                            "⚠️ Rejected, but your message could not be sent to the agent ({e}); send it again with `{}steer`.",
                            self.prefix
                        ));
                    }
                    // A bare rejection halts a v2 turn with no event to say so.
                    None if v2_reject => self.expect_halt(),
                    None => {}
                }
            }
            // Answered or withdrawn meanwhile: OpenCode no longer has it.
            Err(OcError::NotFound(_)) => self.show_no_longer_waiting(&pending),
            Err(e) => {
                crate::warn!("[{}] permission answer not delivered: {e}", self.short());
                self.post_notice(&format!(
                    "⚠️ Your answer could not be sent to OpenCode ({e}). The request is still waiting; answer again."
                ));
                let at = index.min(self.waiting.permissions.len());
                self.waiting.permissions.insert(at, pending);
            }
        }
    }

    /// After a bare v2 rejection: the session is asked soon whether it still runs.
    pub(super) fn expect_halt(&mut self) {
        self.settle.halt_check_at = Some(Instant::now() + HALT_CHECK);
        self.settle.halt_checks_left = HALT_CHECKS;
    }

    /// Ends the turn if the session no longer runs; else asks again a few times (a turn that goes
    /// on ends with its own events).
    pub(super) fn check_halt(&mut self) {
        self.settle.halt_check_at = None;
        if !self.tracker.is_running() {
            return;
        }
        let running = match self.opencode.session_status(&self.info.directory) {
            Ok(statuses) => statuses
                .get(&self.key.session_id)
                .is_some_and(|s| *s != Status::Idle),
            Err(e) => {
                crate::debug!("[{}] status not read: {e}", self.short());
                true
            }
        };
        if running {
            self.settle.halt_checks_left = self.settle.halt_checks_left.saturating_sub(1);
            if self.settle.halt_checks_left > 0 {
                self.settle.halt_check_at = Some(Instant::now() + HALT_CHECK);
            }
            return;
        }
        crate::debug!("[{}] the rejection ended the turn", self.short());
        self.settle.halted = true;
        self.tracker.busy = false;
        self.finish_turn();
    }

    fn permission_answered_elsewhere(&mut self, request_id: &str, reply: PermissionReply) {
        let Some(index) = self
            .waiting
            .permissions
            .iter()
            .position(|p| p.request.id == request_id)
        else {
            return;
        };
        let pending = self.waiting.permissions.remove(index);
        let text = asks::permission_decided(
            &pending.request,
            &self.info.directory,
            reply,
            DecidedBy::Elsewhere,
            None,
        );
        self.edit_post(&pending.post_id, &text);
    }

    fn question_asked(&mut self, request: QuestionRequest) {
        if request.questions.is_empty()
            || self
                .waiting
                .questions
                .iter()
                .any(|q| q.request.id == request.id)
        {
            return;
        }
        crate::info!(
            "[{}] question asked ({} part(s))",
            self.short(),
            request.questions.len()
        );
        let text = asks::question_post(&request, 0, &self.prefix);
        let text = self.mention_if(self.notify.asks, &text);
        // Answers to earlier parts are not kept across a restart, so a request of several questions
        // is asked afresh from its first.
        let post_id = if request.questions.len() == 1 {
            self.post_request(&request.id, &text)
        } else {
            self.post_notice(&text)
        }
        .unwrap_or_default();
        self.waiting.questions.push(PendingQuestion {
            request,
            post_id,
            index: 0,
            answers: Vec::new(),
        });
    }

    /// A plain thread reply while a question waits: a number, a label, or a typed answer.
    pub(super) fn answer_question_text(&mut self, text: &str) {
        let Some(pending) = self.waiting.questions.first() else {
            return;
        };
        let Some(question) = pending.request.questions.get(pending.index) else {
            return;
        };
        match asks::parse_answer(question, text) {
            Ok(labels) => self.record_answer(0, labels),
            Err(problem) => {
                self.post_notice(&format!("❓ {problem}"));
            }
        }
    }

    fn answer_question_choice(&mut self, index: usize, choice: u8) {
        let Some(pending) = self.waiting.questions.get(index) else {
            return;
        };
        let Some(question) = pending.request.questions.get(pending.index) else {
            return;
        };
        let Some(option) = question.options.get(usize::from(choice).saturating_sub(1)) else {
            self.post_notice(&format!(
                "❓ There is no option {choice}; this question has {}.",
                question.options.len()
            ));
            return;
        };
        let labels = vec![option.label.clone()];
        self.record_answer(index, labels);
    }

    /// Shows the answer on the question's post, then asks the next question or sends all answers.
    fn record_answer(&mut self, index: usize, labels: Vec<String>) {
        let Some(pending) = self.waiting.questions.get_mut(index) else {
            return;
        };
        let text = asks::question_answered(&pending.request, pending.index, &labels);
        let post_id = pending.post_id.clone();
        pending.answers.push(labels);
        pending.index += 1;
        let next = (pending.index < pending.request.questions.len())
            .then(|| asks::question_post(&pending.request, pending.index, &self.prefix));
        self.edit_post(&post_id, &text);
        if let Some(next) = next {
            let next = self.mention_if(self.notify.asks, &next);
            let post_id = self.post_notice(&next).unwrap_or_default();
            if let Some(pending) = self.waiting.questions.get_mut(index) {
                pending.post_id = post_id;
            }
            return;
        }
        let pending = self.waiting.questions.remove(index);
        let result = self.opencode.reply_question(
            &pending.request.id,
            &self.info.directory,
            &pending.answers,
        );
        if let Err(e) = result {
            crate::warn!("[{}] question answer not delivered: {e}", self.short());
            self.post_notice(&format!(
                "⚠️ Your answer could not be sent to OpenCode ({e}). If the session still waits, answer in OpenCode."
            ));
        }
    }

    /// `!skip`: declines the oldest waiting question.
    pub(super) fn skip_question(&mut self) {
        if self.waiting.questions.is_empty() {
            self.post_notice("ℹ️ No question is waiting in this session.");
            return;
        }
        let pending = self.waiting.questions.remove(0);
        match self
            .opencode
            .reject_question(&pending.request.id, &self.info.directory)
        {
            Ok(()) => self.edit_post(&pending.post_id, &asks::question_skipped(&pending.request)),
            Err(e) => {
                self.post_notice(&format!(
                    "⚠️ The question could not be declined ({e}); try again."
                ));
                self.waiting.questions.insert(0, pending);
            }
        }
    }

    fn question_closed_elsewhere(&mut self, request_id: &str, answered: bool) {
        let Some(index) = self
            .waiting
            .questions
            .iter()
            .position(|q| q.request.id == request_id)
        else {
            return;
        };
        let pending = self.waiting.questions.remove(index);
        let title = pending
            .request
            .questions
            .get(pending.index)
            .map(|q| q.question.clone())
            .unwrap_or_default();
        let how = if answered {
            "answered in OpenCode"
        } else {
            "declined in OpenCode"
        };
        self.edit_post(&pending.post_id, &format!("❔ {title}\n\n_{how}._"));
    }

    /// A reaction on one of this thread's posts.
    pub(super) fn reaction(&mut self, post_id: &str, meaning: ReactionMeaning) {
        let permission = || {
            self.waiting
                .permissions
                .iter()
                .position(|p| !p.post_id.is_empty() && p.post_id == post_id)
        };
        match meaning {
            ReactionMeaning::Stop => self.stop_run(),
            ReactionMeaning::Allow => {
                if let Some(index) = permission() {
                    self.answer_permission(index, PermissionReply::Once, None);
                }
            }
            ReactionMeaning::Always => {
                if let Some(index) = permission() {
                    self.answer_permission(index, PermissionReply::Always, None);
                }
            }
            ReactionMeaning::Reject => {
                if let Some(index) = permission() {
                    self.answer_permission(index, PermissionReply::Reject, None);
                }
            }
            ReactionMeaning::Choice(choice) => {
                if let Some(index) = self
                    .waiting
                    .questions
                    .iter()
                    .position(|q| !q.post_id.is_empty() && q.post_id == post_id)
                {
                    self.answer_question_choice(index, choice);
                }
            }
            // The router resends the prompt itself.
            ReactionMeaning::Retry => {}
        }
    }

    /// After a stop, OpenCode drops what it was waiting for; the posts say so instead of waiting forever.
    pub(super) fn close_waiting_after_stop(&mut self) {
        let permissions = std::mem::take(&mut self.waiting.permissions);
        for pending in permissions {
            let text = asks::permission_decided(
                &pending.request,
                &self.info.directory,
                PermissionReply::Reject,
                DecidedBy::Owner,
                Some("the run was stopped"),
            );
            self.edit_post(&pending.post_id, &text);
        }
        let questions = std::mem::take(&mut self.waiting.questions);
        for pending in questions {
            self.edit_post(&pending.post_id, &asks::question_skipped(&pending.request));
        }
    }
}
