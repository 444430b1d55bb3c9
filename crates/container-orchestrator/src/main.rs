//! `container-orchestrator`: the one node startup path (`tether_bus::startup`), exit 64 on
//! bad configuration.

use std::process::ExitCode;

use clap::Parser;
use tether_container_orchestrator::{NAME, OrchestratorConfig, run};

#[derive(Parser)]
#[command(
    version,
    about = "tether container-orchestrator: agent spaces on one Docker host"
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
            let cfg = layers.node::<OrchestratorConfig>()?;
            tether_container_orchestrator::validate_config(&cfg)?;
            Ok(cfg)
        },
        run,
    )
    .await
}
