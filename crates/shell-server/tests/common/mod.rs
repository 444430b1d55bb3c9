//! Fixtures: the test fleet (from `tether_testkit`), optionally with an orchestrator on the
//! real Docker engine (`tether_testkit::orchestrator`), plus what only these tests need: the
//! shell-server in-process, and the official Python MCP client driven as a subprocess.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::process::Command;

use serde_json::{Value, json};
use tether_shell_server::{Running, ShellConfig};
pub use tether_testkit::docker::run as docker;
pub use tether_testkit::orchestrator::OrchFleet as Fleet;
pub use tether_testkit::{Problem, bus, call, eventually, num, unique};

/// What an agent needs to run commands in its own container through the shell.
pub const SCOPES: &[&str] = &[
    "shell:exec",
    "containers:exec",
    "containers:write",
    "containers:read",
];

/// The orchestrator of `host_id` in-process against `url`.
pub async fn start_orchestrator(
    bus: &tether_bus::BusConfig,
    host_id: &str,
) -> tether_bus::NodeHandle {
    tether_testkit::orchestrator::start(bus, tether_testkit::orchestrator::config(host_id))
        .await
        .expect("start orchestrator")
}

/// A bus, a permission node and, with `docker`, an orchestrator on the engine.
pub async fn fleet(docker: bool) -> Fleet {
    if docker {
        Fleet::start("sh", true, |_| {}).await.expect("fleet")
    } else {
        Fleet::without_engine(tether_testkit::Fleet::start().await.expect("fleet"), "sh")
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

/// The shell-server on a fleet.
pub trait Shell {
    /// The shell-server at `cfg`, in-process on this fleet's bus.
    async fn shell(&self, cfg: ShellConfig) -> Running;
    /// `shell.exec` as `token`.
    async fn sh(&self, token: &str, body: Value) -> Result<Value, Problem>;
    /// `shell.exec` of `command` that must succeed; its stdout.
    async fn sh_ok(&self, token: &str, command: &str) -> String;
}

impl Shell for Fleet {
    async fn shell(&self, cfg: ShellConfig) -> Running {
        tether_shell_server::start(self.node_bus(tether_testkit::NodeKind::Shell), cfg)
            .await
            .expect("start shell-server")
    }

    async fn sh(&self, token: &str, body: Value) -> Result<Value, Problem> {
        self.call("shell.exec", body, Some(token)).await
    }

    async fn sh_ok(&self, token: &str, command: &str) -> String {
        let r = self
            .sh(token, json!({"command": command}))
            .await
            .unwrap_or_else(|e| panic!("shell.exec {command:?}: {e:?}"));
        assert_eq!(r["exit_code"], 0, "{command:?}: {r}");
        r["stdout"].as_str().expect("stdout").to_string()
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

/// The `shell-server mcp --stdio` server block of a Python plan: a shell server on `bus` (its
/// own nkey: `f.node_bus(NodeKind::Shell)`), with the agent's `token` for its requests.
pub fn stdio_server(
    bus: &tether_bus::BusConfig,
    token: Option<&str>,
    extra_env: &[(&str, &str)],
) -> Value {
    let mut env = serde_json::Map::new();
    env.insert("TETHER_NATS_URL".into(), json!(bus.nats_url));
    if let Some(seed) = &bus.nats_nkey_file {
        env.insert("TETHER_NATS_NKEY_FILE".into(), json!(seed));
    }
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
