//! The daemon on the bus: connect with the token file, serve `spaces.<space>.daemon.exec`.
//!
//! Design decisions:
//! - Pool mode ([`Space::Pending`]) without a pool space: the bind file is waited for
//!   (`bind::wait`) before anything touches the bus, so a pool container's daemon is on the bus only once it knows
//!   its space (and its token file is written); then it serves exactly as a daemon started
//!   with that space, and the bind file's env is the base environment of every command.
//! - Bind over the bus (`TETHER_DAEMON_POOL_SPACE` set in pool mode): `busbind` waits for
//!   a bind request on the pool subject and the bind file together; a bus bind hands over
//!   its connection, already subscribed to the bound space's subject, which is served here
//!   as any other.
//! - The connection is made in the background and retried forever (`retry_on_initial_connect`,
//!   unlimited reconnects): an init must keep its workload running whether or not the bus is
//!   there, so a missing server or a bad token never stops the daemon.
//! - The token is read from `TETHER_DAEMON_TOKEN_FILE` at every (re)connect, as every tether
//!   client reads its token file (`bus::connect`), so whoever renews the file keeps the daemon
//!   connected past the token's expiry; the token is never in the environment or a log. (A
//!   bus-bound connection uses the bind's token until the file changes: `busbind`.)
//! - A plain core-NATS queue subscription (`tether-spaced`), not the micro protocol: the reply
//!   is a stream of messages, not one answer, and one space has one daemon (the queue group
//!   only keeps a second one, by mistake, from answering twice).
//! - Bounded: at most `max_running` commands at once; more is answered 429 at once.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::bind;
use crate::busbind::{self, Bound};
use crate::config::{BusSettings, Limits, Space, exec_subject_under};
use crate::conn::options;
use crate::exec::{self, Running};
use crate::reaper::Reaper;
use crate::reply::Refusal;
use crate::request;

pub use crate::conn::QUEUE;

/// Serves exec until the subscription ends (the connection closed for good); in pool mode
/// once the bind file is there.
pub async fn serve(
    bus: BusSettings,
    limits: Limits,
    reaper: Reaper,
    running: Running,
) -> anyhow::Result<()> {
    let (space, base_env, bound) = match (&bus.space, &bus.pool_space) {
        (Space::Fixed(space), _) => (space.clone(), Vec::new(), None),
        (Space::Pending(file), None) => {
            let b = bind::wait(file).await?;
            let env = b.env_pairs();
            (b.space, env, None)
        }
        (Space::Pending(file), Some(pool)) => match busbind::wait(&bus, file, pool).await? {
            Bound::File(b) => {
                let env = b.env_pairs();
                (b.space, env, None)
            }
            Bound::Bus { bind, client, sub } => {
                let env = bind.env_pairs();
                (bind.space, env, Some((client, sub)))
            }
        },
    };
    let base_env: Arc<[(String, String)]> = base_env.into();
    let subject = exec_subject_under(bus.prefix.as_deref(), &space);
    let (client, mut sub) = match bound {
        Some(bound) => bound,
        None => {
            let client = options(&bus)
                .connect(bus.url.as_str())
                .await
                .map_err(|e| anyhow::anyhow!("cannot set up the bus connection: {e}"))?;
            let sub = client
                .queue_subscribe(subject.clone(), QUEUE.into())
                .await
                .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
            (client, sub)
        }
    };
    tracing::info!(%subject, "serving exec");
    let permits = Arc::new(Semaphore::new(limits.max_running));
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!("an exec request without a reply subject: dropped");
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let r = Refusal::new(
                429,
                format!(
                    "{} commands are running: the most at once",
                    limits.max_running
                ),
            );
            exec::refuse(&client, reply, &r).await;
            continue;
        };
        match request::decode(&msg.payload, &limits, Path::new("/")) {
            Err(r) => exec::refuse(&client, reply, &r).await,
            Ok(plan) => {
                let (reaper, running, client) = (reaper.clone(), running.clone(), client.clone());
                let base_env = base_env.clone();
                tokio::spawn(async move {
                    exec::execute(plan, &base_env, &reaper, &running, &client, reply).await;
                    drop(permit);
                });
            }
        }
    }
    Ok(())
}
