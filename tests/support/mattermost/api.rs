//! The REST routes of API v4 the bridge uses, with the status codes, error ids and permission
//! order of Mattermost 5.36's `api4` handlers.

use serde_json::{Value, json};

use super::Shared;
use super::http::{Context, HttpRequest, Response};
use super::multipart;
use super::state::{
    ApiError, NewPost, PostChanges, PostsQuery, client_config, file_too_large, is_valid_emoji_name,
    json_object, props_field, string_field, string_list_field,
};
use super::util::{http_date, is_valid_id, parse_go_bool, path_escape};
use super::wire::{WireError, wire_channel, wire_reaction};

enum Route {
    Ping,
    ClientConfig,
    User(String),
    UserByUsername(String),
    UsersByIds,
    DirectChannel,
    Channel(String),
    ChannelPosts(String),
    CreatePost,
    GetPost(String),
    UpdatePost(String),
    DeletePost(String),
    PatchPost(String),
    Thread(String),
    PostReactions(String),
    PostFileInfos(String),
    SaveReaction,
    DeleteReaction {
        user_id: String,
        post_id: String,
        emoji_name: String,
    },
    UploadFiles,
    GetFile(String),
    GetFileInfo(String),
    Websocket,
}

impl Route {
    /// Handlers wrapped in `ApiSessionRequired`; the others trust the requester.
    fn requires_session(&self) -> bool {
        !matches!(self, Route::Ping | Route::ClientConfig | Route::Websocket)
    }
}

enum Miss {
    NotFound,
    MethodNotAllowed,
}

/// Routes and runs one request. `fail_next` applies first, then the router, then the session.
pub(super) fn handle(shared: &Shared, request: &HttpRequest, context: &Context) -> Response {
    let injected = shared.update(|state| {
        let (count, status) = state.fail_next;
        (count > 0).then(|| {
            state.fail_next.0 -= 1;
            status
        })
    });
    if let Some(status) = injected {
        let error = ApiError::new(
            status,
            "api.fake.injected_failure.app_error",
            "The fake server was told to fail this request.",
        );
        return Response::error(&error, &context.request_id);
    }
    let route = match route(&request.method, &request.path) {
        Ok(route) => route,
        Err(Miss::NotFound) => return not_found(&request.path),
        Err(Miss::MethodNotAllowed) => return Response::bare(405, None, b""),
    };
    if context.token_in_query && context.user_id.is_some() {
        let error = ApiError::new(
            401,
            "api.context.token_provided.app_error",
            "Session is not OAuth but token was provided in the query string.",
        );
        return Response::error(&error, &context.request_id);
    }
    let user = match (&context.user_id, route.requires_session()) {
        (Some(user), _) => Some(user.clone()),
        (None, false) => None,
        (None, true) => {
            let error = ApiError::new(
                401,
                "api.context.session_expired.app_error",
                "Invalid or expired session, please login again.",
            );
            return Response::error(&error, &context.request_id);
        }
    };
    let result = match user {
        Some(user) => handle_authenticated(shared, request, &route, &user),
        None => handle_anonymous(shared, request, &route),
    };
    match result {
        Ok(response) => response,
        Err(error) => Response::error(&error, &context.request_id),
    }
}

/// The error for a body over the fake's limits (see `http`).
pub(super) fn body_too_large(path: &str, length: u64, limit: u64) -> ApiError {
    if path == "/api/v4/files" {
        file_too_large("", length, limit)
    } else {
        ApiError::new(
            413,
            "api.context.invalid_body_param.app_error",
            "Invalid or missing request in request body.",
        )
    }
}

/// `api4.Handle404`: JSON with a detailed error, no request id, and no explicit content type, so
/// Go sniffs `text/plain`.
fn not_found(path: &str) -> Response {
    let detailed = format!(
        "There doesn't appear to be an api call for the url='{path}'.  Typo? are you missing a team_id or user_id as part of the url?"
    );
    let body = super::wire::to_json(&WireError {
        id: "api.context.404.app_error",
        message: "Sorry, we could not find the page.",
        detailed_error: &detailed,
        request_id: "",
        status_code: 404,
    });
    Response::bare(404, Some("text/plain; charset=utf-8"), body.as_bytes())
}

