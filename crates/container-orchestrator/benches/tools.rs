//! `tools.execute` of `true` (sync, through the bus: create, start, wait, read output,
//! remove, record in KV) against the `docker run --rm` CLI in the same run (interleaved, so
//! drift hits both alike), then async job throughput with 1 and 2 orchestrator replicas.
//!
//! `cargo bench -p tether-container-orchestrator --bench tools` (env `BENCH_N`, default 60
//! sync runs each; `BENCH_JOBS`, default 120 jobs per throughput round).

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn cli_run(image: &str) {
    let s = std::process::Command::new("docker")
        .args(["run", "--rm", "--network", "none", image, "true"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(s.success());
}

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Submits `n` async `true` jobs and waits for every completion event.
async fn throughput(f: &Fleet, token: &str, n: usize) -> (Duration, usize) {
    let session = unique("bench");
    let mut events =
        f.c.subscribe(format!("events.tools.{session}"))
            .await
            .unwrap();
    let started = Instant::now();
    let replies = futures::stream::iter(0..n)
        .map(|_| {
            f.call(
                "tools.execute",
                json!({"tool_name": "true", "session_id": session, "image": f.image,
                       "command": ["true"], "async": true}),
                Some(token),
            )
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(replies.iter().all(Result::is_ok));
    let mut done = 0;
    let mut failed = 0;
    while done < n {
        let m = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .expect("jobs progress")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "tether.tool.completed" => done += 1,
            "tether.tool.queued" => {}
            _ => {
                done += 1;
                failed += 1;
            }
        }
    }
    (started.elapsed(), failed)
}

#[tokio::main]
async fn main() {
    let n = env_n("BENCH_N", 60);
    let jobs = env_n("BENCH_JOBS", 120);
    let f = fleet_with(true, |c| c.tool_workers = 4).await;
    let space = unique("bench");
    let t = f
        .agent(&unique("agent"), &space, &["tools:run", "containers:read"])
        .await;
    let body = json!({"tool_name": "true", "image": f.image, "command": ["true"]});

    // Warm up both paths.
    for _ in 0..3 {
        f.call("tools.execute", body.clone(), Some(&t))
            .await
            .unwrap();
        cli_run(&f.image);
    }
    let (mut bus, mut cli) = (hist(), hist());
    for _ in 0..n {
        let s = Instant::now();
        let r = f
            .call("tools.execute", body.clone(), Some(&t))
            .await
            .unwrap();
        bus.record(s.elapsed().as_micros() as u64).unwrap();
        assert_eq!(r["status"], "completed");
        let s = Instant::now();
        cli_run(&f.image);
        cli.record(s.elapsed().as_micros() as u64).unwrap();
    }
    println!("sync tool run of `true` ({n} each, interleaved):");
    for (name, h) in [
        ("tools.execute (bus)", &bus),
        ("docker run --rm (CLI)", &cli),
    ] {
        println!(
            "  {name:<24} p50 {:>8.1} ms   p99 {:>8.1} ms",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        );
    }
    println!(
        "  ratio bus/CLI at p50: {:.2} (target: below 1)",
        bus.value_at_quantile(0.5) as f64 / cli.value_at_quantile(0.5) as f64
    );
    assert!(f.engine_containers().is_empty());

    // Async throughput: one replica, then a second on the same engine.
    let (d1, f1) = throughput(&f, &t, jobs).await;
    let mut cfg = orch_config(&unique("t2"));
    cfg.tool_workers = 4;
    let second_host = cfg.host_id.clone();
    let second = start_orchestrator(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        cfg,
    )
    .await;
    let (d2, f2) = throughput(&f, &t, jobs).await;
    println!("async jobs of `true` ({jobs} per round, 4 workers per replica):");
    for (replicas, d, failed) in [(1, d1, f1), (2, d2, f2)] {
        println!(
            "  {replicas} replica(s): {:>6.1} jobs/s ({:.1} s, {failed} not completed)",
            jobs as f64 / d.as_secs_f64(),
            d.as_secs_f64()
        );
    }
    second.shutdown().await.unwrap();
    let l = format!("label=tether.host={second_host}");
    for id in docker(&["ps", "-aq", "--filter", &l]).lines() {
        docker(&["rm", "-f", id]);
    }
}
