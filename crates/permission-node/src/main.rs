//! `permission-node`: config → telemetry → run. Exit 64 on bad configuration.

use clap::Parser;
use tether_bus::Layers;
use tether_permission_node::PermissionConfig;

#[derive(Parser)]
#[command(
    version,
    about = "tether permission node: agents, spaces, signed tokens"
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
    let (bus, cfg) = match (layers.bus(), layers.node::<PermissionConfig>()) {
        (Ok(b), Ok(c)) => (b, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("permission-node: {e}");
            std::process::exit(64);
        }
    };
    let _telemetry = tether_bus::telemetry::init(&bus, tether_permission_node::NAME)?;
    tether_permission_node::run(bus, cfg, tether_bus::shutdown_signal()).await
}
