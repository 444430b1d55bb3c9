//! The bus's auth callout: nats-server asks, for every connection that is not one of the
//! configured node users, who it is; we answer from the connection's tether token.
//!
//! A connection presents its token as `auth_token`. We verify it exactly as every node verifies
//! a request (key set and revocations from KV, [`KvVerifier`]) and answer with a NATS user in
//! account [`crate::server_conf::ACCOUNT`] whose permissions come from [`crate::access`] and
//! whose expiry is the token's: the server closes the connection when the token expires, and
//! the client comes back with a renewed one. Every refusal names its reason to the server
//! (never the token).
//!
//! Design decision: one identity end to end. The alternative, NATS decentralized JWT
//! (operator mode, a creds file per agent), would give every agent a second credential with its
//! own lifetime and revocation (account JWT updates through a resolver); with the callout, the
//! tether token an agent already holds is its bus credential too, checked by the same code, its
//! scopes and space shaping the NATS permissions, its expiry ending the connection, its
//! revocation closing it.
//!
//! Revocation: every connection we let in is remembered (server, connection id, agent, token
//! id); when the revocation bucket names its agent or token, the connection is closed through
//! the system account (`$SYS.REQ.SERVER.<id>.KICK`). Replicas answer in a queue group (one
//! answer per request: the server waits for exactly one), so the replica that let a connection
//! in is the one that closes it; every replica follows the bucket. A connection let in by a
//! replica that has since restarted is left to its token's expiry.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use nkeys::KeyPair;
use serde::Deserialize;
use tether_auth::Claims;
use tether_bus::{BusConfig, KvVerifier, Verify};
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::nats_jwt::{self, AuthRequest};
use crate::server_conf::{self, read_seed};

/// The subject nats-server sends authorization requests on (in the callout account).
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";

/// Where the callout's keys are (the server's `authorization.auth_callout` names the public
/// halves). Off unless `issuer_seed_file` and `nkey_file` are both set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CalloutConfig {
    /// Account nkey seed: answers are signed with it (the server's `auth_callout.issuer`).
    pub issuer_seed_file: Option<PathBuf>,
    /// Seed of the callout account's user, which receives the requests.
    pub nkey_file: Option<PathBuf>,
    /// Seed of a system-account user: closes the connections of revoked agents. Without it a
    /// revoked agent is refused at its next connect and keeps an open connection until its
    /// token expires.
    pub system_nkey_file: Option<PathBuf>,
}

