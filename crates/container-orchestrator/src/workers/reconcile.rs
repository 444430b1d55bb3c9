//! This host's replicas against the desired state: a pass at start, on every change of a
//! deployment (KV watch), when a replica exits or vanishes (engine events), when a backoff
//! runs out, and every `janitor_interval_seconds`.
//!
//! One pass, for this host only:
//! 1. slots held by a host that is gone move to live hosts with the image (any host may do
//!    this, by compare-and-set on the deployment);
//! 2. a replica whose deployment is gone, whose slot is beyond `replicas` or on another host,
//!    or that duplicates a running one, is removed;
//! 3. a slot of this host with no running replica of the deployment's generation gets one:
//!    at once when it has none; after a backoff (0.5 s doubling to 60 s, reset once a replica
//!    has run for a minute) when its replica exited and `restart` says to replace it;
//! 4. a slot whose replica is of an older generation (the spec changed) gets its new replica
//!    first, and the old one is removed only once the new one runs — one slot of a deployment
//!    at a time on this host.
//!
//! Replicas that go are stopped (SIGTERM, `stop_grace_seconds`, all at once) and removed at
//! the end of the pass. A pass that changed something is followed by another at once, so a
//! roll goes on without waiting. A pass that cannot read the deployments does nothing (an unreadable bucket is
//! never taken for an empty one). Backoffs are in memory: after a restart an exited replica
//! is replaced at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::{ContainerSummary, ContainerSummaryStateEnum};
use tether_bus::kv::Change;
use tether_bus::{Ctx, Problem};
use tether_proto::{WorkerDeployment, WorkerEventData};
use tokio::time::Instant;

use super::credentials::ReplicaGrant;
use super::spec::{Restart, assign, replica};
use super::{Workers, name_of};
use crate::docker::info_from_summary;
use crate::labels::{LABEL_DEPLOYMENT, LABEL_GENERATION, LABEL_REPLICA, LABEL_WORKER};

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A replica running this long resets its slot's backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Passes run back to back at most while each changes something.
const PASSES_IN_A_ROW: usize = 32;

/// Backoff of each slot (deployment, index) whose replica failed.
#[derive(Default)]
pub struct Backoffs(Mutex<HashMap<(String, u32), Backoff>>);

struct Backoff {
    /// The exited replica this counts (empty: a replica could not be made).
    container: String,
    failures: u32,
    not_before: Instant,
}

impl Backoff {
    fn none(now: Instant) -> Backoff {
        Backoff {
            container: String::new(),
            failures: 0,
            not_before: now,
        }
    }
}

fn delay(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

impl Backoffs {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Backoff>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `container` as failed (once); the time to wait for, if any.
    fn down(&self, key: (String, u32), container: &str) -> Option<Instant> {
        let now = Instant::now();
        let mut t = self.table();
        let b = t.entry(key).or_insert_with(|| Backoff::none(now));
        if b.container != container || b.failures == 0 {
            b.failures += 1;
            b.container = container.to_string();
            b.not_before = now + delay(b.failures);
        }
        (b.not_before > now).then_some(b.not_before)
    }

    /// Counts a replica that could not be made.
    fn failed(&self, key: (String, u32)) -> Instant {
        let now = Instant::now();
        let mut t = self.table();
        let b = t.entry(key).or_insert_with(|| Backoff::none(now));
        b.failures += 1;
        b.container.clear();
        b.not_before = now + delay(b.failures);
        b.not_before
    }

    /// The time to wait for before making a replica, if any.
    fn wait(&self, key: &(String, u32)) -> Option<Instant> {
        let now = Instant::now();
        self.table()
            .get(key)
            .map(|b| b.not_before)
            .filter(|t| *t > now)
    }

    fn healthy(&self, key: &(String, u32)) {
        self.table().remove(key);
    }

    fn keep_only(&self, names: &BTreeSet<&str>) {
        self.table().retain(|(n, _), _| names.contains(n.as_str()));
    }
}

/// A replica as the engine lists it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub id: String,
    pub name: String,
    pub worker: String,
    /// `None`: the label is not a number (never made so by this node).
    pub index: Option<u32>,
    pub generation: u32,
    /// The `uid` of the deployment it was made for.
    pub deployment: String,
    pub state: String,
    pub running: bool,
    /// From the engine's status ("Exited (137) 2 seconds ago"); -1 when it says none.
    pub exit_code: i64,
    /// Unix seconds.
    pub created: i64,
}

