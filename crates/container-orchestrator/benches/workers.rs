//! Worker deployments serving A2A: the example worker (`a2a-echo-worker`, 4 task slots) in an
//! image built here `FROM scratch`, the A2A gateway and the permission node on a real
//! nats-server that containers reach, the orchestrator on the real engine.
//!
//! 1. Deploy to first task served: `workers.deploy` of 1 replica of a fresh agent, then a task
//!    sent as soon as the gateway takes one; the time from the deploy to the task's
//!    completion event (`BENCH_RUNS` runs, default 5; p50/p99).
//! 2. Throughput: `BENCH_TASKS` tasks (default 200) of `sleep 100` ms sent at once, with 1, 2
//!    and 4 replicas of one deployment (tasks/s, ratio to 1 replica); the baseline is the same
//!    binary run once as a host process (no container) with the agent's token in its
//!    environment, measured in the same run.
//!
//! `cargo bench -p tether-container-orchestrator --bench workers` (needs the worker binary of
//! the same profile: `cargo build --release --bins -p tether-a2a-worker`). One run on a shared
//! 2-core machine: deploy to first task p50 688 ms, p99 706 ms; 37.8 tasks/s as a host
//! process, 37.6 / 74.9 / 143.4 with 1 / 2 / 4 replicas (ratios 1.00 / 1.99 / 3.82; the ideal
//! is 40 per worker).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tether_testkit::{NatsServer, NodeKind};

const IMAGE: &str = "tether-test/a2a-echo-worker:latest";
const WAIT: Duration = Duration::from_secs(120);

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The ids of the tasks that completed, from the gateway's task events, and the workers that
/// made them (the echo worker names itself in its artifact's metadata).
#[derive(Clone, Default)]
struct Completed(
    Arc<Mutex<HashSet<String>>>,
    Arc<Mutex<HashMap<String, String>>>,
);

/// The first `"worker": "<name>"` anywhere in `v`.
fn worker_of(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m
            .get("worker")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| m.values().find_map(worker_of)),
        Value::Array(a) => a.iter().find_map(worker_of),
        _ => None,
    }
}

