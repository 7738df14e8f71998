//! Turns agent output into Mattermost posts: splitting long text at readable places without breaking code
//! blocks, and short human forms of durations, token counts and costs.

// =========================================================================================================
// Text splitting and formatting helpers. Pure functions of their input; the post renderers follow below.
// =========================================================================================================

/// The largest post Mattermost accepts. It counts runes (chars), not bytes.
pub const MAX_POST_CHARS: usize = 16383;

/// Splits `text` into posts of at most `limit` chars each (a `limit` of 0 counts as 1).
///
/// A post ends at a line end when one fits: after a blank line outside code fences, else at a line end
/// outside fences, else at a line end inside a fence, taking the latest cut of the first of those kinds
/// that fills at least half the post (else of the first kind that has one). Only when no line end fits
/// (a line longer than a post) is a line cut, after whitespace if that fills half the post, else anywhere
/// between two chars.
///
/// A fenced code block (``` or ~~~, 3 or more, with an optional info string; indented fences too) that
/// has to be cut is closed at the end of the post and reopened with the same fence line at the start of
/// the next, and the added lines count toward the limit. Only the last post may end inside a fence, when
/// the text itself does (a reply still streaming). Two cases are split as plain text instead: a fence
/// whose two added lines would take more than half a post, and a fence-like line longer than a post.
///
/// Whitespace at a cut is dropped: posts keep the indentation of their first line but never start with
/// blank lines, never end with whitespace, and are never empty.
///
/// The split is stable: every post but the last of a text's split is also a post of the split of any
/// longer text that starts with the same text, so streamed replies never re-edit earlier posts. To keep
/// that promise, a cut depends only on the text up to the first char that does not fit.
pub fn split_post(text: &str, limit: usize) -> Vec<String> {
    plan_split(text, limit)
        .iter()
        .map(|piece| piece.render(text))
        .collect()
}

/// Shortens `text` to at most `max` chars, ending with "…" when anything was cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.char_indices().nth(max).is_none() {
        return text.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let end = text
        .char_indices()
        .nth(max - 1)
        .map_or(text.len(), |(index, _)| index);
    format!("{}…", text[..end].trim_end())
}

/// A short elapsed time: "0.8s" below 10 seconds, then "12s", "1m 05s" and "2h 03m". Rounds down, so
/// the text never claims more time than has passed.
pub fn format_duration(ms: u64) -> String {
    if ms < 10_000 {
        let tenths = ms / 100;
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let seconds = ms / 1000;
    if seconds < 60 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 60 {
        return format!("{minutes}m {:02}s", seconds % 60);
    }
    format!("{}h {:02}m", minutes / 60, minutes % 60)
}

/// A short token count: "950", "12.3k", "1.2M". Rounds down, so 999 999 is "999.9k", not "1000.0k".
pub fn format_tokens(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    if n < 1_000_000 {
        let tenths = n / 100;
        return format!("{}.{}k", tenths / 10, tenths % 10);
    }
    let tenths = n / 100_000;
    format!("{}.{}M", tenths / 10, tenths % 10)
}

/// A cost in US dollars: two decimals ("$0.25", "$12.40"), or four below half a cent ("$0.0012") so that
/// cheap turns do not show as free.
pub fn format_cost(usd: f64) -> String {
    if !usd.is_finite() {
        return "$?".to_string();
    }
    let sign = if usd < 0.0 { "-" } else { "" };
    let amount = usd.abs();
    if amount == 0.0 {
        "$0.00".to_string()
    } else if amount < 0.000_05 {
        format!("{sign}<$0.0001")
    } else if amount < 0.005 {
        format!("{sign}${amount:.4}")
    } else {
        format!("{sign}${amount:.2}")
    }
}

/// An open fenced code block, as byte positions of its opening line in the text being split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    /// '`' or '~'.
    marker: char,
    /// How many markers open it; a closer needs at least as many.
    len: usize,
    line_start: usize,
    indent_end: usize,
    /// The position of the '\n' that ends the opening line.
    line_end: usize,
    /// Whether the added fence lines take at most half a post. If not (an absurdly long fence line or
    /// a tiny limit) the block is split like plain text, since posts would hold almost nothing else.
    reopenable: bool,
}

