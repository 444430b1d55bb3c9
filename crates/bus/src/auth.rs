//! The authentication hook: who is calling, verified before any handler runs.
//!
//! A protected endpoint declares the [`Scope`] it needs. The runtime reads
//! `Authorization: Bearer <jwt>`, asks the node's [`Verify`] implementation for the claims,
//! checks the scope, and hands the handler a [`Caller`] — never the raw token. The token is
//! kept inside the caller as an opaque [`BearerToken`] that can only be forwarded in a header
//! (shell-server → orchestrator), never printed.
//!
//! [`KvVerifier`] is the verifier every node uses in production: public keys and revocations
//! live in JetStream KV buckets written by the permission node; the verifier keeps both in
//! memory, follows them with live watches (a revocation reaches every node in milliseconds),
//! and fetches a key it does not know yet on first sight of its `kid`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::future::BoxFuture;
use tether_auth::{AuthError, Claims, KeySet, PublicKey, Scope, ScopeSet, Validation};
use tokio_util::sync::CancellationToken;

use crate::Problem;
use crate::config::AuthConfig;
use crate::kv::open_or_create_bucket;

pub const AUTHORIZATION: &str = "Authorization";

/// A bearer token, opaque: it can be forwarded in a header but never formatted.
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token))
    }
    /// Puts `Authorization: Bearer …` into outgoing headers (forwarding the caller's identity).
    pub fn insert_into(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(AUTHORIZATION, format!("Bearer {}", self.0).as_str());
    }
    /// The token itself, for the few places that must hand it on (an MCP client's env).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(***)")
    }
}

/// The verified caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub agent_id: String,
    pub space: String,
    pub scopes: ScopeSet,
    pub jti: String,
    pub expires_at: i64,
    token: BearerToken,
}

impl Caller {
    pub fn from_claims(claims: Claims, token: BearerToken) -> Self {
        Self {
            agent_id: claims.sub,
            space: claims.space,
            scopes: claims.scopes,
            jti: claims.jti,
            expires_at: claims.exp,
            token,
        }
    }

    pub fn is_operator(&self) -> bool {
        self.scopes.is_operator()
    }

    /// 403 unless the caller holds `scope` (operator holds every scope).
    pub fn require(&self, scope: Scope) -> Result<(), Problem> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "scope `{}` required",
                scope.as_str()
            )))
        }
    }

    /// The space a request acts in. Empty `requested` means the caller's own space. An agent
    /// naming another space is refused (403); an operator may name any space.
    pub fn space_for(&self, requested: &str) -> Result<String, Problem> {
        if requested.is_empty() || requested == self.space {
            if self.space.is_empty() && requested.is_empty() {
                return Err(Problem::bad_request(
                    "the token is bound to no space; name one in `space`",
                ));
            }
            return Ok(if requested.is_empty() {
                self.space.clone()
            } else {
                requested.to_string()
            });
        }
        if self.is_operator() {
            Ok(requested.to_string())
        } else {
            Err(Problem::forbidden(format!(
                "agent `{}` may act only in its own space `{}`, not `{requested}`",
                self.agent_id, self.space
            )))
        }
    }

    /// The caller's token, to forward to another node.
    pub fn bearer(&self) -> &BearerToken {
        &self.token
    }
}

/// Verifies a bearer token. Implementations must be cheap for known keys (this runs on every
/// protected request) and must never include the token in an error.
pub trait Verify: Send + Sync + 'static {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Claims, AuthError>>;

    /// The caller of a token when that is known without waiting — a token verified before,
    /// its expiry, not-before and revocation checked now — else `None`, and the runtime
    /// awaits [`Verify::verify`]. The request path's fast lane: no future, no copy of the token.
    fn known_caller(&self, _token: &str) -> Option<Result<Caller, AuthError>> {
        None
    }
}

/// Extracts the token from an `Authorization` header value: exactly `Bearer <token>`.
pub fn parse_bearer(headers: Option<&async_nats::HeaderMap>) -> Result<&str, Problem> {
    parse_bearer_value(
        headers
            .and_then(|h| h.get(AUTHORIZATION))
            .map(|v| v.as_str()),
    )
}

