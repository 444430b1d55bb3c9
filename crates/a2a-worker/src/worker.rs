//! [`run`]: a worker of one agent — binds the agent's work consumer, pulls as much work as it
//! has free slots, follows cancel signals, publishes the agent card, drains on shutdown.
//!
//! Design decision: a worker only *binds* to `work_<agent>` (one `CONSUMER.INFO`, then
//! `MSG.NEXT` pulls), never creates or inspects the stream: the gateway owns both, and a
//! worker's token may do no more. Until the consumer exists the worker waits, with backoff.
//! (`tether_bus::jobs::run_worker` creates its stream and consumer, hence this small loop.)

use std::sync::Arc;
use std::time::Duration;

use a2a::{AgentCapabilities, AgentCard};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::Sender;
use crate::executor::Executor;
use crate::run::{Running, Shared, WorkerStats, run_one};
use crate::token::TokenSource;
use crate::wire::{self, AUTHORIZATION, CancelSignal};

/// How long one pull waits for work before it is asked again.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Cap of the backoff between attempts to bind or pull.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A worker's settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The agent this worker serves (its token's `sub`).
    pub agent_id: String,
    /// The deployment's subject prefix, as the gateway's (`BusConfig::subject_prefix`): put in
    /// front of `a2a.<agent>.…` subjects, never of JetStream's.
    pub subject_prefix: Option<String>,
    /// Runs at once (work is pulled only for free slots).
    pub max_concurrency: usize,
    /// The card published on `a2a.<agent>.work.card`; `None` publishes a minimal one
    /// (name = agent id), since the card is also the worker's liveness heartbeat.
    pub card: Option<AgentCard>,
    /// How often the card is published again.
    pub card_every: Duration,
    /// After shutdown, how long running tasks may go on; past it they are given back.
    pub drain_timeout: Duration,
    /// Timeout of one work.* request.
    pub request_timeout: Duration,
    /// How long an unanswered event is sent again before the executor hears of it.
    pub event_retry_for: Duration,
    pub stats: Arc<WorkerStats>,
}

impl WorkerConfig {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            subject_prefix: None,
            max_concurrency: 4,
            card: None,
            card_every: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(25),
            request_timeout: Duration::from_secs(5),
            event_retry_for: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }
}

/// A card that names only the agent.
pub fn minimal_card(agent_id: &str) -> AgentCard {
    AgentCard {
        name: agent_id.to_string(),
        description: String::new(),
        version: "0.0.0".into(),
        supported_interfaces: Vec::new(),
        capabilities: AgentCapabilities {
            streaming: Some(true),
            push_notifications: Some(false),
            extensions: None,
            extended_agent_card: Some(false),
        },
        default_input_modes: vec!["text/plain".into()],
        default_output_modes: vec!["text/plain".into()],
        skills: Vec::new(),
        provider: None,
        documentation_url: None,
        icon_url: None,
        security_schemes: None,
        security_requirements: None,
        signatures: None,
    }
}

/// Serves the agent's work until `shutdown`; then stops pulling, lets running tasks finish
/// within `drain_timeout` and gives the rest back. `client` should be connected with the
/// worker's token and inbox `_INBOX.<agent>` ([`TokenSource::bus_config`]).
pub async fn run<E: Executor>(
    client: async_nats::Client,
    token: TokenSource,
    cfg: WorkerConfig,
    executor: Arc<E>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let agent = cfg.agent_id.clone();
    if !wire::valid_agent_id(&agent) {
        anyhow::bail!("invalid agent id {agent:?}: letters, digits, '-' and '_' only");
    }
    let js = jetstream::new(client.clone());
    let sender = Sender {
        client: client.clone(),
        agent: agent.clone(),
        subject_prefix: cfg.subject_prefix.clone(),
        token: token.clone(),
        request_timeout: cfg.request_timeout,
        retry_for: cfg.event_retry_for,
    };
    let running = Running::default();
    // Cancel signals must reach runs while they drain, so this stops only at the very end.
    let stopped = CancellationToken::new();
    let signals = client
        .subscribe(wire::prefixed(
            cfg.subject_prefix.as_deref(),
            wire::cancel_subject(&agent),
        ))
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to cancel signals: {e}"))?;
    let signal_task = tokio::spawn(follow_cancels(signals, running.clone(), stopped.clone()));
    let card = cfg.card.clone().unwrap_or_else(|| minimal_card(&agent));
    let card_task = tokio::spawn(publish_card(
        sender.clone(),
        card,
        cfg.card_every,
        shutdown.clone(),
    ));

    let r = serve(&js, &cfg, sender, executor, running, &shutdown).await;
    stopped.cancel();
    let _ = signal_task.await;
    let _ = card_task.await;
    r
}