/// One post: a slice of the text, maybe with a fence reopened before it and one closed after it.
#[derive(Debug)]
struct Piece {
    start: usize,
    end: usize,
    reopen: Option<Fence>,
    close: Option<Fence>,
    /// How the post was cut from the rest; `None` for the last post. Only tests read it.
    #[cfg_attr(not(test), allow(dead_code))]
    cut: Option<CutKind>,
}

/// A place where a post could end.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// Where the post's slice ends, trailing whitespace excluded.
    end: usize,
    /// Chars of the slice up to `end`.
    kept_chars: usize,
    /// Where scanning resumes (before skipping blank lines).
    next: usize,
    /// The start of the line that contains `next`.
    next_line_start: usize,
    /// The fence open at `next`.
    fence_after: Option<Fence>,
}

/// Kinds of cut in order of preference; the discriminant indexes `best` in `plan_split`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutKind {
    /// After a blank line outside fences.
    Paragraph,
    /// At a line end outside fences.
    Line,
    /// At a line end inside a fence, which is then closed and reopened.
    InsideFence,
    /// Inside a long line, after whitespace.
    Space,
    /// Inside a long line, between two other chars.
    Hard,
    /// Right after a fence's opening line, which leaves an empty code block: only when not even one
    /// char of the block fits after its opening line.
    EmptyFence,
    /// Inside a long line where a half could read as a fence line the whole line is not: before a '`'
    /// or '~', or leaving `~~~~` of `~~~~ py` inside a `~~~~` block. The last resort, for fence-like
    /// lines longer than a post.
    Desperate,
}

const CUT_KINDS: [CutKind; 7] = [
    CutKind::Paragraph,
    CutKind::Line,
    CutKind::InsideFence,
    CutKind::Space,
    CutKind::Hard,
    CutKind::EmptyFence,
    CutKind::Desperate,
];

impl Fence {
    /// The fence opened by the line `text[line_start..line_end]`, if it is an opening fence line.
    /// Indentation is allowed at any depth, since fences inside list items are indented.
    fn open(text: &str, line_start: usize, line_end: usize, limit: usize) -> Option<Fence> {
        let line = &text[line_start..line_end];
        let body = line.trim_start_matches([' ', '\t']);
        let indent = line.len() - body.len();
        let marker = body.chars().next().filter(|&c| c == '`' || c == '~')?;
        let len = body.len() - body.trim_start_matches(marker).len();
        if len < 3 || (marker == '`' && body[len..].contains('`')) {
            return None;
        }
        let mut fence = Fence {
            marker,
            len,
            line_start,
            indent_end: line_start + indent,
            line_end,
            reopenable: false,
        };
        let opener_chars = line.trim_end().chars().count();
        let overhead = opener_chars + 2 + fence.closer_chars(text, line_start);
        fence.reopenable = overhead.saturating_mul(2) <= limit;
        Some(fence)
    }

    fn is_closed_by(&self, line: &str) -> bool {
        let body = line.trim_start_matches([' ', '\t']);
        let run = body.len() - body.trim_start_matches(self.marker).len();
        run >= self.len && body[run..].trim().is_empty()
    }

    /// The indentation kept when reopening: up to 3 spaces, since 4 would make an indented code block at
    /// the top of a post.
    fn reopen_indent<'t>(&self, text: &'t str) -> &'t str {
        let indent = &text[self.line_start..self.indent_end];
        if indent.len() <= 3 && indent.bytes().all(|b| b == b' ') {
            indent
        } else {
            ""
        }
    }

    fn reopen_line(&self, text: &str) -> String {
        let fence_and_info = text[self.indent_end..self.line_end].trim_end();
        format!("{}{fence_and_info}", self.reopen_indent(text))
    }

    /// The closer's indentation matches the fence line this post holds: the original when it is in the
    /// post (inside a list item it must be), else the reopened one.
    fn closer_indent<'t>(&self, text: &'t str, post_start: usize) -> &'t str {
        if self.line_start >= post_start {
            &text[self.line_start..self.indent_end]
        } else {
            self.reopen_indent(text)
        }
    }

    fn closer(&self, text: &str, post_start: usize) -> String {
        let markers: String = std::iter::repeat_n(self.marker, self.len).collect();
        format!("{}{markers}", self.closer_indent(text, post_start))
    }

    fn closer_chars(&self, text: &str, post_start: usize) -> usize {
        self.closer_indent(text, post_start).chars().count() + self.len
    }
}

