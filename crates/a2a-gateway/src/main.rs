//! `a2a-gateway`: the one node startup path (`tether_bus::startup`), exit 64 on bad
//! configuration.

use std::process::ExitCode;

use clap::Parser;
use tether_a2a_gateway::{A2aConfig, NAME};

#[derive(Parser)]
#[command(
    version,
    about = "tether a2a-gateway: A2A 1.0 on the bus, tasks durable in JetStream, an HTTP JSON-RPC bridge"
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
        |layers| Ok(A2aConfig::load(layers)?),
        tether_a2a_gateway::run,
    )
    .await
}
