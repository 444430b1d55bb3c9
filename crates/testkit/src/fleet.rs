//! The test fleet: a real nats-server, the permission node in-process, an operator, agents with
//! tokens, requests that answer the reply or the [`Problem`], waiting with a deadline, and the
//! engine cleanup of what the test created.
//!
//! Every crate's tests build on [`Fleet`]; what is specific to a crate (starting the
//! orchestrator, the gateway's stand-in model servers) stays in that crate's tests.
//!
//! Key decisions: a request that finds no responder is the Problem 503 the bus would answer,
//! never a panic; a request that gets no reply at all within its timeout panics (a hang is a
//! failure, and must not pass for a server's own 504). Waiting is [`eventually`]: polling with
//! a deadline, never a fixed sleep. A fleet on a server with a subject prefix
//! ([`NatsServer::start_under`]) is that deployment whole: its methods put service subjects
//! under the prefix ([`prefixed`]), so a test names subjects as an unprefixed fleet does; the
//! free functions ([`call`], [`poll`]) take subjects as they are.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tether_auth::{Claims, Scope, ScopeSet, SigningKey};
pub use tether_bus::Problem;
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, NodeHandle};
use tether_permission_node::PermissionConfig;
pub use tether_permission_node::access::NodeKind;

use crate::NatsServer;
use crate::docker::Cleanup;

/// How long [`call`] waits for a reply by default (tools and engine work can be slow under
/// load; this bounds a hang, it measures nothing).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// A request body: JSON, or raw bytes (for malformed-input tests).
pub struct Body(Vec<u8>);

impl From<Value> for Body {
    fn from(v: Value) -> Self {
        Body(v.to_string().into_bytes())
    }
}

impl From<&Value> for Body {
    fn from(v: &Value) -> Self {
        Body(v.to_string().into_bytes())
    }
}

impl From<&str> for Body {
    fn from(s: &str) -> Self {
        Body(s.as_bytes().to_vec())
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body(s.into_bytes())
    }
}

impl From<&String> for Body {
    fn from(s: &String) -> Self {
        Body(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body(b)
    }
}

/// A bus config for `url` with everything else at its default.
pub fn bus(url: &str) -> BusConfig {
    BusConfig {
        nats_url: url.into(),
        ..Default::default()
    }
}

/// `prefix-` and ten random hex digits: a host id, space or agent of this test alone.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A token signed by `key` with the default issuer and audience, issued now.
pub fn sign_token(
    key: &SigningKey,
    agent: &str,
    space: &str,
    scopes: ScopeSet,
    ttl_seconds: u64,
) -> anyhow::Result<String> {
    let a = AuthConfig::default();
    let c = Claims::new(
        &a.issuer,
        &a.audience,
        agent,
        space,
        scopes,
        tether_auth::now_unix(),
        ttl_seconds,
    );
    key.sign(&c).context("sign token")
}

/// The permission node in-process on `bus` (e.g. [`NatsServer::node_bus`]), signing with
/// `key`. Its auth callout is not started here: [`Fleet`] does that.
pub async fn permission_node(
    bus: &BusConfig,
    key: SigningKey,
    cfg: PermissionConfig,
) -> anyhow::Result<NodeHandle> {
    let client = tether_bus::connect::options(bus, tether_permission_node::NAME)
        .await?
        .connect(tether_bus::connect::servers(&bus.nats_url)?)
        .await
        .context("connect the permission node")?;
    let js = async_nats::jetstream::new(client.clone());
    tether_permission_node::build(bus, cfg, key, &js)
        .await
        .context("build permission node")?
        .start_with_client(bus.clone(), client)
        .await
        .context("start permission node")
}

/// Registers agent `id` in `space` with `scopes` as the operator `op` and returns a fresh
/// token for it, asking the permission node under subject `prefix` (if any). Panics when
/// the permission node refuses.
pub async fn register_agent(
    c: &async_nats::Client,
    prefix: Option<&str>,
    op: &str,
    id: &str,
    space: &str,
    scopes: &[&str],
) -> String {
    call(
        c,
        &prefixed(prefix, "agents.register"),
        json!({"agent_id": id, "space": space, "scopes": scopes}),
        Some(op),
    )
    .await
    .unwrap_or_else(|p| panic!("register {id}: {p:?}"));
    let t = call(
        c,
        &prefixed(prefix, "tokens.issue"),
        json!({"agent_id": id}),
        Some(op),
    )
    .await
    .unwrap_or_else(|p| panic!("issue a token for {id}: {p:?}"));
    t["token"]
        .as_str()
        .unwrap_or_else(|| panic!("tokens.issue answered no token: {t}"))
        .to_string()
}

/// `subject` under a deployment's subject `prefix`: `<prefix>.<subject>`, or `subject` as it
/// is without one (where the nodes of a fleet under that prefix serve it).
pub fn prefixed(prefix: Option<&str>, subject: &str) -> String {
    match prefix {
        Some(p) => format!("{p}.{subject}"),
        None => subject.to_string(),
    }
}

/// A request with an optional bearer token and the default timeout: the JSON reply, or the
/// Problem it answered (no responders: 503). Panics when no reply comes in time or a
/// success reply is not JSON.
pub async fn call(
    c: &async_nats::Client,
    subject: &str,
    body: impl Into<Body>,
    token: Option<&str>,
) -> Result<Value, Problem> {
    request(
        c,
        subject,
        body,
        token,
        async_nats::HeaderMap::new(),
        CALL_TIMEOUT,
    )
    .await
}

/// One round of a poll (inside [`eventually`]): the JSON reply, or `None` for a problem, no
/// responders, or no reply within [`POLL_TIMEOUT`]. Right after a node is SIGKILLed the server
/// may still route a request to its connection; that request is lost, and the next round
/// asks again instead of the whole test waiting out [`CALL_TIMEOUT`].
pub async fn poll(
    c: &async_nats::Client,
    subject: &str,
    body: impl Into<Body>,
    token: Option<&str>,
) -> Option<Value> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(t) = token {
        headers.insert("Authorization", format!("Bearer {t}").as_str());
    }
    let req = async_nats::client::Request::new()
        .payload(body.into().0.into())
        .headers(headers)
        .timeout(Some(POLL_TIMEOUT));
    let m = c.send_request(subject.to_string(), req).await.ok()?;
    if Problem::from_reply(m.headers.as_ref(), &m.payload).is_some() {
        return None;
    }
    serde_json::from_slice(&m.payload).ok()
}