impl Piece {
    fn render(&self, text: &str) -> String {
        let mut post = String::new();
        if let Some(fence) = self.reopen {
            post.push_str(&fence.reopen_line(text));
            post.push('\n');
        }
        post.push_str(&text[self.start..self.end]);
        if let Some(fence) = self.close {
            post.push('\n');
            post.push_str(&fence.closer(text, self.start));
        }
        post
    }
}

/// Plans the posts of `split_post` as slices of `text`, so that tests can check that nothing but
/// whitespace is lost.
fn plan_split(text: &str, limit: usize) -> Vec<Piece> {
    let limit = limit.max(1);
    let mut pieces = Vec::new();
    let mut fence: Option<Fence> = None;
    let (mut pos, mut line_start) = skip_blank_lines(text, 0, 0);
    while pos < text.len() {
        let reopen = fence.filter(|f| f.reopenable);
        let prefix_chars = reopen.map_or(0, |f| f.reopen_line(text).chars().count() + 1);
        let budget = limit.saturating_sub(prefix_chars);

        // Walk forward until the kept text no longer fits, remembering the latest cut of each kind.
        let mut best: [Option<Cut>; CUT_KINDS.len()] = [None; CUT_KINDS.len()];
        let mut consider = |kind: CutKind, cut: Cut| {
            let close = cut.fence_after.filter(|f| f.reopenable);
            let closer_chars = close.map_or(0, |f| 1 + f.closer_chars(text, pos));
            if prefix_chars + cut.kept_chars + closer_chars > limit {
                return;
            }
            let ends_after_opening_line =
                close.is_some_and(|f| f.line_start >= pos && cut.end <= f.line_end);
            let kind = if ends_after_opening_line {
                CutKind::EmptyFence
            } else {
                kind
            };
            best[kind as usize] = Some(cut);
        };
        let mut state = fence;
        let mut current_line_start = line_start;
        let mut seen_chars = 0;
        let mut kept_chars = 0;
        let mut kept_end = pos;
        let mut previous = None;
        let mut overflow = false;
        for (offset, ch) in text[pos..].char_indices() {
            let index = pos + offset;
            if ch == '\n' {
                let after = next_fence_state(state, text, current_line_start, index, limit);
                if kept_chars > 0 {
                    let kind = if after.is_some_and(|f| f.reopenable) {
                        CutKind::InsideFence
                    } else if text[current_line_start..index].trim().is_empty() {
                        CutKind::Paragraph
                    } else {
                        CutKind::Line
                    };
                    let cut = Cut {
                        end: kept_end,
                        kept_chars,
                        next: index + 1,
                        next_line_start: index + 1,
                        fence_after: after,
                    };
                    consider(kind, cut);
                }
                state = after;
                current_line_start = index + 1;
            } else if kept_chars > 0 && index > current_line_start && !ch.is_whitespace() {
                let kind = if ch == '`'
                    || ch == '~'
                    || cut_changes_fences(text, pos.max(current_line_start), kept_end, state)
                {
                    CutKind::Desperate
                } else if previous.is_some_and(char::is_whitespace) {
                    CutKind::Space
                } else {
                    CutKind::Hard
                };
                let cut = Cut {
                    end: kept_end,
                    kept_chars,
                    next: index,
                    next_line_start: current_line_start,
                    fence_after: state,
                };
                consider(kind, cut);
            }
            seen_chars += 1;
            if !ch.is_whitespace() {
                kept_chars = seen_chars;
                kept_end = index + ch.len_utf8();
            }
            if kept_chars > budget {
                overflow = true;
                break;
            }
            previous = Some(ch);
        }

        if !overflow {
            // The rest fits in one post. It may end inside a fence, which is left open: closing it would
            // make a longer text able to fit where this one does not, and break stability.
            if kept_chars > 0 {
                pieces.push(Piece {
                    start: pos,
                    end: kept_end,
                    reopen,
                    close: None,
                    cut: None,
                });
            }
            break;
        }
        match choose_cut(&best, budget) {
            Some((kind, cut)) => {
                pieces.push(Piece {
                    start: pos,
                    end: cut.end,
                    reopen,
                    close: cut.fence_after.filter(|f| f.reopenable),
                    cut: Some(kind),
                });
                fence = cut.fence_after;
                (pos, line_start) = skip_blank_lines(text, cut.next, cut.next_line_start);
            }
            None => {
                // No cut fits because the line's indentation alone fills the post: drop it, as the
                // whitespace at a cut is dropped. Otherwise (unreachable when the reasoning above holds)
                // a post of one char keeps the loop finite.
                let rest = &text[pos..];
                let indentation = rest.len()
                    - rest
                        .trim_start_matches(|c: char| c.is_whitespace() && c != '\n')
                        .len();
                if indentation > 0 {
                    pos += indentation;
                    continue;
                }
                let first_len = rest.chars().next().map_or(1, char::len_utf8);
                pieces.push(Piece {
                    start: pos,
                    end: pos + first_len,
                    reopen: None,
                    close: None,
                    cut: Some(CutKind::Desperate),
                });
                pos += first_len;
            }
        }
    }
    pieces
}

