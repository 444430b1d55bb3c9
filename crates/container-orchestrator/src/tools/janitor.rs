//! The tool janitor: tool containers no run owns any more, sync runs whose node died, then
//! (through [`crate::sessions::pass`]) this host's part of sessions that are over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::ListContainersOptionsBuilder;
use tether_bus::Ctx;

use super::record::{fit_record, now_rfc3339};
use super::runner::{kill, read_logs, wait_exit};
use crate::labels::{
    LABEL_CLEANUP, LABEL_DEADLINE, LABEL_EXECUTION, LABEL_HOST, LABEL_KIND, LABEL_MANAGED,
};
use crate::state::{Change, Shared, Status, is_terminal};

/// One janitor pass over this host's tool containers: removes those no run owns any more
/// (their record finished with `cleanup`, names another container, or is gone), and
/// finishes the records of sync runs whose node died (their container past its deadline).
pub async fn janitor_pass(t: &Shared) -> anyhow::Result<Vec<String>> {
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

/// Finishes the record of a sync run whose node died, with the output its container left.
pub(super) async fn abandon(t: &Shared, exec: &str, container: &str) {
    let docker = t.o.engine.docker();
    kill(docker, container).await;
    let code = tokio::time::timeout(Duration::from_secs(10), wait_exit(docker, container))
        .await
        .ok()
        .and_then(Result::ok);
    let (out, err, truncated) = read_logs(docker, container, t.o.max_output)
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
            fit_record(r, t.o.max_output);
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
        if let Err(e) = pass(&t).await {
            tracing::warn!(error = %format!("{e:#}"), "tool janitor pass failed");
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn pass(t: &Shared) -> anyhow::Result<()> {
    janitor_pass(t).await?;
    crate::sessions::pass(t).await
}
