//! The NATS micro services protocol (`$SRV.PING|INFO|STATS`, ADR-32), served by the runtime.
//!
//! Design decision: the runtime implements the protocol itself instead of using async-nats'
//! `service` module, because that module sends error replies with an empty body and gives no
//! way to stop taking requests while still answering `$SRV.*` during a drain. The JSON shapes
//! are the protocol's own (`io.nats.micro.v1.*`), so `nats micro ls|info|stats` work unchanged.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Live counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_nanos: AtomicU64,
    last_error: Mutex<String>,
}

impl EndpointStats {
    pub fn record(&self, elapsed: Duration, error: Option<&str>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.processing_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Some(e) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn snapshot(&self, info: &EndpointInfo, data: Option<serde_json::Value>) -> EndpointStatsJson {
        let requests = self.requests();
        let total = self.processing_nanos.load(Ordering::Relaxed);
        EndpointStatsJson {
            name: info.name.clone(),
            subject: info.subject.clone(),
            queue_group: info.queue_group.clone(),
            num_requests: requests,
            num_errors: self.errors(),
            processing_time: total,
            average_processing_time: total.checked_div(requests).unwrap_or(0),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            data,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointInfo {
    pub name: String,
    pub subject: String,
    pub queue_group: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PingResponse {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoResponse {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointStatsJson {
    pub name: String,
    pub subject: String,
    pub queue_group: String,
    pub num_requests: u64,
    pub num_errors: u64,
    /// Nanoseconds.
    pub processing_time: u64,
    /// Nanoseconds.
    pub average_processing_time: u64,
    pub last_error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub started: String,
    pub endpoints: Vec<EndpointStatsJson>,
}

/// What a node says about itself.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    pub started: String,
}

/// Callback giving an endpoint's `data` in `$SRV.STATS` (e.g. per-agent accounting).
pub type StatsData = std::sync::Arc<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

impl Identity {
    pub fn ping(&self) -> PingResponse {
        PingResponse {
            kind: "io.nats.micro.v1.ping_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
        }
    }

    pub fn info(&self, endpoints: &[EndpointInfo]) -> InfoResponse {
        InfoResponse {
            kind: "io.nats.micro.v1.info_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            description: self.description.clone(),
            metadata: self.metadata.clone(),
            endpoints: endpoints.to_vec(),
        }
    }

    pub fn stats(
        &self,
        endpoints: &[(EndpointInfo, std::sync::Arc<EndpointStats>)],
        data: Option<&StatsData>,
    ) -> StatsResponse {
        StatsResponse {
            kind: "io.nats.micro.v1.stats_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
            started: self.started.clone(),
            endpoints: endpoints
                .iter()
                .map(|(i, s)| s.snapshot(i, data.and_then(|d| d(&i.name))))
                .collect(),
        }
    }

    /// The nine subjects a node answers: each verb for all nodes, this name, this instance.
    pub fn verb_subjects(&self) -> Vec<(Verb, String)> {
        let mut v = Vec::new();
        for verb in [Verb::Ping, Verb::Info, Verb::Stats] {
            let base = format!("$SRV.{}", verb.as_str());
            v.push((verb, base.clone()));
            v.push((verb, format!("{base}.{}", self.name)));
            v.push((verb, format!("{base}.{}.{}", self.name, self.id)));
        }
        v
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Ping,
    Info,
    Stats,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ping => "PING",
            Verb::Info => "INFO",
            Verb::Stats => "STATS",
        }
    }
}
