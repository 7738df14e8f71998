//! The link-file layer (OPENCODE_MM_LINKS_DIR): each `NAME.env` in the directory is one link, whose
//! few settings of its own lie over the process's settings; and OPENCODE_MM_DIRS, which splits one
//! OpenCode server's sessions between links. Kept apart from `config.rs` because it is read again
//! on every reload, from the process's settings as they were at start.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{
    ALL_VARS, Config, ConfigError, EnvFile, OPENCODE_MM_DIRS, OPENCODE_SERVER_PASSWORD_FILE,
    PASSWORD_PREFIX, Sources, build_config, error, state_dir,
};

/// OPENCODE_MM_DIRS: absolute directory prefixes, matched by whole path components (`/a/b` takes
/// `/a/b/c`, never `/a/bc`). Empty means every directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirs(Vec<String>);

/// The process's own settings as they were at start, kept to build each link's settings again
/// when SIGHUP asks to read the links directory again.
pub struct Base {
    /// OPENCODE_MM_LINKS_DIR.
    pub dir: PathBuf,
    /// The process's state directory; link NAME keeps its state under `links/NAME/` in it.
    pub state_dir: PathBuf,
    flags: HashMap<&'static str, String>,
    /// The environment's values of the variables a link's settings may read.
    env: HashMap<String, String>,
    env_file: Option<EnvFile>,
    env_names: Vec<String>,
}

/// One link: a Mattermost bot, its owner and the OpenCode servers their sessions come from.
#[derive(Debug, Clone)]
pub struct Link {
    /// `NAME` of `NAME.env`.
    pub name: String,
    pub file: PathBuf,
    /// The process's settings with the link file's over them; `state_dir` is the link's own.
    pub config: Config,
    /// Everything that makes the link what it is (secrets included): a reload restarts a link
    /// whose fingerprint changed, and leaves the others alone.
    fingerprint: String,
}

/// A link file that cannot be used, and why (the message names the file, the variable and the fix).
#[derive(Debug)]
pub struct Broken {
    pub name: String,
    pub file: PathBuf,
    pub error: ConfigError,
}

/// What the links directory holds right now.
#[derive(Debug)]
pub struct LinkSet {
    pub base: Base,
    /// Usable links, by name.
    pub links: Vec<Link>,
    /// Files that could not be read or are wrong.
    pub broken: Vec<Broken>,
    /// Pairs of links that would take the same sessions or share one DM, each a full message.
    pub conflicts: Vec<String>,
}

/// The variables a link file may set; per-server passwords (`OPENCODE_SERVER_PASSWORD_<NAME>` and
/// its `_FILE` form) too.
pub const LINK_VARS: [&str; 8] = [
    "MATTERMOST_URL",
    "MATTERMOST_TOKEN",
    "MATTERMOST_TOKEN_FILE",
    "MATTERMOST_OWNER",
    "OPENCODE_URL",
    "OPENCODE_SERVER_PASSWORD",
    "OPENCODE_MM_COMMAND_PREFIX",
    "OPENCODE_MM_DIRS",
];

impl Dirs {
    pub fn parse(raw: &str) -> Result<Dirs, String> {
        let mut prefixes: Vec<String> = Vec::new();
        for (index, entry) in raw.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                return Err(format!(
                    "entry {} is empty; remove the extra comma",
                    index + 1
                ));
            }
            if !entry.starts_with('/') {
                return Err(format!(
                    "{entry:?} is not an absolute directory; use one like /home/alice/src"
                ));
            }
            if entry.split('/').any(|part| part == "." || part == "..") {
                return Err(format!(
                    "{entry:?} has a . or .. in it; write the directory as the sessions show it, \
                     like /home/alice/src"
                ));
            }
            let prefix = normalise(entry).to_string();
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
        Ok(Dirs(prefixes))
    }

    /// No OPENCODE_MM_DIRS: every directory.
    pub fn is_everything(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a session in `directory` belongs here. A session whose directory is unknown
    /// (empty) belongs only where every directory does.
    pub fn takes(&self, directory: &str) -> bool {
        if self.is_everything() {
            return true;
        }
        let directory = normalise(directory);
        !directory.is_empty() && self.0.iter().any(|prefix| under(directory, prefix))
    }

    /// Whether some directory is taken by both.
    pub fn overlaps(&self, other: &Dirs) -> bool {
        if self.is_everything() || other.is_everything() {
            return true;
        }
        self.0
            .iter()
            .any(|a| other.0.iter().any(|b| under(a, b) || under(b, a)))
    }
}

