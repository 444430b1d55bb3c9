//! The node's shared state: the engine, the bindings, the hosts, the policy, and three small in-memory
//! tables fed by requests and engine events (all bounded, all safe to lose on restart)
//! ([`Orchestrator`]); and what the tool, relic and session endpoints share ([`Shared`]): the
//! run records, the session records, the session locks and the table of runs in progress.

mod results;
mod session_store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::jobs;
use tokio_util::sync::CancellationToken;

pub use results::{Change, Results, Status, is_terminal};
pub use session_store::{SessionStore, expires};

use crate::config::Limits;
use crate::docker::Engine;
use crate::hosts::Hosts;
use crate::space::Spaces;
use crate::spec::Policy;

/// Entries kept at most per table; beyond that a table starts afresh.
const TABLE_MAX: usize = 8192;

pub struct Orchestrator {
    pub engine: Engine,
    pub spaces: Spaces,
    /// This host's record and the other hosts as last read (liveness, placement).
    pub hosts: Arc<Hosts>,
    pub policy: Policy,
    pub host_id: String,
    /// What requests are checked against (output capped by the bus payload limit), made once
    /// from the configuration at startup.
    pub limits: Limits,
    /// Bytes the text of a reply may take so the whole reply fits one bus message.
    pub reply_budget: usize,
    /// OOM kills seen per container id (from the engine's `oom` events).
    oom: Mutex<HashMap<String, u64>>,
    /// Last `traceparent` of a request that acted on a container (by id and by name), so the
    /// lifecycle events it caused carry it.
    traces: Mutex<HashMap<String, String>>,
    /// Containers whose exec processes must be reaped at a time (unix seconds).
    reap_at: Mutex<HashMap<String, i64>>,
    /// The space daemon: its binary, the daemons' tokens, the exec path counters.
    pub daemon: Arc<crate::daemon::Daemon>,
    /// The warm pools of space containers.
    pub pool: Arc<crate::pool::Pool>,
    /// Wakes the worker reconciler (worker deployments): a deployment changed, or a replica
    /// exited or vanished.
    pub workers_poke: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Orchestrator {
    pub fn new(
        engine: Engine,
        spaces: Spaces,
        hosts: Arc<Hosts>,
        policy: Policy,
        limits: Limits,
        reply_budget: usize,
    ) -> Self {
        let daemon = Arc::new(crate::daemon::Daemon::load(&policy, engine.clone()));
        let pool = Arc::new(crate::pool::Pool::new(&policy));
        Self {
            pool,
            daemon,
            limits,
            host_id: policy.host_id.clone(),
            engine,
            spaces,
            hosts,
            policy,
            reply_budget,
            oom: Mutex::default(),
            traces: Mutex::default(),
            reap_at: Mutex::default(),
            workers_poke: tokio::sync::Notify::new(),
        }
    }

    pub fn note_oom(&self, container_id: &str) {
        let mut m = lock(&self.oom);
        if m.len() >= TABLE_MAX {
            m.clear();
        }
        *m.entry(container_id.to_string()).or_default() += 1;
    }

    pub fn oom_count(&self, container_id: &str) -> u64 {
        lock(&self.oom).get(container_id).copied().unwrap_or(0)
    }

    /// Waits (up to `within`) for the OOM count of a container to pass `before`.
    pub async fn oom_after(&self, container_id: &str, before: u64, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.oom_count(container_id) > before {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn note_trace(&self, key: &str, traceparent: Option<&str>) {
        let Some(tp) = traceparent.filter(|t| !t.is_empty()) else {
            return;
        };
        let mut m = lock(&self.traces);
        if m.len() >= TABLE_MAX {
            m.clear();
        }
        m.insert(key.to_string(), tp.to_string());
    }

    pub fn trace_of(&self, id: &str, name: &str) -> Option<String> {
        let m = lock(&self.traces);
        m.get(id).or_else(|| m.get(name)).cloned()
    }

    /// Forgets what the tables hold about a removed container.
    pub fn forget(&self, id: &str, name: &str) {
        lock(&self.oom).remove(id);
        {
            let mut t = lock(&self.traces);
            t.remove(id);
            t.remove(name);
        }
        lock(&self.reap_at).remove(id);
        self.daemon.tokens.forget(id);
        self.engine.forget(id);
    }

    /// Asks for a reaper pass in `container_id` at `at` (the earliest request wins).
    pub fn schedule_reap(&self, container_id: &str, at: i64) {
        let mut m = lock(&self.reap_at);
        if m.len() >= TABLE_MAX {
            return;
        }
        let e = m.entry(container_id.to_string()).or_insert(at);
        *e = (*e).min(at);
    }

    /// Containers whose reaper pass is due at `now`, taken off the schedule.
    pub fn due_reaps(&self, now: i64) -> Vec<String> {
        let mut m = lock(&self.reap_at);
        let due: Vec<String> = m
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            m.remove(id);
        }
        due
    }
}

/// What the tool, relic and session endpoints share.
pub struct Shared {
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

/// Takes a run off the running table when dropped.
pub struct Running<'a> {
    t: &'a Shared,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.t.running).remove(&self.id);
    }
}

impl Shared {
    /// Opens the buckets and the job stream.
    pub async fn open(
        o: Arc<Orchestrator>,
        bus: &tether_bus::BusConfig,
        js: &jetstream::Context,
    ) -> anyhow::Result<Shared> {
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
        // `Limits` retention (see `tether_bus::jobs`): a job stays until `max_age` (the
        // records' TTL), acked or not, so after a server restart the duplicate window still
        // knows its `Nats-Msg-Id` and a retried publish is not queued again. The durable
        // consumers remember what they delivered and acked; a job delivered again anyway
        // finds its record finished (or gone) and is acked without running.
        let stream = jobs::ensure_stream(
            js,
            jetstream::stream::Config {
                name: cfg.tool_jobs_stream.clone(),
                description: Some("tether: async tool jobs".into()),
                subjects: vec![bus.subject("jobs.tools.>")],
                retention: jetstream::stream::RetentionPolicy::Limits,
                storage: jetstream::stream::StorageType::File,
                max_age: ttl,
                duplicate_window: Duration::from_secs(120),
                num_replicas: cfg.kv_replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        let retention = stream.cached_info().config.retention;
        if retention != jetstream::stream::RetentionPolicy::Limits {
            // Made by an earlier version as a work queue: the server will not change a
            // stream's retention, and deleting it here could drop queued jobs.
            tracing::warn!(
                stream = %cfg.tool_jobs_stream,
                ?retention,
                "the tool job stream keeps the retention it was made with: after a server restart a retried job publish may be queued again (its run is still skipped by its finished record); to move it to Limits retention, delete it while no job is queued (`nats stream rm {}`) and restart an orchestrator",
                cfg.tool_jobs_stream
            );
        }
        let done = tether_bus::kv::open_or_create_bucket(
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
        Ok(Shared {
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

    pub fn register(&self, id: &str) -> (CancellationToken, Running<'_>) {
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
