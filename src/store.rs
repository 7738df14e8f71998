//! Keeps the thread↔session mapping in `state.json`; the only module that writes the state dir.
//!
//! Every save writes a temporary file next to `state.json`, fsyncs it, renames it over `state.json`
//! and fsyncs the directory, so a SIGKILL at any moment leaves either the old or the new document,
//! never a mix. A damaged file is moved aside (never overwritten, never deleted) and whatever
//! records still parse are kept. An advisory `flock` on `<state_dir>/lock` keeps a second bridge
//! off the same directory.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The newest `state.json` layout this build reads and writes.
pub const STATE_VERSION: u32 = 1;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const HEARTBEAT_FILE: &str = "heartbeat.json";
/// Prefix of the temporary files a save writes before renaming; leftovers from a crash are removed
/// on open.
const TEMP_PREFIX: &str = "state.json.tmp";

/// The whole persisted document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// When the bridge first started on this state dir (ms since epoch). Sessions created before it
    /// get no thread automatically.
    pub first_started_ms: u64,
    /// Mattermost side: last post processed in the owner DM (for catch-up later).
    #[serde(default)]
    pub mattermost: MattermostCursor,
    /// Keyed by OpenCode server key (its base URL), then session id. BTreeMap for stable output.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerState>,
    /// Owner posts past the cursor whose handling waits on a look-up (a reply in a thread the bridge
    /// has no record of yet): post id → `create_at`. A restart handles them again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unresolved_posts: BTreeMap<String, i64>,
    /// The `!board` post the bridge keeps current; None: no board. One per link, across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board_post_id: Option<String>,
}

/// The last owner-DM post the bridge has processed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MattermostCursor {
    pub last_post_id: String,
    pub last_post_at: i64,
}

/// The sessions of one OpenCode server, keyed by session id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    #[serde(default)]
    pub sessions: BTreeMap<String, ThreadRecord>,
    /// Threads being created: session id → when (ms since epoch). Recorded before the root is posted,
    /// so after a crash the bridge looks for that root instead of posting a second one.
    #[serde(default)]
    pub root_intents: BTreeMap<String, u64>,
    /// Owner prompts accepted from Mattermost but not yet handed to OpenCode (queued behind a
    /// running turn, or waiting for the server): post id → the session. A restart sends them on.
    #[serde(default)]
    pub pending_prompts: BTreeMap<String, PendingPrompt>,
    /// The OpenCode API the bridge speaks to this server and why, as last probed (`v2: only
    /// /api/health answers …`), for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

/// A prompt the bridge owes a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPrompt {
    pub session_id: String,
    /// The post's `create_at` (ms since epoch): recovered prompts go in this order.
    pub create_at: i64,
    /// When this host took it on (ms since epoch): only a prompt sent from then on is this one, not
    /// an earlier send of the same post (🔁). 0 in files written before it was kept: any send.
    #[serde(default)]
    pub owed_at_ms: u64,
}

/// The Mattermost thread that mirrors one OpenCode session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub root_post_id: String,
    pub channel_id: String,
    pub directory: String,
    pub title: String,
    pub slug: String,
    pub created_ms: u64,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    #[serde(default)]
    pub parent_id: Option<String>,
    /// The last assistant message whose final text is in the thread.
    #[serde(default)]
    pub delivered_message_id: Option<String>,
    /// When the thread was last known complete (ms since epoch); 0 when never recorded.
    #[serde(default)]
    pub delivered_at_ms: u64,
    /// The first post of a reply still streaming; a restart resumes it instead of starting another.
    #[serde(default)]
    pub streaming_post_id: Option<String>,
    /// v2 servers: the `seq` of the session's durable log up to which the thread is complete; a
    /// restarted worker posts exactly the turns that ended after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_seq: Option<u64>,
    /// The owner's `!model` choice for the session, `provider/model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The owner's `!agent` choice for the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// Owns the state directory for as long as it lives: holds the instance lock and writes
/// `state.json`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state_path: PathBuf,
    temp_path: PathBuf,
    /// Kept open only so the `flock` lasts as long as the Store.
    _lock: File,
    /// The bytes `state.json` holds now, as far as we know; a save with identical bytes is skipped.
    last_written: Mutex<Option<Vec<u8>>>,
}

