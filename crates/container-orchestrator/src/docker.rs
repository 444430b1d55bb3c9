//! The Docker engine, through bollard — the only place in tether that talks to it.
//!
//! Two rules are enforced here rather than by callers: every container is created from a
//! validated [`ContainerSpec`] with the hardened host config (all capabilities dropped,
//! `no-new-privileges`, memory/CPU/pids limits always set, never privileged, bounded logs),
//! and only containers labelled `tether.managed=true` *and* `tether.host=<this host>` are
//! ever listed, inspected for callers, stopped or removed; anything else on the engine is
//! "not found" to the node.
//!
//! Engine failures become an [`EngineError`] with a small kind, mapped to one status code
//! in one place (`From<EngineError> for Problem`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, HostConfig,
    HostConfigLogConfig, Mount, MountType, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptions, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use tether_bus::Problem;

use crate::config::OrchestratorConfig;
use crate::labels::{
    LABEL_DAEMON, LABEL_HOST, LABEL_KIND, LABEL_MANAGED, LABEL_POOL, LABEL_SESSION, LABEL_SPACE,
    space_of,
};
use crate::spec::ContainerSpec;

pub mod files;
mod info;
mod taken;

pub use info::{info_from_inspect, info_from_summary, summary_name};

const MIB: i64 = 1024 * 1024;

/// Why an engine call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    NotFound,
    Conflict,
    /// The engine refused the request as invalid.
    Refused,
    Unavailable,
    Timeout,
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: EngineErrorKind,
    message: String,
}

impl EngineError {
    pub fn new(kind: EngineErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> EngineErrorKind {
        self.kind
    }
}

impl From<bollard::errors::Error> for EngineError {
    fn from(e: bollard::errors::Error) -> Self {
        use bollard::errors::Error as B;
        match e {
            B::DockerResponseServerError {
                status_code,
                message,
            } => {
                let kind = match status_code {
                    404 => EngineErrorKind::NotFound,
                    409 => EngineErrorKind::Conflict,
                    400 | 422 => EngineErrorKind::Refused,
                    _ if message.contains("is not running") || message.contains("is paused") => {
                        EngineErrorKind::Conflict
                    }
                    _ => EngineErrorKind::Other,
                };
                EngineError::new(kind, message)
            }
            B::RequestTimeoutError => EngineError::new(
                EngineErrorKind::Timeout,
                "the Docker engine did not answer in time",
            ),
            e @ (B::IOError { .. }
            | B::HyperResponseError { .. }
            | B::HyperLegacyError { .. }
            | B::SocketNotFoundError(_)) => EngineError::new(
                EngineErrorKind::Unavailable,
                format!("the Docker engine is unavailable: {e}"),
            ),
            other => EngineError::new(EngineErrorKind::Other, other.to_string()),
        }
    }
}

impl From<EngineError> for Problem {
    fn from(e: EngineError) -> Problem {
        match e.kind {
            EngineErrorKind::NotFound => Problem::not_found(e.message),
            EngineErrorKind::Conflict => Problem::conflict(e.message),
            EngineErrorKind::Refused => {
                Problem::unprocessable(format!("the engine refused: {}", e.message))
            }
            EngineErrorKind::Unavailable => Problem::unavailable(e.message),
            EngineErrorKind::Timeout => Problem::timeout(e.message),
            EngineErrorKind::Other => Problem::new(502, format!("engine error: {}", e.message)),
        }
    }
}

/// The identity of a managed container, cached: its labels never change; its name and limits
/// change only when a pool container is taken (`taken`), which drops it from the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub name: String,
    pub space: String,
    pub session_id: String,
    pub kind: String,
    pub image: String,
    /// The memory limit, MiB (always set on a managed container).
    pub memory_mb: i64,
    /// The space daemon's volume (`tether.daemon` label): empty when the container has no
    /// space daemon as its init.
    pub daemon: String,
    /// Made for a warm pool (`tether.pool`): its space's environment is in its bind file.
    pub pool: bool,
}

/// Cached identities, by id and by name; bounded, and forgotten on `destroy`/`rename`.
#[derive(Default)]
struct MetaCache {
    map: HashMap<String, Arc<Meta>>,
}