/// How long one round of [`poll`] waits for its reply.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Like [`call`], with extra headers and a timeout of its own.
pub async fn request(
    c: &async_nats::Client,
    subject: &str,
    body: impl Into<Body>,
    token: Option<&str>,
    mut headers: async_nats::HeaderMap,
    timeout: Duration,
) -> Result<Value, Problem> {
    if let Some(t) = token {
        headers.insert("Authorization", format!("Bearer {t}").as_str());
    }
    let req = async_nats::client::Request::new()
        .payload(body.into().0.into())
        .headers(headers)
        .timeout(Some(timeout));
    let m = match c.send_request(subject.to_string(), req).await {
        Ok(m) => m,
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(Problem::new(503, format!("no responders on {subject}")));
        }
        Err(e) => panic!("request {subject}: {e}"),
    };
    if let Some(p) = Problem::from_reply(m.headers.as_ref(), &m.payload) {
        return Err(p);
    }
    Ok(serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
        panic!(
            "reply on {subject} is not JSON ({e}): {}",
            String::from_utf8_lossy(&m.payload)
        )
    }))
}

/// The claims of a JWT, read WITHOUT verifying it (what a test checks a node issued).
pub fn unverified_claims(token: &str) -> Value {
    use base64::Engine as _;
    let part = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {} characters", token.len()));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("JWT claims are base64url");
    serde_json::from_slice(&raw).expect("JWT claims are JSON")
}

/// Polls `f` until it returns `Some` (its value is returned) or `within` passes (then it
/// panics naming `what`).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 64-bit number from JSON (proto3 JSON writes them as strings).
pub fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A real nats-server, the permission node in-process, an operator token, a client, and the
/// engine cleanup of this test.
///
/// Fields drop in order: the server is killed first (so no node creates anything more), then
/// the permission node, then the engine is cleaned of what [`Fleet::engine`] names.
pub struct Fleet {
    pub nats: NatsServer,
    /// The permission node's signing key.
    pub key: SigningKey,
    /// `None` after a test took it down.
    pub perm: Option<NodeHandle>,
    /// An operator token (also [`Fleet::operator`]).
    pub op: String,
    /// A client of the server as its admin user (every permission).
    pub c: async_nats::Client,
    /// Containers and networks removed when the fleet drops (also on panic).
    pub engine: Cleanup,
    /// Stops the permission node's auth callout when the fleet drops.
    pub callout: Option<tokio_util::sync::DropGuard>,
}

impl Fleet {
    /// A fleet with the permission node at its default config.
    pub async fn start() -> anyhow::Result<Fleet> {
        Self::start_with(PermissionConfig::default()).await
    }

    /// A fleet with the permission node at `cfg`.
    pub async fn start_with(cfg: PermissionConfig) -> anyhow::Result<Fleet> {
        Self::on(NatsServer::start().await?, cfg).await
    }

