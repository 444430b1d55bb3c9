//! Warm pools: never-used space containers made ahead of time (`[[pool]]` in the config), so
//! a `containers.create` whose spec matches one is a rename and a few writes instead of the
//! engine's create and start.
//!
//! - A pool's **key** is the hash of what a container is made as and cannot change later:
//!   image, command, workdir, network, extra hosts, read-only root, writable paths
//!   ([`shape_key`]). A request matches when its validated spec has that key and nothing a
//!   pool container cannot take later: no name of its own, no labels, no mounts, no session,
//!   started. Limits may differ (the engine updates them at bind time); environment may
//!   differ (it is delivered at bind time).
//! - A free pool container is a space container in no space: labelled `tether.pool=<key>`,
//!   no `tether.space`, named `tether-pool.<key>.<hex>`. Its space daemon (when on) is on the
//!   bus as the daemon of the pool space `tether-pool-<hex>` (`crate::labels::pool_space`; a
//!   `tokens.daemon` token like any daemon's, renewed like any; `agents.register` refuses
//!   such spaces, so no agent's space shares its subject), where it takes nothing but a bind,
//!   and it also watches for a bind file. The fill task (the `pool_fill` module) keeps `size` of them per pool,
//!   from the engine's list (the truth: after a restart the free ones found are the pool,
//!   extras and dead ones are removed), waits for each one's daemon to be on the bus, and
//!   counts how long a refill takes.
//! - Taking one (the `pool_take` module): the space is reserved in KV, the container renamed to
//!   `tether-space.<space>.<expiry>.<hex>` (the engine's record of its space from then on:
//!   `crate::labels::space_of`), bound in KV, its limits updated, and its daemon sent the
//!   bind over the bus (`Tether-Bind` request on its pool space: the space, the environment
//!   and the space's daemon token); it answers once it serves the space, and the create is
//!   answered then. The same bind is then written as files in the background (the token and
//!   `/run/tether/bind`, one archive write of ~50 ms that a restarted daemon reads). Without
//!   a daemon on the bus, the files are written first and the daemon waited for, as a cold
//!   create does. A container is taken once: the rename happens before any use, and a
//!   container not named free is never free again. Any failure removes it; no free container
//!   (a miss) creates as before.
//! - The bind file is also where the engine's exec path reads the space's environment from
//!   (cached by container id), so both exec paths give commands the same variables.
//!
//! Counters (hits, misses, refills and their time) are the `data` of the `containers-create`
//! endpoint in `$SRV.STATS`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_bus::Problem;
use tether_proto::{CreateContainerRequest, ResourceLimits};

use crate::config::PoolConfig;
use crate::labels::{LABEL_EXPIRES, LABEL_POOL, LABEL_SESSION, LABEL_SPACE, POOL_FREE_PREFIX};
use crate::spec::{ContainerSpec, Kind, Policy, validate_create};

/// The `$SRV.STATS` endpoint whose `data` are the pool's counters.
pub const STATS_ENDPOINT: &str = "containers-create";
/// Most pools, and most containers one pool keeps.
pub const MAX_POOLS: usize = 16;
pub const MAX_SIZE: u32 = 64;

/// One configured pool: its key and what its containers are made as.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: String,
    pub size: usize,
    /// A free container's spec but for its name.
    pub template: ContainerSpec,
}

