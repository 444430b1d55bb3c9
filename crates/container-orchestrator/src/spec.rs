//! Validation of a create request into a [`ContainerSpec`]: every field checked, every
//! default filled in, before anything reaches the engine.
//!
//! Pure (no I/O besides resolving symlinks of allowed bind mounts), so the whole policy —
//! limits, names, reserved labels and environment, network modes, the mount allowlist — is
//! tested by calling [`validate_create`] directly. A request that fails here creates nothing.

use std::collections::HashMap;
use std::path::Path;

use tether_bus::Problem;
use tether_proto::{CreateContainerRequest, MountSpec, ResourceLimits};

use crate::config::{AllowedMount, OrchestratorConfig};
use crate::labels::{
    LABEL_CREATED_BY, LABEL_EXPIRES, LABEL_HOST, LABEL_KIND, LABEL_MANAGED, LABEL_SESSION,
    LABEL_SPACE, SESSION_NETWORK_PREFIX,
};

/// Environment names the orchestrator sets itself; a request may not.
/// Every variable of this prefix is the orchestrator's (the ones below, `TETHER_TOOL`,
/// `TETHER_EXECUTION_ID`, `TETHER_PARAMETERS`, and whatever comes later): a request can never
/// shadow one (a duplicate name would be read first by some libcs).
pub const RESERVED_ENV_PREFIX: &str = "TETHER_";
pub const RESERVED_ENV: &[&str] = &[
    "TETHER_NATS_URL",
    "TETHER_SPACE",
    "TETHER_SESSION",
    "TETHER_EXEC_ID",
    "TETHER_EXEC_DEADLINE",
];

/// Engine minimum for a memory limit.
pub const MIN_MEMORY_MB: i32 = 6;
pub const MIN_PIDS: i32 = 8;

/// What a container is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Space,
    Tool,
    Relic,
    /// A replica of a worker deployment (`workers.*`): made only by the worker
    /// reconciler, never by `containers.create`; in no space, and never expires.
    Worker,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, Problem> {
        match s {
            "" | "space" => Ok(Kind::Space),
            "tool" => Ok(Kind::Tool),
            "relic" => Ok(Kind::Relic),
            "worker" => Ok(Kind::Worker),
            other => Err(Problem::bad_request(format!(
                "`kind` must be space, tool, relic or worker (got {other:?})"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Space => "space",
            Kind::Tool => "tool",
            Kind::Relic => "relic",
            Kind::Worker => "worker",
        }
    }
}

/// The bounds requests are checked against (config capped by the engine's host).
#[derive(Clone, Debug)]
pub struct Policy {
    pub cfg: OrchestratorConfig,
    pub host_id: String,
    /// CPUs of the Docker host (the engine refuses more).
    pub host_cpus: f64,
    /// Memory of the Docker host in MiB.
    pub host_memory_mb: i64,
    /// `TETHER_NATS_URL` for containers.
    pub container_nats_url: String,
    /// The deployment's subject prefix (the bus config's), for the space daemons' subjects.
    pub subject_prefix: Option<String>,
}

impl Policy {
    pub fn max_memory_mb(&self) -> i64 {
        i64::from(self.cfg.max_memory_mb).min(self.host_memory_mb.max(i64::from(MIN_MEMORY_MB)))
    }
    pub fn max_cpu(&self) -> f64 {
        self.cfg.max_cpu_limit.min(self.host_cpus.max(0.01))
    }
}

/// A bind mount that passed the allowlist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: String,
    pub target: String,
    pub writable: bool,
}

/// A validated, complete container definition.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub image: String,
    pub name: String,
    pub space: String,
    pub session_id: String,
    pub kind: Kind,
    /// `KEY=value`, the orchestrator's own variables included.
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub workdir: Option<String>,
    /// Every label, `tether.*` included.
    pub labels: HashMap<String, String>,
    pub memory_mb: i32,
    pub cpu_limit: f64,
    pub pids_limit: i32,
    pub ttl_seconds: i32,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub network_mode: String,
    pub extra_hosts: Vec<String>,
    pub read_only_root: bool,
    /// Paths mounted as tmpfs (writable on a read-only root).
    pub writable_paths: Vec<String>,
    pub mounts: Vec<BindMount>,
    /// A directory on a tmpfs volume of the engine's (anonymous: removed with the container)
    /// that the orchestrator writes through the engine's archive API: a worker replica's token
    /// (the engine module's `files`). `None` for every other container.
    pub secret_dir: Option<String>,
    /// The space daemon as the container's init (the `daemon` module): `None` for every container
    /// but a space's, and for a space's when the daemon is off.
    pub daemon: Option<DaemonSetup>,
    pub start: bool,
}

