//! The orchestrator's own settings (top level of `tether.toml`, or `TETHER_<KEY>`), and the
//! checks that turn them into the values the node runs with.
//!
//! Every limit has a default (used when a request leaves it at 0) and a maximum (a request
//! above it is refused with 400); the engine's own bounds (host CPUs and memory) cap the
//! maximums further when the node starts. Bind mounts are refused unless their host path lies
//! under an `allowed_mounts` entry of the profile in use — the operator's allowlist, where
//! `{space}` stands for the requesting space.
//!
//! Run-profiles are `[profiles.<name>]` tables ([`Profile`]; checked by the `profiles` module,
//! which says what they are for). Migration: the
//! top-level `allowed_mounts` of earlier versions is still read, as
//! `[profiles.default].allowed_mounts` (both lists count); move it there, since `default` is
//! what `containers.create` and worker deployments without a profile use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happens to a managed space container found with no binding in KV.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnboundPolicy {
    /// Record a binding for it (its space had none).
    #[default]
    Adopt,
    /// Stop and remove it.
    Remove,
}

/// The profile that always exists: the hardened defaults.
pub const DEFAULT_PROFILE: &str = "default";

/// How a fixed mount is mounted.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MountMode {
    #[default]
    Ro,
    Rw,
}

/// A bind mount every replica of the profile gets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProfileMount {
    /// Absolute host path.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    #[serde(default)]
    pub mode: MountMode,
}

/// Default limits of a profile's replicas (0 = the node's default).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileLimits {
    pub memory_mb: i32,
    pub cpu_limit: f64,
    pub pids_limit: i32,
}

/// One `[profiles.<name>]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    pub mounts: Vec<ProfileMount>,
    /// Host paths a request may add mounts from.
    pub allowed_mounts: Vec<AllowedMount>,
    /// `name:IP` or `name:host-gateway`.
    pub extra_hosts: Vec<String>,
    /// none, bridge, or an operator network's name; empty = the node's `space_network_mode`.
    pub network: String,
    /// A file of `KEY=VALUE` lines given to every replica as `/run/tether/env`.
    pub env_file: String,
    pub resource_limits: ProfileLimits,
}