/// Why the state directory could not be used.
#[derive(Debug)]
pub enum StoreError {
    /// Reading or writing a file in the state directory failed. Fatal at startup; on save the
    /// caller should log it, tell the owner, and try again on the next change.
    Io { path: PathBuf, source: io::Error },
    /// `state.json` was written by a newer opencode-mattermost. Fatal; the file is left untouched.
    FutureVersion { path: PathBuf, found: u32 },
    /// Another process holds the instance lock on this state directory. Fatal.
    Locked { path: PathBuf, pid: Option<u32> },
}

/// What the running bridge writes to `heartbeat.json` every ~30 s, for `status` and watchdogs.
/// Times are ms since the epoch; 0 means never.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    pub pid: u32,
    pub version: String,
    pub started_ms: u64,
    pub written_ms: u64,
    /// Any websocket frame from Mattermost, pongs included.
    pub mattermost_heard_ms: u64,
    /// Any bytes of OpenCode's event stream (it sends a heartbeat every ~10 s), or a good poll.
    pub opencode_heard_ms: u64,
    /// Written as the bridge stops, so `status` does not report a dead bridge as recently alive.
    pub stopped: bool,
    /// Per OpenCode server followed (by its name): when it was last heard from, as above.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub opencode_servers: std::collections::BTreeMap<String, u64>,
}

/// Writes `heartbeat.json`. Only a [`Store`], which holds the instance lock, hands one out.
#[derive(Debug, Clone)]
pub struct HeartbeatWriter {
    path: PathBuf,
    temp_path: PathBuf,
}

/// Something the caller should report as a warning after a successful open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadNote {
    /// `state.json` was damaged and has been moved to `moved_to`. `kept_sessions` thread records
    /// were recovered; `lost_entries` counts the records (or whole server entries) that were found
    /// but could not be read.
    Recovered {
        moved_to: PathBuf,
        problem: String,
        kept_sessions: usize,
        lost_entries: usize,
    },
}

impl Store {
    /// Opens (creating, mode 0700) the state dir, takes the instance lock and loads `state.json`.
    ///
    /// A missing file gives a fresh State that is not written yet. A damaged file is moved to
    /// `state.json.corrupt-<now_ms>`, the readable records are kept, the recovered state is written
    /// at once and a [`LoadNote`] says what happened. A file from a newer version is refused and
    /// left untouched.
    pub fn open(dir: &Path, now_ms: u64) -> Result<(Store, State, Vec<LoadNote>), StoreError> {
        create_dir(dir)?;
        let lock = lock_dir(dir)?;
        remove_leftover_temp_files(dir)?;

        let state_path = dir.join(STATE_FILE);
        let store = Store {
            dir: dir.to_path_buf(),
            temp_path: dir.join(format!("{TEMP_PREFIX}-{}", std::process::id())),
            state_path,
            _lock: lock,
            last_written: Mutex::new(None),
        };

        let bytes = match fs::read(&store.state_path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Ok((store, fresh_state(now_ms), Vec::new()));
            }
            Err(err) => return Err(io_error(&store.state_path, err)),
        };

