//! Catching up after a (re)connect: the DM's posts the websocket did not deliver, a page at a time,
//! and the prompts owed from before a restart.

use super::*;

impl Router {
    /// Asks for the owner-DM posts after the cursor that the websocket did not deliver: sent while
    /// the bridge was down, or during a gap the server could not replay. They come back a page at
    /// a time (`on_posts`).
    pub(super) fn catch_up_posts(&mut self) {
        let cursor = self.registry.cursor().clone();
        if cursor.last_post_id.is_empty() && cursor.last_post_at == 0 {
            // First start on this state: nothing before now is owed an answer.
            self.lookup(Lookup::LatestPost);
            return;
        }
        self.catch_ups += 1;
        self.lookup(Lookup::PostsAfter { cursor });
    }

    pub(super) fn on_latest_post(&mut self, latest: Result<Option<Post>, String>) {
        let cursor = self.registry.cursor();
        if !cursor.last_post_id.is_empty() || cursor.last_post_at != 0 {
            // A post handled meanwhile set it already.
            return;
        }
        match latest {
            Ok(latest) => {
                let (id, at) = latest.map_or_else(
                    || (String::new(), crate::log::now_ms() as i64),
                    |p| (p.id, p.create_at),
                );
                self.registry.set_cursor(crate::store::MattermostCursor {
                    last_post_id: id,
                    last_post_at: at,
                });
            }
            Err(e) => crate::warn!("cannot read the DM's latest post: {e}"),
        }
    }

    /// One page of a catch-up. Prompts older than `catchup_max_age` are not run; when the catch-up
    /// ends, the owner gets one notice listing them.
    pub(super) fn on_posts(&mut self, posts: Vec<Post>, last: bool, error: Option<String>) {
        let dm = self.identity.dm_channel_id.clone();
        let oldest_runnable =
            crate::log::now_ms().saturating_sub(self.catchup_max_age.as_millis() as u64) as i64;
        // Every post up to the newest is handled (the bot's own by ignoring them), so the cursor may
        // pass them all and the next catch-up pages through less.
        let newest = posts.last().cloned();
        for post in posts {
            let from_owner = post.user_id == self.identity.owner_user_id
                && post.channel_id == dm
                && post.post_type.is_empty();
            if from_owner && post.create_at < oldest_runnable {
                if self.seen_posts.insert(&post.id) {
                    self.advance_cursor(&post);
                    self.too_old_count += 1;
                    if self.too_old.len() < MAX_LISTED_TOO_OLD {
                        let line = self.too_old_line(&post);
                        self.too_old.push(line);
                    }
                }
                continue;
            }
            if from_owner && !self.seen_posts.contains(&post.id) {
                self.caught_up += 1;
            }
            self.on_post(post);
        }
        if let Some(newest) = newest {
            self.advance_cursor(&newest);
        }
        self.registry.save_now();
        if !last {
            return;
        }
        if let Some(e) = error {
            crate::warn!("cannot catch up on the DM's posts: {e}; retrying at the next reconnect");
        }
        let handled = std::mem::take(&mut self.caught_up);
        if handled > 0 {
            crate::info!("caught up on {handled} post(s) the websocket did not deliver");
        }
        let too_old = std::mem::take(&mut self.too_old);
        let count = std::mem::take(&mut self.too_old_count);
        if count > 0 {
            self.report_too_old(count, &too_old);
        }
        self.catch_up_done();
    }

    /// The websocket's posts held during the catch-up go on, in order.
    pub(super) fn catch_up_done(&mut self) {
        self.catch_ups = self.catch_ups.saturating_sub(1);
        if self.catch_ups == 0 {
            while let Some(post) = self.held_posts.pop_front() {
                self.on_post(post);
            }
        }
    }

    /// One line of the too-old notice; only this much of the post is kept until the catch-up ends.
    fn too_old_line(&self, post: &Post) -> String {
        let first_line = truncate_chars(post.message.lines().next().unwrap_or(""), 80);
        format!(
            "- {} · [open]({}) · {first_line}",
            crate::log::utc_minute(post.create_at.max(0) as u64),
            self.permalink(&post.id)
        )
    }

