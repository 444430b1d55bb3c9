//! `workers.deploy|get|list|scale|remove` and their `hosts.<host_id>.workers.*` twins
//! ([`crate::route`]). Operators only. Every one is answered where it arrives: the desired
//! state is in KV, which every orchestrator reads and writes by compare-and-set. The replicas
//! in a reply are those of the answering host's engine; `workers.get` and `workers.list` on
//! the shared subject also ask each other host that holds a slot for its replicas (a host
//! that does not answer within 5 s is left out). A change wakes this host's reconciler; the
//! other hosts' follow the bucket.
//!
//! `workers.deploy` first asks the permission node whether the agent may be hosted
//! (`agents.hostable`: registered, not revoked, marked `workers:hosted`) and refuses with its
//! answer (404, 422) before it stores anything: replicas of such an agent would never get a
//! token. The permission node not answering is 503, never taken for a yes.

use std::sync::Arc;

use tether_bus::kv::Change;
use tether_bus::{Node, Problem, Request, Scope};
use tether_proto::{
    DeployWorkerRequest, Empty, RemovedWorker, ScaleWorkersRequest, WorkerDeployment, WorkerList,
    WorkerRef, WorkerReplica, WorkerStatus,
};

use super::reconcile::seen;
use super::spec::{assign, check_name, check_replicas, is_scaled, template, validate_deploy};
use super::{Workers, name_of};
use crate::route::{Elsewhere, Routed, Routes};

type W = Arc<Workers>;

/// Adds the endpoints, on the shared and on the host-addressed subjects.
pub fn endpoints(node: Node, w: &W) -> Node {
    Routes::new(node, &w.o.hosts, w.clone())
        .serve("workers.deploy", Scope::Operator, deploy)
        .serve("workers.get", Scope::Operator, get)
        .serve("workers.list", Scope::Operator, list)
        .serve("workers.scale", Scope::Operator, scale)
        .serve("workers.remove", Scope::Operator, remove)
        .node()
}

pub(super) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The live hosts that have `image`, in placement order; 422 when there is none.
async fn candidates(w: &Workers, image: &str) -> Result<Vec<String>, Problem> {
    let here = w.o.engine.image_exists(image).await?;
    let c = w.o.hosts.candidates(image, here);
    if c.is_empty() {
        return Err(Problem::unprocessable(format!(
            "image `{image}` is not on host `{}` nor on any other live host (the orchestrator never pulls: build or load it first)",
            w.o.host_id
        )));
    }
    Ok(c)
}