impl fmt::Display for Dirs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_everything() {
            return f.write_str("every directory");
        }
        f.write_str(&self.0.join(", "))
    }
}

impl fmt::Debug for Base {
    /// Only the directories: the settings kept may hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Base")
            .field("dir", &self.dir)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Base {
    pub(super) fn new(dir: PathBuf, sources: &Sources<'_>) -> Result<Base, ConfigError> {
        let mut env = HashMap::new();
        let names = ALL_VARS
            .iter()
            .map(|var| var.name.to_string())
            .chain(["HOME", "XDG_STATE_HOME", OPENCODE_SERVER_PASSWORD_FILE].map(String::from))
            .chain(sources.env_names.iter().cloned());
        for name in names {
            if let Some(value) = (sources.env)(&name) {
                env.insert(name, value);
            }
        }
        Ok(Base {
            dir,
            state_dir: state_dir(sources)?,
            flags: sources.flags.clone(),
            env,
            env_file: sources.env_file.cloned(),
            env_names: sources.env_names.to_vec(),
        })
    }

    /// The directory's link files, each built into a link or reported broken. Err only when the
    /// directory itself cannot be read.
    pub fn read_links(&self) -> Result<(Vec<Link>, Vec<Broken>), ConfigError> {
        let var = super::OPENCODE_MM_LINKS_DIR.name;
        let dir = self.dir.display();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            error(format!(
                "{var}: cannot read {dir}: {e}; check the path and its permissions"
            ))
        })?;
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| error(format!("{var}: cannot read {dir}: {e}")))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            // Editors' and packagers' leftovers (`.alice.env.swp`, `alice.env.bak`) are not links.
            let Some(name) = file_name.strip_suffix(".env") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            files.push((name.to_string(), entry.path()));
        }
        files.sort();
        let (mut links, mut broken) = (Vec::new(), Vec::new());
        for (name, file) in files {
            match self.build_link(&name, &file) {
                Ok(link) => links.push(link),
                Err(error) => broken.push(Broken { name, file, error }),
            }
        }
        Ok((links, broken))
    }

    fn build_link(&self, name: &str, file: &Path) -> Result<Link, ConfigError> {
        let path = file.display().to_string();
        if !valid_name(name) {
            return Err(error(format!(
                "link file {path}: {name:?} is not a link name (1 to 40 of letters, digits, - and \
                 _); rename the file, like alice.env"
            )));
        }
        let contents = std::fs::read_to_string(file).map_err(|e| {
            error(format!(
                "link file {path}: cannot read it: {e}; check its permissions"
            ))
        })?;
        let values = EnvFile::parse(&path, &contents, "link file")?;
        let mut keys: Vec<&String> = values.values.keys().collect();
        keys.sort();
        for key in keys {
            if !link_var(key) {
                return Err(error(format!(
                    "link file {path}: {key} cannot be set per link; set it in the process's \
                     environment or --env-file, or remove it (a link file may set {}, and \
                     {PASSWORD_PREFIX}<NAME>)",
                    LINK_VARS.join(", ")
                )));
            }
        }
        let env = |name: &str| self.env.get(name).cloned();
        let sources = Sources {
            flags: &self.flags,
            env: &env,
            env_file: self.env_file.as_ref(),
            env_names: &self.env_names,
            link: Some(&values),
        };
        let mut config =
            build_config(&sources).map_err(|e| error(format!("link file {path}: {e}")))?;
        config.state_dir = self.state_dir.join("links").join(name);
        let fingerprint = format!("{config:?} {}", config.secrets().join(" "));
        Ok(Link {
            name: name.to_string(),
            file: file.to_path_buf(),
            config,
            fingerprint,
        })
    }
}