const META_CACHE_MAX: usize = 8192;

/// The engine, scoped to this host's managed containers.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    host_id: Arc<str>,
    cache: Arc<Mutex<MetaCache>>,
}

impl Engine {
    /// Connects (`docker_host`, else `DOCKER_HOST` or the local socket) and negotiates the
    /// API version down to what the engine speaks.
    pub async fn connect(docker_host: &str, host_id: &str) -> anyhow::Result<Engine> {
        let docker = if docker_host.is_empty() {
            Docker::connect_with_local_defaults()
        } else {
            Docker::connect_with_host(docker_host)
        }
        .map_err(|e| anyhow::anyhow!("cannot reach the Docker engine: {e}"))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the Docker engine: {e}"))?;
        Ok(Engine {
            docker,
            host_id: Arc::from(host_id),
            cache: Arc::default(),
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// CPUs and memory (MiB) of the engine's host.
    pub async fn host_resources(&self) -> Result<(f64, i64), EngineError> {
        let info = self.docker.info().await?;
        let cpus = info.ncpu.unwrap_or(1).max(1) as f64;
        let mem = info.mem_total.unwrap_or(i64::MAX) / MIB;
        Ok((cpus, mem))
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, EngineError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = EngineError::from(e);
                if e.kind == EngineErrorKind::NotFound {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Every name the engine's images answer to: repository tags, digests and ids.
    pub async fn image_refs(&self) -> Result<Vec<String>, EngineError> {
        let list = self.docker.list_images(None::<ListImagesOptions>).await?;
        Ok(list
            .into_iter()
            .flat_map(|i| {
                let named = i.repo_tags.into_iter().chain(i.repo_digests);
                named
                    .filter(|r| !r.starts_with("<none>"))
                    .chain(std::iter::once(i.id))
            })
            .collect())
    }

    fn is_ours(&self, labels: Option<&HashMap<String, String>>) -> bool {
        labels.is_some_and(|l| {
            l.get(LABEL_MANAGED).is_some_and(|v| v == "true")
                && l.get(LABEL_HOST).is_some_and(|v| *v == *self.host_id)
        })
    }

    fn not_managed(&self, what: &str) -> EngineError {
        EngineError::new(
            EngineErrorKind::NotFound,
            format!("no managed container `{what}` on host `{}`", self.host_id),
        )
    }

    /// Inspects a container and checks it is one of ours (anything else is "not found").
    pub async fn inspect_managed(
        &self,
        id_or_name: &str,
    ) -> Result<(Arc<Meta>, ContainerInspectResponse), EngineError> {
        self.inspect_managed_with(id_or_name, false).await
    }

    pub async fn inspect_managed_with(
        &self,
        id_or_name: &str,
        size: bool,
    ) -> Result<(Arc<Meta>, ContainerInspectResponse), EngineError> {
        let opts = InspectContainerOptionsBuilder::default().size(size).build();
        let c = match self.docker.inspect_container(id_or_name, Some(opts)).await {
            Ok(c) => c,
            Err(e) => {
                let e = EngineError::from(e);
                if e.kind == EngineErrorKind::NotFound {
                    self.forget(id_or_name);
                    return Err(self.not_managed(id_or_name));
                }
                return Err(e);
            }
        };
        let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
        if !self.is_ours(labels) {
            return Err(self.not_managed(id_or_name));
        }
        let l = labels.cloned().unwrap_or_default();
        let name = c
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/');
        let meta = Arc::new(Meta {
            id: c.id.clone().unwrap_or_default(),
            name: name.to_string(),
            space: space_of(&l, name),
            session_id: l.get(LABEL_SESSION).cloned().unwrap_or_default(),
            kind: l.get(LABEL_KIND).cloned().unwrap_or_default(),
            image: c
                .config
                .as_ref()
                .and_then(|c| c.image.clone())
                .unwrap_or_default(),
            memory_mb: c.host_config.as_ref().and_then(|h| h.memory).unwrap_or(0) / MIB,
            daemon: l.get(LABEL_DAEMON).cloned().unwrap_or_default(),
            pool: l.contains_key(LABEL_POOL),
        });
        self.remember(&meta);
        Ok((meta, c))
    }

    /// The identity of a managed container, from the cache when known.
    pub async fn managed(&self, id_or_name: &str) -> Result<Arc<Meta>, EngineError> {
        let key = id_or_name.trim_start_matches('/');
        if let Some(m) = self.cached(key) {
            return Ok(m);
        }
        Ok(self.inspect_managed(key).await?.0)
    }

    fn cached(&self, key: &str) -> Option<Arc<Meta>> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.map.get(key).cloned()
    }

    fn remember(&self, m: &Arc<Meta>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.len() >= META_CACHE_MAX {
            c.map.clear();
        }
        c.map.insert(m.id.clone(), m.clone());
        c.map.insert(m.name.clone(), m.clone());
    }

    /// Drops a container (by id or name) from the cache, with its other key.
    pub fn forget(&self, id_or_name: &str) {
        let key = id_or_name.trim_start_matches('/');
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = c.map.remove(key) {
            c.map.remove(&m.id);
            c.map.remove(&m.name);
        }
        // A short id may have been used: drop entries whose id starts with it.
        if key.len() >= 12 && key.chars().all(|ch| ch.is_ascii_hexdigit()) {
            c.map.retain(|_, m| !m.id.starts_with(key));
        }
    }

    /// This host's managed containers, optionally filtered by space, session and kind.
    pub async fn list_managed(
        &self,
        space: &str,
        session: &str,
        kind: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        let mut labels = vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_HOST}={}", self.host_id),
        ];
        for (k, v) in [(LABEL_SESSION, session), (LABEL_KIND, kind)] {
            if !v.is_empty() {
                labels.push(format!("{k}={v}"));
            }
        }
        if space.is_empty() {
            return self.list_labelled(labels, None).await;
        }
        // A space's containers: its label's, and the pool containers taken for it (named).
        let mut pooled = labels.clone();
        pooled.push(LABEL_POOL.to_string());
        labels.push(format!("{LABEL_SPACE}={space}"));
        let mut list = self.list_labelled(labels, None).await?;
        let name = format!(
            "^/{}{space}\\.",
            crate::labels::POOL_TAKEN_PREFIX.replace('.', "\\.")
        );
        let taken = self.list_labelled(pooled, Some(name)).await?;
        list.extend(taken.into_iter().filter(|c| {
            let l = c.labels.clone().unwrap_or_default();
            space_of(&l, &summary_name(c)) == space
        }));
        Ok(list)
    }

    /// This host's managed containers with every label of `labels` (and a name matching the
    /// engine's regular expression `name`).
    async fn list_labelled(
        &self,
        labels: Vec<String>,
        name: Option<String>,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        let mut filters = HashMap::from([("label".to_string(), labels)]);
        if let Some(n) = name {
            filters.insert("name".to_string(), vec![n]);
        }
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.docker.list_containers(Some(opts)).await?;
        // The engine filtered already; checking again costs nothing and keeps the rule local.
        Ok(list
            .into_iter()
            .filter(|c| self.is_ours(c.labels.as_ref()))
            .collect())
    }

    /// Creates a container from a validated spec with the hardened host config.
    pub async fn create(
        &self,
        spec: &ContainerSpec,
        cfg: &OrchestratorConfig,
    ) -> Result<String, EngineError> {
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let r = self
            .docker
            .create_container(Some(opts), create_body(spec, cfg))
            .await?;
        Ok(r.id)
    }

    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        Ok(self.docker.start_container(id, None).await?)
    }

    pub async fn stop(&self, id: &str, grace_seconds: i32) -> Result<(), EngineError> {
        let opts = StopContainerOptionsBuilder::default()
            .t(grace_seconds)
            .build();
        Ok(self.docker.stop_container(id, Some(opts)).await?)
    }

    /// Kills (if running) and removes, with anonymous volumes. Gone already counts as done.
    pub async fn remove(&self, id: &str) -> Result<(), EngineError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let r = self.docker.remove_container(id, Some(opts)).await;
        self.forget(id);
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = EngineError::from(e);
                match e.kind {
                    EngineErrorKind::NotFound => Ok(()),
                    // "removal already in progress"
                    EngineErrorKind::Conflict if e.message.contains("in progress") => Ok(()),
                    _ => Err(e),
                }
            }
        }
    }
}

