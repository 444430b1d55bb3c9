//! `tether ping <node>`: is an instance of a node alive *here*? It asks `$SRV.PING.<node>` and
//! waits for an answer whose `host` (set by every node from its hostname) is this machine's —
//! so in a pod it checks that pod's node, not any replica of it (a probe that any replica
//! passes keeps a dead pod in service). `--any` accepts any instance.
//!
//! Run as the node's own NATS user (its `TETHER_NATS_NKEY_FILE`), it listens on that node's
//! inbox (`_INBOX_NODES.<node>`), the only one the bus lets a node user read.

use std::time::Duration;

use futures::StreamExt;
use tether_bus::BusConfig;
use tether_bus::micro::PingResponse;

use crate::CliError;

/// Exit code when no fitting instance answered in time (as `tether call` without answer).
pub const EXIT_NO_ANSWER: i32 = 3;

/// The bus config `tether ping` connects with: a node identity listens on that node's inbox.
pub fn config_for(bus: &BusConfig, node: &str) -> BusConfig {
    let mut cfg = bus.clone();
    if cfg.nats_inbox_prefix.is_none() && cfg.nats_nkey_file.is_some() {
        cfg.nats_inbox_prefix = Some(tether_auth::inbox::node_inbox_prefix(node));
    }
    cfg
}

/// Waits up to `wait` for an instance of `node` on `host` (any host: `None`) to answer.
pub async fn ping(
    client: &async_nats::Client,
    node: &str,
    host: Option<&str>,
    wait: Duration,
) -> Result<PingResponse, CliError> {
    if !tether_bus::subject::is_valid_token(node) {
        return Err(CliError::new(2, format!("{node:?} is not a node name")));
    }
    let fail = |e: &dyn std::fmt::Display| CliError::new(1, format!("ping {node}: {e}"));
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| fail(&e))?;
    client
        .publish_with_reply(format!("$SRV.PING.{node}"), inbox, "".into())
        .await
        .map_err(|e| fail(&e))?;
    client.flush().await.map_err(|e| fail(&e))?;
    let until = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(until, replies.next()).await {
        let Ok(p) = serde_json::from_slice::<PingResponse>(&m.payload) else {
            continue;
        };
        if host.is_none_or(|h| p.metadata.get("host").map(String::as_str) == Some(h)) {
            return Ok(p);
        }
    }
    Err(CliError::new(
        EXIT_NO_ANSWER,
        match host {
            Some(h) => format!("no instance of {node} on host {h} answered within {wait:?}"),
            None => format!("no instance of {node} answered within {wait:?}"),
        },
    ))
}