        match parse_state(&bytes, now_ms) {
            Parsed::Valid(state) => {
                *store.last_written_guard() = Some(bytes);
                Ok((store, state, Vec::new()))
            }
            Parsed::Future(found) => Err(StoreError::FutureVersion {
                path: store.state_path.clone(),
                found,
            }),
            Parsed::Damaged {
                state,
                problem,
                kept_sessions,
                lost_entries,
            } => {
                let moved_to = store.move_aside(now_ms)?;
                store.save(&state)?;
                let note = LoadNote::Recovered {
                    moved_to,
                    problem,
                    kept_sessions,
                    lost_entries,
                };
                Ok((store, state, vec![note]))
            }
        }
    }

    /// Atomically replaces `state.json` with `state`. Skipped when the bytes equal the last ones
    /// written.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(state)
            .map_err(|err| io_error(&self.state_path, io::Error::from(err)))?;
        bytes.push(b'\n');

        let mut last_written = self.last_written_guard();
        if last_written.as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        if let Err(err) = self.write_atomically(&bytes) {
            // Best effort: a leftover temp file is harmless and removed on the next open anyway.
            let _ = fs::remove_file(&self.temp_path);
            return Err(err);
        }
        *last_written = Some(bytes);
        Ok(())
    }

    /// The path of `state.json`.
    pub fn path(&self) -> &Path {
        &self.state_path
    }

    /// The writer of this directory's heartbeat file, for the heartbeat thread.
    pub fn heartbeat_writer(&self) -> HeartbeatWriter {
        HeartbeatWriter {
            path: self.dir.join(HEARTBEAT_FILE),
            temp_path: self
                .dir
                .join(format!("{HEARTBEAT_FILE}.tmp-{}", std::process::id())),
        }
    }

    fn write_atomically(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let temp = &self.temp_path;
        let mut file = private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)
            .map_err(|err| io_error(temp, err))?;
        file.write_all(bytes).map_err(|err| io_error(temp, err))?;
        file.sync_all().map_err(|err| io_error(temp, err))?;
        drop(file);
        fs::rename(temp, &self.state_path).map_err(|err| io_error(&self.state_path, err))?;
        sync_dir(&self.dir)
    }

    /// Renames the damaged `state.json` to a name that does not exist yet, so no earlier evidence
    /// is overwritten.
    fn move_aside(&self, now_ms: u64) -> Result<PathBuf, StoreError> {
        for attempt in 0u32.. {
            let name = match attempt {
                0 => format!("{STATE_FILE}.corrupt-{now_ms}"),
                n => format!("{STATE_FILE}.corrupt-{now_ms}-{n}"),
            };
            let candidate = self.dir.join(name);
            match fs::symlink_metadata(&candidate) {
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(&candidate, err)),
            }
            // We hold the instance lock, so nothing of ours can create `candidate` between the
            // check and here.
            fs::rename(&self.state_path, &candidate)
                .map_err(|err| io_error(&self.state_path, err))?;
            sync_dir(&self.dir)?;
            return Ok(candidate);
        }
        Err(io_error(
            &self.state_path,
            io::Error::other("no free name to move the damaged file to"),
        ))
    }

    fn last_written_guard(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        // A panic elsewhere while holding the lock cannot leave the cache inconsistent with disk in
        // a harmful way: at worst the next save writes identical bytes again.
        self.last_written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl HeartbeatWriter {
    /// Replaces the heartbeat file by renaming a fresh temporary file over it, so a reader never
    /// sees half of one. Not fsynced: after a crash a stale heartbeat is what it should show anyway.
    pub fn write(&self, heartbeat: &Heartbeat) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(heartbeat)
            .map_err(|err| io_error(&self.path, io::Error::from(err)))?;
        let result = private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.temp_path)
            .and_then(|mut file| file.write_all(&bytes))
            .and_then(|()| fs::rename(&self.temp_path, &self.path));
        result.map_err(|err| {
            let _ = fs::remove_file(&self.temp_path);
            io_error(&self.path, err)
        })
    }
}

/// Reads `heartbeat.json`; `None` when there is none (no bridge ever ran here).
pub fn read_heartbeat(dir: &Path) -> Result<Option<Heartbeat>, String> {
    let path = dir.join(HEARTBEAT_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a heartbeat file: {e}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

/// Reads `state.json` without the lock and without repairing anything: `None` when there is none.
pub fn read_state(dir: &Path) -> Result<Option<State>, String> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(format!(
                "cannot read {}: {err}; check that this user can read it",
                path.display()
            ));
        }
    };
    match parse_state(&bytes, 0) {
        Parsed::Valid(state) => Ok(Some(state)),
        Parsed::Future(found) => Err(format!(
            "{} has version {found}, newer than this build reads ({STATE_VERSION}); upgrade \
             opencode-mattermost",
            path.display()
        )),
        Parsed::Damaged { problem, .. } => Err(format!(
            "{} is damaged ({problem}); the bridge moves it aside and keeps what it can on its \
             next start",
            path.display()
        )),
    }
}

/// Creates the state directory if needed and writes and removes a probe file in it, to prove the
/// bridge could save there.
pub fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    create_dir(dir)?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|mut file| file.write_all(b"probe"))
        .map_err(|err| io_error(&probe, err))?;
    fs::remove_file(&probe).map_err(|err| io_error(&probe, err))
}

/// The PID of the bridge holding the instance lock on `dir`, or `None` when none does.
///
/// Reads `/proc/locks` rather than trying the lock, so that asking never makes a bridge that is
/// starting at that moment think another one is running. Where `/proc/locks` cannot be read, a
/// shared lock is tried and released at once.
pub fn running_pid(dir: &Path) -> Result<Option<u32>, String> {
    let path = dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    };
    let pid_in_file = fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    let inode = {
        use std::os::unix::fs::MetadataExt;
        file.metadata()
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?
            .ino()
    };
    let held_by = match fs::read_to_string("/proc/locks") {
        Ok(locks) => flock_holder(&locks, inode),
        Err(_) => match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                None
            }
            Err(_) => Some(pid_in_file.unwrap_or(0)),
        },
    };
    // The PID the holder wrote is the one to show: /proc/locks counts in the reader's PID namespace.
    Ok(held_by.map(|holder| pid_in_file.unwrap_or(holder)))
}

