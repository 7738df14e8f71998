//! The board (issue 15): one root post in the main DM that lists every live session with its state,
//! kept current by edits. Pure: the router decides what it shows (`render`), and the board's
//! poster thread uses `Pacer` to edit at most every `MIN_EDIT_INTERVAL`, always with the latest text.
//! One board per link: it is built from one link's sessions only.

use std::time::{Duration, Instant};

/// The board is edited at most this often.
pub const MIN_EDIT_INTERVAL: Duration = Duration::from_secs(5);

/// How long an ended session stays on the board.
pub const ENDED_SHOWN_FOR_MS: u64 = 3600 * 1000;

/// What a session is doing, as the board says it; in the order the board lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BoardState {
    /// A permission request or a question waits for the owner.
    Waiting,
    Working,
    Idle,
    /// Ended within `ENDED_SHOWN_FOR_MS`.
    Ended,
}

impl BoardState {
    fn label(self) -> &'static str {
        match self {
            BoardState::Waiting => "🙋 **waiting for you**",
            BoardState::Working => "⚙️ working",
            BoardState::Idle => "💤 idle",
            BoardState::Ended => "🏁 ended",
        }
    }
}

/// One session's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardEntry {
    pub title: String,
    /// The OpenCode server, as the owner knows it (its host and port).
    pub server: String,
    pub state: BoardState,
    /// Since when it is in this state (ms since epoch).
    pub since_ms: u64,
    /// Its thread's permalink.
    pub permalink: String,
}

/// The board's text at `now_ms`. Durations are coarse (minutes, hours, days), so the text changes
/// only when a state does or about once a minute, and the board is not edited for nothing.
pub fn render(entries: &[BoardEntry], now_ms: u64, prefix: &str) -> String {
    let mut entries: Vec<&BoardEntry> = entries.iter().collect();
    entries.sort_by(|a, b| {
        (a.state, std::cmp::Reverse(a.since_ms), &a.title).cmp(&(
            b.state,
            std::cmp::Reverse(b.since_ms),
            &b.title,
        ))
    });
    let mut text = String::from("📋 **Sessions board**");
    if entries.is_empty() {
        text.push_str("\n\n_No live sessions._");
    }
    for (n, entry) in entries.iter().enumerate() {
        if n == 0 {
            text.push('\n');
        }
        let title = one_line(&entry.title);
        let title = if title.is_empty() { "untitled" } else { &title };
        text.push_str(&format!(
            "\n- {} · [{}]({}) · `{}` · {}",
            entry.state.label(),
            escape_link_text(title),
            entry.permalink,
            entry.server,
            coarse_age(now_ms.saturating_sub(entry.since_ms)),
        ));
    }
    text.push_str(&format!(
        "\n\n_Kept current by the bridge. `{prefix}board off` stops it._"
    ));
    text
}

/// `for 3m`, `for 2h`, `for 4d`; under a minute: `just now`.
fn coarse_age(ms: u64) -> String {
    let minutes = ms / 60_000;
    match minutes {
        0 => "just now".to_string(),
        1..=59 => format!("for {minutes}m"),
        60..=1439 => format!("for {}h", minutes / 60),
        _ => format!("for {}d", minutes / 1440),
    }
}

fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

/// Brackets would end the Markdown link text early.
fn escape_link_text(text: &str) -> String {
    text.replace('[', "(").replace(']', ")")
}

/// When the board's poster may edit next: at most every `MIN_EDIT_INTERVAL`, only a text that
/// differs from what the post shows, and only the latest one (older texts are dropped).
#[derive(Debug, Default)]
pub struct Pacer {
    shown: Option<String>,
    pending: Option<String>,
    last_edit: Option<Instant>,
}

impl Pacer {
    /// The post already shows `text` (it was just created with it).
    pub fn shown(&mut self, text: String, at: Instant) {
        self.shown = Some(text);
        self.last_edit = Some(at);
    }

    /// A newer text to show; replaces any not yet sent.
    pub fn want(&mut self, text: String) {
        self.pending = (self.shown.as_ref() != Some(&text)).then_some(text);
    }