fn route(method: &str, path: &str) -> Result<Route, Miss> {
    let Some(rest) = path.strip_prefix("/api/v4/") else {
        return Err(Miss::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    let username = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let emoji = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
    };
    let owned = |s: &str| s.to_owned();
    let mut candidates: Vec<(&str, Route)> = Vec::new();
    match segments.as_slice() {
        ["system", "ping"] => candidates.push(("GET", Route::Ping)),
        ["config", "client"] => candidates.push(("GET", Route::ClientConfig)),
        ["websocket"] => candidates.push(("GET", Route::Websocket)),
        ["users", "ids"] => candidates.push(("POST", Route::UsersByIds)),
        ["users", "username", name] if username(name) => {
            candidates.push(("GET", Route::UserByUsername(owned(name))))
        }
        ["channels", "direct"] => candidates.push(("POST", Route::DirectChannel)),
        ["posts"] => candidates.push(("POST", Route::CreatePost)),
        ["posts", post] if id(post) => {
            candidates.push(("GET", Route::GetPost(owned(post))));
            candidates.push(("PUT", Route::UpdatePost(owned(post))));
            candidates.push(("DELETE", Route::DeletePost(owned(post))));
        }
        ["posts", post, "patch"] if id(post) => {
            candidates.push(("PUT", Route::PatchPost(owned(post))))
        }
        ["posts", post, "thread"] if id(post) => {
            candidates.push(("GET", Route::Thread(owned(post))))
        }
        ["posts", post, "reactions"] if id(post) => {
            candidates.push(("GET", Route::PostReactions(owned(post))))
        }
        ["posts", post, "files", "info"] if id(post) => {
            candidates.push(("GET", Route::PostFileInfos(owned(post))))
        }
        ["reactions"] => candidates.push(("POST", Route::SaveReaction)),
        ["users", user, "posts", post, "reactions", name]
            if id(user) && id(post) && emoji(name) =>
        {
            candidates.push((
                "DELETE",
                Route::DeleteReaction {
                    user_id: owned(user),
                    post_id: owned(post),
                    emoji_name: owned(name),
                },
            ))
        }
        ["files"] => candidates.push(("POST", Route::UploadFiles)),
        ["files", file] if id(file) => candidates.push(("GET", Route::GetFile(owned(file)))),
        ["files", file, "info"] if id(file) => {
            candidates.push(("GET", Route::GetFileInfo(owned(file))))
        }
        _ => {}
    }
    // Gorilla tries routes in order, so `/users/ids` and `/channels/direct` also match the
    // generic id routes for other methods.
    match segments.as_slice() {
        ["users", user] if id(user) => candidates.push(("GET", Route::User(owned(user)))),
        ["channels", channel] if id(channel) => {
            candidates.push(("GET", Route::Channel(owned(channel))))
        }
        ["channels", channel, "posts"] if id(channel) => {
            candidates.push(("GET", Route::ChannelPosts(owned(channel))))
        }
        _ => {}
    }
    if candidates.is_empty() {
        return Err(Miss::NotFound);
    }
    candidates
        .into_iter()
        .find(|(m, _)| *m == method)
        .map(|(_, route)| route)
        .ok_or(Miss::MethodNotAllowed)
}

fn handle_anonymous(
    shared: &Shared,
    request: &HttpRequest,
    route: &Route,
) -> Result<Response, ApiError> {
    match route {
        Route::Ping => Ok(ping()),
        Route::ClientConfig => config(shared, request, false),
        Route::Websocket => Ok(websocket_without_upgrade()),
        _ => Err(ApiError::permissions()),
    }
}

fn handle_authenticated(
    shared: &Shared,
    request: &HttpRequest,
    route: &Route,
    user: &str,
) -> Result<Response, ApiError> {
    match route {
        Route::Ping => Ok(ping()),
        Route::ClientConfig => config(shared, request, true),
        Route::Websocket => Ok(websocket_without_upgrade()),
        Route::User(id) => get_user(shared, user, id),
        Route::UserByUsername(name) => {
            let state = shared.lock();
            let found = state.user_by_name(name).ok_or_else(|| {
                ApiError::new(
                    404,
                    "app.user.get_by_username.app_error",
                    "Unable to find an existing account matching your username for this team. This team may require an invite from the team owner to join.",
                )
            })?;
            Ok(Response::json(
                200,
                &state.wire_user(found, found.id == user),
            ))
        }
        Route::UsersByIds => {
            let ids: Vec<String> = serde_json::from_slice(&request.body).unwrap_or_default();
            if ids.is_empty() {
                return Err(ApiError::invalid_body("user_ids"));
            }
            let state = shared.lock();
            let users: Vec<_> = state
                .users
                .iter()
                .filter(|u| ids.contains(&u.id))
                .map(|u| state.wire_user(u, u.id == user))
                .collect();
            Ok(Response::json(200, &users))
        }
        Route::DirectChannel => create_direct_channel(shared, request, user),
        Route::Channel(id) => {
            require_id(id, "channel_id")?;
            let state = shared.lock();
            let channel = state.channels.get(id).ok_or_else(|| {
                ApiError::new(
                    404,
                    "app.channel.get.existing.app_error",
                    "Unable to find the existing channel.",
                )
            })?;
            if !state.can_read_channel(user, id) {
                return Err(ApiError::permissions());
            }
            Ok(Response::json(200, &wire_channel(channel)))
        }
        Route::ChannelPosts(id) => channel_posts(shared, request, user, id),
        Route::CreatePost => create_post(shared, request, user),
        Route::GetPost(id) => {
            require_id(id, "post_id")?;
            let state = shared.lock();
            let record = state
                .posts
                .get(id)
                .filter(|r| r.post.delete_at == 0)
                .ok_or_else(ApiError::post_not_found)?;
            if !state.can_read_channel(user, &record.post.channel_id) {
                return Err(ApiError::permissions());
            }
            Ok(Response::json(200, &state.wire_post(record, "")))
        }
        Route::UpdatePost(id) => update_post(shared, request, user, id),
        Route::PatchPost(id) => patch_post(shared, request, user, id),
        Route::DeletePost(id) => {
            require_id(id, "post_id")?;
            shared.update(|state| state.delete_post(user, id))?;
            Ok(Response::status_ok())
        }
        Route::Thread(id) => {
            require_id(id, "post_id")?;
            let state = shared.lock();
            let list = state.thread_list(id).ok_or_else(ApiError::post_not_found)?;
            let channel_id = &state.posts[id].post.channel_id;
            if !state.can_read_channel(user, channel_id) {
                return Err(ApiError::permissions());
            }
            Ok(Response::json(200, &list))
        }
        Route::PostReactions(id) => {
            require_id(id, "post_id")?;
            let state = shared.lock();
            readable_post_channel(&state, user, id)?;
            Ok(Response::json(200, &state.reactions_json(id)))
        }
        Route::PostFileInfos(id) => {
            require_id(id, "post_id")?;
            let state = shared.lock();
            readable_post_channel(&state, user, id)?;
            let ids = state.posts[id].post.file_ids.clone();
            Ok(Response::json(200, &state.file_infos_json(&ids))
                .with_header("Cache-Control", "max-age=2592000, private"))
        }
        Route::SaveReaction => {
            let body =
                json_object(&request.body).ok_or_else(|| ApiError::invalid_body("reaction"))?;
            let field = |key: &str| {
                string_field(&body, key).map_err(|_| ApiError::invalid_body("reaction"))
            };
            let (user_id, post_id, emoji_name) =
                (field("user_id")?, field("post_id")?, field("emoji_name")?);
            let reaction = shared
                .update(|state| state.save_reaction(user, &user_id, &post_id, &emoji_name))?;
            Ok(Response::json(200, &wire_reaction(&reaction)))
        }
        Route::DeleteReaction {
            user_id,
            post_id,
            emoji_name,
        } => {
            require_id(user_id, "user_id")?;
            require_id(post_id, "post_id")?;
            if !is_valid_emoji_name(emoji_name) {
                return Err(ApiError::invalid_url("emoji_name"));
            }
            shared.update(|state| state.delete_reaction(user, user_id, post_id, emoji_name))?;
            Ok(Response::status_ok())
        }
        Route::UploadFiles => upload_files(shared, request, user),
        Route::GetFile(id) => get_file(shared, request, user, id),
        Route::GetFileInfo(id) => {
            require_id(id, "file_id")?;
            let state = shared.lock();
            let file = state.readable_file(user, id)?;
            Ok(Response::json(200, &super::wire::wire_file_info(file))
                .with_header("Cache-Control", "max-age=2592000, private"))
        }
    }
}

fn require_id(value: &str, name: &str) -> Result<(), ApiError> {
    if is_valid_id(value) {
        Ok(())
    } else {
        Err(ApiError::invalid_url(name))
    }
}

/// `SessionHasPermissionToChannelByPost`: membership via the post, deleted or not.
fn readable_post_channel(
    state: &super::state::State,
    user: &str,
    post_id: &str,
) -> Result<(), ApiError> {
    let channel_id = state
        .posts
        .get(post_id)
        .map(|r| r.post.channel_id.as_str())
        .ok_or_else(ApiError::permissions)?;
    if state.can_read_channel(user, channel_id) {
        Ok(())
    } else {
        Err(ApiError::permissions())
    }
}

fn ping() -> Response {
    Response::json(
        200,
        &json!({
            "ActiveSearchBackend": "database",
            "AndroidLatestVersion": "",
            "AndroidMinVersion": "",
            "DesktopLatestVersion": "",
            "DesktopMinVersion": "",
            "IosLatestVersion": "",
            "IosMinVersion": "",
            "status": "OK"
        }),
    )
}

fn config(
    shared: &Shared,
    request: &HttpRequest,
    authenticated: bool,
) -> Result<Response, ApiError> {
    match request.query_param("format") {
        None | Some("") => Err(ApiError::new(
            501,
            "api.config.client.old_format.app_error",
            "New format for the client configuration is not supported yet. Please specify format=old in the query string.",
        )),
        Some("old") => {
            let state = shared.lock();
            Ok(Response::json(
                200,
                &client_config(&state, authenticated, &shared.url),
            ))
        }
        Some(_) => Err(ApiError::invalid_body("format")),
    }
}

/// What gorilla's upgrader and then Mattermost write for a plain GET of the websocket route:
/// gorilla's 400 text, then the handler's JSON error appended to the same body.
fn websocket_without_upgrade() -> Response {
    let mut body = b"Bad Request\n".to_vec();
    body.extend_from_slice(
        br#"{"id":"api.web_socket.connect.upgrade.app_error","message":"Failed to upgrade websocket connection.","detailed_error":"","status_code":500}"#,
    );
    Response::bare(400, Some("text/plain; charset=utf-8"), &body)
        .with_header("Sec-Websocket-Version", "13")
        .with_header("X-Content-Type-Options", "nosniff")
}

fn get_user(shared: &Shared, caller: &str, id: &str) -> Result<Response, ApiError> {
    let id = if id == "me" { caller } else { id };
    require_id(id, "user_id")?;
    let state = shared.lock();
    let found = state.user(id).ok_or_else(|| {
        ApiError::new(
            404,
            "app.user.missing_account.const",
            "Unable to find the user.",
        )
    })?;
    Ok(Response::json(
        200,
        &state.wire_user(found, found.id == caller),
    ))
}

fn create_direct_channel(
    shared: &Shared,
    request: &HttpRequest,
    caller: &str,
) -> Result<Response, ApiError> {
    let ids: Vec<String> = serde_json::from_slice(&request.body).unwrap_or_default();
    if ids.len() != 2 {
        return Err(ApiError::invalid_body("user_ids"));
    }
    if ids.iter().any(|id| !is_valid_id(id)) {
        return Err(ApiError::invalid_body("user_id"));
    }
    if !ids.iter().any(|id| id == caller) {
        return Err(ApiError::permissions());
    }
    shared.update(|state| {
        if ids.iter().any(|id| state.user(id).is_none()) {
            return Err(ApiError::new(
                400,
                "api.channel.create_direct_channel.invalid_user.app_error",
                "Invalid user ID for direct channel creation.",
            ));
        }
        let channel_id = state.direct_channel(&ids[0], &ids[1]);
        Ok(Response::json(
            201,
            &wire_channel(&state.channels[&channel_id]),
        ))
    })
}

fn channel_posts(
    shared: &Shared,
    request: &HttpRequest,
    user: &str,
    channel_id: &str,
) -> Result<Response, ApiError> {
    require_id(channel_id, "channel_id")?;
    let after = request.query_param("after").unwrap_or("").to_owned();
    if !after.is_empty() && !is_valid_id(&after) {
        return Err(ApiError::invalid_body("after"));
    }
    let before = request.query_param("before").unwrap_or("").to_owned();
    if !before.is_empty() && !is_valid_id(&before) {
        return Err(ApiError::invalid_body("before"));
    }
    let since = match request.query_param("since") {
        None | Some("") => 0,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::invalid_body("since"))?,
    };
    let page = request
        .query_param("page")
        .and_then(|p| p.parse::<i64>().ok())
        .filter(|p| *p >= 0)
        .unwrap_or(0) as usize;
    let per_page = match request
        .query_param("per_page")
        .and_then(|p| p.parse::<i64>().ok())
    {
        Some(n) if n < 0 => 60,
        Some(n) => n.min(200) as usize,
        None => 60,
    };
    let state = shared.lock();
    if !state.can_read_channel(user, channel_id) {
        return Err(ApiError::permissions());
    }
    let query = PostsQuery {
        page,
        per_page,
        since,
        after,
        before,
    };
    Ok(Response::json(
        200,
        &state.channel_posts(channel_id, &query),
    ))
}

