//! Work for an agent's workers: one work item per accepted message on the stream
//! `A2A_WORK` (`a2a_work.<agent>`, de-duplicated by `<space>.<task>.<message>`), consumed
//! through the agent's durable pull consumer `work_<agent>`, which the gateway creates and
//! workers only bind to; and the cancel signal to the worker holding a task.
//!
//! The one design decision to know: workers never write a task. They pull items with the
//! JetStream API of their own consumer alone, and report every event to the gateway
//! (`a2a.<agent>.work.event`, [`crate::ops`]), which checks it against the task and writes it —
//! so a worker can only ever touch its own agent's tasks, and only through the task rules.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use a2a::{Message, Task};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether_bus::Problem;

use crate::config::A2aConfig;

/// One work item.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkItem {
    pub space: String,
    pub task: Task,
    pub message: Message,
}

/// A cancel signal (`a2a.<agent>.signal.cancel`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelSignal {
    pub space: String,
    pub task_id: String,
}

/// The work consumer's name for an agent.
pub fn consumer_name(agent: &str) -> String {
    format!("work_{agent}")
}

/// The work subject of an agent.
pub fn work_subject(agent: &str) -> String {
    format!("a2a_work.{agent}")
}

/// Publishes work and keeps the agents' consumers.
pub struct Work {
    js: jetstream::Context,
    client: async_nats::Client,
    stream: stream::Stream,
    ack_wait: Duration,
    max_deliver: i64,
    signal_prefix: String,
    /// Agents whose consumer this replica has made sure of.
    ready: Mutex<HashSet<String>>,
}

impl Work {
    pub async fn open(
        js: &jetstream::Context,
        client: async_nats::Client,
        cfg: &A2aConfig,
        bus: &tether_bus::BusConfig,
    ) -> anyhow::Result<Self> {
        let stream = tether_bus::jobs::ensure_stream(
            js,
            cfg.stream(
                &cfg.a2a_work_stream,
                "A2A work items (a2a-gateway)",
                "a2a_work.>",
            ),
        )
        .await?;
        Ok(Self {
            js: js.clone(),
            client,
            stream,
            ack_wait: cfg.ack_wait(),
            max_deliver: cfg.a2a_max_deliver,
            signal_prefix: bus.subject("a2a"),
            ready: Mutex::new(HashSet::new()),
        })
    }

    /// Makes sure the agent's consumer exists (workers can only bind to it).
    pub async fn ensure_consumer(&self, agent: &str) -> Result<(), Problem> {
        if self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(agent)
        {
            return Ok(());
        }
        let name = consumer_name(agent);
        self.stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("A2A work of agent {agent}")),
                    filter_subject: work_subject(agent),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_deliver: self.max_deliver,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Problem::unavailable(format!("A2A work queue unavailable: {e}")))?;
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(agent.to_string());
        Ok(())
    }

    /// Queues a work item for the agent's workers (a duplicate message id is dropped).
    pub async fn submit(&self, agent: &str, item: &WorkItem) -> Result<(), Problem> {
        self.ensure_consumer(agent).await?;
        let body = serde_json::to_vec(item)
            .map_err(|e| Problem::internal(format!("cannot encode a work item: {e}")))?;
        let id = format!(
            "{}.{}.{}",
            item.space, item.task.id, item.message.message_id
        );
        tether_bus::jobs::publish_dedup(
            &self.js,
            work_subject(agent),
            &id,
            Bytes::from(body),
            None,
        )
        .await
        .map_err(|e| Problem::unavailable(format!("A2A work queue unavailable: {e}")))?;
        Ok(())
    }

    /// Tells the agent's workers to cancel a task (whoever holds it acts).
    pub async fn signal_cancel(
        &self,
        agent: &str,
        space: &str,
        task_id: &str,
    ) -> Result<(), Problem> {
        let body = serde_json::to_vec(&CancelSignal {
            space: space.to_string(),
            task_id: task_id.to_string(),
        })
        .map_err(|e| Problem::internal(format!("cannot encode a cancel signal: {e}")))?;
        self.client
            .publish(
                format!("{}.{agent}.signal.cancel", self.signal_prefix),
                Bytes::from(body),
            )
            .await
            .map_err(|e| Problem::unavailable(format!("cannot signal the workers: {e}")))
    }

    /// The work item at a stream sequence (`None`: gone, or not a work item).
    pub async fn item_at(&self, seq: u64) -> Result<Option<WorkItem>, Problem> {
        match self.stream.get_raw_message(seq).await {
            Ok(m) => Ok(serde_json::from_slice(&m.payload).ok()),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(Problem::unavailable(format!(
                "A2A work queue unavailable: {e}"
            ))),
        }
    }

    /// Work items waiting for the agent's workers (not yet delivered), when its consumer exists.
    pub async fn backlog(&self, agent: &str) -> Option<u64> {
        let mut c: consumer::PullConsumer =
            self.stream.get_consumer(&consumer_name(agent)).await.ok()?;
        c.info().await.ok().map(|i| i.num_pending)
    }
}
