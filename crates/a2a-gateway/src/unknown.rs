//! An operation the gateway does not have (`a2a.<agent>.<op>` with another `op`) is answered
//! MethodNotFound (404) instead of going unanswered: one replica (a queue group of its own)
//! sees every `a2a.*.*` request beside the endpoint that serves it, and answers only those no
//! endpoint serves.

use futures::StreamExt;
use tether_bus::problem_reply;
use tokio_util::sync::CancellationToken;

use crate::error::A2aError;

/// The caller operations the gateway serves (`a2a.<agent>.<op>`).
pub const OPS: &[&str] = &[
    "send",
    "stream",
    "get",
    "list",
    "cancel",
    "subscribe",
    "card",
];

/// Answers unknown operations until `shutdown`.
pub async fn answer(
    client: async_nats::Client,
    subject_prefix: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = client
        .queue_subscribe(
            format!("{subject_prefix}a2a.*.*"),
            format!("{}-unknown-ops", crate::NAME),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot follow A2A requests: {e}"))?;
    loop {
        let m = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let op = m.subject.rsplit('.').next().unwrap_or_default();
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        if OPS.contains(&op) || op == "agents" {
            continue;
        }
        let p = A2aError::MethodNotFound.problem(format!(
            "no A2A operation {op:?} (the operations are {})",
            OPS.join(", ")
        ));
        let r = problem_reply(&p, &m.subject);
        if let Err(e) = client.publish_with_headers(reply, r.headers, r.body).await {
            tracing::debug!(error = %e, "unknown-operation answer not sent");
        }
    }
}
