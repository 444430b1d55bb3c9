//! Recovery and hygiene: KV bindings against the engine's labels, expired containers, and
//! exec processes that outlived a crashed node.
//!
//! The janitor runs once at start and then every `janitor_interval_seconds`:
//! 1. containers past `tether.expires` are removed (and unbound);
//! 2. reconcile: a binding of this host whose container vanished is dropped; a managed space
//!    container without a binding is adopted (or removed, by `unbound_policy`); a space
//!    container whose space is bound to another container is left to expire (adopt) or
//!    removed (remove). Anything younger than `reconcile_grace_seconds` is skipped: it may
//!    be a create in flight between the engine call and the KV write;
//! 3. on the first pass every running container gets a reaper pass (the node may have died
//!    with execs running), and later passes run the reapers scheduled by earlier ones.
//!
//! Only this host's managed containers and bindings are looked at; nothing else on the engine
//! is touched, and a space bound to another host is that host's even when it is gone
//! (`crate::hosts`): it is never adopted nor made again here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_bus::Ctx;
use tether_proto::SpaceBinding;

use crate::config::UnboundPolicy;
use crate::docker::summary_name;
use crate::labels::{LABEL_KIND, LABEL_SESSION, expires_of, space_of};
use crate::space::Reserve;
use crate::state::Orchestrator;

/// What one pass did (logged; returned for tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub expired_removed: Vec<String>,
    pub unbound: Vec<String>,
    pub adopted: Vec<String>,
    pub removed_unbound: Vec<String>,
    pub reaped: u32,
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn age_of(rfc3339: &str) -> Duration {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .and_then(|t| (now() - t.with_timezone(&chrono::Utc)).to_std().ok())
        .unwrap_or(Duration::MAX)
}

