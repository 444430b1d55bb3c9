//! `container-orchestrator`: config → telemetry → run. Exit 64 on bad configuration.

use clap::Parser;
use tether_bus::Layers;
use tether_container_orchestrator::OrchestratorConfig;

#[derive(Parser)]
#[command(
    version,
    about = "tether container-orchestrator: agent spaces on one Docker host"
)]
struct Args {
    /// Configuration file (default: ./tether.toml when present).
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let layers = Layers::load(args.config.as_deref());
    let (bus, cfg) = match (layers.bus(), layers.node::<OrchestratorConfig>()) {
        (Ok(b), Ok(c)) => (b, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("container-orchestrator: {e}");
            std::process::exit(64);
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("container-orchestrator: {e}");
        std::process::exit(64);
    }
    let _telemetry = tether_bus::telemetry::init(&bus, tether_container_orchestrator::NAME)?;
    tether_container_orchestrator::run(bus, cfg, tether_bus::shutdown_signal()).await
}
