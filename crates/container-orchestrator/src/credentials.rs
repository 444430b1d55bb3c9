//! Tokens the orchestrator keeps in running containers: obtained from the permission node,
//! written into the container's secret volume (the engine module's `files`: why a tmpfs volume
//! and the archive API, and how a renewal stays atomic for readers), renewed before they
//! expire. One machinery, two users: worker replicas (the workers' `credentials` module,
//! `tokens.worker`) and space daemons (the daemon's `token` module, `tokens.daemon`); what differs
//! between them is a [`Grant`].
//!
//! The table of containers to renew is in memory, by container id: filled by whoever makes
//! or finds the containers (the worker reconciler, the daemon's discovery pass, both from the
//! engine's labels), so after a restart of the orchestrator every running container gets a
//! fresh token at once, and one no pass saw is dropped. A refusal (401/403/404) is said once
//! ([`Grant::refused`]) and retried every [`REFUSED_RETRY`]; a failure to reach the
//! permission node or the engine backs off from 1 s to 30 s. A token is never logged: only
//! its `jti`. A renewal that outlives its entry (the grant replaced meanwhile, as a free pool
//! container's is when it is taken for a space) never settles the new entry; if it wrote its
//! now stale token, the new entry is renewed at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tether_bus::{Ctx, Problem};
use tether_proto::IssuedToken;
use tokio::time::Instant;

use crate::docker::files::Side;
use crate::docker::{EngineError, EngineErrorKind};

/// A refused renewal is asked again this often (an agent may be registered, or a
/// deployment fixed, in the meantime).
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The renewal task looks at its table at least this often.
const IDLE: Duration = Duration::from_secs(30);

/// What one kind of container's token is: how it is asked for, where it is written.
pub trait Grant: Clone + Send + Sync + 'static {
    /// What the grant works with (the workers' state, the orchestrator).
    type Holder: Send + Sync + 'static;

    /// The table of `holder`'s containers of this kind.
    fn table(holder: &Self::Holder) -> &Credentials<Self>;

    /// Names the grant in log lines (never the token).
    fn describe(&self) -> String;

    /// Asks the permission node for a token.
    fn obtain(
        &self,
        holder: &Self::Holder,
        ctx: &Ctx,
    ) -> impl Future<Output = Result<IssuedToken, Problem>> + Send;

    /// Writes `token` into container `id` as `side`; `known` is the side written last by
    /// this process (`None` after a restart: ask the engine).
    fn write(
        &self,
        holder: &Self::Holder,
        id: &str,
        known: Option<Side>,
        token: &[u8],
    ) -> impl Future<Output = Result<Side, EngineError>> + Send;

    /// Says a refusal (`reason`: status and detail) once, as the kind announces it.
    fn refused(
        &self,
        holder: &Self::Holder,
        ctx: &Ctx,
        id: &str,
        reason: &str,
    ) -> impl Future<Output = ()> + Send;

    /// When to renew a token issued `now_unix` that expires at `expires_at`.
    fn renew_after(now_unix: i64, expires_at: i64) -> Duration;
}

/// The containers of one kind whose tokens are kept, by container id.
pub struct Credentials<G> {
    table: Mutex<HashMap<String, Entry<G>>>,
    wake: tokio::sync::Notify,
    /// The generation the next entry gets.
    next_generation: AtomicU64,
}

impl<G> Default for Credentials<G> {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            next_generation: AtomicU64::new(0),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry<G> {
    grant: G,
    due: Instant,
    /// The file the link points at now (`None`: nothing written yet).
    side: Option<Side>,
    failures: u32,
    /// When a pass saw it, or it was made.
    seen: Instant,
    /// The last refusal, said once until it changes.
    refused: String,
    /// Which entry this is: a renewal that began before the entry was replaced (`written`,
    /// e.g. a pool container taken for a space) must not settle the new one.
    generation: u64,
}

impl<G: Grant> Credentials<G> {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<G>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the token of container `id`: a container not known yet gets one at once.
    pub fn track(&self, id: &str, grant: G) {
        self.track_at(id, grant, Instant::now());
    }

