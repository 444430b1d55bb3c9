//! Pool mode's bind over the bus: while the exec server waits for the bind file, it is also
//! on the bus as the pool pseudo-space (`TETHER_DAEMON_POOL_SPACE`, e.g.
//! `tether-pool-<12 hex>`) and takes a bind request there — one NATS round trip instead of
//! writing the token and bind files through the engine's archive API.
//!
//! The protocol, on `[prefix.]spaces.<pool space>.daemon.exec` (queue group `tether-spaced`):
//! - Bind: a request with the header `Tether-Bind: 1` ([`BIND_HEADER`]) and a JSON
//!   [`BindRequest`] body `{"space", "env", "token"}` (at most 64 KiB, strict: the bind file's
//!   rules, and a non-empty token without whitespace or NUL).
//!   - Success: the reply is the body `{}` with no headers, sent only after a new connection
//!     (the token below) has queue-subscribed the bound space's exec subject and flushed, and
//!     after the pool subscription is unsubscribed: an exec sent on the space's subject once
//!     the reply is in is served, and the pool subject has no responders.
//!   - Failure: one error message as an exec refusal (`reply::Refusal`: headers
//!     `Nats-Service-Error-Code: <status>`, `Nats-Service-Error`, `Tether-Stream: error`,
//!     `Tether-Seq: 0`, a Problem+JSON body): 400 a bad body or `Tether-Bind` value (or the
//!     pool space itself as `space`), 503 the connection or subscription failed (within
//!     [`CONNECT_WAIT`]). The wait goes on.
//! - Anything else (no `Tether-Bind` header: an exec request, the orchestrator's empty-body
//!   readiness probe) is refused 409 "not bound to a space yet" at once, and nothing runs. A
//!   request without a reply subject is dropped. Requests already delivered when a bind
//!   succeeds are refused 409 too ("bound to a space now").
//!
//! Design decisions:
//! - The bound connection's token ([`pick_token`]): the token file's content when it is a
//!   token for the bound space (the orchestrator has since written the space's token there,
//!   e.g. a renewal), else the bind's token. The file's token is recognised by the `space`
//!   claim of its payload, read without verifying the signature: this only chooses which
//!   credential to present, and the server's auth callout verifies whichever is presented. So
//!   the pool token, or a renewal of it that the orchestrator wrote as the take happened, is
//!   never presented for the bound space. The token stays in memory (the auth callback), never
//!   logged, never written by the daemon.
//! - First come binds: the bind file (inotify, as `bind::wait`) and the bus are awaited
//!   together; the bind file wins if it is there first, and the pool connection is dropped.
//!   Requests are handled one at a time: a bind in progress (at most [`CONNECT_WAIT`]) delays
//!   the answer to a probe behind it.
//! - A bus bind is not persisted: an exec server restarted after one (a supervisor restart)
//!   with no bind file is back in pool mode, so the orchestrator writes the bind file too
//!   (off the hot path) if restarts must keep the binding.
//! - Not seen: a subscription the server refuses for permissions (the server's `-ERR` is an
//!   asynchronous event, not an answer to the flush); the bound space's own token allows it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Message, Subscriber};
use futures::{FutureExt, StreamExt};

use crate::bind::{self, BIND_HEADER, BIND_VERSION, Bind, BindRequest};
use crate::config::{BusSettings, exec_subject_under};
use crate::conn::{self, QUEUE};
use crate::exec;
use crate::reply::Refusal;

/// Longest wait for the bound connection to connect and subscribe.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How a pool daemon was bound.
pub enum Bound {
    /// By the bind file: connect and subscribe as a fixed daemon.
    File(Bind),
    /// Over the bus: the connection is up and `sub` is on the space's exec subject.
    Bus {
        bind: Bind,
        client: Client,
        sub: Subscriber,
    },
}

