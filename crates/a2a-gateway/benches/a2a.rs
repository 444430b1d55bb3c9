//! `just bench` for A2A (issue 15): what the durable task path costs over plain request/reply,
//! and whether throughput grows with workers. One run, one fleet (real nats-server with the
//! auth callout, the permission node), the gateway at its defaults but `a2a_listen
//! 127.0.0.1:0`, log level warn.
//!
//! The agent `bench` is served by in-process `tether-a2a-worker` workers, each on its own
//! connection with the worker token, running [`Quick`]: one artifact echoing the message's
//! text, then COMPLETED, reported together (one `work.event` batch, `Events::complete_with`;
//! `sleep <ms> …` sleeps first). The caller's token
//! has scope `a2a:call`.
//!
//! 1. Latency, sequential, interleaved so all three see the same machine state (p50/p99):
//!    (1) blocking `a2a.bench.send` on the bus; (2) the same as JSON-RPC `SendMessage` to the
//!    HTTP bridge (reqwest, keep-alive); (3) the baseline: a plain `tether_bus::Node` raw
//!    endpoint (same token check) that runs the same task logic in-process — the gateway's own
//!    record rules build the task, apply the artifact and COMPLETED — and answers the task.
//!    Ratios to (3) and the p50 difference (target: the durable path adds at most 3 ms).
//! 2. Throughput, tasks/s, with 1, 2 and 4 workers of `max_concurrency` 1 (so the worker count
//!    is the number of tasks run at once), 32 blocking sends in flight, for 0 ms and 5 ms of
//!    executor time; each as a ratio to 1 worker.
//! 3. Where the time goes: the bus messages of one task, counted by a wiretap on the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use a2a::{
    Artifact, Part, SendMessageRequest, StreamResponse, TaskArtifactUpdateEvent, TaskState,
    TaskStatus, TaskStatusUpdateEvent,
};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tether_a2a_gateway::A2aConfig;
use tether_a2a_gateway::record::{self, Asker};
use tether_a2a_worker::{Events, Executor, TaskContext, TokenSource, WorkerConfig};
use tether_bus::{BusConfig, Endpoint, KvVerifier, Node, Problem, RawRequest, Reply, Scope};
use tether_testkit::{Fleet, NodeKind};
use tokio_util::sync::CancellationToken;

const AGENT: &str = "bench";
const ROUND_TRIPS: usize = 1000;
const WARMUP: usize = 100;
const INFLIGHT: usize = 32;
const THROUGHPUT_WARMUP: Duration = Duration::from_millis(500);
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
const TAPPED_TASKS: usize = 50;
/// How long a worker's pull waits at the server (`tether_a2a_worker`'s `PULL_EXPIRES`).
const PULL_EXPIRES: Duration = Duration::from_secs(2);
const BASELINE_SUBJECT: &str = "bench_base.bench.send";

/// The trivial agent: an artifact with the message's text parts, then COMPLETED.
struct Quick;

impl Executor for Quick {
    async fn execute(&self, ctx: TaskContext, events: Events) -> anyhow::Result<()> {
        let text = ctx.text();
        if let Some(ms) = sleep_ms(&text) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        events
            .complete_with(vec![artifact(&ctx.message.parts)], None)
            .await?;
        Ok(())
    }
}

fn sleep_ms(text: &str) -> Option<u64> {
    text.strip_prefix("sleep ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn artifact(parts: &[Part]) -> Artifact {
    Artifact {
        artifact_id: a2a::new_artifact_id(),
        name: Some("echo".into()),
        description: None,
        parts: parts
            .iter()
            .filter(|p| p.as_text().is_some())
            .cloned()
            .collect(),
        metadata: None,
        extensions: None,
    }
}

/// The baseline's handler: the same task, built and completed in-process by the gateway's own
/// record rules, answered as the gateway answers a send.
fn baseline(r: RawRequest) -> Result<Reply, Problem> {
    if r.headers.get("A2A-Version").map(|v| v.as_str()) != Some("1.0") {
        return Err(Problem::bad_request("A2A-Version 1.0 expected"));
    }
    let c = r
        .caller
        .as_ref()
        .ok_or_else(|| Problem::unauthorized("token"))?;
    let req: SendMessageRequest =
        serde_json::from_slice(&r.payload).map_err(|e| Problem::bad_request(e.to_string()))?;
    let who = Asker {
        agent: AGENT,
        space: &c.space,
        caller: &c.agent_id,
    };
    let mut rec = record::new_task(&who, req.message.clone(), req.metadata);
    let (task_id, context_id) = (rec.task.id.clone(), rec.task.context_id.clone());
    let artifact = StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
        task_id: task_id.clone(),
        context_id: context_id.clone(),
        artifact: artifact(&req.message.parts),
        append: Some(false),
        last_chunk: Some(true),
        metadata: None,
    });
    let completed = StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
        task_id,
        context_id,
        status: TaskStatus {
            state: TaskState::Completed,
            message: None,
            timestamp: Some(chrono::Utc::now()),
        },
        metadata: None,
    });
    rec.apply_worker_all(1, vec![artifact, completed])?;
    tether_a2a_gateway::ops::json(&StreamResponse::Task(record::view(&rec.task, None)))
}