/// How a space container runs the space daemon: its volume (mounted read-only) and the
/// entrypoint that starts the daemon with the image's own command after `--`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetup {
    pub volume: String,
    /// Where the volume is mounted.
    pub dir: String,
    pub entrypoint: Vec<String>,
}

impl ContainerSpec {
    pub fn limits(&self) -> ResourceLimits {
        ResourceLimits {
            memory_mb: self.memory_mb,
            cpu_limit: self.cpu_limit,
            pids_limit: self.pids_limit,
            timeout_seconds: self.ttl_seconds,
        }
    }
}

fn bad(msg: impl Into<String>) -> Problem {
    Problem::bad_request(msg)
}

/// Docker's container name rule, bounded: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`, at most 128.
pub fn is_valid_container_name(s: &str) -> bool {
    let s = s.strip_prefix('/').unwrap_or(s);
    let mut chars = s.chars();
    s.len() >= 2
        && s.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An image reference the engine could know: `name[:tag][@digest]`, plain characters only.
pub fn is_valid_image_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
        && !s.contains("//")
        && !s.contains("..")
}

/// An environment variable's name: `[A-Za-z_][A-Za-z0-9_]*`, at most 256.
pub fn is_env_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 256
        && k.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a request's environment: valid names, no NUL, nothing reserved, bounded.