/// Picks among the latest cuts of each kind. A line end always beats a cut inside a line, since cutting
/// a line (worse, a line of code) in two is uglier than a shorter post. Among line ends, the most
/// preferred kind whose cut fills at least half the budget wins, else the most preferred kind; inside a
/// line, whitespace wins if it fills half, then any char; the rest are last resorts.
fn choose_cut(best: &[Option<Cut>; CUT_KINDS.len()], budget: usize) -> Option<(CutKind, Cut)> {
    let fills_half = |(_, cut): &(CutKind, Cut)| cut.kept_chars.saturating_mul(2) >= budget;
    let cut = |kind: CutKind| best[kind as usize].map(|cut| (kind, cut));
    let line_ends = [CutKind::Paragraph, CutKind::Line, CutKind::InsideFence];
    line_ends
        .into_iter()
        .filter_map(cut)
        .find(fills_half)
        .or_else(|| line_ends.into_iter().find_map(cut))
        .or_else(|| cut(CutKind::Space).filter(fills_half))
        .or_else(|| cut(CutKind::Hard))
        .or_else(|| cut(CutKind::Space))
        .or_else(|| cut(CutKind::EmptyFence))
        .or_else(|| cut(CutKind::Desperate))
}

/// Whether ending a post at `kept_end`, in the middle of the line whose part in the post starts at
/// `line_start`, would make that part a fence line: `~~~~` cut from `~~~~ py` closes a `~~~~` block,
/// and "``` a" cut from "``` a `b`" opens one. A part that keeps the whole fence run of a real fence
/// line keeps its meaning, so this only rejects cuts that change it.
fn cut_changes_fences(text: &str, line_start: usize, kept_end: usize, open: Option<Fence>) -> bool {
    if kept_end <= line_start {
        return false;
    }
    match open {
        Some(fence) => fence.is_closed_by(&text[line_start..kept_end]),
        None => Fence::open(text, line_start, kept_end, usize::MAX).is_some(),
    }
}

/// The fence open after the line `text[line_start..line_end]`, given the one open before it.
fn next_fence_state(
    open: Option<Fence>,
    text: &str,
    line_start: usize,
    line_end: usize,
    limit: usize,
) -> Option<Fence> {
    match open {
        Some(fence) if fence.is_closed_by(&text[line_start..line_end]) => None,
        Some(fence) => Some(fence),
        None => Fence::open(text, line_start, line_end, limit),
    }
}

/// Skips the whitespace at `from` up to and including its last newline, so that a post starts with the
/// indentation of its first line but without blank lines. Returns the new position and the start of its
/// line (`line_start` when no newline was skipped).
fn skip_blank_lines(text: &str, from: usize, line_start: usize) -> (usize, usize) {
    let rest = &text[from..];
    let whitespace = &rest[..rest.len() - rest.trim_start().len()];
    match whitespace.rfind('\n') {
        Some(newline) => (from + newline + 1, from + newline + 1),
        None => (from, line_start),
    }
}

