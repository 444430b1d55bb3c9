//! The tool janitor: tool containers no run owns any more, sync runs whose node died, then
//! (through [`crate::sessions::pass`]) this host's part of sessions that are over.
//!
//! A sync run lives in the request of the node instance that runs it. When that instance is
//! gone (the server says nobody answers its `$SRV.PING`) while the run's container is on this
//! host, this node adopts the run, as a redelivered job adopts its container: a new attempt
//! owns the record, and the container is watched to its end (or deadline) and read, never run
//! again. Only when the bus cannot say is a run whose container is past its deadline recorded
//! as abandoned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::ListContainersOptionsBuilder;
use tether_bus::Ctx;
use tether_proto::ToolExecution;

use super::T;
use super::prepare::fallback_prepared;
use super::record::{fit_record, now_rfc3339};
use super::runner::{Ran, finish, kill, read_logs, wait_exit, watch};
use crate::labels::{
    LABEL_ATTEMPT, LABEL_CLEANUP, LABEL_DEADLINE, LABEL_EXECUTION, LABEL_HOST, LABEL_KIND,
    LABEL_MANAGED, LABEL_RUNNER,
};
use crate::state::{Change, Shared, Status, is_terminal};

/// One janitor pass over this host's tool containers: removes those no run owns any more
/// (their record finished with `cleanup`, names another container, or is gone), and
/// adopts the sync runs whose node instance is gone, and finishes the records of those whose
/// node may have died when the bus cannot say (their container past its deadline).
pub async fn janitor_pass(t: &T, ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let o = &t.o;
    let grace = chrono::Duration::seconds(
        i64::try_from(o.policy.cfg.reconcile_grace_seconds).unwrap_or(60),
    );
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_HOST}={}", o.host_id),
            format!("{LABEL_KIND}=tool"),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = o.engine.docker().list_containers(Some(opts)).await?;
    let mut removed = Vec::new();
    for c in list {
        let id = c.id.clone().unwrap_or_default();
        let labels = c.labels.clone().unwrap_or_default();
        let Some(exec) = labels.get(LABEL_EXECUTION) else {
            continue;
        };
        if t.is_running_here(exec) {
            continue;
        }
        // A sync run whose node is gone (SIGKILLed, say) while its container runs or has
        // exited: adopted, as a redelivered job is, so the record gets what the tool did.
        if let Some((r, _)) = t
            .results
            .get(exec)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?
            && !r.r#async
            && !is_terminal(&r.status)
            && names_container(&r, &id, &labels)
            && *r.runner != *ctx.instance_id
            && runner_alive(ctx, &r.runner).await == Some(false)
        {
            adopt_sync(t, ctx, r, &c).await;
            continue;
        }
        let young = c
            .created
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .is_none_or(|at| chrono::Utc::now() - at < grace);
        if young {
            continue;
        }
        let cleanup = labels.get(LABEL_CLEANUP).is_none_or(|v| v == "true");
        let rec = t
            .results
            .get(exec)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        // A sync run lives only in the request of the node that ran it: when its container
        // is past its deadline (plus the grace) and that node is not running it, the node
        // died, and the record is finished here so `tools.get` stops saying `running`.
        // (A job is redelivered instead, and its next attempt adopts the container.)
        let overdue = labels
            .get(LABEL_DEADLINE)
            .and_then(|d| d.parse::<i64>().ok())
            .and_then(|d| chrono::DateTime::from_timestamp(d, 0))
            .is_some_and(|d| chrono::Utc::now() - d > grace);
        if let Some((r, _)) = &rec
            && !is_terminal(&r.status)
            && !r.r#async
            && r.container_id == id
            && overdue
        {
            abandon(t, exec, &id).await;
        }
        let orphan = match &rec {
            None => true,
            Some((r, _)) if is_terminal(&r.status) => cleanup,
            Some((r, _)) if !r.r#async && r.container_id == id => overdue,
            Some((r, _)) => r.container_id != id && !r.container_id.is_empty(),
        };
        if orphan && o.engine.remove(&id).await.is_ok() {
            tracing::info!(container = %id, execution = %exec, "orphaned tool container removed");
            removed.push(id);
        }
    }
    Ok(removed)
}

/// Whether the record's current attempt made this container (the record names it, or had
/// not yet when its node stopped).
fn names_container(r: &ToolExecution, id: &str, labels: &HashMap<String, String>) -> bool {
    r.container_id == id
        || (r.container_id.is_empty()
            && labels.get(LABEL_RUNNER) == Some(&r.runner)
            && labels.get(LABEL_ATTEMPT) == Some(&r.attempt.to_string()))
}

/// Whether the node instance `runner` still answers on the bus (its `$SRV.PING`):
/// `Some(false)` only when the server says nobody listens there, i.e. the instance is gone;
/// `None` when the bus did not say.
async fn runner_alive(ctx: &Ctx, runner: &str) -> Option<bool> {
    if runner.is_empty() {
        return None;
    }
    let subject = format!("$SRV.PING.{}.{runner}", crate::NAME);
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        ctx.client.request(subject, bytes::Bytes::new()),
    )
    .await;
    match asked {
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Some(false),
        _ => None,
    }
}

/// When the run's container must stop (its deadline label; now when it has none).
fn deadline_of(labels: &HashMap<String, String>) -> tokio::time::Instant {
    let now = chrono::Utc::now().timestamp();
    let at = labels
        .get(LABEL_DEADLINE)
        .and_then(|d| d.parse::<i64>().ok())
        .unwrap_or(now);
    tokio::time::Instant::now() + Duration::from_secs(u64::try_from(at - now).unwrap_or(0))
}