/// The pools of this node and their free containers.
pub struct Pool {
    pub entries: Vec<Entry>,
    /// Free containers by key (ids), as the last fill pass and the takes left them.
    free: Mutex<HashMap<String, Vec<String>>>,
    /// Containers popped for a take (being taken, or taken): a fill pass that listed one
    /// before its rename never counts it free again. Dropped when the container is removed.
    used: Mutex<HashSet<String>>,
    /// The space environment of taken containers (their bind file), by id.
    env: Mutex<HashMap<String, Vec<String>>>,
    pub wake: tokio::sync::Notify,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    refills: AtomicU64,
    refill_ms_total: AtomicU64,
    refill_ms_last: AtomicU64,
    bus_binds: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// The pools of `policy`'s config (checked by [`check`] at start: an entry that does not
    /// validate now is left out with a warning).
    pub fn new(policy: &Policy) -> Pool {
        let entries = policy
            .cfg
            .pool
            .iter()
            .filter_map(|p| match template(p, policy) {
                Ok(t) => Some(Entry {
                    key: shape_key(&t),
                    size: p.size as usize,
                    template: t,
                }),
                Err(e) => {
                    tracing::warn!(image = %p.image, error = %e.detail, "pool left out");
                    None
                }
            })
            .collect();
        Pool {
            entries,
            free: Mutex::default(),
            used: Mutex::default(),
            env: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
        }
    }

    /// The pool a create request's validated `spec` can be served from, if any.
    pub fn matching(&self, req: &CreateContainerRequest, spec: &ContainerSpec) -> Option<&Entry> {
        let takeable = spec.kind == Kind::Space
            && spec.start
            && req.name.is_empty()
            && req.labels.is_empty()
            && req.session_id.is_empty()
            && spec.mounts.is_empty();
        if !takeable || self.entries.is_empty() {
            return None;
        }
        let key = shape_key(spec);
        self.entries.iter().find(|e| e.key == key)
    }

    /// A free container of pool `key` (marked as being taken), if there is one.
    pub fn pop(&self, key: &str) -> Option<String> {
        let id = lock(&self.free).get_mut(key)?.pop()?;
        lock(&self.used).insert(id.clone());
        self.wake.notify_one();
        Some(id)
    }

    pub fn is_used(&self, id: &str) -> bool {
        lock(&self.used).contains(id)
    }

    /// Puts back a container whose take did not start (its space could not be reserved).
    pub fn put_back(&self, key: &str, id: &str) {
        lock(&self.used).remove(id);
        lock(&self.free)
            .entry(key.to_string())
            .or_default()
            .push(id.to_string());
    }

    /// Replaces the free list of `key` (a fill pass, from the engine's list).
    pub(crate) fn set_free(&self, key: &str, ids: Vec<String>) {
        let used = lock(&self.used);
        let ids = ids.into_iter().filter(|i| !used.contains(i)).collect();
        lock(&self.free).insert(key.to_string(), ids);
    }

    pub(crate) fn add_free(&self, key: &str, id: String) {
        lock(&self.free)
            .entry(key.to_string())
            .or_default()
            .push(id);
    }

    pub fn free_count(&self, key: &str) -> usize {
        lock(&self.free).get(key).map_or(0, Vec::len)
    }

    /// The space environment of a taken container, when this process knows it.
    pub fn env_of(&self, id: &str) -> Option<Vec<String>> {
        lock(&self.env).get(id).cloned()
    }

    pub fn remember_env(&self, id: &str, env: Vec<String>) {
        let mut m = lock(&self.env);
        if m.len() >= 8192 {
            m.clear();
        }
        m.insert(id.to_string(), env);
    }

    /// A container was removed.
    pub fn forget(&self, id: &str) {
        lock(&self.env).remove(id);
        lock(&self.used).remove(id);
    }

