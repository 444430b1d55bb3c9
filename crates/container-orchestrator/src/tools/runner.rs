//! One attempt at a run: claim the record, adopt an earlier attempt's container or create
//! one, watch it to its end (deadline, cancel, exit) while sampling its usage, and record the
//! outcome if this attempt still owns the record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    ListContainersOptionsBuilder, LogsOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tether_bus::{Ctx, Problem};
use tether_proto::{ResourceUsage, ToolExecution};
use tokio_util::sync::CancellationToken;

use super::T;
use super::prepare::{Prepared, ToolNetwork};
use super::record::{fit_record, now_rfc3339, parse_result, publish_event};
use super::usage::Sampler;
use crate::docker::{EngineError, EngineErrorKind};
use crate::labels::{
    LABEL_ATTEMPT, LABEL_DEADLINE, LABEL_EXECUTION, LABEL_KIND, LABEL_MANAGED, LABEL_RUNNER,
};
use crate::state::{Change, Orchestrator, Shared, Status, is_terminal};

/// What happened to one container run.
#[derive(Debug, Default)]
pub(super) struct Ran {
    pub(super) status: Status,
    pub(super) exit_code: i32,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) truncated: bool,
    pub(super) oom_killed: bool,
    pub(super) usage: ResourceUsage,
    pub(super) detail: String,
    pub(super) container_id: String,
}

/// Managed tool containers of an execution on this engine, whatever node made them.
pub(super) async fn containers_of(
    o: &Orchestrator,
    execution_id: &str,
) -> Result<Vec<bollard::models::ContainerSummary>, EngineError> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_KIND}=tool"),
            format!("{LABEL_EXECUTION}={execution_id}"),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    Ok(o.engine.docker().list_containers(Some(opts)).await?)
}

/// The container's exit code, once it is not running. `Err` when it vanished.
pub(super) async fn wait_exit(docker: &bollard::Docker, id: &str) -> Result<i64, EngineError> {
    let opts = WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    match docker.wait_container(id, Some(opts)).next().await {
        Some(Ok(r)) => Ok(r.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(e.into()),
        None => Err(EngineError::new(
            EngineErrorKind::Other,
            "the engine ended the wait without a status",
        )),
    }
}

/// The container's output (newest kept within `cap`, stdout and stderr together).
pub async fn read_logs(
    docker: &bollard::Docker,
    id: &str,
    cap: usize,
) -> Result<(String, String, bool), EngineError> {
    let opts = LogsOptionsBuilder::default()
        .follow(false)
        .stdout(true)
        .stderr(true)
        .build();
    crate::docker::read_logs(docker, id, opts, cap).await
}

/// The exit code of a container that is no longer running; `None` while it runs (or when
/// the engine cannot say).
pub(super) async fn exited_code(docker: &bollard::Docker, id: &str) -> Option<i64> {
    let st = docker.inspect_container(id, None).await.ok()?.state?;
    if st.running == Some(true)
        || st.status == Some(bollard::models::ContainerStateStatusEnum::CREATED)
    {
        return None;
    }
    st.exit_code
}

/// Kills a container (gone or stopped already counts as done).
pub(super) async fn kill(docker: &bollard::Docker, id: &str) {
    let opts = bollard::query_parameters::KillContainerOptionsBuilder::default()
        .signal("KILL")
        .build();
    if let Err(e) = docker.kill_container(id, Some(opts)).await {
        tracing::debug!(container = %id, error = %e, "kill");
    }
}

/// Why a run stopped early.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Exited,
    Deadline,
    Cancelled,
}

