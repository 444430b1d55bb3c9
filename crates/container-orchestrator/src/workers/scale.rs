//! Scaling a deployment on its agent's backlog, between `min_replicas` and `max_replicas`
//! (only a deployment deployed with a `max_replicas` above its `min_replicas` is scaled:
//! [`super::spec::is_scaled`]).
//!
//! Every `worker_scale_interval_ms`, each orchestrator reads, for every scaled deployment, the
//! info of its agent's work consumer (`work_<agent>` on the A2A gateway's stream,
//! `worker_work_stream`): `num_pending` (queued, not yet delivered) and `num_ack_pending`
//! (delivered, not yet acknowledged: in flight). The backlog is their sum, and the replicas
//! wanted are `clamp(ceil(backlog / target_backlog_per_replica), min, max)`. A consumer (or
//! stream) that does not exist counts as a backlog of 0: the gateway makes the consumer before
//! it queues an agent's first work item, so no consumer means no task was ever sent. Any other
//! failure to read it skips the deployment for that round (an unknown backlog is never taken
//! for an empty one).
//!
//! The one design decision to know — one decider: of the live hosts (`tether_hosts`, as this
//! orchestrator sees them), the one with the lowest id decides for every deployment; the others
//! only read the figures (for `$SRV.STATS`). A decision changes `replicas` (and the slots,
//! placed as `workers.scale` places them) by compare-and-set on the deployment, and only if
//! `replicas` is still what the decider saw, so two orchestrators that both believe they decide
//! (one has not yet seen the other's heartbeat) cannot undo each other's change unseen; the
//! existing reconcile then makes or removes the replicas. Up is at once; down only once the
//! wanted count has stayed below the current one for `scale_down_after_seconds` — to the
//! highest count wanted during that quiet period (as Kubernetes' HPA stabilizes). The quiet
//! period is timed in the decider's memory: a new decider starts it afresh, which only delays a
//! scale-down. A scale-down removes the highest slots: the orchestrator cannot see which
//! replica holds which message, so it does not pick idle ones; a removed replica gets SIGTERM
//! and `stop_grace_seconds`, in which a worker of the Rust library stops pulling and finishes
//! what it runs (what is left is redelivered after the consumer's ack wait).
//!
//! Every decision is a `tether.worker.scaled` event on `events.workers.<name>` with the numbers
//! behind it; the latest figures of every scaled deployment are the `data` of the
//! `workers-scale` endpoint in `$SRV.STATS`. `workers.scale` on a scaled deployment is a nudge:
//! the decider corrects it at its next decision.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, consumer, response::Response};
use serde::Serialize;
use tether_bus::kv::Change;
use tether_bus::{Ctx, Problem};
use tether_proto::{WorkerDeployment, WorkerEventData};
use tokio::time::Instant;

use super::spec::{assign, is_scaled};
use super::{Workers, name_of};

/// The endpoint whose `$SRV.STATS` data carries the figures.
pub const STATS_ENDPOINT: &str = "workers-scale";

/// The figures behind the decisions, by deployment.
#[derive(Default)]
pub struct Scaling {
    windows: Mutex<HashMap<String, Window>>,
    figures: Mutex<Vec<Figures>>,
}

/// One scaled deployment as last read.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Figures {
    pub name: String,
    pub agent: String,
    /// The consumer the backlog is read from (`<stream>.<consumer>`).
    pub consumer: String,
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target: u32,
    pub pending: u64,
    pub ack_pending: u64,
    pub desired: u32,
}

/// A quiet period in progress: since when fewer replicas were wanted, and the most wanted since.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Window {
    since: Option<Instant>,
    highest: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scaling {
    /// The `$SRV.STATS` data: `{"deployments": [Figures…]}`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "deployments": *lock(&self.figures) })
    }
}

/// The replicas wanted for `backlog`.
pub fn desired(backlog: u64, target: u32, min: u32, max: u32) -> u32 {
    let want = backlog.div_ceil(u64::from(target.max(1)));
    u32::try_from(want).unwrap_or(u32::MAX).clamp(min, max)
}