/// [`parse_bearer`] on the `Authorization` value itself (`None` when the header is absent).
pub fn parse_bearer_value(value: Option<&str>) -> Result<&str, Problem> {
    let value = value.ok_or_else(|| {
        Problem::unauthorized("missing Authorization header (expected `Bearer <token>`)")
    })?;
    let mut parts = value.trim().splitn(2, ' ');
    match (parts.next(), parts.next().map(str::trim)) {
        (Some(scheme), Some(token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() =>
        {
            Ok(token)
        }
        _ => Err(Problem::unauthorized(
            "malformed Authorization header (expected `Bearer <token>`)",
        )),
    }
}

/// Maps a verification failure to the caller-visible 401 (the reason, never the token).
pub fn unauthorized(e: &AuthError) -> Problem {
    Problem::unauthorized(format!("invalid token: {e}"))
}

/// Tokens already verified, so the signature check (≈50 µs of Ed25519) runs once per token,
/// not once per request. The key is the whole token: a hit means the very same bytes whose
/// signature was checked. Expiry, not-before and revocation are still checked on every
/// request; the cache is cleared whenever the key set changes; it is bounded.
#[derive(Default)]
pub struct VerifiedCache {
    entries: RwLock<HashMap<Arc<str>, Verified, TailHash>>,
}

/// A verified token's claims, and the caller built from them (sharing the cached token).
struct Verified {
    claims: Claims,
    caller: Caller,
}

/// Hashes a token by its last 32 bytes — signature bytes, which nobody chooses without the
/// signing key — so a lookup hashes 32 bytes instead of the whole token (SipHash over a
/// token of a few hundred bytes was the biggest cost of a cache hit). Keys still compare
/// whole, and only verified tokens are ever inserted.
#[derive(Clone, Default)]
struct TailHash(std::hash::RandomState);

struct TailHasher(std::hash::DefaultHasher);

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(32)..]);
    }
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

impl std::hash::BuildHasher for TailHash {
    type Hasher = TailHasher;
    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

/// Entries kept at most; beyond that the cache starts afresh (cheap, and bounded).
const CACHE_MAX: usize = 16_384;

impl VerifiedCache {
    /// Claims of a token verified before, if still inside its validity window.
    pub fn get(&self, token: &str, leeway: i64, now: i64) -> Option<Result<Claims, AuthError>> {
        self.lookup(token, leeway, now, |v| Ok(v.claims.clone()))
    }

    /// The caller of a token verified before, if still inside its validity window and
    /// passing `check` (revocation).
    pub fn caller(
        &self,
        token: &str,
        leeway: i64,
        now: i64,
        check: impl FnOnce(&Claims) -> Result<(), AuthError>,
    ) -> Option<Result<Caller, AuthError>> {
        self.lookup(token, leeway, now, |v| {
            check(&v.claims)?;
            Ok(v.caller.clone())
        })
    }

    fn lookup<T>(
        &self,
        token: &str,
        leeway: i64,
        now: i64,
        then: impl FnOnce(&Verified) -> Result<T, AuthError>,
    ) -> Option<Result<T, AuthError>> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let v = map.get(token)?;
        if now > v.claims.exp + leeway {
            return Some(Err(AuthError::Expired));
        }
        if now + leeway < v.claims.nbf {
            return Some(Err(AuthError::NotYetValid));
        }
        Some(then(v))
    }

    pub fn insert(&self, token: &str, claims: &Claims) {
        let token: Arc<str> = Arc::from(token);
        let caller = Caller::from_claims(claims.clone(), BearerToken(token.clone()));
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_MAX {
            map.clear();
        }
        map.insert(
            token,
            Verified {
                claims: claims.clone(),
                caller,
            },
        );
    }

    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A verifier over a fixed key set (tests, and offline tools).
pub struct StaticVerifier {
    keys: KeySet,
    validation: Validation,
    cache: VerifiedCache,
}

impl StaticVerifier {
    pub fn new(keys: KeySet, cfg: &AuthConfig) -> Self {
        Self {
            keys,
            validation: validation(cfg),
            cache: VerifiedCache::default(),
        }
    }
}

impl Verify for StaticVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Claims, AuthError>> {
        let now = tether_auth::now_unix();
        let leeway = i64::try_from(self.validation.leeway_secs).unwrap_or(0);
        let r = match self.cache.get(token, leeway, now) {
            Some(r) => r,
            None => tether_auth::verify(token, &self.keys, &self.validation, now)
                .inspect(|c| self.cache.insert(token, c)),
        };
        Box::pin(std::future::ready(r))
    }

    fn known_caller(&self, token: &str) -> Option<Result<Caller, AuthError>> {
        let leeway = i64::try_from(self.validation.leeway_secs).unwrap_or(0);
        self.cache
            .caller(token, leeway, tether_auth::now_unix(), |_| Ok(()))
    }
}

fn validation(cfg: &AuthConfig) -> Validation {
    Validation {
        issuer: cfg.issuer.clone(),
        audience: cfg.audience.clone(),
        leeway_secs: cfg.leeway_seconds,
    }
}

/// Revocation keys in the revoked bucket.
pub fn revoked_agent_key(agent_id: &str) -> String {
    format!("agent.{agent_id}")
}
pub fn revoked_jti_key(jti: &str) -> String {
    format!("jti.{jti}")
}