/// The `Instant` an RFC 3339 time stands for (now when it does not parse).
fn instant_of(at: &str) -> Instant {
    let ago = chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .and_then(|t| {
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                .to_std()
                .ok()
        })
        .unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Takes over a sync run whose node stopped: a new attempt of this node owns the record,
/// and the container is watched to its end (or its deadline) in the background and read,
/// not run again. One that never started is recorded failed and removed.
async fn adopt_sync(t: &T, ctx: &Ctx, r: ToolExecution, c: &bollard::models::ContainerSummary) {
    let id = c.id.clone().unwrap_or_default();
    let labels = c.labels.clone().unwrap_or_default();
    let exec = r.execution_id.clone();
    let me = ctx.instance_id.to_string();
    let (before, attempt) = (r.runner.clone(), r.attempt);
    let cid = id.clone();
    let claimed = t
        .results
        .modify(&exec, |r| {
            if is_terminal(&r.status) || r.runner != before || r.attempt != attempt {
                return Change::Keep;
            }
            r.attempt += 1;
            r.runner = me.clone();
            r.container_id = cid.clone();
            Change::Write
        })
        .await;
    let rec = match claimed {
        Ok(Some((rec, _, true))) => rec,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(execution = %exec, error = %e, "cannot adopt a sync run");
            return;
        }
    };
    let note = format!("adopted after the node that started it ({before}) stopped");
    let p = fallback_prepared(&rec.space, &rec.submitted_by, &exec);
    let started = instant_of(&rec.started_at);
    let cleanup = labels.get(LABEL_CLEANUP).is_none_or(|v| v == "true");
    if c.state == Some(bollard::models::ContainerSummaryStateEnum::CREATED) {
        let ran = Ran {
            status: Status::Failed,
            exit_code: -1,
            detail: format!("the node that ran it ({before}) stopped before the tool started"),
            container_id: id.clone(),
            ..Default::default()
        };
        if finish(t, ctx, &p, rec.attempt, &me, ran, started)
            .await
            .is_ok()
        {
            let _ = t.o.engine.remove(&id).await;
        }
        return;
    }
    tracing::info!(execution = %exec, container = %id, runner = %before, "adopting a sync run whose node stopped");
    let deadline = deadline_of(&labels);
    let (t, ctx) = (t.clone(), ctx.clone());
    tokio::spawn(async move {
        let (cancel, _registered) = t.register(&exec);
        if rec.cancel_requested {
            cancel.cancel();
        }
        let docker = t.o.engine.docker();
        let memory_mb = docker
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|c| c.host_config)
            .and_then(|h| h.memory)
            .map_or(0, |m| i32::try_from(m / (1024 * 1024)).unwrap_or(i32::MAX));
        let mut ran = watch(
            &t.o,
            &id,
            deadline,
            &cancel,
            t.o.limits.max_output,
            memory_mb,
        )
        .await;
        ran.detail = if ran.detail.is_empty() {
            note
        } else {
            format!("{}; {note}", ran.detail)
        };
        let done = finish(&t, &ctx, &p, rec.attempt, &me, ran, started).await;
        if cleanup
            && done.is_ok()
            && let Err(e) = t.o.engine.remove(&id).await
        {
            tracing::warn!(container = %id, error = %e, "cannot remove tool container");
        }
    });
}

/// Finishes the record of a sync run whose node died, with the output its container left.
pub(super) async fn abandon(t: &Shared, exec: &str, container: &str) {
    let docker = t.o.engine.docker();
    kill(docker, container).await;
    let code = tokio::time::timeout(Duration::from_secs(10), wait_exit(docker, container))
        .await
        .ok()
        .and_then(Result::ok);
    let (out, err, truncated) = read_logs(docker, container, t.o.limits.max_output)
        .await
        .unwrap_or_default();
    let done = t
        .results
        .modify(exec, |r| {
            if is_terminal(&r.status) || r.container_id != container {
                return Change::Keep;
            }
            r.status = Status::Failed.into();
            r.exit_code = code.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1);
            r.stdout = out.clone();
            r.stderr = err.clone();
            r.truncated = truncated;
            r.detail = format!(
                "the node that ran it ({}) stopped before the run finished; its container was removed",
                r.runner
            );
            r.finished_at = now_rfc3339();
            fit_record(r, t.o.limits.max_output);
            Change::Write
        })
        .await;
    match done {
        Ok(Some((_, _, true))) => {
            tracing::warn!(execution = %exec, container = %container, "sync tool run abandoned by a node that stopped: recorded as failed");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(execution = %exec, error = %e, "cannot finish an abandoned run"),
    }
}

/// The tool-and-session janitor: orphaned tool containers, then sessions that expired or
/// were closed (this host's part of each), then session networks no record explains.
pub async fn janitor(t: Arc<Shared>, ctx: Ctx) -> anyhow::Result<()> {
    let every = Duration::from_secs(t.o.policy.cfg.janitor_interval_seconds.max(1));
    loop {
        if let Err(e) = pass(&t, &ctx).await {
            tracing::warn!(error = %format!("{e:#}"), "tool janitor pass failed");
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn pass(t: &T, ctx: &Ctx) -> anyhow::Result<()> {
    janitor_pass(t, ctx).await?;
    crate::sessions::pass(t).await
}
