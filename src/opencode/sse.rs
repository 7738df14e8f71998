//! Turns the bytes of OpenCode's `/global/event` stream into Server-Sent Events, bounded in memory.
//!
//! It follows the WHATWG event-stream rules; an oversized event is counted and skipped.

/// One dispatched event. `event` is `None` when the stream gave no `event:` field (the default
/// "message" type); `id` is the last event id the stream set, which persists across events as in
/// the WHATWG rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
}

/// An incremental event-stream parser: feed it bytes at any chunk boundaries and it returns whole
/// events.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Bytes of the line being read, not yet decoded, so a multi-byte character may span chunks.
    line: Vec<u8>,
    /// The current line grew too long and its remaining bytes are being skipped.
    skipping_line: bool,
    /// The previous chunk ended in `\r`, so a `\n` that starts the next one belongs to the same
    /// line end.
    after_cr: bool,
    /// No line has ended yet, so the current line may start with a byte order mark.
    at_stream_start: bool,
    /// Each `data:` value followed by `\n`, as the WHATWG data buffer.
    data: String,
    event_type: String,
    last_event_id: Option<String>,
    /// The current event outgrew `max_event_bytes`; everything up to the next blank line is
    /// ignored.
    discarding_event: bool,
    dropped_oversized: u64,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Room for the longest field name, its colon and space, and a byte order mark on top of an event's
/// data.
const LINE_OVERHEAD: usize = 16;

