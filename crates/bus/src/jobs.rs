//! Durable work: JetStream pull consumers that survive worker and server restarts.
//!
//! A worker pulls only as many messages as it has free slots (bounded concurrency; nothing
//! sits unprocessed while its ack timer runs), tells the server a long job is still in
//! progress, and settles each message exactly as the handler says: ack (double-acked, so an
//! ack the server did not record is known), nak with a delay, or term. The server's
//! `max_deliver` bounds redeliveries. Publishers de-duplicate with `Nats-Msg-Id`.
//!
//! At-least-once is the contract: a job whose ack was lost (worker killed after the work,
//! before the ack; or a server killed before it persisted an ack it had confirmed) is
//! delivered again. [`WorkerConfig::done`] makes the effect exactly-once for acknowledged
//! jobs: the job is recorded in a KV bucket before the ack and skipped if seen again.
//! Job streams use `Limits` retention with a max age rather than `WorkQueue`: a work queue
//! deletes consumed messages, so after a server restart the de-duplication window no longer
//! knows their `Nats-Msg-Id` and a publisher's retry would be accepted as new.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const MSG_ID: &str = "Nats-Msg-Id";

/// Called with a job's key once its ack is confirmed.
pub type AckHook = Arc<dyn Fn(&str) + Send + Sync>;

/// A durable consumer's settings.
#[derive(Clone)]
pub struct WorkerConfig {
    pub stream: String,
    /// Durable consumer name: every replica uses the same one, so they share the work.
    pub consumer: String,
    pub filter_subject: Option<String>,
    pub max_concurrency: usize,
    /// Time the server waits for an ack (or a progress note) before redelivering.
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message.
    pub max_deliver: i64,
    /// How often a running job tells the server it is still in progress.
    pub progress_every: Duration,
    /// Counters of how messages were settled (shared, readable while running).
    pub stats: Arc<WorkerStats>,
    /// Idempotency guard: when set, a job is recorded here (by `Nats-Msg-Id`, else stream
    /// sequence) after its handler succeeds and before it is acked, and a job found here is
    /// acked without running again. This closes the gap a crashed server leaves when it
    /// loses an ack it had already confirmed.
    pub done: Option<async_nats::jetstream::kv::Store>,
    /// Called with the job's key (`id.<Nats-Msg-Id>` or `seq.<n>`) once the server has
    /// confirmed its ack (metrics, events, tests).
    pub on_acked: Option<AckHook>,
}

/// How a worker settled its messages.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Acks the server confirmed.
    pub acked: AtomicU64,
    /// Acks that failed (the message will come again).
    pub ack_failed: AtomicU64,
    pub retried: AtomicU64,
    pub terminated: AtomicU64,
    /// Deliveries of jobs already done (found in the `done` bucket), acked without running.
    pub skipped: AtomicU64,
}

impl WorkerConfig {
    pub fn new(stream: impl Into<String>, consumer: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            consumer: consumer.into(),
            filter_subject: None,
            max_concurrency: 8,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            progress_every: Duration::from_secs(10),
            stats: Arc::default(),
            done: None,
            on_acked: None,
        }
    }
}

/// What to do with a message once its handler is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Deliver again after this delay (counts against `max_deliver`).
    Retry(Duration),
    /// Never deliver again.
    Term,
}

/// A delivered message.
pub struct Job {
    msg: jetstream::Message,
}

impl Job {
    pub fn payload(&self) -> &Bytes {
        &self.msg.payload
    }
    pub fn headers(&self) -> Option<&async_nats::HeaderMap> {
        self.msg.headers.as_ref()
    }
    pub fn subject(&self) -> &str {
        self.msg.subject.as_str()
    }
    /// The `Nats-Msg-Id` it was published with.
    pub fn msg_id(&self) -> Option<&str> {
        self.headers()
            .and_then(|h| h.get(MSG_ID))
            .map(|v| v.as_str())
    }
    /// 1 on first delivery.
    pub fn delivered(&self) -> i64 {
        self.msg.info().map(|i| i.delivered).unwrap_or(1)
    }
    /// The stream sequence number (unique per message).
    pub fn stream_sequence(&self) -> u64 {
        self.msg.info().map(|i| i.stream_sequence).unwrap_or(0)
    }
}

/// A ticker for in-progress notes: its first tick comes after `every`, not at once. (The
/// first tick of `tokio::time::interval` waits for the timer wheel's next millisecond, which
/// would delay the start of every job by up to a millisecond.)
pub fn progress_ticker(every: Duration) -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + every, every)
}

/// Creates the stream when it is missing; returns it either way.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let name = config.name.clone();
    let what = format!("open or create stream `{name}`");
    crate::kv::answered(&what, || js.get_or_create_stream(config.clone()))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open or create stream `{name}`: {e}"))
}

/// Publishes with `Nats-Msg-Id` so the stream drops a duplicate within its window; waits for
/// the server's ack. Returns true when the server says it was a duplicate.
pub async fn publish_dedup(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
    headers: Option<async_nats::HeaderMap>,
) -> anyhow::Result<bool> {
    let mut h = headers.unwrap_or_default();
    h.insert(MSG_ID, msg_id);
    let ack = js
        .publish_with_headers(subject, h, payload)
        .await
        .map_err(|e| anyhow::anyhow!("publish failed: {e}"))?
        .await
        .map_err(|e| anyhow::anyhow!("publish not acknowledged: {e}"))?;
    Ok(ack.duplicate)
}

