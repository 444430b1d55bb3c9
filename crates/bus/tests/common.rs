//! Shared fixtures for the runtime's tests: a real nats-server, an echo node, tokens.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tether_auth::{KeySet, Scope, ScopeSet, SigningKey};
use tether_bus::config::AuthConfig;
use tether_bus::{
    BusConfig, CallerKind, Endpoint, Node, NodeHandle, Problem, Request, StaticVerifier,
};
use tether_proto::{EchoReply, EchoRequest};

pub fn config(url: &str) -> BusConfig {
    BusConfig {
        nats_url: url.to_string(),
        drain_timeout_seconds: 10,
        ..Default::default()
    }
}

/// Messages of delayed echoes that have started, so a test can wait until its requests are
/// being served (the node counts a request only when it is done).
static STARTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// True when a delayed echo of `message` has started.
pub fn echo_started(message: &str) -> bool {
    STARTED.lock().expect("lock").iter().any(|m| m == message)
}

pub async fn echo<C: CallerKind>(req: Request<EchoRequest, C>) -> Result<EchoReply, Problem> {
    if req.body.message == "panic" {
        panic!("asked to panic");
    }
    if req.body.delay_ms > 0 {
        STARTED.lock().expect("lock").push(req.body.message.clone());
        tokio::time::sleep(Duration::from_millis(u64::from(req.body.delay_ms))).await;
    }
    let (agent_id, space, scopes) = match req.caller.as_caller() {
        Some(c) => (c.agent_id.clone(), c.space.clone(), c.scopes.to_strings()),
        None => Default::default(),
    };
    Ok(EchoReply {
        message: req.body.message,
        agent_id,
        space,
        scopes,
        node: req.ctx.node.to_string(),
        instance_id: req.ctx.instance_id.to_string(),
    })
}

pub struct Keys {
    pub key: SigningKey,
    pub set: KeySet,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

impl Keys {
    pub fn new() -> Self {
        let key = SigningKey::generate().expect("key");
        let mut set = KeySet::default();
        set.insert(key.public_key()).expect("insert");
        Self { key, set }
    }

    pub fn token(&self, agent: &str, space: &str, scopes: &[Scope]) -> String {
        let scopes: ScopeSet = scopes.iter().copied().collect();
        tether_testkit::sign_token(&self.key, agent, space, scopes, 300).expect("sign")
    }

    pub fn verifier(&self) -> Arc<StaticVerifier> {
        Arc::new(StaticVerifier::new(
            self.set.clone(),
            &AuthConfig::default(),
        ))
    }
}

/// An echo node: `t.echo` public, `t.whoami` needs `shell:exec`.
pub async fn echo_node(cfg: BusConfig, keys: &Keys) -> NodeHandle {
    Node::new("echo-node", "1.0.0")
        .description("echo test node")
        .verifier(keys.verifier())
        .endpoint(Endpoint::public("t.echo", echo))
        .endpoint(Endpoint::new("t.whoami", echo).scope(Scope::ShellExec))
        .start(cfg)
        .await
        .expect("node starts")
}

pub fn json_headers(token: Option<&str>) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    if let Some(t) = token {
        h.insert("Authorization", format!("Bearer {t}").as_str());
    }
    h
}

pub async fn request(
    client: &async_nats::Client,
    subject: &str,
    headers: async_nats::HeaderMap,
    body: impl Into<bytes::Bytes>,
) -> async_nats::Message {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(subject.to_string(), headers, body.into()),
    )
    .await
    .expect("reply within 10 s")
    .expect("request ok")
}

/// Asserts an error reply: both micro headers and a Problem+JSON body with that status.
pub fn assert_problem(m: &async_nats::Message, status: u16) -> serde_json::Value {
    let h = m.headers.as_ref().expect("error reply has headers");
    assert_eq!(
        h.get("Nats-Service-Error-Code").map(|v| v.as_str()),
        Some(status.to_string().as_str())
    );
    assert!(
        h.get("Nats-Service-Error")
            .is_some_and(|v| !v.as_str().is_empty())
    );
    assert_eq!(
        h.get("Content-Type").map(|v| v.as_str()),
        Some("application/problem+json")
    );
    let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("problem body is JSON");
    assert_eq!(body["status"], status);
    assert!(
        !body["detail"].as_str().unwrap_or_default().is_empty(),
        "problem has a detail: {body}"
    );
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://"))
    );
    body
}

pub fn is_ok_reply(m: &async_nats::Message) -> bool {
    m.headers
        .as_ref()
        .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none())
}