/// A container's logs as (stdout, stderr, truncated), the newest output kept within `cap`
/// bytes of both together. Logs come oldest first: each buffer is bounded to twice the cap
/// while reading, then cut to the cap (stderr keeps at least half of it when both overflow).
/// A read that takes over 30 s ends with what arrived, marked truncated.
pub async fn read_logs(
    docker: &Docker,
    id: &str,
    opts: bollard::query_parameters::LogsOptions,
    cap: usize,
) -> Result<(String, String, bool), EngineError> {
    use futures::StreamExt;
    let cap = cap.max(1);
    let mut stream = docker.logs(id, Some(opts));
    let (mut out, mut err) = (Vec::<u8>::new(), Vec::<u8>::new());
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut dropped = false;
        while let Some(item) = stream.next().await {
            let (buf, msg) = match item.map_err(EngineError::from)? {
                bollard::container::LogOutput::StdErr { message } => (&mut err, message),
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => (&mut out, message),
                bollard::container::LogOutput::StdIn { .. } => continue,
            };
            buf.extend_from_slice(&msg);
            if buf.len() > 2 * cap {
                let cut = buf.len() - cap;
                buf.drain(..cut);
                dropped = true;
            }
        }
        Ok::<bool, EngineError>(dropped)
    })
    .await;
    let mut truncated = match read {
        Ok(r) => r?,
        Err(_) => true,
    };
    if out.len() + err.len() > cap {
        truncated = true;
        let keep_err = err.len().min((cap / 2).max(cap.saturating_sub(out.len())));
        let keep_out = (cap - keep_err).min(out.len());
        out.drain(..out.len().saturating_sub(keep_out));
        err.drain(..err.len().saturating_sub(keep_err));
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        truncated,
    ))
}

