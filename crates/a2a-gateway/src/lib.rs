//! The A2A gateway (work in progress: see /work/notes/a2a-wire.md for the contract).

pub mod config;
pub mod error;
pub mod http;

pub use config::A2aConfig;

pub const NAME: &str = "a2a-gateway";

/// Serves until `shutdown`, then drains (to be written).
pub async fn run(
    _bus: tether_bus::BusConfig,
    _cfg: A2aConfig,
    _shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