/// Waits for a bind on `pool`'s exec subject or in `file`, whichever comes first (module doc).
/// Fails only when the file's directory cannot be watched or the pool connection ends for
/// good (the exec server then exits and is restarted).
pub async fn wait(bus: &BusSettings, file: &Path, pool: &str) -> anyhow::Result<Bound> {
    let pool_client = conn::options(bus)
        .connect(bus.url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot set up the pool connection: {e}"))?;
    let subject = exec_subject_under(bus.prefix.as_deref(), pool);
    let mut sub = pool_client
        .queue_subscribe(subject.clone(), QUEUE.into())
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
    tracing::info!(%subject, "pool mode: taking a bind over the bus too");
    let from_file = bind::wait(file);
    tokio::pin!(from_file);
    loop {
        tokio::select! {
            b = &mut from_file => {
                // Dropping the subscription and the last client closes the pool connection.
                return Ok(Bound::File(b?));
            }
            msg = sub.next() => {
                let Some(msg) = msg else {
                    anyhow::bail!("the pool subscription on {subject} ended");
                };
                if let Some((bind, client, bound_sub, reply)) =
                    on_message(bus, pool, &pool_client, msg).await
                {
                    // Unsubscribed before the reply, on the same connection: once the reply
                    // is in, the pool subject has no responders.
                    if let Err(e) = sub.unsubscribe().await {
                        tracing::warn!(error = %e, "cannot unsubscribe the pool subject");
                    }
                    succeed(&pool_client, reply).await;
                    // What came in before the unsubscribe is answered, not left to time out.
                    let late = Refusal::new(409, "bound to a space now: no longer a pool daemon");
                    while let Some(Some(m)) = sub.next().now_or_never() {
                        if let Some(reply) = m.reply {
                            exec::refuse(&pool_client, reply, &late).await;
                        }
                    }
                    let _ = pool_client.flush().await;
                    return Ok(Bound::Bus { bind, client, sub: bound_sub });
                }
            }
        }
    }
}

/// Answers one message on the pool subject with a refusal, or, for a good bind, returns the
/// bound connection, its subscription and the reply subject the success is still owed to.
async fn on_message(
    bus: &BusSettings,
    pool: &str,
    pool_client: &Client,
    msg: Message,
) -> Option<(Bind, Client, Subscriber, async_nats::Subject)> {
    let Some(reply) = msg.reply.clone() else {
        tracing::debug!("a message on the pool subject without a reply subject: dropped");
        return None;
    };
    let version = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(BIND_HEADER))
        .map(|v| v.as_str().to_string());
    let refusal = match version.as_deref() {
        None => Refusal::new(
            409,
            "not bound to a space yet: this pool daemon takes only a bind request",
        ),
        Some(BIND_VERSION) => match BindRequest::parse(&msg.payload) {
            Err(why) => Refusal::bad_request(format!("a bad bind request: {why}")),
            Ok(req) if req.space == pool => Refusal::bad_request(format!(
                "a bad bind request: space {pool} is this daemon's pool space"
            )),
            Ok(req) => {
                let (bind, token) = req.into_parts();
                match connect_bound(bus, &bind.space, token).await {
                    Ok((client, sub)) => {
                        tracing::info!(space = %bind.space, env = bind.env.len(), "bound over the bus");
                        return Some((bind, client, sub, reply));
                    }
                    Err(why) => {
                        tracing::warn!(space = %bind.space, %why, "a bind over the bus failed");
                        Refusal::new(503, why)
                    }
                }
            }
        },
        Some(v) => Refusal::bad_request(format!(
            "{BIND_HEADER}: {v:?} is not a known version (\"{BIND_VERSION}\")"
        )),
    };
    exec::refuse(pool_client, reply, &refusal).await;
    None
}

/// Sends the success reply `{}` (no headers) on the pool connection and flushes it.
async fn succeed(pool_client: &Client, reply: async_nats::Subject) {
    if let Err(e) = pool_client.publish(reply, "{}".into()).await {
        tracing::warn!(error = %e, "cannot send the bind reply: bound anyway");
    }
    if let Err(e) = pool_client.flush().await {
        tracing::warn!(error = %e, "cannot flush the bind reply: bound anyway");
    }
}