/// The engine's create body for a spec: the hardened defaults live here.
pub fn create_body(spec: &ContainerSpec, cfg: &OrchestratorConfig) -> ContainerCreateBody {
    let memory = i64::from(spec.memory_mb) * MIB;
    let tmpfs: HashMap<String, String> = spec
        .writable_paths
        .iter()
        .map(|p| {
            (
                p.clone(),
                format!(
                    "rw,exec,nosuid,nodev,size={}m,mode=1777",
                    cfg.tmpfs_size_mb
                        .min(u32::try_from(spec.memory_mb).unwrap_or(u32::MAX))
                ),
            )
        })
        .collect();
    let mut mounts: Vec<Mount> = spec
        .mounts
        .iter()
        .map(|m| Mount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(!m.writable),
            ..Default::default()
        })
        .collect();
    mounts.extend(spec.secret_dir.as_deref().map(files::secret_dir_mount));
    if let Some(d) = &spec.daemon {
        mounts.push(Mount {
            target: Some(d.dir.clone()),
            source: Some(d.volume.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let host = HostConfig {
        memory: Some(memory),
        // Equal to memory: no swap on top.
        memory_swap: Some(memory),
        nano_cpus: Some((spec.cpu_limit * 1e9).round() as i64),
        pids_limit: Some(i64::from(spec.pids_limit)),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(Vec::new()),
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(spec.read_only_root),
        tmpfs: Some(tmpfs),
        mounts: Some(mounts),
        network_mode: Some(spec.network_mode.clone()),
        extra_hosts: Some(spec.extra_hosts.clone()),
        // The space daemon is the init where it runs (it reaps every child).
        init: Some(cfg.use_init && spec.daemon.is_none()),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), cfg.log_max_size.clone()),
                ("max-file".to_string(), cfg.log_max_files.max(1).to_string()),
            ])),
        }),
        ..Default::default()
    };
    // With the daemon, the image's entrypoint and the command are its arguments already.
    let (entrypoint, cmd) = match &spec.daemon {
        Some(d) => (Some(d.entrypoint.clone()), None),
        None => (None, spec.cmd.clone()),
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint,
        cmd,
        env: Some(spec.env.clone()),
        working_dir: spec.workdir.clone(),
        labels: Some(spec.labels.clone()),
        stop_timeout: Some(i64::from(cfg.stop_grace_seconds)),
        host_config: Some(host),
        ..Default::default()
    }
}