/// The permission node's `agents.hostable` for `agent_id`: its refusal as it is (404 unknown,
/// 422 revoked or not `workers:hosted`), 503 when it does not answer.
async fn hostable(ctx: &tether_bus::Ctx, agent_id: &str) -> Result<(), Problem> {
    let body = tether_proto::AgentRef {
        agent_id: agent_id.to_string(),
    };
    let payload = serde_json::to_vec(&body).map_err(|e| Problem::internal(e.to_string()))?;
    let timeout = std::time::Duration::from_secs(ctx.config.request_timeout_seconds.max(1));
    let req = async_nats::Request::new().payload(payload.into());
    let msg =
        tether_bus::connect::request(&ctx.client, ctx.subject("agents.hostable"), req, timeout)
            .await
            .map_err(|f| {
                Problem::unavailable(format!(
                    "permission node (asked whether agent `{agent_id}` may be hosted): {f}"
                ))
            })?;
    match Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

/// Slots for `replicas`, keeping what is placed.
fn slots_for(
    w: &Workers,
    d: &WorkerDeployment,
    replicas: u32,
    candidates: &[String],
) -> Result<Vec<tether_proto::WorkerSlot>, Problem> {
    let o = &w.o;
    let gone = |h: &str| h != o.host_id && o.hosts.unavailable(h).is_some();
    assign(&d.slots, replicas, candidates, gone)
        .ok_or_else(|| Problem::unprocessable("no live host has the image"))
}

async fn deploy(w: W, req: Request<DeployWorkerRequest>) -> Result<Routed<WorkerStatus>, Problem> {
    let spec = validate_deploy(&req.body, &w.o.policy)?;
    hostable(&req.ctx, &spec.agent_id).await?;
    let candidates = candidates(&w, &spec.image).await?;
    let by = req.caller.agent_id.clone();
    let stored = w
        .bucket
        .modify(&spec.name, |cur| {
            let at = now();
            let Some(mut d) = cur else {
                let mut d = WorkerDeployment {
                    spec: Some(spec.clone()),
                    generation: 1,
                    slots: Vec::new(),
                    created_at: at.clone(),
                    updated_at: at,
                    created_by: by.clone(),
                    uid: uuid::Uuid::now_v7().to_string(),
                };
                d.slots = slots_for(&w, &d, spec.replicas, &candidates)?;
                return Ok(Change::Write(d));
            };
            let old = d.spec.clone().unwrap_or_default();
            let mut spec = spec.clone();
            if is_scaled(&spec) {
                // Scaled: the count is the decider's (`scale`), kept within the new bounds.
                spec.replicas = old.replicas.clamp(spec.min_replicas, spec.max_replicas);
            }
            if old.agent_id != spec.agent_id {
                return Err(Problem::conflict(format!(
                    "worker deployment `{}` runs as agent `{}`, not `{}`; remove it first",
                    spec.name, old.agent_id, spec.agent_id
                )));
            }
            if old == spec {
                return Ok(Change::Keep);
            }
            if template(&old) != template(&spec) {
                d.generation += 1;
            }
            d.slots = slots_for(&w, &d, spec.replicas, &candidates)?;
            d.spec = Some(spec);
            d.updated_at = at;
            Ok(Change::Write(d))
        })
        .await?
        .ok_or_else(|| Problem::internal("the deployment was not stored"))?;
    if stored.written {
        let replicas = stored.value.spec.as_ref().map_or(0, |s| s.replicas);
        tracing::info!(worker = %spec.name, generation = stored.value.generation, replicas, by = %req.caller.agent_id, "worker deployment stored");
        w.poke();
    }
    status(&w, stored.value, stored.written)
        .await
        .map(Routed::Here)
}

async fn get(w: W, req: Request<WorkerRef>) -> Result<Routed<WorkerStatus>, Problem> {
    let d = find(&w, &req.body.name).await?.0;
    let others = other_hosts(&w, std::slice::from_ref(&d));
    let here = status(&w, d, false).await?;
    Ok(Routed::AlsoEach(others, here, |mut a, b| {
        a.replicas.extend(b.replicas);
        a.replicas
            .sort_by(|x, y| (x.index, &x.host_id).cmp(&(y.index, &y.host_id)));
        a
    }))
}

/// How long another host gets to answer its part of a `workers.get` or `workers.list`.
const PART_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The other hosts that hold slots of `deployments`, each once, by id.
fn other_hosts(w: &Workers, deployments: &[WorkerDeployment]) -> Vec<Elsewhere> {
    let hosts: std::collections::BTreeSet<&str> = deployments
        .iter()
        .flat_map(|d| d.slots.iter().map(|s| s.host_id.as_str()))
        .filter(|h| *h != w.o.host_id)
        .collect();
    hosts
        .into_iter()
        .map(|h| Elsewhere::on(h, "replicas are").within(PART_WAIT))
        .collect()
}

async fn list(w: W, _req: Request<Empty>) -> Result<Routed<WorkerList>, Problem> {
    let mut workers = Vec::new();
    let replicas = local_replicas(&w).await?;
    let all: Vec<WorkerDeployment> = w.all().await?.into_iter().map(|(d, _)| d).collect();
    let others = other_hosts(&w, &all);
    for d in all {
        let mine = replicas
            .iter()
            .filter(|(n, _)| n == name_of(&d))
            .map(|(_, r)| r.clone())
            .collect();
        workers.push(WorkerStatus {
            deployment: Some(d),
            replicas: mine,
            host_id: w.o.host_id.clone(),
            changed: false,
        });
    }
    let here = WorkerList {
        workers,
        host_id: w.o.host_id.clone(),
    };
    Ok(Routed::AlsoEach(others, here, |mut a, b| {
        for theirs in b.workers {
            let name = theirs.deployment.as_ref().map_or("", name_of);
            if let Some(ours) = a
                .workers
                .iter_mut()
                .find(|x| x.deployment.as_ref().map_or("", name_of) == name)
            {
                ours.replicas.extend(theirs.replicas);
            }
        }
        a
    }))
}

async fn scale(w: W, req: Request<ScaleWorkersRequest>) -> Result<Routed<WorkerStatus>, Problem> {
    let b = &req.body;
    let (d, _) = find(&w, &b.name).await?;
    let image = d.spec.as_ref().map_or("", |s| s.image.as_str()).to_string();
    let candidates = candidates(&w, &image).await?;
    let stored = w
        .bucket
        .modify(&b.name, |cur| {
            let Some(mut d) = cur else {
                return Err(gone(&b.name));
            };
            let mut spec = d.spec.clone().unwrap_or_default();
            check_replicas(b.replicas, spec.min_replicas, spec.max_replicas)?;
            if spec.replicas == b.replicas {
                return Ok(Change::Keep);
            }
            d.slots = slots_for(&w, &d, b.replicas, &candidates)?;
            spec.replicas = b.replicas;
            d.spec = Some(spec);
            d.updated_at = now();
            Ok(Change::Write(d))
        })
        .await?
        .ok_or_else(|| gone(&b.name))?;
    if stored.written {
        tracing::info!(worker = %b.name, replicas = b.replicas, by = %req.caller.agent_id, "worker deployment scaled");
        w.poke();
    }
    status(&w, stored.value, stored.written)
        .await
        .map(Routed::Here)
}

async fn remove(w: W, req: Request<WorkerRef>) -> Result<Routed<RemovedWorker>, Problem> {
    let name = &req.body.name;
    for _ in 0..8 {
        let (d, rev) = find(&w, name).await?;
        if w.bucket.delete_at(name, rev).await? {
            tracing::info!(worker = %name, by = %req.caller.agent_id, "worker deployment removed");
            w.poke();
            return Ok(Routed::Here(RemovedWorker {
                name: name.clone(),
                deployment: Some(d),
            }));
        }
    }
    Err(Problem::conflict(format!(
        "worker deployment `{name}` is being changed concurrently; try again"
    )))
}

fn gone(name: &str) -> Problem {
    Problem::not_found(format!("no worker deployment `{name}`"))
}

async fn find(w: &Workers, name: &str) -> Result<(WorkerDeployment, u64), Problem> {
    check_name(name)?;
    w.bucket.get(name).await?.ok_or_else(|| gone(name))
}

/// A deployment with its replicas on this host.
async fn status(w: &Workers, d: WorkerDeployment, changed: bool) -> Result<WorkerStatus, Problem> {
    let replicas = local_replicas(w)
        .await?
        .into_iter()
        .filter(|(n, _)| n == name_of(&d))
        .map(|(_, r)| r)
        .collect();
    Ok(WorkerStatus {
        deployment: Some(d),
        replicas,
        host_id: w.o.host_id.clone(),
        changed,
    })
}

/// Every worker replica on this host's engine, with its deployment's name, by index.
async fn local_replicas(w: &Workers) -> Result<Vec<(String, WorkerReplica)>, Problem> {
    let list = w.o.engine.list_managed("", "", "worker").await?;
    let mut out: Vec<(String, WorkerReplica)> = list
        .iter()
        .map(|c| {
            let s = seen(c);
            let created_at = chrono::DateTime::from_timestamp(s.created, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            let r = WorkerReplica {
                index: s.index.unwrap_or(0),
                host_id: w.o.host_id.clone(),
                container_id: s.id,
                container_name: s.name,
                state: s.state,
                generation: s.generation,
                created_at,
            };
            (s.worker, r)
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1.index, &a.1.created_at).cmp(&(&b.0, b.1.index, &b.1.created_at)));
    Ok(out)
}
