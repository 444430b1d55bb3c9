//! Fixtures: a real nats-server, the permission node in-process, an orchestrator on the real
//! Docker engine with a host id of its own (so parallel tests never see each other's
//! containers), agents with tokens, and a guard that removes every container of the test —
//! also when it panics.

#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_auth::{Claims, Scope, SigningKey};
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, NodeHandle};
use tether_container_orchestrator::OrchestratorConfig;
use tether_permission_node::PermissionConfig;
use tether_testkit::NatsServer;

pub const SCOPES: &[&str] = &["containers:write", "containers:exec", "containers:read"];

pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes this test's containers (by host label, plus named extras) when dropped.
pub struct Cleanup {
    pub host_ids: Vec<String>,
    pub names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut ids: Vec<String> = Vec::new();
        for h in &self.host_ids {
            let l = format!("label=tether.host={h}");
            ids.extend(
                docker(&["ps", "-aq", "--filter", &l])
                    .lines()
                    .map(str::to_string),
            );
        }
        ids.extend(self.names.iter().cloned());
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = Command::new("docker").args(&args).output();
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

pub fn bus(url: &str) -> BusConfig {
    BusConfig {
        nats_url: url.into(),
        ..Default::default()
    }
}

pub fn orch_config(host_id: &str) -> OrchestratorConfig {
    OrchestratorConfig {
        host_id: host_id.into(),
        janitor_interval_seconds: 1,
        ..Default::default()
    }
}

pub struct Fleet {
    pub nats: NatsServer,
    pub key: SigningKey,
    pub perm: Option<NodeHandle>,
    pub orch: Option<NodeHandle>,
    pub op: String,
    pub c: async_nats::Client,
    pub host_id: String,
    pub image: String,
    pub cleanup: Cleanup,
}

pub async fn start_orchestrator(url: &str, cfg: OrchestratorConfig) -> NodeHandle {
    let b = bus(url);
    let client = async_nats::connect(url).await.expect("connect");
    tether_container_orchestrator::build(&b, cfg, &client)
        .await
        .expect("build orchestrator")
        .start_with_client(b, client)
        .await
        .expect("start orchestrator")
}

/// A bus, a permission node and (unless `with_orchestrator` is false) an orchestrator.
pub async fn fleet_with(
    with_orchestrator: bool,
    tweak: impl FnOnce(&mut OrchestratorConfig),
) -> Fleet {
    let image = tether_testkit::docker::busybox_image().expect("test image");
    let nats = NatsServer::start().await.expect("nats");
    let key = SigningKey::generate().expect("key");
    let b = bus(&nats.url());
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let perm = tether_permission_node::build(
        &b,
        PermissionConfig::default(),
        SigningKey::from_pem(&key.to_pem()).expect("pem"),
        &js,
    )
    .await
    .expect("permission node")
    .start_with_client(b, client)
    .await
    .expect("start permission node");
    let host_id = unique("t");
    let cleanup = Cleanup {
        host_ids: vec![host_id.clone()],
        names: Vec::new(),
    };
    let orch = if with_orchestrator {
        let mut cfg = orch_config(&host_id);
        tweak(&mut cfg);
        Some(start_orchestrator(&nats.url(), cfg).await)
    } else {
        None
    };
    let a = AuthConfig::default();
    let op = key
        .sign(&Claims::new(
            &a.issuer,
            &a.audience,
            "operator",
            "",
            [Scope::Operator].into_iter().collect(),
            tether_auth::now_unix(),
            3600,
        ))
        .expect("sign");
    let c = nats.client().await.expect("client");
    Fleet {
        nats,
        key,
        perm: Some(perm),
        orch,
        op,
        c,
        host_id,
        image,
        cleanup,
    }
}

pub async fn fleet() -> Fleet {
    fleet_with(true, |_| {}).await
}

/// A request; `Err((status, detail))` for a Problem reply.
pub async fn call(
    c: &async_nats::Client,
    subject: &str,
    token: Option<&str>,
    body: &str,
) -> Result<Value, (u16, String)> {
    let mut h = async_nats::HeaderMap::new();
    if let Some(t) = token {
        h.insert("Authorization", format!("Bearer {t}").as_str());
    }
    let req = async_nats::client::Request::new()
        .payload(body.to_string().into())
        .headers(h)
        .timeout(Some(Duration::from_secs(90)));
    let m = match c.send_request(subject.to_string(), req).await {
        Ok(m) => m,
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err((503, format!("no responders on {subject}")));
        }
        Err(e) => panic!("request {subject}: {e}"),
    };
    if let Some(p) = tether_bus::Problem::from_reply(m.headers.as_ref(), &m.payload) {
        return Err((p.status, p.detail));
    }
    Ok(serde_json::from_slice(&m.payload).expect("json reply"))
}

