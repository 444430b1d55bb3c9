//! `model-gateway`: config → telemetry → run. Exit 64 on bad configuration (including a
//! configured API key that cannot be read).

use clap::Parser;
use tether_bus::Layers;
use tether_model_gateway::GatewayConfig;

#[derive(Parser)]
#[command(
    version,
    about = "tether model gateway: chat, embeddings and reranking for agents"
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
    let (mut bus, cfg) = match (layers.bus(), layers.node::<GatewayConfig>()) {
        (Ok(b), Ok(c)) => (b, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("model-gateway: {e}");
            std::process::exit(64);
        }
    };
    // The HTTP stack logs request internals at TRACE; provider traffic carries API keys, so
    // those libraries stop at DEBUG whatever the filter asks.
    if bus.log.contains("trace") {
        bus.log
            .push_str(",hyper=debug,hyper_util=debug,reqwest=debug,h2=debug,rustls=debug");
    }
    let node = match tether_model_gateway::build(cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("model-gateway: {e}");
            std::process::exit(64);
        }
    };
    let _telemetry = tether_bus::telemetry::init(&bus, tether_model_gateway::NAME)?;
    node.run(bus, tether_bus::shutdown_signal()).await
}
