//! The endpoints: `containers.<op>` and `hosts.<host_id>.containers.<op>`, and `hosts.list`
//! (operators: the hosts as this node sees them, [`crate::hosts`]).
//!
//! Every operation on an existing container goes through [`resolve`]: the target is named by
//! `container` (id or name) or by `space` (its bound container), and the caller must be an
//! operator or belong to the container's `tether.space` label — the label, not a request
//! field, decides. A space bound on another host is answered there (see [`crate::route`]).
//! `containers.exec` goes to the container's space daemon when it has one that can take the
//! request, else to the engine's exec API (`crate::daemon` says when; both give one result).

use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{LogsOptionsBuilder, StatsOptionsBuilder};
use futures::StreamExt;
use tether_bus::{Caller, Node, Problem, Request, Scope};
use tether_proto::{
    ContainerInfo, ContainerList, ContainerRef, ContainerStats, Empty, ExecRequest, ExecResult,
    HostList, ListContainersRequest, LogsReply, LogsRequest, RemoveContainerRequest,
    RemovedContainer, StopContainerRequest,
};

use crate::config::Limits;
use crate::docker::{EngineError, EngineErrorKind, Meta, info_from_inspect, info_from_summary};
use crate::exec::{ExecSpec, StreamTo};
use crate::route::{Elsewhere, Routed, Routes};
use crate::spec::{Kind, parse_command, validate_abs_path, validate_env};
use crate::state::Orchestrator;

type O = Arc<Orchestrator>;

/// Adds every endpoint, on the shared and on the host-addressed subjects.
pub fn endpoints(node: Node, o: &O) -> Node {
    let max_execs = o.policy.cfg.max_concurrent_execs;
    Routes::new(node, &o.hosts, o.clone())
        .serve("containers.create", Scope::ContainersWrite, create::create)
        .serve("containers.start", Scope::ContainersWrite, start)
        .serve("containers.stop", Scope::ContainersWrite, stop)
        .serve("containers.remove", Scope::ContainersWrite, remove)
        .serve("containers.list", Scope::ContainersRead, list)
        .serve("containers.inspect", Scope::ContainersRead, inspect)
        .serve_bounded("containers.exec", Scope::ContainersExec, max_execs, exec)
        .serve("containers.logs", Scope::ContainersRead, logs)
        .serve("containers.stats", Scope::ContainersRead, stats)
        .serve("hosts.list", Scope::Operator, hosts_list)
        .node()
}

async fn hosts_list(o: O, _req: Request<Empty>) -> Result<Routed<HostList>, Problem> {
    Ok(Routed::Here(o.hosts.list()))
}

fn traceparent<T>(req: &Request<T>) -> Option<String> {
    tether_bus::telemetry::current_traceparent().or_else(|| {
        req.headers
            .get(tether_bus::telemetry::TRACEPARENT)
            .map(|v| v.as_str().to_string())
    })
}

/// The container a request acts on.
enum Target {
    Local(Arc<Meta>),
    /// The space is bound on another host.
    Remote(Elsewhere),
}