/// Waits for a started (or adopted) container, stops it at the deadline or on cancel, and
/// reads what it did.
pub(super) async fn watch(
    o: &Orchestrator,
    id: &str,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
    cap: usize,
    memory_mb: i32,
) -> Ran {
    let docker = o.engine.docker();
    let sampler = Sampler::start(docker, id);
    let waited = tokio::select! {
        r = wait_exit(docker, id) => Ok((Stop::Exited, r)),
        _ = tokio::time::sleep_until(deadline) => Err(Stop::Deadline),
        _ = cancel.cancelled() => Err(Stop::Cancelled),
    };
    // An adopted container whose deadline passed while no node watched it may have exited
    // on its own long before: what it did decides, not our clock.
    let waited = match waited {
        Err(Stop::Deadline) => match exited_code(docker, id).await {
            Some(code) => Ok((Stop::Exited, Ok(code))),
            None => Err(Stop::Deadline),
        },
        w => w,
    };
    let (stop, code) = match waited {
        Ok((s, r)) => (s, r),
        Err(stop) => {
            // The last reading: a stopped container's figures are gone.
            sampler.read_now().await;
            kill(docker, id).await;
            let r = tokio::time::timeout(Duration::from_secs(10), wait_exit(docker, id))
                .await
                .unwrap_or_else(|_| {
                    Err(EngineError::new(
                        EngineErrorKind::Timeout,
                        "the container did not stop after SIGKILL",
                    ))
                });
            (stop, r)
        }
    };
    let usage = sampler.stop();
    let mut ran = Ran {
        usage,
        container_id: id.to_string(),
        ..Default::default()
    };
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            ran.status = if stop == Stop::Exited {
                Status::Failed
            } else if stop == Stop::Deadline {
                Status::TimedOut
            } else {
                Status::Cancelled
            };
            ran.exit_code = -1;
            ran.detail = if e.kind() == EngineErrorKind::NotFound {
                "the container was removed while the tool ran".into()
            } else {
                format!("lost the container while the tool ran: {e}")
            };
            return ran;
        }
    };
    ran.exit_code = i32::try_from(code).unwrap_or(-1);
    // Both are reads of a stopped container: one round trip's time, not two.
    let (logs, inspected) = tokio::join!(
        read_logs(docker, id, cap),
        docker.inspect_container(id, None)
    );
    match logs {
        Ok((out, err, t)) => {
            ran.stdout = out;
            ran.stderr = err;
            ran.truncated = t;
        }
        Err(e) => ran.detail = format!("could not read the tool's output: {e}"),
    }
    if let Ok(c) = inspected {
        ran.oom_killed = c.state.and_then(|s| s.oom_killed).unwrap_or(false);
    }
    ran.status = match stop {
        Stop::Deadline => {
            ran.detail = "killed at its deadline".into();
            Status::TimedOut
        }
        Stop::Cancelled => {
            ran.detail = "cancelled".into();
            Status::Cancelled
        }
        Stop::Exited if ran.exit_code == 0 => Status::Completed,
        Stop::Exited => {
            if ran.oom_killed {
                ran.detail =
                    format!("killed by the kernel's OOM killer (memory limit {memory_mb} MiB)");
            }
            Status::Failed
        }
    };
    ran
}

/// Outcome of claiming a record for an attempt.
pub(super) enum Claimed {
    Run(Box<ToolExecution>),
    /// Terminal already (done elsewhere, or cancelled before it started).
    Done,
    Missing,
}

/// Makes `attempt` the owner of the record (status running).
pub(super) async fn claim(t: &Shared, id: &str, runner: &str) -> Result<Claimed, Problem> {
    let host = t.o.host_id.clone();
    let r = t
        .results
        .modify(id, |r| {
            if is_terminal(&r.status) {
                return Change::Keep;
            }
            if r.cancel_requested {
                r.status = Status::Cancelled.into();
                r.detail = "cancelled before it started".into();
                r.finished_at = now_rfc3339();
                return Change::Write;
            }
            r.status = Status::Running.into();
            r.attempt += 1;
            r.runner = runner.to_string();
            r.host_id = host.clone();
            r.container_id.clear();
            r.started_at = now_rfc3339();
            Change::Write
        })
        .await?;
    Ok(match r {
        None => Claimed::Missing,
        Some((r, _, _)) if is_terminal(&r.status) => Claimed::Done,
        Some((r, _, _)) => Claimed::Run(Box::new(r)),
    })
}