/// A connection as an agent: its token, its own inbox `_INBOX.<agent>`.
async fn connect_agent(f: &Fleet, token: &str, agent: &str) -> async_nats::Client {
    let cfg = TokenSource::fixed(token).bus_config(
        BusConfig {
            nats_url: f.nats.plain_url(),
            ..Default::default()
        },
        agent,
    );
    tether_bus::connect::options(&cfg, agent)
        .await
        .expect("client options")
        .connect(tether_bus::connect::servers(&cfg.nats_url).expect("bus URL"))
        .await
        .expect("connect as an agent")
}

struct Workers {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Workers {
    async fn start(f: &Fleet, token: &str, n: usize) -> Workers {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let client = connect_agent(f, token, AGENT).await;
            let mut cfg = WorkerConfig::new(AGENT);
            cfg.max_concurrency = 1;
            handles.push(tokio::spawn(tether_a2a_worker::run(
                client,
                TokenSource::fixed(token),
                cfg,
                Arc::new(Quick),
                stop.clone(),
            )));
        }
        Workers { stop, handles }
    }

    /// Stops the workers, then waits out the pulls they left at the server: a work message
    /// delivered to a stopped worker's pull comes again only after `ack_wait` (30 s).
    async fn stop(self) {
        self.stop.cancel();
        for h in self.handles {
            h.await.expect("join").expect("worker ran");
        }
        tokio::time::sleep(PULL_EXPIRES + Duration::from_millis(500)).await;
    }
}

fn send_body(text: &str) -> Bytes {
    let m = json!({"message": {"messageId": tether_testkit::unique("m"), "role": "ROLE_USER",
                               "parts": [{"text": text}]}});
    Bytes::from(serde_json::to_vec(&m).expect("json"))
}

fn completed(task: &Value) {
    assert_eq!(
        task["status"]["state"], "TASK_STATE_COMPLETED",
        "task not completed: {task}"
    );
    assert!(task["artifacts"][0]["parts"][0]["text"].is_string());
}

/// A blocking send on the bus (or the baseline's subject); panics unless COMPLETED.
async fn bus_send(c: &async_nats::Client, subject: &str, token: &str, text: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Authorization", format!("Bearer {token}").as_str());
    h.insert("A2A-Version", "1.0");
    let req = async_nats::client::Request::new()
        .payload(send_body(text))
        .headers(h)
        .timeout(Some(Duration::from_secs(30)));
    let m = c
        .send_request(subject.to_string(), req)
        .await
        .expect("reply");
    if let Some(p) = Problem::from_reply(m.headers.as_ref(), &m.payload) {
        panic!("{subject}: {} {}", p.status, p.detail);
    }
    let v: Value = serde_json::from_slice(&m.payload).expect("reply json");
    completed(&v["task"]);
}

