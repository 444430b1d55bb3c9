//! A2A through the gateway as a caller, for the tests that deploy A2A workers.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Fleet, Problem, eventually, unique};

/// How long a task is waited for before the gateway takes it.
const WAIT: Duration = Duration::from_secs(60);

/// A user message with `text`, queued (`returnImmediately`).
pub fn message(text: &str) -> Value {
    json!({
        "message": {"messageId": unique("m"), "role": "ROLE_USER", "parts": [{"text": text}]},
        "configuration": {"returnImmediately": true},
    })
}

/// One A2A request to `agent` as `token` (5 s); `None` when nothing answered.
pub async fn request(
    f: &Fleet,
    agent: &str,
    op: &str,
    body: Value,
    token: &str,
) -> Option<Result<Value, Problem>> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("A2A-Version", "1.0");
    match tether_testkit::request(
        &f.c,
        &format!("a2a.{agent}.{op}"),
        body,
        Some(token),
        h,
        Duration::from_secs(5),
    )
    .await
    {
        Err(p) if p.status == 503 => None,
        r => Some(r),
    }
}

/// Sends `text` (queued) to `agent` once the gateway knows it; the task id.
pub async fn send(f: &Fleet, agent: &str, caller: &str, text: &str) -> String {
    let body = message(text);
    let t = eventually(WAIT, "the gateway takes a task for the agent", || {
        let body = body.clone();
        async move {
            request(f, agent, "send", body, caller)
                .await
                .and_then(Result::ok)
        }
    })
    .await;
    t["task"]["id"]
        .as_str()
        .or_else(|| t["id"].as_str())
        .unwrap_or_else(|| panic!("no task id: {t}"))
        .to_string()
}

/// A task's state.
pub fn state(t: &Value) -> &str {
    t["status"]["state"].as_str().unwrap_or_default()
}

/// The example worker's image, built here from the workspace's `a2a-echo-worker`.
pub const ECHO_IMAGE: &str = "tether-test/a2a-echo-worker:latest";

/// What a test of A2A workers runs on: the fleet (on a nats-server containers reach) with an
/// orchestrator at `tweak`ed config, the A2A gateway, the worker image, and `agent` registered
/// as a hostable worker agent.
pub struct A2aFleet {
    pub f: Fleet,
    pub gateway: tether_a2a_gateway::Running,
    pub image: String,
}

impl A2aFleet {
    pub async fn start(
        prefix: &str,
        agent: &str,
        tweak: impl FnOnce(&mut tether_container_orchestrator::OrchestratorConfig),
    ) -> A2aFleet {
        let bin = tether_testkit::cargo_bin("a2a-echo-worker").expect("a2a-echo-worker built");
        let image =
            tether_testkit::docker::build_binary_image(ECHO_IMAGE, &bin).expect("worker image");
        let nats = tether_testkit::NatsServer::start_for_containers()
            .await
            .expect("nats-server");
        let fleet = tether_testkit::Fleet::on(nats, Default::default())
            .await
            .expect("fleet");
        let f = Fleet::start_on(fleet, prefix, true, tweak)
            .await
            .expect("orchestrator");
        let cfg = tether_a2a_gateway::A2aConfig {
            a2a_listen: "127.0.0.1:0".into(),
            a2a_ack_wait_ms: 3_000,
            ..Default::default()
        };
        let gateway = tether_a2a_gateway::start(f.node_bus(tether_testkit::NodeKind::A2a), cfg)
            .await
            .expect("a2a gateway");
        f.agent(agent, "workers", &["a2a:serve", "workers:hosted"])
            .await;
        A2aFleet { f, gateway, image }
    }
}
