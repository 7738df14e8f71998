//! OpenCode's v2 dialect: the `/api/*` routes, the only ones OpenCode 2.x serves. `rest` implements the
//! domain operations of `OpenCodeClient` on them (the client dispatches here when it speaks v2);
//! `decode` turns `/api/event` and the durable per-session log into the same domain `Event`s as v1.

pub mod decode;
pub mod rest;