/// One host path (or folder) bind mounts may come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllowedMount {
    /// Absolute host path; `{space}` is replaced by the requesting space.
    pub path: String,
    /// Whether a request may mount it read-write (it is read-only unless the request asks).
    #[serde(default)]
    pub writable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OrchestratorConfig {
    /// This Docker host's id in subjects (`hosts.<host_id>.containers.*`), labels and
    /// bindings. Empty = the machine's hostname. One orchestrator per engine and host id.
    pub host_id: String,
    /// Docker endpoint (`unix:///var/run/docker.sock`, `tcp://…`); empty = `DOCKER_HOST` or
    /// the local socket.
    pub docker_host: String,
    /// KV bucket of space bindings (space → host, container).
    pub spaces_bucket: String,
    /// KV bucket of host records (every orchestrator's heartbeat and capacity).
    pub hosts_bucket: String,
    /// How often this node rewrites its host record and reads the others'.
    pub host_heartbeat_ms: u64,
    /// A host whose record has not changed for this long is unavailable: its spaces are
    /// answered 503 and nothing new is placed on it. The same on every host of a fleet.
    pub host_dead_after_ms: u64,
    /// Memory (MiB) this host offers to tether containers, which placement compares hosts
    /// by; 0 = the engine's total. Set it lower on a host shared with other work.
    pub capacity_memory_mb: u32,
    pub kv_replicas: usize,
    /// `TETHER_NATS_URL` given to containers. Empty = the node's own bus URL with loopback
    /// hosts replaced by `host.docker.internal` (mapped to the host gateway).
    pub container_nats_url: String,

    pub default_memory_mb: i32,
    pub max_memory_mb: i32,
    pub default_cpu_limit: f64,
    pub max_cpu_limit: f64,
    pub default_pids_limit: i32,
    pub max_pids_limit: i32,
    /// Lifetime of a container when the request names none (`tether.expires`).
    pub default_ttl_seconds: i32,
    pub max_ttl_seconds: i32,
    /// Network of space containers when the request names none.
    pub space_network_mode: String,
    /// Network of tool and relic containers when the request names none.
    pub tool_network_mode: String,
    /// Networks a `containers.create` may name besides none, bridge and the two defaults
    /// above (names exactly; the engine's ids and id prefixes are never accepted).
    pub allowed_networks: Vec<String>,
    /// Session networks a space may hold on one host at once (each takes a subnet from the
    /// engine's address pools, which hold about thirty by default).
    pub max_sessions_per_space: usize,
    /// Size of each writable (tmpfs) path.
    pub tmpfs_size_mb: u32,
    /// Kept for earlier configurations: read as `[profiles.default].allowed_mounts`.
    pub allowed_mounts: Vec<AllowedMount>,
    /// Run-profiles by name (`[profiles.<name>]`); `default` exists even when not listed.
    pub profiles: BTreeMap<String, Profile>,
    pub unbound_policy: UnboundPolicy,
    /// Run the engine's init (tini) as PID 1, so killed commands' orphans are reaped.
    pub use_init: bool,
    /// Command of a space container when the request names none: stays up, stops on SIGTERM.
    pub idle_command: Vec<String>,
    /// json-file log rotation of every container.
    pub log_max_size: String,
    pub log_max_files: u32,
    pub stop_grace_seconds: i32,

    pub exec_default_timeout_seconds: f64,
    pub exec_max_timeout_seconds: f64,
    pub exec_default_output_bytes: i32,
    /// Also capped by the bus's max payload (the reply must fit in one message).
    pub exec_max_output_bytes: i32,
    /// Execs served at once by this node (more wait in the subscription).
    pub max_concurrent_execs: usize,
    /// How often the janitor removes expired containers, reconciles and reaps.
    pub janitor_interval_seconds: u64,
    /// Reconcile leaves bindings and containers younger than this alone (a create may be in
    /// flight between the engine call and the KV write).
    pub reconcile_grace_seconds: u64,

    /// KV bucket of tool runs (`exec.<id>`) and idempotency keys (`idem.<space>.<key>`).
    pub tool_results_bucket: String,
    /// How long a run's record (and an idempotency key) is kept.
    pub tool_results_ttl_seconds: u64,
    /// JetStream stream of async tool jobs (`jobs.tools.>`).
    pub tool_jobs_stream: String,
    /// Async jobs this node runs at once (0 = this node takes no jobs).
    pub tool_workers: usize,
    /// Sync runs this node serves at once (more wait in the subscription).
    pub max_concurrent_tools: usize,
    /// Seconds the bus waits for a job's ack or progress note before another worker gets it.
    pub tool_job_ack_wait_seconds: u64,
    /// Deliveries of a job before the bus gives up on it.
    pub tool_job_max_deliver: i64,
    /// A run's deadline when the request names none, and the most it may name.
    pub tool_default_timeout_seconds: i32,
    pub tool_max_timeout_seconds: i32,
    /// KV bucket of sessions (expiry, closed), read by every orchestrator's janitor.
    pub sessions_bucket: String,

    /// KV bucket of worker deployments (the `workers` module), shared by every orchestrator.
    pub workers_bucket: String,
    /// The most replicas (and `max_replicas`) a worker deployment may ask for.
    pub max_worker_replicas: u32,
    /// Lifetime asked for each worker replica's token (`tokens.worker`; the permission node
    /// caps it); renewed at two thirds of it (the workers' `credentials` module).
    pub worker_token_ttl_seconds: u32,
    /// How often scaled deployments' backlogs are read and decided on (the workers' scale module).
    pub worker_scale_interval_ms: u64,
    /// The A2A gateway's work stream, whose `work_<agent>` consumers scaling reads (the
    /// gateway's `a2a_work_stream`).
    pub worker_work_stream: String,

    /// Put the space daemon (`tether-spaced`) into every new space container as its init and
    /// send `containers.exec` to it (the `daemon` module). Off: every exec uses the engine's
    /// exec API, as do containers made before. Also off when containers get no bus URL.
    pub space_daemon: bool,
    /// The daemon's static binary; empty = `tether-spaced` next to the orchestrator's own
    /// executable. Missing while `space_daemon` is on: a warning at start, and no daemon.
    pub space_daemon_binary: String,
    /// Lifetime asked for each daemon's token (`tokens.daemon`; the permission node may cap
    /// it); renewed at half of it.
    pub space_daemon_token_ttl_seconds: u32,

    /// Warm pools of never-used space containers (`[[pool]]`; the `pool` module): a
    /// `containers.create` whose spec matches one is served from it.
    pub pool: Vec<PoolConfig>,
}