fn create_post(shared: &Shared, request: &HttpRequest, user: &str) -> Result<Response, ApiError> {
    let invalid = |_| ApiError::invalid_body("post");
    let body = json_object(&request.body).ok_or_else(|| ApiError::invalid_body("post"))?;
    let new = NewPost {
        channel_id: string_field(&body, "channel_id").map_err(invalid)?,
        message: string_field(&body, "message").map_err(invalid)?,
        root_id: string_field(&body, "root_id").map_err(invalid)?,
        props: props_field(&body, "props")
            .map_err(invalid)?
            .unwrap_or_default(),
        file_ids: string_list_field(&body, "file_ids").map_err(invalid)?,
        kind: string_field(&body, "type").map_err(invalid)?,
        pending_post_id: string_field(&body, "pending_post_id").map_err(invalid)?,
        set_online: request
            .query_param("set_online")
            .filter(|v| !v.is_empty())
            .map(|v| parse_go_bool(v).unwrap_or(true))
            .unwrap_or(true),
    };
    shared.update(|state| {
        let created = state.create_post(user, new)?;
        let record = &state.posts[&created.id];
        Ok(Response::json(
            201,
            &state.wire_post(record, &created.pending_post_id),
        ))
    })
}

fn update_post(
    shared: &Shared,
    request: &HttpRequest,
    user: &str,
    id: &str,
) -> Result<Response, ApiError> {
    require_id(id, "post_id")?;
    let invalid = |_| ApiError::invalid_body("post");
    let body = json_object(&request.body).ok_or_else(|| ApiError::invalid_body("post"))?;
    if string_field(&body, "id").map_err(invalid)? != id {
        return Err(ApiError::invalid_body("id"));
    }
    let changes = PostChanges {
        message: Some(string_field(&body, "message").map_err(invalid)?),
        props: Some(
            props_field(&body, "props")
                .map_err(invalid)?
                .unwrap_or_default(),
        ),
        is_pinned: Some(
            bool_field(&body, "is_pinned")
                .map_err(invalid)?
                .unwrap_or(false),
        ),
    };
    shared.update(|state| {
        if !state
            .posts
            .get(id)
            .is_some_and(|r| state.can_post(user, &r.post.channel_id))
        {
            return Err(ApiError::permissions());
        }
        state.edit_post(user, id, changes)?;
        Ok(Response::json(200, &state.wire_post(&state.posts[id], "")))
    })
}

