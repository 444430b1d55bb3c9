//! The bus connection: credentials from config, connect with retry, reconnect forever.
//!
//! The first connection is retried with backoff until it succeeds (a node may start before
//! its nats-server, as in `tether up`); after that async-nats reconnects on its own with no
//! attempt limit. Every disconnect and reconnect is logged.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;

/// Delay before reconnect attempt `n`: 50 ms doubling, capped at 2 s, so a restarted server
/// is found again within a couple of seconds.
pub fn reconnect_delay(attempt: usize) -> Duration {
    let exp = u32::try_from(attempt.min(6)).unwrap_or(6);
    Duration::from_millis(50 * 2u64.pow(exp)).min(Duration::from_secs(2))
}

/// The connect options every bus client of tether uses: credentials, TLS, reconnects, and
/// logged connection events (the CLI starts from these too, then shortens the timeouts).
pub async fn options(cfg: &BusConfig, name: &str) -> anyhow::Result<ConnectOptions> {
    let mut o = ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(
            cfg.request_timeout_seconds.max(1),
        )))
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("bus connection (re)established"),
                Event::Disconnected => tracing::warn!("bus connection lost; reconnecting"),
                Event::LameDuckMode => tracing::warn!("bus server entered lame duck mode"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
                other => tracing::info!(event = %other, "bus event"),
            }
        });
    if let (Some(u), Some(p)) = (&cfg.nats_user, &cfg.nats_password) {
        o = o.user_and_password(u.clone(), p.expose().to_string());
    }
    if let Some(t) = &cfg.nats_token {
        o = o.token(t.expose().to_string());
    }
    if let Some(path) = &cfg.nats_creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read NATS creds file {}: {e}", path.display()))?;
    }
    if cfg.nats_tls.required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &cfg.nats_tls.ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.nats_tls.cert_file, &cfg.nats_tls.key_file) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    Ok(o)
}

/// Connects, retrying with backoff until connected or `cancel` fires.
pub async fn connect(
    cfg: &BusConfig,
    name: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<Client> {
    let mut attempt = 0usize;
    loop {
        let opts = options(cfg, name).await?;
        match opts.connect(cfg.nats_url.as_str()).await {
            Ok(c) => {
                tracing::info!(url = %cfg.nats_url, "connected to bus");
                return Ok(c);
            }
            Err(e) => {
                attempt += 1;
                let d = reconnect_delay(attempt).max(Duration::from_millis(250));
                tracing::warn!(url = %cfg.nats_url, error = %e, attempt, "cannot reach bus; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => anyhow::bail!("stopped before the bus could be reached"),
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}