/// One `[[pool]]`: what its containers are made as (a space container of this image, network
/// and limits, no mounts, no session) and how many are kept ready.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub image: String,
    /// Containers kept ready (1..=64).
    pub size: u32,
    /// Empty = `space_network_mode`.
    pub network_mode: String,
    /// 0 = the node's default. A create asking other limits is still served from the pool;
    /// the engine updates the taken container's limits.
    pub memory_mb: i32,
    pub cpu_limit: f64,
    pub pids_limit: i32,
}

/// Seconds a tool container outlives its deadline before the janitor may remove it (the
/// safety net when the node that ran it died).
pub const TOOL_LIFETIME_MARGIN_SECONDS: i32 = 120;

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            host_id: String::new(),
            docker_host: String::new(),
            spaces_bucket: "tether_spaces".into(),
            hosts_bucket: "tether_hosts".into(),
            host_heartbeat_ms: 2000,
            host_dead_after_ms: 6000,
            capacity_memory_mb: 0,
            kv_replicas: 1,
            container_nats_url: String::new(),
            default_memory_mb: 512,
            max_memory_mb: 65_536,
            default_cpu_limit: 1.0,
            max_cpu_limit: 64.0,
            default_pids_limit: 256,
            max_pids_limit: 32_768,
            default_ttl_seconds: 86_400,
            max_ttl_seconds: 30 * 86_400,
            space_network_mode: "bridge".into(),
            tool_network_mode: "none".into(),
            allowed_networks: Vec::new(),
            max_sessions_per_space: 8,
            tmpfs_size_mb: 256,
            allowed_mounts: Vec::new(),
            profiles: BTreeMap::new(),
            unbound_policy: UnboundPolicy::Adopt,
            use_init: true,
            idle_command: vec![
                "sh".into(),
                "-c".into(),
                "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
            ],
            log_max_size: "10m".into(),
            log_max_files: 3,
            stop_grace_seconds: 10,
            exec_default_timeout_seconds: 300.0,
            exec_max_timeout_seconds: 86_400.0,
            exec_default_output_bytes: 256 * 1024,
            exec_max_output_bytes: 8 * 1024 * 1024,
            max_concurrent_execs: 64,
            janitor_interval_seconds: 30,
            reconcile_grace_seconds: 60,
            tool_results_bucket: "tether_tool_results".into(),
            tool_results_ttl_seconds: 86_400,
            tool_jobs_stream: "TETHER_TOOL_JOBS".into(),
            tool_workers: 4,
            max_concurrent_tools: 32,
            tool_job_ack_wait_seconds: 30,
            tool_job_max_deliver: 5,
            tool_default_timeout_seconds: 300,
            tool_max_timeout_seconds: 3600,
            sessions_bucket: "tether_sessions".into(),
            workers_bucket: "tether_workers".into(),
            max_worker_replicas: 64,
            worker_token_ttl_seconds: 900,
            worker_scale_interval_ms: 2000,
            worker_work_stream: "A2A_WORK".into(),
            space_daemon: true,
            space_daemon_binary: String::new(),
            space_daemon_token_ttl_seconds: 600,
            pool: Vec::new(),
        }
    }
}

impl OrchestratorConfig {
    /// The profiles as configured, `default` always among them (with the top-level
    /// `allowed_mounts` alias merged in).
    pub fn effective_profiles(&self) -> BTreeMap<String, Profile> {
        let mut all = self.profiles.clone();
        let d = all.entry(DEFAULT_PROFILE.to_string()).or_default();
        let mut allowed = self.allowed_mounts.clone();
        allowed.append(&mut d.allowed_mounts);
        d.allowed_mounts = allowed;
        all
    }

    /// The mounts `containers.create` may ask for: the `default` profile's allowlist.
    pub fn default_allowed_mounts(&self) -> Vec<AllowedMount> {
        self.effective_profiles()
            .remove(DEFAULT_PROFILE)
            .map(|p| p.allowed_mounts)
            .unwrap_or_default()
    }
}

/// A configuration the node cannot run with (the binary exits 64).
#[derive(Debug, thiserror::Error)]
#[error("invalid orchestrator configuration: {0}")]
pub struct InvalidConfig(pub String);

impl OrchestratorConfig {
    /// The host id in use: the configured one (which must be a valid subject token) or the
    /// hostname made into one.
    pub fn resolved_host_id(&self) -> Result<String, InvalidConfig> {
        if !self.host_id.is_empty() {
            if !tether_bus::subject::is_valid_token(&self.host_id) {
                return Err(InvalidConfig(format!(
                    "host_id {:?} must be 1-128 characters of A-Z a-z 0-9 - _",
                    self.host_id
                )));
            }
            return Ok(self.host_id.clone());
        }
        let raw = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(sanitize_host_id(&raw))
    }