fn patch_post(
    shared: &Shared,
    request: &HttpRequest,
    user: &str,
    id: &str,
) -> Result<Response, ApiError> {
    require_id(id, "post_id")?;
    let invalid = |_| ApiError::invalid_body("post");
    let body = json_object(&request.body).ok_or_else(|| ApiError::invalid_body("post"))?;
    // `file_ids` in a patch is ignored by 5.36 ("not a supported operation").
    let changes = PostChanges {
        message: match body.get("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(ApiError::invalid_body("post")),
        },
        props: match body.get("props") {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map.clone()),
            Some(_) => return Err(ApiError::invalid_body("post")),
        },
        is_pinned: bool_field(&body, "is_pinned").map_err(invalid)?,
    };
    string_list_field(&body, "file_ids").map_err(invalid)?;
    shared.update(|state| {
        state.edit_post(user, id, changes)?;
        Ok(Response::json(200, &state.wire_post(&state.posts[id], "")))
    })
}

fn bool_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<Option<bool>, ()> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(()),
    }
}

fn upload_files(shared: &Shared, request: &HttpRequest, user: &str) -> Result<Response, ApiError> {
    let read_error = || {
        ApiError::new(
            400,
            "api.file.upload_file.read_request.app_error",
            "Unable to upload file(s). Error reading or parsing request data.",
        )
    };
    if request.body.is_empty() {
        return Err(read_error());
    }
    let mut channel_id = request.query_param("channel_id").unwrap_or("").to_owned();
    let mut file_ids = Vec::new();
    let mut client_ids = Vec::new();
    let content_type = request.header("Content-Type").unwrap_or("");
    match multipart::boundary(content_type) {
        Some(boundary) => {
            let parts = multipart::parse(&request.body, &boundary).map_err(|_| read_error())?;
            for part in parts {
                match part.name.as_str() {
                    "channel_id" => {
                        let value = String::from_utf8_lossy(&part.data).into_owned();
                        if !channel_id.is_empty() && value != channel_id {
                            return Err(ApiError::new(
                                400,
                                "api.file.upload_file.multiple_channel_ids.app_error",
                                "Unable to upload file(s). Multiple conflicting channel_ids.",
                            ));
                        }
                        channel_id = value;
                    }
                    "client_ids" => {
                        client_ids.push(String::from_utf8_lossy(&part.data).into_owned())
                    }
                    "files" => {
                        if channel_id.is_empty() {
                            return Err(ApiError::invalid_body("channel_id"));
                        }
                        let name = part.filename.unwrap_or_default();
                        let id = shared.update(|state| {
                            state.upload_file(user, &channel_id, &name, part.data)
                        })?;
                        file_ids.push(id);
                    }
                    _ => {}
                }
            }
            if file_ids.is_empty() {
                return Err(ApiError::new(
                    400,
                    "api.file.upload_file.incorrect_number_of_files.app_error",
                    "Unable to upload files. Incorrect number of files specified.",
                ));
            }
            if !client_ids.is_empty() && client_ids.len() != file_ids.len() {
                return Err(ApiError::new(
                    400,
                    "api.file.upload_file.incorrect_number_of_client_ids.app_error",
                    &format!(
                        "Unable to upload file(s). Have {} client_ids for {} files.",
                        client_ids.len(),
                        file_ids.len()
                    ),
                ));
            }
        }
        None => {
            require_id(&channel_id, "channel_id")?;
            let name = request.query_param("filename").unwrap_or("").to_owned();
            if name.is_empty() {
                return Err(ApiError::invalid_url("filename"));
            }
            let body = request.body.clone();
            file_ids
                .push(shared.update(|state| state.upload_file(user, &channel_id, &name, body))?);
        }
    }
    let state = shared.lock();
    Ok(Response::json(
        201,
        &json!({
            "file_infos": state.file_infos_json(&file_ids),
            "client_ids": client_ids,
        }),
    ))
}

