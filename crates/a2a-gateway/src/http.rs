//! The HTTP bridge (to be written).

use std::net::SocketAddr;

use tether_bus::BusConfig;
use tokio_util::sync::CancellationToken;

use crate::A2aConfig;

/// The running bridge.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// The base URL of an agent's A2A endpoint: `http://<addr>/a2a/<agent>`.
    pub fn agent_url(&self, agent: &str) -> String {
        format!("http://{}/a2a/{agent}", self.addr)
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds `a2a_listen` and serves the bridge, forwarding every call to the bus endpoints.
pub async fn start(
    _cfg: &A2aConfig,
    _bus: &BusConfig,
    _client: async_nats::Client,
) -> anyhow::Result<Option<HttpServer>> {
    Ok(None)
}