/// The PID of the exclusive `flock` on the file with `inode`, from the text of `/proc/locks`, whose
/// lines look like `1: FLOCK  ADVISORY  WRITE 1234 00:2a:56789 0 EOF` (waiters have `->` after the
/// number).
fn flock_holder(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let at = fields.iter().position(|field| *field == "FLOCK")?;
        let (pid, device_inode) = (fields.get(at + 3)?, fields.get(at + 4)?);
        let line_inode: u64 = device_inode.rsplit(':').next()?.parse().ok()?;
        (line_inode == inode).then(|| pid.parse().ok()).flatten()
    })
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, source } => write!(
                f,
                "state file {}: {source}; check that this user can read and write it or set \
                 OPENCODE_MM_STATE_DIR to another directory",
                path.display()
            ),
            StoreError::FutureVersion { path, found } => write!(
                f,
                "state file {} has version {found} but this opencode-mattermost understands only \
                 version {STATE_VERSION}; upgrade opencode-mattermost or set OPENCODE_MM_STATE_DIR \
                 to another directory",
                path.display()
            ),
            StoreError::Locked { path, pid } => {
                let holder = match pid {
                    Some(pid) => format!("another opencode-mattermost (pid {pid})"),
                    None => "another opencode-mattermost".to_string(),
                };
                write!(
                    f,
                    "{holder} is already running on state directory {}; stop it or set \
                     OPENCODE_MM_STATE_DIR to another directory",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::FutureVersion { .. } | StoreError::Locked { .. } => None,
        }
    }
}

impl fmt::Display for LoadNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadNote::Recovered {
                moved_to,
                problem,
                kept_sessions,
                lost_entries,
            } => write!(
                f,
                "state file was damaged ({problem}); moved it to {}, kept {kept_sessions} \
                 session(s) and lost {lost_entries} entr{}; threads of lost sessions will no \
                 longer be linked",
                moved_to.display(),
                if *lost_entries == 1 { "y" } else { "ies" }
            ),
        }
    }
}

enum Parsed {
    Valid(State),
    Future(u32),
    Damaged {
        state: State,
        problem: String,
        kept_sessions: usize,
        lost_entries: usize,
    },
}

fn fresh_state(now_ms: u64) -> State {
    State {
        version: STATE_VERSION,
        first_started_ms: now_ms,
        ..State::default()
    }
}

/// Classifies the bytes of `state.json` and salvages what it can from a damaged document.
fn parse_state(bytes: &[u8], now_ms: u64) -> Parsed {
    // Taking the first JSON value, rather than demanding the whole file be one, also salvages a
    // document with garbage appended to it.
    let value = match serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .next()
    {
        Some(Ok(value)) => value,
        Some(Err(err)) => return damaged_fresh(format!("not valid JSON: {err}"), now_ms),
        None => return damaged_fresh("the file is empty".to_string(), now_ms),
    };
    let Value::Object(fields) = &value else {
        return damaged_fresh("the document is not a JSON object".to_string(), now_ms);
    };

    let version_problem = match fields.get("version") {
        Some(Value::Number(number)) => match number.as_u64() {
            Some(version) if version > u64::from(STATE_VERSION) => {
                return Parsed::Future(u32::try_from(version).unwrap_or(u32::MAX));
            }
            Some(version) if version == u64::from(STATE_VERSION) => None,
            _ => Some(format!("version {number} is not valid")),
        },
        Some(_) => Some("the version is not a number".to_string()),
        None => Some("the version is missing".to_string()),
    };

    let whole = serde_json::from_value::<State>(value.clone());
    let problem = match (version_problem, whole) {
        (None, Ok(state)) => return Parsed::Valid(state),
        (Some(problem), _) => problem,
        (None, Err(err)) => err.to_string(),
    };

    let mut state = fresh_state(now_ms);
    if let Some(first_started_ms) = fields.get("first_started_ms").and_then(Value::as_u64) {
        state.first_started_ms = first_started_ms;
    }
    if let Some(cursor) = fields.get("mattermost") {
        state.mattermost = MattermostCursor::deserialize(cursor).unwrap_or_default();
    }
    if let Some(board) = fields.get("board_post_id") {
        state.board_post_id = Option::deserialize(board).unwrap_or_default();
    }
    if let Some(unresolved) = fields.get("unresolved_posts") {
        state.unresolved_posts = BTreeMap::deserialize(unresolved).unwrap_or_default();
    }
    let mut kept_sessions = 0;
    let mut lost_entries = 0;
    match fields.get("servers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(servers)) => {
            for (server_key, server) in servers {
                let sessions = match server.get("sessions") {
                    None | Some(Value::Null) if server.is_object() => continue,
                    Some(Value::Object(sessions)) => sessions,
                    _ => {
                        lost_entries += 1;
                        continue;
                    }
                };
                for (session_id, record) in sessions {
                    match ThreadRecord::deserialize(record) {
                        Ok(record) => {
                            let server_state = state.servers.entry(server_key.clone()).or_default();
                            server_state.sessions.insert(session_id.clone(), record);
                            kept_sessions += 1;
                        }
                        Err(_) => lost_entries += 1,
                    }
                }
            }
        }
        Some(_) => lost_entries += 1,
    }
    Parsed::Damaged {
        state,
        problem,
        kept_sessions,
        lost_entries,
    }
}