/// `getFile` + `writeFileResponse`: headers as captured.
fn get_file(
    shared: &Shared,
    request: &HttpRequest,
    user: &str,
    id: &str,
) -> Result<Response, ApiError> {
    const INLINE_TYPES: [&str; 10] = [
        "image/jpeg",
        "image/png",
        "image/bmp",
        "image/gif",
        "image/tiff",
        "video/avi",
        "video/mpeg",
        "video/mp4",
        "audio/mpeg",
        "audio/wav",
    ];
    require_id(id, "file_id")?;
    let state = shared.lock();
    let file = state.readable_file(user, id)?;
    let content_type = if file.mime_type.is_empty() {
        "application/octet-stream"
    } else {
        file.mime_type.as_str()
    };
    let force_download = request
        .query_param("download")
        .and_then(parse_go_bool)
        .unwrap_or(false);
    let inline = !force_download && INLINE_TYPES.iter().any(|t| content_type.starts_with(t));
    let escaped = path_escape(&file.name);
    let disposition = format!(
        "{};filename=\"{escaped}\"; filename*=UTF-8''{escaped}",
        if inline { "inline" } else { "attachment" }
    );
    Ok(Response::new(200, content_type, file.bytes.clone())
        .with_header("Accept-Ranges", "bytes")
        .with_header("Cache-Control", "private, no-cache")
        .with_header("Content-Disposition", &disposition)
        .with_header("Content-Security-Policy", "Frame-ancestors 'none'")
        .with_header("Last-Modified", &http_date(file.create_at / 1000))
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("X-Frame-Options", "DENY")
        .with_header(
            "X-Uncompressed-Content-Length",
            &file.bytes.len().to_string(),
        ))
}
