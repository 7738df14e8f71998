//! The router's look-ups: every REST call a routing decision needs (reading a post, listing
//! sessions, paging through the DM, creating a session) runs here, on the named `lookup` thread,
//! and its answer returns to the router as an `Input`, so the router itself never waits on a server.

use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::command::ReactionMeaning;
use crate::mattermost::rest::{MattermostClient, MmError};
use crate::mattermost::{Identity, Post};
use crate::opencode::rest::{OcError, OpenCodeClient};
use crate::opencode::{ServerKey, SessionInfo, SessionKey};
use crate::store::MattermostCursor;

/// How many look-ups may wait for the thread; the router's sends never wait: a full queue refuses.
pub const QUEUE: usize = 64;
/// How many DM posts one catch-up page holds; pages are handed over one at a time.
pub const CATCH_UP_PAGE: u32 = 200;

/// A REST question the router needs answered before it can decide.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// First start on this state: the DM's newest post becomes the cursor.
    LatestPost,
    /// The DM's posts after the cursor, handed back page by page.
    PostsAfter { cursor: MattermostCursor },
    /// The post the owner reacted to.
    ReactedPost {
        post_id: String,
        meaning: ReactionMeaning,
    },
    /// A thread root the router has no record of: its props may name a session.
    ThreadRoot { root_id: String, then: Waiting },
    /// A prompt owed from before a restart: is it still there, and what does it say.
    OwedPrompt {
        key: SessionKey,
        post_id: String,
        owed_at_ms: u64,
    },
    /// An owner post left unresolved by an earlier run, read again to be handled.
    UnresolvedPost { post_id: String },
    /// A session missing from the list may be archived rather than deleted.
    ConfirmGone { key: SessionKey, directory: String },
    /// Every server's sessions, for a DM command.
    ListSessions { then: Listing },
    /// `!new`: check the directory and create the session on the named server, else on the one
    /// server that has the directory.
    NewSession {
        post_id: String,
        /// `NAME` of `!new NAME:/dir`.
        server: Option<String>,
        directory: String,
        title: Option<String>,
        prompt: Option<String>,
    },
}

/// What waits for a thread root's look-up.
#[derive(Debug, Clone, PartialEq)]
pub enum Waiting {
    /// The owner's reply in that thread.
    Reply(Post),
    /// The owner's reaction to a post in that thread.
    Reaction {
        post: Post,
        meaning: ReactionMeaning,
    },
}

/// Which DM command a session listing answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Listing {
    Sessions {
        all: bool,
    },
    Attach {
        query: String,
    },
    /// `!use <session>`: a link to its thread, made first when it has none.
    Use {
        query: String,
    },
}

/// A look-up's answer, back on the router.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// `Ok(None)`: the DM is empty.
    LatestPost(Result<Option<Post>, String>),
    /// One page of a catch-up, oldest first; `last` ends it (an error ends it too).
    Posts {
        posts: Vec<Post>,
        last: bool,
        error: Option<String>,
    },
    ReactedPost {
        post: Post,
        meaning: ReactionMeaning,
    },
    /// `session`: the session the root's props name, and its details when the server listed it.
    ThreadRoot {
        root_id: String,
        session: Option<(SessionKey, Option<SessionInfo>)>,
        then: Waiting,
    },
    /// `Ok(None)`: deleted, or not the owner's: nothing is owed any more.
    OwedPrompt {
        key: SessionKey,
        post_id: String,
        owed_at_ms: u64,
        post: Result<Option<Post>, String>,
    },
    /// `Ok(None)`: deleted meanwhile.
    UnresolvedPost {
        post_id: String,
        post: Result<Option<Post>, String>,
    },
    /// OpenCode confirmed the session does not exist.
    Gone { key: SessionKey },
    /// The look-up found it after all (or could not tell): ask again at the next poll.
    NotGone { key: SessionKey },
    Sessions {
        lists: Vec<(ServerKey, Result<Vec<SessionInfo>, String>)>,
        then: Listing,
    },
    /// `Err`: the message for the owner.
    NewSession {
        post_id: String,
        directory: String,
        prompt: Option<String>,
        created: Result<(ServerKey, SessionInfo), String>,
    },
}

/// What the `lookup` thread works with.
pub struct Lookups {
    /// Gives up after a few attempts: a look-up answers late rather than never.
    pub mattermost: Arc<MattermostClient>,
    pub identity: Identity,
    /// The router's server set, which changes as servers are found or let go.
    pub servers: SharedServers,
}

/// The servers the look-ups may call, written by the router when the set changes.
pub type SharedServers = Arc<std::sync::RwLock<BTreeMap<ServerKey, Arc<OpenCodeClient>>>>;

