//! `containers.exec` of `true` through the bus, against a direct bollard exec and the
//! `docker exec` CLI in the same run (interleaved, so drift hits all alike), then concurrent
//! exec throughput with 1, 8 and 32 agents, each in its own space container.
//!
//! `cargo bench -p tether-container-orchestrator --bench exec` (env `BENCH_N`, default 300).

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bollard::Docker;
use common::*;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tether_testkit::docker::{cli_exec_true, engine_exec_true};

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let f = fleet_with(true, |c| c.max_concurrent_execs = 64).await;
    let docker = Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();

    // 32 agents, each with its own space container.
    let mut agents = Vec::new();
    for i in 0..32 {
        let space = unique(&format!("bench{i}"));
        let t = f.agent(&unique("agent"), &space, SCOPES).await;
        agents.push(t);
    }
    let created = futures::stream::iter(agents.iter())
        .map(|t| f.create_space(t, json!({})))
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    let id0 = {
        let i = f
            .call("containers.inspect", json!({}), Some(&agents[0]))
            .await
            .unwrap();
        i["container_id"].as_str().unwrap().to_string()
    };
    assert_eq!(created.len(), 32);
    let body = json!({"command": ["true"]});

    // Warm up every path.
    for _ in 0..20 {
        f.exec(&agents[0], body.clone()).await.unwrap();
        engine_exec_true(&docker, &id0).await;
    }
    cli_exec_true(&id0);

    let (mut h_bus, mut h_direct, mut h_cli) = (hist(), hist(), hist());
    let cli_every = 6;
    for i in 0..n {
        let t = Instant::now();
        let r = f.exec(&agents[0], body.clone()).await.unwrap();
        assert_eq!(r["exit_code"], 0);
        h_bus.record(t.elapsed().as_micros() as u64).unwrap();
        let t = Instant::now();
        engine_exec_true(&docker, &id0).await;
        h_direct.record(t.elapsed().as_micros() as u64).unwrap();
        if i % cli_every == 0 {
            let t = Instant::now();
            cli_exec_true(&id0);
            h_cli.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    println!(
        "\ncontainers.exec of `true`, {n} runs each ({} for the CLI), interleaved",
        n.div_ceil(cli_every)
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "path", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, h) in [
        ("bus (containers.exec)", &h_bus),
        ("direct bollard exec", &h_direct),
        ("docker exec CLI", &h_cli),
    ] {
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2}",
            name,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            h.mean() / 1000.0
        );
    }
    let r = |a: &Histogram<u64>, b: &Histogram<u64>, q: f64| {
        a.value_at_quantile(q) as f64 / b.value_at_quantile(q) as f64
    };
    println!(
        "ratio bus/bollard: p50 {:.2}x  p99 {:.2}x   (target <= 1.2x)",
        r(&h_bus, &h_direct, 0.5),
        r(&h_bus, &h_direct, 0.99)
    );
    println!(
        "ratio bus/CLI:     p50 {:.2}x  p99 {:.2}x   (target < 1x)",
        r(&h_bus, &h_cli, 0.5),
        r(&h_bus, &h_cli, 0.99)
    );

    println!("\nconcurrent containers.exec of `true` (each agent in its own container)");
    println!(
        "{:<8} {:>8} {:>12} {:>10} {:>10}",
        "agents", "execs", "execs/s", "p50 ms", "p99 ms"
    );
    let per_run = Duration::from_secs(5);
    for k in [1usize, 8, 32] {
        let start = Instant::now();
        let results = futures::future::join_all(agents[..k].iter().map(|t| {
            let c = f.c.clone();
            let t = t.clone();
            let body = body.clone();
            async move {
                let mut h = hist();
                while start.elapsed() < per_run {
                    let s = Instant::now();
                    call(&c, "containers.exec", body.clone(), Some(&t))
                        .await
                        .unwrap();
                    h.record(s.elapsed().as_micros() as u64).unwrap();
                }
                h
            }
        }))
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let mut all = hist();
        for h in &results {
            all.add(h).unwrap();
        }
        println!(
            "{:<8} {:>8} {:>12.1} {:>10.2} {:>10.2}",
            k,
            all.len(),
            all.len() as f64 / elapsed,
            ms(all.value_at_quantile(0.5)),
            ms(all.value_at_quantile(0.99))
        );
    }
    drop(f);
}