    fn track_at(&self, id: &str, grant: G, now: Instant) {
        let generation = self.new_generation();
        let mut t = self.table();
        let e = t.entry(id.to_string()).or_insert_with(|| Entry {
            grant,
            due: now,
            side: None,
            failures: 0,
            seen: now,
            refused: String::new(),
            generation,
        });
        e.seen = now;
        let fresh = e.side.is_none() && e.failures == 0;
        drop(t);
        if fresh {
            self.wake.notify_one();
        }
    }

    /// Keeps the token of container `id`, which its maker has just written as `side`: the
    /// next renewal is `renew_in` from now.
    pub fn written(&self, id: &str, grant: G, side: Side, renew_in: Duration) {
        let now = Instant::now();
        let generation = self.new_generation();
        self.table().insert(
            id.to_string(),
            Entry {
                grant,
                due: now + renew_in,
                side: Some(side),
                failures: 0,
                seen: now,
                refused: String::new(),
                generation,
            },
        );
    }

    fn new_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops the containers no pass has seen since `since` (removed, or gone).
    pub fn keep_seen_since(&self, since: Instant) {
        self.table().retain(|_, e| e.seen >= since);
    }

    pub fn forget(&self, id: &str) {
        self.table().remove(id);
    }

    /// Whether a token was written into container `id` by this process.
    pub fn delivered(&self, id: &str) -> bool {
        self.table().get(id).is_some_and(|e| e.side.is_some())
    }