pub fn validate_env(env: &HashMap<String, String>) -> Result<Vec<String>, Problem> {
    if env.len() > 256 {
        return Err(bad("`env` may hold at most 256 variables"));
    }
    let mut out = Vec::with_capacity(env.len());
    let mut keys: Vec<&String> = env.keys().collect();
    keys.sort();
    for k in keys {
        let v = &env[k];
        if !is_env_name(k) {
            return Err(bad(format!(
                "`env` name {k:?} must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if RESERVED_ENV.contains(&k.as_str()) || k.starts_with(RESERVED_ENV_PREFIX) {
            return Err(bad(format!(
                "`env` {k}: the {RESERVED_ENV_PREFIX} prefix is the orchestrator's and cannot be given"
            )));
        }
        if v.contains('\0') || v.len() > 32 * 1024 {
            return Err(bad(format!(
                "`env` {k}: value must be at most 32 KiB, without NUL"
            )));
        }
        out.push(format!("{k}={v}"));
    }
    Ok(out)
}

/// A command from a `Value`: a string runs under `sh -c`, a list of strings is the argv.
pub fn parse_command(
    v: Option<&tether_proto::pbjson_types::Value>,
) -> Result<Option<Vec<String>>, Problem> {
    use tether_proto::pbjson_types::value::Kind as V;
    let Some(v) = v else { return Ok(None) };
    let argv = match &v.kind {
        None | Some(V::NullValue(_)) => return Ok(None),
        Some(V::StringValue(s)) if s.trim().is_empty() => {
            return Err(bad("`command` is an empty string"));
        }
        Some(V::StringValue(s)) => vec!["sh".to_string(), "-c".to_string(), s.clone()],
        Some(V::ListValue(l)) => {
            let mut argv = Vec::with_capacity(l.values.len());
            for item in &l.values {
                match &item.kind {
                    Some(V::StringValue(s)) => argv.push(s.clone()),
                    _ => return Err(bad("`command` as a list must hold only strings")),
                }
            }
            if argv.is_empty() || argv[0].is_empty() {
                return Err(bad("`command` as a list must name a program first"));
            }
            argv
        }
        Some(_) => {
            return Err(bad(
                "`command` must be a string (run by `sh -c`) or a list of strings (argv)",
            ));
        }
    };
    let total: usize = argv.iter().map(String::len).sum();
    if total > 128 * 1024 || argv.len() > 4096 || argv.iter().any(|a| a.contains('\0')) {
        return Err(bad(
            "`command` must be at most 128 KiB and 4096 arguments, without NUL",
        ));
    }
    Ok(Some(argv))
}

/// An absolute, normalized path (no `..`, `.` or empty segments), bounded; a trailing `/`
/// is dropped.
pub fn validate_abs_path(what: &str, p: &str) -> Result<String, Problem> {
    let refuse = || {
        bad(format!(
            "`{what}` {p:?} must be an absolute path without `..`, `.`, `//`, `:` or `,`"
        ))
    };
    if !p.starts_with('/')
        || p.len() > 1024
        || p.chars().any(|c| c.is_control() || c == ',' || c == ':')
    {
        return Err(refuse());
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".into());
    }
    if trimmed
        .split('/')
        .skip(1)
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(refuse());
    }
    Ok(trimmed.to_string())
}

fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
}

/// Paths a mount or tmpfs may never cover.
fn is_forbidden_target(p: &str) -> bool {
    p == "/" || ["/proc", "/sys", "/dev"].iter().any(|d| is_under(p, d))
}

fn validate_mounts(
    mounts: &[MountSpec],
    allowlist: &[AllowedMount],
    space: &str,
) -> Result<Vec<BindMount>, Problem> {
    if mounts.len() > 32 {
        return Err(bad("at most 32 `mounts`"));
    }
    let mut out = Vec::new();
    for m in mounts {
        let source = validate_abs_path("mounts.source", &m.source)?;
        let target = validate_abs_path("mounts.target", &m.target)?;
        if is_forbidden_target(&target) {
            return Err(bad(format!(
                "`mounts.target` {target:?} may not be /, /proc, /sys or /dev"
            )));
        }
        let allowed = |path: &str| {
            allowlist.iter().find(|a| {
                // An entry per space means nothing for a container in no space (a worker
                // replica): with `{space}` empty it would allow the parent of every space.
                if space.is_empty() && a.path.contains("{space}") {
                    return false;
                }
                let dir = a.path.replace("{space}", space);
                is_under(path, &dir) && dir != "/" && !dir.is_empty()
            })
        };
        let entry = allowed(&source).ok_or_else(|| {
            Problem::forbidden(format!(
                "host path {source:?} is not under a path the operator allows for mounts"
            ))
        })?;
        if m.writable && !entry.writable {
            return Err(Problem::forbidden(format!(
                "host path {source:?} may only be mounted read-only"
            )));
        }
        // A symlink inside an allowed folder must not lead out of it (checked when the path
        // is visible to this process, i.e. the node runs on the Docker host).
        if let Ok(real) = std::fs::canonicalize(Path::new(&source)) {
            let real = real.to_string_lossy().into_owned();
            let still = allowed(&real).is_some_and(|e| !m.writable || e.writable);
            if !still {
                return Err(Problem::forbidden(format!(
                    "host path {source:?} resolves to {real:?}, outside the allowed paths"
                )));
            }
        }
        out.push(BindMount {
            source,
            target,
            writable: m.writable,
        });
    }
    Ok(out)
}

fn validate_limits(
    l: Option<&ResourceLimits>,
    policy: &Policy,
) -> Result<(i32, f64, i32, i32), Problem> {
    let d = ResourceLimits::default();
    let l = l.unwrap_or(&d);
    let cfg = &policy.cfg;
    let memory = match l.memory_mb {
        0 => cfg.default_memory_mb,
        m if m < 0 => {
            return Err(bad(format!(
                "`resource_limits.memory_mb` is negative ({m})"
            )));
        }
        m if m < MIN_MEMORY_MB => {
            return Err(bad(format!(
                "`resource_limits.memory_mb` must be at least {MIN_MEMORY_MB} (got {m})"
            )));
        }
        m if i64::from(m) > policy.max_memory_mb() => {
            return Err(bad(format!(
                "`resource_limits.memory_mb` must be at most {} on this host (got {m})",
                policy.max_memory_mb()
            )));
        }
        m => m,
    };
    let cpu = l.cpu_limit;
    let cpu = if !cpu.is_finite() {
        return Err(bad("`resource_limits.cpu_limit` must be a number"));
    } else if cpu == 0.0 {
        cfg.default_cpu_limit.min(policy.max_cpu())
    } else if cpu < 0.01 {
        return Err(bad(format!(
            "`resource_limits.cpu_limit` must be at least 0.01 (got {cpu})"
        )));
    } else if cpu > policy.max_cpu() {
        return Err(bad(format!(
            "`resource_limits.cpu_limit` must be at most {} on this host (got {cpu})",
            policy.max_cpu()
        )));
    } else {
        cpu
    };
    let pids = match l.pids_limit {
        0 => cfg.default_pids_limit,
        p if p < MIN_PIDS || p > cfg.max_pids_limit => {
            return Err(bad(format!(
                "`resource_limits.pids_limit` must be between {MIN_PIDS} and {} (got {p})",
                cfg.max_pids_limit
            )));
        }
        p => p,
    };
    let ttl = match l.timeout_seconds {
        0 => cfg.default_ttl_seconds,
        t if t < 0 || t > cfg.max_ttl_seconds => {
            return Err(bad(format!(
                "`resource_limits.timeout_seconds` (container lifetime) must be between 1 and {} (got {t})",
                cfg.max_ttl_seconds
            )));
        }
        t => t,
    };
    Ok((memory, cpu, pids, ttl))
}

fn validate_network(mode: &str, kind: Kind, policy: &Policy) -> Result<String, Problem> {
    let cfg = &policy.cfg;
    let mode = if mode.is_empty() {
        match kind {
            Kind::Space | Kind::Worker => cfg.space_network_mode.clone(),
            Kind::Tool | Kind::Relic => cfg.tool_network_mode.clone(),
        }
    } else {
        mode.to_string()
    };
    if mode == "host" || mode.contains(':') {
        return Err(Problem::forbidden(format!(
            "`network_mode` {mode:?} is not allowed (host and container namespaces are never shared)"
        )));
    }
    if mode.starts_with(SESSION_NETWORK_PREFIX) {
        return Err(Problem::forbidden(format!(
            "`network_mode` {mode:?}: session networks are joined only by the session's relics and tools (`network: session`)"
        )));
    }
    // An allowlist, not a denylist: the engine also takes a network's id or any unique
    // prefix of it, so a name check alone would let a request guess its way onto another
    // session's private network.
    let allowed = ["none", "bridge", "default"].contains(&mode.as_str())
        || mode == cfg.space_network_mode
        || mode == cfg.tool_network_mode
        || cfg.allowed_networks.contains(&mode);
    if !allowed {
        return Err(Problem::forbidden(format!(
            "`network_mode` {mode:?} is not allowed: use none, bridge, or a network in the operator's `allowed_networks`"
        )));
    }
    Ok(mode)
}

/// `name:IP` or `name:host-gateway` entries, at most 32.
pub fn validate_extra_hosts(hosts: &[String]) -> Result<Vec<String>, Problem> {
    if hosts.len() > 32 {
        return Err(bad("at most 32 `extra_hosts`"));
    }
    hosts
        .iter()
        .map(|h| {
            let (name, addr) = h
                .split_once(':')
                .ok_or_else(|| bad(format!("`extra_hosts` entry {h:?} must be name:address")))?;
            let name_ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            let addr_ok = addr == "host-gateway" || addr.parse::<std::net::IpAddr>().is_ok();
            if name_ok && addr_ok {
                Ok(h.clone())
            } else {
                Err(bad(format!(
                    "`extra_hosts` entry {h:?} must be name:IP or name:host-gateway"
                )))
            }
        })
        .collect()
}

fn validate_labels(labels: &HashMap<String, String>) -> Result<(), Problem> {
    if labels.len() > 64 {
        return Err(bad("at most 64 `labels`"));
    }
    for (k, v) in labels {
        let ok = !k.is_empty()
            && k.len() <= 128
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !ok {
            return Err(bad(format!("label name {k:?} is not valid")));
        }
        if k.to_ascii_lowercase().starts_with("tether.") {
            return Err(bad(format!(
                "label {k:?}: the `tether.` prefix is reserved for the orchestrator"
            )));
        }
        if v.len() > 4096 || v.contains('\0') {
            return Err(bad(format!("label {k:?}: value too long or has NUL")));
        }
    }
    Ok(())
}

/// Validates a create request for `space` (already authorized) made by `agent_id`. A worker
/// replica (kind `worker`, built by the worker reconciler) has no space (`space` empty): it
/// gets no space, session or expiry label and no `TETHER_SPACE`/`TETHER_SESSION`.
pub fn validate_create(
    req: &CreateContainerRequest,
    space: &str,
    agent_id: &str,
    policy: &Policy,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<ContainerSpec, Problem> {
    let allowlist = policy.cfg.default_allowed_mounts();
    validate_create_in(req, space, agent_id, policy, now, &allowlist)
}

/// [`validate_create`] with the mounts checked against `allowlist` (a profile's
/// `allowed_mounts`).
pub fn validate_create_in(
    req: &CreateContainerRequest,
    space: &str,
    agent_id: &str,
    policy: &Policy,
    now: chrono::DateTime<chrono::Utc>,
    allowlist: &[AllowedMount],
) -> Result<ContainerSpec, Problem> {
    if req.image.is_empty() {
        return Err(bad("`image` is required"));
    }
    if !is_valid_image_ref(&req.image) {
        return Err(bad(format!(
            "`image` {:?} is not an image reference",
            req.image
        )));
    }
    let kind = Kind::parse(&req.kind)?;
    let spaceless = kind == Kind::Worker && space.is_empty();
    if !spaceless && !tether_bus::subject::is_valid_token(space) {
        return Err(bad(format!(
            "`space` {space:?} must be 1-128 characters of A-Z a-z 0-9 - _"
        )));
    }
    if !req.session_id.is_empty() && !tether_bus::subject::is_valid_token(&req.session_id) {
        return Err(bad(format!(
            "`session_id` {:?} must be 1-128 characters of A-Z a-z 0-9 - _",
            req.session_id
        )));
    }
    let name = if req.name.is_empty() {
        let short = uuid::Uuid::new_v4().simple().to_string();
        let mut n = format!("tether-{}-{space}", kind.as_str());
        n.truncate(110);
        format!("{n}-{}", &short[..8])
    } else if is_valid_container_name(&req.name) {
        req.name.trim_start_matches('/').to_string()
    } else {
        return Err(bad(format!(
            "`name` {:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]+ and be at most 128 characters",
            req.name
        )));
    };
    let (memory_mb, cpu_limit, pids_limit, ttl_seconds) =
        validate_limits(req.resource_limits.as_ref(), policy)?;
    let mut env = validate_env(&req.env)?;
    let cmd = match parse_command(req.command.as_ref())? {
        Some(c) => Some(c),
        None if kind == Kind::Space => Some(policy.cfg.idle_command.clone()),
        None => None,
    };
    let workdir = if req.workdir.is_empty() {
        None
    } else {
        Some(validate_abs_path("workdir", &req.workdir)?)
    };
    validate_labels(&req.labels)?;
    let network_mode = validate_network(&req.network_mode, kind, policy)?;
    let mut extra_hosts = validate_extra_hosts(&req.extra_hosts)?;
    let mounts = validate_mounts(&req.mounts, allowlist, space)?;

    let read_only_root = !req.writable_root;
    let mut writable_paths: Vec<String> = Vec::new();
    if read_only_root {
        writable_paths.push("/tmp".into());
        if let Some(w) = &workdir
            && !is_forbidden_target(w)
        {
            writable_paths.push(w.clone());
        }
    }
    if req.writable_paths.len() > 16 {
        return Err(bad("at most 16 `writable_paths`"));
    }
    for p in &req.writable_paths {
        let p = validate_abs_path("writable_paths", p)?;
        if is_forbidden_target(&p) {
            return Err(bad(format!(
                "`writable_paths` {p:?} may not be /, /proc, /sys or /dev"
            )));
        }
        if !writable_paths.contains(&p) {
            writable_paths.push(p);
        }
    }
    if let Some(m) = mounts.iter().find(|m| writable_paths.contains(&m.target)) {
        return Err(bad(format!(
            "{:?} is both a mount target and a writable path",
            m.target
        )));
    }

    let nats_url = policy.container_nats_url.clone();
    add_gateway_host(&mut extra_hosts, &network_mode, &nats_url);
    env.push(format!("TETHER_NATS_URL={nats_url}"));
    if !spaceless {
        env.push(format!("TETHER_SPACE={space}"));
        env.push(format!("TETHER_SESSION={}", req.session_id));
    }

    let expires_at = now + chrono::Duration::seconds(i64::from(ttl_seconds));
    let mut labels = req.labels.clone();
    labels.insert(LABEL_MANAGED.into(), "true".into());
    labels.insert(LABEL_KIND.into(), kind.as_str().into());
    if !spaceless {
        labels.insert(LABEL_SPACE.into(), space.into());
        labels.insert(LABEL_SESSION.into(), req.session_id.clone());
        labels.insert(
            LABEL_EXPIRES.into(),
            expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
    }
    labels.insert(LABEL_HOST.into(), policy.host_id.clone());
    labels.insert(LABEL_CREATED_BY.into(), agent_id.into());

    Ok(ContainerSpec {
        image: req.image.clone(),
        name,
        space: space.into(),
        session_id: req.session_id.clone(),
        kind,
        env,
        cmd,
        workdir,
        labels,
        memory_mb,
        cpu_limit,
        pids_limit,
        ttl_seconds,
        expires_at,
        network_mode,
        extra_hosts,
        read_only_root,
        writable_paths,
        mounts,
        secret_dir: None,
        daemon: None,
        start: !req.create_only,
    })
}

/// Maps `host.docker.internal` to the host gateway when the bus URL containers get names it
/// (and the container has a network to reach it by).
pub fn add_gateway_host(extra_hosts: &mut Vec<String>, network_mode: &str, nats_url: &str) {
    if network_mode != "none"
        && nats_url.contains("host.docker.internal")
        && !extra_hosts
            .iter()
            .any(|h| h.starts_with("host.docker.internal:"))
    {
        extra_hosts.push("host.docker.internal:host-gateway".into());
    }
}

/// The `TETHER_NATS_URL` for containers: loopback hosts of the node's URL(s) become
/// `host.docker.internal`, which the orchestrator maps to the host gateway. Credentials in a
/// URL are always left out: the node's own never enter a container.
pub fn container_nats_url(configured: &str, bus_url: &str) -> String {
    if !configured.is_empty() {
        return tether_bus::connect::display_url(configured);
    }
    tether_bus::connect::display_url(bus_url)
        .split(',')
        .map(|u| {
            let u = u.trim();
            ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"]
                .iter()
                .fold(u.to_string(), |acc, h| {
                    acc.replace(&format!("//{h}:"), "//host.docker.internal:")
                        .replace(&format!("//{h}/"), "//host.docker.internal/")
                })
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The create policy of the default configuration on a host of 2 CPUs and 4 GiB.
#[cfg(test)]
impl Policy {
    pub(crate) fn for_tests() -> Policy {
        Policy {
            cfg: OrchestratorConfig::default(),
            host_id: "h1".into(),
            host_cpus: 2.0,
            host_memory_mb: 4096,
            container_nats_url: "nats://host.docker.internal:4222".into(),
            subject_prefix: None,
        }
    }
}

#[cfg(test)]
mod tests;