/// What to scale to, and why: up at once, down once fewer have been wanted for `quiet`.
fn decide(
    current: u32,
    wanted: u32,
    w: &mut Window,
    now: Instant,
    quiet: Duration,
) -> Option<(u32, String)> {
    if wanted >= current {
        *w = Window::default();
        return (wanted > current).then(|| (wanted, "backlog above capacity".to_string()));
    }
    let since = *w.since.get_or_insert(now);
    w.highest = w.highest.max(wanted);
    if now.saturating_duration_since(since) < quiet {
        return None;
    }
    let to = w.highest;
    *w = Window::default();
    Some((
        to,
        format!("backlog below capacity for {} s", quiet.as_secs()),
    ))
}

/// The decider task: a round every `worker_scale_interval_ms` until the node stops.
pub async fn run(w: Arc<Workers>, ctx: Ctx) -> anyhow::Result<()> {
    let every = Duration::from_millis(w.o.policy.cfg.worker_scale_interval_ms.max(100));
    let js = jetstream::new(ctx.client.clone());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(p) = round(&w, &ctx, &js).await {
            tracing::warn!(error = %p, "worker scaling round failed");
        }
    }
}

/// Whether this host decides: the lowest id among the live hosts.
fn is_decider(w: &Workers) -> bool {
    let me = w.o.host_id.as_str();
    w.o.hosts
        .list()
        .hosts
        .iter()
        .filter(|h| h.live)
        .filter_map(|h| h.record.as_ref().map(|r| r.host_id.as_str()))
        .filter(|h| !h.is_empty())
        .chain([me])
        .min()
        == Some(me)
}

async fn round(w: &Workers, ctx: &Ctx, js: &jetstream::Context) -> Result<(), Problem> {
    let all = w.all().await?;
    let decider = is_decider(w);
    let stream = w.o.policy.cfg.worker_work_stream.clone();
    let mut figures = Vec::new();
    let mut scaled = BTreeSet::new();
    for (d, _) in &all {
        let Some(spec) = d.spec.as_ref() else {
            continue;
        };
        if !is_scaled(spec) {
            continue;
        }
        let key = format!("{}/{}", name_of(d), d.uid);
        scaled.insert(key.clone());
        let (pending, ack_pending) = match backlog(js, &stream, &spec.agent_id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(worker = name_of(d), error = %e, "cannot read the agent's backlog; not scaling it this round");
                continue;
            }
        };
        let target = spec.target_backlog_per_replica.max(1);
        let wanted = desired(
            pending + ack_pending,
            target,
            spec.min_replicas,
            spec.max_replicas,
        );
        figures.push(Figures {
            name: name_of(d).to_string(),
            agent: spec.agent_id.clone(),
            consumer: format!("{stream}.{}", consumer_name(&spec.agent_id)),
            replicas: spec.replicas,
            min_replicas: spec.min_replicas,
            max_replicas: spec.max_replicas,
            target,
            pending,
            ack_pending,
            desired: wanted,
        });
        if !decider {
            continue;
        }
        let quiet = Duration::from_secs(u64::from(spec.scale_down_after_seconds));
        let decision = {
            let mut windows = lock(&w.scaling.windows);
            let window = windows.entry(key).or_default();
            decide(spec.replicas, wanted, window, Instant::now(), quiet)
        };
        if let Some((to, reason)) = decision {
            let data = WorkerEventData {
                action: "scaled".into(),
                worker: name_of(d).to_string(),
                generation: d.generation,
                reason,
                from: spec.replicas,
                to,
                pending,
                ack_pending,
                target,
                ..Default::default()
            };
            apply(w, ctx, d, data).await;
        }
    }
    {
        let mut windows = lock(&w.scaling.windows);
        if decider {
            windows.retain(|k, _| scaled.contains(k));
        } else {
            windows.clear();
        }
    }
    *lock(&w.scaling.figures) = figures;
    Ok(())
}

fn consumer_name(agent: &str) -> String {
    format!("work_{agent}")
}

/// The agent's consumer's (pending, ack pending); (0, 0) when it or its stream does not exist.
async fn backlog(js: &jetstream::Context, stream: &str, agent: &str) -> Result<(u64, u64), String> {
    let subject = format!("CONSUMER.INFO.{stream}.{}", consumer_name(agent));
    let r: Response<consumer::Info> = js
        .request(subject, &serde_json::json!({}))
        .await
        .map_err(|e| e.to_string())?;
    match r {
        Response::Ok(info) => Ok((
            info.num_pending,
            u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        )),
        Response::Err { error }
            if [ErrorCode::CONSUMER_NOT_FOUND, ErrorCode::STREAM_NOT_FOUND]
                .contains(&error.error_code()) =>
        {
            Ok((0, 0))
        }
        Response::Err { error } => Err(error.to_string()),
    }
}

