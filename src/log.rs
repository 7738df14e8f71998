//! Line-oriented logging to stderr: one event per line with a UTC timestamp, level, module, the
//! session's short id when the line is about one, and the message; as text or as JSON lines.
//!
//! The level, the format and the secrets to mask are process-wide because stderr is; everything else
//! that belongs to a connection lives in values.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How much the daemon logs. The order is the order of verbosity, so `level <= configured` decides whether
/// a line is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// How log lines look: `text` for people, `json` (one object per line) for log collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);
/// Credentials that must never reach stderr, even through an error text that quotes a header or a
/// URL: a last line of defence behind `Secret`'s redacting `Debug`.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// The link (OPENCODE_MM_LINKS_DIR) this thread works for; its lines say so.
    static LINK: std::cell::RefCell<Option<std::sync::Arc<str>>> =
        const { std::cell::RefCell::new(None) };
}

/// Tags this thread's later lines with `link` (a link's bridge sets it first thing).
pub fn set_link(link: Option<&str>) {
    LINK.with(|tag| *tag.borrow_mut() = link.map(std::sync::Arc::from));
}

/// The link of this thread's lines, if any.
pub fn link() -> Option<std::sync::Arc<str>> {
    LINK.with(|tag| tag.borrow().clone())
}

/// `f`, to run on a new thread with this thread's link tag: every thread a link's bridge starts
/// passes its closure through this, so its lines name the link too.
pub fn inherit<T>(f: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let tag = link();
    move || {
        if tag.is_some() {
            LINK.with(|slot| *slot.borrow_mut() = tag);
        }
        f()
    }
}

/// Sets the level, and routes the `log` facade (rustls, ureq, tungstenite) into these lines.
pub fn set_level(level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    // Fails harmlessly when already set (a second bridge in one test process).
    let _ = ::log::set_logger(&Facade);
    // One level below ours: their debug output is our trace.
    ::log::set_max_level(match level {
        LogLevel::Error => ::log::LevelFilter::Error,
        LogLevel::Warn | LogLevel::Info => ::log::LevelFilter::Warn,
        LogLevel::Debug => ::log::LevelFilter::Info,
        LogLevel::Trace => ::log::LevelFilter::Debug,
    });
}

pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// Masks `secrets` (see `Config::secrets`) in every later log line.
pub fn redact(secrets: impl IntoIterator<Item = String>) {
    let mut known = SECRETS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for secret in secrets {
        // A very short password would mask ordinary words; such a password is its own problem.
        if secret.len() >= 4 && !known.contains(&secret) {
            known.push(secret);
        }
    }
}

/// The libraries' `log` records, as lines of ours (masked like any other), one level quieter: a
/// library's info is our debug, its debug our trace; its trace is dropped.
struct Facade;

impl Facade {
    fn level(level: ::log::Level) -> Option<LogLevel> {
        match level {
            ::log::Level::Error => Some(LogLevel::Error),
            ::log::Level::Warn => Some(LogLevel::Warn),
            ::log::Level::Info => Some(LogLevel::Debug),
            ::log::Level::Debug => Some(LogLevel::Trace),
            ::log::Level::Trace => None,
        }
    }
}

impl ::log::Log for Facade {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        Facade::level(metadata.level()).is_some_and(enabled)
    }

    fn log(&self, record: &::log::Record<'_>) {
        if let Some(level) = Facade::level(record.level())
            && enabled(level)
        {
            write(level, record.target(), *record.args());
        }
    }

    fn flush(&self) {}
}

