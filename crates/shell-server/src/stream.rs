//! Streaming output to the caller while a command runs, in the orchestrator's format:
//! one message per chunk on the caller's `stream_subject` with `Tether-Stream-Seq` (1, 2, …)
//! and `Tether-Stream` (`stdout` | `stderr`), then `Tether-Stream: end` with
//! `Tether-Exit-Code`, before the reply.
//!
//! Chunks pass through the trailer filter (the shell's bookkeeping never reaches the caller)
//! and count against the caller's output cap.

use async_nats::{Client, HeaderMap};
use bytes::Bytes;

use crate::wrap::{StreamFilter, Wrapped};

pub const STREAM_SEQ: &str = "Tether-Stream-Seq";
pub const STREAM: &str = "Tether-Stream";
pub const EXIT_CODE: &str = "Tether-Exit-Code";

pub struct StreamOut {
    client: Client,
    subject: String,
    seq: u64,
    filter: StreamFilter,
    budget: usize,
    ended: bool,
}

impl StreamOut {
    pub fn new(client: Client, subject: String, w: &Wrapped, budget: usize) -> Self {
        Self {
            client,
            subject,
            seq: 0,
            filter: StreamFilter::new(w),
            budget,
            ended: false,
        }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub async fn stdout(&mut self, chunk: &[u8]) {
        let out = self.filter.push(chunk);
        self.send("stdout", out).await;
    }

    pub async fn stderr(&mut self, chunk: &[u8]) {
        self.send("stderr", chunk.to_vec()).await;
    }

    /// Flushes what the filter held and says `end` (once).
    pub async fn end(&mut self, exit_code: i32) {
        if self.ended {
            return;
        }
        let rest = self.filter.finish();
        self.send("stdout", rest).await;
        self.ended = true;
        let mut h = HeaderMap::new();
        self.seq += 1;
        h.insert(STREAM_SEQ, self.seq.to_string().as_str());
        h.insert(STREAM, "end");
        h.insert(EXIT_CODE, exit_code.to_string().as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(self.subject.clone(), h, Bytes::new())
            .await
        {
            tracing::debug!(error = %e, "cannot publish stream end");
        }
    }

    async fn send(&mut self, kind: &str, mut bytes: Vec<u8>) {
        if self.ended || bytes.is_empty() || self.budget == 0 {
            return;
        }
        if bytes.len() > self.budget {
            bytes.truncate(self.budget);
        }
        self.budget -= bytes.len();
        self.seq += 1;
        let mut h = HeaderMap::new();
        h.insert(STREAM_SEQ, self.seq.to_string().as_str());
        h.insert(STREAM, kind);
        if let Err(e) = self
            .client
            .publish_with_headers(self.subject.clone(), h, bytes.into())
            .await
        {
            tracing::debug!(error = %e, "cannot publish stream chunk");
        }
    }

    /// Relays one message of the orchestrator's stream; true once it was the `end`.
    pub async fn relay(&mut self, m: &async_nats::Message) -> bool {
        let kind = m
            .headers
            .as_ref()
            .and_then(|h| h.get(STREAM))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        match kind.as_str() {
            "stdout" => self.stdout(&m.payload).await,
            "stderr" => self.stderr(&m.payload).await,
            "end" => {
                let code = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(EXIT_CODE))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(-1);
                self.end(code).await;
                return true;
            }
            _ => {}
        }
        false
    }
}