    /// A fleet on `nats` (e.g. [`NatsServer::start_for_containers`]) with the permission node
    /// at `cfg`. On a server with a subject prefix ([`NatsServer::start_under`]) the permission
    /// node and its auth callout run under that prefix, and [`Fleet::call`], [`Fleet::poll`]
    /// and [`Fleet::agent`] ask under it.
    pub async fn on(nats: NatsServer, cfg: PermissionConfig) -> anyhow::Result<Fleet> {
        let key = SigningKey::generate().context("generate key")?;
        let bus = nats.node_bus(NodeKind::Permission);
        let perm = permission_node(
            &bus,
            SigningKey::from_pem(&key.to_pem()).context("key from pem")?,
            cfg,
        )
        .await?;
        let op = operator_token(&key)?;
        let c = nats.client().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let callout = nats.callout();
        tether_permission_node::callout::start(
            &bus,
            &callout,
            &async_nats::jetstream::new(c.clone()),
            stop.clone(),
        )
        .await
        .context("start the auth callout")?;
        Ok(Fleet {
            nats,
            key,
            perm: Some(perm),
            op,
            c,
            engine: Cleanup::default(),
            callout: Some(stop.drop_guard()),
        })
    }

    /// `nats://127.0.0.1:PORT` of the server.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// A bus config for a node of this fleet, as the admin user (for tests' own nodes).
    pub fn bus(&self) -> BusConfig {
        bus(&self.url())
    }

    /// A bus config for a node of `kind`, as that kind's own NATS user (under the server's
    /// subject prefix, if any).
    pub fn node_bus(&self, kind: NodeKind) -> BusConfig {
        self.nats.node_bus(kind)
    }

    /// Where this fleet's nodes serve `subject` ([`NatsServer::subject`]).
    pub fn subject(&self, subject: &str) -> String {
        self.nats.subject(subject)
    }

    /// A client connected as node kind `kind`'s own NATS user (its nkey), as that node
    /// connects.
    pub async fn connect_node(&self, kind: NodeKind) -> anyhow::Result<async_nats::Client> {
        tether_bus::connect::connect(
            &self.node_bus(kind),
            kind.name(),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
    }

    /// A client connected as the holder of `token` (through the auth callout), listening on
    /// its own inbox. The error is the server's refusal.
    pub async fn connect_as(&self, token: &str) -> anyhow::Result<async_nats::Client> {
        let cfg = BusConfig {
            nats_url: self.nats.plain_url(),
            nats_token: Some(tether_bus::config::Secret::new(token)),
            ..Default::default()
        };
        let opts = tether_bus::connect::options(&cfg, "tether-test-agent").await?;
        Ok(opts
            .max_reconnects(Some(1))
            .connect(tether_bus::connect::servers(&cfg.nats_url)?)
            .await?)
    }

    /// The operator's token.
    pub fn operator(&self) -> &str {
        &self.op
    }

    /// Registers agent `id` in `space` with `scopes` (as the operator) and returns a fresh
    /// token for it. Panics when the permission node refuses.
    pub async fn agent(&self, id: &str, space: &str, scopes: &[&str]) -> String {
        register_agent(
            &self.c,
            self.nats.subject_prefix(),
            &self.op,
            id,
            space,
            scopes,
        )
        .await
    }

    /// [`call`] on this fleet's client, on [`Fleet::subject`] of `subject`.
    pub async fn call(
        &self,
        subject: &str,
        body: impl Into<Body>,
        token: Option<&str>,
    ) -> Result<Value, Problem> {
        call(&self.c, &self.subject(subject), body, token).await
    }

    /// [`poll`] on this fleet's client, on [`Fleet::subject`] of `subject`.
    pub async fn poll(
        &self,
        subject: &str,
        body: impl Into<Body>,
        token: Option<&str>,
    ) -> Option<Value> {
        poll(&self.c, &self.subject(subject), body, token).await
    }

    /// Removes, when the fleet drops, every container and network labelled with `label`
    /// (`key=value`, e.g. the orchestrator's `tether.host=<host id>`).
    pub fn clean_label(&mut self, label: impl Into<String>) {
        self.engine.label(label);
    }
}

/// A client of `cfg` built like every shipped client ([`tether_bus::connect::options`]: token
/// file re-read at each reconnect, the agent's own inbox), whose connection events (connects,
/// disconnects, the server's `-ERR`s such as permission violations) arrive on the returned
/// channel. The error is the server's refusal.
pub async fn connect_with_events(
    cfg: &BusConfig,
    name: &str,
) -> anyhow::Result<(
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let c = tether_bus::connect::options(cfg, name)
        .await?
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(tether_bus::connect::servers(&cfg.nats_url)?)
        .await?;
    Ok((c, rx))
}

/// An operator token (scope `operator`, no space, one hour) signed by `key`.
pub fn operator_token(key: &SigningKey) -> anyhow::Result<String> {
    sign_token(
        key,
        "operator",
        "",
        [Scope::Operator].into_iter().collect(),
        3600,
    )
}

/// One `containers.exec` of `true` as the agent of `token`, through
/// `tether_bus::connect::request`: whether it was answered with success within `timeout` (a
/// lost or late request is `false`, and the caller asks again), for failover tests.
pub async fn exec_ok(c: &async_nats::Client, token: &str, timeout: Duration) -> bool {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {token}").as_str());
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(json!({"command": "true"}).to_string().into());
    let Ok(m) = tether_bus::connect::request(c, "containers.exec".into(), req, timeout).await
    else {
        return false;
    };
    serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["exit_code"] == 0)
}
