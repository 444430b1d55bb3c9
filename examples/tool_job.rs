//! A durable tool job: queue a one-shot tool run on JetStream, follow its events, read its
//! record. Any orchestrator replica may run it; it survives the death of the one that does.
//!
//! ```sh
//! export TETHER_TOKEN=$(tether token issue --agent agent-1)
//! cargo run -p tether-tests --example tool_job
//! ```

mod common;

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = common::connect().await?;
    let wait = Duration::from_secs(10);
    // Events of runs outside a session go to `events.tools._`; subscribe before submitting.
    let mut events = client.subscribe("events.tools.>").await?;

    let submit = json!({
        "tool_name": "add",
        "image": std::env::var("IMAGE").unwrap_or_else(|_| "tether-test/busybox:latest".into()),
        "command": "sleep 1; echo \"{\\\"sum\\\": $((A + B))}\"",
        "parameters": { "a": 1, "b": 2 },
        "async": true,
        // The same key in the same space runs once, however often it is sent.
        "idempotency_key": format!("example-{}", std::process::id()),
    });
    let queued = common::call(&client, "tools.execute", submit, wait).await?;
    let id = queued["execution_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("queued {id}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, events.next()).await {
        let event: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        if event["data"]["execution_id"] != id.as_str() {
            continue;
        }
        let status = event["data"]["status"].as_str().unwrap_or("");
        println!("event: {status}");
        if matches!(status, "completed" | "failed" | "timed_out" | "cancelled") {
            break;
        }
    }
    let record = common::call(&client, "tools.get", json!({ "execution_id": id }), wait).await?;
    println!("status {} result {}", record["status"], record["result"]);
    Ok(())
}
