//! The reading side of the reply stream: run one command on a space's daemon and collect
//! everything it sends, checking that nothing is missing or out of order. [`exec`] collects
//! the whole outcome (the tests); [`exec_with`] hands each message to a callback as it comes
//! (the orchestrator, which re-publishes chunks to a caller's stream and caps what it keeps).

use std::time::Duration;

use async_nats::Client;
use async_nats::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use tether_proto::{DaemonExecExit, DaemonExecRequest, DaemonExecStarted};

use crate::config::exec_subject;
use crate::reply;

/// A finished command as its daemon reported it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub pid: u32,
    /// Every chunk in order: (`stdout` | `stderr`, bytes).
    pub chunks: Vec<(&'static str, Bytes)>,
    pub exit: DaemonExecExit,
}

impl Outcome {
    /// One stream's bytes, joined.
    pub fn stream(&self, which: &str) -> Vec<u8> {
        self.chunks
            .iter()
            .filter(|(s, _)| *s == which)
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }
}

/// Why [`exec`] has no outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The daemon refused the request (nothing ran): status and detail.
    Refused(u16, String),
    /// No daemon serves the space.
    NoResponders,
    /// Not a message within [`FIRST_REPLY`]: the request reached no live daemon (one killed
    /// as it arrived, whose connection the server had not dropped yet). Nothing ran.
    Silent,
    /// The stream did not end within the wait.
    TimedOut,
    /// A message missing, repeated or malformed.
    Protocol(String),
    Bus(String),
}

/// One message of the stream as it comes, before the exit.
#[derive(Clone, Debug)]
pub enum Event {
    /// The command was spawned (its pid): from here on it has run.
    Started(u32),
    /// A chunk: (`stdout` | `stderr`, bytes).
    Chunk(&'static str, Bytes),
}

/// Runs `req` in `space` and waits up to `wait` for its exit.
pub async fn exec(
    client: &Client,
    space: &str,
    req: &DaemonExecRequest,
    wait: Duration,
) -> Result<Outcome, Failure> {
    let mut pid = None;
    let mut chunks = Vec::new();
    let exit = exec_with(client, &exec_subject(space), req, wait, |e| {
        match e {
            Event::Started(p) => pid = Some(p),
            Event::Chunk(s, b) => chunks.push((s, b)),
        }
        std::future::ready(())
    })
    .await?;
    let pid = pid.ok_or_else(|| Failure::Protocol("no started".into()))?;
    Ok(Outcome { pid, chunks, exit })
}

/// Runs `req` on the daemon serving `subject` (`config::exec_subject_under` of its space),
/// calls `on` with every message in order (awaiting it before the next is read), and waits up
/// to `wait` for the exit, which it returns. The exit's chunk count is checked against the
/// chunks `on` was given.
/// How long the first message (`started`, or a refusal) may take. A live daemon answers at
/// once (it only spawns); a request delivered to the connection of a daemon that had just
/// died is never answered, and waiting for the exit would take the command's whole timeout.
/// A daemon slower than this to spawn is taken for dead: the trade-off is that its command
/// could then run twice (it would have to receive the request and stall 10 s before the spawn).
pub const FIRST_REPLY: Duration = Duration::from_secs(10);

pub async fn exec_with<F, Fut>(
    client: &Client,
    subject: &str,
    req: &DaemonExecRequest,
    wait: Duration,
    mut on: F,
) -> Result<DaemonExecExit, Failure>
where
    F: FnMut(Event) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Failure::Bus(e.to_string()))?;
    let body = serde_json::to_vec(req).map_err(|e| Failure::Bus(e.to_string()))?;
    client
        .publish_with_reply(subject.to_string(), inbox, body.into())
        .await
        .map_err(|e| Failure::Bus(e.to_string()))?;
    let collect = async {
        let mut started = false;
        let mut chunks = 0u64;
        let mut next = 0u32;
        let first = tokio::time::timeout(FIRST_REPLY, sub.next())
            .await
            .map_err(|_| Failure::Silent)?;
        let mut pending = Some(first);
        loop {
            let m = match pending.take() {
                Some(m) => m,
                None => sub.next().await,
            };
            let Some(m) = m else { break };
            if m.status == Some(StatusCode::NO_RESPONDERS) {
                return Err(Failure::NoResponders);
            }
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let seq: Option<u32> = header(reply::SEQ).and_then(|s| s.parse().ok());
            if seq != Some(next) {
                return Err(Failure::Protocol(format!(
                    "expected seq {next}, got {seq:?}"
                )));
            }
            next = next.saturating_add(1);
            let kind = header(reply::STREAM).unwrap_or_default();
            match kind.as_str() {
                reply::ERROR => {
                    let status = header(reply::SERVICE_ERROR_CODE)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(500);
                    let detail = serde_json::from_slice::<tether_proto::Problem>(&m.payload)
                        .map(|p| p.detail)
                        .unwrap_or_default();
                    return Err(Failure::Refused(status, detail));
                }
                reply::STARTED => {
                    let s: DaemonExecStarted = serde_json::from_slice(&m.payload)
                        .map_err(|e| Failure::Protocol(format!("bad started: {e}")))?;
                    started = true;
                    on(Event::Started(s.pid)).await;
                }
                reply::STDOUT => {
                    chunks += 1;
                    on(Event::Chunk(reply::STDOUT, m.payload)).await;
                }
                reply::STDERR => {
                    chunks += 1;
                    on(Event::Chunk(reply::STDERR, m.payload)).await;
                }
                reply::EXIT => {
                    let exit: DaemonExecExit = serde_json::from_slice(&m.payload)
                        .map_err(|e| Failure::Protocol(format!("bad exit: {e}")))?;
                    if u64::from(exit.chunks) != chunks {
                        return Err(Failure::Protocol(format!(
                            "the exit counts {} chunks, {chunks} came",
                            exit.chunks
                        )));
                    }
                    if !started {
                        return Err(Failure::Protocol("no started".into()));
                    }
                    return Ok(exit);
                }
                other => return Err(Failure::Protocol(format!("unknown stream {other:?}"))),
            }
        }
        Err(Failure::Bus("the subscription ended".into()))
    };
    tokio::time::timeout(wait, collect)
        .await
        .unwrap_or(Err(Failure::TimedOut))
}