    fn due(&self, now: Instant) -> (Vec<(String, Entry<G>)>, Instant) {
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

    /// Applies the outcome of a renewal of the entry of container `id` at `generation`. When the
    /// entry was replaced meanwhile and this renewal `wrote` its token, the file may now hold
    /// the old grant's token after the new one's, and the link may point at either file: the
    /// new entry is made due at once, with its side unknown (the write asks the engine).
    fn settle(&self, id: &str, generation: u64, wrote: bool, f: impl FnOnce(&mut Entry<G>)) {
        let mut t = self.table();
        let Some(e) = t.get_mut(id) else {
            return;
        };
        if e.generation == generation {
            f(e);
        } else if wrote {
            e.due = Instant::now();
            e.side = None;
            drop(t);
            self.wake.notify_one();
        }
    }
}

/// `num/den` of the life of a token that expires at `expires_at` (unix seconds), issued
/// `now_unix`, and not sooner than in a second.
pub fn renew_at_fraction(now_unix: i64, expires_at: i64, num: u64, den: u64) -> Duration {
    let life = u64::try_from(expires_at - now_unix).unwrap_or(0);
    Duration::from_millis(life.saturating_mul(1000).saturating_mul(num) / den.max(1))
        .max(Duration::from_secs(1))
}

fn retry_after(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(RETRY_MAX)
}

/// The renewal task: renews what is due until the node stops.
pub async fn run<G: Grant>(holder: std::sync::Arc<G::Holder>, ctx: Ctx) -> anyhow::Result<()> {
    let creds = G::table(&holder);
    loop {
        let (due, next) = creds.due(Instant::now());
        futures::future::join_all(
            due.into_iter()
                .map(|(id, e)| renew::<G>(&holder, &ctx, id, e)),
        )
        .await;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = creds.wake.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Obtains a token for container `id` and writes it into the container.
async fn renew<G: Grant>(holder: &G::Holder, ctx: &Ctx, id: String, e: Entry<G>) {
    let creds = G::table(holder);
    let token = match e.grant.obtain(holder, ctx).await {
        Ok(t) => t,
        Err(p) => {
            let refused = matches!(p.status, 401 | 403 | 404);
            let said = format!("{}: {}", p.status, p.detail);
            if said != e.refused {
                tracing::warn!(grant = %e.grant.describe(), container = %id, error = %said, "no token for a container");
                if refused {
                    e.grant.refused(holder, ctx, &id, &said).await;
                }
            }
            creds.settle(&id, e.generation, false, |x| {
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
    match e
        .grant
        .write(holder, &id, e.side, token.token.as_bytes())
        .await
    {
        Ok(side) => {
            let after = G::renew_after(tether_auth::now_unix(), token.expires_at);
            if e.side.is_none() {
                tracing::info!(grant = %e.grant.describe(), container = %id, jti = %token.jti, "token written");
            } else {
                tracing::debug!(grant = %e.grant.describe(), container = %id, jti = %token.jti, "token renewed");
            }
            creds.settle(&id, e.generation, true, |x| {
                x.side = Some(side);
                x.failures = 0;
                x.refused.clear();
                x.due = Instant::now() + after;
            });
        }
        Err(err) if err.kind() == EngineErrorKind::NotFound => creds.forget(&id),
        Err(err) => {
            tracing::warn!(grant = %e.grant.describe(), container = %id, error = %err, "cannot write a container's token");
            creds.settle(&id, e.generation, false, |x| {
                x.failures += 1;
                x.due = Instant::now() + retry_after(x.failures);
            });
        }
    }
}

/// Asks the permission node's `subject` (`tokens.worker`, `tokens.daemon`) for a token.
pub async fn request_token(
    ctx: &Ctx,
    subject: &str,
    body: &impl Serialize,
) -> Result<IssuedToken, Problem> {
    let payload = serde_json::to_vec(body).map_err(|e| Problem::internal(e.to_string()))?;
    let timeout = Duration::from_secs(ctx.config.request_timeout_seconds.max(1));
    let req = async_nats::Request::new().payload(payload.into());
    let msg = tether_bus::connect::request(&ctx.client, ctx.subject(subject), req, timeout)
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

    #[derive(Clone, Debug)]
    struct G;

    impl Grant for G {
        type Holder = Credentials<G>;
        fn table(h: &Credentials<G>) -> &Credentials<G> {
            h
        }
        fn describe(&self) -> String {
            "test".into()
        }
        async fn obtain(&self, _: &Self::Holder, _: &Ctx) -> Result<IssuedToken, Problem> {
            Err(Problem::unavailable("test"))
        }
        async fn write(
            &self,
            _: &Self::Holder,
            _: &str,
            _: Option<Side>,
            _: &[u8],
        ) -> Result<Side, EngineError> {
            Ok(Side::A)
        }
        async fn refused(&self, _: &Self::Holder, _: &Ctx, _: &str, _: &str) {}
        fn renew_after(now: i64, exp: i64) -> Duration {
            renew_at_fraction(now, exp, 1, 2)
        }
    }

    #[test]
    fn renewal_at_a_fraction_and_retries_bounded() {
        assert_eq!(renew_at_fraction(1000, 1030, 2, 3), Duration::from_secs(20));
        assert_eq!(
            renew_at_fraction(1000, 1900, 1, 2),
            Duration::from_secs(450)
        );
        assert_eq!(renew_at_fraction(1000, 999, 2, 3), Duration::from_secs(1));
        assert_eq!(retry_after(1), RETRY_FIRST);
        assert_eq!(retry_after(2), Duration::from_secs(2));
        assert_eq!(retry_after(40), RETRY_MAX);
    }

    #[test]
    fn containers_are_tracked_until_no_pass_sees_them() {
        let c = Credentials::<G>::default();
        let t0 = Instant::now();
        c.track_at("c1", G, t0);
        let (due, _) = c.due(t0);
        assert_eq!(due.len(), 1, "a new container is due at once");
        assert!(!c.delivered("c1"));
        let mark = t0 + Duration::from_secs(1);
        c.track_at("c2", G, mark);
        c.keep_seen_since(mark);
        let (due, _) = c.due(mark);
        assert_eq!(
            due.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            ["c2"]
        );
        let generation = c.table()["c2"].generation;
        c.settle("c2", generation, true, |e| e.side = Some(Side::B));
        assert!(c.delivered("c2"));
        c.forget("c2");
        assert!(c.due(mark).0.is_empty());
    }

    #[test]
    fn a_renewal_that_outlived_its_entry_makes_the_new_one_due() {
        let c = Credentials::<G>::default();
        let t0 = Instant::now();
        c.track_at("c1", G, t0);
        let (due, _) = c.due(t0);
        let old = due[0].1.generation;
        // The container is taken meanwhile: its new token is written, renewal far off.
        c.written("c1", G, Side::A, Duration::from_secs(600));
        // A failed renewal of the old entry leaves the new one alone.
        c.settle("c1", old, false, |e| e.failures += 1);
        assert_eq!(c.table()["c1"].failures, 0);
        assert!(c.due(Instant::now()).0.is_empty(), "not due yet");
        // One that wrote the old grant's token makes the new entry due at once, the side
        // the link points at unknown.
        c.settle("c1", old, true, |e| e.side = Some(Side::B));
        let (due, _) = c.due(Instant::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.side, None);
    }
}
