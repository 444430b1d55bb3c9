//! `permission-node`: the one node startup path (`tether_bus::startup`), exit 64 on bad
//! configuration.

use std::process::ExitCode;

use clap::Parser;
use tether_permission_node::{NAME, PermissionConfig, run};

#[derive(Parser)]
#[command(
    version,
    about = "tether permission node: agents, spaces, signed tokens"
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
        |layers| Ok(layers.node::<PermissionConfig>()?),
        run,
    )
    .await
}
