//! The A2A gateway's own settings (top level of `tether.toml`, or `TETHER_<KEY>`), all named
//! `a2a_*`, checked once at start so a bad value stops the binary (exit 64).

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct A2aConfig {
    /// Address of the HTTP bridge (A2A JSON-RPC and agent cards); `127.0.0.1:0` picks a free
    /// port; empty = no HTTP bridge.
    pub a2a_listen: String,
    /// `Host` header values the bridge accepts (DNS-rebinding protection); empty = loopback
    /// names only; `["*"]` = any.
    pub a2a_allowed_hosts: Vec<String>,
    /// Base URL the agent cards name for the bridge (`<base>/a2a/<agent>`); empty = derived
    /// from the listener's address.
    pub a2a_public_url: String,

    /// KV bucket of tasks (key `<space>.<task_id>`).
    pub a2a_tasks_bucket: String,
    /// KV bucket of agent cards (key `<agent_id>`).
    pub a2a_cards_bucket: String,
    /// JetStream stream of work items (`a2a_work.<agent_id>`).
    pub a2a_work_stream: String,
    /// JetStream stream of task events (`a2a_events.<space>.<task_id>`).
    pub a2a_events_stream: String,
    pub a2a_kv_replicas: usize,
    /// Tasks, their events and queued work are kept this long after their last change.
    pub a2a_retention_hours: u64,

    /// How long a worker may hold a work item without a progress note before it is
    /// delivered to another worker.
    pub a2a_ack_wait_ms: u64,
    /// Deliveries of one work item before it is given up (the task then ends FAILED).
    pub a2a_max_deliver: i64,
    /// How long a blocking `send` waits when the caller names no deadline
    /// (`Tether-Timeout-Ms`), and the most it waits whatever the caller asks.
    pub a2a_default_wait_ms: u64,
    pub a2a_max_wait_ms: u64,
    /// The longest a streamed answer (`stream`, `subscribe`) follows a task; the caller
    /// subscribes again to follow it further.
    pub a2a_max_stream_ms: u64,
    /// How long `cancel` of a running task waits for its worker to record CANCELED before
    /// the gateway records it.
    pub a2a_cancel_grace_ms: u64,
    /// Largest request body (an A2A message with its parts) accepted; more is 413.
    pub a2a_max_message_bytes: usize,
    /// A card not re-published for this long means no live worker (`tether a2a ls`).
    pub a2a_card_fresh_seconds: u64,
    /// Requests served at once by this node, per endpoint.
    pub a2a_max_concurrency: usize,
}

impl Default for A2aConfig {
    fn default() -> Self {
        Self {
            a2a_listen: "127.0.0.1:8791".into(),
            a2a_allowed_hosts: Vec::new(),
            a2a_public_url: String::new(),
            a2a_tasks_bucket: "a2a_tasks".into(),
            a2a_cards_bucket: "a2a_cards".into(),
            a2a_work_stream: "A2A_WORK".into(),
            a2a_events_stream: "A2A_EVENTS".into(),
            a2a_kv_replicas: 1,
            a2a_retention_hours: 7 * 24,
            a2a_ack_wait_ms: 30_000,
            a2a_max_deliver: 5,
            a2a_default_wait_ms: 25_000,
            a2a_max_wait_ms: 300_000,
            a2a_max_stream_ms: 3_600_000,
            a2a_cancel_grace_ms: 5_000,
            a2a_max_message_bytes: 512 * 1024,
            a2a_card_fresh_seconds: 90,
            a2a_max_concurrency: 1024,
        }
    }
}

/// A configuration the node cannot run with (the binary exits 64).
#[derive(Debug, thiserror::Error)]
#[error("invalid a2a-gateway configuration: {0}")]
pub struct InvalidConfig(pub String);

impl A2aConfig {
    pub fn load(layers: &tether_bus::Layers) -> Result<Self, InvalidConfig> {
        let c: A2aConfig = layers.node().map_err(|e| InvalidConfig(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// The bridge's address, when there is one.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, InvalidConfig> {
        if self.a2a_listen.trim().is_empty() {
            return Ok(None);
        }
        self.a2a_listen.trim().parse().map(Some).map_err(|e| {
            InvalidConfig(format!(
                "a2a_listen {:?} is not an address (ip:port): {e}",
                self.a2a_listen
            ))
        })
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.a2a_ack_wait_ms)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.a2a_retention_hours * 3600)
    }

    /// A KV bucket of the gateway's (file storage, the retention, the replicas).
    pub fn bucket(&self, name: &str, description: &str) -> kv::Config {
        kv::Config {
            bucket: name.to_string(),
            description: description.to_string(),
            history: 1,
            max_age: self.retention(),
            num_replicas: self.a2a_kv_replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    /// A stream of the gateway's on `subject` (file storage, the retention, the replicas, a
    /// two-minute de-duplication window).
    pub fn stream(&self, name: &str, description: &str, subject: &str) -> stream::Config {
        stream::Config {
            name: name.to_string(),
            description: Some(description.to_string()),
            subjects: vec![subject.to_string()],
            max_age: self.retention(),
            num_replicas: self.a2a_kv_replicas,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |m: &str| Err(InvalidConfig(m.to_string()));
        self.listen_addr()?;
        for (name, v) in [
            ("a2a_tasks_bucket", &self.a2a_tasks_bucket),
            ("a2a_cards_bucket", &self.a2a_cards_bucket),
            ("a2a_work_stream", &self.a2a_work_stream),
            ("a2a_events_stream", &self.a2a_events_stream),
        ] {
            if !tether_bus::subject::is_valid_token(v) {
                return Err(InvalidConfig(format!(
                    "{name} {v:?} must be a name without dots, spaces or wildcards"
                )));
            }
        }
        if self.a2a_ack_wait_ms < 1_000 {
            return bad("a2a_ack_wait_ms must be at least 1000");
        }
        if self.a2a_max_deliver < 1 {
            return bad("a2a_max_deliver must be at least 1");
        }
        if self.a2a_retention_hours == 0 {
            return bad("a2a_retention_hours must be at least 1");
        }
        if self.a2a_default_wait_ms == 0 || self.a2a_default_wait_ms > self.a2a_max_wait_ms {
            return bad("a2a_default_wait_ms must be between 1 and a2a_max_wait_ms");
        }
        if self.a2a_max_message_bytes < 1024 {
            return bad("a2a_max_message_bytes must be at least 1024");
        }
        if self.a2a_max_concurrency == 0 || self.a2a_kv_replicas == 0 {
            return bad("a2a_max_concurrency and a2a_kv_replicas must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        A2aConfig::default().validate().expect("defaults");
    }

    #[test]
    fn bad_values_are_refused() {
        let cases: Vec<fn(&mut A2aConfig)> = vec![
            |c| c.a2a_listen = "nowhere".into(),
            |c| c.a2a_tasks_bucket = "a.b".into(),
            |c| c.a2a_ack_wait_ms = 10,
            |c| c.a2a_max_deliver = 0,
            |c| c.a2a_default_wait_ms = c.a2a_max_wait_ms + 1,
            |c| c.a2a_max_message_bytes = 10,
            |c| c.a2a_retention_hours = 0,
        ];
        for (i, f) in cases.into_iter().enumerate() {
            let mut c = A2aConfig::default();
            f(&mut c);
            assert!(c.validate().is_err(), "case {i} should be refused");
        }
    }
}
