//! A worker process's settings (contract §8) and its one way to start: connect, then [`run`].
//!
//! Design decision: the settings come from the same layers as every tether node
//! (`tether.toml`, then `TETHER_*`): `TETHER_NATS_URL`, `TETHER_TOKEN` or `TETHER_TOKEN_FILE`
//! (the file wins; it is re-read when it changes), `TETHER_AGENT_ID` (default: the token's
//! `sub`), `TETHER_WORKER_CONCURRENCY`, `TETHER_WORKER_NAME`, `TETHER_ENV_FILE` (a profile's
//! secrets, [`crate::secret_env`]). The connection authenticates with the token and listens
//! on `_INBOX.<agent>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use a2a::AgentCard;
use serde::Deserialize;
use tether_bus::config::{BusConfig, Layers, Secret};
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::secret_env::SecretEnv;
use crate::token::TokenSource;
use crate::worker::{WorkerConfig, run};

/// The worker's own settings, as read from the layers.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// `TETHER_AGENT_ID`
    pub agent_id: Option<String>,
    /// `TETHER_TOKEN`
    pub token: Option<Secret>,
    /// `TETHER_TOKEN_FILE`
    pub token_file: Option<PathBuf>,
    /// `TETHER_WORKER_CONCURRENCY` (default 4).
    pub worker_concurrency: Option<usize>,
    /// `TETHER_WORKER_NAME`: names this worker instance (the echo agent puts it in its
    /// artifacts' metadata).
    pub worker_name: Option<String>,
    /// `TETHER_ENV_FILE`: the replica's secret environment (set by the orchestrator when the
    /// deployment's profile has an `env_file`).
    pub env_file: Option<PathBuf>,
    /// `TETHER_ENV_FILE` as loaded by [`WorkerSettings::load`], for the processes an executor
    /// spawns ([`SecretEnv::apply`]).
    #[serde(skip)]
    pub secrets: SecretEnv,
}

impl WorkerSettings {
    /// Reads and checks the settings (a token is required; the agent id must be known) and
    /// loads the secret environment.
    pub fn load(layers: &Layers) -> anyhow::Result<(Self, TokenSource, String)> {
        let mut s: WorkerSettings = layers.node()?;
        s.secrets = s.secret_env()?;
        let token = s.token_source()?;
        let agent = s.agent(&token)?;
        if s.worker_concurrency == Some(0) {
            anyhow::bail!("worker_concurrency must be at least 1");
        }
        Ok((s, token, agent))
    }

    /// The secret environment for the processes an executor spawns: empty without
    /// `TETHER_ENV_FILE`, else the file (waited for up to [`crate::secret_env::WAIT`]).
    pub fn secret_env(&self) -> anyhow::Result<SecretEnv> {
        match &self.env_file {
            Some(p) => {
                let e = SecretEnv::load(p, crate::secret_env::WAIT)?;
                tracing::info!(names = ?e.names(), "loaded TETHER_ENV_FILE");
                Ok(e)
            }
            None => Ok(SecretEnv::default()),
        }
    }

    pub fn token_source(&self) -> anyhow::Result<TokenSource> {
        match (&self.token_file, &self.token) {
            (Some(path), _) => Ok(TokenSource::file(path)),
            (None, Some(t)) if !t.expose().trim().is_empty() => Ok(TokenSource::fixed(t.expose())),
            _ => anyhow::bail!("no token: set TETHER_TOKEN or TETHER_TOKEN_FILE"),
        }
    }

    /// `agent_id`, else the `sub` of the token.
    pub fn agent(&self, token: &TokenSource) -> anyhow::Result<String> {
        let agent = match self.agent_id.as_deref().filter(|a| !a.is_empty()) {
            Some(a) => a.to_string(),
            None => token
                .current()
                .ok()
                .and_then(|t| tether_auth::inbox::peek_subject(&t))
                .ok_or_else(|| {
                    anyhow::anyhow!("no agent id: set TETHER_AGENT_ID (the token names none)")
                })?,
        };
        if !crate::wire::valid_agent_id(&agent) {
            anyhow::bail!("invalid agent id {agent:?}: letters, digits, '-' and '_' only");
        }
        Ok(agent)
    }

    /// The worker config for `agent`; drain time and subject prefix from the bus settings.
    pub fn worker_config(&self, bus: &BusConfig, agent: &str) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(agent);
        cfg.max_concurrency = self.worker_concurrency.unwrap_or(cfg.max_concurrency);
        cfg.drain_timeout = Duration::from_secs(bus.drain_timeout_seconds);
        cfg.subject_prefix = bus.subject_prefix.clone();
        cfg
    }
}

/// Connects with the worker's token (retrying until the bus answers or `shutdown`) and runs
/// the worker until `shutdown`.
pub async fn serve<E: Executor>(
    bus: BusConfig,
    token: TokenSource,
    mut cfg: WorkerConfig,
    card: Option<AgentCard>,
    executor: Arc<E>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bus = token.bus_config(bus, &cfg.agent_id);
    let name = format!("a2a-worker-{}", cfg.agent_id);
    let client = match tether_bus::connect::connect(&bus, &name, &shutdown).await {
        Ok(c) => c,
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    if card.is_some() {
        cfg.card = card;
    }
    run(client, token, cfg, executor, shutdown).await
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn settings_from_env() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TETHER_NATS_URL", "nats://h:1");
            jail.set_env("TETHER_TOKEN", "tok");
            jail.set_env("TETHER_AGENT_ID", "echo");
            jail.set_env("TETHER_WORKER_CONCURRENCY", "3");
            let layers = Layers::load(None);
            let (s, token, agent) = WorkerSettings::load(&layers).map_err(|e| e.to_string())?;
            assert_eq!(agent, "echo");
            assert_eq!(token.current().as_deref(), Ok("tok"));
            let bus = layers.bus().map_err(|e| e.to_string())?;
            let cfg = s.worker_config(&bus, &agent);
            assert_eq!(cfg.max_concurrency, 3);
            let bus = token.bus_config(bus, &agent);
            assert_eq!(bus.nats_url, "nats://h:1");
            assert_eq!(bus.nats_inbox_prefix.as_deref(), Some("_INBOX.echo"));

            jail.create_file("tok.jwt", "from-file")?;
            jail.set_env("TETHER_TOKEN_FILE", "tok.jwt");
            let (_, token, _) =
                WorkerSettings::load(&Layers::load(None)).map_err(|e| e.to_string())?;
            assert_eq!(token.current().as_deref(), Ok("from-file"));
            Ok(())
        });
    }

    #[test]
    fn missing_or_bad_settings_are_errors() {
        figment::Jail::expect_with(|jail| {
            let e = WorkerSettings::load(&Layers::load(None)).expect_err("no token");
            assert!(e.to_string().contains("TETHER_TOKEN"), "{e}");
            jail.set_env("TETHER_TOKEN", "not-a-jwt");
            let e = WorkerSettings::load(&Layers::load(None)).expect_err("no agent");
            assert!(e.to_string().contains("TETHER_AGENT_ID"), "{e}");
            jail.set_env("TETHER_AGENT_ID", "a.b");
            assert!(WorkerSettings::load(&Layers::load(None)).is_err());
            jail.set_env("TETHER_AGENT_ID", "ok");
            jail.set_env("TETHER_WORKER_CONCURRENCY", "0");
            assert!(WorkerSettings::load(&Layers::load(None)).is_err());
            Ok(())
        });
    }
}
