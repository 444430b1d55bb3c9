//! Fixtures of the gateway's tests: a fleet (real nats-server with the auth callout, the
//! permission node) with an A2A gateway on its own bus user, agents of two spaces, and
//! request helpers speaking the gateway's headers.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::{Value, json};
use tether_a2a_gateway::{A2aConfig, Running};
use tether_bus::Problem;
use tether_testkit::{Fleet, NodeKind};

pub const AGENT: &str = "echo";

pub struct A2aFleet {
    pub f: Fleet,
    pub gw: Option<Running>,
    /// Token of the worker agent `echo` (scope a2a:serve).
    pub worker: String,
    /// A caller in space `s1` and one in space `s2` (scope a2a:call).
    pub alice: String,
    pub mallory: String,
}

pub fn config() -> A2aConfig {
    A2aConfig {
        a2a_listen: "127.0.0.1:0".into(),
        a2a_ack_wait_ms: 3_000,
        a2a_cancel_grace_ms: 3_000,
        ..Default::default()
    }
}

impl A2aFleet {
    pub async fn start() -> A2aFleet {
        Self::start_with(config()).await
    }

    pub async fn start_with(cfg: A2aConfig) -> A2aFleet {
        let f = Fleet::start().await.expect("fleet");
        let gw = tether_a2a_gateway::start(f.node_bus(NodeKind::A2a), cfg)
            .await
            .expect("a2a gateway");
        let worker = f.agent(AGENT, "workers", &["a2a:serve"]).await;
        let alice = f.agent("alice", "s1", &["a2a:call"]).await;
        let mallory = f.agent("mallory", "s2", &["a2a:call"]).await;
        A2aFleet {
            f,
            gw: Some(gw),
            worker,
            alice,
            mallory,
        }
    }

    /// Another gateway replica on the same bus.
    pub async fn replica(&self, cfg: A2aConfig) -> Running {
        tether_a2a_gateway::start(self.f.node_bus(NodeKind::A2a), cfg)
            .await
            .expect("a2a gateway replica")
    }

    /// An A2A request on the bus as `token`, with `A2A-Version: 1.0`.
    pub async fn a2a(
        &self,
        agent: &str,
        op: &str,
        body: Value,
        token: &str,
    ) -> Result<Value, Problem> {
        self.a2a_with(agent, op, body, token, &[]).await
    }

    pub async fn a2a_with(
        &self,
        agent: &str,
        op: &str,
        body: Value,
        token: &str,
        headers: &[(&str, &str)],
    ) -> Result<Value, Problem> {
        let mut h = async_nats::HeaderMap::new();
        h.insert("A2A-Version", "1.0");
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        tether_testkit::request(
            &self.f.c,
            &[&format!("a2a.{agent}"), op]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("."),
            body,
            Some(token),
            h,
            Duration::from_secs(30),
        )
        .await
    }

    /// The worker publishes the agent's card.
    pub async fn publish_card(&self) {
        self.f
            .call(
                &format!("a2a.{AGENT}.work.card"),
                json!({"name": "echo", "description": "echoes", "version": "1.0.0",
                       "skills": [{"id": "echo", "name": "echo", "description": "echo", "tags": []}]}),
                Some(&self.worker),
            )
            .await
            .expect("publish the card");
    }
}

/// A user message with one text part.
pub fn message(text: &str) -> Value {
    json!({"message": {"messageId": uuid(), "role": "ROLE_USER", "parts": [{"text": text}]}})
}

pub fn uuid() -> String {
    tether_testkit::unique("m")
}

pub fn state(task: &Value) -> &str {
    task["status"]["state"].as_str().unwrap_or_default()
}

pub fn a2a_error(p: &Problem) -> String {
    p.extensions
        .get("a2aError")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}
