//! The permission node: who agents are, which space each is bound to, and the signed tokens
//! that prove it.
//!
//! State lives in JetStream KV only — agents in `tether_agents` (agent id → [`Agent`]),
//! public keys in the runtime's keys bucket, revocations in its revoked bucket — so any
//! number of replicas serve the same answers. The node holds one Ed25519 signing key (a
//! PEM file); at start it publishes the public half under its `kid` and retires every other
//! key still marked current, giving each a `not_after` of now + the longest token lifetime,
//! so tokens signed before a rotation stay valid until they expire and no longer.
//!
//! It also decides who may connect to the bus at all: [`callout`] answers the server's auth
//! callout from the connection's token, with the NATS permissions of [`access`]; the server
//! configuration that makes the server ask is [`server_conf`]'s.
//!
//! Authorization rules (the one place they are written down):
//! - `agents.register` needs `agents:admin`; a caller can grant only scopes it holds itself.
//! - `agents.get` / `agents.list` need `agents:read` (an agent may always read itself).
//! - `agents.revoke` needs `agents:admin`.
//! - `tokens.issue`: an agent may refresh its own token; `tokens:issue` may issue for agents
//!   of the caller's own space; operator for anyone. Scopes are a subset of the agent's.
//! - `tokens.worker` (a worker replica's token, for the orchestrator): see [`worker_tokens`].
//! - `agents.hostable` (whether `workers.deploy` may name an agent, for the orchestrator): see
//!   [`worker_tokens`].
//! - `tokens.daemon` (a space daemon's bus identity, for the orchestrator): see
//!   [`daemon_tokens`]. `agents.register` refuses its scope `daemon:serve`.
//! - `auth.keys` is public: public keys are not secrets.

pub mod access;
pub mod callout;
pub mod daemon_tokens;
pub mod nats_jwt;
pub mod server_conf;
pub mod worker_tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::Deserialize;
use tether_auth::{Claims, KeySet, PublicKey, Scope, ScopeSet, SigningKey};
use tether_bus::auth::{
    keys_bucket_config, revoked_agent_key, revoked_bucket_config, revoked_jti_key,
};
use tether_bus::config::AuthConfig;
use tether_bus::kv::{Bucket, Change, open_or_create_bucket};
use tether_bus::subject::is_valid_token;
use tether_bus::{BusConfig, Caller, Endpoint, Node, Problem, PublicRequest, Request};
use tether_proto::{
    Agent, AgentList, AgentRef, IssueTokenRequest, IssuedToken, KeySet as KeySetMsg,
    ListAgentsRequest, PublicKey as PublicKeyMsg, RegisterAgentRequest, RevokeRequest,
    RevokeResponse,
};

pub const NAME: &str = "permission-node";

/// The node's own settings (top level of `tether.toml`, or `TETHER_*`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PermissionConfig {
    /// PEM (PKCS#8) Ed25519 signing key. Default: [`tether_bus::config::default_signing_key_path`].
    pub signing_key_file: Option<PathBuf>,
    /// Make a key at that path when there is none (local development only).
    pub create_signing_key: bool,
    /// Lifetime of a token when the request names none.
    pub default_token_ttl_seconds: u64,
    /// Longest lifetime a token can get; longer requests are capped.
    pub max_token_ttl_seconds: u64,
    pub agents_bucket: String,
    /// The orchestrators' worker deployments (read to check `tokens.worker`).
    pub workers_bucket: String,
    /// Replicas of the KV buckets (3 on a JetStream cluster).
    pub kv_replicas: usize,
    /// The bus's auth callout (`[callout]`): off unless its key files are set.
    pub callout: callout::CalloutConfig,
}

impl Default for PermissionConfig {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            create_signing_key: false,
            default_token_ttl_seconds: 900,
            max_token_ttl_seconds: 3600,
            agents_bucket: "tether_agents".into(),
            workers_bucket: "tether_workers".into(),
            kv_replicas: 1,
            callout: callout::CalloutConfig::default(),
        }
    }
}

impl PermissionConfig {
    pub fn key_path(&self) -> PathBuf {
        self.signing_key_file
            .clone()
            .unwrap_or_else(tether_bus::config::default_signing_key_path)
    }
}

