//! Async runs as durable JetStream jobs: submitting one (with its idempotency key), the
//! workers that run them (the shared queue and this host's own), and the cancel signals
//! every replica follows.

use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message as _;
use tether_bus::jobs::{self, Job, Outcome, WorkerConfig};
use tether_bus::{Ctx, Problem, Request};
use tether_proto::{ToolExecuteRequest, ToolExecution, ToolJob};

use super::T;
use super::prepare::{Prepared, check_id, fallback_prepared, prepare};
use super::record::{new_record, publish_event};
use super::runner::{Claimed, Ran, claim, finish, run_owned};
use crate::state::Status;

pub(super) async fn submit(
    t: &T,
    req: &Request<ToolExecuteRequest>,
    p: Prepared,
    session_host: Option<String>,
) -> Result<ToolExecution, Problem> {
    let rec = new_record(&p, Status::Queued);
    t.results.create(&rec).await?;
    let key = &req.body.idempotency_key;
    if !key.is_empty() {
        let claimed = match t.results.claim_key(&p.space, key, &p.execution_id).await {
            Ok(c) => c,
            Err(e) => {
                t.results.delete(&p.execution_id).await;
                return Err(e);
            }
        };
        if let Some(other) = claimed {
            // The first run answers, whatever its state: it is never queued a second time
            // (a queued first run was published by the request that made it, and a second
            // publish could carry another body under its id).
            t.results.delete(&p.execution_id).await;
            let Some((mut first, _)) = t.results.get(&other).await? else {
                return Err(Problem::conflict(format!(
                    "idempotency key `{key}` was used by execution `{other}`, whose record is gone"
                )));
            };
            first.duplicate = true;
            return Ok(first);
        }
    }
    let job = ToolJob {
        execution_id: p.execution_id.clone(),
        space: p.space.clone(),
        agent_id: p.agent_id.clone(),
        request: Some(req.body.clone()),
        traceparent: tether_bus::telemetry::current_traceparent().unwrap_or_default(),
    };
    if let Err(e) = publish_job(t, req, &job, session_host.as_deref()).await {
        // Nothing was queued: the record and the key go, so the caller can simply retry.
        t.results.delete(&p.execution_id).await;
        if !key.is_empty() {
            t.results.release_key(&p.space, key, &p.execution_id).await;
        }
        return Err(e);
    }
    publish_event(t, &req.ctx, &rec).await;
    Ok(rec)
}

pub(super) async fn publish_job(
    t: &T,
    req: &Request<ToolExecuteRequest>,
    job: &ToolJob,
    host: Option<&str>,
) -> Result<(), Problem> {
    let subject = match host {
        Some(h) => req.ctx.subject(&format!("jobs.tools.host.{h}")),
        None => req.ctx.subject("jobs.tools.any"),
    };
    jobs::publish_dedup(
        &t.js,
        subject,
        &job.execution_id,
        job.encode_to_vec().into(),
        None,
    )
    .await
    .map(|_| ())
    .map_err(|e| Problem::unavailable(format!("cannot queue the tool job: {e}")))
}

/// Broadcast (every replica listens) naming an execution whose cancel was asked; the
/// runner checks the record's `cancel_requested` before acting, so a stray message does
/// nothing.
pub const CANCEL_SUBJECT: &str = "tools.internal.cancel";