impl Link {
    /// Whether `other` is this link with the same settings (a reload leaves it running).
    pub fn same_as(&self, other: &Link) -> bool {
        self.name == other.name && self.fingerprint == other.fingerprint
    }
}

impl LinkSet {
    /// Reads the directory: `check` reports what is wrong per link.
    pub fn load(base: Base) -> Result<LinkSet, ConfigError> {
        let (links, broken) = base.read_links()?;
        if links.is_empty() && broken.is_empty() {
            return Err(error(format!(
                "{}: {} has no NAME.env files; add one per link (see contrib/links.example), or \
                 unset it to run one link from the environment",
                super::OPENCODE_MM_LINKS_DIR.name,
                base.dir.display()
            )));
        }
        let conflicts = conflicts(&links);
        Ok(LinkSet {
            base,
            links,
            broken,
            conflicts,
        })
    }

    /// `load`, where anything wrong stops the start-up (exit 2), every problem in the message.
    pub fn load_for_start(base: Base) -> Result<LinkSet, ConfigError> {
        let set = LinkSet::load(base)?;
        let problems: Vec<String> = set
            .broken
            .iter()
            .map(|b| b.error.message.clone())
            .chain(set.conflicts.iter().cloned())
            .collect();
        if !problems.is_empty() {
            return Err(error(problems.join("\n")));
        }
        Ok(set)
    }
}

/// Every pair of links that cannot run side by side, as messages naming both files.
pub fn conflicts(links: &[Link]) -> Vec<String> {
    let mut found = Vec::new();
    for (index, a) in links.iter().enumerate() {
        for b in &links[index + 1..] {
            if let Some(problem) = conflict(a, b) {
                found.push(problem);
            }
        }
    }
    found
}

/// Why `a` and `b` cannot both run: one DM shared by two links, or one OpenCode server's
/// directories claimed by both.
pub fn conflict(a: &Link, b: &Link) -> Option<String> {
    let (fa, fb) = (a.file.display(), b.file.display());
    let (ca, cb) = (&a.config, &b.config);
    if ca.mattermost_url == cb.mattermost_url
        && ca.mattermost_token.expose() == cb.mattermost_token.expose()
        && ca.owner == cb.owner
    {
        return Some(format!(
            "link files {fa} and {fb}: both are the same bot and MATTERMOST_OWNER {} on {}, so \
             they would share one DM; give each link its own owner (or bot), or merge the two files",
            ca.owner, ca.mattermost_url
        ));
    }
    let shared = if ca.opencode_auto && cb.opencode_auto {
        Some("auto".to_string())
    } else {
        ca.opencode_servers
            .iter()
            .find(|s| cb.opencode_servers.iter().any(|t| t.url == s.url))
            .map(|s| s.url.clone())
    }?;
    if !ca.dirs.overlaps(&cb.dirs) {
        return None;
    }
    Some(format!(
        "link files {fa} and {fb}: both take sessions of OpenCode {shared} and their \
         {} overlap ({} and {}); give each link its own directories in {}, none under another's",
        OPENCODE_MM_DIRS.name, ca.dirs, cb.dirs, OPENCODE_MM_DIRS.name
    ))
}

