//! Worker deployments (`workers.*`): named sets of long-running containers of kind `worker`
//! that run as one agent, kept alive on the hosts that have the image.
//!
//! - [`spec`]: a deploy request checked into its stored form, a replica's container, the
//!   assignment of replica slots to hosts.
//! - [`reconcile`]: each host's replicas against the desired state.
//! - [`credentials`]: each replica's token (`TETHER_TOKEN_FILE`), obtained from the permission
//!   node and renewed before it expires.
//! - [`scale`]: `replicas` of a deployment deployed with a `max_replicas` above its
//!   `min_replicas` set from its agent's backlog (one decider: the live host with the lowest id), each decision an event,
//!   the figures in `$SRV.STATS`.
//! - [`endpoints`]: `workers.deploy|get|list|scale|remove` (operators), on the shared and the
//!   host-addressed subjects.
//!
//! The one design decision to know: the desired state is in KV (`tether_workers`, key = the
//! deployment's name, changed only by compare-and-set) and the engine's labels are the truth
//! about what runs (`tether.worker`, `tether.replica`, `tether.generation`, and
//! `tether.deployment`: the uid of the deployment, new each time a name is deployed afresh).
//! A deployment holds its replica slots, each assigned to one host (`WorkerSlot`): assigned when the
//! deployment is made or scaled, by whichever orchestrator got the request, to the live host
//! with the image that holds the fewest of its slots (placement order on a tie,
//! [`crate::hosts`]); a slot stays on its host until that host is gone (silent for
//! `host_dead_after_ms`, or stopped), then any orchestrator's reconciler moves it to a live
//! candidate, and the host, when it comes back, removes the replica it no longer holds. Each
//! orchestrator makes and removes containers only on its own host, one reconcile pass at a
//! time, so two never race for one slot; a restart reads the labels again and keeps what runs.
//!
//! A deployment's profile (`[profiles.<name>]`) gives its replicas their fixed mounts, extra
//! hosts, network, secrets file and default limits ([`spec`], [`credentials::write_env`]).
//! [`scale`] sets a scaled deployment's `replicas` from its agent's backlog.
//!
//! A spec change is rolled one replica at a time *on each host*
//! (hosts roll their own slots side by side), "up" means running by the engine (no health
//! check yet).

pub mod credentials;
pub mod endpoints;
pub mod reconcile;
pub mod scale;
pub mod spec;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tether_bus::kv::Bucket;
use tether_bus::{Ctx, Encoding, Problem};
use tether_proto::WorkerDeployment;

use crate::state::Orchestrator;

pub use endpoints::endpoints;

/// The deployments in KV and what the reconciler keeps between passes.
pub struct Workers {
    pub o: Arc<Orchestrator>,
    pub bucket: Bucket<WorkerDeployment>,
    backoff: reconcile::Backoffs,
    /// The tokens of this host's replicas.
    pub credentials: credentials::ReplicaCredentials,
    /// The scaling figures and quiet periods.
    pub scaling: scale::Scaling,
}

impl Workers {
    /// Opens (or creates) the deployments bucket.
    pub async fn open(o: Arc<Orchestrator>, js: &jetstream::Context) -> anyhow::Result<Workers> {
        let cfg = &o.policy.cfg;
        let config = kv::Config {
            bucket: cfg.workers_bucket.clone(),
            description: "tether: worker deployments (desired state)".into(),
            history: 1,
            num_replicas: cfg.kv_replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let bucket = Bucket::open(js, config, Encoding::Json)
            .await?
            .named("worker deployments");
        Ok(Workers {
            o,
            bucket,
            backoff: reconcile::Backoffs::default(),
            credentials: credentials::ReplicaCredentials::default(),
            scaling: scale::Scaling::default(),
        })
    }

    /// Every deployment with its revision, by name.
    pub async fn all(&self) -> Result<Vec<(WorkerDeployment, u64)>, Problem> {
        let mut out = Vec::new();
        for k in self.bucket.keys().await? {
            if let Some(d) = self.bucket.get(&k).await? {
                out.push(d);
            }
        }
        out.sort_by(|a, b| name_of(&a.0).cmp(name_of(&b.0)));
        Ok(out)
    }

    /// Asks this host's reconciler for a pass now.
    pub fn poke(&self) {
        self.o.workers_poke.notify_one();
    }
}

/// A deployment's name.
pub fn name_of(d: &WorkerDeployment) -> &str {
    d.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// Follows the bucket: every change of a deployment (this host's or another's doing) asks
/// for a pass. Watches again after an interruption.
pub async fn watch(w: Arc<Workers>, ctx: Ctx) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match w.bucket.store().watch_all().await {
            Ok(mut changes) => loop {
                let next = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    n = changes.next() => n,
                };
                match next {
                    Some(Ok(_)) => {
                        backoff = Duration::from_millis(100);
                        w.poke();
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "worker deployments watch interrupted; watching again");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot watch worker deployments; retrying"),
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        // Whatever changed while the watch was down.
        w.poke();
    }
}