// ---------------------------------------------------------------------------------------------------------
// End of the text splitting and formatting helpers. Post renderers go below this line.
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `text` and compares the posts, shown separated by `=====` lines for readable failures.
    fn check_split(text: &str, limit: usize, expected: &[&str]) {
        let posts = split_post(text, limit);
        check_invariants(text, limit, &posts);
        let show = |posts: &[&str]| posts.join("\n=====\n");
        let actual: Vec<&str> = posts.iter().map(String::as_str).collect();
        assert_eq!(
            show(&actual),
            show(expected),
            "\nlimit {limit}, text:\n{text}\n"
        );
    }

    /// The fence left open after scanning `text` on its own, as Mattermost would render it.
    fn open_fence_at_end(text: &str) -> Option<Fence> {
        let mut open = None;
        let mut line_start = 0;
        for (index, ch) in text.char_indices() {
            if ch == '\n' {
                open = next_fence_state(open, text, line_start, index, usize::MAX);
                line_start = index + 1;
            }
        }
        if line_start < text.len() {
            let with_newline = format!("{text}\n");
            open = next_fence_state(open, &with_newline, line_start, text.len(), usize::MAX);
        }
        open
    }

    /// Whether `text` has a fence too long to close and reopen within `limit`, which is split as plain
    /// text.
    fn has_unreopenable_fence(text: &str, limit: usize) -> bool {
        let mut open = None;
        let mut line_start = 0;
        for (index, ch) in text.char_indices() {
            if ch == '\n' {
                open = next_fence_state(open, text, line_start, index, limit.max(1));
                if open.is_some_and(|fence: Fence| !fence.reopenable) {
                    return true;
                }
                line_start = index + 1;
            }
        }
        false
    }

    /// What every split must satisfy: posts are non-empty and within the limit, only whitespace is lost
    /// between them, added fence lines are the only additions, and no post but the last ends inside a
    /// fence (the last only when the text does) unless a fence is too long to reopen.
    fn check_invariants(text: &str, limit: usize, posts: &[String]) {
        let pieces = plan_split(text, limit);
        assert_eq!(pieces.len(), posts.len());
        let mut previous_end = 0;
        for (number, (piece, post)) in pieces.iter().zip(posts).enumerate() {
            let context =
                format!("post {number} of limit {limit}: {post:?} in {posts:#?} of {text:?}");
            assert_eq!(&piece.render(text), post, "{context}");
            assert!(!post.trim().is_empty(), "empty post: {context}");
            assert!(post.chars().count() <= limit.max(1), "too long: {context}");
            assert!(piece.start < piece.end, "{context}");
            assert!(
                text[previous_end..piece.start].trim().is_empty(),
                "lost text: {context}"
            );
            assert_eq!(
                text[piece.start..piece.end].trim_end().len(),
                piece.end - piece.start,
                "trailing whitespace: {context}"
            );
            previous_end = piece.end;
            let is_last = number + 1 == posts.len();
            let desperate = |index: usize| {
                pieces
                    .get(index)
                    .is_some_and(|piece: &Piece| piece.cut == Some(CutKind::Desperate))
            };
            let fences_are_kept = !has_unreopenable_fence(text, limit)
                && !desperate(number)
                && !number.checked_sub(1).is_some_and(desperate);
            if fences_are_kept && (!is_last || open_fence_at_end(text).is_none()) {
                assert_eq!(
                    open_fence_at_end(post),
                    None,
                    "post ends inside a fence: {context}"
                );
            }
            if fences_are_kept && number > 0 {
                assert_eq!(
                    piece.reopen,
                    pieces[number - 1].close,
                    "a closed fence must be reopened: {context}"
                );
            }
        }
        assert!(
            text[previous_end..].trim().is_empty(),
            "lost the end of {text:?}"
        );
    }

    /// Every post but the last of each prefix's split must be a post of the whole text's split.
    fn check_prefix_stability(text: &str, limit: usize) {
        let whole = split_post(text, limit);
        for (end, _) in text.char_indices().skip(1) {
            let partial = split_post(&text[..end], limit);
            let settled = partial.len().saturating_sub(1);
            assert_eq!(
                partial[..settled],
                whole[..settled],
                "limit {limit}, prefix {:?} of {text:?}",
                &text[..end]
            );
        }
    }

    #[test]
    fn short_text_is_one_post() {
        check_split("hello", 40, &["hello"]);
        check_split("  \n\n  hello  \n\n", 40, &["  hello"]);
        check_split("", 40, &[]);
        check_split(" \n \n", 40, &[]);
    }

    #[test]
    fn prefers_paragraph_boundaries() {
        check_split(
            "First paragraph here.\nStill first.\n\nSecond one is here.",
            40,
            &["First paragraph here.\nStill first.", "Second one is here."],
        );
    }

    #[test]
    fn falls_back_to_line_ends() {
        check_split(
            "line one is here\nline two is here\nline three is here\nline four",
            40,
            &[
                "line one is here\nline two is here",
                "line three is here\nline four",
            ],
        );
    }

    #[test]
    fn a_line_end_beats_an_early_paragraph_boundary() {
        check_split(
            "Hi.\n\nline one is here\nline two is here\nline three",
            40,
            &["Hi.\n\nline one is here\nline two is here", "line three"],
        );
    }

    #[test]
    fn long_line_is_cut_at_whitespace() {
        check_split(
            "the quick brown fox jumps over the lazy dog and keeps on running far away",
            20,
            &[
                "the quick brown fox",
                "jumps over the lazy",
                "dog and keeps on",
                "running far away",
            ],
        );
    }

    #[test]
    fn text_without_spaces_is_cut_hard() {
        check_split(
            &"abcdefghij".repeat(5),
            20,
            &["abcdefghijabcdefghij", "abcdefghijabcdefghij", "abcdefghij"],
        );
    }

    #[test]
    fn multibyte_chars_count_as_one() {
        check_split("éééééééééé", 5, &["ééééé", "ééééé"]);
        check_split("🦀🦀🦀 🦀🦀🦀🦀", 5, &["🦀🦀🦀", "🦀🦀🦀🦀"]);
        check_split("日本語のテキストです", 4, &["日本語の", "テキスト", "です"]);
        let posts = split_post(&"é".repeat(MAX_POST_CHARS + 1), MAX_POST_CHARS);
        assert_eq!(posts.len(), 2);
        assert_eq!(posts[0].chars().count(), MAX_POST_CHARS);
    }

    #[test]
    fn long_code_block_is_closed_and_reopened() {
        let text =
            "Here:\n\n```rust\nfn a() {}\nfn b() {}\nfn c() {}\nfn d() {}\nfn e() {}\n```\n\nDone.";
        check_split(
            text,
            41,
            &[
                "Here:\n\n```rust\nfn a() {}\nfn b() {}\n```",
                "```rust\nfn c() {}\nfn d() {}\nfn e() {}\n```",
                "Done.",
            ],
        );
    }

    #[test]
    fn longer_fences_and_tildes() {
        let text = "````md\n```\ninner\n```\nmore inner text\n````\nafter";
        check_split(
            text,
            30,
            &[
                "````md\n```\ninner\n```\n````",
                "````md\nmore inner text\n````",
                "after",
            ],
        );
        let text = "~~~ python\nprint(1)\nprint(2)\nprint(3)\n~~~\nafter";
        check_split(
            text,
            32,
            &[
                "~~~ python\nprint(1)\nprint(2)\n~~~",
                "~~~ python\nprint(3)\n~~~\nafter",
            ],
        );
    }

    #[test]
    fn long_line_inside_a_fence() {
        check_split(
            "```\naaaa bbbb cccc dddd eeee ffff\n```",
            22,
            &["```\naaaa bbbb cccc\n```", "```\ndddd eeee ffff\n```"],
        );
    }

    #[test]
    fn indented_fence_in_a_list_keeps_its_indent_in_the_closer() {
        let text = "1. Run:\n   ```sh\n   make one\n   make two\n   make three\n   ```\n2. Done";
        check_split(
            text,
            47,
            &[
                "1. Run:\n   ```sh\n   make one\n   make two\n   ```",
                "   ```sh\n   make three\n   ```\n2. Done",
            ],
        );
    }

    #[test]
    fn inline_triple_backticks_are_not_a_fence() {
        check_split(
            "use ```x``` here\nline two is here\nline three",
            20,
            &["use ```x``` here", "line two is here", "line three"],
        );
    }

    #[test]
    fn unclosed_fence_at_the_end_stays_open() {
        check_split(
            "```\none\ntwo\nthree\nfour",
            16,
            &["```\none\ntwo\n```", "```\nthree\nfour"],
        );
    }

    #[test]
    fn tiny_limits_still_make_progress() {
        check_split("ab", 0, &["a", "b"]);
        check_split("a b\nc", 1, &["a", "b", "c"]);
        check_split("```\nabc\n```", 3, &["```", "abc", "```"]);
        check_split("x\n\n\n\ny", 1, &["x", "y"]);
    }

    #[test]
    fn prefix_stability_on_growing_texts() {
        let texts = [
            "Intro line.\n\n```rust\nfn main() {\n    println!(\"hi\");\n}\n```\n\nThen more words follow here and there.".to_string(),
            "word ".repeat(30),
            "a\n\n\n\nb\n\n\n\nc ddddddddddddddddddddddddddddddddddddddddddd e".to_string(),
            "````\n```\nx\n```\n````\n~~~~~~\nyy\nzz\n~~~~~~\n".to_string(),
            "é🦀日 ".repeat(20),
        ];
        for text in &texts {
            for limit in [10, 17, 25, 40] {
                check_prefix_stability(text, limit);
            }
        }
    }

    #[test]
    fn streaming_a_long_reply_never_changes_earlier_posts() {
        let mut text = String::new();
        for i in 0..900 {
            match i % 60 {
                10 => text.push_str("```rust\n"),
                45 => text.push_str("```\n\n"),
                59 => text.push('\n'),
                _ => {}
            }
            text.push_str(&format!(
                "line {i}: some words, é 🦀 日本語, and more words\n"
            ));
        }
        let whole = split_post(&text, MAX_POST_CHARS);
        assert!(whole.len() >= 3, "{}", whole.len());
        check_invariants(&text, MAX_POST_CHARS, &whole);
        let mut end = 0;
        while end < text.len() {
            end += 997;
            while !text.is_char_boundary(end.min(text.len())) {
                end += 1;
            }
            let partial = split_post(&text[..end.min(text.len())], MAX_POST_CHARS);
            let settled = partial.len() - 1;
            assert_eq!(
                partial[..settled],
                whole[..settled],
                "prefix of {end} bytes"
            );
        }
    }

    /// A small deterministic generator (xorshift64*), so that failures reproduce without new crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    /// Markdown-ish text: words of mixed scripts, blank lines, indentation and fences of all kinds.
    fn generate(rng: &mut Rng) -> String {
        let words = [
            "a",
            "word",
            "longerword",
            "é",
            "🦀",
            "日本語",
            "x",
            "  ",
            " ",
            "\t",
            "`",
            "``",
            "```",
            "~~",
            "--",
            "verylongwordwithoutanyspacesatallreally",
        ];
        let fences = [
            "```", "````", "~~~", "```rust", "~~~~ py", "  ```", "```sh", "```",
        ];
        let mut text = String::new();
        let lines = rng.below(40);
        for _ in 0..lines {
            match rng.below(10) {
                0 => text.push('\n'),
                1 | 2 => text.push_str(rng.pick(&fences)),
                _ => {
                    for _ in 0..rng.below(12) {
                        text.push_str(rng.pick(&words));
                        if rng.below(3) > 0 {
                            text.push(' ');
                        }
                    }
                }
            }
            text.push_str(if rng.below(8) == 0 { "\r\n" } else { "\n" });
        }
        if rng.below(2) == 0 {
            text.truncate(text.trim_end().len());
        }
        text
    }

    /// Text as an agent writes it: prose, lists, and fenced blocks whose fence lines are short.
    fn generate_realistic(rng: &mut Rng) -> String {
        let words = [
            "the",
            "agent",
            "wrote",
            "é",
            "🦀",
            "日本語",
            "`code`",
            "x",
            "fn",
            "main()",
        ];
        let fences = ["```", "````", "~~~", "```rust", "~~~ py", "```sh"];
        let mut text = String::new();
        let mut open: Option<&str> = None;
        for _ in 0..rng.below(60) {
            match (rng.below(8), open) {
                (0, _) => text.push('\n'),
                (1, None) => {
                    let fence = rng.pick(&fences);
                    text.push_str(fence);
                    open = Some(
                        fence
                            .split(' ')
                            .next()
                            .unwrap_or(fence)
                            .trim_end_matches(char::is_alphabetic),
                    );
                }
                (1, Some(fence)) => {
                    text.push_str(fence);
                    open = None;
                }
                _ => {
                    let indent = ["", "", "  ", "    ", "- ", "1. "][rng.below(6)];
                    text.push_str(indent);
                    for _ in 0..1 + rng.below(10) {
                        text.push_str(rng.pick(&words));
                        text.push(' ');
                    }
                }
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn realistic_texts_keep_every_invariant_without_last_resorts() {
        let mut rng = Rng(0x0123_4567_89AB_CDEF);
        for _ in 0..200 {
            let text = generate_realistic(&mut rng);
            for limit in [30, 45, 80, 200] {
                let posts = split_post(&text, limit);
                check_invariants(&text, limit, &posts);
                for piece in plan_split(&text, limit) {
                    assert_ne!(
                        piece.cut,
                        Some(CutKind::Desperate),
                        "limit {limit}: {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn generated_texts_keep_the_invariants() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..400 {
            let text = generate(&mut rng);
            for limit in [24, 40, 73] {
                let posts = split_post(&text, limit);
                check_invariants(&text, limit, &posts);
            }
        }
    }

    #[test]
    fn generated_texts_are_prefix_stable() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for round in 0..40 {
            let text = if round % 2 == 0 {
                generate(&mut rng)
            } else {
                generate_realistic(&mut rng)
            };
            for limit in [24, 50] {
                check_prefix_stability(&text, limit);
            }
        }
    }

    #[test]
    fn tiny_limits_never_exceed_the_limit() {
        let mut rng = Rng(42);
        for _ in 0..200 {
            let text = generate(&mut rng);
            for limit in 0..12 {
                for post in split_post(&text, limit) {
                    assert!(post.chars().count() <= limit.max(1), "{post:?} for {limit}");
                    assert!(
                        !post.trim().is_empty(),
                        "empty post for {limit} in {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn truncate_chars_cases() {
        let check = |text: &str, max: usize, expected: &str| {
            let actual = truncate_chars(text, max);
            assert_eq!(actual, expected, "{text:?} to {max}");
            assert!(actual.chars().count() <= max);
        };
        check("hello", 5, "hello");
        check("hello", 10, "hello");
        check("hello world", 8, "hello w…");
        check("hello world", 7, "hello…");
        check("héllo🦀wörld", 7, "héllo🦀…");
        check("abc", 1, "…");
        check("abc", 0, "");
        check("", 0, "");
    }

    #[test]
    fn format_duration_cases() {
        let check = |ms: u64, expected: &str| assert_eq!(format_duration(ms), expected, "{ms} ms");
        check(0, "0.0s");
        check(850, "0.8s");
        check(9_999, "9.9s");
        check(10_000, "10s");
        check(12_400, "12s");
        check(59_999, "59s");
        check(60_000, "1m 00s");
        check(65_000, "1m 05s");
        check(3_599_999, "59m 59s");
        check(3_600_000, "1h 00m");
        check(7_380_000, "2h 03m");
        check(u64::MAX, "5124095576030h 25m");
    }

    #[test]
    fn format_tokens_cases() {
        let check = |n: u64, expected: &str| assert_eq!(format_tokens(n), expected, "{n}");
        check(0, "0");
        check(950, "950");
        check(999, "999");
        check(1_000, "1.0k");
        check(12_345, "12.3k");
        check(999_999, "999.9k");
        check(1_234_567, "1.2M");
        check(2_000_000_000, "2000.0M");
    }

    #[test]
    fn format_cost_cases() {
        let check = |usd: f64, expected: &str| assert_eq!(format_cost(usd), expected, "{usd}");
        check(0.0, "$0.00");
        check(0.0012, "$0.0012");
        check(0.00001, "<$0.0001");
        check(0.0049, "$0.0049");
        check(0.005, "$0.01");
        check(0.25, "$0.25");
        check(12.4, "$12.40");
        check(-0.25, "-$0.25");
        check(f64::NAN, "$?");
        check(f64::INFINITY, "$?");
    }
}