fn damaged_fresh(problem: String, now_ms: u64) -> Parsed {
    Parsed::Damaged {
        state: fresh_state(now_ms),
        problem,
        kept_sessions: 0,
        lost_entries: 0,
    }
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|err| io_error(dir, err))
}

/// Takes the exclusive instance lock and records our PID in it, so a refused second instance can
/// name us.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    // Not truncating on open: until we hold the lock, the PID inside belongs to whoever does.
    let mut file = private_file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|err| io_error(&path, err))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut contents = String::new();
            let pid = file
                .read_to_string(&mut contents)
                .ok()
                .and_then(|_| contents.trim().parse().ok());
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid,
            });
        }
        Err(TryLockError::Error(err)) => return Err(io_error(&path, err)),
    }
    let write_pid = |file: &mut File| -> io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())
    };
    write_pid(&mut file).map_err(|err| io_error(&path, err))?;
    Ok(file)
}

/// Removes temp files left by a save that was killed before its rename; they never hold the current
/// state.
fn remove_leftover_temp_files(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|err| io_error(dir, err))?;
    for entry in entries {
        let entry = entry.map_err(|err| io_error(dir, err))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(&path, err)),
            }
        }
    }
    Ok(())
}

fn private_file_options() -> OpenOptions {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        let handle = File::open(dir).map_err(|err| io_error(dir, err))?;
        handle.sync_all().map_err(|err| io_error(dir, err))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    /// A fresh, empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("ocmm-store-{name}-{}-{unique}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }

        fn write_state(&self, contents: &str) {
            fs::create_dir_all(&self.0).unwrap();
            fs::write(self.0.join(STATE_FILE), contents).unwrap();
        }

        fn file_names(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn record(title: &str) -> ThreadRecord {
        ThreadRecord {
            root_post_id: format!("post-{title}"),
            channel_id: "dm".to_string(),
            directory: "/tmp/p".to_string(),
            title: title.to_string(),
            slug: title.to_lowercase(),
            created_ms: 5,
            ended_ms: None,
            parent_id: None,
            delivered_message_id: Some("msg_1".to_string()),
            delivered_at_ms: 7,
            streaming_post_id: None,
            delivered_seq: Some(12),
            model: None,
            agent: None,
        }
    }

    fn sample_state() -> State {
        let mut state = fresh_state(42);
        state.mattermost = MattermostCursor {
            last_post_id: "p9".to_string(),
            last_post_at: 99,
        };
        let server = state
            .servers
            .entry("http://127.0.0.1:4096".to_string())
            .or_default();
        server.sessions.insert("ses_a".to_string(), record("Alpha"));
        server.sessions.insert(
            "ses_b".to_string(),
            ThreadRecord {
                ended_ms: Some(7),
                model: Some("fake/fake-model".to_string()),
                agent: Some("plan".to_string()),
                ..record("Beta")
            },
        );
        state
    }

    fn recovered(notes: &[LoadNote]) -> (&Path, &str, usize, usize) {
        match notes {
            [
                LoadNote::Recovered {
                    moved_to,
                    problem,
                    kept_sessions,
                    lost_entries,
                },
            ] => (moved_to, problem, *kept_sessions, *lost_entries),
            other => panic!("expected one Recovered note, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_gives_fresh_unwritten_state_in_private_dir() {
        let dir = TempDir::new("fresh");
        let nested = dir.0.join("a/b");
        let (store, state, notes) = Store::open(&nested, NOW).unwrap();
        assert_eq!(
            state,
            State {
                version: STATE_VERSION,
                first_started_ms: NOW,
                ..State::default()
            }
        );
        assert!(notes.is_empty());
        assert_eq!(store.path(), nested.join("state.json"));
        assert!(!store.path().exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&nested).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "state dir mode {mode:o} is readable by others"
            );
        }
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("roundtrip");
        let state = sample_state();
        {
            let (store, _, _) = Store::open(&dir.0, NOW).unwrap();
            store.save(&state).unwrap();
        }
        let (_, loaded, notes) = Store::open(&dir.0, NOW + 1).unwrap();
        assert_eq!(loaded, state);
        assert!(notes.is_empty());
    }

    #[test]
    fn identical_save_is_skipped() {
        let dir = TempDir::new("skip");
        let (store, _, _) = Store::open(&dir.0, NOW).unwrap();
        let state = sample_state();
        store.save(&state).unwrap();
        // Replace the file behind the store's back: a skipped save leaves it alone, a changed one
        // rewrites it.
        fs::write(store.path(), "sentinel").unwrap();
        store.save(&state).unwrap();
        assert_eq!(fs::read_to_string(store.path()).unwrap(), "sentinel");
        let mut changed = state.clone();
        changed.mattermost.last_post_at = 100;
        store.save(&changed).unwrap();
        assert!(fs::read_to_string(store.path()).unwrap().contains("100"));
    }

    #[test]
    fn save_of_loaded_unchanged_state_is_skipped() {
        let dir = TempDir::new("skip-loaded");
        {
            let (store, _, _) = Store::open(&dir.0, NOW).unwrap();
            store.save(&sample_state()).unwrap();
        }
        let (store, state, _) = Store::open(&dir.0, NOW).unwrap();
        fs::write(store.path(), "sentinel").unwrap();
        store.save(&state).unwrap();
        assert_eq!(fs::read_to_string(store.path()).unwrap(), "sentinel");
    }

    #[test]
    fn leftover_temp_file_is_ignored_and_removed() {
        let dir = TempDir::new("leftover");
        {
            let (store, _, _) = Store::open(&dir.0, NOW).unwrap();
            store.save(&sample_state()).unwrap();
        }
        // A save killed after writing half of its temp file.
        fs::write(
            dir.0.join("state.json.tmp-999"),
            "{\"version\": 1, \"first_sta",
        )
        .unwrap();
        let (store, state, notes) = Store::open(&dir.0, NOW).unwrap();
        assert_eq!(state, sample_state());
        assert!(notes.is_empty());
        assert_eq!(dir.file_names(), ["lock", "state.json"]);
        let mut changed = state;
        changed.first_started_ms = 1;
        store.save(&changed).unwrap();
        assert_eq!(dir.file_names(), ["lock", "state.json"]);
    }

    #[test]
    fn corrupt_file_is_moved_aside_and_good_records_kept() {
        let dir = TempDir::new("partial");
        let original = r#"{
            "version": 1,
            "first_started_ms": 42,
            "mattermost": {"last_post_id": "p9", "last_post_at": 99},
            "servers": {
                "http://a": {"sessions": {
                    "ses_good": {"root_post_id": "r", "channel_id": "c", "directory": "/d",
                                 "title": "t", "slug": "s", "created_ms": 5},
                    "ses_bad": {"root_post_id": 17}
                }},
                "http://b": "not a server"
            }
        }"#;
        dir.write_state(original);
        let (store, state, notes) = Store::open(&dir.0, NOW).unwrap();
        let (moved_to, problem, kept, lost) = recovered(&notes);
        assert_eq!(moved_to, dir.0.join(format!("state.json.corrupt-{NOW}")));
        assert_eq!(fs::read_to_string(moved_to).unwrap(), original);
        assert!(problem.contains("invalid type"), "{problem}");
        assert_eq!((kept, lost), (1, 2));
        assert_eq!(state.first_started_ms, 42);
        assert_eq!(state.mattermost.last_post_id, "p9");
        assert_eq!(state.servers.len(), 1);
        assert_eq!(state.servers["http://a"].sessions["ses_good"].slug, "s");
        // The recovered state is already on disk, so a crash now loses nothing more.
        let (_, reloaded, notes) = {
            drop(store);
            Store::open(&dir.0, NOW + 1).unwrap()
        };
        assert_eq!(reloaded, state);
        assert!(notes.is_empty());
    }

    #[test]
    fn truncated_file_starts_fresh_and_keeps_the_evidence() {
        let dir = TempDir::new("truncated");
        let full = serde_json::to_string_pretty(&sample_state()).unwrap();
        let truncated = &full[..full.len() / 2];
        dir.write_state(truncated);
        let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
        let (moved_to, problem, kept, lost) = recovered(&notes);
        assert!(problem.starts_with("not valid JSON: EOF"), "{problem}");
        assert_eq!((kept, lost), (0, 0));
        assert_eq!(state, fresh_state(NOW));
        assert_eq!(fs::read_to_string(moved_to).unwrap(), truncated);
    }

    #[test]
    fn empty_file_starts_fresh() {
        let dir = TempDir::new("empty");
        dir.write_state("");
        let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
        let (_, problem, kept, lost) = recovered(&notes);
        assert_eq!((problem, kept, lost), ("the file is empty", 0, 0));
        assert_eq!(state, fresh_state(NOW));
    }

    #[test]
    fn second_corruption_in_the_same_millisecond_does_not_overwrite_the_first() {
        let dir = TempDir::new("twice");
        dir.write_state("first garbage");
        drop(Store::open(&dir.0, NOW).unwrap());
        dir.write_state("second garbage");
        let (_, _, notes) = Store::open(&dir.0, NOW).unwrap();
        let (moved_to, ..) = recovered(&notes);
        assert_eq!(moved_to, dir.0.join(format!("state.json.corrupt-{NOW}-1")));
        let first = dir.0.join(format!("state.json.corrupt-{NOW}"));
        assert_eq!(fs::read_to_string(first).unwrap(), "first garbage");
        assert_eq!(fs::read_to_string(moved_to).unwrap(), "second garbage");
    }

    #[test]
    fn version_zero_or_missing_is_recovered() {
        for document in [
            r#"{"version": 0, "first_started_ms": 3, "servers": {}}"#,
            r#"{"first_started_ms": 3}"#,
            r#"{"version": "1", "first_started_ms": 3}"#,
        ] {
            let dir = TempDir::new("v0");
            dir.write_state(document);
            let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
            recovered(&notes);
            assert_eq!(state, fresh_state(3), "{document}");
        }
    }

    #[test]
    fn non_object_document_is_recovered() {
        let dir = TempDir::new("array");
        dir.write_state("[1, 2]");
        let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
        assert_eq!(recovered(&notes).1, "the document is not a JSON object");
        assert_eq!(state, fresh_state(NOW));
    }

    #[test]
    fn future_version_is_refused_and_file_untouched() {
        let dir = TempDir::new("future");
        let document = r#"{"version": 2, "first_started_ms": 3, "servers": {"x": "new shape"}}"#;
        dir.write_state(document);
        let err = Store::open(&dir.0, NOW).unwrap_err();
        assert!(
            matches!(err, StoreError::FutureVersion { found: 2, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("has version 2"), "{message}");
        assert!(
            message.contains("upgrade opencode-mattermost or set OPENCODE_MM_STATE_DIR"),
            "{message}"
        );
        assert_eq!(
            fs::read_to_string(dir.0.join(STATE_FILE)).unwrap(),
            document
        );
        assert_eq!(dir.file_names(), ["lock", "state.json"]);
    }

    #[test]
    fn huge_future_version_saturates() {
        let dir = TempDir::new("huge");
        dir.write_state(r#"{"version": 99999999999}"#);
        let err = Store::open(&dir.0, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::FutureVersion {
                    found: u32::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let dir = TempDir::new("unknown");
        dir.write_state(
            r#"{"version": 1, "first_started_ms": 3, "added_later": [1],
                "mattermost": {"last_post_id": "p", "extra": true},
                "servers": {"http://a": {"color": "red", "sessions": {"s": {
                    "root_post_id": "r", "channel_id": "c", "directory": "/d", "title": "t",
                    "slug": "s", "created_ms": 5, "model": "x"}}}}}"#,
        );
        let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(state.mattermost.last_post_id, "p");
        assert_eq!(state.servers["http://a"].sessions["s"].created_ms, 5);
    }

    #[test]
    fn second_open_of_a_locked_dir_fails_with_the_holders_pid() {
        let dir = TempDir::new("lock");
        let (first, _, _) = Store::open(&dir.0, NOW).unwrap();
        let err = Store::open(&dir.0, NOW).unwrap_err();
        let StoreError::Locked { pid, .. } = &err else {
            panic!("expected Locked, got {err:?}")
        };
        assert_eq!(*pid, Some(std::process::id()));
        assert_eq!(
            err.to_string(),
            format!(
                "another opencode-mattermost (pid {}) is already running on state directory {}; \
                 stop it or set OPENCODE_MM_STATE_DIR to another directory",
                std::process::id(),
                dir.0.display()
            )
        );
        drop(first);
        Store::open(&dir.0, NOW).unwrap();
    }

    #[test]
    fn unwritable_location_names_the_path() {
        let dir = TempDir::new("blocked");
        fs::create_dir_all(&dir.0).unwrap();
        let file_in_the_way = dir.0.join("state");
        fs::write(&file_in_the_way, "").unwrap();
        let err = Store::open(&file_in_the_way, NOW).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&*file_in_the_way.to_string_lossy()),
            "{err}"
        );
    }

    const CHILD_DIR_VAR: &str = "OCMM_STORE_TEST_CHILD_DIR";
    const CHILD_SESSIONS: usize = 200;

    /// Run as a child process by `sigkill_during_saves_never_leaves_a_partial_file`; saves until
    /// killed, or until its parent stops reading.
    #[test]
    #[ignore = "helper process for sigkill_during_saves_never_leaves_a_partial_file"]
    fn child_saving_until_killed() {
        let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
            return;
        };
        let (store, mut state, _) = Store::open(Path::new(&dir), NOW).unwrap();
        let server = state.servers.entry("http://a".to_string()).or_default();
        for i in 0..CHILD_SESSIONS {
            server
                .sessions
                .insert(format!("ses_{i:04}"), record(&format!("T{i}")));
        }
        let mut stdout = io::stdout();
        for generation in 0..1_000_000 {
            state.mattermost.last_post_at = generation;
            store.save(&state).unwrap();
            if writeln!(stdout, "saved {generation}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return;
            }
        }
    }

    /// Kills the child however the test ends, so a failing assertion cannot leave it saving
    /// forever.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn sigkill_during_saves_never_leaves_a_partial_file() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        use std::sync::mpsc;
        use std::time::{Duration, Instant};

        let dir = TempDir::new("sigkill");
        let state_path = dir.0.join(STATE_FILE);
        let module = module_path!();
        let test_name = format!(
            "{}::child_saving_until_killed",
            module.split_once("::").map_or(module, |(_, rest)| rest)
        );
        for round in 0..5 {
            let mut child = KillOnDrop(
                Command::new(std::env::current_exe().unwrap())
                    .args([
                        &test_name,
                        "--exact",
                        "--ignored",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(CHILD_DIR_VAR, &dir.0)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let stdout = child.0.stdout.take().unwrap();
            let (lines_tx, lines_rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in io::BufReader::new(stdout).lines() {
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            });
            // Kill at a different point each round. Meanwhile, read state.json as a reader racing
            // the saves would: it must always be a whole document.
            let saves_before_kill = 3 + round * 7;
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut saves_seen = 0;
            let mut reads = 0;
            while saves_seen < saves_before_kill {
                match lines_rx.try_recv() {
                    Ok(Ok(line)) if line.starts_with("saved ") => saves_seen += 1,
                    Ok(Ok(_)) | Err(mpsc::TryRecvError::Empty) => {}
                    Ok(Err(err)) => panic!("reading the child's output: {err}"),
                    Err(mpsc::TryRecvError::Disconnected) => {
                        panic!("child exited after {saves_seen} saves")
                    }
                }
                if let Ok(bytes) = fs::read(&state_path) {
                    reads += 1;
                    let parsed = serde_json::from_slice::<State>(&bytes);
                    assert!(
                        parsed.is_ok(),
                        "round {round}: read {} partial bytes",
                        bytes.len()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "child saved only {saves_seen} times in 20 s"
                );
            }
            drop(child);

            let (_, state, notes) = Store::open(&dir.0, NOW).unwrap();
            assert!(reads > 0, "round {round}");
            assert!(notes.is_empty(), "round {round}: {notes:?}");
            assert_eq!(
                state.servers["http://a"].sessions.len(),
                CHILD_SESSIONS,
                "round {round}"
            );
            assert!(
                state.mattermost.last_post_at >= saves_before_kill as i64 - 1,
                "round {round}"
            );
            assert_eq!(dir.file_names(), ["lock", "state.json"], "round {round}");
        }
    }
}