pub fn enabled(level: LogLevel) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn write(level: LogLevel, module: &str, message: std::fmt::Arguments<'_>) {
    #[cfg(debug_assertions)]
    debug_panic::check(&message);
    // The crate root holds start-up (`run` and the bridge thread).
    let module = match module.strip_prefix("opencode_mattermost::") {
        Some(inner) => inner,
        None if module == "opencode_mattermost" => "bridge",
        None => module,
    };
    let message = mask_secrets(message.to_string());
    let thread = std::thread::current();
    let link = link();
    let line = format_line_of(
        link.as_deref(),
        JSON.load(Ordering::Relaxed),
        now_ms(),
        level,
        module,
        thread.name().unwrap_or(""),
        &message,
    );
    // One write call per line keeps lines from different threads whole.
    #[cfg(test)]
    if tests::captured(&line) {
        return;
    }
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One log line with its newline. Session lines are recognised by their `[shortid] ` prefix or, for
/// a line a session worker logs without one, by the worker's thread name `session-<shortid>`.
pub fn format_line(
    json: bool,
    ms: u64,
    level: LogLevel,
    module: &str,
    thread_name: &str,
    message: &str,
) -> String {
    format_line_of(None, json, ms, level, module, thread_name, message)
}

/// `format_line` for a line of link `link` (OPENCODE_MM_LINKS_DIR): `(NAME) ` before the session
/// in text, a `link` field in JSON.
pub fn format_line_of(
    link: Option<&str>,
    json: bool,
    ms: u64,
    level: LogLevel,
    module: &str,
    thread_name: &str,
    message: &str,
) -> String {
    let (session, text) = match session_prefix(message) {
        Some((session, rest)) => (Some(session), rest),
        None => (thread_name.strip_prefix("session-"), message),
    };
    if json {
        let mut object = serde_json::json!({
            "ts": utc_timestamp(ms),
            "level": level_name(level),
            "module": module,
            "msg": text,
        });
        if let Some(session) = session {
            object["session"] = serde_json::Value::from(session);
        }
        if let Some(link) = link {
            object["link"] = serde_json::Value::from(link);
        }
        return format!("{object}\n");
    }
    let label = match level {
        LogLevel::Error => "ERROR",
        LogLevel::Warn => "WARN ",
        LogLevel::Info => "INFO ",
        LogLevel::Debug => "DEBUG",
        LogLevel::Trace => "TRACE",
    };
    // Remote text (a session title, an error body) must not start a line of its own.
    let text = escape_controls(text);
    let module = match link {
        Some(link) => format!("{module}: ({link})"),
        None => format!("{module}:"),
    };
    match session {
        Some(session) => format!(
            "{} {label} {module} [{session}] {text}\n",
            utc_timestamp(ms)
        ),
        None => format!("{} {label} {module} {text}\n", utc_timestamp(ms)),
    }
}

/// Control characters (newlines, carriage returns, terminal escapes) and Unicode line separators as
/// Rust escapes (`\n`, `\u{1b}`), so one event stays one line; other text is left as it is.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let needs_escape = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

/// `[ab12cd34] rest` → `("ab12cd34", "rest")`.
fn session_prefix(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_prefix('[')?;
    let (id, text) = rest.split_once("] ")?;
    let looks_like_id =
        !id.is_empty() && id.len() <= 16 && id.chars().all(|c| c.is_ascii_alphanumeric());
    looks_like_id.then_some((id, text))
}

fn mask_secrets(mut message: String) -> String {
    let secrets = SECRETS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for secret in secrets.iter() {
        if message.contains(secret.as_str()) {
            message = message.replace(secret.as_str(), "<redacted>");
        }
    }
    message
}

/// Test-only: `OPENCODE_MM_DEBUG_PANIC_ON=NEEDLE|MESSAGE` panics with MESSAGE, once, on whichever
/// thread first logs a line containing NEEDLE, so the tests can make a real thread of the real binary
/// panic. Compiled into debug builds only; a release binary ignores the variable.
#[cfg(debug_assertions)]
mod debug_panic {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    static TRIGGER: OnceLock<Option<(String, String)>> = OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);

    pub fn check(message: &std::fmt::Arguments<'_>) {
        let trigger = TRIGGER.get_or_init(|| {
            let value = std::env::var("OPENCODE_MM_DEBUG_PANIC_ON").ok()?;
            let (needle, panic_message) = value.split_once('|')?;
            Some((needle.to_string(), panic_message.to_string()))
        });
        let Some((needle, panic_message)) = trigger else {
            return;
        };
        // Fires once, so the panic hook's own log line cannot trigger it again.
        if message.to_string().contains(needle.as_str()) && !FIRED.swap(true, Ordering::SeqCst) {
            panic!("{panic_message}");
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-22T06:34:00.123Z`.
pub fn utc_timestamp(ms: u64) -> String {
    let (date, secs_of_day) = utc_date(ms);
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        ms % 1000
    )
}

/// `2026-11-22 06:34 UTC`, for people.
pub fn utc_minute(ms: u64) -> String {
    let (date, secs_of_day) = utc_date(ms);
    format!(
        "{date} {:02}:{:02} UTC",
        secs_of_day / 3600,
        secs_of_day / 60 % 60
    )
}

fn utc_date(ms: u64) -> (String, u64) {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), secs % 86_400)
}

#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, module_path!(), format_args!($($arg)+))
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::log::LogLevel::Error, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::log::LogLevel::Warn, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::log::LogLevel::Info, $($arg)+) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::log::LogLevel::Debug, $($arg)+) }; }
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log!($crate::log::LogLevel::Trace, $($arg)+) }; }

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// Lines this test thread writes, when it asked for them.
        static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// True when the line was kept for the test instead of going to stderr.
    pub(super) fn captured(line: &str) -> bool {
        CAPTURE.with(|capture| match capture.borrow_mut().as_mut() {
            Some(lines) => {
                lines.push(line.to_string());
                true
            }
            None => false,
        })
    }

    fn capture(f: impl FnOnce()) -> Vec<String> {
        CAPTURE.with(|capture| *capture.borrow_mut() = Some(Vec::new()));
        f();
        CAPTURE.with(|capture| capture.borrow_mut().take().unwrap_or_default())
    }

    #[test]
    fn library_log_records_become_masked_lines_one_level_quieter() {
        redact(["facade-secret-9876".to_string()]);
        set_level(LogLevel::Info);
        let lines = capture(|| {
            ::log::warn!(target: "rustls::conn", "peer sent bad cert; token facade-secret-9876");
            ::log::info!(target: "ureq::pool", "connection reused");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].ends_with(" WARN  rustls::conn: peer sent bad cert; token <redacted>\n"),
            "{lines:?}"
        );
        set_level(LogLevel::Debug);
        let lines = capture(|| {
            ::log::info!(target: "ureq::pool", "connection reused");
            ::log::debug!(target: "ureq::pool", "too chatty for debug");
        });
        set_level(LogLevel::Info);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains(" DEBUG ureq::pool: connection reused"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_links_lines_name_the_link_and_threads_it_starts_inherit_it() {
        let ms = 1_795_329_245_123;
        let text = format_line_of(
            Some("alice"),
            false,
            ms,
            LogLevel::Info,
            "router",
            "session-ab12cd34",
            "up",
        );
        assert_eq!(
            text,
            "2026-11-22T06:34:05.123Z INFO  router: (alice) [ab12cd34] up\n"
        );
        let json = format_line_of(Some("alice"), true, ms, LogLevel::Info, "router", "x", "up");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["link"], "alice");
        set_link(Some("bob"));
        let inherited = std::thread::spawn(inherit(|| link().map(|l| l.to_string())))
            .join()
            .unwrap();
        set_link(None);
        assert_eq!(inherited.as_deref(), Some("bob"));
        assert_eq!(link(), None);
    }

    #[test]
    fn lines_carry_time_level_module_and_session() {
        let ms = 1_795_329_245_123;
        let check = |json: bool, thread: &str, message: &str, expected: &str| {
            let line = format_line(json, ms, LogLevel::Info, "session", thread, message);
            assert_eq!(line, format!("{expected}\n"));
        };
        check(
            false,
            "bridge",
            "[ab12cd34] thread created",
            "2026-11-22T06:34:05.123Z INFO  session: [ab12cd34] thread created",
        );
        check(
            false,
            "session-ab12cd34",
            "reply edit failed",
            "2026-11-22T06:34:05.123Z INFO  session: [ab12cd34] reply edit failed",
        );
        check(
            false,
            "bridge",
            "[not an id] x",
            "2026-11-22T06:34:05.123Z INFO  session: [not an id] x",
        );
        check(
            true,
            "bridge",
            "[ab12cd34] said \"hi\"",
            r#"{"level":"info","module":"session","msg":"said \"hi\"","session":"ab12cd34","ts":"2026-11-22T06:34:05.123Z"}"#,
        );
        check(
            true,
            "main",
            "ready",
            r#"{"level":"info","module":"session","msg":"ready","ts":"2026-11-22T06:34:05.123Z"}"#,
        );
    }

    #[test]
    fn text_lines_escape_control_characters_so_remote_text_cannot_forge_a_line() {
        let title = "Tour\n2026-11-22T06:34:05.123Z ERROR router: forged\r\u{1b}[2J\u{2028}x\ttab";
        let line = format_line(false, 0, LogLevel::Info, "router", "bridge", title);
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z INFO  router: Tour\\n2026-11-22T06:34:05.123Z ERROR router: \
             forged\\r\\u{1b}[2J\\u{2028}x\\ttab\n"
        );
        let line = format_line(
            false,
            0,
            LogLevel::Info,
            "router",
            "bridge",
            "[ab12cd34] a\nb ü",
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z INFO  router: [ab12cd34] a\\nb ü\n"
        );
        // JSON lines escape through serde_json already.
        let line = format_line(true, 0, LogLevel::Info, "router", "bridge", "a\nb");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
    }

    #[test]
    fn registered_secrets_are_masked_even_inside_urls_and_headers() {
        let args: Vec<String> = ["--mattermost-url", "https://chat.example.com"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = |name: &str| match name {
            "MATTERMOST_TOKEN" => Some("tok-masked-0123456789".to_string()),
            "MATTERMOST_OWNER" => Some("alice".to_string()),
            "OPENCODE_SERVER_PASSWORD" => Some("pw-masked-42".to_string()),
            "HOME" => Some("/home/alice".to_string()),
            _ => None,
        };
        let Ok(crate::config::Invocation::Run(config)) = crate::config::parse(&args, &env) else {
            panic!("a valid configuration");
        };
        redact(config.secrets());
        let basic = crate::http::basic_auth("opencode", "pw-masked-42");
        let masked = mask_secrets(format!(
            "GET https://x/?access_token=tok-masked-0123456789 failed; Authorization: {basic}; \
             password pw-masked-42"
        ));
        assert_eq!(
            masked,
            "GET https://x/?access_token=<redacted> failed; Authorization: Basic <redacted>; \
             password <redacted>"
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-22T06:34:05.123Z
        assert_eq!(utc_timestamp(1_795_329_245_123), "2026-11-22T06:34:05.123Z");
        assert_eq!(utc_minute(951_782_400_000), "2000-02-29 00:00 UTC");
    }
}