/// One janitor pass.
pub async fn pass(o: &Orchestrator, first: bool) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let grace = Duration::from_secs(o.policy.cfg.reconcile_grace_seconds);
    // Bindings before containers: a binding that names a container was written after that
    // container existed, so the list taken next has it. (Read the other way round, a create
    // that finished between the two reads looked vanished, and its space was unbound.)
    let bindings: Vec<(SpaceBinding, u64)> = o
        .spaces
        .all()
        .await
        .map_err(|p| anyhow::anyhow!("{p}"))?
        .into_iter()
        .filter(|(b, _)| b.host_id == o.host_id)
        .collect();
    let containers = o.engine.list_managed("", "", "").await?;

    // 1. Expired containers.
    let mut alive = Vec::new();
    for c in containers {
        let labels = c.labels.clone().unwrap_or_default();
        let id = c.id.clone().unwrap_or_default();
        let name = summary_name(&c);
        let expired = expires_of(&labels, &name).is_some_and(|e| e <= now());
        if expired {
            match o.engine.remove(&id).await {
                Ok(()) => {
                    let space = space_of(&labels, &name);
                    if labels.get(LABEL_KIND).is_some_and(|k| k == "space") {
                        let _ = o.spaces.unbind_if(&space, &o.host_id, &id).await;
                    }
                    tracing::info!(container = %id, space = %space, "expired container removed");
                    report.expired_removed.push(id);
                }
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove expired container")
                }
            }
        } else {
            alive.push(c);
        }
    }

    // 2. Bindings against labels.
    let by_id: HashMap<String, &bollard::models::ContainerSummary> = alive
        .iter()
        .filter_map(|c| c.id.clone().map(|id| (id, c)))
        .collect();
    let space_containers: Vec<&bollard::models::ContainerSummary> = alive
        .iter()
        .filter(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_KIND))
                .is_some_and(|k| k == "space")
        })
        .collect();
    let mut bound: HashMap<String, String> = HashMap::new();
    for (b, rev) in &bindings {
        if b.container_id.is_empty() {
            if age_of(&b.bound_at) < grace {
                bound.insert(b.space.clone(), String::new());
                continue;
            }
            // A reservation whose create never finished: drop it (an orphaned container
            // for that space, if any, is adopted below).
            if o.spaces.unbind_at(&b.space, *rev).await.unwrap_or(false) {
                tracing::info!(space = %b.space, "stale reservation dropped");
                report.unbound.push(b.space.clone());
            }
            continue;
        }
        if by_id.contains_key(&b.container_id) {
            bound.insert(b.space.clone(), b.container_id.clone());
            continue;
        }
        if o.spaces.unbind_at(&b.space, *rev).await.unwrap_or(false) {
            tracing::info!(space = %b.space, container = %b.container_id, "bound container vanished; space unbound");
            report.unbound.push(b.space.clone());
        }
    }
    for c in space_containers {
        let id = c.id.clone().unwrap_or_default();
        let labels = c.labels.clone().unwrap_or_default();
        let space = space_of(&labels, &summary_name(c));
        let young = c
            .created
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .and_then(|t| (now() - t).to_std().ok())
            .is_none_or(|age| age < grace);
        if space.is_empty() || young {
            continue;
        }
        match bound.get(&space) {
            Some(cid) if *cid == id || cid.is_empty() => continue,
            Some(other) => {
                if o.policy.cfg.unbound_policy == UnboundPolicy::Remove {
                    tracing::warn!(space = %space, container = %id, bound = %other, "second container of a bound space removed");
                    if o.engine.remove(&id).await.is_ok() {
                        report.removed_unbound.push(id);
                    }
                } else {
                    tracing::warn!(space = %space, container = %id, bound = %other, "second container of a bound space left to expire");
                }
            }
            None => match o.policy.cfg.unbound_policy {
                UnboundPolicy::Adopt => {
                    let b = SpaceBinding {
                        space: space.clone(),
                        host_id: o.host_id.clone(),
                        container_id: id.clone(),
                        container_name: summary_name(c),
                        session_id: labels.get(LABEL_SESSION).cloned().unwrap_or_default(),
                        bound_at: now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        bound_by: "reconcile".into(),
                    };
                    if let Ok(Reserve::Reserved(_)) = o.spaces.reserve(&b).await {
                        tracing::info!(space = %space, container = %id, "unbound space container adopted");
                        bound.insert(space, id.clone());
                        report.adopted.push(id);
                    }
                }
                UnboundPolicy::Remove => {
                    if o.engine.remove(&id).await.is_ok() {
                        tracing::info!(space = %space, container = %id, "unbound space container removed");
                        report.removed_unbound.push(id);
                    }
                }
            },
        }
    }

    // 3. Exec processes past their deadline.
    let now_unix = now().timestamp();
    if first {
        for c in &alive {
            if c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                && let Some(id) = &c.id
            {
                o.schedule_reap(id, now_unix);
            }
        }
    }
    for id in o.due_reaps(now_unix) {
        match crate::exec::reap(o.engine.docker(), &id, now_unix).await {
            Ok(r) => {
                report.reaped += r.killed;
                if r.killed > 0 {
                    tracing::info!(container = %id, killed = r.killed, "exec processes past their deadline killed");
                }
                if let Some(next) = r.next {
                    o.schedule_reap(&id, next);
                }
            }
            Err(e) => tracing::debug!(container = %id, error = %e, "reaper pass failed"),
        }
    }
    Ok(report)
}

/// The janitor task: a pass at start, then one per interval, until the node stops.
pub async fn janitor(o: Arc<Orchestrator>, ctx: Ctx) -> anyhow::Result<()> {
    let every = Duration::from_secs(o.policy.cfg.janitor_interval_seconds.max(1));
    let mut first = true;
    loop {
        match pass(&o, first).await {
            Ok(r) => {
                first = false;
                if r != Report::default() {
                    tracing::info!(report = ?r, "janitor pass");
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "janitor pass failed"),
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