pub fn seen(c: &ContainerSummary) -> Seen {
    let info = info_from_summary(c, "");
    let labels = info.labels;
    let status = c.status.clone().unwrap_or_default();
    let exit_code = status
        .strip_prefix("Exited (")
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    Seen {
        id: info.container_id,
        name: info.container_name,
        worker: labels.get(LABEL_WORKER).cloned().unwrap_or_default(),
        index: labels.get(LABEL_REPLICA).and_then(|i| i.parse().ok()),
        generation: labels
            .get(LABEL_GENERATION)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
        deployment: labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
        state: info.state,
        running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
        exit_code,
        created: c.created.unwrap_or(0),
    }
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Something was made or removed: run another pass at once.
    pub changed: bool,
    /// The earliest backoff that runs out.
    pub wake: Option<Instant>,
    /// Replicas to stop and remove at the end of the pass, each with the event that says so.
    goes: Vec<(Seen, WorkerEventData)>,
}

impl Outcome {
    fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }
}

/// The reconciler task: passes until the node stops.
pub async fn run(w: Arc<Workers>, ctx: Ctx) -> anyhow::Result<()> {
    let every = Duration::from_secs(w.o.policy.cfg.janitor_interval_seconds.max(1));
    loop {
        let mut wake = Instant::now() + every;
        for _ in 0..PASSES_IN_A_ROW {
            match pass(&w, &ctx).await {
                Ok(out) => {
                    if let Some(at) = out.wake {
                        wake = wake.min(at);
                    }
                    if !out.changed {
                        break;
                    }
                }
                Err(p) => {
                    tracing::warn!(error = %p, "worker reconcile pass failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = w.o.workers_poke.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// One pass over this host's replicas.
pub async fn pass(w: &Workers, ctx: &Ctx) -> Result<Outcome, Problem> {
    let o = &w.o;
    let started = Instant::now();
    let mut deployments: Vec<WorkerDeployment> = Vec::new();
    for (d, _) in w.all().await? {
        deployments.push(move_gone_slots(w, &d).await?.unwrap_or(d));
    }
    let list = o.engine.list_managed("", "", "worker").await?;
    let replicas: Vec<Seen> = list.iter().map(seen).collect();
    let names: BTreeSet<&str> = deployments.iter().map(name_of).collect();
    w.backoff.keep_only(&names);
    let mut out = Outcome::default();
    for r in replicas
        .iter()
        .filter(|r| !names.contains(r.worker.as_str()))
    {
        remove(w, r, "deployment removed", &mut out);
    }
    for d in &deployments {
        let mine: Vec<&Seen> = replicas.iter().filter(|r| r.worker == name_of(d)).collect();
        let agent = d.spec.as_ref().map_or("", |s| s.agent_id.as_str());
        for r in mine.iter().filter(|r| r.running) {
            w.credentials.track(
                &r.id,
                ReplicaGrant {
                    worker: name_of(d).to_string(),
                    agent: agent.to_string(),
                },
            );
        }
        deployment(w, ctx, d, &mine, &mut out).await;
    }
    w.credentials.keep_seen_since(started);
    settle(w, ctx, &mut out).await;
    Ok(out)
}

/// Stops (with `stop_grace_seconds`, all at once) and removes the replicas the pass let go,
/// and announces each.
async fn settle(w: &Workers, ctx: &Ctx, out: &mut Outcome) {
    let o = &w.o;
    let grace = o.policy.cfg.stop_grace_seconds;
    let goes = std::mem::take(&mut out.goes);
    let done = futures::future::join_all(goes.into_iter().map(|(r, e)| async move {
        if r.running
            && let Err(err) = o.engine.stop(&r.id, grace).await
        {
            tracing::debug!(container = %r.id, error = %err, "cannot stop a worker replica; removing it");
        }
        match o.engine.remove(&r.id).await {
            Ok(()) => {
                w.credentials.forget(&r.id);
                tracing::info!(worker = %r.worker, container = %r.id, action = %e.action, reason = %e.reason, "worker replica removed");
                announce(w, ctx, &r.worker, e).await;
                true
            }
            Err(err) => {
                tracing::warn!(worker = %r.worker, container = %r.id, error = %err, "cannot remove a worker replica");
                false
            }
        }
    }))
    .await;
    out.changed |= done.into_iter().any(|d| d);
}

/// Moves the slots of hosts that are gone to live hosts with the image; the deployment as
/// stored after, when it changed.
async fn move_gone_slots(
    w: &Workers,
    d: &WorkerDeployment,
) -> Result<Option<WorkerDeployment>, Problem> {
    let o = &w.o;
    let gone = |h: &str| h != o.host_id && o.hosts.unavailable(h).is_some();
    if !d.slots.iter().any(|s| gone(&s.host_id)) {
        return Ok(None);
    }
    let image = d.spec.as_ref().map_or("", |s| s.image.as_str());
    let here = o.engine.image_exists(image).await.unwrap_or(false);
    let candidates = o.hosts.candidates(image, here);
    if candidates.is_empty() {
        return Ok(None);
    }
    let stored = w
        .bucket
        .modify(name_of(d), |cur| {
            let Some(mut cur) = cur else {
                return Ok(Change::Keep);
            };
            let replicas = cur.spec.as_ref().map_or(0, |s| s.replicas);
            match assign(&cur.slots, replicas, &candidates, gone) {
                Some(slots) if slots != cur.slots => {
                    cur.slots = slots;
                    cur.updated_at = super::endpoints::now();
                    Ok(Change::Write(cur))
                }
                _ => Ok(Change::Keep),
            }
        })
        .await?;
    Ok(stored.filter(|s| s.written).map(|s| {
        tracing::info!(worker = name_of(&s.value), slots = ?s.value.slots, "slots of a gone host moved");
        s.value
    }))
}

/// One deployment's replicas on this host.
async fn deployment(
    w: &Workers,
    ctx: &Ctx,
    d: &WorkerDeployment,
    replicas: &[&Seen],
    out: &mut Outcome,
) {
    let o = &w.o;
    let name = name_of(d).to_string();
    let spec = d.spec.clone().unwrap_or_default();
    let restart = Restart::parse(&spec.restart).unwrap_or(Restart::Always);
    let slots: HashMap<u32, &str> = d
        .slots
        .iter()
        .filter(|s| s.index < spec.replicas)
        .map(|s| (s.index, s.host_id.as_str()))
        .collect();
    let mine: BTreeSet<u32> = slots
        .iter()
        .filter(|(_, h)| **h == o.host_id)
        .map(|(i, _)| *i)
        .collect();
    for r in replicas {
        let why = match r.index.map(|i| (i, slots.get(&i))) {
            None => "not a replica slot".to_string(),
            Some((_, None)) => "scaled down".to_string(),
            Some((_, Some(h))) if *h != o.host_id => format!("slot moved to host `{h}`"),
            Some(_) => continue,
        };
        remove(w, r, &why, out);
    }
    let mut rolling = false;
    for index in mine {
        let key = (name.clone(), index);
        let at: Vec<&Seen> = replicas
            .iter()
            .copied()
            .filter(|r| r.index == Some(index))
            .collect();
        let (mut current, old): (Vec<&Seen>, Vec<&Seen>) = at
            .into_iter()
            .partition(|r| r.generation == d.generation && r.deployment == d.uid);
        // The oldest running one first, then the most recent of those that are down.
        current.sort_by_key(|r| (!r.running, if r.running { r.created } else { -r.created }));
        match current.first() {
            Some(keep) if keep.running => {
                for r in &current[1..] {
                    let why = if r.running { "duplicate" } else { "superseded" };
                    remove(w, r, why, out);
                }
                // Its old replicas go at the end of this pass: the next slot rolls after.
                rolling |= !old.is_empty();
                for r in &old {
                    let reason = format!("spec changed (generation {})", d.generation);
                    let e = event("replaced", index, keep, d, r, reason);
                    out.goes.push(((*r).clone(), e));
                }
                let age = chrono::Utc::now().timestamp() - keep.created;
                if age >= i64::try_from(HEALTHY_AFTER.as_secs()).unwrap_or(60) {
                    w.backoff.healthy(&key);
                }
            }
            Some(dead) => {
                // A slot whose new replica is not up yet is still rolling.
                rolling |= old.iter().any(|r| r.running);
                if !restart.replaces(dead.exit_code) {
                    continue;
                }
                if let Some(at) = w.backoff.down(key.clone(), &dead.id) {
                    out.wake_at(at);
                    continue;
                }
                let dead = (*dead).clone();
                for r in &current {
                    let _ = o.engine.remove(&r.id).await;
                }
                let reason = format!("exited with code {}", dead.exit_code);
                make(w, ctx, d, index, Some(&dead), reason, out).await;
            }
            None => {
                let old_running = old.iter().any(|r| r.running);
                if old_running && rolling {
                    continue;
                }
                if let Some(at) = w.backoff.wait(&key) {
                    out.wake_at(at);
                    continue;
                }
                if old_running {
                    rolling = true;
                    let reason = format!("rolling to generation {}", d.generation);
                    make(w, ctx, d, index, None, reason, out).await;
                } else {
                    for r in &old {
                        remove(w, r, "superseded", out);
                    }
                    make(w, ctx, d, index, None, "new replica".into(), out).await;
                }
            }
        }
    }
}

/// Makes and starts replica `index`, in place of `replaced` when there was one; announces
/// it, or the failure (and backs off).
async fn make(
    w: &Workers,
    ctx: &Ctx,
    d: &WorkerDeployment,
    index: u32,
    replaced: Option<&Seen>,
    reason: String,
    out: &mut Outcome,
) {
    let name = name_of(d).to_string();
    match create(w, d, index).await {
        Ok(made) => {
            out.changed = true;
            let action = if replaced.is_some() {
                "replaced"
            } else {
                "created"
            };
            tracing::info!(worker = %name, index, container = %made.id, action, %reason, "worker replica made");
            let mut e = event(action, index, &made, d, &made, reason);
            e.replaced_container_id = replaced.map(|r| r.id.clone()).unwrap_or_default();
            announce(w, ctx, &name, e).await;
        }
        Err(p) => {
            let at = w.backoff.failed((name.clone(), index));
            out.wake_at(at);
            tracing::warn!(worker = %name, index, error = %p, "cannot make a worker replica");
            let none = Seen {
                id: String::new(),
                name: String::new(),
                worker: name.clone(),
                index: Some(index),
                generation: d.generation,
                deployment: d.uid.clone(),
                state: String::new(),
                running: false,
                exit_code: -1,
                created: 0,
            };
            announce(
                w,
                ctx,
                &name,
                event("failed", index, &none, d, &none, p.detail),
            )
            .await;
        }
    }
}

async fn create(w: &Workers, d: &WorkerDeployment, index: u32) -> Result<Seen, Problem> {
    let o = &w.o;
    let spec = replica(d, index, &o.policy)?;
    if !o.engine.image_exists(&spec.image).await? {
        return Err(Problem::unprocessable(format!(
            "image `{}` is not on host `{}`",
            spec.image, o.host_id
        )));
    }
    let id = o.engine.create(&spec, &o.policy.cfg).await?;
    if let Err(e) = o.engine.start(&id).await {
        if let Err(r) = o.engine.remove(&id).await {
            tracing::warn!(container = %id, error = %r, "cannot remove a replica that did not start");
        }
        return Err(e.into());
    }
    // Its profile's secrets, then its token (the volume exists only once the container runs).
    if let Err(p) = super::credentials::write_env(w, &id, d).await {
        if let Err(r) = o.engine.remove(&id).await {
            tracing::warn!(container = %id, error = %r, "cannot remove a replica without its secrets");
        }
        return Err(p);
    }
    // Its token, at once.
    let agent = d.spec.as_ref().map_or("", |s| s.agent_id.as_str());
    w.credentials.track(
        &id,
        ReplicaGrant {
            worker: name_of(d).to_string(),
            agent: agent.to_string(),
        },
    );
    Ok(Seen {
        id,
        name: spec.name,
        worker: name_of(d).to_string(),
        index: Some(index),
        generation: d.generation,
        deployment: d.uid.clone(),
        state: "running".into(),
        running: true,
        exit_code: -1,
        created: chrono::Utc::now().timestamp(),
    })
}

/// Lets a replica go at the end of the pass ([`settle`]), announced as removed for `why`.
fn remove(w: &Workers, r: &Seen, why: &str, out: &mut Outcome) {
    let e = WorkerEventData {
        action: "removed".into(),
        worker: r.worker.clone(),
        index: r.index.unwrap_or(0),
        host_id: w.o.host_id.clone(),
        container_id: r.id.clone(),
        container_name: r.name.clone(),
        generation: r.generation,
        replaced_container_id: String::new(),
        reason: why.to_string(),
        ..Default::default()
    };
    out.goes.push((r.clone(), e));
}

fn event(
    action: &str,
    index: u32,
    made: &Seen,
    d: &WorkerDeployment,
    replaced: &Seen,
    reason: String,
) -> WorkerEventData {
    WorkerEventData {
        action: action.into(),
        worker: name_of(d).to_string(),
        index,
        host_id: String::new(),
        container_id: made.id.clone(),
        container_name: made.name.clone(),
        generation: d.generation,
        replaced_container_id: if replaced.id == made.id {
            String::new()
        } else {
            replaced.id.clone()
        },
        reason,
        ..Default::default()
    }
}

/// Publishes a decision on `events.workers.<name>` (CloudEvents, `tether.worker.<action>`).
pub(super) async fn announce(w: &Workers, ctx: &Ctx, name: &str, mut data: WorkerEventData) {
    data.host_id = w.o.host_id.clone();
    let subject = if data.container_name.is_empty() {
        name.to_string()
    } else {
        data.container_name.clone()
    };
    let kind = format!("tether.worker.{}", data.action);
    let source = format!("tether/{}/{}", crate::NAME, w.o.host_id);
    let value = serde_json::to_value(&data).unwrap_or_default();
    let e = tether_bus::events::cloud_event(&kind, &source, &subject, value, None);
    let to = ctx.subject(&format!("events.workers.{name}"));
    if let Err(err) = tether_bus::events::publish(&ctx.client, to, &e).await {
        tracing::warn!(worker = name, error = %err, "cannot publish worker event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_bound_and_counts_a_replica_once() {
        assert_eq!(delay(1), Duration::from_millis(500));
        assert_eq!(delay(2), Duration::from_secs(1));
        assert_eq!(delay(9), BACKOFF_MAX);
        assert_eq!(delay(u32::MAX), BACKOFF_MAX);
        let b = Backoffs::default();
        let key = ("w".to_string(), 0);
        let first = b.down(key.clone(), "c1").expect("waits");
        assert_eq!(b.down(key.clone(), "c1"), Some(first), "counted once");
        let second = b.down(key.clone(), "c2").expect("waits longer");
        assert!(second > first);
        b.healthy(&key);
        assert!(b.wait(&key).is_none());
    }

    #[test]
    fn exit_codes_come_from_the_status() {
        let c = ContainerSummary {
            status: Some("Exited (137) 2 seconds ago".into()),
            ..Default::default()
        };
        assert_eq!(seen(&c).exit_code, 137);
        let c = ContainerSummary {
            status: Some("Up 3 seconds".into()),
            ..Default::default()
        };
        assert_eq!(seen(&c).exit_code, -1);
    }
}