/// Runs an execution whose record this attempt owns (`rec`), and records the outcome.
/// Returns the final record (another attempt's, when this one was superseded).
pub(super) async fn run_owned(
    t: &T,
    ctx: &Ctx,
    p: &Prepared,
    rec: ToolExecution,
) -> Result<ToolExecution, Problem> {
    let o = &t.o;
    let docker = o.engine.docker();
    let runner = ctx.instance_id.to_string();
    let attempt = rec.attempt;
    let (cancel, _registered) = t.register(&p.execution_id);
    // A cancel that landed between the claim and the registration.
    if let Some((r, _)) = t.results.get(&p.execution_id).await?
        && r.cancel_requested
    {
        cancel.cancel();
    }
    let owned = |r: &ToolExecution| r.attempt == attempt && r.runner == runner;

    // Earlier attempts' containers on this engine: adopt one that ran, remove the rest.
    let mut adopted: Option<(String, tokio::time::Instant)> = None;
    let mut leftovers = Vec::new();
    if p.is_async {
        let mut prior = containers_of(o, &p.execution_id).await.unwrap_or_default();
        prior.sort_by_key(|c| std::cmp::Reverse(c.created.unwrap_or(0)));
        for c in prior {
            let id = c.id.clone().unwrap_or_default();
            let ran = matches!(
                c.state,
                Some(
                    bollard::models::ContainerSummaryStateEnum::RUNNING
                        | bollard::models::ContainerSummaryStateEnum::EXITED
                        | bollard::models::ContainerSummaryStateEnum::PAUSED
                )
            );
            if adopted.is_none() && ran {
                let deadline_unix = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_DEADLINE))
                    .and_then(|d| d.parse::<i64>().ok())
                    .unwrap_or_else(|| chrono::Utc::now().timestamp());
                let left = (deadline_unix - chrono::Utc::now().timestamp()).max(0);
                let deadline = tokio::time::Instant::now()
                    + Duration::from_secs(u64::try_from(left).unwrap_or(0));
                tracing::info!(execution = %p.execution_id, container = %id, attempt, "adopting the container of an earlier attempt");
                adopted = Some((id, deadline));
            } else {
                leftovers.push(id);
            }
        }
        for id in &leftovers {
            if let Err(e) = o.engine.remove(id).await {
                tracing::warn!(container = %id, error = %e, "cannot remove an earlier attempt's container");
            }
        }
    }

    let started = Instant::now();
    let fresh = adopted.is_none();
    let (container_id, deadline) = match adopted {
        Some(a) => a,
        None => {
            let mut spec = p.spec.clone();
            let deadline = tokio::time::Instant::now() + p.timeout;
            let deadline_unix = chrono::Utc::now().timestamp()
                + i64::try_from(p.timeout.as_secs()).unwrap_or(i64::MAX / 2);
            spec.name = format!("tether-tool-{}-{attempt}", p.execution_id);
            spec.labels.insert(LABEL_RUNNER.into(), runner.clone());
            spec.labels
                .insert(LABEL_ATTEMPT.into(), attempt.to_string());
            spec.labels
                .insert(LABEL_DEADLINE.into(), deadline_unix.to_string());
            if p.network == ToolNetwork::Session {
                match crate::sessions::find_network(o, &p.space, &p.session_id).await {
                    Ok(Some((_, name))) => spec.network_mode = name,
                    Ok(None) => {
                        return finish(t, ctx, p, attempt, &runner, Ran {
                            status: Status::Failed,
                            exit_code: -1,
                            detail: format!(
                                "session `{}` has no private network on host `{}` (start a relic first)",
                                p.session_id, o.host_id
                            ),
                            ..Default::default()
                        }, started)
                        .await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let id = match o.engine.create(&spec, &o.policy.cfg).await {
                Ok(id) => id,
                Err(e) => {
                    let ran = Ran {
                        status: Status::Failed,
                        exit_code: -1,
                        detail: format!("the engine refused the tool container: {e}"),
                        ..Default::default()
                    };
                    if matches!(
                        e.kind(),
                        EngineErrorKind::Unavailable | EngineErrorKind::Timeout
                    ) {
                        return Err(e.into());
                    }
                    return finish(t, ctx, p, attempt, &runner, ran, started).await;
                }
            };
            (id, deadline)
        }
    };
    // The record names the container, so logs can be read live and the janitor knows it.
    let cid = container_id.clone();
    let noted = t
        .results
        .modify(&p.execution_id, |r| {
            if !owned(r) || is_terminal(&r.status) {
                return Change::Keep;
            }
            r.container_id = cid.clone();
            Change::Write
        })
        .await;
    match noted {
        Ok(Some((r, _, _))) if !owned(&r) || is_terminal(&r.status) => {
            // Another attempt took over meanwhile: this one stops.
            let _ = o.engine.remove(&container_id).await;
            return Ok(r);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(execution = %p.execution_id, error = %e, "cannot note the container in the record")
        }
    }
    if cancel.is_cancelled() {
        let ran = Ran {
            status: Status::Cancelled,
            exit_code: -1,
            detail: "cancelled before the tool started".into(),
            container_id: container_id.clone(),
            ..Default::default()
        };
        let _ = o.engine.remove(&container_id).await;
        return finish(t, ctx, p, attempt, &runner, ran, started).await;
    }
    // An adopted container was started by its first attempt; a new one starts now.
    let needs_start = fresh
        || match docker.inspect_container(&container_id, None).await {
            Ok(c) => {
                c.state.as_ref().and_then(|s| s.status)
                    == Some(bollard::models::ContainerStateStatusEnum::CREATED)
            }
            Err(_) => true,
        };
    if needs_start && let Err(e) = o.engine.start(&container_id).await {
        let (out, err, _) = read_logs(docker, &container_id, p.max_output)
            .await
            .unwrap_or_default();
        let ran = Ran {
            status: Status::Failed,
            exit_code: 127,
            stdout: out,
            stderr: err,
            detail: format!("the tool container could not start: {e}"),
            container_id: container_id.clone(),
            ..Default::default()
        };
        if p.cleanup {
            let _ = o.engine.remove(&container_id).await;
        }
        return finish(t, ctx, p, attempt, &runner, ran, started).await;
    }
    // A new tool's time starts when the tool does: the engine's create and start (seconds on
    // a busy host) do not eat into it. The deadline label keeps the earlier bound, so a node
    // that adopts the run after a crash stops it no later than this one would have.
    let deadline = if needs_start {
        tokio::time::Instant::now() + p.timeout
    } else {
        deadline
    };
    let ran = watch(
        o,
        &container_id,
        deadline,
        &cancel,
        p.max_output,
        p.spec.memory_mb,
    )
    .await;
    let rec = finish(t, ctx, p, attempt, &runner, ran, started).await;
    // A job whose outcome could not be recorded is delivered again: its container stays for
    // the next attempt to adopt (read, not run again); the janitor removes it otherwise.
    // A superseded attempt leaves it too: the attempt that owns the record now may have
    // adopted it and still has to read its output (found in the cluster test: a job
    // redelivered while its first attempt still watched lost its output to that attempt's
    // removal, and was recorded completed without a result).
    let keep = match &rec {
        Err(_) => p.is_async,
        Ok(r) => !owned(r),
    };
    if p.cleanup
        && !keep
        && let Err(e) = o.engine.remove(&container_id).await
    {
        tracing::warn!(container = %container_id, error = %e, "cannot remove tool container");
    }
    rec
}

/// Records the outcome if this attempt still owns the record; publishes the event.
pub(super) async fn finish(
    t: &T,
    ctx: &Ctx,
    p: &Prepared,
    attempt: u32,
    runner: &str,
    ran: Ran,
    started: Instant,
) -> Result<ToolExecution, Problem> {
    let result = parse_result(&ran.stdout);
    let budget = t.o.limits.max_output;
    let mut wrote = false;
    let out = t
        .results
        .modify(&p.execution_id, |r| {
            if r.attempt != attempt || r.runner != runner || is_terminal(&r.status) {
                return Change::Keep;
            }
            r.status = ran.status.to_string();
            r.exit_code = ran.exit_code;
            r.stdout = ran.stdout.clone();
            r.stderr = ran.stderr.clone();
            r.truncated = ran.truncated;
            r.oom_killed = ran.oom_killed;
            r.resource_usage = Some(ran.usage);
            r.detail = ran.detail.clone();
            if !ran.container_id.is_empty() {
                r.container_id = ran.container_id.clone();
            }
            r.duration_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
            r.finished_at = now_rfc3339();
            match &result {
                Some(v) => {
                    r.result = Some(tether_proto::to_pb_value(v.clone()));
                    r.result_note.clear();
                }
                None => {
                    r.result = None;
                    r.result_note = if ran.stdout.trim().is_empty() {
                        "the tool printed nothing on stdout, so there is no result".into()
                    } else {
                        "no line of stdout is a JSON object or array, so there is no result".into()
                    };
                }
            }
            fit_record(r, budget);
            wrote = true;
            Change::Write
        })
        .await?;
    let Some((rec, _, _)) = out else {
        return Err(Problem::not_found(format!(
            "the record of execution `{}` is gone",
            p.execution_id
        )));
    };
    if wrote {
        tracing::info!(execution = %p.execution_id, status = %rec.status, exit_code = rec.exit_code, attempt, "tool run finished");
        publish_event(t, ctx, &rec).await;
    }
    Ok(rec)
}