    /// Checks values that would otherwise fail at the first request, and gives the limits
    /// requests are checked against.
    pub fn validate(&self) -> Result<Limits, InvalidConfig> {
        self.resolved_host_id()?;
        let bad = |m: &str| Err(InvalidConfig(m.to_string()));
        if !tether_bus::subject::is_valid_token(&self.spaces_bucket)
            || !tether_bus::subject::is_valid_token(&self.hosts_bucket)
        {
            return bad("spaces_bucket and hosts_bucket must be valid bucket names");
        }
        if self.host_heartbeat_ms < 100 || self.host_dead_after_ms < 2 * self.host_heartbeat_ms {
            return bad(
                "host_heartbeat_ms must be at least 100 and host_dead_after_ms at least twice it",
            );
        }
        if self.default_memory_mb < 6 || self.default_memory_mb > self.max_memory_mb {
            return bad("default_memory_mb must be at least 6 and at most max_memory_mb");
        }
        if !(self.default_cpu_limit > 0.0 && self.default_cpu_limit <= self.max_cpu_limit) {
            return bad("default_cpu_limit must be positive and at most max_cpu_limit");
        }
        if self.default_pids_limit < 8 || self.default_pids_limit > self.max_pids_limit {
            return bad("default_pids_limit must be at least 8 and at most max_pids_limit");
        }
        if self.default_ttl_seconds <= 0 || self.default_ttl_seconds > self.max_ttl_seconds {
            return bad("default_ttl_seconds must be positive and at most max_ttl_seconds");
        }
        if !(self.exec_default_timeout_seconds > 0.0
            && self.exec_default_timeout_seconds <= self.exec_max_timeout_seconds)
        {
            return bad(
                "exec_default_timeout_seconds must be positive and at most exec_max_timeout_seconds",
            );
        }
        if self.exec_default_output_bytes <= 0
            || self.exec_default_output_bytes > self.exec_max_output_bytes
        {
            return bad(
                "exec_default_output_bytes must be positive and at most exec_max_output_bytes",
            );
        }
        if self.max_concurrent_execs == 0 || self.janitor_interval_seconds == 0 {
            return bad("max_concurrent_execs and janitor_interval_seconds must be at least 1");
        }
        for b in [
            &self.tool_results_bucket,
            &self.tool_jobs_stream,
            &self.sessions_bucket,
            &self.workers_bucket,
            &self.worker_work_stream,
        ] {
            if !tether_bus::subject::is_valid_token(b) {
                return Err(InvalidConfig(format!(
                    "bucket and stream names must be valid tokens (got {b:?})"
                )));
            }
        }
        if self.tool_default_timeout_seconds <= 0
            || self.tool_default_timeout_seconds > self.tool_max_timeout_seconds
        {
            return bad(
                "tool_default_timeout_seconds must be positive and at most tool_max_timeout_seconds",
            );
        }
        if self
            .tool_max_timeout_seconds
            .saturating_add(TOOL_LIFETIME_MARGIN_SECONDS)
            > self.max_ttl_seconds
        {
            // A tool container's expiry label would come before its deadline, and the
            // janitor would remove it mid-run.
            return Err(InvalidConfig(format!(
                "tool_max_timeout_seconds + {TOOL_LIFETIME_MARGIN_SECONDS} must be at most max_ttl_seconds"
            )));
        }
        if self.max_sessions_per_space == 0 {
            return bad("max_sessions_per_space must be at least 1");
        }
        if self.max_worker_replicas == 0 || self.max_worker_replicas > 1000 {
            return bad("max_worker_replicas must be between 1 and 1000");
        }
        if !(100..=600_000).contains(&self.worker_scale_interval_ms) {
            return bad("worker_scale_interval_ms must be between 100 and 600000");
        }
        if self.worker_token_ttl_seconds < 6 {
            return bad("worker_token_ttl_seconds must be at least 6");
        }
        if self.space_daemon_token_ttl_seconds < 6 {
            return bad("space_daemon_token_ttl_seconds must be at least 6");
        }
        for n in &self.allowed_networks {
            if n.is_empty()
                || n == "host"
                || n.contains(':')
                || n.starts_with(crate::labels::SESSION_NETWORK_PREFIX)
            {
                return Err(InvalidConfig(format!(
                    "allowed_networks entry {n:?}: host, container:… and session networks cannot be allowed"
                )));
            }
        }
        if self.max_concurrent_tools == 0
            || self.tool_job_ack_wait_seconds == 0
            || self.tool_job_max_deliver < 1
            || self.tool_results_ttl_seconds == 0
        {
            return bad(
                "max_concurrent_tools, tool_job_ack_wait_seconds, tool_job_max_deliver and tool_results_ttl_seconds must be at least 1",
            );
        }
        if self.idle_command.is_empty() {
            return bad("idle_command must not be empty");
        }
        for m in &self.allowed_mounts {
            if !m.path.starts_with('/') || m.path.split('/').any(|s| s == "..") {
                return Err(InvalidConfig(format!(
                    "allowed_mounts path {:?} must be absolute, without `..`",
                    m.path
                )));
            }
        }
        Ok(Limits::from_checked(self))
    }
}

