//! A bus request: list the registered agents and the signing keys, as any NATS client can.
//!
//! ```sh
//! just up &                                            # a local fleet
//! export TETHER_TOKEN=$(tether token issue --operator)
//! cargo run -p tether-tests --example bus_request
//! ```

mod common;

use std::time::Duration;

use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = common::connect().await?;
    let wait = Duration::from_secs(5);

    // `auth.keys` is public: the keys every node verifies tokens with.
    let keys = common::call(&client, "auth.keys", json!({}), wait).await?;
    println!(
        "signing keys: {}",
        keys["keys"].as_array().map_or(0, Vec::len)
    );

    // `agents.list` needs the operator scope; an agent token is answered 403.
    let agents = common::call(&client, "agents.list", json!({}), wait).await?;
    for a in agents["agents"].as_array().into_iter().flatten() {
        println!(
            "{} in space {} ({})",
            a["agent_id"], a["space"], a["scopes"]
        );
    }
    Ok(())
}
