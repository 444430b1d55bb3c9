//! Tool runs: one-shot containers that take parameters, run to completion or their deadline,
//! print a JSON result and are removed — synchronously in the request, or as durable
//! JetStream jobs any replica runs.
//!
//! Every run has a record in KV (`exec.<id>` in `tether_tool_results`), so `tools.get`,
//! `tools.logs` and `tools.cancel` work from any replica. Records change only by
//! compare-and-set on their revision, and each attempt owns the record by its
//! (`attempt`, `runner`) pair: an attempt that was superseded (its job redelivered to another
//! worker) cannot overwrite the outcome, so a run completes once in the record and in the
//! `events.tools.*` stream.
//!
//! The one design decision to know: a redelivered job first looks for the containers of its
//! execution (label `tether.execution`) on its engine, whatever node made them. A container
//! that is running or has exited is *adopted* — waited for, its output read from the engine —
//! instead of running the tool a second time; one that never started is removed. So a worker
//! killed mid-run costs neither a second run nor an orphan, as long as the next attempt lands
//! on the same engine (elsewhere the run is repeated: at-least-once, and the dead node's own
//! janitor removes its leftovers when it returns).
//!
//! Status comes from what the orchestrator did: `timed_out` only when our deadline killed
//! the container, `cancelled` only when a cancel did; otherwise the exit code decides
//! (`completed` for 0, `failed` for anything else, 124 included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, LogsOptionsBuilder, StatsOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use prost::Message as _;
use tether_bus::jobs::{self, Job, Outcome, WorkerConfig};
use tether_bus::{Ctx, Encoding, Endpoint, Node, Problem, RawRequest, Reply, Request, Scope};
use tether_proto::pbjson_types::value::Kind as V;
use tether_proto::{
    CreateContainerRequest, ResourceLimits, ResourceUsage, ToolEventData, ToolExecuteRequest,
    ToolExecution, ToolJob, ToolLogs, ToolRef,
};
use tokio_util::sync::CancellationToken;

use crate::docker::{EngineError, EngineErrorKind};
use crate::sessions::SessionStore;
use crate::spec::{
    ContainerSpec, LABEL_HOST, LABEL_KIND, LABEL_MANAGED, is_valid_image_ref, validate_create,
};
use crate::state::Orchestrator;

pub const LABEL_EXECUTION: &str = "tether.execution";
pub const LABEL_RUNNER: &str = "tether.runner";
pub const LABEL_ATTEMPT: &str = "tether.attempt";
pub const LABEL_CLEANUP: &str = "tether.cleanup";
pub const LABEL_DEADLINE: &str = "tether.deadline";

use crate::config::TOOL_LIFETIME_MARGIN_SECONDS as LIFETIME_MARGIN;
/// Variables a parameter may not become: a shell, the dynamic loader and most programs read
/// them, so `{"path": "x"}` would silently break the tool.
const PROCESS_ENV: &[&str] = &[
    "PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "IFS", "ENV",
    "BASH_ENV", "PS4", "CDPATH",
];
/// Most parameter JSON a run may take (it travels in the environment).
const MAX_PARAMETERS: usize = 64 * 1024;

pub const STATUS_QUEUED: &str = "queued";
pub const STATUS_RUNNING: &str = "running";
pub const STATUS_COMPLETED: &str = "completed";
pub const STATUS_FAILED: &str = "failed";
pub const STATUS_TIMED_OUT: &str = "timed_out";
pub const STATUS_CANCELLED: &str = "cancelled";

pub fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        STATUS_COMPLETED | STATUS_FAILED | STATUS_TIMED_OUT | STATUS_CANCELLED
    )
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------------------
// Records

fn kv_err(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("tool results unavailable: {e}"))
}

/// What a change to a record decided.
pub enum Change {
    Write,
    /// Leave the record as it is (the closure said why).
    Keep,
}

/// Run records and idempotency keys in KV.
#[derive(Clone)]
pub struct Results {
    kv: kv::Store,
}