fn is_valid_container_ref(s: &str) -> bool {
    let s = s.strip_prefix('/').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks the form of a target: `container` (id or name) and `space`, either may be empty.
fn check_target(container: &str, space: &str) -> Result<(), Problem> {
    if !space.is_empty() && !tether_bus::subject::is_valid_token(space) {
        return Err(Problem::bad_request(format!(
            "`space` {space:?} must be 1-128 characters of A-Z a-z 0-9 - _"
        )));
    }
    if !container.is_empty() && !is_valid_container_ref(container) {
        return Err(Problem::bad_request(format!(
            "`container` {container:?} is not a container id or name"
        )));
    }
    Ok(())
}

/// Checks a target and that the caller may name its space (whose container, if any, is
/// checked again against its label once resolved).
fn check_ref(container: &str, space: &str, caller: &Caller) -> Result<(), Problem> {
    check_target(container, space)?;
    if !space.is_empty() {
        caller.space_for(space)?;
    }
    Ok(())
}

/// Resolves `container` / `space` to a managed container the caller may act on.
async fn resolve(
    o: &Orchestrator,
    caller: &Caller,
    container: &str,
    space: &str,
) -> Result<Target, Problem> {
    check_target(container, space)?;
    if !space.is_empty() {
        caller.space_for(space)?;
    }
    if !container.is_empty() {
        let meta = o.engine.managed(container).await?;
        // A container in no space (a worker replica) is an operator's alone: an empty space
        // would otherwise read as the caller's own.
        if caller.space_for(&meta.space).is_err()
            || (meta.space.is_empty() && !caller.is_operator())
        {
            return Err(Problem::forbidden(format!(
                "container `{container}` belongs to another space; agent `{}` may act only in `{}`",
                caller.agent_id, caller.space
            )));
        }
        if !space.is_empty() && meta.space != space {
            return Err(Problem::bad_request(format!(
                "container `{container}` is not in space `{space}`"
            )));
        }
        return Ok(Target::Local(meta));
    }
    let space = caller.space_for(space)?;
    let (b, _) = o
        .spaces
        .get(&space)
        .await?
        .ok_or_else(|| Problem::not_found(format!("space `{space}` has no container")))?;
    if b.host_id != o.host_id {
        return Ok(Target::Remote(Elsewhere::on(b.host_id, SPACE_ELSEWHERE)));
    }
    if b.container_id.is_empty() {
        return Err(Problem::conflict(format!(
            "the container of space `{space}` is being created"
        )));
    }
    let meta = o.engine.managed(&b.container_id).await.map_err(|e| {
        if e.kind() == EngineErrorKind::NotFound {
            Problem::not_found(format!(
                "space `{space}` is bound to container `{}`, which no longer exists",
                b.container_name
            ))
        } else {
            e.into()
        }
    })?;
    if meta.space != space {
        return Err(Problem::conflict(format!(
            "space `{space}` is bound to a container labelled for `{}`",
            meta.space
        )));
    }
    Ok(Target::Local(meta))
}

const SPACE_ELSEWHERE: &str = "the space is bound";

/// A `containers.start` request, checked (the target's form and space).
pub struct StartCall;

impl StartCall {
    pub fn validate(b: &ContainerRef, caller: &Caller) -> Result<Self, Problem> {
        check_ref(&b.container, &b.space, caller)?;
        Ok(Self)
    }

    /// Starts the target container (or says which host holds it).
    async fn apply(
        self,
        o: &O,
        req: &Request<ContainerRef>,
    ) -> Result<Routed<ContainerInfo>, Problem> {
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        o.note_trace(&m.id, traceparent(req).as_deref());
        o.engine.start(&m.id).await?;
        if m.pool && !m.space.is_empty() {
            crate::pool_take::restarted(o, &req.ctx, &m).await;
        } else {
            o.daemon.started(&m);
        }
        let (_, c) = o.engine.inspect_managed(&m.id).await?;
        Ok(Routed::Here(info_from_inspect(&c, &o.host_id)))
    }
}

async fn start(o: O, req: Request<ContainerRef>) -> Result<Routed<ContainerInfo>, Problem> {
    StartCall::validate(&req.body, &req.caller)?
        .apply(&o, &req)
        .await
}

/// A `containers.stop` request, checked: the grace period before SIGKILL.
pub struct StopCall {
    grace: i32,
}

impl StopCall {
    pub fn validate(b: &StopContainerRequest, limits: &Limits) -> Result<Self, Problem> {
        check_target(&b.container, &b.space)?;
        let grace = match b.grace_seconds {
            0 => limits.stop_grace_seconds,
            g if !(1..=300).contains(&g) => {
                return Err(Problem::bad_request(format!(
                    "`grace_seconds` must be between 1 and 300 (got {g})"
                )));
            }
            g => g,
        };
        Ok(Self { grace })
    }

    /// Stops the target container (or says which host holds it).
    async fn apply(
        self,
        o: &O,
        req: &Request<StopContainerRequest>,
    ) -> Result<Routed<ContainerInfo>, Problem> {
        let grace = self.grace;
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        o.note_trace(&m.id, traceparent(req).as_deref());
        o.engine.stop(&m.id, grace).await?;
        tracing::info!(container = %m.id, space = %m.space, by = %req.caller.agent_id, "container stopped");
        let (_, c) = o.engine.inspect_managed(&m.id).await?;
        Ok(Routed::Here(info_from_inspect(&c, &o.host_id)))
    }
}

async fn stop(o: O, req: Request<StopContainerRequest>) -> Result<Routed<ContainerInfo>, Problem> {
    StopCall::validate(&req.body, &o.limits)?
        .apply(&o, &req)
        .await
}

/// A `containers.remove` request, checked (the target's form and space).
pub struct RemoveCall;

impl RemoveCall {
    pub fn validate(b: &RemoveContainerRequest, caller: &Caller) -> Result<Self, Problem> {
        check_ref(&b.container, &b.space, caller)?;
        Ok(Self)
    }

    /// Removes the target container and drops its space binding.
    async fn apply(
        self,
        o: &O,
        req: &Request<RemoveContainerRequest>,
    ) -> Result<Routed<RemovedContainer>, Problem> {
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        o.note_trace(&m.id, traceparent(req).as_deref());
        let is_space = m.kind == Kind::Space.as_str();
        let bound = is_space
            && o.spaces
                .get(&m.space)
                .await?
                .is_some_and(|(b, _)| b.host_id == o.host_id && b.container_id == m.id);
        o.engine.remove(&m.id).await?;
        // The engine's `destroy` event may drop the binding first; either way it is gone.
        if bound {
            o.spaces.unbind_if(&m.space, &o.host_id, &m.id).await?;
        }
        let unbound = bound;
        tracing::info!(container = %m.id, space = %m.space, by = %req.caller.agent_id, "container removed");
        Ok(Routed::Here(RemovedContainer {
            container_id: m.id.clone(),
            container_name: m.name.clone(),
            space: m.space.clone(),
            unbound,
        }))
    }
}

async fn remove(
    o: O,
    req: Request<RemoveContainerRequest>,
) -> Result<Routed<RemovedContainer>, Problem> {
    RemoveCall::validate(&req.body, &req.caller)?
        .apply(&o, &req)
        .await
}

/// A `containers.list` request, checked: the space it lists (any, for an operator naming
/// none).
pub struct ListCall {
    space: String,
}

impl ListCall {
    pub fn validate(b: &ListContainersRequest, caller: &Caller) -> Result<Self, Problem> {
        for (what, v) in [("space", &b.space), ("session_id", &b.session_id)] {
            if !v.is_empty() && !tether_bus::subject::is_valid_token(v) {
                return Err(Problem::bad_request(format!(
                    "`{what}` {v:?} must be 1-128 characters of A-Z a-z 0-9 - _"
                )));
            }
        }
        if !b.kind.is_empty() {
            Kind::parse(&b.kind)?;
        }
        let space = if caller.is_operator() {
            b.space.clone()
        } else {
            caller.space_for(&b.space)?
        };
        Ok(Self { space })
    }

    /// The managed containers of the space on this host, by name.
    async fn apply(
        self,
        o: &O,
        req: &Request<ListContainersRequest>,
    ) -> Result<Routed<ContainerList>, Problem> {
        let (space, b) = (self.space, &req.body);
        let list = o
            .engine
            .list_managed(&space, &b.session_id, &b.kind)
            .await?;
        let mut containers: Vec<ContainerInfo> = list
            .iter()
            .map(|c| info_from_summary(c, &o.host_id))
            .collect();
        containers.sort_by(|a, b| a.container_name.cmp(&b.container_name));
        Ok(Routed::Here(ContainerList {
            containers,
            host_id: o.host_id.clone(),
        }))
    }
}

async fn list(o: O, req: Request<ListContainersRequest>) -> Result<Routed<ContainerList>, Problem> {
    ListCall::validate(&req.body, &req.caller)?
        .apply(&o, &req)
        .await
}

/// A `containers.inspect` request, checked (the target's form and space).
pub struct InspectCall;

impl InspectCall {
    pub fn validate(b: &ContainerRef, caller: &Caller) -> Result<Self, Problem> {
        check_ref(&b.container, &b.space, caller)?;
        Ok(Self)
    }

    /// Inspects the target container (or says which host holds it).
    async fn apply(
        self,
        o: &O,
        req: &Request<ContainerRef>,
    ) -> Result<Routed<ContainerInfo>, Problem> {
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        let (_, c) = o.engine.inspect_managed(&m.id).await?;
        let mut info = info_from_inspect(&c, &o.host_id);
        // containerd may deliver a task's exit before the OOM kill that caused it, and the
        // engine then records the exit as no OOM; the `oom` event this node saw says otherwise.
        info.oom_killed |=
            info.state == "exited" && info.exit_code == 137 && o.oom_count(&m.id) > 0;
        Ok(Routed::Here(info))
    }
}

async fn inspect(o: O, req: Request<ContainerRef>) -> Result<Routed<ContainerInfo>, Problem> {
    InspectCall::validate(&req.body, &req.caller)?
        .apply(&o, &req)
        .await
}

fn validate_user(u: &str) -> Result<Option<String>, Problem> {
    if u.is_empty() {
        return Ok(None);
    }
    let part = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    let ok = u.len() <= 64
        && match u.split_once(':') {
            Some((a, b)) => part(a) && part(b),
            None => part(u),
        };
    if ok {
        Ok(Some(u.to_string()))
    } else {
        Err(Problem::bad_request(format!(
            "`user` {u:?} must be a user, uid, or user:group"
        )))
    }
}

/// A `containers.exec` request, checked.
pub struct ExecCall {
    cmd: Vec<String>,
    workdir: Option<String>,
    env: Vec<String>,
    user: Option<String>,
    timeout: Duration,
    max_output: usize,
    stream: Option<String>,
}

impl ExecCall {
    /// Checks everything but the target (which needs the engine).
    pub fn validate(b: &ExecRequest, caller: &Caller, limits: &Limits) -> Result<Self, Problem> {
        check_target(&b.container, &b.space)?;
        let cmd = parse_command(b.command.as_ref())?
            .ok_or_else(|| Problem::bad_request("`command` is required"))?;
        let workdir = if b.workdir.is_empty() {
            None
        } else {
            Some(validate_abs_path("workdir", &b.workdir)?)
        };
        let env = validate_env(&b.env)?;
        let user = validate_user(&b.user)?;
        let t = b.timeout_seconds;
        let timeout = if !t.is_finite() || t < 0.0 {
            return Err(Problem::bad_request(format!(
                "`timeout_seconds` must be positive (got {t})"
            )));
        } else if t == 0.0 {
            limits.exec_default_timeout_seconds
        } else if t > limits.exec_max_timeout_seconds {
            return Err(Problem::bad_request(format!(
                "`timeout_seconds` must be at most {} (got {t})",
                limits.exec_max_timeout_seconds
            )));
        } else {
            t
        };
        let max_output = match b.max_output_bytes {
            0 => limits.default_output,
            n if n < 0 => {
                return Err(Problem::bad_request(format!(
                    "`max_output_bytes` must be positive (got {n})"
                )));
            }
            n if usize::try_from(n).unwrap_or(usize::MAX) > limits.max_output => {
                return Err(Problem::bad_request(format!(
                    "`max_output_bytes` must be at most {} (got {n})",
                    limits.max_output
                )));
            }
            n => usize::try_from(n).unwrap_or(limits.max_output),
        };
        let stream = match (b.stream, b.stream_subject.as_str()) {
            (false, "") => None,
            (false, _) => {
                return Err(Problem::bad_request(
                    "`stream_subject` is set but `stream` is not",
                ));
            }
            (true, "") => {
                return Err(Problem::bad_request(
                    "`stream: true` needs a `stream_subject` (e.g. a fresh _INBOX subject)",
                ));
            }
            (true, s) => Some(tether_bus::subject::check_stream_subject(s, caller)?),
        };
        Ok(Self {
            cmd,
            workdir,
            env,
            user,
            timeout: Duration::from_secs_f64(timeout),
            max_output,
            stream,
        })
    }

    /// Runs it in the target container (or says which host holds it).
    async fn apply(self, o: &O, req: &Request<ExecRequest>) -> Result<Routed<ExecResult>, Problem> {
        let wait = self.timeout + Duration::from_secs(30);
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e.within(wait))),
        };
        let oom_before = o.oom_count(&m.id);
        let spec = ExecSpec {
            container_id: m.id.clone(),
            cmd: self.cmd,
            workdir: self.workdir,
            env: self.env,
            user: self.user,
            stdin: (!req.body.stdin.is_empty()).then(|| req.body.stdin.clone().into()),
            timeout: self.timeout,
            max_output: self.max_output,
            stream: self.stream.map(|subject| StreamTo {
                client: req.ctx.client.clone(),
                subject,
            }),
        };
        let by_daemon = if crate::daemon::exec::takes_daemon(&o.daemon, &m, &spec) {
            crate::daemon::exec::run(&o.daemon, &req.ctx.client, &m, &spec).await?
        } else {
            None
        };
        let ran = match by_daemon {
            Some(out) => Ok(out),
            None if m.pool => {
                let mut spec = spec;
                let mut env = crate::pool_take::env_of(o, &m).await;
                env.append(&mut spec.env);
                spec.env = env;
                crate::exec::run(o.engine.docker(), spec).await
            }
            None => crate::exec::run(o.engine.docker(), spec).await,
        };
        let out = match ran {
            Ok(out) => out,
            Err(e) if e.kind() == EngineErrorKind::NotFound => {
                // The cached identity was stale: the container is gone.
                o.engine.forget(&m.id);
                return Err(Problem::not_found(format!(
                    "container `{}` no longer exists",
                    m.name
                )));
            }
            Err(e) => return Err(exec_problem(e)),
        };
        // An OOM kill shows as SIGKILL; the engine's `oom` event tells the two apart.
        let oom_killed =
            out.exit_code == 137 && o.oom_after(&m.id, oom_before, Duration::from_secs(1)).await;
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let cut = fit_json(&mut stdout, &mut stderr, o.reply_budget);
        Ok(Routed::Here(ExecResult {
            exit_code: out.exit_code,
            stdout,
            stderr,
            truncated: out.truncated || cut,
            timed_out: out.timed_out,
            duration_ms: u32::try_from(out.duration.as_millis()).unwrap_or(u32::MAX),
            oom_killed,
            container_id: m.id.clone(),
            output_bytes: out.output_bytes,
        }))
    }
}