async fn serve<E: Executor>(
    js: &jetstream::Context,
    cfg: &WorkerConfig,
    sender: Sender,
    executor: Arc<E>,
    running: Running,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(mut consumer) = bind(js, &cfg.agent_id, shutdown).await else {
        return Ok(());
    };
    let ack_wait = consumer.cached_info().config.ack_wait;
    let shared = Arc::new(Shared {
        executor,
        sender,
        running,
        progress_every: (ack_wait / 3).max(Duration::from_millis(100)),
        abort: CancellationToken::new(),
        stats: cfg.stats.clone(),
    });
    tracing::info!(agent = %cfg.agent_id, ?ack_wait, max_concurrency = cfg.max_concurrency, "serving A2A work");
    let slots = Arc::new(Semaphore::new(cfg.max_concurrency.max(1)));
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => drop(p),
            }
            continue;
        }
        let batch = consumer
            .batch()
            .max_messages(free)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(agent = %cfg.agent_id, error = %e, "pull failed; binding again");
                sleep_or_stop(shutdown, &mut backoff).await;
                match bind(js, &cfg.agent_id, shutdown).await {
                    Some(c) => consumer = c,
                    None => break,
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    give_back(&mut batch).await;
                    break;
                }
                n = batch.next() => n,
            };
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(agent = %cfg.agent_id, error = %e, "pull interrupted");
                    sleep_or_stop(shutdown, &mut backoff).await;
                    break;
                }
            };
            backoff = Duration::from_millis(100);
            // Never waits: the pull asked for no more messages than there were free slots.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let shared = shared.clone();
            tracker.spawn(async move {
                run_one(msg, shared).await;
                drop(permit);
            });
        }
    }
    tracker.close();
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(agent = %cfg.agent_id, "drain timeout: giving unfinished work back");
        shared.abort.cancel();
        tracker.wait().await;
    }
    Ok(())
}

/// Shutdown with a pull still open at the server: whatever it brings until it expires is
/// handed back at once (nak), instead of sitting unread until `ack_wait` sends it elsewhere.
async fn give_back(batch: &mut pull::Batch) {
    let until = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, batch.next()).await {
        if let Ok(m) = m
            && let Err(e) = m.ack_with(jetstream::AckKind::Nak(None)).await
        {
            tracing::debug!(error = %e, "a work item pulled at shutdown was not handed back; it returns after ack_wait");
        }
    }
}

/// Binds to `work_<agent>` (CONSUMER.INFO only), retrying until it exists; `None` on shutdown.
async fn bind(
    js: &jetstream::Context,
    agent: &str,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    let name = wire::consumer_name(agent);
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        match js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, wire::WORK_STREAM)
            .await
        {
            Ok(c) => return Some(c),
            Err(e) => {
                if warned {
                    tracing::debug!(consumer = %name, error = %e, "work consumer not there yet");
                } else {
                    tracing::warn!(consumer = %name, error = %e, "cannot bind the work consumer (the gateway creates it); retrying");
                    warned = true;
                }
            }
        }
        sleep_or_stop(shutdown, &mut backoff).await;
    }
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

async fn follow_cancels(
    mut signals: async_nats::Subscriber,
    running: Running,
    stopped: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stopped.cancelled() => break,
            m = signals.next() => match m { Some(m) => m, None => break },
        };
        match serde_json::from_slice::<CancelSignal>(&msg.payload) {
            Ok(s) => {
                let n = running.cancel(&s.space, &s.task_id);
                tracing::info!(task = %s.task_id, space = %s.space, runs = n, "cancel signal");
            }
            Err(e) => tracing::warn!(error = %e, "unreadable cancel signal"),
        }
    }
    let _ = signals.unsubscribe().await;
}

async fn publish_card(
    sender: Sender,
    card: AgentCard,
    every: Duration,
    shutdown: CancellationToken,
) {
    let subject = wire::prefixed(
        sender.subject_prefix.as_deref(),
        wire::card_subject(&sender.agent),
    );
    let body = match serde_json::to_vec(&card) {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the agent card");
            return;
        }
    };
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let token = match sender.token.current() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "no token to publish the card with");
                continue;
            }
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Bearer {token}").as_str());
        let req = async_nats::Request::new()
            .headers(headers)
            .payload(body.clone())
            .timeout(Some(sender.request_timeout));
        match sender.client.send_request(subject.clone(), req).await {
            Ok(m) => {
                if let Some(p) = tether_bus::Problem::from_reply(m.headers.as_ref(), &m.payload) {
                    tracing::warn!(problem = %p, "the gateway refused the agent card");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not publish the agent card"),
        }
    }
}
