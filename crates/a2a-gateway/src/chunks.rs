//! Streamed answers on the bus (`stream`, `subscribe`): one A2A `StreamResponse` per message
//! to the caller's stream subject, numbered gap-free by `Tether-Stream-Seq`, then one end
//! marker — the same headers `containers.exec` streams with. Each event also carries the
//! task's own event number (`A2A-Event-Seq`; the first chunk, the snapshot, carries the
//! number of the last event it includes), so a caller who subscribes again after losing a
//! gateway can tell what it already has.

use a2a::StreamResponse;
use bytes::Bytes;
use tether_bus::{Encoding, Problem};

use crate::protobuf::Answer;

pub const STREAM_SEQ: &str = "Tether-Stream-Seq";
pub const STREAM_KIND: &str = "Tether-Stream";
/// Header naming where a caller wants a stream's chunks.
pub const STREAM_SUBJECT: &str = "Tether-Stream-Subject";

/// Publishes one stream's chunks.
pub struct Chunks {
    client: async_nats::Client,
    subject: String,
    /// The request's encoding: events go out in it.
    encoding: Encoding,
    seq: u64,
}

impl Chunks {
    pub fn new(client: async_nats::Client, subject: String, encoding: Encoding) -> Self {
        Self {
            client,
            subject,
            encoding,
            seq: 0,
        }
    }

    async fn send(&mut self, kind: &str, body: Bytes) -> Result<(), Problem> {
        self.send_with(kind, body, async_nats::HeaderMap::new())
            .await
    }

    async fn send_with(
        &mut self,
        kind: &str,
        body: Bytes,
        mut h: async_nats::HeaderMap,
    ) -> Result<(), Problem> {
        self.seq += 1;
        h.insert(STREAM_SEQ, self.seq.to_string().as_str());
        h.insert(STREAM_KIND, kind);
        self.client
            .publish_with_headers(self.subject.clone(), h, body)
            .await
            .map_err(|e| Problem::unavailable(format!("cannot stream to {}: {e}", self.subject)))
    }

    /// Event number `task_seq` of the task.
    pub async fn event(&mut self, task_seq: u64, e: &StreamResponse) -> Result<(), Problem> {
        let body = crate::protobuf::encode(self.encoding, Answer::StreamResponse, e)?;
        let mut h = async_nats::HeaderMap::new();
        h.insert(crate::store::EVENT_SEQ, task_seq.to_string().as_str());
        if self.encoding == Encoding::Protobuf {
            h.insert("Content-Type", self.encoding.content_type());
        }
        self.send_with("event", body, h).await
    }

    pub async fn end(mut self) {
        if let Err(e) = self.send("end", Bytes::new()).await {
            tracing::debug!(error = %e, "stream end not delivered");
        }
        let _ = self.client.flush().await;
    }

    pub async fn error(mut self, p: &Problem) {
        let body = p.to_body(&self.subject);
        if let Err(e) = self.send("error", body).await {
            tracing::debug!(error = %e, "stream error not delivered");
        }
        let _ = self.client.flush().await;
    }
}