fn link_var(key: &str) -> bool {
    LINK_VARS.contains(&key) || key.starts_with(PASSWORD_PREFIX)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Without trailing slashes, except the root itself.
fn normalise(directory: &str) -> &str {
    let trimmed = directory.trim_end_matches('/');
    if trimmed.is_empty() && directory.starts_with('/') {
        "/"
    } else {
        trimmed
    }
}

/// `directory` is `prefix` or inside it, by whole path components.
fn under(directory: &str, prefix: &str) -> bool {
    prefix == "/"
        || directory == prefix
        || directory
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Invocation, parse_with_names};

    const TOKEN: &str = "processtoken0123456789abcd";

    /// A links directory holding `files` (name, contents), fresh per test.
    fn links_dir(test: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "opencode-mattermost-links-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        dir
    }

    fn parse_links(
        subcommand: &str,
        dir: &Path,
        extra: &[(&str, &str)],
    ) -> Result<Invocation, ConfigError> {
        let mut env: HashMap<String, String> = [
            ("MATTERMOST_URL", "https://chat.example.com"),
            ("MATTERMOST_TOKEN", TOKEN),
            ("OPENCODE_URL", "http://127.0.0.1:4096"),
            ("OPENCODE_MM_STATE_DIR", "/var/lib/ocmm"),
            ("HOME", "/home/ops"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.insert("OPENCODE_MM_LINKS_DIR".into(), dir.display().to_string());
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let names: Vec<String> = env.keys().cloned().collect();
        let lookup = |name: &str| env.get(name).cloned();
        parse_with_names(&[subcommand.to_string()], &lookup, &names)
    }

    fn start_error(dir: &Path) -> String {
        match parse_links("run", dir, &[]) {
            Err(e) => {
                assert!(!e.message.contains(TOKEN));
                e.message
            }
            Ok(other) => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn each_env_file_is_a_link_over_the_process_settings() {
        let token_file =
            std::env::temp_dir().join(format!("ocmm-bob-token-{}", std::process::id()));
        std::fs::write(&token_file, "bobstoken0123456789abcdefg\n").unwrap();
        let dir = links_dir(
            "two",
            &[
                (
                    "alice.env",
                    "MATTERMOST_OWNER=@Alice\nOPENCODE_MM_DIRS=/home/alice\n",
                ),
                (
                    "bob.env",
                    &format!(
                        "MATTERMOST_OWNER=bob\nMATTERMOST_TOKEN_FILE={}\n\
                         OPENCODE_URL=b=http://127.0.0.1:5000\nOPENCODE_SERVER_PASSWORD_B=pw-of-b\n",
                        token_file.display()
                    ),
                ),
                ("README", "not a link"),
                ("alice.env.bak", "MATTERMOST_OWNER=x"),
                (".hidden.env", "NOT_ALLOWED=1"),
            ],
        );
        // A per-server password of the process that no link names is not an error for a link.
        let set = match parse_links("run", &dir, &[("OPENCODE_SERVER_PASSWORD_OTHER", "x")]) {
            Ok(Invocation::RunLinks(set)) => set,
            other => panic!("expected links, got {other:?}"),
        };
        let names: Vec<&str> = set.links.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        let (alice, bob) = (&set.links[0].config, &set.links[1].config);
        assert_eq!(alice.owner, "alice");
        assert_eq!(alice.mattermost_token.expose(), TOKEN);
        assert_eq!(alice.opencode_servers[0].url, "http://127.0.0.1:4096");
        assert_eq!(alice.dirs.to_string(), "/home/alice");
        assert_eq!(alice.state_dir, PathBuf::from("/var/lib/ocmm/links/alice"));
        // bob's token file replaces the process's token, rather than both being "set".
        assert_eq!(bob.mattermost_token.expose(), "bobstoken0123456789abcdefg");
        assert_eq!(bob.opencode_servers[0].url, "http://127.0.0.1:5000");
        assert_eq!(
            bob.opencode_servers[0]
                .password
                .as_ref()
                .map(|p| p.expose()),
            Some("pw-of-b")
        );
        assert!(bob.dirs.is_everything());
        let _ = std::fs::remove_file(token_file);
    }

    #[test]
    fn a_key_a_link_may_not_set_names_the_file_and_the_fix() {
        let dir = links_dir(
            "key",
            &[(
                "alice.env",
                "MATTERMOST_OWNER=alice\nOPENCODE_MM_LOG=debug\n",
            )],
        );
        let message = start_error(&dir);
        assert!(
            message.starts_with(&format!(
                "link file {}/alice.env: OPENCODE_MM_LOG cannot be set per link; set it in the \
                 process's environment or --env-file, or remove it",
                dir.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn a_broken_link_file_stops_the_start_but_check_reports_it_per_link() {
        let dir = links_dir(
            "broken",
            &[
                ("alice.env", "MATTERMOST_OWNER=alice\n"),
                ("bob.env", "MATTERMOST_OWNER=bob\nOPENCODE_MM_DIRS=src\n"),
            ],
        );
        let message = start_error(&dir);
        assert_eq!(
            message,
            format!(
                "link file {}/bob.env: OPENCODE_MM_DIRS: \"src\" is not an absolute directory; use \
                 one like /home/alice/src",
                dir.display()
            )
        );
        match parse_links("check", &dir, &[]) {
            Ok(Invocation::CheckLinks(Ok(set))) => {
                assert_eq!(set.links.len(), 1);
                assert_eq!(set.broken.len(), 1);
                assert_eq!(set.broken[0].name, "bob");
            }
            other => panic!("expected a check of links, got {other:?}"),
        }
    }

    #[test]
    fn overlapping_dirs_on_one_opencode_server_are_refused_naming_both_files() {
        let dir = links_dir(
            "overlap",
            &[
                (
                    "alice.env",
                    "MATTERMOST_OWNER=alice\nOPENCODE_MM_DIRS=/srv\n",
                ),
                (
                    "bob.env",
                    "MATTERMOST_OWNER=bob\nOPENCODE_MM_DIRS=/srv/app,/home/bob\n",
                ),
                // Another server: its directories may be anything.
                (
                    "carol.env",
                    "MATTERMOST_OWNER=carol\nOPENCODE_URL=http://127.0.0.1:5000\n",
                ),
            ],
        );
        let d = dir.display();
        assert_eq!(
            start_error(&dir),
            format!(
                "link files {d}/alice.env and {d}/bob.env: both take sessions of OpenCode \
                 http://127.0.0.1:4096 and their OPENCODE_MM_DIRS overlap (/srv and /srv/app, \
                 /home/bob); give each link its own directories in OPENCODE_MM_DIRS, none under \
                 another's"
            )
        );
        let dir = links_dir(
            "one-dm",
            &[
                ("a.env", "MATTERMOST_OWNER=alice\nOPENCODE_MM_DIRS=/a\n"),
                ("b.env", "MATTERMOST_OWNER=@Alice\nOPENCODE_MM_DIRS=/b\n"),
            ],
        );
        assert!(
            start_error(&dir).contains("so they would share one DM"),
            "{}",
            start_error(&dir)
        );
    }

    #[test]
    fn an_empty_links_dir_is_an_error() {
        let dir = links_dir("empty", &[("notes.txt", "")]);
        assert!(
            start_error(&dir).contains("has no NAME.env files; add one per link"),
            "{}",
            start_error(&dir)
        );
    }

    fn dirs(raw: &str) -> Dirs {
        Dirs::parse(raw).unwrap()
    }

    #[test]
    fn dirs_match_whole_path_components() {
        let d = dirs("/a/b, /srv/");
        assert!(d.takes("/a/b"));
        assert!(d.takes("/a/b/"));
        assert!(d.takes("/a/b/c/d"));
        assert!(!d.takes("/a/bc"));
        assert!(!d.takes("/a"));
        assert!(d.takes("/srv/x"));
        assert!(!d.takes("/srvx"));
        assert!(!d.takes(""));
        assert!(dirs("/").takes("/anything"));
        assert!(Dirs::default().takes(""));
        assert_eq!(d.to_string(), "/a/b, /srv");
    }

    #[test]
    fn dirs_overlap_when_one_is_under_the_other() {
        assert!(dirs("/a").overlaps(&dirs("/a/b")));
        assert!(dirs("/a/b").overlaps(&dirs("/a")));
        assert!(!dirs("/a/b").overlaps(&dirs("/a/bc")));
        assert!(!dirs("/home/alice").overlaps(&dirs("/home/bob,/srv/bob")));
        assert!(Dirs::default().overlaps(&dirs("/x")));
        assert!(dirs("/").overlaps(&dirs("/x")));
    }

    #[test]
    fn bad_dirs_name_the_entry_and_the_fix() {
        let cases = [
            ("/a,,/b", "entry 2 is empty; remove the extra comma"),
            (
                "src",
                "\"src\" is not an absolute directory; use one like /home/alice/src",
            ),
            (
                "/a/../b",
                "\"/a/../b\" has a . or .. in it; write the directory as the sessions show it, \
                 like /home/alice/src",
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(Dirs::parse(raw).unwrap_err(), expected, "{raw}");
        }
    }
}