/// The limits a request is checked against, made once from a checked configuration
/// ([`OrchestratorConfig::validate`]); what validation reads instead of the whole node.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub exec_default_timeout_seconds: f64,
    pub exec_max_timeout_seconds: f64,
    /// Output a request gets when it names no size, and the most it may ask for (at most
    /// what fits one bus message, see [`Limits::within_reply`]).
    pub default_output: usize,
    pub max_output: usize,
    pub stop_grace_seconds: i32,
    pub tool_default_timeout_seconds: i32,
    pub tool_max_timeout_seconds: i32,
    pub default_ttl_seconds: i32,
    pub max_ttl_seconds: i32,
}

impl Limits {
    /// The limits of a configuration already checked by [`OrchestratorConfig::validate`] (the
    /// one way they are made).
    fn from_checked(c: &OrchestratorConfig) -> Self {
        let max_output = usize::try_from(c.exec_max_output_bytes).unwrap_or(usize::MAX);
        Self {
            exec_default_timeout_seconds: c.exec_default_timeout_seconds,
            exec_max_timeout_seconds: c.exec_max_timeout_seconds,
            default_output: usize::try_from(c.exec_default_output_bytes)
                .unwrap_or(max_output)
                .min(max_output),
            max_output,
            stop_grace_seconds: c.stop_grace_seconds,
            tool_default_timeout_seconds: c.tool_default_timeout_seconds,
            tool_max_timeout_seconds: c.tool_max_timeout_seconds,
            default_ttl_seconds: c.default_ttl_seconds,
            max_ttl_seconds: c.max_ttl_seconds,
        }
    }

    /// The limits with output capped at `max_output` (what fits one reply on this bus).
    pub fn within_reply(mut self, max_output: usize) -> Self {
        self.max_output = self.max_output.min(max_output);
        self.default_output = self.default_output.min(self.max_output);
        self
    }
}

/// A hostname as a subject token: anything outside A-Z a-z 0-9 - _ becomes `-`.
pub fn sanitize_host_id(raw: &str) -> String {
    let s: String = raw
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() { "localhost".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        OrchestratorConfig::default().validate().expect("valid");
    }

    #[test]
    fn host_id_is_checked_or_derived() {
        let c = OrchestratorConfig {
            host_id: "bad.id".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert_eq!(sanitize_host_id("box.example.org"), "box-example-org");
        assert_eq!(sanitize_host_id(""), "localhost");
    }

    #[test]
    fn bad_limits_are_refused() {
        let c = OrchestratorConfig {
            default_memory_mb: 2,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = OrchestratorConfig {
            allowed_mounts: vec![AllowedMount {
                path: "relative".into(),
                writable: false,
            }],
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = OrchestratorConfig {
            tool_max_timeout_seconds: 3600,
            max_ttl_seconds: 3600,
            default_ttl_seconds: 60,
            ..Default::default()
        };
        assert!(
            c.validate().is_err(),
            "tool deadline past the container's expiry"
        );
        let c = OrchestratorConfig {
            allowed_networks: vec!["tether-session.s.x".into()],
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = OrchestratorConfig {
            host_heartbeat_ms: 1000,
            host_dead_after_ms: 1500,
            ..Default::default()
        };
        assert!(c.validate().is_err(), "dead after less than two beats");
        for (interval, stream) in [(50, "A2A_WORK"), (2000, "a.b")] {
            let c = OrchestratorConfig {
                worker_scale_interval_ms: interval,
                worker_work_stream: stream.into(),
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{interval} {stream}");
        }
    }
}
