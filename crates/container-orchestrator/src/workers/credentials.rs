//! Each replica's token: obtained from the permission node, written into the replica, renewed
//! before it expires.
//!
//! A replica runs as its deployment's agent. Its token (`sub` = the agent, the agent's space and
//! scopes) comes from the permission node's `tokens.worker`, which the bus lets only the
//! orchestrator ask and which issues only for an agent that a deployment names and that was
//! registered `workers:hosted` (`permission_node::worker_tokens`). The token lives
//! `worker_token_ttl_seconds` (the permission node may cap it) and is renewed at two thirds of
//! its life.
//!
//! It reaches the replica as the file `TETHER_TOKEN_FILE` = [`TOKEN_PATH`], written through the
//! engine's archive API into a tmpfs volume of the container (`crate::docker::files`: why, and
//! how a renewal stays atomic for readers). Never in the environment: `docker inspect` shows
//! the variable's path and the mount, no token. The worker libraries (Rust `a2a-worker`,
//! Python `tether-a2a`) read the file again when it changes, for each request's Bearer header
//! and at each bus reconnect; the bus closes a connection when its token expires, so a replica
//! whose token was not renewed (its agent revoked, its deployment removed) loses the bus then —
//! and at once on revocation, which the verifiers and the callout follow live.
//!
//! The table of replicas to renew is in memory: filled by every reconcile pass from the
//! engine's labels (and by each replica made), so after a restart of the orchestrator every
//! running replica gets a fresh token in its first pass, and a replica that went is dropped.
//! A refusal (revoked, not hosted, no deployment) is announced once on
//! `events.workers.<name>` (`tether.worker.token_refused`, the reason with it) and retried
//! every [`REFUSED_RETRY`]; a failure to reach the permission node or the engine backs off
//! from 1 s to 30 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_bus::{Ctx, Problem};
use tether_proto::{IssueWorkerTokenRequest, IssuedToken, WorkerEventData};
use tokio::time::Instant;

use super::Workers;
use crate::docker::EngineErrorKind;
use crate::docker::files::Side;

/// The directory of a replica's secret files (a tmpfs volume).
pub const TOKEN_DIR: &str = "/run/tether";
/// The token file's name in [`TOKEN_DIR`].
pub const TOKEN_NAME: &str = "token";
/// `TETHER_TOKEN_FILE` of every replica.
pub const TOKEN_PATH: &str = "/run/tether/token";
/// A refused renewal is asked again this often (an agent may be registered, or a
/// deployment fixed, in the meantime).
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The renewal task looks at its table at least this often.
const IDLE: Duration = Duration::from_secs(30);

/// The replicas of this host whose tokens are kept, by container id.
#[derive(Default)]
pub struct Credentials {
    table: Mutex<HashMap<String, Entry>>,
    wake: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
struct Entry {
    worker: String,
    agent: String,
    due: Instant,
    /// The file the link points at now (`None`: nothing written yet).
    side: Option<Side>,
    failures: u32,
    /// When a pass saw it, or it was made.
    seen: Instant,
    /// The last refusal, said once until it changes.
    refused: String,
}

impl Credentials {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the token of replica `id` of `worker` (agent `agent`): a replica not known yet
    /// gets one at once.
    pub fn track(&self, id: &str, worker: &str, agent: &str) {
        self.track_at(id, worker, agent, Instant::now());
    }

    fn track_at(&self, id: &str, worker: &str, agent: &str, now: Instant) {
        let mut t = self.table();
        let e = t.entry(id.to_string()).or_insert_with(|| Entry {
            worker: worker.to_string(),
            agent: agent.to_string(),
            due: now,
            side: None,
            failures: 0,
            seen: now,
            refused: String::new(),
        });
        e.seen = now;
        let fresh = e.side.is_none() && e.failures == 0;
        drop(t);
        if fresh {
            self.wake.notify_one();
        }
    }

    /// Drops the replicas no pass has seen since `since` (removed, or gone).
    pub fn keep_seen_since(&self, since: Instant) {
        self.table().retain(|_, e| e.seen >= since);
    }

    pub fn forget(&self, id: &str) {
        self.table().remove(id);
    }

