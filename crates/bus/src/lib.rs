//! The tether node runtime: everything a node gets for free, the same way.
//!
//! # Layout
//! - [`config`]: layered settings (defaults → `tether.toml` → `NATS_URL` → `TETHER_*`).
//! - [`connect`]: the bus connection, retried at start and reconnected forever.
//! - [`node`]: [`Node`] and [`Endpoint`] — micro-service endpoints in a queue group, bounded
//!   concurrency, size limit, auth hook, panic guard, drain; [`Request`] and [`Ctx`] for handlers.
//! - [`request`]: [`Request`] (its caller in its type), [`RawRequest`], [`Reply`].
//! - [`micro`]: the NATS micro protocol (`$SRV.PING|INFO|STATS`).
//! - [`codec`]: JSON or protobuf by `Content-Type`.
//! - [`problem`]: the error model (headers + Problem+JSON).
//! - [`auth`]: [`Caller`], the [`Verify`] hook, the KV-backed verifier.
//! - [`kv`]: KV buckets opened alike everywhere; typed records ([`kv::Bucket`]) changed by
//!   compare-and-set.
//! - [`jobs`]: durable JetStream workers and de-duplicated publishing.
//! - [`telemetry`]: logs, spans, OTLP, `traceparent` in NATS headers.
//! - [`startup`]: the one way a node binary starts: config, exit 64, telemetry, serve, drain.
//! - [`events`]: CloudEvents-shaped events on `events.*`.
//!
//! The one design decision to know: a handler is a plain async function of a decoded
//! [`Request`] returning `Result<Reply, Problem>`; everything between the wire and that
//! function (limits, identity, decoding, errors, stats, tracing) is the runtime's, so every
//! node behaves the same at its edges.

pub mod auth;
pub mod codec;
pub mod config;
pub mod connect;
pub mod events;
pub mod jobs;
pub mod kv;
pub mod micro;
pub mod node;
pub mod problem;
pub mod request;
pub mod startup;
pub mod subject;
pub mod telemetry;

pub use auth::{BearerToken, Caller, KvVerifier, StaticVerifier, Verify};
pub use codec::Encoding;
pub use config::{BusConfig, Layers};
pub use node::{
    CallerKind, Ctx, Endpoint, Node, NodeHandle, PublicRequest, RawRequest, Reply, Request,
    problem_reply,
};
pub use problem::Problem;
pub use tether_auth::{Scope, ScopeSet};

/// Resolves on SIGTERM or SIGINT (Ctrl-C): the signal to drain.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
