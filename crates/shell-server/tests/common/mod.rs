//! Fixtures: a real nats-server, the permission node in-process, optionally an orchestrator on
//! the real Docker engine (a host id of its own per test, every container removed when the
//! test ends, also on panic), the shell-server in-process, agents with tokens, and the
//! official Python MCP client driven as a subprocess.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_auth::{Claims, Scope, SigningKey};
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, NodeHandle};
use tether_container_orchestrator::OrchestratorConfig;
use tether_permission_node::PermissionConfig;
use tether_shell_server::{Running, ShellConfig};
use tether_testkit::NatsServer;

/// What an agent needs to run commands in its own container through the shell.
pub const SCOPES: &[&str] = &[
    "shell:exec",
    "containers:exec",
    "containers:write",
    "containers:read",
];

pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes this test's containers (by host label) when dropped.
pub struct Cleanup {
    pub host_ids: Vec<String>,
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

pub struct Fleet {
    pub nats: NatsServer,
    pub key: SigningKey,
    pub perm: Option<NodeHandle>,
    pub orch: Option<NodeHandle>,
    pub op: String,
    pub c: async_nats::Client,
    pub host_id: String,
    pub image: Option<String>,
    pub cleanup: Cleanup,
}

pub fn orch_config(host_id: &str) -> OrchestratorConfig {
    OrchestratorConfig {
        host_id: host_id.into(),
        janitor_interval_seconds: 1,
        ..Default::default()
    }
}

pub async fn start_orchestrator(url: &str, host_id: &str) -> NodeHandle {
    let b = bus(url);
    let client = async_nats::connect(url).await.expect("connect");
    tether_container_orchestrator::build(&b, orch_config(host_id), &client)
        .await
        .expect("build orchestrator")
        .start_with_client(b, client)
        .await
        .expect("start orchestrator")
}

/// A bus, a permission node and, with `docker`, an orchestrator on the engine.
pub async fn fleet(docker: bool) -> Fleet {
    let image = docker.then(|| tether_testkit::docker::busybox_image().expect("test image"));
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
    let host_id = unique("sh");
    let cleanup = Cleanup {
        host_ids: vec![host_id.clone()],
    };
    let orch = if docker {
        Some(start_orchestrator(&nats.url(), &host_id).await)
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

/// A shell-server config for tests: MCP on a free loopback port, local exec off.
pub fn shell_config() -> ShellConfig {
    ShellConfig {
        mcp_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

/// Local exec on, starting in `dir`.
pub fn local_config(dir: &std::path::Path) -> ShellConfig {
    ShellConfig {
        allow_local_exec: true,
        local_workdir: dir.to_str().expect("utf8").into(),
        ..shell_config()
    }
}

impl Fleet {
    pub fn url(&self) -> String {
        self.nats.url()
    }

    pub async fn shell(&self, cfg: ShellConfig) -> Running {
        tether_shell_server::start(bus(&self.url()), cfg)
            .await
            .expect("start shell-server")
    }

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
        let mut body = json!({"image": self.image.as_deref().expect("docker fleet")});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        callj(&self.c, "containers.create", token, body)
            .await
            .expect("create container")
    }

    /// `shell.exec` as `token`.
    pub async fn sh(&self, token: &str, body: Value) -> Result<Value, (u16, String)> {
        callj(&self.c, "shell.exec", token, body).await
    }

    /// `shell.exec` of `command` that must succeed; its stdout.
    pub async fn sh_ok(&self, token: &str, command: &str) -> String {
        let r = self
            .sh(token, json!({"command": command}))
            .await
            .unwrap_or_else(|e| panic!("shell.exec {command:?}: {e:?}"));
        assert_eq!(r["exit_code"], 0, "{command:?}: {r}");
        r["stdout"].as_str().expect("stdout").to_string()
    }
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
    let m = c
        .send_request(subject.to_string(), req)
        .await
        .unwrap_or_else(|e| panic!("request {subject}: {e}"));
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

/// Runs tests/py/mcp_shell.py with `plan`; its JSON answer.
pub async fn python_mcp(plan: Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/py/mcp_shell.py");
    let plan = plan.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(plan)
            .env_remove("TETHER_TOKEN")
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs (scripts/install-deps.sh installs mcp)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python MCP client failed:\n{stdout}\n{stderr}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("python output is not JSON ({e}):\n{stdout}\n{stderr}"))
}

/// The `shell-server mcp --stdio` server block of a Python plan.
pub fn stdio_server(nats_url: &str, token: Option<&str>, extra_env: &[(&str, &str)]) -> Value {
    let mut env = serde_json::Map::new();
    env.insert("TETHER_NATS_URL".into(), json!(nats_url));
    env.insert("TETHER_MCP_LISTEN".into(), json!(""));
    env.insert("TETHER_LOG".into(), json!("warn"));
    if let Some(t) = token {
        env.insert("TETHER_TOKEN".into(), json!(t));
    }
    for (k, v) in extra_env {
        env.insert((*k).into(), json!(v));
    }
    json!({
        "command": env!("CARGO_BIN_EXE_shell-server"),
        "args": ["mcp", "--stdio"],
        "env": env,
    })
}

/// `arguments` for one `exec_command` call.
pub fn exec_call(args: Value) -> Value {
    json!({"name": "exec_command", "arguments": args})
}
