//! `model-gateway`: the one node startup path (`tether_bus::startup`), exit 64 on bad
//! configuration — including a configured API key that cannot be read, since the node is
//! built (keys read) while the configuration is checked.

use std::process::ExitCode;

use clap::Parser;
use tether_model_gateway::{GatewayConfig, NAME};

#[derive(Parser)]
#[command(
    version,
    about = "tether model gateway: chat, embeddings and reranking for agents"
)]
struct Args {
    #[command(flatten)]
    config: tether_bus::startup::ConfigArg,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tether_bus::startup::run_node(
        NAME,
        args.config.config.as_deref(),
        |layers| {
            Ok(tether_model_gateway::build(
                layers.node::<GatewayConfig>()?,
            )?)
        },
        |bus, node, shutdown| node.run(bus, shutdown),
    )
    .await
}
