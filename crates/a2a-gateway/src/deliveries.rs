//! Work items whose deliveries ran out: when the server gives up on an item (`a2a_max_deliver`
//! deliveries, none settled — a worker that crashes on it every time, say), it publishes a
//! `MAX_DELIVERIES` advisory; one gateway replica (a queue group) reads the item back from the
//! work stream and ends its task FAILED, so no caller waits on a task nobody will run.
//!
//! Advisories are core NATS (at most once): one sent while no gateway is up is lost, and the
//! task stays where it was until its caller cancels it.

use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;
use tether_bus::Problem;
use tokio_util::sync::CancellationToken;

use crate::Gateway;

/// The server's advisory subject root for a consumer that ran out of deliveries.
pub const ADVISORY: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

#[derive(Debug, Deserialize)]
struct Advisory {
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
}

/// Follows the work stream's advisories until `shutdown`.
pub async fn follow(
    gw: Arc<Gateway>,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let subject = format!("{ADVISORY}.{}.*", gw.cfg.a2a_work_stream);
    let mut sub = client
        .queue_subscribe(subject, crate::NAME.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot follow the work stream's advisories: {e}"))?;
    loop {
        let m = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = shutdown.cancelled() => return Ok(()),
        };
        if let Err(p) = give_up(&gw, &m.payload).await {
            tracing::warn!(error = %p, "a work item ran out of deliveries; its task could not be failed");
        }
    }
}

async fn give_up(gw: &Gateway, payload: &[u8]) -> Result<(), Problem> {
    let a: Advisory = serde_json::from_slice(payload)
        .map_err(|e| Problem::bad_request(format!("unreadable advisory: {e}")))?;
    let Some(item) = gw.work.item_at(a.stream_seq).await? else {
        return Ok(());
    };
    let message_id = item.message.message_id.clone();
    let rec = gw
        .tasks
        .change(&item.space, &item.task.id, |t| {
            Ok(t.give_up(&message_id, a.deliveries)?.is_some())
        })
        .await?;
    tracing::info!(task = %rec.task.id, space = %rec.space, deliveries = a.deliveries, state = ?rec.state(), "work item ran out of deliveries");
    Ok(())
}