    /// When the pending text may go; None when nothing is pending.
    pub fn due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(
            self.last_edit
                .map_or_else(Instant::now, |t| t + MIN_EDIT_INTERVAL),
        )
    }

    /// The text to send now, if one is pending and due; it counts as shown from `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<String> {
        // Not `due()`: with no edit yet, that is a fresh `Instant::now()`, always after `now`.
        if self.last_edit.is_some_and(|t| t + MIN_EDIT_INTERVAL > now) {
            return None;
        }
        let text = self.pending.take()?;
        self.shown(text.clone(), now);
        Some(text)
    }

    /// A failed edit: the text goes again at the next turn.
    pub fn failed(&mut self, text: String) {
        if self.pending.is_none() {
            self.pending = Some(text);
        }
        self.shown = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str, state: BoardState, since_ms: u64) -> BoardEntry {
        BoardEntry {
            title: title.to_string(),
            server: "127.0.0.1:4096".to_string(),
            state,
            since_ms,
            permalink: format!("https://chat/_redirect/pl/{}", title.len()),
        }
    }

    #[test]
    fn lines_show_state_title_server_age_and_link_waiting_first() {
        let now = 10 * 3600 * 1000;
        let text = render(
            &[
                entry("Idle one", BoardState::Idle, now - 3 * 3600 * 1000),
                entry("Busy [x]", BoardState::Working, now - 90_000),
                entry("Asks", BoardState::Waiting, now - 5_000),
                entry("Gone", BoardState::Ended, now - 120_000),
            ],
            now,
            "!",
        );
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("- ")).collect();
        assert_eq!(
            lines,
            [
                "- 🙋 **waiting for you** · [Asks](https://chat/_redirect/pl/4) · `127.0.0.1:4096` · just now",
                "- ⚙️ working · [Busy (x)](https://chat/_redirect/pl/8) · `127.0.0.1:4096` · for 1m",
                "- 💤 idle · [Idle one](https://chat/_redirect/pl/8) · `127.0.0.1:4096` · for 3h",
                "- 🏁 ended · [Gone](https://chat/_redirect/pl/4) · `127.0.0.1:4096` · for 2m",
            ]
        );
        assert!(text.starts_with("📋 **Sessions board**"), "{text}");
        assert!(text.ends_with("`!board off` stops it._"), "{text}");
        assert!(render(&[], now, "!").contains("No live sessions"));
    }

    #[test]
    fn the_text_changes_only_when_a_state_or_a_whole_minute_does() {
        let since = 1_000_000;
        let entries = [entry("A", BoardState::Working, since)];
        let at = |ms| render(&entries, since + ms, "!");
        assert_eq!(at(1_000), at(59_000));
        assert_ne!(at(59_000), at(61_000));
        assert_eq!(at(61_000), at(119_000));
        assert_eq!(coarse_age(2 * 86_400_000), "for 2d");
    }

    #[test]
    fn the_pacer_sends_the_latest_text_at_most_every_five_seconds() {
        let start = Instant::now();
        let mut fresh = Pacer::default();
        fresh.want("from before a restart".into());
        assert!(fresh.due().is_some());
        assert_eq!(
            fresh.take_due(start).as_deref(),
            Some("from before a restart"),
            "a board taken over edits at once"
        );
        let mut pacer = Pacer::default();
        assert_eq!(pacer.due(), None);
        pacer.shown("a".into(), start);
        pacer.want("a".into());
        assert_eq!(pacer.due(), None, "unchanged text is not sent");
        pacer.want("b".into());
        pacer.want("c".into());
        assert_eq!(pacer.due(), Some(start + MIN_EDIT_INTERVAL));
        assert_eq!(pacer.take_due(start + Duration::from_secs(4)), None);
        let sent_at = start + MIN_EDIT_INTERVAL;
        assert_eq!(
            pacer.take_due(sent_at).as_deref(),
            Some("c"),
            "only the latest"
        );
        assert_eq!(pacer.take_due(sent_at + MIN_EDIT_INTERVAL), None);
        pacer.want("d".into());
        assert_eq!(pacer.due(), Some(sent_at + MIN_EDIT_INTERVAL));
        pacer.failed("d".into());
        assert_eq!(
            pacer.take_due(sent_at + MIN_EDIT_INTERVAL).as_deref(),
            Some("d")
        );
    }
}
