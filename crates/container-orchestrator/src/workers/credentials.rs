//! Each replica's token: obtained from the permission node, written into the replica, renewed
//! before it expires.
//!
//! A replica runs as its deployment's agent. Its token (`sub` = the agent, the agent's space and
//! scopes) comes from the permission node's `tokens.worker`, which the bus lets only the
//! orchestrator ask and which issues only for an agent that a deployment names and that was
//! registered `workers:hosted` (`permission_node::worker_tokens`). The token lives
//! `worker_token_ttl_seconds` (the permission node may cap it) and is renewed at two thirds of
//! its life.
//!
//! It reaches the replica as the file `TETHER_TOKEN_FILE` = [`TOKEN_PATH`], written through the
//! engine's archive API into a tmpfs volume of the container (`crate::docker::files`: why, and
//! how a renewal stays atomic for readers). Never in the environment: `docker inspect` shows
//! the variable's path and the mount, no token. The worker libraries (Rust `a2a-worker`,
//! Python `tether-a2a`) read the file again when it changes, for each request's Bearer header
//! and at each bus reconnect; the bus closes a connection when its token expires, so a replica
//! whose token was not renewed (its agent revoked, its deployment removed) loses the bus then —
//! and at once on revocation, which the verifiers and the callout follow live.
//!
//! A profile's secrets file (`env_file`, [`crate::profiles`]) goes the same way, once, right
//! after the replica starts and before its first token: [`write_env`] reads the file on the
//! host that makes the replica and writes it as [`ENV_PATH`] (`TETHER_ENV_FILE`). Its values
//! are never in the container's environment, KV, a reply or a log line; the worker libraries
//! load the file into their own environment at start, so the processes they spawn inherit it.
//!
//! The renewal itself is `crate::credentials` (shared with the space daemons' tokens); this
//! module is the replicas' [`Grant`]. The table of replicas to renew is filled by every
//! reconcile pass from the engine's labels (and by each replica made), so after a restart of
//! the orchestrator every running replica gets a fresh token in its first pass, and a replica
//! that went is dropped. A refusal (revoked, not hosted, no deployment) is announced once on
//! `events.workers.<name>` (`tether.worker.token_refused`, the reason with it) and retried
//! every `credentials::REFUSED_RETRY`; a failure to reach the permission node or the engine
//! backs off from 1 s to 30 s.

use std::time::Duration;

use tether_bus::{Ctx, Problem};
use tether_proto::{IssueWorkerTokenRequest, IssuedToken, WorkerEventData};

use super::Workers;
use crate::credentials::{Credentials, Grant, renew_at_fraction, request_token};
use crate::docker::EngineError;
use crate::docker::files::{SecretFile, Side};

/// The directory of a replica's secret files (a tmpfs volume).
pub const TOKEN_DIR: &str = "/run/tether";
/// The token file's name in [`TOKEN_DIR`].
pub const TOKEN_NAME: &str = "token";
/// `TETHER_TOKEN_FILE` of every replica.
pub const TOKEN_PATH: &str = "/run/tether/token";
/// The secrets file's name in [`TOKEN_DIR`] (a profile's `env_file`).
pub const ENV_NAME: &str = "env";
/// `TETHER_ENV_FILE` of a replica whose profile has an `env_file`.
pub const ENV_PATH: &str = "/run/tether/env";

/// The replicas of this host whose tokens are kept.
pub type ReplicaCredentials = Credentials<ReplicaGrant>;

/// A replica's token: its deployment and agent.
#[derive(Clone, Debug)]
pub struct ReplicaGrant {
    pub worker: String,
    pub agent: String,
}

impl Grant for ReplicaGrant {
    type Holder = Workers;

    fn table(w: &Workers) -> &ReplicaCredentials {
        &w.credentials
    }

    fn describe(&self) -> String {
        format!("worker `{}` agent `{}`", self.worker, self.agent)
    }

    /// `tokens.worker` for the replica's deployment and agent.
    async fn obtain(&self, w: &Workers, ctx: &Ctx) -> Result<IssuedToken, Problem> {
        let body = IssueWorkerTokenRequest {
            worker: self.worker.clone(),
            agent_id: self.agent.clone(),
            ttl_seconds: w.o.policy.cfg.worker_token_ttl_seconds,
        };
        request_token(ctx, "tokens.worker", &body).await
    }

    async fn write(
        &self,
        w: &Workers,
        id: &str,
        known: Option<Side>,
        token: &[u8],
    ) -> Result<Side, EngineError> {
        let file = SecretFile::readable(TOKEN_DIR, TOKEN_NAME);
        w.o.engine.renew_secret(id, &file, known, token).await
    }

    /// Announced on `events.workers.<name>` (`tether.worker.token_refused`).
    async fn refused(&self, w: &Workers, ctx: &Ctx, id: &str, reason: &str) {
        let data = WorkerEventData {
            action: "token_refused".into(),
            worker: self.worker.clone(),
            container_id: id.to_string(),
            reason: reason.to_string(),
            ..Default::default()
        };
        super::reconcile::announce(w, ctx, &self.worker, data).await;
    }

    /// At two thirds of its life.
    fn renew_after(now_unix: i64, expires_at: i64) -> Duration {
        renew_at_fraction(now_unix, expires_at, 2, 3)
    }
}

/// Writes the secrets file of `d`'s profile into replica `id`, just started (nothing when the
/// profile has none). Errors name the file and the rule, never a value.
pub async fn write_env(
    w: &Workers,
    id: &str,
    d: &tether_proto::WorkerDeployment,
) -> Result<(), Problem> {
    let asked = d.spec.as_ref().map_or("", |s| s.profile.as_str());
    let (name, p) = super::spec::profile(asked, &w.o.policy)?;
    if p.env_file.is_empty() {
        return Ok(());
    }
    let content = crate::profiles::read_env_file(&p.env_file)
        .map_err(|e| Problem::unprocessable(format!("profile `{name}`: env_file {e}")))?;
    w.o.engine
        .put_secret(
            id,
            &SecretFile::readable(TOKEN_DIR, ENV_NAME),
            Side::A,
            &content,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_renewal_at_two_thirds() {
        assert_eq!(TOKEN_PATH, format!("{TOKEN_DIR}/{TOKEN_NAME}"));
        assert_eq!(ENV_PATH, format!("{TOKEN_DIR}/{ENV_NAME}"));
        assert_eq!(
            ReplicaGrant::renew_after(1000, 1030),
            Duration::from_secs(20)
        );
    }
}