/// The canonical KV bucket configurations, in one place so every node creating them agrees.
pub fn keys_bucket_config(cfg: &AuthConfig, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: cfg.keys_bucket.clone(),
        description: "tether: public signing keys (kid -> key)".into(),
        history: 1,
        num_replicas: replicas.max(1),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

pub fn revoked_bucket_config(cfg: &AuthConfig, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: cfg.revoked_bucket.clone(),
        description: "tether: revoked agents and token ids".into(),
        history: 1,
        num_replicas: replicas.max(1),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Revocation record value: unix seconds of the revocation. Tokens of a revoked agent
/// issued at or before that instant are refused; tokens revoked by `jti` always are.
#[derive(Default)]
struct Revocations {
    agents: HashMap<String, i64>,
    jtis: HashMap<String, i64>,
}

impl Revocations {
    fn check(&self, claims: &Claims) -> Result<(), AuthError> {
        if self.jtis.contains_key(&claims.jti) {
            return Err(AuthError::Revoked);
        }
        if let Some(at) = self.agents.get(&claims.sub)
            && claims.iat <= *at
        {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }
}

#[derive(Default)]
struct KvState {
    keys: KeySet,
    revoked: Revocations,
    /// Cleared on every key change (a retired or removed key must be checked again).
    verified: Arc<VerifiedCache>,
}

/// The production verifier: keys and revocations from JetStream KV, followed live.
#[derive(Clone)]
pub struct KvVerifier {
    state: Arc<RwLock<KvState>>,
    keys: kv::Store,
    validation: Arc<Validation>,
}

impl KvVerifier {
    /// Opens (or creates) the buckets, loads what is there, and starts the watches, which run
    /// until `stop` is cancelled and re-establish themselves after a bus outage.
    pub async fn start(
        js: &jetstream::Context,
        bus: &crate::BusConfig,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let cfg = &bus.auth;
        let keys = open_or_create_bucket(js, keys_bucket_config(cfg, bus.kv_replicas)).await?;
        let revoked =
            open_or_create_bucket(js, revoked_bucket_config(cfg, bus.kv_replicas)).await?;
        let state = Arc::new(RwLock::new(KvState::default()));
        let v = Self {
            state: state.clone(),
            keys: keys.clone(),
            validation: Arc::new(validation(cfg)),
        };
        // Initial load happens inside the watches (with history); wait for both to be current.
        let (ready_k, ready_k_rx) = tokio::sync::oneshot::channel();
        let (ready_r, ready_r_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(follow(
            keys,
            state.clone(),
            apply_key,
            stop.clone(),
            ready_k,
        ));
        tokio::spawn(follow(revoked, state, apply_revocation, stop, ready_r));
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = ready_k_rx.await;
            let _ = ready_r_rx.await;
        })
        .await;
        Ok(v)
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), AuthError> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.revoked.check(claims)
    }

    fn verify_now(&self, token: &str) -> Result<Claims, AuthError> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let now = tether_auth::now_unix();
        let leeway = i64::try_from(self.validation.leeway_secs).unwrap_or(0);
        if let Some(r) = st.verified.get(token, leeway, now) {
            return r;
        }
        let claims = tether_auth::verify(token, &st.keys, &self.validation, now)?;
        st.verified.insert(token, &claims);
        Ok(claims)
    }

    /// Number of keys known (for tests and `$SRV.INFO` metadata).
    pub fn key_count(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .len()
    }
}

impl Verify for KvVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Claims, AuthError>> {
        Box::pin(async move {
            let claims = match self.verify_now(token) {
                Err(AuthError::UnknownKey(kid)) => {
                    // A key published a moment ago may not have reached our watch yet.
                    let entry = self.keys.get(kid.as_str()).await.ok().flatten();
                    let key = entry.and_then(|b| serde_json::from_slice::<PublicKey>(&b).ok());
                    match key {
                        Some(k) => {
                            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                            let _ = st.keys.insert(k);
                            st.verified.clear();
                        }
                        None => return Err(AuthError::UnknownKey(kid)),
                    }
                    self.verify_now(token)?
                }
                other => other?,
            };
            self.check_revoked(&claims)?;
            Ok(claims)
        })
    }

    fn known_caller(&self, token: &str) -> Option<Result<Caller, AuthError>> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let leeway = i64::try_from(self.validation.leeway_secs).unwrap_or(0);
        st.verified
            .caller(token, leeway, tether_auth::now_unix(), |c| {
                st.revoked.check(c)
            })
    }
}