/// A new connection as the bound space (token: [`pick_token`]), queue-subscribed to its exec
/// subject and flushed, within [`CONNECT_WAIT`]; the error says what failed (never the
/// token). Once up it reconnects forever as every daemon connection.
async fn connect_bound(
    bus: &BusSettings,
    space: &str,
    token: String,
) -> Result<(Client, Subscriber), String> {
    let file = bus.token_file.clone();
    let token: Arc<str> = token.into();
    let bound: Arc<str> = space.into();
    let options = ConnectOptions::with_auth_callback(move |_nonce| {
        let (file, bound, token) = (file.clone(), bound.clone(), token.clone());
        async move {
            let now = file.as_deref().and_then(file_token);
            let mut auth = async_nats::Auth::new();
            auth.token = Some(pick_token(now.as_deref(), &bound, &token));
            Ok(auth)
        }
    });
    let subject = exec_subject_under(bus.prefix.as_deref(), space);
    let up = async {
        let client = conn::tuned(options)
            .connect(bus.url.as_str())
            .await
            .map_err(|e| format!("cannot connect as space {space}: {e}"))?;
        let sub = client
            .queue_subscribe(subject.clone(), QUEUE.into())
            .await
            .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
        client
            .flush()
            .await
            .map_err(|e| format!("cannot flush the subscription to {subject}: {e}"))?;
        Ok((client, sub))
    };
    tokio::time::timeout(CONNECT_WAIT, up)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "not connected and subscribed to {subject} within {CONNECT_WAIT:?}"
            ))
        })
}

/// The token file's trimmed content, `None` when it is missing, unreadable or empty.
fn file_token(path: &Path) -> Option<String> {
    conn::read_token(path).ok()
}

/// The bound connection's token: the token file's content `now` if it is a token for space
/// `bound` (the orchestrator wrote the space's token since the bind), else the bind's
/// `bind_token`.
pub fn pick_token(now: Option<&str>, bound: &str, bind_token: &str) -> String {
    match now {
        Some(now) if token_space(now).as_deref() == Some(bound) => now.to_string(),
        _ => bind_token.to_string(),
    }
}

/// The `space` claim of a tether token (`header.payload.signature`, base64url JSON), read
/// without verifying anything; `None` when `token` is not shaped like one.
fn token_space(token: &str) -> Option<String> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Space {
        space: String,
    }
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Space>(&json).ok().map(|c| c.space)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token shaped as tether's (`header.payload.signature`) for `space`.
    fn token_for(space: &str) -> String {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let header = b64(serde_json::json!({"alg": "EdDSA", "typ": "JWT"}));
        let payload = b64(serde_json::json!({"sub": "daemon", "space": space, "exp": 1}));
        format!("{header}.{payload}.c2ln")
    }

    #[test]
    fn the_file_token_is_used_only_when_it_is_for_the_bound_space() {
        let (pool, space) = (token_for("tether-pool-0123abcd"), token_for("s1"));
        // The file holds the pool token, or a renewal of it written as the take happened, or
        // nothing, or no token at all: the bind's token.
        assert_eq!(pick_token(Some(&pool), "s1", "bound"), "bound");
        assert_eq!(pick_token(None, "s1", "bound"), "bound");
        assert_eq!(pick_token(Some(""), "s1", "bound"), "bound");
        assert_eq!(pick_token(Some("renewed"), "s1", "bound"), "bound");
        // Another space's token: never presented for this one.
        assert_eq!(pick_token(Some(&token_for("s2")), "s1", "bound"), "bound");
        // The space's own token written since the bind (a renewal): the file's.
        assert_eq!(pick_token(Some(&space), "s1", "bound"), space);
    }

    #[test]
    fn the_space_of_a_token_the_permission_node_signs_is_read() {
        let key = tether_auth::SigningKey::generate().expect("key");
        let claims = tether_auth::Claims::new(
            "tether",
            "tether",
            "spaced",
            "s1",
            tether_auth::ScopeSet::default(),
            tether_auth::now_unix(),
            60,
        );
        let token = key.sign(&claims).expect("sign");
        assert_eq!(token_space(&token).as_deref(), Some("s1"));
    }

    #[test]
    fn a_token_space_is_read_only_from_a_well_shaped_token() {
        assert_eq!(token_space(&token_for("s1")).as_deref(), Some("s1"));
        let t = token_for("s1");
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "a.!!!.c",
            &format!("{t}.extra"),
            "eyJ4IjoxfQ.eyJ4IjoxfQ.c2ln",
        ] {
            assert_eq!(token_space(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_file_token_is_none_when_missing_or_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        assert_eq!(file_token(&f), None);
        std::fs::write(&f, " \n").expect("write");
        assert_eq!(file_token(&f), None);
        std::fs::write(&f, "tok\n").expect("write");
        assert_eq!(file_token(&f).as_deref(), Some("tok"));
    }
}
