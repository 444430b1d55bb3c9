//! The container-orchestrator node: agent spaces (one long-lived container per space) and
//! other managed containers on one Docker host — the only node, and this the only crate, that
//! talks to the Docker engine.
//!
//! # Layout
//! - [`config`]: the node's settings (limits, defaults, host id, run-profiles).
//! - [`profiles`]: run-profiles (`[profiles.<name>]`): a worker replica's fixed mounts, extra
//!   hosts, network, secret environment file, default limits, and the mount allowlist.
//! - [`labels`]: every label the node puts on engine objects, and the names it reserves.
//! - [`spec`]: a create request validated into a complete, hardened [`spec::ContainerSpec`].
//! - [`docker`]: the bollard wrapper — hardened create, managed-only list/inspect/stop/remove.
//! - [`exec`]: commands with a deadline that kills inside the container, a capped output,
//!   streaming.
//! - [`daemon`]: the space daemon (`tether-spaced`) as every space container's init — its
//!   volume, the entrypoint, its token — and `containers.exec` through it, with the engine's
//!   exec as the fallback.
//! - [`credentials`]: tokens written into containers and renewed (worker replicas, space
//!   daemons).
//! - [`space`]: space bindings in KV (`tether_spaces`).
//! - [`hosts`]: host records in KV (`tether_hosts`): heartbeats, liveness, placement of new
//!   spaces, `hosts.list`.
//! - [`state`]: what the endpoints share — the engine, the policy, the run and session
//!   records, the session locks, the runs in progress.
//! - [`route`]: sending a request on to the node of the host that owns it.
//! - [`events`]: the engine's event stream → `events.containers.<space>`.
//! - [`pool`]: warm pools of never-used space containers: keys, matching, free lists, stats;
//!   [`pool_fill`] keeps them filled, [`pool_take`] hands one to a matching create.
//! - [`reconcile`]: the janitor — bindings vs labels, expiry, reaping orphaned execs.
//! - [`node`]: the endpoints (`containers.*`, `hosts.<host_id>.containers.*`).
//! - [`tools`]: tool runs (`tools.*`): one-shot containers, sync or as durable jobs, records
//!   in KV, the tool janitor.
//! - [`relics`]: session service containers (`relics.*`) with health checks.
//! - [`sessions`]: session networks, `sessions.cleanup`, this host's part of sessions that
//!   are over.
//! - [`workers`]: worker deployments (`workers.*`): desired state in KV (`tether_workers`),
//!   each host's replicas reconciled against it, each replica's token written into it and
//!   renewed, scaled deployments sized on their agent's backlog.
//!
//! The one design decision to know: the engine's labels are the truth. Which space a
//! container belongs to is its `tether.space` label (set only by this node, never from a
//! request), which host manages it is `tether.host`, and anything without
//! `tether.managed=true` and this host's id does not exist for the node. KV only maps a space
//! to its container, and is reconciled against the labels. The one exception is a warm-pool
//! container, made before its space is known: its space is its name, set once when it is
//! taken (`labels::space_of`).

pub mod config;
pub mod credentials;
pub mod daemon;
pub mod docker;
pub mod events;
pub mod exec;
pub mod hosts;
pub mod labels;
pub mod node;
pub mod pool;
pub mod pool_fill;
pub mod pool_take;
pub mod profiles;
pub mod reconcile;
pub mod relics;
pub mod route;
pub mod sessions;
pub mod space;
pub mod spec;
pub mod state;
pub mod tools;
pub mod workers;

#[cfg(test)]
mod testing;

use std::sync::Arc;

use tether_bus::{BusConfig, Node};

pub use config::OrchestratorConfig;
pub use state::Orchestrator;

pub const NAME: &str = "container-orchestrator";

/// Room left in a bus message for everything of a reply but the output text.
const REPLY_OVERHEAD: usize = 16 * 1024;

/// Every check of a configuration (the settings, then the run-profiles): what the node runs
/// with, or why not (the binary exits 64).
pub fn validate_config(cfg: &OrchestratorConfig) -> Result<config::Limits, config::InvalidConfig> {
    let limits = cfg.validate()?;
    profiles::check(cfg)?;
    pool::check(cfg)?;
    Ok(limits)
}

