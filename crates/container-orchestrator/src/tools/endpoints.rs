//! `tools.execute` (sync runs here, async runs through [`super::jobs`]), `tools.get`,
//! `tools.cancel` and `tools.logs` (live from the host that runs it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tether_bus::{Encoding, Endpoint, Node, Problem, RawRequest, Reply, Request, Scope};
use tether_proto::{ToolExecuteRequest, ToolExecution, ToolLogs, ToolRef};

use super::T;
use super::jobs::{CANCEL_SUBJECT, submit};
use super::prepare::{ToolNetwork, check_id, prepare};
use super::record::{new_record, now_rfc3339, publish_event};
use super::runner::{read_logs, run_owned};
use crate::route::{Elsewhere, Routed, Routes};
use crate::state::{Change, Shared, Status, is_terminal};

/// A typed endpoint whose reply is a run record: in JSON, `result` keeps the numbers the
/// tool printed (`3`, not `3.0`: protobuf's `Value` holds only doubles).
pub(super) fn record_endpoint<Q, F, Fut>(path: String, f: F) -> Endpoint
where
    Q: prost::Message + serde::de::DeserializeOwned + Default + Send + 'static,
    F: Fn(Request<Q>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<ToolExecution, Problem>> + Send + 'static,
{
    let f = Arc::new(f);
    Endpoint::raw(path, move |raw: RawRequest| {
        let f = f.clone();
        async move {
            let enc = raw.encoding;
            let rec = f(raw.decode()?).await?;
            Ok(match enc {
                Encoding::Json => {
                    let mut v = serde_json::to_value(&rec)
                        .map_err(|e| Problem::internal(format!("cannot encode the reply: {e}")))?;
                    v["result"] = rec
                        .result
                        .as_ref()
                        .map(tether_proto::from_pb_value)
                        .unwrap_or(serde_json::Value::Null);
                    let body = serde_json::to_vec(&v)
                        .map_err(|e| Problem::internal(format!("cannot encode the reply: {e}")))?;
                    Reply {
                        body: body.into(),
                        headers: async_nats::HeaderMap::new(),
                    }
                }
                Encoding::Protobuf => Reply::new(rec.encode_to_vec(), enc.content_type()),
            })
        }
    })
}

/// Adds `tools.*` (and `hosts.<host_id>.tools.logs`).
pub fn endpoints(node: Node, t: &T) -> Node {
    let max = t.o.policy.cfg.max_concurrent_tools;
    let (t1, t2, t3) = (t.clone(), t.clone(), t.clone());
    let node = node
        .endpoint(
            record_endpoint("tools.execute".into(), move |r| execute(t1.clone(), r))
                .scope(Scope::ToolsRun)
                .max_concurrency(max),
        )
        .endpoint(
            record_endpoint("tools.get".into(), move |r| get(t2.clone(), r)).scope(Scope::ToolsRun),
        )
        .endpoint(
            record_endpoint("tools.cancel".into(), move |r| cancel(t3.clone(), r))
                .scope(Scope::ToolsRun),
        );
    Routes::new(node, &t.o.host_id, t.clone())
        .serve("tools.logs", Scope::ToolsRun, logs)
        .node()
}

pub(super) async fn execute(
    t: T,
    req: Request<ToolExecuteRequest>,
) -> Result<ToolExecution, Problem> {
    let caller = req.caller.clone();
    let space = caller.space_for(&req.body.space)?;
    let execution_id = uuid::Uuid::now_v7().simple().to_string();
    let p = prepare(
        &t.o.limits,
        &t.o.policy,
        &req.body,
        &space,
        &caller.agent_id,
        &execution_id,
    )?;
    if !t.o.engine.image_exists(&p.image).await? {
        return Err(Problem::unprocessable(format!(
            "image `{}` is not on host `{}` (the orchestrator never pulls: build or load it first)",
            p.image, t.o.host_id
        )));
    }
    let mut host_subject = None;
    if p.network == ToolNetwork::Session {
        let Some(s) = t.sessions.get(&space, &p.session_id).await? else {
            return Err(Problem::conflict(format!(
                "session `{}` has no private network (start a relic first)",
                p.session_id
            )));
        };
        if s.0.closed {
            return Err(Problem::conflict(format!(
                "session `{}` was cleaned up",
                p.session_id
            )));
        }
        host_subject = Some(s.0.host_id);
    }
    if p.is_async {
        return submit(&t, &req, p, host_subject).await;
    }
    if let Some(h) = host_subject.filter(|h| *h != t.o.host_id) {
        return Err(Problem::conflict(format!(
            "session `{}` lives on host `{h}`: run it there with `async: true`, or call the orchestrator of that host",
            p.session_id
        )));
    }
    // Sync: the record first (so get/cancel work while it runs), then the run.
    let mut rec = new_record(&p, Status::Running);
    rec.attempt = 1;
    rec.runner = req.ctx.instance_id.to_string();
    rec.host_id = t.o.host_id.clone();
    rec.started_at = rec.created_at.clone();
    t.results.create(&rec).await?;
    let runner = rec.runner.clone();
    match run_owned(&t, &req.ctx, &p, rec).await {
        Ok(r) => Ok(r),
        Err(e) => {
            // Nobody will run it again: the record says why it stopped.
            let detail = e.detail.clone();
            let _ = t
                .results
                .modify(&p.execution_id, |r| {
                    if is_terminal(&r.status) || r.runner != runner {
                        return Change::Keep;
                    }
                    r.status = Status::Failed.into();
                    r.detail = detail.clone();
                    r.finished_at = now_rfc3339();
                    Change::Write
                })
                .await;
            Err(e)
        }
    }
}

/// The record, if the caller may see it.
pub(super) async fn visible(
    t: &Shared,
    req: &Request<ToolRef>,
) -> Result<(ToolExecution, u64), Problem> {
    let id = &req.body.execution_id;
    check_id(id)?;
    let caller = &req.caller;
    let (r, rev) = t
        .results
        .get(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
    if caller.space_for(&r.space).is_err() {
        // Another space's run does not exist for this caller.
        return Err(Problem::not_found(format!("no execution `{id}`")));
    }
    Ok((r, rev))
}

pub(super) async fn get(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
    Ok(visible(&t, &req).await?.0)
}

pub(super) async fn cancel(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
    let (r, _) = visible(&t, &req).await?;
    if is_terminal(&r.status) {
        return Err(Problem::conflict(format!(
            "execution `{}` has finished already ({})",
            r.execution_id, r.status
        )));
    }
    let id = r.execution_id.clone();
    let changed = t
        .results
        .modify(&id, |r| {
            if is_terminal(&r.status) {
                return Change::Keep;
            }
            r.cancel_requested = true;
            if r.status == Status::Queued.as_str() {
                r.status = Status::Cancelled.into();
                r.detail = "cancelled before it started".into();
                r.finished_at = now_rfc3339();
            }
            Change::Write
        })
        .await?
        .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
    if changed.0.status == Status::Cancelled.as_str() {
        publish_event(&t, &req.ctx, &changed.0).await;
        return Ok(changed.0);
    }
    if !t.cancel_running(&id) {
        let _ = req
            .ctx
            .client
            .publish(req.ctx.subject(CANCEL_SUBJECT), id.clone().into())
            .await;
    }
    // Wait (bounded) for the runner to stop it.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (r, _) = t
            .results
            .get(&id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
        if is_terminal(&r.status) || Instant::now() > until {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Live output from the host that runs it; the record's otherwise.
pub(super) async fn logs(t: T, req: Request<ToolRef>) -> Result<Routed<ToolLogs>, Problem> {
    let (r, _) = visible(&t, &req).await?;
    let live = r.status == Status::Running.as_str() && !r.container_id.is_empty();
    if live && r.host_id == t.o.host_id {
        let cap = t.o.limits.default_output;
        match read_logs(t.o.engine.docker(), &r.container_id, cap).await {
            Ok((stdout, stderr, truncated)) => {
                return Ok(Routed::Here(ToolLogs {
                    execution_id: r.execution_id,
                    status: r.status,
                    stdout,
                    stderr,
                    truncated,
                    live: true,
                }));
            }
            Err(e) => tracing::debug!(error = %e, "live logs unavailable; answering the record"),
        }
    }
    let there =
        (live && r.host_id != t.o.host_id).then(|| Elsewhere::on(r.host_id.clone(), "the run is"));
    let recorded = ToolLogs {
        execution_id: r.execution_id,
        status: r.status,
        stdout: r.stdout,
        stderr: r.stderr,
        truncated: r.truncated,
        live: false,
    };
    Ok(match there {
        Some(there) => Routed::Prefer(there, recorded),
        None => Routed::Here(recorded),
    })
}
