//! The fill task: every pass reads this host's free pool containers from the engine (the
//! truth), removes the ones that are not running or belong to no configured pool, keeps
//! `size` per pool (extras removed), and makes what is missing, one container at a time.
//! It runs at start (so a restart neither loses nor leaks free containers; with no pool
//! configured, it removes what earlier pools left and stops once a pass finds nothing left to
//! remove), whenever a take or an engine event wakes it, and at least every [`PASS`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::ContainerSummaryStateEnum;
use tether_bus::Ctx;

use crate::daemon::token::DaemonGrant;
use crate::docker::{EngineErrorKind, summary_name};
use crate::labels::{LABEL_POOL, is_free_pool, pool_space};
use crate::pool::{Entry, free_name};
use crate::state::Orchestrator;

/// The longest wait between two passes.
const PASS: Duration = Duration::from_secs(30);
/// How long a new pool container's daemon is waited for.
const DAEMON_READY: Duration = Duration::from_secs(10);
/// After a failed make, the wait before the next pass (the engine may be busy or the image gone).
const AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The fill task: until the node stops.
pub async fn run(o: Arc<Orchestrator>, ctx: Ctx) -> anyhow::Result<()> {
    if o.pool.entries.is_empty() {
        // Passes still remove the free containers of pools no longer configured, until one
        // finds nothing left to remove (a removal the engine failed is asked again).
        loop {
            match pass(&o, &ctx).await {
                Ok(0) => return Ok(()),
                Ok(left) => {
                    tracing::warn!(left, "pool clean-up pass left containers: asking again")
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "pool clean-up pass failed"),
            }
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(AFTER_FAILURE) => {}
            }
        }
    }
    loop {
        let wait = match pass(&o, &ctx).await {
            Ok(_) => PASS,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "pool fill pass failed");
                AFTER_FAILURE
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = o.pool.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One pass: the free lists from the engine, then every pool filled to its size. `Ok(n)`: `n`
/// containers it meant to remove are still there (the engine failed their removal).
pub async fn pass(o: &Orchestrator, ctx: &Ctx) -> anyhow::Result<usize> {
    let listed = o.engine.list_managed("", "", "space").await?;
    let mut left = 0;
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for c in listed {
        let labels = c.labels.clone().unwrap_or_default();
        let name = summary_name(&c);
        if !is_free_pool(&labels, &name) {
            continue;
        }
        let id = c.id.clone().unwrap_or_default();
        let key = labels.get(LABEL_POOL).cloned().unwrap_or_default();
        let known = o.pool.entries.iter().any(|e| e.key == key);
        let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
        let list = by_key.entry(key.clone()).or_default();
        let wanted = o
            .pool
            .entries
            .iter()
            .find(|e| e.key == key)
            .map_or(0, |e| e.size);
        if o.pool.is_used(&id) {
            continue;
        }
        if known && running && list.len() < wanted {
            list.push(id);
        } else {
            // Dead, of a pool no longer configured, or more than the pool's size.
            match o.engine.remove(&id).await {
                Ok(()) => tracing::info!(container = %id, pool = %key, "pool container removed"),
                Err(e) if e.kind() == EngineErrorKind::NotFound => {}
                Err(e) => {
                    left += 1;
                    tracing::warn!(container = %id, error = %e, "cannot remove pool container")
                }
            }
        }
    }
    for e in &o.pool.entries {
        o.pool
            .set_free(&e.key, by_key.remove(&e.key).unwrap_or_default());
    }
    for e in &o.pool.entries {
        while o.pool.free_count(&e.key) < e.size {
            let id = make(o, ctx, e).await?;
            o.pool.add_free(&e.key, id);
        }
    }
    Ok(left)
}

/// Makes and starts one free container of pool `e`; with the space daemon, gives it the
/// token of its pool space and waits (at most [`DAEMON_READY`]) until it is on the bus, so a
/// take can bind it over the bus (else the take writes its bind file).
async fn make(o: &Orchestrator, ctx: &Ctx, e: &Entry) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut spec = e.template.clone();
    spec.name = free_name(&e.key);
    o.daemon.prepare(&mut spec).await;
    let id = o.engine.create(&spec, &o.policy.cfg).await.map_err(|err| {
        anyhow::anyhow!("cannot create a pool container of `{}`: {err}", spec.image)
    })?;
    if let Err(err) = o.engine.start(&id).await {
        let _ = o.engine.remove(&id).await;
        anyhow::bail!("cannot start a pool container of `{}`: {err}", spec.image);
    }
    // Known to the engine's cache from now on: a take asks for it first thing.
    o.engine.inspect_managed(&id).await?;
    if spec.daemon.is_some()
        && let Some(space) = pool_space(spec.labels.contains_key(LABEL_POOL), &spec.name)
    {
        o.daemon.tokens.track(
            &id,
            DaemonGrant {
                space: space.clone(),
            },
        );
        if !o
            .daemon
            .wait_serving(&ctx.client, &space, DAEMON_READY)
            .await
        {
            tracing::warn!(container = %id, pool = %e.key, "the pool container's daemon is not on the bus: a take writes its bind file instead");
        }
    }
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    o.pool.count_refill(ms);
    tracing::info!(container = %id, pool = %e.key, ms, "pool container made");
    Ok(id)
}