impl Lookups {
    /// The server set as it is now.
    fn servers(&self) -> BTreeMap<ServerKey, Arc<OpenCodeClient>> {
        self.servers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Answers look-ups in order until the router drops its sender; answers go to `out`.
    pub fn run<T: From<Found>>(self, jobs: Receiver<Lookup>, out: Sender<T>) {
        for job in jobs {
            if let Lookup::PostsAfter { cursor } = job {
                self.posts_after(&cursor, |found| out.send(T::from(found)).is_ok());
                continue;
            }
            if let Some(found) = self.answer(job)
                && out.send(T::from(found)).is_err()
            {
                return;
            }
        }
    }

    /// `None`: nothing to act on (a reacted post that cannot be read).
    fn answer(&self, job: Lookup) -> Option<Found> {
        let dm = &self.identity.dm_channel_id;
        let found = match job {
            Lookup::LatestPost => {
                Found::LatestPost(self.mattermost.latest_post(dm).map_err(|e| e.to_string()))
            }
            Lookup::PostsAfter { .. } => unreachable!("paged in run"),
            Lookup::ReactedPost { post_id, meaning } => match self.mattermost.get_post(&post_id) {
                Ok(post) => Found::ReactedPost { post, meaning },
                Err(e) => {
                    crate::debug!("reacted post {post_id} not readable: {e}");
                    return None;
                }
            },
            Lookup::ThreadRoot { root_id, then } => Found::ThreadRoot {
                session: self.thread_session(&root_id),
                root_id,
                then,
            },
            Lookup::OwedPrompt {
                key,
                post_id,
                owed_at_ms,
            } => {
                let post = match self.mattermost.get_post(&post_id) {
                    Ok(post) if post.user_id == self.identity.owner_user_id => Ok(Some(post)),
                    Ok(_) | Err(MmError::Http { status: 404, .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                Found::OwedPrompt {
                    key,
                    post_id,
                    owed_at_ms,
                    post,
                }
            }
            Lookup::UnresolvedPost { post_id } => Found::UnresolvedPost {
                post: match self.mattermost.get_post(&post_id) {
                    Ok(post) => Ok(Some(post)),
                    Err(MmError::Http { status: 404, .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                },
                post_id,
            },
            Lookup::ConfirmGone { key, directory } => {
                let gone = self.servers().get(&key.server).is_some_and(|client| {
                    matches!(
                        client.get_session(&key.session_id, &directory),
                        Err(OcError::SessionNotFound(_))
                    )
                });
                if gone {
                    Found::Gone { key }
                } else {
                    Found::NotGone { key }
                }
            }
            Lookup::ListSessions { then } => Found::Sessions {
                lists: list_all(&self.servers()),
                then,
            },
            Lookup::NewSession {
                post_id,
                server,
                directory,
                title,
                prompt,
            } => Found::NewSession {
                created: self.new_session(server.as_deref(), &directory, title.as_deref()),
                post_id,
                directory,
                prompt,
            },
        };
        Some(found)
    }

    /// Hands over the DM's posts after the cursor one page at a time, so a long absence is never
    /// held in memory at once. Stops early when `page` says the router is gone.
    fn posts_after(&self, cursor: &MattermostCursor, mut page: impl FnMut(Found) -> bool) {
        let dm = &self.identity.dm_channel_id;
        let done = |error: Option<String>| Found::Posts {
            posts: Vec::new(),
            last: true,
            error,
        };
        if cursor.last_post_id.is_empty() {
            // The DM was empty at the first start: no post to page from yet, only a time.
            let found = match crate::mattermost::search::posts_since(
                &self.mattermost,
                dm,
                cursor.last_post_at as u64,
            ) {
                Ok(posts) => Found::Posts {
                    posts,
                    last: true,
                    error: None,
                },
                Err(e) => done(Some(e.to_string())),
            };
            page(found);
            return;
        }
        let mut open = true;
        let result =
            self.mattermost
                .posts_after_pages(dm, &cursor.last_post_id, CATCH_UP_PAGE, |posts| {
                    open = page(Found::Posts {
                        posts,
                        last: false,
                        error: None,
                    });
                    open
                });
        if open {
            page(done(result.err().map(|e| e.to_string())));
        }
    }

    /// The session a bot-posted root in the DM names in its props, with its details from the list
    /// (which covers every directory; a look-up by id alone would only cover the default one).
    fn thread_session(&self, root_id: &str) -> Option<(SessionKey, Option<SessionInfo>)> {
        let root = match self.mattermost.get_post(root_id) {
            Ok(root) => root,
            Err(e) => {
                crate::debug!("thread root {root_id} not readable: {e}");
                return None;
            }
        };
        if root.user_id != self.identity.bot_user_id
            || root.channel_id != self.identity.dm_channel_id
        {
            return None;
        }
        let session_id = root.props.get("opencode_session_id")?.as_str()?;
        let server = ServerKey(root.props.get("opencode_server")?.as_str()?.to_string());
        let client = self.servers().get(&server)?.clone();
        let key = SessionKey {
            server,
            session_id: session_id.to_string(),
        };
        let info = match client.list_sessions() {
            Ok(sessions) => sessions.into_iter().find(|s| s.id == key.session_id),
            Err(e) => {
                crate::warn!("cannot look up the session of thread {root_id}: {e}");
                None
            }
        };
        Some((key, info))
    }

    fn new_session(
        &self,
        server: Option<&str>,
        directory: &str,
        title: Option<&str>,
    ) -> Result<(ServerKey, SessionInfo), String> {
        let servers = self.servers();
        if servers.is_empty() {
            return Err(
                "⚠️ No OpenCode server is known yet, so no session was created.".to_string(),
            );
        }
        let several = servers.len() > 1;
        let names = || {
            servers
                .values()
                .map(|c| format!("`{}`", c.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let candidates: Vec<&Arc<OpenCodeClient>> = match server {
            Some(name) => match servers.values().find(|c| c.name == name) {
                Some(client) => vec![client],
                None => {
                    return Err(format!(
                        "❓ No OpenCode server is named `{name}`; the servers are {}.",
                        names()
                    ));
                }
            },
            None => servers.values().collect(),
        };
        let mut having = Vec::new();
        let mut failures = Vec::new();
        let answers = ask_all(&candidates, |client| {
            client
                .directory_exists(directory)
                .map_err(|e| e.to_string())
        });
        for (client, answer) in candidates.into_iter().zip(answers) {
            match answer {
                Ok(true) => having.push(client),
                Ok(false) => {}
                Err(e) => failures.push(format!("{}: {e}", client.name)),
            }
        }
        let on = |client: &OpenCodeClient| {
            if several {
                format!("on `{}`", client.name)
            } else {
                "on the OpenCode server".to_string()
            }
        };
        let client = match having.as_slice() {
            [one] => *one,
            [] if !failures.is_empty() => {
                return Err(format!(
                    "⚠️ Could not check `{directory}` on the OpenCode server: {}",
                    failures.join("; ")
                ));
            }
            [] if server.is_some() || !several => {
                let where_ = server
                    .and_then(|name| servers.values().find(|c| c.name == name))
                    .or_else(|| servers.values().next())
                    .map(|c| on(c))
                    .unwrap_or_default();
                return Err(format!(
                    "❓ `{directory}` does not exist {where_}, so no session was created. \
                     Check the path, or create the directory first."
                ));
            }
            [] => {
                return Err(format!(
                    "❓ `{directory}` exists on none of the OpenCode servers ({}), so no session \
                     was created. Check the path, or create the directory first.",
                    names()
                ));
            }
            many => {
                let listed: Vec<String> = many.iter().map(|c| format!("`{}`", c.name)).collect();
                return Err(format!(
                    "❓ `{directory}` exists on {}; say which, like `new {}:{directory}`.",
                    listed.join(" and "),
                    many[0].name
                ));
            }
        };
        match client.create_session(directory, title) {
            Ok(info) => Ok((client.key.clone(), info)),
            Err(e) => Err(format!("⚠️ Could not create the session: {e}")),
        }
    }
}

/// Every server's session list, asked of all at once so a slow server delays only its own.
fn list_all(
    servers: &BTreeMap<ServerKey, Arc<OpenCodeClient>>,
) -> Vec<(ServerKey, Result<Vec<SessionInfo>, String>)> {
    let clients: Vec<&Arc<OpenCodeClient>> = servers.values().collect();
    let lists = ask_all(&clients, |client| {
        client.list_sessions().map_err(|e| e.to_string())
    });
    servers.keys().cloned().zip(lists).collect()
}

/// `ask` of every client at once (one scoped thread each when there are several), answers in order.
fn ask_all<T: Send>(
    clients: &[&Arc<OpenCodeClient>],
    ask: impl Fn(&OpenCodeClient) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    if clients.len() < 2 {
        return clients.iter().map(|client| ask(client)).collect();
    }
    let ask = &ask;
    std::thread::scope(|scope| {
        let asked: Vec<_> = clients
            .iter()
            .map(|client| {
                std::thread::Builder::new()
                    .name(format!("lookup-{}", client.name))
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, crate::log::inherit(move || ask(client)))
            })
            .collect();
        asked
            .into_iter()
            .map(|spawned| match spawned {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err("the request panicked (a bug)".to_string())),
                Err(e) => Err(format!("cannot start a look-up thread: {e}")),
            })
            .collect()
    })
}

/// Posts the router's own replies in the owner DM, in order, on the named `notices` thread.
pub fn run_notices(
    mattermost: Arc<MattermostClient>,
    dm_channel_id: String,
    jobs: Receiver<Notice>,
) {
    for notice in jobs {
        for chunk in crate::render::split_post(&notice.message, crate::render::MAX_POST_CHARS) {
            if let Err(e) = mattermost.create_post(&dm_channel_id, &notice.root_id, &chunk, None) {
                crate::error!("could not post a reply to the owner: {e}");
                break;
            }
        }
    }
}

/// A reply of the router's own: in a thread when `root_id` is set, else in the main DM.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub root_id: String,
    pub message: String,
}