/// Sets `replicas` to `data.to` if it is still `data.from`; announces the decision.
async fn apply(w: &Workers, ctx: &Ctx, d: &WorkerDeployment, data: WorkerEventData) {
    let o = &w.o;
    let name = name_of(d).to_string();
    let image = d.spec.as_ref().map_or("", |s| s.image.as_str());
    let here = o.engine.image_exists(image).await.unwrap_or(false);
    let candidates = o.hosts.candidates(image, here);
    let gone = |h: &str| h != o.host_id && o.hosts.unavailable(h).is_some();
    let (from, to) = (data.from, data.to);
    let stored = w
        .bucket
        .modify(&name, |cur| {
            let Some(mut cur) = cur else {
                return Ok(Change::Keep);
            };
            let mut spec = cur.spec.clone().unwrap_or_default();
            if cur.uid != d.uid || spec.replicas != from {
                return Ok(Change::Keep);
            }
            let Some(slots) = assign(&cur.slots, to, &candidates, gone) else {
                return Err(Problem::unprocessable(format!(
                    "no live host has the image `{}`",
                    spec.image
                )));
            };
            spec.replicas = to;
            cur.spec = Some(spec);
            cur.slots = slots;
            cur.updated_at = super::endpoints::now();
            Ok(Change::Write(cur))
        })
        .await;
    match stored {
        Ok(Some(s)) if s.written => {
            tracing::info!(worker = %name, from, to, pending = data.pending, ack_pending = data.ack_pending, target = data.target, reason = %data.reason, "worker deployment scaled");
            w.poke();
            super::reconcile::announce(w, ctx, &name, data).await;
        }
        Ok(_) => {}
        Err(p) => {
            tracing::warn!(worker = %name, from, to, error = %p, "cannot scale a worker deployment")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_is_the_backlog_over_the_target_within_the_bounds() {
        assert_eq!(desired(0, 4, 0, 5), 0);
        assert_eq!(desired(1, 4, 0, 5), 1);
        assert_eq!(desired(8, 4, 0, 5), 2);
        assert_eq!(desired(9, 4, 0, 5), 3);
        assert_eq!(desired(200, 4, 0, 5), 5);
        assert_eq!(desired(0, 4, 2, 5), 2);
        assert_eq!(desired(u64::MAX, 1, 0, 7), 7);
        // A target of 0 is never stored; taken as 1 all the same.
        assert_eq!(desired(3, 0, 0, 5), 3);
    }

    #[test]
    fn up_at_once_down_after_the_quiet_period_to_the_most_wanted() {
        let quiet = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(
            decide(0, 3, &mut w, t0, quiet).map(|d| d.0),
            Some(3),
            "up at once"
        );
        assert_eq!(decide(3, 3, &mut w, t0, quiet), None);
        // Fewer wanted: nothing until the quiet period is over, then the most wanted in it.
        assert_eq!(decide(3, 1, &mut w, t0, quiet), None);
        assert_eq!(decide(3, 2, &mut w, t0 + quiet / 2, quiet), None);
        assert_eq!(decide(3, 0, &mut w, t0 + quiet / 2, quiet), None);
        let (to, why) = decide(3, 0, &mut w, t0 + quiet, quiet).expect("down");
        assert_eq!(to, 2);
        assert!(why.contains("below capacity for 10 s"), "{why}");
        // A busy moment restarts the quiet period.
        assert_eq!(decide(2, 1, &mut w, t0 + quiet, quiet), None);
        assert_eq!(decide(2, 2, &mut w, t0 + quiet * 3 / 2, quiet), None);
        assert_eq!(decide(2, 0, &mut w, t0 + quiet * 2, quiet), None);
        assert_eq!(
            decide(2, 0, &mut w, t0 + quiet * 3, quiet).map(|d| d.0),
            Some(0)
        );
    }
}