    fn due(&self, now: Instant) -> (Vec<(String, Entry)>, Instant) {
        let t = self.table();
        let due = t
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        let next = t
            .values()
            .map(|e| e.due)
            .filter(|d| *d > now)
            .min()
            .unwrap_or(now + IDLE)
            .min(now + IDLE);
        (due, next)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.table().get_mut(id) {
            f(e);
        }
    }
}

/// When to renew a token that expires at `expires_at` (unix seconds), issued `now_unix`: at two
/// thirds of its life, and not sooner than in a second.
pub fn renew_after(now_unix: i64, expires_at: i64) -> Duration {
    let life = u64::try_from(expires_at - now_unix).unwrap_or(0);
    Duration::from_millis(life * 1000 * 2 / 3).max(Duration::from_secs(1))
}

fn retry_after(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(RETRY_MAX)
}

/// The renewal task: renews what is due until the node stops.
pub async fn run(w: Arc<Workers>, ctx: Ctx) -> anyhow::Result<()> {
    loop {
        let (due, next) = w.credentials.due(Instant::now());
        futures::future::join_all(due.into_iter().map(|(id, e)| renew(&w, &ctx, id, e))).await;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = w.credentials.wake.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Obtains a token for replica `id` and writes it into the replica.
async fn renew(w: &Workers, ctx: &Ctx, id: String, e: Entry) {
    let creds = &w.credentials;
    let token = match obtain(w, ctx, &e).await {
        Ok(t) => t,
        Err(p) => {
            let refused = matches!(p.status, 401 | 403 | 404);
            let said = format!("{}: {}", p.status, p.detail);
            if said != e.refused {
                tracing::warn!(worker = %e.worker, agent = %e.agent, container = %id, error = %said, "no token for a worker replica");
                if refused {
                    let data = WorkerEventData {
                        action: "token_refused".into(),
                        worker: e.worker.clone(),
                        container_id: id.clone(),
                        reason: said.clone(),
                        ..Default::default()
                    };
                    super::reconcile::announce(w, ctx, &e.worker, data).await;
                }
            }
            creds.update(&id, |x| {
                x.failures += 1;
                x.refused = said;
                x.due = Instant::now()
                    + if refused {
                        REFUSED_RETRY
                    } else {
                        retry_after(x.failures)
                    };
            });
            return;
        }
    };
    let now_at = match e.side {
        Some(s) => Some(s),
        // After a restart: the file in use, as the engine sees it.
        None => w.o.engine.secret_side(&id, TOKEN_DIR, TOKEN_NAME).await,
    };
    let side = now_at.map_or(Side::A, Side::other);
    let written =
        w.o.engine
            .put_secret(&id, TOKEN_DIR, TOKEN_NAME, side, token.token.as_bytes())
            .await;
    match written {
        Ok(()) => {
            let after = renew_after(tether_auth::now_unix(), token.expires_at);
            if e.side.is_none() {
                tracing::info!(worker = %e.worker, agent = %e.agent, container = %id, jti = %token.jti, "worker replica token written");
            } else {
                tracing::debug!(worker = %e.worker, container = %id, jti = %token.jti, "worker replica token renewed");
            }
            creds.update(&id, |x| {
                x.side = Some(side);
                x.failures = 0;
                x.refused.clear();
                x.due = Instant::now() + after;
            });
        }
        Err(err) if err.kind() == EngineErrorKind::NotFound => creds.forget(&id),
        Err(err) => {
            tracing::warn!(worker = %e.worker, container = %id, error = %err, "cannot write a worker replica's token");
            creds.update(&id, |x| {
                x.failures += 1;
                x.due = Instant::now() + retry_after(x.failures);
            });
        }
    }
}

/// `tokens.worker` for the replica's deployment and agent.
async fn obtain(w: &Workers, ctx: &Ctx, e: &Entry) -> Result<IssuedToken, Problem> {
    let body = IssueWorkerTokenRequest {
        worker: e.worker.clone(),
        agent_id: e.agent.clone(),
        ttl_seconds: w.o.policy.cfg.worker_token_ttl_seconds,
    };
    let payload = serde_json::to_vec(&body).map_err(|e| Problem::internal(e.to_string()))?;
    let timeout = Duration::from_secs(ctx.config.request_timeout_seconds.max(1));
    let req = async_nats::Request::new().payload(payload.into());
    let msg = tether_bus::connect::request(&ctx.client, ctx.subject("tokens.worker"), req, timeout)
        .await
        .map_err(|f| Problem::unavailable(format!("permission node: {f}")))?;
    if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
        return Err(p);
    }
    serde_json::from_slice(&msg.payload)
        .map_err(|e| Problem::internal(format!("permission node answered no token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds_and_retries_bounded() {
        assert_eq!(renew_after(1000, 1030), Duration::from_secs(20));
        assert_eq!(renew_after(1000, 1900), Duration::from_secs(600));
        assert_eq!(renew_after(1000, 999), Duration::from_secs(1));
        assert_eq!(retry_after(1), RETRY_FIRST);
        assert_eq!(retry_after(2), Duration::from_secs(2));
        assert_eq!(retry_after(40), RETRY_MAX);
        assert_eq!(TOKEN_PATH, format!("{TOKEN_DIR}/{TOKEN_NAME}"));
    }

    #[test]
    fn replicas_are_tracked_until_no_pass_sees_them() {
        let c = Credentials::default();
        let t0 = Instant::now();
        c.track_at("c1", "w", "bot", t0);
        let (due, _) = c.due(t0);
        assert_eq!(due.len(), 1, "a new replica is due at once");
        let mark = t0 + Duration::from_secs(1);
        c.track_at("c2", "w", "bot", mark);
        c.keep_seen_since(mark);
        let (due, _) = c.due(mark);
        assert_eq!(
            due.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            ["c2"]
        );
        c.forget("c2");
        assert!(c.due(mark).0.is_empty());
    }
}