pub async fn callj(
    c: &async_nats::Client,
    subject: &str,
    token: &str,
    body: Value,
) -> Result<Value, (u16, String)> {
    call(c, subject, Some(token), &body.to_string()).await
}

impl Fleet {
    /// Registers an agent for `space` and returns its token.
    pub async fn agent(&self, id: &str, space: &str, scopes: &[&str]) -> String {
        callj(
            &self.c,
            "agents.register",
            &self.op,
            json!({"agent_id": id, "space": space, "scopes": scopes}),
        )
        .await
        .expect("register");
        let t = callj(&self.c, "tokens.issue", &self.op, json!({"agent_id": id}))
            .await
            .expect("issue");
        t["token"].as_str().expect("token").to_string()
    }

    /// Creates the caller's space container (busybox) with extra fields merged in.
    pub async fn create_space(&self, token: &str, extra: Value) -> Value {
        let mut body = json!({"image": self.image});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        callj(&self.c, "containers.create", token, body)
            .await
            .expect("create space container")
    }

    pub async fn exec(&self, token: &str, body: Value) -> Result<Value, (u16, String)> {
        callj(&self.c, "containers.exec", token, body).await
    }

    pub async fn exec_on(
        &self,
        subject: &str,
        token: &str,
        body: Value,
    ) -> Result<Value, (u16, String)> {
        callj(&self.c, subject, token, body).await
    }

    /// Managed containers of this test's host, straight from the engine.
    pub fn engine_containers(&self) -> Vec<String> {
        let l = format!("label=tether.host={}", self.host_id);
        let mut v: Vec<String> = docker(&["ps", "-aq", "--no-trunc", "--filter", &l])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    pub async fn binding(&self, space: &str) -> Option<Value> {
        let js = async_nats::jetstream::new(self.c.clone());
        let kv = js.get_key_value("tether_spaces").await.expect("bucket");
        kv.get(space)
            .await
            .expect("kv get")
            .map(|b| serde_json::from_slice(&b).expect("binding json"))
    }
}

/// A 64-bit number from JSON (proto3 JSON writes them as strings).
pub fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Polls `f` until it returns `Some` or `within` passes.
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for an event of `kind` on a subscription (generously: the engine may be busy with
/// the other tests' containers; this bounds a hang, it measures nothing).
pub async fn next_event(sub: &mut async_nats::Subscriber, kind: &str) -> Value {
    use futures::StreamExt;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no `{kind}` event within 60 s"))
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).expect("event json");
        if v["type"] == kind {
            return v;
        }
    }
}

/// The orchestrator binary as a child process (SIGKILLed on drop), for crash and restart
/// tests.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary against `url` as `host_id` with a fast janitor, an optional config
/// file and extra environment.
pub fn spawn_node(
    url: &str,
    host_id: &str,
    config: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_container-orchestrator"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.env("TETHER_NATS_URL", url)
        .env("TETHER_HOST_ID", host_id)
        .env("TETHER_JANITOR_INTERVAL_SECONDS", "1")
        .env("TETHER_RECONCILE_GRACE_SECONDS", "3")
        .env("TETHER_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Child(cmd.spawn().expect("spawn container-orchestrator"))
}

/// Waits until the node of `host_id` answers on its host subject.
pub async fn wait_up(f: &Fleet, host_id: &str) {
    let subject = format!("hosts.{host_id}.containers.list");
    eventually(Duration::from_secs(30), "orchestrator answers", || async {
        call(&f.c, &subject, Some(&f.op), "{}")
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// Every container (running or not) labelled with `host_id`.
pub fn host_containers(host_id: &str) -> Vec<String> {
    let l = format!("label=tether.host={host_id}");
    docker(&["ps", "-aq", "--filter", &l])
        .lines()
        .map(str::to_string)
        .collect()
}