/// JSON-RPC SendMessage to the bridge; panics unless COMPLETED.
async fn http_send(http: &reqwest::Client, url: &str, token: &str, text: &str) {
    let params: Value = serde_json::from_slice(&send_body(text)).expect("json");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params});
    let r = http
        .post(url)
        .bearer_auth(token)
        .header("A2A-Version", "1.0")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("http send");
    assert!(r.status().is_success(), "bridge answered {}", r.status());
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    completed(&v["result"]["task"]);
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Tasks completed per second with `INFLIGHT` blocking sends in flight.
async fn throughput(c: &async_nats::Client, token: &str, text: &str) -> f64 {
    let start = Instant::now();
    let (from, until) = (
        start + THROUGHPUT_WARMUP,
        start + THROUGHPUT_WARMUP + THROUGHPUT_FOR,
    );
    let done = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..INFLIGHT)
        .map(|_| {
            let (c, token, text, done) =
                (c.clone(), token.to_string(), text.to_string(), done.clone());
            tokio::spawn(async move {
                let subject = format!("a2a.{AGENT}.send");
                while Instant::now() < until {
                    bus_send(&c, &subject, &token, &text).await;
                    let now = Instant::now();
                    if now >= from && now <= until {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in callers {
        t.await.expect("caller");
    }
    done.load(Ordering::Relaxed) as f64 / THROUGHPUT_FOR.as_secs_f64()
}

/// The bus messages `TAPPED_TASKS` sequential sends cause, per task, by kind.
async fn tap(f: &Fleet, c: &async_nats::Client, token: &str) -> BTreeMap<String, f64> {
    let mut sub = f.c.subscribe(">").await.expect("wiretap");
    f.c.flush().await.expect("flush");
    // Let the workers' idle pulls and heartbeats pass through quietly first.
    for _ in 0..5 {
        bus_send(c, &format!("a2a.{AGENT}.send"), token, "warm").await;
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {}
    for _ in 0..TAPPED_TASKS {
        bus_send(c, &format!("a2a.{AGENT}.send"), token, "tap").await;
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let s = m.subject.as_str();
        let kind = if s.starts_with("$JS.API.DIRECT.GET.KV_a2a_tasks")
            || s.starts_with("$JS.API.STREAM.MSG.GET.KV_a2a_tasks")
        {
            "KV get a2a_tasks".to_string()
        } else if s.starts_with("$JS.API.DIRECT.GET.KV_a2a_cards")
            || s.starts_with("$JS.API.STREAM.MSG.GET.KV_a2a_cards")
        {
            "KV get a2a_cards".to_string()
        } else if s.starts_with("$KV.a2a_tasks.") {
            "KV write a2a_tasks (JS publish)".to_string()
        } else if s.starts_with("a2a_events.") {
            "JS publish a2a_events".to_string()
        } else if s.starts_with("a2a_work.") {
            "JS publish a2a_work".to_string()
        } else if s.starts_with("$JS.API.CONSUMER.CREATE.A2A_EVENTS") {
            "JS consumer create (follower)".to_string()
        } else if s.starts_with("$JS.API.CONSUMER.DELETE") {
            "JS consumer delete".to_string()
        } else if s.starts_with("$JS.API.CONSUMER.MSG.NEXT") {
            "JS pull (worker)".to_string()
        } else if s.starts_with("$JS.ACK.A2A_WORK") {
            "JS ack (worker)".to_string()
        } else if s.starts_with("$JS.ACK.A2A_EVENTS") {
            "JS flow/ack follower".to_string()
        } else if s.starts_with("$JS.API.") {
            let parts: Vec<&str> = s.split('.').take(4).collect();
            format!("JS API {}", parts.join("."))
        } else if s.starts_with("$JS.FC.") {
            "JS flow control".to_string()
        } else if s.starts_with("a2a.") {
            let op = s.split('.').skip(2).collect::<Vec<_>>().join(".");
            format!("bus request a2a.*.{op}")
        } else if s.starts_with("_INBOX") {
            "replies / deliveries to inboxes".to_string()
        } else if s.starts_with("$JS.EVENT") || s.starts_with("$SYS") {
            continue;
        } else {
            let parts: Vec<&str> = s.split('.').take(2).collect();
            parts.join(".")
        };
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, n)| (k, n as f64 / TAPPED_TASKS as f64))
        .collect()
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    // reqwest is built without a default TLS provider (plain HTTP here, but it asks).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let f = Fleet::start().await.expect("fleet");
    let gw = tether_a2a_gateway::start(
        f.node_bus(NodeKind::A2a),
        A2aConfig {
            a2a_listen: "127.0.0.1:0".into(),
            ..Default::default()
        },
    )
    .await
    .expect("a2a gateway");
    let worker_token = f.agent(AGENT, "workers", &["a2a:serve"]).await;
    let token = f.agent("caller", "s1", &["a2a:call"]).await;
    // The caller's requests go on the fleet's admin connection (as the gateway's tests do):
    // an agent's own connection may not publish to the baseline's subject. The token rides in
    // `Authorization` either way, and each endpoint verifies it.
    let c = f.c.clone();

    // The baseline: a plain node endpoint with the gateway's token check.
    let stop = CancellationToken::new();
    let bus = f.bus();
    let verifier = KvVerifier::start(&async_nats::jetstream::new(f.c.clone()), &bus, stop.clone())
        .await
        .expect("verifier");
    let base = Node::new("bench-baseline", "0.0.0")
        .verifier(Arc::new(verifier))
        .endpoint(
            Endpoint::raw(BASELINE_SUBJECT, |r| async move { baseline(r) }).scope(Scope::A2aCall),
        )
        .start(bus)
        .await
        .expect("baseline node");

    let workers = Workers::start(&f, &worker_token, 1).await;
    tether_testkit::eventually(Duration::from_secs(30), "the agent's card", || async {
        f.call(&format!("a2a.{AGENT}.card"), json!({}), Some(&token))
            .await
            .ok()
    })
    .await;

    // --- 1. latency ----------------------------------------------------------------------
    let send = format!("a2a.{AGENT}.send");
    let url = gw.agent_url(AGENT).expect("the bridge runs");
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("http client");
    for _ in 0..WARMUP {
        bus_send(&c, &send, &token, "ping").await;
        http_send(&http, &url, &token, "ping").await;
        bus_send(&c, BASELINE_SUBJECT, &token, "ping").await;
    }
    let mut h_bus = Histogram::<u64>::new(3).expect("hist");
    let mut h_http = Histogram::<u64>::new(3).expect("hist");
    let mut h_base = Histogram::<u64>::new(3).expect("hist");
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        bus_send(&c, &send, &token, "ping").await;
        h_bus.record(us(t.elapsed())).expect("record");
        let t = Instant::now();
        http_send(&http, &url, &token, "ping").await;
        h_http.record(us(t.elapsed())).expect("record");
        let t = Instant::now();
        bus_send(&c, BASELINE_SUBJECT, &token, "ping").await;
        h_base.record(us(t.elapsed())).expect("record");
    }
    let (b50, b99) = (ms(&h_base, 0.5), ms(&h_base, 0.99));
    println!(
        "A2A send → COMPLETED, {ROUND_TRIPS} sequential round trips each, interleaved (after {WARMUP} warm-up):"
    );
    println!("                                         p50 (ms)   p99 (ms)   p50 ratio  p99 ratio");
    for (name, h) in [
        ("(1) blocking send on the bus         ", &h_bus),
        ("(2) JSON-RPC SendMessage, HTTP bridge", &h_http),
        ("(3) plain request/reply (baseline)   ", &h_base),
    ] {
        let (p50, p99) = (ms(h, 0.5), ms(h, 0.99));
        println!(
            "  {name}  {p50:>8.3}   {p99:>8.3}   x{:>7.2}   x{:>7.2}",
            p50 / b50,
            p99 / b99
        );
    }
    println!(
        "  durable path adds at p50: bus {:+.3} ms, HTTP bridge {:+.3} ms (target: at most +3 ms)",
        ms(&h_bus, 0.5) - b50,
        ms(&h_http, 0.5) - b50
    );

    // --- 2. throughput -------------------------------------------------------------------
    let mut workers = Some(workers);
    let mut rows = Vec::new();
    for sleep in [0u64, 5] {
        let text = if sleep == 0 {
            "ping".to_string()
        } else {
            format!("sleep {sleep} ping")
        };
        let mut per = Vec::new();
        for n in [1usize, 2, 4] {
            if let Some(w) = workers.take() {
                w.stop().await;
            }
            workers = Some(Workers::start(&f, &worker_token, n).await);
            per.push((n, throughput(&c, &token, &text).await));
        }
        rows.push((sleep, per));
    }
    println!(
        "throughput, tasks/s: {INFLIGHT} blocking sends in flight, workers of max_concurrency 1, \
         {THROUGHPUT_FOR:?} after {THROUGHPUT_WARMUP:?} warm-up:"
    );
    for (sleep, per) in &rows {
        let one = per[0].1;
        let cells: Vec<String> = per
            .iter()
            .map(|(n, r)| format!("{n} worker(s) {r:>7.0} (x{:.2})", r / one))
            .collect();
        println!("  executor {sleep} ms:  {}", cells.join("   "));
    }

    // --- 3. where the time goes ----------------------------------------------------------
    if let Some(w) = workers.take() {
        w.stop().await;
    }
    let workers = Workers::start(&f, &worker_token, 1).await;
    let per_task = tap(&f, &c, &token).await;
    println!("bus messages per blocking send (1 worker, {TAPPED_TASKS} tasks, wiretap on `>`):");
    for (k, n) in &per_task {
        println!("  {k:<45} {n:>6.2}");
    }

    workers.stop().await;
    base.shutdown().await.expect("baseline shutdown");
    gw.shutdown().await.expect("gateway shutdown");
    stop.cancel();
}
