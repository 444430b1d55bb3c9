//! A deployment request checked into its stored form, the container of one replica, and the
//! assignment of replica slots to hosts. Pure: every bad-input case is a unit test.
//!
//! A replica's container is made through the same [`crate::spec::validate_create`] as every other
//! container (kind `worker`: no space, no expiry), so it is hardened the same way; the worker
//! labels and `TETHER_WORKER*` variables are added after, as tool runs add theirs, with
//! `TETHER_AGENT_ID`, `TETHER_TOKEN_FILE` (a path) and the tmpfs volume the token is written to.
//!
//! The deployment's profile (`[profiles.<name>]`, [`crate::config::Profile`]) is applied here: its default limits fill
//! what the request leaves at 0 (and are stored resolved); the request's own `mounts` are
//! checked against the profile's `allowed_mounts`; the profile's fixed mounts, extra hosts and
//! network are added to every replica (read from the node's config when the replica is made,
//! never stored); a profile with an `env_file` gives `TETHER_ENV_FILE` (a path: the values are
//! written into the secret volume, `super::credentials`).

use std::collections::HashMap;

use tether_bus::Problem;
use tether_proto::{
    CreateContainerRequest, DeployWorkerRequest, ResourceLimits, WorkerDeployment, WorkerSlot,
};

use super::credentials::{ENV_PATH, TOKEN_DIR, TOKEN_PATH};
pub use crate::config::DEFAULT_PROFILE;
use crate::config::{MountMode, Profile};
use crate::labels::{LABEL_DEPLOYMENT, LABEL_GENERATION, LABEL_REPLICA, LABEL_WORKER};
use crate::spec::{
    BindMount, ContainerSpec, Kind, Policy, add_gateway_host, validate_create_in,
    validate_extra_hosts,
};