    pub fn count_hit(&self, hit: bool) {
        let c = if hit {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A take bound its daemon over the bus (not through the files).
    pub(crate) fn count_bus_bind(&self) {
        self.counters.bus_binds.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_refill(&self, ms: u64) {
        let c = &self.counters;
        c.refills.fetch_add(1, Ordering::Relaxed);
        c.refill_ms_total.fetch_add(ms, Ordering::Relaxed);
        c.refill_ms_last.store(ms, Ordering::Relaxed);
    }

    /// The counters as `$SRV.STATS` data: creates served from a pool (`pool_hits`), creates
    /// that matched a pool with no free container (`pool_misses`), containers made to refill
    /// (`pool_refills`, with their total and last time in ms), the hits whose daemon was bound
    /// over the bus (`pool_bus_binds`; the others got their bind file first), and the free
    /// ones now.
    pub fn stats(&self) -> serde_json::Value {
        let c = &self.counters;
        let free: usize = lock(&self.free).values().map(Vec::len).sum();
        serde_json::json!({
            "pool_hits": c.hits.load(Ordering::Relaxed),
            "pool_misses": c.misses.load(Ordering::Relaxed),
            "pool_refills": c.refills.load(Ordering::Relaxed),
            "pool_refill_ms_total": c.refill_ms_total.load(Ordering::Relaxed),
            "pool_refill_ms_last": c.refill_ms_last.load(Ordering::Relaxed),
            "pool_bus_binds": c.bus_binds.load(Ordering::Relaxed),
            "pool_free": free,
        })
    }
}

/// What a pool's containers are made as: a space container validated like a request's, with
/// its space taken out (no `tether.space`, `tether.session`, `tether.expires`, no
/// `TETHER_SPACE`/`TETHER_SESSION`) and the pool label in.
pub fn template(p: &PoolConfig, policy: &Policy) -> Result<ContainerSpec, Problem> {
    let req = CreateContainerRequest {
        image: p.image.clone(),
        kind: Kind::Space.as_str().into(),
        network_mode: p.network_mode.clone(),
        resource_limits: Some(ResourceLimits {
            memory_mb: p.memory_mb,
            cpu_limit: p.cpu_limit,
            pids_limit: p.pids_limit,
            timeout_seconds: 0,
        }),
        ..Default::default()
    };
    let mut t = validate_create(&req, "pool", "pool", policy, chrono::Utc::now())?;
    let key = shape_key(&t);
    t.space.clear();
    for l in [LABEL_SPACE, LABEL_SESSION, LABEL_EXPIRES] {
        t.labels.remove(l);
    }
    t.env
        .retain(|e| !e.starts_with("TETHER_SPACE=") && !e.starts_with("TETHER_SESSION="));
    t.labels.insert(LABEL_POOL.into(), key);
    t.secret_dir = Some(crate::daemon::SECRET_DIR.into());
    Ok(t)
}

/// A free container's name in pool `key`.
pub fn free_name(key: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{POOL_FREE_PREFIX}{key}.{}", &hex[..12])
}

/// The hash (12 hex) of what a space container is made as and cannot change afterwards.
pub fn shape_key(s: &ContainerSpec) -> String {
    let mut extra_hosts = s.extra_hosts.clone();
    extra_hosts.sort();
    let mut writable = s.writable_paths.clone();
    writable.sort();
    let shape = serde_json::json!({
        "image": s.image,
        "cmd": s.cmd,
        "workdir": s.workdir,
        "network": s.network_mode,
        "extra_hosts": extra_hosts,
        "read_only_root": s.read_only_root,
        "writable_paths": writable,
    });
    let d = crate::daemon::sha256_hex(shape.to_string().as_bytes());
    d[..12].to_string()
}

/// Checks the `[[pool]]` entries of a configuration.
pub fn check(cfg: &crate::config::OrchestratorConfig) -> Result<(), crate::config::InvalidConfig> {
    let bad = |m: String| Err(crate::config::InvalidConfig(m));
    if cfg.pool.len() > MAX_POOLS {
        return bad(format!("at most {MAX_POOLS} [[pool]] entries"));
    }
    for p in &cfg.pool {
        if !crate::spec::is_valid_image_ref(&p.image) {
            return bad(format!(
                "[[pool]] image {:?} is not an image reference",
                p.image
            ));
        }
        if !(1..=MAX_SIZE).contains(&p.size) {
            return bad(format!(
                "[[pool]] of {:?}: size must be 1..={MAX_SIZE} (got {})",
                p.image, p.size
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