/// A lock that a panicked holder left poisoned is still read (bench bookkeeping only).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Completed {
    async fn follow(c: &async_nats::Client) -> Completed {
        let done = Completed::default();
        let mut sub = c
            .subscribe("a2a_events.>")
            .await
            .expect("subscribe to task events");
        let d = done.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(id) = m.subject.as_str().rsplit('.').next() else {
                    continue;
                };
                if let Some(w) = serde_json::from_slice::<Value>(&m.payload)
                    .ok()
                    .as_ref()
                    .and_then(worker_of)
                {
                    lock(&d.1).insert(id.to_string(), w);
                }
                if std::str::from_utf8(&m.payload).is_ok_and(|p| p.contains("TASK_STATE_COMPLETED"))
                {
                    lock(&d.0).insert(id.to_string());
                }
            }
        });
        done
    }

    /// How many distinct workers made `ids`.
    fn workers(&self, ids: &[String]) -> usize {
        let by = lock(&self.1);
        ids.iter()
            .filter_map(|id| by.get(id))
            .collect::<HashSet<_>>()
            .len()
    }

    fn has(&self, id: &str) -> bool {
        lock(&self.0).contains(id)
    }

    /// Waits (bounded) until every one of `ids` completed.
    async fn all(&self, ids: &[String]) {
        let deadline = Instant::now() + WAIT;
        while !ids.iter().all(|id| self.has(id)) {
            assert!(Instant::now() < deadline, "tasks did not complete in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sends `text` to `agent` as `caller`, retrying while the gateway does not know the agent
/// yet; the task id.
async fn send(f: &Fleet, agent: &str, caller: &str, text: String) -> String {
    let body = json!({
        "message": {"messageId": unique("m"), "role": "ROLE_USER", "parts": [{"text": text}]},
        "configuration": {"returnImmediately": true},
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let mut h = async_nats::HeaderMap::new();
        h.insert("A2A-Version", "1.0");
        let r = tether_testkit::request(
            &f.c,
            &format!("a2a.{agent}.send"),
            body.clone(),
            Some(caller),
            h,
            Duration::from_secs(5),
        )
        .await;
        if let Ok(t) = r {
            let id = t["task"]["id"].as_str().or_else(|| t["id"].as_str());
            return id.unwrap_or_else(|| panic!("no task id: {t}")).to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never took a task: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` tasks of `sleep 100` ms sent at once; the time until every one completed, and their ids.
async fn round(
    f: &Fleet,
    done: &Completed,
    agent: &str,
    caller: &str,
    n: usize,
) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..n)
        .map(|i| send(f, agent, caller, format!("sleep 100 t{i}")))
        .buffer_unordered(32)
        .collect()
        .await;
    done.all(&ids).await;
    (started.elapsed(), ids)
}

/// Rounds of warm-up until `replicas` distinct workers serve one (every replica connected
/// and taking work).
async fn warm(f: &Fleet, done: &Completed, agent: &str, caller: &str, replicas: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, ids) = round(f, done, agent, caller, 8 * replicas).await;
        if done.workers(&ids) >= replicas {
            return;
        }
        assert!(Instant::now() < deadline, "not every replica serves");
    }
}

async fn wait_replicas(name: &str, n: usize) {
    eventually(WAIT, "replicas run", || async {
        (worker_replicas(name, "-q").len() == n).then_some(())
    })
    .await;
}

async fn call(f: &Fleet, subject: &str, body: Value) -> Value {
    f.call(subject, body, Some(&f.op))
        .await
        .unwrap_or_else(|p| panic!("{subject}: {p:?}"))
}

#[tokio::main]
async fn main() {
    let runs = env_n("BENCH_RUNS", 5);
    let tasks = env_n("BENCH_TASKS", 200);
    let bin = tether_testkit::cargo_bin("a2a-echo-worker").expect("a2a-echo-worker built");
    let image = tether_testkit::docker::build_binary_image(IMAGE, &bin).expect("worker image");
    let nats = NatsServer::start_for_containers()
        .await
        .expect("nats-server");
    let fleet = tether_testkit::Fleet::on(nats, Default::default())
        .await
        .expect("fleet");
    let f = Fleet::start_on(fleet, "wbench", true, |_| {})
        .await
        .expect("orchestrator");
    let gw_cfg = tether_a2a_gateway::A2aConfig {
        a2a_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let _gw = tether_a2a_gateway::start(f.node_bus(NodeKind::A2a), gw_cfg)
        .await
        .expect("a2a-gateway");
    let caller = f.agent(&unique("caller"), "callers", &["a2a:call"]).await;
    let done = Completed::follow(&f.c).await;

    // 1. Deploy to first task served, a fresh agent each run.
    let mut first = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds");
    for _ in 0..runs {
        let agent = unique("echo");
        f.agent(&agent, "workers", &["a2a:serve", "workers:hosted"])
            .await;
        let name = unique("first");
        let started = Instant::now();
        call(
            &f,
            "workers.deploy",
            json!({"name": name, "agent_id": agent, "image": image, "replicas": 1}),
        )
        .await;
        let id = send(&f, &agent, &caller, "hello".into()).await;
        done.all(std::slice::from_ref(&id)).await;
        first.saturating_record(started.elapsed().as_micros() as u64);
        call(&f, "workers.remove", json!({"name": name})).await;
        wait_replicas(&name, 0).await;
    }
    println!("workers.deploy (1 replica) to first A2A task completed ({runs} runs):");
    println!(
        "  p50 {:>8.1} ms   p99 {:>8.1} ms",
        ms(first.value_at_quantile(0.5)),
        ms(first.value_at_quantile(0.99))
    );

    // 2. Throughput: the host-process baseline, then 1, 2, 4 replicas.
    let agent = unique("echo");
    f.agent(&agent, "workers", &["a2a:serve", "workers:hosted"])
        .await;
    let host_agent = unique("echo-host");
    let host_token = f.agent(&host_agent, "workers", &["a2a:serve"]).await;
    let mut host = tokio::process::Command::new(&bin)
        .env("TETHER_NATS_URL", f.nats.plain_url())
        .env("TETHER_TOKEN", &host_token)
        .env("TETHER_WORKER_NAME", "host")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the host worker");
    warm(&f, &done, &host_agent, &caller, 1).await;
    let baseline = round(&f, &done, &host_agent, &caller, tasks).await.0;
    host.kill().await.expect("stop the host worker");

    let name = unique("tput");
    let mut results = Vec::new();
    for replicas in [1u32, 2, 4] {
        call(
            &f,
            "workers.deploy",
            json!({"name": name, "agent_id": agent, "image": image,
                   "replicas": replicas, "max_replicas": 4}),
        )
        .await;
        wait_replicas(&name, replicas as usize).await;
        warm(&f, &done, &agent, &caller, replicas as usize).await;
        results.push((replicas, round(&f, &done, &agent, &caller, tasks).await.0));
    }
    call(&f, "workers.remove", json!({"name": name})).await;
    wait_replicas(&name, 0).await;

    let rate = |d: Duration| tasks as f64 / d.as_secs_f64();
    println!("A2A tasks of `sleep 100` ms ({tasks} per round, 4 slots per worker):");
    println!(
        "  host process (baseline) {:>7.1} tasks/s ({:.2} s)",
        rate(baseline),
        baseline.as_secs_f64()
    );
    let one = rate(results[0].1);
    for (replicas, d) in &results {
        println!(
            "  {replicas} replica(s)           {:>7.1} tasks/s ({:.2} s)   ratio to 1 replica {:.2}   to the host process {:.2}",
            rate(*d),
            d.as_secs_f64(),
            rate(*d) / one,
            rate(*d) / rate(baseline)
        );
    }
    assert!(f.engine_containers().is_empty(), "replicas left");
}