/// The profile a deployment names (empty = `default`), from the node's config; 422 naming the
/// configured ones when there is none of that name.
pub fn profile(name: &str, policy: &Policy) -> Result<(String, Profile), Problem> {
    let name = if name.is_empty() {
        DEFAULT_PROFILE
    } else {
        name
    };
    let mut all = policy.cfg.effective_profiles();
    match all.remove(name) {
        Some(p) => Ok((name.to_string(), p)),
        None => Err(Problem::unprocessable(format!(
            "unknown profile {name:?}: this orchestrator has {}",
            all.keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What an exited replica gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Replaced, whatever its exit code.
    Always,
    /// Replaced unless it exited with 0.
    OnFailure,
    /// Left as it is (for its logs).
    Never,
}

impl Restart {
    pub fn parse(s: &str) -> Result<Restart, Problem> {
        match s {
            "" | "always" => Ok(Restart::Always),
            "on-failure" => Ok(Restart::OnFailure),
            "never" => Ok(Restart::Never),
            other => Err(Problem::bad_request(format!(
                "`restart` must be always, on-failure or never (got {other:?})"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::Never => "never",
        }
    }
    /// Whether a replica that exited with `code` is replaced.
    pub fn replaces(self, code: i64) -> bool {
        match self {
            Restart::Always => true,
            Restart::OnFailure => code != 0,
            Restart::Never => false,
        }
    }
}

/// A deployment name: `[a-z0-9][a-z0-9-]{0,62}` (a KV key, a subject token, part of
/// container names).
pub fn check_name(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::bad_request("`name` is required"));
    }
    if tether_bus::subject::is_valid_name(name) {
        Ok(())
    } else {
        Err(Problem::bad_request(format!(
            "`name` {name:?} must be 1-63 characters of a-z 0-9 -, starting with a letter or digit"
        )))
    }
}

/// Checks a deploy request and fills in every default: the stored spec. `max_replicas` is the
/// orchestrator's bound (`max_worker_replicas`).
pub fn validate_deploy(
    b: &DeployWorkerRequest,
    policy: &Policy,
) -> Result<DeployWorkerRequest, Problem> {
    check_name(&b.name)?;
    if b.agent_id.is_empty() {
        return Err(Problem::bad_request("`agent_id` is required"));
    }
    if !tether_bus::subject::is_valid_token(&b.agent_id) {
        return Err(Problem::bad_request(format!(
            "`agent_id` {:?} must be 1-128 characters of A-Z a-z 0-9 - _",
            b.agent_id
        )));
    }
    let (profile, p) = profile(&b.profile, policy)?;
    let restart = Restart::parse(&b.restart)?;
    let limit = policy.cfg.max_worker_replicas;
    let min = b.min_replicas;
    // Scaled on the backlog: a `max_replicas` asked for, above the minimum (without one, the
    // maximum is `replicas` and nothing scales it). Then 0 replicas is a count like any other
    // when the minimum is 0 (the first task starts one).
    let scaled = b.max_replicas > min;
    let replicas = match b.replicas {
        0 if scaled => min,
        0 => min.max(1),
        n => n,
    };
    let max = match b.max_replicas {
        0 => replicas.max(min),
        n => n,
    };
    if max > limit {
        return Err(Problem::bad_request(format!(
            "`max_replicas` (or `replicas`) must be at most {limit} (got {max})"
        )));
    }
    if min > max {
        return Err(Problem::bad_request(format!(
            "`min_replicas` ({min}) must be at most `max_replicas` ({max})"
        )));
    }
    check_replicas(replicas, min, max)?;
    let (target, quiet) = scaling(b, scaled)?;
    let mut asked = b.resource_limits.unwrap_or_default();
    let d = p.resource_limits;
    if asked.memory_mb == 0 {
        asked.memory_mb = d.memory_mb;
    }
    if asked.cpu_limit == 0.0 {
        asked.cpu_limit = d.cpu_limit;
    }
    if asked.pids_limit == 0 {
        asked.pids_limit = d.pids_limit;
    }
    if asked.timeout_seconds != 0 {
        return Err(Problem::bad_request(
            "`resource_limits.timeout_seconds` must be 0: worker replicas do not expire",
        ));
    }
    let mut spec = DeployWorkerRequest {
        name: b.name.clone(),
        agent_id: b.agent_id.clone(),
        image: b.image.clone(),
        command: b.command.clone(),
        env: b.env.clone(),
        profile,
        resource_limits: Some(asked),
        replicas,
        min_replicas: min,
        max_replicas: max,
        restart: restart.as_str().into(),
        mounts: b.mounts.clone(),
        target_backlog_per_replica: target,
        scale_down_after_seconds: quiet,
    };
    // Everything else (image, command, env, limits, mounts) is checked as for any container,
    // and the limits are stored as resolved, so every host makes the same replica.
    let c = container(&spec, 0, 1, "", policy)?;
    spec.resource_limits = Some(ResourceLimits {
        timeout_seconds: 0,
        ..c.limits()
    });
    Ok(spec)
}

/// The target backlog per replica when none is asked: the Rust worker library's default
/// concurrency (each replica busy, nothing waiting).
pub const DEFAULT_TARGET_BACKLOG: u32 = 4;
/// The quiet period before a scale-down when none is asked (Kubernetes' HPA waits as long).
pub const DEFAULT_SCALE_DOWN_AFTER_SECONDS: u32 = 300;

/// Whether a stored deployment is scaled on its backlog: it has a target (only a scaled one
/// is stored with one) and room between its bounds.
pub fn is_scaled(s: &DeployWorkerRequest) -> bool {
    s.target_backlog_per_replica > 0 && s.min_replicas < s.max_replicas
}

/// The scaling settings as stored: defaults filled in for a scaled deployment, both 0 for
/// one that is not (where asking for them is refused).
fn scaling(b: &DeployWorkerRequest, scaled: bool) -> Result<(u32, u32), Problem> {
    let (target, quiet) = (b.target_backlog_per_replica, b.scale_down_after_seconds);
    if !scaled {
        if target != 0 || quiet != 0 {
            return Err(Problem::bad_request(
                "`target_backlog_per_replica` and `scale_down_after_seconds` need `min_replicas` < `max_replicas` (a scaled deployment)",
            ));
        }
        return Ok((0, 0));
    }
    if target > 100_000 {
        return Err(Problem::bad_request(format!(
            "`target_backlog_per_replica` must be at most 100000 (got {target})"
        )));
    }
    if quiet > 86_400 {
        return Err(Problem::bad_request(format!(
            "`scale_down_after_seconds` must be at most 86400 (got {quiet})"
        )));
    }
    Ok((
        if target == 0 {
            DEFAULT_TARGET_BACKLOG
        } else {
            target
        },
        if quiet == 0 {
            DEFAULT_SCALE_DOWN_AFTER_SECONDS
        } else {
            quiet
        },
    ))
}

/// `replicas` within a deployment's bounds.
pub fn check_replicas(replicas: u32, min: u32, max: u32) -> Result<(), Problem> {
    if replicas < min || replicas > max {
        return Err(Problem::bad_request(format!(
            "`replicas` ({replicas}) must be between `min_replicas` ({min}) and `max_replicas` ({max})"
        )));
    }
    Ok(())
}

/// The spec without its replica counts: what a change of rolls the replicas.
pub fn template(s: &DeployWorkerRequest) -> DeployWorkerRequest {
    DeployWorkerRequest {
        replicas: 0,
        min_replicas: 0,
        max_replicas: 0,
        target_backlog_per_replica: 0,
        scale_down_after_seconds: 0,
        ..s.clone()
    }
}

/// The container of replica `index` of a deployment.
pub fn replica(
    d: &WorkerDeployment,
    index: u32,
    policy: &Policy,
) -> Result<ContainerSpec, Problem> {
    let spec = d.spec.clone().unwrap_or_default();
    let mut c = container(&spec, index, d.generation, &d.created_by, policy)?;
    c.labels.insert(LABEL_DEPLOYMENT.into(), d.uid.clone());
    Ok(c)
}

fn container(
    s: &DeployWorkerRequest,
    index: u32,
    generation: u32,
    created_by: &str,
    policy: &Policy,
) -> Result<ContainerSpec, Problem> {
    let short = uuid::Uuid::new_v4().simple().to_string();
    let (_, p) = profile(&s.profile, policy)?;
    let create = CreateContainerRequest {
        image: s.image.clone(),
        name: format!("tether-worker-{}-{index}-{}", s.name, &short[..8]),
        kind: Kind::Worker.as_str().into(),
        env: s.env.clone(),
        command: s.command.clone(),
        resource_limits: s.resource_limits,
        mounts: s.mounts.clone(),
        ..Default::default()
    };
    let now = chrono::Utc::now();
    let mut c = validate_create_in(&create, "", created_by, policy, now, &p.allowed_mounts)?;
    apply_profile(&mut c, &p, policy)?;
    c.env.push(format!("TETHER_WORKER={}", s.name));
    c.env.push(format!("TETHER_WORKER_REPLICA={index}"));
    // Names the instance (the worker libraries put it in what they report).
    c.env.push(format!("TETHER_WORKER_NAME={}", c.name));
    c.env.push(format!("TETHER_AGENT_ID={}", s.agent_id));
    // The path only: the token itself is written into the volume (`credentials`).
    c.env.push(format!("TETHER_TOKEN_FILE={TOKEN_PATH}"));
    if !p.env_file.is_empty() {
        // The path only: the values are written into the volume (`credentials::write_env`).
        c.env.push(format!("TETHER_ENV_FILE={ENV_PATH}"));
    }
    c.secret_dir = Some(TOKEN_DIR.into());
    c.labels.insert(LABEL_WORKER.into(), s.name.clone());
    c.labels.insert(LABEL_REPLICA.into(), index.to_string());
    c.labels
        .insert(LABEL_GENERATION.into(), generation.to_string());
    Ok(c)
}

/// The profile's fixed mounts, extra hosts and network on a replica's container (all checked
/// at config load).
fn apply_profile(c: &mut ContainerSpec, p: &Profile, policy: &Policy) -> Result<(), Problem> {
    // The request's mounts may not hide the secret volume.
    if let Some(m) = c.mounts.iter().find(|m| {
        m.target == TOKEN_DIR
            || m.target.starts_with(&format!("{TOKEN_DIR}/"))
            || TOKEN_DIR.starts_with(&format!("{}/", m.target))
    }) {
        return Err(Problem::bad_request(format!(
            "`mounts.target` {:?} may not be or hold {TOKEN_DIR}",
            m.target
        )));
    }
    for m in &p.mounts {
        let target = m.target.trim_end_matches('/').to_string();
        if c.mounts.iter().any(|x| x.target == target) || c.writable_paths.contains(&target) {
            return Err(Problem::bad_request(format!(
                "`mounts.target` {target:?} is already a mount of the profile"
            )));
        }
        c.mounts.push(BindMount {
            source: m.source.trim_end_matches('/').to_string(),
            target,
            writable: m.mode == MountMode::Rw,
        });
    }
    if !p.network.is_empty() {
        c.network_mode = p.network.clone();
    }
    let mut hosts = validate_extra_hosts(&p.extra_hosts)?;
    add_gateway_host(&mut hosts, &c.network_mode, &policy.container_nats_url);
    c.extra_hosts = hosts;
    Ok(())
}

/// Slots for `replicas` replicas: slot i keeps its host unless that host is `gone`; a new
/// slot, or one whose host is gone, goes to the candidate (live hosts with the image, in
/// placement order) holding the fewest slots of this deployment, the first of them on a tie.
/// `None` when a slot needs a host and there is no candidate.
pub fn assign(
    current: &[WorkerSlot],
    replicas: u32,
    candidates: &[String],
    gone: impl Fn(&str) -> bool,
) -> Option<Vec<WorkerSlot>> {
    let held: HashMap<u32, &str> = current
        .iter()
        .map(|s| (s.index, s.host_id.as_str()))
        .collect();
    let mut out: Vec<WorkerSlot> = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut open = Vec::new();
    for index in 0..replicas {
        match held.get(&index) {
            Some(h) if !gone(h) => {
                *count.entry((*h).to_string()).or_default() += 1;
                out.push(WorkerSlot {
                    index,
                    host_id: (*h).to_string(),
                });
            }
            _ => open.push(index),
        }
    }
    for index in open {
        let host = candidates
            .iter()
            .min_by_key(|c| count.get(*c).copied().unwrap_or(0))?
            .clone();
        *count.entry(host.clone()).or_default() += 1;
        out.push(WorkerSlot {
            index,
            host_id: host,
        });
    }
    out.sort_by_key(|s| s.index);
    Some(out)
}

#[cfg(test)]
mod tests;