fn apply_key(st: &mut KvState, entry: &kv::Entry) {
    st.verified.clear();
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<PublicKey>(&entry.value) {
            Ok(k) => {
                if let Err(e) = st.keys.insert(k) {
                    tracing::warn!(kid = %entry.key, error = %e, "ignoring unusable public key");
                }
            }
            Err(e) => {
                tracing::warn!(kid = %entry.key, error = %e, "ignoring malformed public key entry")
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => st.keys.remove(&entry.key),
    }
}

fn apply_revocation(st: &mut KvState, entry: &kv::Entry) {
    let at = std::str::from_utf8(&entry.value)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(i64::MAX);
    let (map, id) = if let Some(id) = entry.key.strip_prefix("agent.") {
        (&mut st.revoked.agents, id)
    } else if let Some(id) = entry.key.strip_prefix("jti.") {
        (&mut st.revoked.jtis, id)
    } else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => {
            map.insert(id.to_string(), at);
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            map.remove(id);
        }
    }
}

/// Follows a bucket: current values first, then every change; on error or stream end (bus
/// outage) it waits and watches again from scratch, so it never stays stale.
async fn follow(
    store: kv::Store,
    state: Arc<RwLock<KvState>>,
    apply: fn(&mut KvState, &kv::Entry),
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(bucket = %store.name, error = %e, "KV watch failed; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // An empty bucket delivers nothing: count it as current once the watch is open.
        let mut got_any = false;
        loop {
            // Until the first entry (or a quiet 200 ms on an empty bucket) we are not current.
            let wait = if ready.is_some() && !got_any {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(86_400)
            };
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = tokio::time::timeout(wait, watch.next()) => match n {
                    Ok(n) => n,
                    Err(_) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        continue;
                    }
                },
            };
            match next {
                Some(Ok(entry)) => {
                    got_any = true;
                    backoff = Duration::from_millis(100);
                    {
                        let mut st = state.write().unwrap_or_else(|p| p.into_inner());
                        apply(&mut st, &entry);
                    }
                    if entry.delta == 0
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(());
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(bucket = %store.name, error = %e, "KV watch interrupted; re-watching");
                    break;
                }
                None => break,
            }
        }
        tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(AUTHORIZATION, v);
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(
            parse_bearer(Some(&headers("Bearer abc"))).expect("ok"),
            "abc"
        );
        assert_eq!(
            parse_bearer(Some(&headers("bearer  abc "))).expect("ok"),
            "abc"
        );
        for bad in ["", "Bearer", "Bearer ", "Basic abc", "abc"] {
            assert_eq!(
                parse_bearer(Some(&headers(bad))).expect_err(bad).status,
                401,
                "{bad}"
            );
        }
        assert_eq!(parse_bearer(None).expect_err("none").status, 401);
    }

    #[test]
    fn token_never_formats() {
        let t = BearerToken::new("secret.jwt.value");
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn space_rules() {
        let scopes: ScopeSet = [Scope::ShellExec].into_iter().collect();
        let c = Caller {
            agent_id: "a".into(),
            space: "s1".into(),
            scopes,
            jti: "j".into(),
            expires_at: 0,
            token: BearerToken::new("t"),
        };
        assert_eq!(c.space_for("").expect("own"), "s1");
        assert_eq!(c.space_for("s1").expect("own"), "s1");
        assert_eq!(c.space_for("s2").expect_err("other").status, 403);
        assert_eq!(c.require(Scope::ModelCall).expect_err("scope").status, 403);
        let op = Caller {
            scopes: [Scope::Operator].into_iter().collect(),
            ..c
        };
        assert_eq!(op.space_for("s2").expect("operator"), "s2");
        assert!(op.require(Scope::ModelCall).is_ok());
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[tokio::test]
    async fn second_verification_is_served_from_the_cache() {
        let key = tether_auth::SigningKey::generate().expect("key");
        let mut set = KeySet::default();
        set.insert(key.public_key()).expect("insert");
        let a = AuthConfig::default();
        let claims = Claims::new(
            &a.issuer,
            &a.audience,
            "a",
            "s",
            [Scope::ShellExec].into_iter().collect(),
            tether_auth::now_unix(),
            60,
        );
        let token = key.sign(&claims).expect("sign");
        let v = StaticVerifier::new(set, &a);
        assert!(v.cache.get(&token, 30, tether_auth::now_unix()).is_none());
        assert_eq!(v.verify(&token).await.expect("valid"), claims);
        assert_eq!(
            v.cache.get(&token, 30, tether_auth::now_unix()),
            Some(Ok(claims.clone()))
        );
        // Expiry is still checked on a hit.
        assert_eq!(
            v.cache.get(&token, 0, claims.exp + 1),
            Some(Err(AuthError::Expired))
        );
        // A tampered token is not a hit.
        let mut t2 = token.clone();
        t2.push('x');
        assert!(v.verify(&t2).await.is_err());
    }
}
