//! What every example shares: the bus address and token from the environment, and one
//! request/reply that turns a node's error headers into an error.
//!
//! Nothing here is tether-specific client code: a node is reached with a plain NATS request,
//! a JSON body and an `Authorization: Bearer` header, exactly as `nats req` would send it. The
//! same token is the connection's credential (the bus checks every connection), and replies
//! come to the caller's own inbox prefix `_INBOX.<agent_id>`, the only one the bus lets it read
//! (`tether agent creds` prints both).

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// Connects to `TETHER_NATS_URL` (else `NATS_URL`, else the local default) with the token.
pub async fn connect() -> anyhow::Result<async_nats::Client> {
    let url = std::env::var("TETHER_NATS_URL")
        .or_else(|_| std::env::var("NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let token = token()?;
    let inbox = std::env::var("TETHER_NATS_INBOX_PREFIX")
        .ok()
        .or_else(|| tether_auth::inbox::peek_subject(&token).map(|a| format!("_INBOX.{a}")))
        .context("TETHER_TOKEN is not a tether token (no agent id in it)")?;
    async_nats::ConnectOptions::new()
        .token(token)
        .custom_inbox_prefix(inbox)
        .connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// The caller's JWT: `TETHER_TOKEN` (e.g. `$(tether token issue --agent agent-1)`).
pub fn token() -> anyhow::Result<String> {
    std::env::var("TETHER_TOKEN").context("set TETHER_TOKEN to an agent or operator token")
}

/// Sends `body` as JSON to `subject` and returns the JSON reply. A node answers an error with
/// the `Nats-Service-Error-Code` header (an HTTP-style status) and a Problem+JSON body.
pub async fn call(
    client: &async_nats::Client,
    subject: &str,
    body: Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {}", token()?).as_str());
    let request = async_nats::client::Request::new()
        .headers(headers)
        .payload(serde_json::to_vec(&body)?.into())
        .timeout(Some(timeout));
    let msg = client
        .send_request(subject.to_string(), request)
        .await
        .with_context(|| format!("{subject}: no answer"))?;
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
    if let Some(code) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        bail!(
            "{subject}: {code} {}",
            reply["detail"].as_str().unwrap_or("")
        );
    }
    Ok(reply)
}
