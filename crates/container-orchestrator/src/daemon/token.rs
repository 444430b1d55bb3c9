//! The daemon's token in each running space container with the daemon: `tokens.daemon`,
//! written as [`super::TOKEN_PATH`], renewed at half its life (`crate::credentials`), and the
//! containers found from their labels.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::ListContainersOptionsBuilder;
use tether_bus::{Ctx, Problem};
use tether_proto::{IssueDaemonTokenRequest, IssuedToken};
use tokio::time::Instant;

use super::Daemon;
use crate::credentials::{Grant, renew_at_fraction, request_token};
use crate::docker::EngineError;
use crate::docker::files::{Owner, SecretFile, Side};
use crate::docker::summary_name;
use crate::labels::{LABEL_DAEMON, LABEL_HOST, LABEL_MANAGED, LABEL_POOL, pool_space, space_of};
use crate::workers::credentials::TOKEN_DIR;

/// The token file's name in the secret directory.
pub const TOKEN_NAME: &str = "daemon-token";
/// How often the running containers with the daemon are listed.
const PASS: Duration = Duration::from_secs(30);

/// A space daemon's token: its space.
#[derive(Clone, Debug)]
pub struct DaemonGrant {
    pub space: String,
}

impl Grant for DaemonGrant {
    type Holder = Daemon;

    fn table(d: &Daemon) -> &crate::credentials::Credentials<Self> {
        &d.tokens
    }

    fn describe(&self) -> String {
        format!("space daemon of `{}`", self.space)
    }

    async fn obtain(&self, d: &Daemon, ctx: &Ctx) -> Result<IssuedToken, Problem> {
        let body = IssueDaemonTokenRequest {
            space: self.space.clone(),
            ttl_seconds: d.ttl_seconds,
        };
        request_token(ctx, "tokens.daemon", &body).await
    }

    /// 0400, owned by the container's user (the daemon runs as it).
    async fn write(
        &self,
        d: &Daemon,
        id: &str,
        known: Option<Side>,
        token: &[u8],
    ) -> Result<Side, EngineError> {
        let file = SecretFile {
            dir: TOKEN_DIR.into(),
            name: TOKEN_NAME.into(),
            mode: 0o400,
            owner: Owner::ContainerUser,
        };
        d.engine.renew_secret(id, &file, known, token).await
    }

    async fn refused(&self, _: &Daemon, _: &Ctx, _: &str, _: &str) {
        // Logged by the renewal (once per reason); exec falls back to the engine meanwhile.
    }

    /// At half its life.
    fn renew_after(now_unix: i64, expires_at: i64) -> Duration {
        renew_at_fraction(now_unix, expires_at, 1, 2)
    }
}

impl Daemon {
    /// A container with the daemon was (re)started: its daemon gets a fresh token at once (the
    /// secret volume is a tmpfs, empty after a start).
    pub fn started(&self, m: &crate::docker::Meta) {
        if m.daemon.is_empty() {
            return;
        }
        self.tokens.forget(&m.id);
        self.tokens.track(
            &m.id,
            DaemonGrant {
                space: m.space.clone(),
            },
        );
    }
}

impl Daemon {
    /// Waits (at most `within`) until the daemon of `space` answers on the bus: a request it
    /// refuses (an empty body: nothing runs) is its answer. False when it did not in time
    /// (exec falls back to the engine until it does).
    pub async fn wait_serving(
        &self,
        client: &async_nats::Client,
        space: &str,
        within: Duration,
    ) -> bool {
        let until = Instant::now() + within;
        let subject = self.exec_subject(space);
        while Instant::now() < until {
            let probe = async_nats::Request::new()
                .payload(bytes::Bytes::new())
                .timeout(Some(Duration::from_secs(1)));
            match client.send_request(subject.clone(), probe).await {
                Ok(_) => return true,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => {
                    tracing::debug!(space, error = %e, "the space daemon's probe failed");
                    return false;
                }
            }
        }
        false
    }
}

/// The discovery task: every running space container of this host with the daemon is
/// tracked (made by this process or before it), and the ones that went are dropped.
pub async fn discover(d: Arc<Daemon>, ctx: Ctx) -> anyhow::Result<()> {
    loop {
        let started = Instant::now();
        match running(&d).await {
            Ok(found) => {
                for (id, space) in found {
                    d.tokens.track(&id, DaemonGrant { space });
                }
                d.tokens.keep_seen_since(started);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the space containers with the daemon")
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PASS) => {}
        }
    }
}

/// (id, space) of the running managed containers of this host that have the daemon.
async fn running(d: &Daemon) -> Result<Vec<(String, String)>, EngineError> {
    let filters = HashMap::from([
        (
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_HOST}={}", d.engine.host_id()),
                LABEL_DAEMON.to_string(),
            ],
        ),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    let opts = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    let list = d.engine.docker().list_containers(Some(opts)).await?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let (labels, name) = (c.labels.as_ref()?, summary_name(&c));
            // A free pool container's daemon serves its pool space until it is taken.
            let space = pool_space(labels.contains_key(LABEL_POOL), &name)
                .unwrap_or_else(|| space_of(labels, &name));
            let ok = tether_bus::subject::is_valid_token(&space);
            Some((c.id?, space)).filter(|_| ok)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_half_life_and_the_path() {
        assert_eq!(
            DaemonGrant::renew_after(1000, 1600),
            Duration::from_secs(300)
        );
        assert_eq!(
            super::super::TOKEN_PATH,
            format!("{TOKEN_DIR}/{TOKEN_NAME}")
        );
    }
}