impl Results {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let kv = tether_bus::auth::open_or_create_bucket(
            js,
            kv::Config {
                bucket: bucket.to_string(),
                description: "tether: tool runs (exec.<id>) and idempotency keys".into(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        Ok(Self { kv })
    }

    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    fn key(id: &str) -> String {
        format!("exec.{id}")
    }

    pub async fn get(&self, id: &str) -> Result<Option<(ToolExecution, u64)>, Problem> {
        match self.kv.entry(Self::key(id)).await.map_err(kv_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = ToolExecution::decode(e.value.as_ref())
                    .map_err(|err| Problem::internal(format!("corrupt tool record: {err}")))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn create(&self, r: &ToolExecution) -> Result<u64, Problem> {
        self.kv
            .create(Self::key(&r.execution_id), r.encode_to_vec().into())
            .await
            .map_err(kv_err)
    }

    pub async fn delete(&self, id: &str) {
        let _ = self.kv.delete(Self::key(id)).await;
    }

    /// Compare-and-set; `None` when the record changed since `rev`.
    pub async fn update(&self, r: &ToolExecution, rev: u64) -> Result<Option<u64>, Problem> {
        match self
            .kv
            .update(Self::key(&r.execution_id), r.encode_to_vec().into(), rev)
            .await
        {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Reads, lets `f` change the record, writes it back by revision (retried on a
    /// concurrent change). `Ok(None)` when there is no record.
    pub async fn modify<F>(
        &self,
        id: &str,
        mut f: F,
    ) -> Result<Option<(ToolExecution, u64, bool)>, Problem>
    where
        F: FnMut(&mut ToolExecution) -> Change,
    {
        for _ in 0..16 {
            let Some((mut r, rev)) = self.get(id).await? else {
                return Ok(None);
            };
            match f(&mut r) {
                Change::Keep => return Ok(Some((r, rev, false))),
                Change::Write => {
                    if let Some(new_rev) = self.update(&r, rev).await? {
                        return Ok(Some((r, new_rev, true)));
                    }
                }
            }
        }
        Err(Problem::conflict(format!(
            "execution `{id}` is being changed concurrently; try again"
        )))
    }

    /// Releases an idempotency key that `id` holds (a submission that queued nothing).
    pub async fn release_key(&self, space: &str, key: &str, id: &str) {
        let k = format!("idem.{space}.{key}");
        if let Ok(Some(e)) = self.kv.entry(&k).await
            && e.operation == kv::Operation::Put
            && e.value.as_ref() == id.as_bytes()
        {
            // By revision: a key claimed again meanwhile is not touched.
            let _ = self.kv.delete_expect_revision(&k, Some(e.revision)).await;
        }
    }

    /// Claims an idempotency key for `id`; `Some(other)` when another run holds it.
    pub async fn claim_key(
        &self,
        space: &str,
        key: &str,
        id: &str,
    ) -> Result<Option<String>, Problem> {
        let k = format!("idem.{space}.{key}");
        for _ in 0..3 {
            match self.kv.create(&k, id.to_string().into()).await {
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if let Some(v) = self.kv.get(&k).await.map_err(kv_err)? {
                        return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
                    }
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Problem::conflict(
            "idempotency key is being changed concurrently; try again",
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Shared state

/// What the tool, relic and session endpoints share.
pub struct Tools {
    pub o: Arc<Orchestrator>,
    pub results: Results,
    pub sessions: SessionStore,
    pub js: jetstream::Context,
    pub done: kv::Store,
    pub stream: String,
    /// Cancel signals of the runs this node is running, by execution id.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// One relic start at a time per session on this node (the engine allows two networks
    /// of one name).
    pub session_locks: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a run off the running table when dropped.
struct Running<'a> {
    t: &'a Tools,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.t.running).remove(&self.id);
    }
}

impl Tools {
    /// Opens the buckets and the job stream.
    pub async fn open(
        o: Arc<Orchestrator>,
        bus: &tether_bus::BusConfig,
        js: &jetstream::Context,
    ) -> anyhow::Result<Tools> {
        let cfg = &o.policy.cfg;
        let ttl = Duration::from_secs(cfg.tool_results_ttl_seconds);
        let results = Results::open(js, &cfg.tool_results_bucket, ttl, cfg.kv_replicas).await?;
        let sessions = SessionStore::open(
            js,
            &cfg.sessions_bucket,
            cfg.max_ttl_seconds,
            cfg.kv_replicas,
        )
        .await?;
        jobs::ensure_stream(
            js,
            jetstream::stream::Config {
                name: cfg.tool_jobs_stream.clone(),
                description: Some("tether: async tool jobs".into()),
                subjects: vec![bus.subject("jobs.tools.>")],
                // A job leaves the stream when a worker acks it; `max_age` bounds what nobody
                // takes (no worker for its host, say).
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                max_age: ttl,
                duplicate_window: Duration::from_secs(120),
                num_replicas: cfg.kv_replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        let done = tether_bus::auth::open_or_create_bucket(
            js,
            kv::Config {
                bucket: format!("{}_done", cfg.tool_results_bucket),
                description: "tether: tool jobs settled (idempotency guard)".into(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: cfg.kv_replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        Ok(Tools {
            stream: cfg.tool_jobs_stream.clone(),
            o,
            results,
            sessions,
            js: js.clone(),
            done,
            running: Mutex::default(),
            session_locks: tokio::sync::Mutex::default(),
        })
    }

    fn register(&self, id: &str) -> (CancellationToken, Running<'_>) {
        let token = CancellationToken::new();
        lock(&self.running).insert(id.to_string(), token.clone());
        (
            token,
            Running {
                t: self,
                id: id.to_string(),
            },
        )
    }

    pub fn is_running_here(&self, id: &str) -> bool {
        lock(&self.running).contains_key(id)
    }

    pub fn cancel_running(&self, id: &str) -> bool {
        match lock(&self.running).get(id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    pub async fn session_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.session_locks.lock().await;
        if m.len() > 4096 {
            m.retain(|_, l| Arc::strong_count(l) > 1);
        }
        m.entry(key.to_string()).or_default().clone()
    }
}

type T = Arc<Tools>;

// ---------------------------------------------------------------------------------------
// Validation

/// The network a tool asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolNetwork {
    None,
    Bridge,
    Session,
}

/// A checked run: everything the runner needs, with the container spec's base.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub execution_id: String,
    pub space: String,
    pub agent_id: String,
    pub tool_name: String,
    pub session_id: String,
    pub image: String,
    pub spec: ContainerSpec,
    pub timeout: Duration,
    pub cleanup: bool,
    pub max_output: usize,
    pub network: ToolNetwork,
    pub is_async: bool,
}

fn bad(m: impl Into<String>) -> Problem {
    Problem::bad_request(m)
}

/// The parameters as a JSON object.
pub fn parse_parameters(
    v: Option<&tether_proto::pbjson_types::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
    let Some(v) = v else {
        return Ok(serde_json::Map::new());
    };
    match &v.kind {
        None | Some(V::NullValue(_)) => Ok(serde_json::Map::new()),
        Some(V::StructValue(_)) => match tether_proto::from_pb_value(v) {
            serde_json::Value::Object(m) => Ok(m),
            _ => Err(bad("`parameters` must be a JSON object")),
        },
        Some(V::StringValue(s)) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(bad(
                "`parameters` must be a JSON object (the string holds JSON that is not an object)",
            )),
            Err(e) => Err(bad(format!(
                "`parameters` is a string that is not JSON ({e}); give a JSON object"
            ))),
        },
        Some(_) => Err(bad("`parameters` must be a JSON object")),
    }
}

/// Environment variables for the parameters: `NAME=value` per entry, and the whole object.
pub fn parameter_env(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<HashMap<String, String>, Problem> {
    let doc = serde_json::Value::Object(params.clone()).to_string();
    if doc.len() > MAX_PARAMETERS {
        return Err(bad(format!(
            "`parameters` must be at most {MAX_PARAMETERS} bytes of JSON (got {})",
            doc.len()
        )));
    }
    let mut env = HashMap::new();
    for (k, v) in params {
        let name: String = k.to_ascii_uppercase().replace(['-', '.'], "_");
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(bad(format!(
                "parameter name {k:?} cannot be an environment variable (use letters, digits, `_`, `-`, not starting with a digit)"
            )));
        }
        if name.starts_with("TETHER_") {
            return Err(bad(format!(
                "parameter name {k:?}: the TETHER_ prefix is reserved"
            )));
        }
        if PROCESS_ENV.contains(&name.as_str()) || name.starts_with("LD_") {
            return Err(bad(format!(
                "parameter name {k:?} would replace the process variable {name}, which the tool's shell and libraries rely on; rename it (every parameter is also in TETHER_PARAMETERS)"
            )));
        }
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        if value.contains('\0') {
            return Err(bad(format!("parameter {k:?} holds a NUL character")));
        }
        if env.insert(name.clone(), value).is_some() {
            return Err(bad(format!(
                "parameters clash: two names become the variable {name}"
            )));
        }
    }
    env.insert("TETHER_PARAMETERS".into(), doc);
    Ok(env)
}

fn is_valid_tool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '/'))
}

fn is_valid_idempotency_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '='))
}

/// Checks a request for `space` (already authorized) into a run.
pub fn prepare(
    o: &Orchestrator,
    b: &ToolExecuteRequest,
    space: &str,
    agent_id: &str,
    execution_id: &str,
) -> Result<Prepared, Problem> {
    let cfg = &o.policy.cfg;
    if b.tool_name.is_empty() {
        return Err(bad("`tool_name` is required"));
    }
    if !is_valid_tool_name(&b.tool_name) {
        return Err(bad(format!(
            "`tool_name` {:?} must be 1-128 characters of A-Z a-z 0-9 _ . - : /",
            b.tool_name
        )));
    }
    if b.image.is_empty() {
        return Err(bad("`image` is required"));
    }
    if !is_valid_image_ref(&b.image) {
        return Err(bad(format!(
            "`image` {:?} is not an image reference",
            b.image
        )));
    }
    if !b.idempotency_key.is_empty() && !is_valid_idempotency_key(&b.idempotency_key) {
        return Err(bad(
            "`idempotency_key` must be 1-128 characters of A-Z a-z 0-9 _ - =",
        ));
    }
    if !b.idempotency_key.is_empty() && !b.r#async {
        return Err(bad(
            "`idempotency_key` applies to async runs (`async: true`)",
        ));
    }
    let limits = b.resource_limits.unwrap_or_default();
    let timeout = match limits.timeout_seconds {
        0 => cfg.tool_default_timeout_seconds,
        t if t < 0 => {
            return Err(bad(format!(
                "`resource_limits.timeout_seconds` must be positive (got {t})"
            )));
        }
        t if t > cfg.tool_max_timeout_seconds => {
            return Err(bad(format!(
                "`resource_limits.timeout_seconds` must be at most {} (got {t})",
                cfg.tool_max_timeout_seconds
            )));
        }
        t => t,
    };
    let network = match b.network.as_str() {
        "" | "none" => ToolNetwork::None,
        "bridge" => ToolNetwork::Bridge,
        "session" => {
            if b.session_id.is_empty() {
                return Err(bad("`network: session` needs a `session_id`"));
            }
            ToolNetwork::Session
        }
        other => {
            return Err(bad(format!(
                "`network` must be none, bridge or session (got {other:?})"
            )));
        }
    };
    let params = parse_parameters(b.parameters.as_ref())?;
    let param_env = parameter_env(&params)?;
    if let Some(k) = b.env.keys().find(|k| param_env.contains_key(k.as_str())) {
        return Err(bad(format!(
            "`env` {k} and a parameter of the same name would both set the variable {k}"
        )));
    }
    let max_output = match b.max_output_bytes {
        0 => usize::try_from(cfg.exec_default_output_bytes)
            .unwrap_or(o.max_output)
            .min(o.max_output),
        n if n < 0 || usize::try_from(n).unwrap_or(usize::MAX) > o.max_output => {
            return Err(bad(format!(
                "`max_output_bytes` must be between 1 and {} (got {n})",
                o.max_output
            )));
        }
        n => usize::try_from(n).unwrap_or(o.max_output),
    };
    let cleanup = b.cleanup.unwrap_or(true);
    let lifetime = if cleanup {
        timeout
            .saturating_add(LIFETIME_MARGIN)
            .min(cfg.max_ttl_seconds)
    } else {
        cfg.default_ttl_seconds
    };
    let create = CreateContainerRequest {
        image: b.image.clone(),
        session_id: b.session_id.clone(),
        kind: "tool".into(),
        env: b.env.clone(),
        command: b.command.clone(),
        resource_limits: Some(ResourceLimits {
            timeout_seconds: lifetime,
            ..limits
        }),
        network_mode: match network {
            ToolNetwork::Bridge => "bridge".into(),
            _ => "none".into(),
        },
        mounts: b.mounts.clone(),
        ..Default::default()
    };
    let mut spec = validate_create(&create, space, agent_id, &o.policy, chrono::Utc::now())?;
    // Parameters were checked by `parameter_env` (names, NUL, the whole document's size);
    // they come after `validate_create` since `TETHER_PARAMETERS` is ours.
    let mut param_env: Vec<String> = param_env
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    param_env.sort();
    spec.env.extend(param_env);
    spec.env.push(format!("TETHER_TOOL={}", b.tool_name));
    spec.env.push(format!("TETHER_EXECUTION_ID={execution_id}"));
    spec.labels
        .insert(LABEL_EXECUTION.into(), execution_id.to_string());
    spec.labels
        .insert(LABEL_CLEANUP.into(), cleanup.to_string());
    spec.labels
        .insert("tether.tool".into(), b.tool_name.clone());
    Ok(Prepared {
        execution_id: execution_id.to_string(),
        space: space.to_string(),
        agent_id: agent_id.to_string(),
        tool_name: b.tool_name.clone(),
        session_id: b.session_id.clone(),
        image: b.image.clone(),
        spec,
        timeout: Duration::from_secs(u64::try_from(timeout).unwrap_or(1)),
        cleanup,
        max_output,
        network,
        is_async: b.r#async,
    })
}

/// The last line of stdout that is a JSON object or array.
pub fn parse_result(stdout: &str) -> Option<serde_json::Value> {
    stdout.lines().rev().find_map(|l| {
        let l = l.trim();
        if !(l.starts_with('{') || l.starts_with('[')) {
            return None;
        }
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v.is_object() || v.is_array())
    })
}

// ---------------------------------------------------------------------------------------
// The runner

/// What happened to one container run.
#[derive(Debug, Default)]
struct Ran {
    status: &'static str,
    exit_code: i32,
    stdout: String,
    stderr: String,
    truncated: bool,
    oom_killed: bool,
    usage: ResourceUsage,
    detail: String,
    container_id: String,
}

/// Managed tool containers of an execution on this engine, whatever node made them.
async fn containers_of(
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

/// How often a running tool's stats are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Samples the container's stats until aborted: peak memory, CPU time. Each sample is a
/// one-shot read (the engine answers at once instead of waiting a collection cycle), so even
/// a run of a second or two gets several samples; a run that ends before the first one
/// reports `samples: 0`.
async fn sample(docker: bollard::Docker, id: String, usage: Arc<Mutex<ResourceUsage>>) {
    let opts = StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    // The first read waits a little: a container that is still starting has nothing to
    // report, and the engine is busy starting it.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_EVERY / 2, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = match docker.stats(&id, Some(opts.clone())).next().await {
            Some(Ok(st)) => st,
            // Gone, or the engine is busy: the next tick tries again (the run's watcher
            // decides when sampling ends).
            Some(Err(_)) | None => continue,
        };
        let mem = st.memory_stats.as_ref();
        let peak = mem
            .and_then(|m| m.max_usage.or(m.usage))
            .unwrap_or(0)
            .max(mem.and_then(|m| m.usage).unwrap_or(0));
        let cpu = st
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        if peak == 0 && cpu == 0 {
            // An exited container's stats are all zeros.
            continue;
        }
        let mut u = lock(&usage);
        u.samples += 1;
        u.peak_memory_bytes = u.peak_memory_bytes.max(peak);
        u.cpu_time_ms = u.cpu_time_ms.max(cpu / 1_000_000);
    }
}

/// The container's exit code, once it is not running. `Err` when it vanished.
async fn wait_exit(docker: &bollard::Docker, id: &str) -> Result<i64, EngineError> {
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
async fn exited_code(docker: &bollard::Docker, id: &str) -> Option<i64> {
    let st = docker.inspect_container(id, None).await.ok()?.state?;
    if st.running == Some(true)
        || st.status == Some(bollard::models::ContainerStateStatusEnum::CREATED)
    {
        return None;
    }
    st.exit_code
}

/// Kills a container (gone or stopped already counts as done).
async fn kill(docker: &bollard::Docker, id: &str) {
    let opts = bollard::query_parameters::KillContainerOptionsBuilder::default()
        .signal("KILL")
        .build();
    if let Err(e) = docker.kill_container(id, Some(opts)).await {
        tracing::debug!(container = %id, error = %e, "kill");
    }
}

/// Why a run stopped early.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Exited,
    Deadline,
    Cancelled,
}

/// Waits for a started (or adopted) container, stops it at the deadline or on cancel, and
/// reads what it did.
async fn watch(
    o: &Orchestrator,
    id: &str,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
    cap: usize,
    memory_mb: i32,
) -> Ran {
    let docker = o.engine.docker();
    let usage = Arc::new(Mutex::new(ResourceUsage::default()));
    let sampler = tokio::spawn(sample(docker.clone(), id.to_string(), usage.clone()));
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
    sampler.abort();
    let usage = *lock(&usage);
    let mut ran = Ran {
        usage,
        container_id: id.to_string(),
        ..Default::default()
    };
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            ran.status = if stop == Stop::Exited {
                STATUS_FAILED
            } else if stop == Stop::Deadline {
                STATUS_TIMED_OUT
            } else {
                STATUS_CANCELLED
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
            STATUS_TIMED_OUT
        }
        Stop::Cancelled => {
            ran.detail = "cancelled".into();
            STATUS_CANCELLED
        }
        Stop::Exited if ran.exit_code == 0 => STATUS_COMPLETED,
        Stop::Exited => {
            if ran.oom_killed {
                ran.detail =
                    format!("killed by the kernel's OOM killer (memory limit {memory_mb} MiB)");
            }
            STATUS_FAILED
        }
    };
    ran
}

/// Outcome of claiming a record for an attempt.
enum Claimed {
    Run(Box<ToolExecution>),
    /// Terminal already (done elsewhere, or cancelled before it started).
    Done,
    Missing,
}

/// Makes `attempt` the owner of the record (status running).
async fn claim(t: &Tools, id: &str, runner: &str) -> Result<Claimed, Problem> {
    let host = t.o.host_id.clone();
    let r = t
        .results
        .modify(id, |r| {
            if is_terminal(&r.status) {
                return Change::Keep;
            }
            if r.cancel_requested {
                r.status = STATUS_CANCELLED.into();
                r.detail = "cancelled before it started".into();
                r.finished_at = now_rfc3339();
                return Change::Write;
            }
            r.status = STATUS_RUNNING.into();
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
async fn run_owned(
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
                            status: STATUS_FAILED,
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
                        status: STATUS_FAILED,
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
            status: STATUS_CANCELLED,
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
            status: STATUS_FAILED,
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
    let keep_for_retry = rec.is_err() && p.is_async;
    if p.cleanup
        && !keep_for_retry
        && let Err(e) = o.engine.remove(&container_id).await
    {
        tracing::warn!(container = %container_id, error = %e, "cannot remove tool container");
    }
    rec
}

/// Records the outcome if this attempt still owns the record; publishes the event.
async fn finish(
    t: &T,
    ctx: &Ctx,
    p: &Prepared,
    attempt: u32,
    runner: &str,
    ran: Ran,
    started: Instant,
) -> Result<ToolExecution, Problem> {
    let result = parse_result(&ran.stdout);
    let budget = t.o.max_output;
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

/// A record's two encodings' sizes: (protobuf, as KV keeps it; JSON, as a caller may get it).
fn record_sizes(r: &ToolExecution) -> (usize, usize) {
    let json = serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
    (r.encoded_len(), json)
}

fn record_size(r: &ToolExecution) -> usize {
    let (pb, json) = record_sizes(r);
    pb.max(json)
}

/// Makes a finished record fit in `budget` bytes, so it can be stored in KV and sent as one
/// reply (a record that does not fit would fail its write on every attempt, and a job would
/// run again each time): the oldest output goes first, then, when the result alone is too
/// big, the parsed result (still the last JSON line of `stdout`, as far as that was kept).
/// Says so in `truncated` and `result_note`.
pub fn fit_record(r: &mut ToolExecution, budget: usize) {
    // Neither encoding grows text more than six-fold (JSON's \u00XX), nor a parsed result
    // more than that (protobuf's doubles): small outputs need no measuring.
    const SLACK: usize = 4096;
    if 6 * (r.stdout.len() + r.stderr.len()) + SLACK <= budget {
        return;
    }
    let note = |budget: usize| {
        format!(
            "the result is too large to return (the reply of a run holds at most {budget} bytes); it was the last JSON line of stdout"
        )
    };
    // A result too big on its own goes first: stdout still holds it as the tool printed it.
    let result_size = r.result.as_ref().map_or(0, |v| {
        v.encoded_len()
            .max(serde_json::to_vec(v).map_or(usize::MAX, |j| j.len()))
    });
    if result_size + SLACK > budget {
        r.result = None;
        r.result_note = note(budget);
    }
    let mut size = record_sizes(r);
    for stderr in [false, true] {
        if size.0.max(size.1) <= budget {
            return;
        }
        let text = if stderr { &mut r.stderr } else { &mut r.stdout };
        cut_front(
            text,
            size.0.saturating_sub(budget),
            size.1.saturating_sub(budget),
        );
        r.truncated = true;
        size = record_sizes(r);
    }
    let mut size = size.0.max(size.1);
    if size > budget && r.result.is_some() {
        r.result = None;
        r.result_note = note(budget);
        size = record_size(r);
    }
    if size > budget {
        // Only the small fields are left; nothing in them grows with the tool's output.
        tracing::warn!(execution = %r.execution_id, size, budget, "tool record still over budget");
    }
}

/// Drops the fewest characters from the front of `s` that take at least `raw` bytes off
/// its protobuf form and `json` bytes off its JSON form.
fn cut_front(s: &mut String, raw: usize, json: usize) {
    let (mut r, mut j) = (0, 0);
    let mut at = s.len();
    for (i, c) in s.char_indices() {
        if r >= raw && j >= json {
            at = i;
            break;
        }
        r += c.len_utf8();
        j += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
    }
    s.drain(..at);
}

async fn publish_event(t: &Tools, ctx: &Ctx, r: &ToolExecution) {
    let data = ToolEventData {
        execution_id: r.execution_id.clone(),
        status: r.status.clone(),
        tool_name: r.tool_name.clone(),
        session_id: r.session_id.clone(),
        space: r.space.clone(),
        host_id: t.o.host_id.clone(),
        exit_code: r.exit_code,
        duration_ms: r.duration_ms,
        attempt: r.attempt,
    };
    let data = serde_json::to_value(&data).unwrap_or_default();
    let event = tether_bus::events::cloud_event(
        &format!("tether.tool.{}", r.status),
        &format!("tether/{}/{}", crate::NAME, t.o.host_id),
        &r.execution_id,
        data,
        tether_bus::telemetry::current_traceparent(),
    );
    let session = if r.session_id.is_empty() {
        "_"
    } else {
        &r.session_id
    };
    let subject = ctx.subject(&format!("events.tools.{session}"));
    if let Err(e) = tether_bus::events::publish(&ctx.client, subject, &event).await {
        tracing::warn!(execution = %r.execution_id, error = %e, "cannot publish tool event");
    }
}

// ---------------------------------------------------------------------------------------
// Endpoints

/// A typed endpoint whose reply is a run record: in JSON, `result` keeps the numbers the
/// tool printed (`3`, not `3.0`: protobuf's `Value` holds only doubles).
fn record_endpoint<Q, F, Fut>(path: String, f: F) -> Endpoint
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
    let (t1, t2, t3, t4, t5) = (t.clone(), t.clone(), t.clone(), t.clone(), t.clone());
    node.endpoint(
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
    )
    .endpoint(
        Endpoint::new("tools.logs", move |r| logs(t4.clone(), false, r)).scope(Scope::ToolsRun),
    )
    .endpoint(
        Endpoint::new(format!("hosts.{}.tools.logs", t.o.host_id), move |r| {
            logs(t5.clone(), true, r)
        })
        .scope(Scope::ToolsRun),
    )
}

fn new_record(p: &Prepared, status: &str) -> ToolExecution {
    ToolExecution {
        execution_id: p.execution_id.clone(),
        status: status.into(),
        tool_name: p.tool_name.clone(),
        session_id: p.session_id.clone(),
        space: p.space.clone(),
        image: p.image.clone(),
        r#async: p.is_async,
        created_at: now_rfc3339(),
        submitted_by: p.agent_id.clone(),
        ..Default::default()
    }
}

async fn execute(t: T, req: Request<ToolExecuteRequest>) -> Result<ToolExecution, Problem> {
    let caller = req.caller()?.clone();
    let space = caller.space_for(&req.body.space)?;
    let execution_id = uuid::Uuid::now_v7().simple().to_string();
    let p = prepare(&t.o, &req.body, &space, &caller.agent_id, &execution_id)?;
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
    let mut rec = new_record(&p, STATUS_RUNNING);
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
                    r.status = STATUS_FAILED.into();
                    r.detail = detail.clone();
                    r.finished_at = now_rfc3339();
                    Change::Write
                })
                .await;
            Err(e)
        }
    }
}

async fn submit(
    t: &T,
    req: &Request<ToolExecuteRequest>,
    p: Prepared,
    session_host: Option<String>,
) -> Result<ToolExecution, Problem> {
    let rec = new_record(&p, STATUS_QUEUED);
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

async fn publish_job(
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

fn check_id(id: &str) -> Result<(), Problem> {
    if id.is_empty() {
        return Err(bad("`execution_id` is required"));
    }
    if !(id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())) {
        return Err(bad(format!("`execution_id` {id:?} is not an execution id")));
    }
    Ok(())
}

/// The record, if the caller may see it.
async fn visible(t: &Tools, req: &Request<ToolRef>) -> Result<(ToolExecution, u64), Problem> {
    let id = &req.body.execution_id;
    check_id(id)?;
    let caller = req.caller()?;
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

async fn get(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
    Ok(visible(&t, &req).await?.0)
}

async fn cancel(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
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
            if r.status == STATUS_QUEUED {
                r.status = STATUS_CANCELLED.into();
                r.detail = "cancelled before it started".into();
                r.finished_at = now_rfc3339();
            }
            Change::Write
        })
        .await?
        .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
    if changed.0.status == STATUS_CANCELLED {
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

async fn logs(t: T, addressed: bool, req: Request<ToolRef>) -> Result<ToolLogs, Problem> {
    let (r, _) = visible(&t, &req).await?;
    let live = r.status == STATUS_RUNNING && !r.container_id.is_empty();
    if live && r.host_id == t.o.host_id {
        let cap = usize::try_from(t.o.policy.cfg.exec_default_output_bytes)
            .unwrap_or(t.o.max_output)
            .min(t.o.max_output);
        match read_logs(t.o.engine.docker(), &r.container_id, cap).await {
            Ok((stdout, stderr, truncated)) => {
                return Ok(ToolLogs {
                    execution_id: r.execution_id,
                    status: r.status,
                    stdout,
                    stderr,
                    truncated,
                    live: true,
                });
            }
            Err(e) => tracing::debug!(error = %e, "live logs unavailable; answering the record"),
        }
    } else if live && !addressed {
        let subject = req.ctx.subject(&format!("hosts.{}.tools.logs", r.host_id));
        if let Ok(l) = forward::<ToolRef, ToolLogs>(&req, subject).await {
            return Ok(l);
        }
    }
    Ok(ToolLogs {
        execution_id: r.execution_id,
        status: r.status,
        stdout: r.stdout,
        stderr: r.stderr,
        truncated: r.truncated,
        live: false,
    })
}

/// Sends a request on to another node's subject as the caller (the other node checks the
/// token again).
pub async fn forward<Q, R>(req: &Request<Q>, subject: String) -> Result<R, Problem>
where
    Q: prost::Message + serde::Serialize,
    R: prost::Message + serde::de::DeserializeOwned + Default,
{
    forward_within(req, subject, Duration::from_secs(60)).await
}

/// [`forward`], waiting up to `timeout` for the other node's answer.
pub async fn forward_within<Q, R>(
    req: &Request<Q>,
    subject: String,
    timeout: Duration,
) -> Result<R, Problem>
where
    Q: prost::Message + serde::Serialize,
    R: prost::Message + serde::de::DeserializeOwned + Default,
{
    let body = req.encoding.encode(&req.body)?;
    let request = async_nats::client::Request::new()
        .payload(body)
        .headers(req.headers.clone())
        .timeout(Some(timeout));
    let msg = req
        .ctx
        .client
        .send_request(subject.clone(), request)
        .await
        .map_err(|e| Problem::unavailable(format!("cannot reach `{subject}`: {e}")))?;
    if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
        return Err(p);
    }
    req.encoding.decode::<R>(&msg.payload)
}

// ---------------------------------------------------------------------------------------
// Jobs, cancel signals, janitor

/// Broadcast (every replica listens) naming an execution whose cancel was asked; the
/// runner checks the record's `cancel_requested` before acting, so a stray message does
/// nothing.
pub const CANCEL_SUBJECT: &str = "tools.internal.cancel";

/// Runs one delivered job.
async fn run_job(t: &T, ctx: &Ctx, job: Job) -> Outcome {
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
    let p = match prepare(&t.o, &req, &j.space, &j.agent_id, &id) {
        Ok(p) => p,
        Err(e) => {
            let ran = Ran {
                status: STATUS_FAILED,
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
        status: STATUS_FAILED,
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

/// A stand-in for recording the failure of a job that no longer validates.
fn fallback_prepared(space: &str, agent: &str, id: &str) -> Prepared {
    Prepared {
        execution_id: id.to_string(),
        space: space.to_string(),
        agent_id: agent.to_string(),
        tool_name: String::new(),
        session_id: String::new(),
        image: String::new(),
        spec: ContainerSpec {
            image: String::new(),
            name: String::new(),
            space: space.to_string(),
            session_id: String::new(),
            kind: crate::spec::Kind::Tool,
            env: Vec::new(),
            cmd: None,
            workdir: None,
            labels: HashMap::new(),
            memory_mb: 0,
            cpu_limit: 0.0,
            pids_limit: 0,
            ttl_seconds: 0,
            expires_at: chrono::Utc::now(),
            network_mode: "none".into(),
            extra_hosts: Vec::new(),
            read_only_root: true,
            writable_paths: Vec::new(),
            mounts: Vec::new(),
            start: false,
        },
        timeout: Duration::from_secs(1),
        cleanup: true,
        max_output: 0,
        network: ToolNetwork::None,
        is_async: true,
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

/// One janitor pass over this host's tool containers: removes those no run owns any more
/// (their record finished with `cleanup`, names another container, or is gone), and
/// finishes the records of sync runs whose node died (their container past its deadline).
pub async fn janitor_pass(t: &Tools) -> anyhow::Result<Vec<String>> {
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
async fn abandon(t: &Tools, exec: &str, container: &str) {
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
            r.status = STATUS_FAILED.into();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::to_pb_value;

    #[test]
    fn parameters_become_env() {
        let p = parse_parameters(Some(&to_pb_value(
            serde_json::json!({"a": 1, "b-c": "x", "o": {"k": [1]}}),
        )))
        .expect("object");
        let env = parameter_env(&p).expect("env");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B_C"], "x");
        assert_eq!(env["O"], r#"{"k":[1]}"#);
        assert!(env["TETHER_PARAMETERS"].contains("\"a\":1"));
        // A string holding a JSON object is accepted; anything else is not.
        assert!(parse_parameters(Some(&to_pb_value(serde_json::json!("{\"a\":1}")))).is_ok());
        for bad in [
            serde_json::json!("not json"),
            serde_json::json!("[1]"),
            serde_json::json!(5),
            serde_json::json!([1]),
        ] {
            let e = parse_parameters(Some(&to_pb_value(bad.clone()))).expect_err("refused");
            assert_eq!(e.status, 400, "{bad}");
        }
        for bad in [
            serde_json::json!({"1x": 1}),
            serde_json::json!({"tether_parameters": 1}),
            serde_json::json!({"a": 1, "A": 2}),
            serde_json::json!({"has space": 1}),
            serde_json::json!({"path": "/src"}),
            serde_json::json!({"ld_preload": "/x.so"}),
        ] {
            let p = parse_parameters(Some(&to_pb_value(bad.clone()))).expect("object");
            assert_eq!(parameter_env(&p).expect_err("refused").status, 400, "{bad}");
        }
    }

    #[test]
    fn result_is_the_last_json_line() {
        assert_eq!(
            parse_result("working\n{\"p\": 1}\n{\"sum\": 3}\ndone\n"),
            Some(serde_json::json!({"sum": 3}))
        );
        assert_eq!(parse_result("[1,2]"), Some(serde_json::json!([1, 2])));
        assert_eq!(parse_result("3\n\"x\"\n{broken\n"), None);
        assert_eq!(parse_result(""), None);
    }

    #[test]
    fn a_record_is_fitted_to_the_reply_budget() {
        let budget = 64 * 1024;
        // A small record is left alone.
        let mut r = ToolExecution {
            stdout: "ok\n".into(),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert_eq!(r.stdout, "ok\n");
        assert!(!r.truncated);
        // Output that escapes to six times its size: the oldest goes, the newest stays.
        let noise = "\u{1}".repeat(40 * 1024);
        let mut r = ToolExecution {
            stdout: format!("{noise}\n{{\"done\": true}}\n"),
            stderr: "warn\n".into(),
            result: Some(to_pb_value(serde_json::json!({"done": true}))),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert!(record_size(&r) <= budget, "{}", record_size(&r));
        assert!(r.truncated);
        assert!(r.stdout.ends_with("{\"done\": true}\n"));
        assert!(r.result.is_some());
        // A result that is too big in protobuf (a double per number) is dropped, with a note.
        let big: Vec<u8> = vec![1; 20 * 1024];
        let line = serde_json::to_string(&big).expect("json");
        let mut r = ToolExecution {
            stdout: line.clone(),
            result: Some(to_pb_value(serde_json::json!(big))),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert!(record_size(&r) <= budget, "{}", record_size(&r));
        assert_eq!(r.stdout, line, "stdout still holds it");
        assert!(r.result.is_none());
        assert!(r.result_note.contains("too large"), "{}", r.result_note);
        // Multi-byte characters are cut at a boundary.
        let mut s = "é".repeat(10);
        cut_front(&mut s, 3, 0);
        assert_eq!(s, "é".repeat(8));
        let mut s = "\u{1}\u{1}abc".to_string();
        cut_front(&mut s, 0, 12);
        assert_eq!(s, "abc");
    }

    #[test]
    fn terminal_statuses() {
        for s in [
            STATUS_COMPLETED,
            STATUS_FAILED,
            STATUS_TIMED_OUT,
            STATUS_CANCELLED,
        ] {
            assert!(is_terminal(s));
        }
        assert!(!is_terminal(STATUS_QUEUED) && !is_terminal(STATUS_RUNNING));
    }
}
