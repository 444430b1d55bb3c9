//! One startup path for every node binary: flags → layered config → validation → telemetry →
//! connect → build → serve through [`Node`] until SIGTERM/SIGINT → drain.
//!
//! A binary's `main` is [`run_node`] with two functions of its own: how to read and validate
//! its settings from the [`Layers`] (pure; nothing connects yet) and how to serve them (its
//! library's `run(bus, config, shutdown)`, usually [`serve`]).
//!
//! The one design decision to know: everything that can be wrong in the configuration is found
//! before anything connects, and ends the process with [`EXIT_CONFIG`] (64, sysexits'
//! `EX_USAGE`) and one line on stderr — a bad `log` filter and a bad `otlp_endpoint` included —
//! so a supervisor tells "fix the config" from "crashed" (exit 1).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;

use async_nats::{Client, jetstream};
use tokio_util::sync::CancellationToken;

use crate::config::{BusConfig, Layers};
use crate::node::Node;

/// Exit code of a configuration error.
pub const EXIT_CONFIG: u8 = 64;

/// The flag every node binary takes (flatten it into the binary's clap parser).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArg {
    /// Configuration file (default: ./tether.toml when present).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
}

/// Resolves when the node should drain (SIGTERM or SIGINT in a binary).
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A configuration error: the process exits 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub anyhow::Error);

/// The bus settings and a node's own, validated: what [`load`] returns.
#[derive(Debug)]
pub struct Loaded<C> {
    pub bus: BusConfig,
    pub node: C,
}

/// Reads the layers (defaults → file → `NATS_URL` → `TETHER_*`), the bus settings, the
/// telemetry settings and the node's own (`node` extracts and validates them).
pub fn load<C>(
    path: Option<&Path>,
    node: impl FnOnce(&Layers) -> anyhow::Result<C>,
) -> Result<Loaded<C>, ConfigError> {
    let layers = Layers::load(path);
    let bus = layers.bus().map_err(|e| ConfigError(e.into()))?;
    crate::telemetry::check(&bus).map_err(|e| ConfigError(e.into()))?;
    let node = node(&layers).map_err(ConfigError)?;
    Ok(Loaded { bus, node })
}

/// A binary's whole life: [`load`] (exit 64 on any error), telemetry, then `serve` until
/// SIGTERM or SIGINT (exit 0 once drained, 1 if serving failed).
pub async fn run_node<C, L, S, Fut>(
    name: &str,
    config: Option<&Path>,
    load_node: L,
    serve: S,
) -> ExitCode
where
    L: FnOnce(&Layers) -> anyhow::Result<C>,
    S: FnOnce(BusConfig, C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Loaded { bus, node } = match load(config, load_node) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _telemetry = match crate::telemetry::init(&bus, name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serve(bus, node, Box::pin(crate::shutdown_signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(node = name, error = %format!("{e:#}"), "node failed");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a node is built from: its connection, and a token for what must outlive the drain.
pub struct Boot {
    pub bus: BusConfig,
    pub client: Client,
    pub js: jetstream::Context,
    /// Cancelled once the node has drained and stopped: watches (a token verifier's) and
    /// servers that requests in flight still need stop on it.
    pub stopped: CancellationToken,
}

/// Connects (retrying until the bus answers or `shutdown`), builds the node on that
/// connection, and serves it through [`Node::run_with_client`] until `shutdown`, then drains.
pub async fn serve<B, Fut>(
    name: &str,
    bus: BusConfig,
    shutdown: impl Future<Output = ()> + Send,
    build: B,
) -> anyhow::Result<()>
where
    B: FnOnce(Boot) -> Fut,
    Fut: Future<Output = anyhow::Result<Node>>,
{
    let stopped = CancellationToken::new();
    tokio::pin!(shutdown);
    let client = tokio::select! {
        c = crate::connect::connect(&bus, name, &stopped) => c?,
        _ = &mut shutdown => return Ok(()),
    };
    let boot = Boot {
        bus: bus.clone(),
        js: jetstream::new(client.clone()),
        client: client.clone(),
        stopped: stopped.clone(),
    };
    let r = match build(boot).await {
        Ok(node) => node.run_with_client(bus, client, shutdown).await,
        Err(e) => Err(e),
    };
    stopped.cancel();
    r
}