    pub(super) fn report_too_old(&mut self, count: usize, lines: &[String]) {
        let mut lines = lines.join("\n");
        if count > MAX_LISTED_TOO_OLD {
            lines.push_str(&format!("\n- …and {} more", count - MAX_LISTED_TOO_OLD));
        }
        self.reply(
            "",
            &format!(
                "⏸️ {} message(s) sent while opencode-mattermost was away are older than {} and were not run \
                 (OPENCODE_MM_CATCHUP_MAX_AGE). Send them again if they still matter:\n{}",
                count,
                crate::render::format_duration(self.catchup_max_age.as_millis() as u64),
                lines
            ),
        );
    }

    /// Prompts owed from before a restart go to their sessions again, oldest first (each read back
    /// by a look-up, answered in order); a worker skips one that OpenCode already has.
    pub(super) fn recover_owed_prompts(&mut self) {
        for (post_id, key, owed_at_ms) in self.registry.owed_prompts() {
            self.lookup(Lookup::OwedPrompt {
                key,
                post_id,
                owed_at_ms,
            });
        }
    }

    /// Owner posts an earlier run took on but had not resolved (their thread was being looked up)
    /// are read again, before the catch-up, and handled as if they had just arrived.
    pub(super) fn recover_unresolved_posts(&mut self) {
        for post_id in self.registry.unresolved_posts() {
            self.lookup(Lookup::UnresolvedPost { post_id });
        }
    }

    pub(super) fn on_unresolved_post(&mut self, post_id: &str, post: Result<Option<Post>, String>) {
        match post {
            Ok(Some(post)) if !post.root_id.is_empty() => {
                crate::info!("handling post {post_id}, taken on before the restart");
                self.seen_posts.insert(&post.id);
                match self.registry.session_of_root(&post.root_id) {
                    Some(key) => {
                        self.registry.resolve_post(post_id);
                        self.reply_in_thread(key, post);
                        self.registry.save_now();
                    }
                    None => self.lookup(Lookup::ThreadRoot {
                        root_id: post.root_id.clone(),
                        then: Waiting::Reply(post),
                    }),
                }
            }
            Ok(_) => {
                self.registry.resolve_post(post_id);
                self.registry.save_now();
            }
            Err(e) => crate::warn!("post {post_id} not readable yet: {e}"),
        }
    }

    pub(super) fn on_owed_prompt(
        &mut self,
        key: SessionKey,
        post_id: String,
        owed_at_ms: u64,
        post: Result<Option<Post>, String>,
    ) {
        match post {
            Ok(Some(post)) => {
                crate::info!(
                    "[{}] sending prompt {post_id}, owed since before the restart",
                    short_id(&key.session_id)
                );
                self.seen_posts.insert(&post_id);
                if post.root_id.is_empty() {
                    // The first prompt of a `new` command, whose thread may not exist yet.
                    let Some(DmCommand::New {
                        prompt: Some(text), ..
                    }) = command::parse_dm(&post.message, &self.command_prefix)
                    else {
                        self.forget_prompt(&key, &post_id);
                        return;
                    };
                    let first = FirstPrompt {
                        post_id: post.id,
                        text,
                        recovered_since_ms: Some(owed_at_ms),
                    };
                    match self.record(&key).map(|r| r.root_post_id.clone()) {
                        Some(_) => {
                            self.deliver(&key, first.into_message());
                        }
                        None => {
                            self.pending_new.insert(key, Some(first));
                        }
                    }
                    return;
                }
                self.deliver(
                    &key,
                    SessionMsg::Prompt {
                        post_id: post.id,
                        text: post.message,
                        file_ids: post.file_ids.unwrap_or_default(),
                        recovered_since_ms: Some(owed_at_ms),
                    },
                );
            }
            // Deleted by the owner meanwhile: nothing is owed any more.
            Ok(None) => self.forget_prompt(&key, &post_id),
            Err(e) => crate::warn!("owed prompt {post_id} not readable yet: {e}"),
        }
    }
}