/// Reads the signing key, or makes one (mode 0600, parent 0700) when `create` is set.
pub fn load_or_create_key(path: &Path, create: bool) -> anyhow::Result<SigningKey> {
    match std::fs::read_to_string(path) {
        Ok(pem) => SigningKey::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("signing key {} is unusable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let key = SigningKey::generate()
                .map_err(|e| anyhow::anyhow!("cannot generate a signing key: {e}"))?;
            write_key_file(path, &key, false)?;
            tracing::warn!(path = %path.display(), kid = %key.kid(), "made a new development signing key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no signing key at {}: run `tether keys init` (or set create_signing_key for development)",
            path.display()
        ),
        Err(e) => anyhow::bail!("cannot read signing key {}: {e}", path.display()),
    }
}

/// Writes a key file with mode 0600 (its folder 0700). Refuses to overwrite unless `force`.
pub fn write_key_file(path: &Path, key: &SigningKey, force: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(key.to_pem().as_bytes())?;
    Ok(())
}

struct State {
    key: SigningKey,
    cfg: PermissionConfig,
    auth: AuthConfig,
    agents: Bucket<Agent>,
    keys: kv::Store,
    revoked: kv::Store,
    js: async_nats::jetstream::Context,
}

/// Builds the node: opens the buckets, publishes the public key, retires older keys.
pub async fn build(
    bus: &BusConfig,
    cfg: PermissionConfig,
    key: SigningKey,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<Node> {
    let agents = Bucket::open(
        js,
        kv::Config {
            bucket: cfg.agents_bucket.clone(),
            description: "tether: registered agents (agent id -> agent)".into(),
            history: 1,
            num_replicas: cfg.kv_replicas.max(1),
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        },
        tether_bus::Encoding::Json,
    )
    .await?
    .named("agent registry");
    let keys = open_or_create_bucket(js, keys_bucket_config(&bus.auth, cfg.kv_replicas)).await?;
    let revoked =
        open_or_create_bucket(js, revoked_bucket_config(&bus.auth, cfg.kv_replicas)).await?;
    publish_key(
        &keys,
        &key,
        cfg.max_token_ttl_seconds + bus.auth.leeway_seconds,
    )
    .await?;

    let st = Arc::new(State {
        key,
        cfg,
        auth: bus.auth.clone(),
        agents,
        keys,
        revoked,
        js: js.clone(),
    });
    let s = |st: &Arc<State>| st.clone();
    let (s1, s2, s3, s4, s5, s6) = (s(&st), s(&st), s(&st), s(&st), s(&st), s(&st));
    let (s7, s8, s9) = (s(&st), s(&st), s(&st));
    Ok(Node::new(NAME, env!("CARGO_PKG_VERSION"))
        .description("agents, spaces and signed tokens")
        .metadata("kid", st.key.kid())
        .endpoint(
            Endpoint::new("agents.register", move |r| register(s1.clone(), r))
                .scope(Scope::AgentsAdmin),
        )
        .endpoint(Endpoint::new("agents.get", move |r| get(s2.clone(), r)))
        .endpoint(
            Endpoint::new("agents.list", move |r| list(s3.clone(), r)).scope(Scope::AgentsRead),
        )
        .endpoint(
            Endpoint::new("agents.revoke", move |r| revoke(s4.clone(), r))
                .scope(Scope::AgentsAdmin),
        )
        .endpoint(Endpoint::new("tokens.issue", move |r| issue(s5.clone(), r)))
        // Public at the token level: the bus lets only the orchestrator publish it.
        .endpoint(Endpoint::public("tokens.worker", move |r| {
            worker_tokens::issue_worker(s7.clone(), r)
        }))
        // Public at the token level too: the bus lets only the orchestrator publish it.
        .endpoint(Endpoint::public("agents.hostable", move |r| {
            worker_tokens::hostable(s8.clone(), r)
        }))
        // Public at the token level too: the bus lets only the orchestrator publish it.
        .endpoint(Endpoint::public("tokens.daemon", move |r| {
            daemon_tokens::issue_daemon(s9.clone(), r)
        }))
        .endpoint(Endpoint::public("auth.keys", move |r| {
            public_keys(s6.clone(), r)
        })))
}

/// Publishes `key` as current and gives every other current key an end of validity.
async fn publish_key(keys: &kv::Store, key: &SigningKey, grace_secs: u64) -> anyhow::Result<()> {
    let retire_at = tether_auth::now_unix() + i64::try_from(grace_secs).unwrap_or(i64::MAX / 2);
    let mut names = keys
        .keys()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list keys: {e}"))?;
    while let Some(kid) = names.next().await {
        let Ok(kid) = kid else { continue };
        if kid == key.kid() {
            continue;
        }
        let Some(raw) = keys.get(kid.as_str()).await.ok().flatten() else {
            continue;
        };
        let Ok(mut old) = serde_json::from_slice::<PublicKey>(&raw) else {
            continue;
        };
        if old.not_after == 0 {
            old.not_after = retire_at;
            keys.put(kid.as_str(), serde_json::to_vec(&old)?.into())
                .await?;
            tracing::info!(kid = %kid, not_after = retire_at, "retiring previous signing key");
        }
    }
    keys.put(key.kid(), serde_json::to_vec(&key.public_key())?.into())
        .await?;
    tracing::info!(kid = %key.kid(), "signing key published");
    Ok(())
}

/// Failures of the key and revocation buckets (the agents' are the [`Bucket`]'s own).
fn kv_err(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("agent registry unavailable: {e}"))
}

fn validate_id(what: &str, v: &str) -> Result<(), Problem> {
    if v.is_empty() {
        return Err(Problem::bad_request(format!("`{what}` is required")));
    }
    if !is_valid_token(v) {
        return Err(Problem::bad_request(format!(
            "`{what}` must be 1-128 characters of A-Z a-z 0-9 - _ (got {v:?})"
        )));
    }
    Ok(())
}

async fn register(st: Arc<State>, req: Request<RegisterAgentRequest>) -> Result<Agent, Problem> {
    let caller = &req.caller;
    let b = &req.body;
    validate_id("agent_id", &b.agent_id)?;
    validate_id("space", &b.space)?;
    if b.space.starts_with(tether_auth::POOL_SPACE_PREFIX) {
        return Err(Problem::bad_request(format!(
            "`space` {:?}: spaces starting with `{}` are warm-pool containers' own",
            b.space,
            tether_auth::POOL_SPACE_PREFIX
        )));
    }
    // A non-operator registers agents only into its own space.
    caller.space_for(&b.space)?;
    let scopes = ScopeSet::parse(&b.scopes).map_err(|e| Problem::bad_request(e.to_string()))?;
    if scopes.iter().any(|s| *s == Scope::DaemonServe) {
        return Err(Problem::bad_request(
            "`daemon:serve` is a space daemon's scope (`tokens.daemon`); no agent holds it",
        ));
    }
    if !caller.scopes.contains_all(&scopes) {
        return Err(Problem::forbidden(
            "a caller can grant only scopes it holds itself",
        ));
    }
    let agent = Agent {
        agent_id: b.agent_id.clone(),
        space: b.space.clone(),
        scopes: scopes.to_strings(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        revoked: false,
    };
    // Registering again with the same binding and scopes is a no-op that answers the record.
    let stored = st
        .agents
        .modify(&b.agent_id, |existing| match existing {
            None => Ok(Change::Write(agent.clone())),
            Some(existing) if existing.revoked => Err(Problem::conflict(format!(
                "agent `{}` was revoked; register it under a new id",
                b.agent_id
            ))),
            Some(existing) if existing.space != agent.space => Err(Problem::conflict(format!(
                "agent `{}` is already bound to space `{}`",
                b.agent_id, existing.space
            ))),
            Some(existing) if existing.scopes != agent.scopes => Err(Problem::conflict(format!(
                "agent `{}` exists with scopes {:?}",
                b.agent_id, existing.scopes
            ))),
            Some(_) => Ok(Change::Keep),
        })
        .await?
        .ok_or_else(|| Problem::conflict("agent is being changed concurrently; try again"))?;
    if stored.written {
        tracing::info!(agent = %agent.agent_id, space = %agent.space, by = %caller.agent_id, "agent registered");
    }
    Ok(stored.value)
}

/// An agent reads itself; reading others needs `agents:read`, within the caller's space
/// unless it is an operator.
fn may_read(caller: &Caller, agent: &Agent) -> Result<(), Problem> {
    if caller.agent_id == agent.agent_id {
        return Ok(());
    }
    caller.require(Scope::AgentsRead)?;
    caller.space_for(&agent.space).map(|_| ())
}

async fn get(st: Arc<State>, req: Request<AgentRef>) -> Result<Agent, Problem> {
    validate_id("agent_id", &req.body.agent_id)?;
    let caller = &req.caller;
    match st.agents.get(&req.body.agent_id).await?.map(|(a, _)| a) {
        Some(a) => {
            may_read(caller, &a)?;
            Ok(a)
        }
        // Do not tell a caller without read rights whether the agent exists.
        None if caller.scopes.allows(Scope::AgentsRead) => Err(Problem::not_found(format!(
            "no agent `{}`",
            req.body.agent_id
        ))),
        None => Err(Problem::forbidden(
            "scope `agents:read` required to read another agent",
        )),
    }
}

async fn list(st: Arc<State>, req: Request<ListAgentsRequest>) -> Result<AgentList, Problem> {
    let caller = &req.caller;
    if !req.body.space.is_empty() {
        validate_id("space", &req.body.space)?;
        caller.space_for(&req.body.space)?;
    }
    // A non-operator sees only its own space.
    let only_space = if caller.is_operator() {
        req.body.space.clone()
    } else {
        caller.space.clone()
    };
    let mut agents = Vec::new();
    for k in st.agents.keys().await? {
        if let Some((a, _)) = st.agents.get(&k).await?
            && (only_space.is_empty() || a.space == only_space)
        {
            agents.push(a);
        }
    }
    agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    Ok(AgentList { agents })
}

async fn revoke(st: Arc<State>, req: Request<RevokeRequest>) -> Result<RevokeResponse, Problem> {
    let b = &req.body;
    let now = tether_auth::now_unix().to_string();
    match (b.agent_id.is_empty(), b.jti.is_empty()) {
        (true, true) => Err(Problem::bad_request(
            "name an `agent_id` or a token `jti` to revoke",
        )),
        (false, false) => Err(Problem::bad_request(
            "name either `agent_id` or `jti`, not both",
        )),
        (false, true) => {
            let agent = registered_agent(&st, &b.agent_id).await?;
            req.caller.space_for(&agent.space)?;
            // The revocation first: from here on its tokens are refused, whatever follows.
            st.revoked
                .put(revoked_agent_key(&b.agent_id), now.into())
                .await
                .map_err(kv_err)?;
            st.agents
                .modify(&b.agent_id, |a| match a {
                    Some(a) if !a.revoked => Ok(Change::Write(Agent { revoked: true, ..a })),
                    _ => Ok(Change::Keep),
                })
                .await?;
            tracing::info!(agent = %b.agent_id, reason = %b.reason, "agent revoked");
            Ok(RevokeResponse {
                revoked: true,
                agent_id: b.agent_id.clone(),
                jti: String::new(),
            })
        }
        (true, false) => {
            if !req.caller.is_operator() {
                return Err(Problem::forbidden(
                    "revoking a token by `jti` needs operator scope",
                ));
            }
            if b.jti.len() > 128
                || !b
                    .jti
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(Problem::bad_request("`jti` is not a token id"));
            }
            st.revoked
                .put(revoked_jti_key(&b.jti), now.into())
                .await
                .map_err(kv_err)?;
            tracing::info!(jti = %b.jti, reason = %b.reason, "token revoked");
            Ok(RevokeResponse {
                revoked: true,
                agent_id: String::new(),
                jti: b.jti.clone(),
            })
        }
    }
}

async fn issue(st: Arc<State>, req: Request<IssueTokenRequest>) -> Result<IssuedToken, Problem> {
    let caller = &req.caller;
    let b = &req.body;
    let agent = registered_agent(&st, &b.agent_id).await?;
    let allowed = caller.is_operator()
        || caller.agent_id == agent.agent_id
        || (caller.scopes.allows(Scope::TokensIssue) && caller.space == agent.space);
    if !allowed {
        return Err(Problem::forbidden(format!(
            "not allowed to issue tokens for agent `{}`",
            agent.agent_id
        )));
    }
    let registered = usable(&agent)?;
    let scopes = if b.scopes.is_empty() {
        registered
    } else {
        let asked = ScopeSet::parse(&b.scopes).map_err(|e| Problem::bad_request(e.to_string()))?;
        if !registered.contains_all(&asked) {
            return Err(Problem::forbidden(
                "requested scopes exceed the agent's registered scopes",
            ));
        }
        asked
    };
    let issued = sign(&st, &agent, scopes, b.ttl_seconds)?;
    tracing::info!(agent = %agent.agent_id, jti = %issued.jti, by = %caller.agent_id, "token issued");
    Ok(issued)
}

/// The agent `id` (a valid id, registered: 400 or 404 otherwise).
async fn registered_agent(st: &State, id: &str) -> Result<Agent, Problem> {
    validate_id("agent_id", id)?;
    st.agents
        .get(id)
        .await?
        .map(|(a, _)| a)
        .ok_or_else(|| Problem::not_found(format!("no agent `{id}`")))
}

/// The scopes of an agent that may get a token: not revoked.
fn usable(agent: &Agent) -> Result<ScopeSet, Problem> {
    if agent.revoked {
        return Err(Problem::forbidden(format!(
            "agent `{}` is revoked",
            agent.agent_id
        )));
    }
    ScopeSet::parse(&agent.scopes).map_err(|e| Problem::internal(e.to_string()))
}

/// A token of `agent` with `scopes`, for `ttl_seconds` (0: the default), never longer than
/// the maximum.
fn sign(
    st: &State,
    agent: &Agent,
    scopes: ScopeSet,
    ttl_seconds: u32,
) -> Result<IssuedToken, Problem> {
    let ttl = match u64::from(ttl_seconds) {
        0 => st.cfg.default_token_ttl_seconds,
        t => t,
    }
    .min(st.cfg.max_token_ttl_seconds);
    let claims = Claims::new(
        &st.auth.issuer,
        &st.auth.audience,
        &agent.agent_id,
        &agent.space,
        scopes,
        tether_auth::now_unix(),
        ttl,
    );
    let token = st
        .key
        .sign(&claims)
        .map_err(|e| Problem::internal(format!("cannot sign: {e}")))?;
    Ok(IssuedToken {
        token,
        agent_id: agent.agent_id.clone(),
        space: agent.space.clone(),
        scopes: claims.scopes.to_strings(),
        jti: claims.jti,
        expires_at: claims.exp,
        kid: st.key.kid().to_string(),
    })
}

async fn public_keys(
    st: Arc<State>,
    _req: PublicRequest<tether_proto::Empty>,
) -> Result<KeySetMsg, Problem> {
    let mut names = st.keys.keys().await.map_err(kv_err)?;
    let mut keys = Vec::new();
    while let Some(kid) = names.next().await {
        let kid = kid.map_err(kv_err)?;
        if let Some(raw) = st.keys.get(kid.as_str()).await.map_err(kv_err)?
            && let Ok(k) = serde_json::from_slice::<PublicKey>(&raw)
        {
            keys.push(PublicKeyMsg {
                kid: k.kid,
                alg: k.alg,
                x: k.x,
                not_after: k.not_after,
            });
        }
    }
    keys.sort_by(|a, b| a.kid.cmp(&b.kid));
    Ok(KeySetMsg {
        keys,
        issuer: st.auth.issuer.clone(),
        audience: st.auth.audience.clone(),
    })
}

/// A key set from an `auth.keys` reply (for offline verifiers and tools).
pub fn key_set_from(msg: &KeySetMsg) -> KeySet {
    let mut set = KeySet::default();
    for k in &msg.keys {
        let _ = set.insert(PublicKey {
            kid: k.kid.clone(),
            alg: k.alg.clone(),
            x: k.x.clone(),
            not_after: k.not_after,
        });
    }
    set
}

/// Loads config, key and buckets, then serves until `shutdown`.
pub async fn run(
    bus: BusConfig,
    cfg: PermissionConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let key = load_or_create_key(&cfg.key_path(), cfg.create_signing_key)?;
    tether_bus::startup::serve(NAME, bus, shutdown, |b| async move {
        let callout = cfg.callout.clone();
        let node = build(&b.bus, cfg, key, &b.js).await?;
        if callout.enabled() {
            callout::start(&b.bus, &callout, &b.js, b.stopped.clone()).await?;
        }
        Ok(node)
    })
    .await
}