impl CalloutConfig {
    /// The callout of a key bundle directory ([`server_conf::BusKeys`]).
    pub fn from_bundle(dir: &std::path::Path) -> Self {
        CalloutConfig {
            issuer_seed_file: Some(server_conf::BusKeys::issuer_seed_file(dir)),
            nkey_file: Some(server_conf::BusKeys::callout_seed_file(dir)),
            system_nkey_file: Some(server_conf::BusKeys::system_seed_file(dir)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.issuer_seed_file.is_some() && self.nkey_file.is_some()
    }
}

/// A connection we let in.
#[derive(Clone, Debug)]
struct Conn {
    server: String,
    cid: u64,
    jti: String,
    iat: i64,
    exp: i64,
}

/// The connections let in, by agent.
#[derive(Default)]
struct Conns(HashMap<String, Vec<Conn>>);

impl Conns {
    fn add(&mut self, agent: &str, c: Conn, now: i64) {
        let list = self.0.entry(agent.to_string()).or_default();
        list.retain(|x| x.exp > now);
        list.push(c);
    }

    /// Removes and returns the connections a revocation entry (`agent.<id>` issued at or
    /// before `at`, or `jti.<id>`) ends.
    fn take_revoked(&mut self, key: &str, at: i64) -> Vec<Conn> {
        if let Some(agent) = key.strip_prefix("agent.") {
            let Some(list) = self.0.get_mut(agent) else {
                return vec![];
            };
            let (gone, kept) = list.drain(..).partition(|c| c.iat <= at);
            *list = kept;
            gone
        } else if let Some(jti) = key.strip_prefix("jti.") {
            let mut gone = vec![];
            for list in self.0.values_mut() {
                let (g, kept): (Vec<Conn>, Vec<Conn>) = list.drain(..).partition(|c| c.jti == jti);
                *list = kept;
                gone.extend(g);
            }
            gone
        } else {
            vec![]
        }
    }
}

struct Callout {
    issuer: KeyPair,
    verifier: KvVerifier,
    prefix: Option<String>,
    conns: Mutex<Conns>,
}

/// Starts answering the server's authorization requests and closing revoked agents'
/// connections, until `stop`. Returns once the callout is subscribed (a client connecting
/// after that is answered).
pub async fn start(
    bus: &BusConfig,
    cfg: &CalloutConfig,
    js: &jetstream::Context,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (Some(issuer_file), Some(nkey_file)) = (&cfg.issuer_seed_file, &cfg.nkey_file) else {
        anyhow::bail!("the auth callout needs `issuer_seed_file` and `nkey_file`");
    };
    let issuer = read_seed(issuer_file)?;
    let auth = tether_bus::connect::connect(
        &as_user(bus, nkey_file.clone()),
        "permission-node-callout",
        &stop,
    )
    .await?;
    let sys = match &cfg.system_nkey_file {
        Some(f) => Some(
            tether_bus::connect::connect(&as_user(bus, f.clone()), "permission-node-system", &stop)
                .await?,
        ),
        None => {
            tracing::warn!(
                "no system_nkey_file: revoked agents keep open connections until their tokens expire"
            );
            None
        }
    };
    let verifier = KvVerifier::start(js, bus, stop.clone()).await?;
    let revoked = js
        .get_key_value(bus.auth.revoked_bucket.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the revocation bucket: {e}"))?;
    let c = Arc::new(Callout {
        issuer,
        verifier,
        prefix: bus.subject_prefix.clone().filter(|p| !p.is_empty()),
        conns: Mutex::new(Conns::default()),
    });
    let mut requests = auth
        .queue_subscribe(AUTH_SUBJECT, "tether-callout".to_string())
        .await?;
    auth.flush().await?;
    tracing::info!(issuer = %c.issuer.public_key(), "auth callout serving");
    let serving = c.clone();
    let stop_serving = stop.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = stop_serving.cancelled() => break,
                m = requests.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            if let Some(answer) = serving.answer(&msg.payload).await
                && let Err(e) = auth.publish(reply, answer.into()).await
            {
                tracing::warn!(error = %e, "cannot send an auth callout answer");
            }
        }
        drop(auth);
    });
    if let Some(sys) = sys {
        tokio::spawn(close_revoked(c, revoked, sys, stop));
    }
    Ok(())
}

/// The bus config of a callout-side connection: the same servers and TLS, as the nkey user.
fn as_user(bus: &BusConfig, nkey_file: PathBuf) -> BusConfig {
    BusConfig {
        nats_user: None,
        nats_password: None,
        nats_token: None,
        nats_token_file: None,
        nats_creds_file: None,
        nats_nkey_file: Some(nkey_file),
        ..bus.clone()
    }
}