/// Connects to the engine, opens the bindings bucket, and builds the node (not started).
pub async fn build(
    bus: &BusConfig,
    cfg: OrchestratorConfig,
    client: &async_nats::Client,
) -> anyhow::Result<Node> {
    let limits = validate_config(&cfg)?;
    let host_id = cfg.resolved_host_id()?;
    let engine = docker::Engine::connect(&cfg.docker_host, &host_id).await?;
    let (host_cpus, host_memory_mb) = engine
        .host_resources()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the engine's host resources: {e}"))?;
    let js = async_nats::jetstream::new(client.clone());
    let spaces = space::Spaces::open(&js, &cfg.spaces_bucket, cfg.kv_replicas).await?;
    let hosts = hosts::Hosts::open(&js, &cfg, &host_id, host_memory_mb, host_cpus).await?;
    hosts
        .measure(&engine)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the engine's images and containers: {e}"))?;
    let hosts = Arc::new(hosts);
    let max_payload = client.server_info().max_payload.max(64 * 1024);
    let reply_budget = max_payload.saturating_sub(REPLY_OVERHEAD);
    let limits = limits.within_reply(reply_budget);
    let policy = spec::Policy {
        container_nats_url: spec::container_nats_url(&cfg.container_nats_url, &bus.nats_url),
        subject_prefix: bus.subject_prefix.clone().filter(|p| !p.is_empty()),
        cfg,
        host_id: host_id.clone(),
        host_cpus,
        host_memory_mb,
    };
    tracing::info!(host_id = %host_id, cpus = host_cpus, memory_mb = host_memory_mb, max_output = limits.max_output, "orchestrator configured");
    let o = Arc::new(Orchestrator::new(
        engine,
        spaces,
        hosts,
        policy,
        limits,
        reply_budget,
    ));
    let t = Arc::new(state::Shared::open(o.clone(), bus, &js).await?);
    let w = Arc::new(workers::Workers::open(o.clone(), &js).await?);
    let stats = w.clone();
    let node = Node::new(NAME, env!("CARGO_PKG_VERSION"))
        .description("agent spaces, tool runs and relics on one Docker host")
        .metadata("host_id", host_id)
        .stats_data(Arc::new(move |endpoint: &str| match endpoint {
            workers::scale::STATS_ENDPOINT => Some(stats.scaling.stats()),
            daemon::STATS_ENDPOINT => Some(stats.o.daemon.stats()),
            pool::STATS_ENDPOINT => Some(stats.o.pool.stats()),
            _ => None,
        }));
    let (o1, o2, o3) = (o.clone(), o.clone(), o.clone());
    let (t1, t2, t3) = (t.clone(), t.clone(), t.clone());
    let (h, engine) = (o.hosts.clone(), o.engine.clone());
    let node = node::endpoints(node, &o);
    let node = tools::endpoints(node, &t);
    let node = relics::endpoints(node, &t);
    let node = workers::endpoints(node, &w);
    let (w2, w3, w4) = (w.clone(), w.clone(), w.clone());
    let (d1, d2) = (o.daemon.clone(), o.daemon.clone());
    Ok(sessions::endpoints(node, &t)
        .task("engine-events", move |ctx| events::follow(o1, ctx))
        .task("janitor", move |ctx| reconcile::janitor(o2, ctx))
        .task("pool-fill", move |ctx| pool_fill::run(o3, ctx))
        .task("host-heartbeat", move |ctx| {
            hosts::heartbeat(h, engine, ctx)
        })
        .task("tool-workers", move |ctx| tools::workers(t1, ctx))
        .task("tool-cancels", move |ctx| tools::cancel_listener(t2, ctx))
        .task("tool-janitor", move |ctx| tools::janitor(t3, ctx))
        .task("worker-reconciler", move |ctx| {
            workers::reconcile::run(w, ctx)
        })
        .task("worker-watch", move |ctx| workers::watch(w2, ctx))
        .task("worker-scaling", move |ctx| workers::scale::run(w4, ctx))
        .task("worker-credentials", move |ctx| {
            credentials::run::<workers::credentials::ReplicaGrant>(w3, ctx)
        })
        .task("daemon-discovery", move |ctx| {
            daemon::token::discover(d1, ctx)
        })
        .task("daemon-tokens", move |ctx| {
            credentials::run::<daemon::token::DaemonGrant>(d2, ctx)
        }))
}

/// Connects, builds and serves until `shutdown`, then drains.
pub async fn run(
    bus: BusConfig,
    cfg: OrchestratorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tether_bus::startup::serve(NAME, bus, shutdown, |b| async move {
        build(&b.bus, cfg, &b.client).await
    })
    .await
}