async fn exec(o: O, req: Request<ExecRequest>) -> Result<Routed<ExecResult>, Problem> {
    ExecCall::validate(&req.body, &req.caller, &o.limits)?
        .apply(&o, &req)
        .await
}

fn exec_problem(e: EngineError) -> Problem {
    match e.kind() {
        EngineErrorKind::Conflict => Problem::conflict(format!("cannot exec: {e}")),
        _ => e.into(),
    }
}

/// Bytes a string takes inside a JSON string literal.
fn json_len(s: &str) -> usize {
    s.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

fn cut_json(s: &mut String, max: usize) {
    let mut used = 0;
    let mut end = s.len();
    for (i, c) in s.char_indices() {
        used += json_len(c.encode_utf8(&mut [0; 4]));
        if used > max {
            end = i;
            break;
        }
    }
    s.truncate(end);
}

/// Trims output so its JSON form fits `budget`; true when anything was cut.
fn fit_json(stdout: &mut String, stderr: &mut String, budget: usize) -> bool {
    let (a, b) = (json_len(stdout), json_len(stderr));
    if a + b <= budget {
        return false;
    }
    let half = budget / 2;
    let (max_a, max_b) = if b <= half {
        (budget - b, b)
    } else if a <= half {
        (a, budget - a)
    } else {
        (half, budget - half)
    };
    cut_json(stdout, max_a);
    cut_json(stderr, max_b);
    true
}

/// A `containers.logs` request, checked.
pub struct LogsCall {
    tail: i64,
    since: i32,
    cap: usize,
}

impl LogsCall {
    pub fn validate(b: &LogsRequest, limits: &Limits) -> Result<Self, Problem> {
        check_target(&b.container, &b.space)?;
        let tail = match b.tail {
            0 => 1000,
            t if !(1..=100_000).contains(&t) => {
                return Err(Problem::bad_request(format!(
                    "`tail` must be between 1 and 100000 (got {t})"
                )));
            }
            t => t,
        };
        if b.since < 0 || b.since > i64::from(i32::MAX) {
            return Err(Problem::bad_request("`since` must be unix seconds"));
        }
        let cap = match b.max_bytes {
            0 => limits.default_output,
            n if n < 0 || usize::try_from(n).unwrap_or(usize::MAX) > limits.max_output => {
                return Err(Problem::bad_request(format!(
                    "`max_bytes` must be between 1 and {} (got {n})",
                    limits.max_output
                )));
            }
            n => usize::try_from(n).unwrap_or(limits.max_output),
        };
        Ok(Self {
            tail: i64::from(tail),
            since: i32::try_from(b.since).unwrap_or(0),
            cap,
        })
    }

    /// The target container's recent output (or says which host holds it).
    async fn apply(self, o: &O, req: &Request<LogsRequest>) -> Result<Routed<LogsReply>, Problem> {
        let (Self { tail, since, cap }, b) = (self, &req.body);
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        let opts = LogsOptionsBuilder::default()
            .follow(false)
            .stdout(true)
            .stderr(true)
            .since(since)
            .timestamps(b.timestamps)
            .tail(&tail.to_string())
            .build();
        let (mut stdout, mut stderr, mut truncated) =
            crate::docker::read_logs(o.engine.docker(), &m.id, opts, cap).await?;
        truncated |= fit_json(&mut stdout, &mut stderr, o.reply_budget);
        Ok(Routed::Here(LogsReply {
            stdout,
            stderr,
            truncated,
            container_id: m.id.clone(),
        }))
    }
}

async fn logs(o: O, req: Request<LogsRequest>) -> Result<Routed<LogsReply>, Problem> {
    LogsCall::validate(&req.body, &o.limits)?
        .apply(&o, &req)
        .await
}

/// A `containers.stats` request, checked (the target's form and space).
pub struct StatsCall;

impl StatsCall {
    pub fn validate(b: &ContainerRef, caller: &Caller) -> Result<Self, Problem> {
        check_ref(&b.container, &b.space, caller)?;
        Ok(Self)
    }

    /// One stats sample of the target container (or says which host holds it).
    async fn apply(
        self,
        o: &O,
        req: &Request<ContainerRef>,
    ) -> Result<Routed<ContainerStats>, Problem> {
        let m = match resolve(o, &req.caller, &req.body.container, &req.body.space).await? {
            Target::Local(m) => m,
            Target::Remote(e) => return Ok(Routed::On(e)),
        };
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let s = tokio::time::timeout(
            Duration::from_secs(20),
            o.engine.docker().stats(&m.id, Some(opts)).next(),
        )
        .await
        .map_err(|_| Problem::timeout("the engine did not give stats in time"))?
        .ok_or_else(|| Problem::new(502, "the engine gave no stats"))?
        .map_err(EngineError::from)?;
        let (_, c) = o.engine.inspect_managed_with(&m.id, true).await?;
        Ok(Routed::Here(crate::docker::stats_of(
            &m,
            &s,
            c.size_rw.unwrap_or(0),
        )))
    }
}

async fn stats(o: O, req: Request<ContainerRef>) -> Result<Routed<ContainerStats>, Problem> {
    StatsCall::validate(&req.body, &req.caller)?
        .apply(&o, &req)
        .await
}

mod create;
pub use create::CreateCall;

#[cfg(test)]
mod tests;