impl Callout {
    /// The signed answer to one request; `None` when the request itself is not a server's
    /// (nothing to answer to).
    async fn answer(&self, payload: &[u8]) -> Option<String> {
        let now = tether_auth::now_unix();
        let req = match std::str::from_utf8(payload)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|s| nats_jwt::decode_request(s, now))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed authorization request");
                return None;
            }
        };
        let outcome = self.decide(&req, now).await;
        nats_jwt::response_jwt(&self.issuer, &req, outcome, now)
            .map_err(|e| tracing::error!(error = %e, "cannot sign an auth callout answer"))
            .ok()
    }

    /// The user JWT for the connection, or why it is refused.
    async fn decide(&self, req: &AuthRequest, now: i64) -> Result<String, String> {
        let host = req.client_info.host.as_str();
        let Some(token) = req
            .connect_opts
            .auth_token
            .as_deref()
            .filter(|t| !t.is_empty())
        else {
            tracing::info!(host, "bus connection refused: no token");
            return Err("no token: connect with a tether token as the auth token".into());
        };
        let claims = match self.verifier.verify(token).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(host, reason = e.kind(), "bus connection refused");
                return Err(format!("token refused: {e}"));
            }
        };
        if claims.exp <= now {
            tracing::info!(host, agent = %claims.sub, "bus connection refused: token expired");
            return Err("token refused: token expired".into());
        }
        let perms = access::for_claims(&claims, self.prefix.as_deref());
        let user = nats_jwt::user_jwt(
            &self.issuer,
            &req.user_nkey,
            &claims.sub,
            server_conf::ACCOUNT,
            &perms,
            claims.exp,
            now,
        )?;
        self.remember(req, &claims, now);
        if claims.scopes.is_operator() {
            tracing::info!(agent = %claims.sub, jti = %claims.jti, host, "operator connected to the bus");
        } else {
            tracing::debug!(agent = %claims.sub, space = %claims.space, host, "agent connected to the bus");
        }
        Ok(user)
    }

    fn remember(&self, req: &AuthRequest, claims: &Claims, now: i64) {
        let conn = Conn {
            server: req.server_id.id.clone(),
            cid: req.client_info.id,
            jti: claims.jti.clone(),
            iat: claims.iat,
            exp: claims.exp,
        };
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&claims.sub, conn, now);
    }
}

/// Follows the revocation bucket and closes the connections each new entry ends.
async fn close_revoked(
    c: Arc<Callout>,
    revoked: kv::Store,
    sys: async_nats::Client,
    stop: CancellationToken,
) {
    loop {
        let mut watch = match revoked.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch revocations; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return,
                e = watch.next() => e,
            };
            let Some(Ok(entry)) = entry else { break };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let at = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .unwrap_or(i64::MAX);
            let gone = c
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_revoked(&entry.key, at);
            for conn in gone {
                kick(&sys, &conn).await;
            }
        }
    }
}

async fn kick(sys: &async_nats::Client, conn: &Conn) {
    let subject = format!("$SYS.REQ.SERVER.{}.KICK", conn.server);
    let body = serde_json::json!({ "cid": conn.cid }).to_string();
    match tokio::time::timeout(Duration::from_secs(2), sys.request(subject, body.into())).await {
        Ok(Ok(_)) => {
            tracing::info!(cid = conn.cid, server = %conn.server, "closed a revoked agent's bus connection")
        }
        Ok(Err(e)) => {
            tracing::warn!(cid = conn.cid, error = %e, "cannot close a revoked connection")
        }
        Err(_) => tracing::warn!(cid = conn.cid, "no answer closing a revoked connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(cid: u64, jti: &str, iat: i64) -> Conn {
        Conn {
            server: "N".into(),
            cid,
            jti: jti.into(),
            iat,
            exp: 1_000,
        }
    }

    #[test]
    fn a_revocation_takes_exactly_the_connections_it_ends() {
        let mut cs = Conns::default();
        cs.add("a", conn(1, "j1", 10), 0);
        cs.add("a", conn(2, "j2", 20), 0);
        cs.add("b", conn(3, "j3", 10), 0);
        // tokens issued after the revocation instant stay
        let gone: Vec<u64> = cs
            .take_revoked("agent.a", 15)
            .iter()
            .map(|c| c.cid)
            .collect();
        assert_eq!(gone, vec![1]);
        assert_eq!(cs.take_revoked("jti.j3", 0).len(), 1);
        assert!(cs.take_revoked("jti.j3", 0).is_empty());
        assert!(cs.take_revoked("other.x", 0).is_empty());
        assert_eq!(cs.take_revoked("agent.a", 100).len(), 1);
    }

    #[test]
    fn expired_connections_are_forgotten() {
        let mut cs = Conns::default();
        cs.add("a", conn(1, "j1", 10), 0);
        cs.add("a", conn(2, "j2", 20), 2_000);
        assert_eq!(cs.0["a"].len(), 1);
    }
}