/// Runs one delivered job.
pub(super) async fn run_job(t: &T, ctx: &Ctx, job: Job) -> Outcome {
    let Ok(j) = ToolJob::decode(job.payload().as_ref()) else {
        tracing::warn!(subject = %job.subject(), "undecodable tool job dropped");
        return Outcome::Term;
    };
    let runner = ctx.instance_id.to_string();
    let id = j.execution_id.clone();
    let retry = Outcome::Retry(Duration::from_secs(2));
    let last = job.delivered() >= t.o.policy.cfg.tool_job_max_deliver;
    let rec = match claim(t, &id, &runner).await {
        Ok(Claimed::Run(r)) => *r,
        Ok(Claimed::Done) | Ok(Claimed::Missing) => return Outcome::Ack,
        Err(e) => {
            tracing::warn!(execution = %id, error = %e, "cannot claim tool job; retrying");
            return retry;
        }
    };
    let req = j.request.unwrap_or_default();
    let p = match prepare(&t.o.limits, &t.o.policy, &req, &j.space, &j.agent_id, &id) {
        Ok(p) => p,
        Err(e) => {
            let ran = Ran {
                status: Status::Failed,
                exit_code: -1,
                detail: format!(
                    "the job is not valid on host `{}`: {}",
                    t.o.host_id, e.detail
                ),
                ..Default::default()
            };
            let fake = fallback_prepared(&j.space, &j.agent_id, &id);
            return match finish(t, ctx, &fake, rec.attempt, &runner, ran, Instant::now()).await {
                Ok(_) => Outcome::Ack,
                Err(_) => retry,
            };
        }
    };
    let attempt = rec.attempt;
    let failed = |detail: String| Ran {
        status: Status::Failed,
        exit_code: -1,
        detail,
        ..Default::default()
    };
    match t.o.engine.image_exists(&p.image).await {
        Ok(true) => {}
        // Any host may take a job of the shared queue: another one may have the image.
        Ok(false) if !last => {
            tracing::info!(execution = %id, image = %p.image, "image not on this host; leaving the job to another");
            return Outcome::Retry(Duration::from_millis(500));
        }
        Ok(false) => {
            let ran = failed(format!(
                "image `{}` is not on host `{}` (nor on any host that took the job)",
                p.image, t.o.host_id
            ));
            return match finish(t, ctx, &p, attempt, &runner, ran, Instant::now()).await {
                Ok(_) => Outcome::Ack,
                Err(_) => retry,
            };
        }
        Err(e) if !last => {
            tracing::warn!(execution = %id, error = %e, "cannot check the tool's image; retrying");
            return retry;
        }
        Err(e) => {
            let ran = failed(format!("cannot check image `{}`: {e}", p.image));
            return match finish(t, ctx, &p, attempt, &runner, ran, Instant::now()).await {
                Ok(_) => Outcome::Ack,
                Err(_) => retry,
            };
        }
    }
    match run_owned(t, ctx, &p, rec).await {
        Ok(_) => Outcome::Ack,
        Err(e) if !last => {
            tracing::warn!(execution = %id, error = %e, "tool job failed on this node; retrying");
            retry
        }
        Err(e) => {
            // The bus will not deliver it again: the record says so, instead of `running`
            // until its TTL.
            tracing::warn!(execution = %id, error = %e, "tool job failed on its last delivery");
            let ran = failed(format!(
                "gave up after {} deliveries; the last failed with: {}",
                job.delivered(),
                e.detail
            ));
            match finish(t, ctx, &p, attempt, &runner, ran, Instant::now()).await {
                Ok(_) => Outcome::Ack,
                Err(_) => retry,
            }
        }
    }
}

/// The job workers: the shared queue (`jobs.tools.any`) and this host's own
/// (`jobs.tools.host.<host_id>`, runs that need a session network made here).
pub async fn workers(t: T, ctx: Ctx) -> anyhow::Result<()> {
    let cfg = &t.o.policy.cfg;
    if cfg.tool_workers == 0 {
        return Ok(());
    }
    let ack_wait = Duration::from_secs(cfg.tool_job_ack_wait_seconds);
    let mk = |consumer: String, filter: String| {
        let mut w = WorkerConfig::new(t.stream.clone(), consumer);
        w.filter_subject = Some(filter);
        w.max_concurrency = cfg.tool_workers;
        w.ack_wait = ack_wait;
        w.progress_every = (ack_wait / 3).max(Duration::from_millis(200));
        w.max_deliver = cfg.tool_job_max_deliver;
        w.done = Some(t.done.clone());
        w
    };
    let shared = mk("tool-workers".into(), ctx.subject("jobs.tools.any"));
    let own = mk(
        format!("tool-workers-{}", t.o.host_id),
        ctx.subject(&format!("jobs.tools.host.{}", t.o.host_id)),
    );
    let handler = |t: T, ctx: Ctx| {
        move |job: Job| {
            let t = t.clone();
            let ctx = ctx.clone();
            async move { run_job(&t, &ctx, job).await }
        }
    };
    let a = jobs::run_worker(
        t.js.clone(),
        shared,
        ctx.shutdown.clone(),
        handler(t.clone(), ctx.clone()),
    );
    let b = jobs::run_worker(
        t.js.clone(),
        own,
        ctx.shutdown.clone(),
        handler(t.clone(), ctx.clone()),
    );
    let (ra, rb) = tokio::join!(a, b);
    ra.and(rb)
}

/// Follows cancel signals for runs on this node.
pub async fn cancel_listener(t: T, ctx: Ctx) -> anyhow::Result<()> {
    let mut sub = ctx.client.subscribe(ctx.subject(CANCEL_SUBJECT)).await?;
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            m = sub.next() => m,
        };
        let Some(msg) = msg else { return Ok(()) };
        let id = String::from_utf8_lossy(&msg.payload).into_owned();
        if check_id(&id).is_err() || !t.is_running_here(&id) {
            continue;
        }
        match t.results.get(&id).await {
            Ok(Some((r, _))) if r.cancel_requested => {
                t.cancel_running(&id);
            }
            _ => {}
        }
    }
}