/// Runs a durable worker until `shutdown`; then stops pulling, lets running jobs finish and
/// returns. Survives bus outages (it re-opens the consumer with backoff).
pub async fn run_worker<F, Fut>(
    js: jetstream::Context,
    cfg: WorkerConfig,
    shutdown: CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(cfg.max_concurrency.max(1)));
    let running = TaskTracker::new();
    let mut consumer: Option<jetstream::consumer::Consumer<pull::Config>> = None;
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        // Wait for at least one free slot.
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => drop(p),
            }
            continue;
        }
        let c = match &consumer {
            Some(c) => c.clone(),
            None => match open_consumer(&js, &cfg).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    consumer = Some(c.clone());
                    c
                }
                Err(e) => {
                    tracing::warn!(stream = %cfg.stream, consumer = %cfg.consumer, error = %e, "cannot open consumer; retrying");
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            },
        };
        let batch = c
            .batch()
            .max_messages(free)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(consumer = %cfg.consumer, error = %e, "pull request failed; retrying");
                consumer = None;
                sleep_or_stop(&shutdown, &mut backoff).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = batch.next() => n,
            };
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(consumer = %cfg.consumer, error = %e, "pull interrupted");
                    consumer = None;
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    break;
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let handler = handler.clone();
            // A note well inside the ack window, whatever was configured.
            let progress_every = cfg
                .progress_every
                .min(cfg.ack_wait / 2)
                .max(Duration::from_millis(100));
            let on_acked = cfg.on_acked.clone();
            let stats = cfg.stats.clone();
            let done = cfg.done.clone();
            running.spawn(async move {
                settle(
                    msg,
                    handler,
                    progress_every,
                    &stats,
                    done.as_ref(),
                    on_acked.as_deref(),
                )
                .await;
                drop(permit);
            });
        }
    }
    running.close();
    running.wait().await;
    Ok(())
}

async fn open_consumer(
    js: &jetstream::Context,
    cfg: &WorkerConfig,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        max_deliver: cfg.max_deliver,
        filter_subject: cfg.filter_subject.clone().unwrap_or_default(),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&cfg.consumer, config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// The key a job is recorded under in the `done` bucket.
fn done_key(msg: &jetstream::Message) -> String {
    let id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(MSG_ID))
        .map(|v| v.as_str().to_string());
    match id {
        Some(id)
            if !id.is_empty()
                && id.len() <= 200
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=".contains(c)) =>
        {
            format!("id.{id}")
        }
        _ => format!("seq.{}", msg.info().map(|i| i.stream_sequence).unwrap_or(0)),
    }
}

async fn settle<F, Fut>(
    msg: jetstream::Message,
    handler: Arc<F>,
    progress_every: Duration,
    stats: &WorkerStats,
    done: Option<&async_nats::jetstream::kv::Store>,
    on_acked: Option<&(dyn Fn(&str) + Send + Sync)>,
) where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let ack_handle = msg.clone();
    let key = done_key(&msg);
    if let Some(done) = done
        && let Ok(Some(_)) = done.get(key.as_str()).await
    {
        // Already done: ack without running (if this ack is lost too, it comes again
        // and is skipped again).
        if ack_handle.double_ack().await.is_ok()
            && let Some(f) = on_acked
        {
            f(&key);
        }
        stats.skipped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let work = AssertUnwindSafe(handler(Job { msg })).catch_unwind();
    tokio::pin!(work);
    let mut ticker = progress_ticker(progress_every);
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r.unwrap_or_else(|_| {
                tracing::error!("job handler panicked; the job will be retried");
                Outcome::Retry(Duration::from_secs(1))
            }),
            _ = ticker.tick() => {
                if let Err(e) = ack_handle.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "could not send in-progress note");
                }
            }
        }
    };
    if let (Outcome::Ack, Some(done)) = (outcome, done)
        && let Err(e) = done
            .put(key.as_str(), bytes::Bytes::from_static(b"1"))
            .await
    {
        // Not recorded: not acked either, so it comes again (and runs again).
        tracing::warn!(error = %e, "could not record a finished job; it will be redelivered");
        stats.ack_failed.fetch_add(1, Ordering::Relaxed);
        let _ = ack_handle
            .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
            .await;
        return;
    }
    let r = match outcome {
        Outcome::Ack => ack_handle.double_ack().await,
        Outcome::Retry(d) => ack_handle.ack_with(AckKind::Nak(Some(d))).await,
        Outcome::Term => ack_handle.ack_with(AckKind::Term).await,
    };
    let counter = match (&r, outcome) {
        (Err(_), _) => &stats.ack_failed,
        (Ok(()), Outcome::Ack) => &stats.acked,
        (Ok(()), Outcome::Retry(_)) => &stats.retried,
        (Ok(()), Outcome::Term) => &stats.terminated,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let (Ok(()), Outcome::Ack, Some(f)) = (&r, outcome, on_acked) {
        f(&key);
    }
    if let Err(e) = r {
        tracing::warn!(error = %e, ?outcome, "could not settle job; it will be redelivered");
    }
}