impl SseParser {
    /// A parser that drops any event whose data exceeds `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> SseParser {
        SseParser {
            max_event_bytes,
            line: Vec::new(),
            skipping_line: false,
            after_cr: false,
            at_stream_start: true,
            data: String::new(),
            event_type: String::new(),
            last_event_id: None,
            discarding_event: false,
            dropped_oversized: 0,
        }
    }

    /// Feeds raw bytes as they arrive and returns the events they complete. Invalid UTF-8 is
    /// replaced lossily; an event without a terminating blank line stays buffered until one
    /// arrives.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.push_line_bytes(rest);
                    break;
                }
                Some(end) => {
                    self.push_line_bytes(&rest[..end]);
                    let is_cr = rest[end] == b'\r';
                    rest = &rest[end + 1..];
                    if is_cr {
                        match rest.first() {
                            Some(b'\n') => rest = &rest[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    if let Some(event) = self.end_line() {
                        events.push(event);
                    }
                }
            }
        }
        events
    }

    /// How many events were dropped for exceeding `max_event_bytes`.
    pub fn dropped_oversized(&self) -> u64 {
        self.dropped_oversized
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.skipping_line || bytes.is_empty() {
            return;
        }
        let limit = self.max_event_bytes.saturating_add(LINE_OVERHEAD);
        if self.line.len() + bytes.len() <= limit {
            self.line.extend_from_slice(bytes);
            return;
        }
        // Too long to be part of an acceptable event: stop buffering it. An overlong comment costs
        // nothing else; any other field takes its event down with it.
        self.line
            .extend_from_slice(&bytes[..bytes.len().min(BOM.len() + 1)]);
        let is_comment = self.line_without_bom().first() == Some(&b':');
        self.line.clear();
        self.skipping_line = true;
        if !is_comment {
            self.drop_event();
        }
    }

    fn line_without_bom(&self) -> &[u8] {
        match self.line.strip_prefix(BOM) {
            Some(stripped) if self.at_stream_start => stripped,
            _ => &self.line,
        }
    }

    /// Handles one complete line and returns the event it dispatches, if any.
    fn end_line(&mut self) -> Option<SseEvent> {
        let skipped = std::mem::replace(&mut self.skipping_line, false);
        let raw = std::mem::take(&mut self.line);
        let line = match raw.strip_prefix(BOM) {
            Some(stripped) if self.at_stream_start => stripped,
            _ => &raw[..],
        };
        self.at_stream_start = false;
        if skipped {
            return None;
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // A dropped event loses its data and type, but its `id` still marks the stream's position.
        match name {
            b"data" if !self.discarding_event => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
                // The data buffer holds one `\n` more than the event's data.
                if self.data.len() - 1 > self.max_event_bytes {
                    self.drop_event();
                }
            }
            b"event" if !self.discarding_event => {
                self.event_type = String::from_utf8_lossy(value).into_owned()
            }
            b"id" if !value.contains(&0) => {
                self.last_event_id = match value {
                    [] => None,
                    _ => Some(String::from_utf8_lossy(value).into_owned()),
                };
            }
            // `retry` is the browser's reconnection delay; the watcher has its own backoff.
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event_type = std::mem::take(&mut self.event_type);
        let mut data = std::mem::take(&mut self.data);
        if std::mem::replace(&mut self.discarding_event, false) || data.is_empty() {
            return None;
        }
        data.pop();
        Some(SseEvent {
            event: (!event_type.is_empty()).then_some(event_type),
            data,
            id: self.last_event_id.clone(),
        })
    }

    fn drop_event(&mut self) {
        if !self.discarding_event {
            self.discarding_event = true;
            self.dropped_oversized += 1;
        }
        self.data = String::new();
        self.event_type.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: &str =
        r#"{"directory":"/tmp/p","payload":{"id":"x","type":"server.heartbeat","properties":{}}}"#;

    fn parse_whole(max: usize, stream: &[u8]) -> Vec<SseEvent> {
        SseParser::new(max).feed(stream)
    }

    fn data(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.to_string(),
            id: None,
        }
    }

    /// Every split of `stream` into two and into three chunks, and one byte at a time, gives
    /// `expected`.
    fn check_all_chunkings(stream: &[u8], expected: &[SseEvent]) {
        assert_eq!(parse_whole(1 << 20, stream), expected, "whole stream");
        let mut parser = SseParser::new(1 << 20);
        let one_by_one: Vec<SseEvent> = stream
            .iter()
            .flat_map(|b| parser.feed(std::slice::from_ref(b)))
            .collect();
        assert_eq!(one_by_one, expected, "byte by byte");
        for first in 0..=stream.len() {
            for second in first..=stream.len() {
                let mut parser = SseParser::new(1 << 20);
                let mut events = parser.feed(&stream[..first]);
                events.extend(parser.feed(&stream[first..second]));
                events.extend(parser.feed(&stream[second..]));
                assert_eq!(events, expected, "chunks split at {first} and {second}");
            }
        }
    }

    #[test]
    fn opencode_heartbeat_line() {
        let stream = format!("data: {HEARTBEAT}\n\n");
        check_all_chunkings(stream.as_bytes(), &[data(HEARTBEAT)]);
    }

    #[test]
    fn every_chunking_of_a_mixed_stream_gives_the_same_events() {
        let stream = concat!(
            "\u{feff}: hello\r\nevent: update\r\nid: 7\r\n",
            "data: é\u{1F600}ü\r\ndata:two\r\r",
            "data\n\ndata:  x\n\n",
        )
        .as_bytes();
        let expected = [
            SseEvent {
                event: Some("update".into()),
                data: "é\u{1F600}ü\ntwo".into(),
                id: Some("7".into()),
            },
            SseEvent {
                event: None,
                data: String::new(),
                id: Some("7".into()),
            },
            SseEvent {
                event: None,
                data: " x".into(),
                id: Some("7".into()),
            },
        ];
        check_all_chunkings(stream, &expected);
    }

    #[test]
    fn line_ends_lf_crlf_and_cr_are_equivalent() {
        for end in ["\n", "\r\n", "\r"] {
            let stream = format!("data: a{end}data: b{end}{end}data: c{end}{end}");
            check_all_chunkings(stream.as_bytes(), &[data("a\nb"), data("c")]);
        }
    }

    #[test]
    fn cr_then_lf_in_the_next_chunk_is_one_line_end() {
        let mut parser = SseParser::new(100);
        assert_eq!(parser.feed(b"data: a\r"), []);
        // Were the \n a second line end, this would dispatch "a" before "b" arrives.
        assert_eq!(parser.feed(b"\ndata: b\r"), []);
        assert_eq!(parser.feed(b"\n\r\n"), [data("a\nb")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let stream = b":keepalive\n\n: another\ndata: x\nretry: 10\nfoo: bar\n:\n\n";
        check_all_chunkings(stream, &[data("x")]);
    }

    #[test]
    fn only_one_leading_space_is_stripped_and_colon_less_lines_are_fields() {
        let stream = b"data:no space\ndata:   three\ndata\ndata: a: b\n\n";
        assert_eq!(
            parse_whole(100, stream),
            [data("no space\n  three\n\na: b")]
        );
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_its_type_does_not_leak() {
        let stream = b"event: lonely\nid: 1\n\ndata: next\n\n";
        assert_eq!(
            parse_whole(100, stream),
            [SseEvent {
                event: None,
                data: "next".into(),
                id: Some("1".into())
            }]
        );
    }

    #[test]
    fn empty_id_resets_and_id_with_nul_is_ignored() {
        let stream = b"id: 1\ndata: a\n\nid: 2\0\ndata: b\n\nid\ndata: c\n\n";
        let with_id = |data: &str, id: Option<&str>| SseEvent {
            event: None,
            data: data.into(),
            id: id.map(Into::into),
        };
        assert_eq!(
            parse_whole(100, stream),
            [
                with_id("a", Some("1")),
                with_id("b", Some("1")),
                with_id("c", None)
            ]
        );
    }

    #[test]
    fn oversized_event_is_dropped_counted_and_the_next_one_parsed() {
        let big = "x".repeat(50);
        let stream = format!("data: {big}\ndata: more\nevent: big\n\ndata: small\n\n");
        let mut parser = SseParser::new(40);
        assert_eq!(parser.feed(stream.as_bytes()), [data("small")]);
        assert_eq!(parser.dropped_oversized(), 1);
    }

    #[test]
    fn data_growing_past_the_limit_over_several_lines_is_dropped() {
        let line = format!("data: {}\n", "y".repeat(30));
        let stream = format!("{line}{line}{line}\ndata: ok\n\n");
        let mut parser = SseParser::new(64);
        assert_eq!(parser.feed(stream.as_bytes()), [data("ok")]);
        assert_eq!(parser.dropped_oversized(), 1);
    }

    #[test]
    fn data_exactly_at_the_limit_is_kept() {
        let exact = "z".repeat(40);
        let stream = format!("data: {}\ndata: {}\n\n", &exact[..20], &exact[..19]);
        assert_eq!(
            parse_whole(40, stream.as_bytes()),
            [data(&format!("{}\n{}", &exact[..20], &exact[..19]))]
        );
    }

    #[test]
    fn an_endless_line_is_not_buffered() {
        let mut parser = SseParser::new(1000);
        let chunk = vec![b'q'; 64 * 1024];
        assert_eq!(parser.feed(b"data: "), []);
        for _ in 0..100 {
            assert_eq!(parser.feed(&chunk), []);
            assert!(parser.line.len() <= 1000 + LINE_OVERHEAD);
        }
        assert_eq!(parser.feed(b"\n\ndata: after\n\n"), [data("after")]);
        assert_eq!(parser.dropped_oversized(), 1);
    }

    #[test]
    fn an_overlong_comment_drops_nothing() {
        let stream = format!("data: keep\n:{}\n\n", "c".repeat(500));
        let mut parser = SseParser::new(100);
        assert_eq!(parser.feed(stream.as_bytes()), [data("keep")]);
        assert_eq!(parser.dropped_oversized(), 0);
    }

    #[test]
    fn truncated_final_event_is_not_emitted() {
        let mut parser = SseParser::new(100);
        assert_eq!(parser.feed(b"data: one\n\ndata: two\n"), [data("one")]);
        assert_eq!(parser.feed(b"data: three"), []);
    }

    #[test]
    fn leading_bom_is_dropped_even_when_split_but_only_at_the_start() {
        let stream = b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\ndata: c\n\n";
        // The second BOM makes its line an unknown field, so "b" is never set as data.
        check_all_chunkings(stream, &[data("a"), data("c")]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(
            parse_whole(100, b"data: a\xFFb\xE2\x82\n\n"),
            [data("a\u{FFFD}b\u{FFFD}")]
        );
    }

    #[test]
    fn zero_limit_and_arbitrary_bytes_do_not_panic() {
        let mut parser = SseParser::new(0);
        assert_eq!(parser.feed(b"data:\n\ndata: x\n\n"), [data("")]);
        let mut seed = 12345u32;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"data: \r\n:\xEF\xBB\xBF\xFFx"[(seed >> 16) as usize % 13]
            })
            .collect();
        for chunk in noise.chunks(7) {
            SseParser::new(3).feed(chunk);
            parser.feed(chunk);
        }
    }
}