/// A stats reading as the `containers.stats` reply (CPU as `docker stats` computes it, memory
/// without the reclaimable page cache).
pub fn stats_of(
    m: &Meta,
    s: &bollard::models::ContainerStatsResponse,
    size_rw: i64,
) -> tether_proto::ContainerStats {
    use tether_proto::ContainerStats;
    let cpu = s.cpu_stats.as_ref();
    let pre = s.precpu_stats.as_ref();
    let total = |c: Option<&bollard::models::ContainerCpuStats>| {
        c.and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0)
    };
    let system = |c: Option<&bollard::models::ContainerCpuStats>| {
        c.and_then(|c| c.system_cpu_usage).unwrap_or(0)
    };
    let online = cpu.and_then(|c| c.online_cpus).unwrap_or(1).max(1);
    let cpu_delta = total(cpu).saturating_sub(total(pre)) as f64;
    let sys_delta = system(cpu).saturating_sub(system(pre)) as f64;
    let cpu_percent = if sys_delta > 0.0 {
        cpu_delta / sys_delta * f64::from(online) * 100.0
    } else {
        0.0
    };
    let mem = s.memory_stats.as_ref();
    let usage = mem.and_then(|m| m.usage).unwrap_or(0);
    // Page cache is reclaimable: subtract it as `docker stats` does.
    let cache = mem
        .and_then(|m| m.stats.as_ref())
        .and_then(|st| st.get("total_inactive_file").or(st.get("inactive_file")))
        .copied()
        .unwrap_or(0);
    let used = usage.saturating_sub(cache);
    let limit = mem.and_then(|m| m.limit).unwrap_or(0);
    let (rx, tx) = s
        .networks
        .as_ref()
        .map(|n| {
            n.values().fold((0u64, 0u64), |(r, t), v| {
                (r + v.rx_bytes.unwrap_or(0), t + v.tx_bytes.unwrap_or(0))
            })
        })
        .unwrap_or((0, 0));
    let (br, bw) = s
        .blkio_stats
        .as_ref()
        .and_then(|b| b.io_service_bytes_recursive.as_ref())
        .map(|entries| {
            entries.iter().fold((0u64, 0u64), |(r, w), e| {
                match e.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    Some("read") => (r + e.value.unwrap_or(0), w),
                    Some("write") => (r, w + e.value.unwrap_or(0)),
                    _ => (r, w),
                }
            })
        })
        .unwrap_or((0, 0));
    ContainerStats {
        container_id: m.id.clone(),
        container_name: m.name.clone(),
        cpu_percent,
        cpu_total_ns: total(cpu),
        online_cpus: online,
        memory_usage_bytes: used,
        memory_limit_bytes: limit,
        memory_percent: if limit > 0 {
            used as f64 / limit as f64 * 100.0
        } else {
            0.0
        },
        pids_current: s.pids_stats.as_ref().and_then(|p| p.current).unwrap_or(0),
        pids_limit: s.pids_stats.as_ref().and_then(|p| p.limit).unwrap_or(0),
        network_rx_bytes: rx,
        network_tx_bytes: tx,
        block_read_bytes: br,
        block_write_bytes: bw,
        disk_rw_bytes: size_rw,
        read_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Policy, validate_create};

    #[test]
    fn create_body_is_hardened() {
        let policy = Policy {
            cfg: OrchestratorConfig::default(),
            host_id: "h".into(),
            host_cpus: 2.0,
            host_memory_mb: 4096,
            container_nats_url: "nats://host.docker.internal:4222".into(),
            subject_prefix: None,
        };
        let req = tether_proto::CreateContainerRequest {
            image: "img".into(),
            ..Default::default()
        };
        let spec = validate_create(&req, "s", "a", &policy, chrono::Utc::now()).expect("spec");
        let b = create_body(&spec, &policy.cfg);
        let h = b.host_config.expect("host config");
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(h.memory, Some(512 * MIB));
        assert_eq!(h.memory_swap, h.memory);
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        assert_eq!(h.pids_limit, Some(256));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert!(h.tmpfs.expect("tmpfs").contains_key("/tmp"));
        assert_eq!(h.init, Some(true));
        assert_eq!(b.labels.expect("labels")[LABEL_MANAGED], "true");
    }
}
