//! A space from the warm pool against a cold create, in one run (interleaved, so drift hits
//! both alike): `containers.create` of a space until its reply (the daemon serving, when on),
//! then the first `containers.exec` of `true` in it. The cold create differs from the pooled
//! one only in naming its container (a request with a name of its own never takes a pool
//! container); the pool is refilled between rounds, untimed.
//!
//! `cargo bench -p tether-container-orchestrator --bench pool` (env `BENCH_N`, default 40).

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tether_container_orchestrator::config::PoolConfig;
use tether_testkit::docker::BUSYBOX_IMAGE;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn create_stats(f: &Fleet) -> Value {
    endpoint_stats(f, "containers-create").await
}

/// Creates a space as a new agent (`extra` merged in), then execs `true` in it twice: the
/// times to the reply and to the first exit, the second exec's own time (microseconds), and
/// whether the create took a pool container.
async fn one(f: &Fleet, extra: Value) -> (u64, u64, u64, bool) {
    let space = unique("bench");
    let t = f.agent(&unique("agent"), &space, SCOPES).await;
    let start = Instant::now();
    let info = f.create_space(&t, extra).await;
    let created = start.elapsed();
    let r = f.exec(&t, json!({"command": ["true"]})).await.unwrap();
    let ready = start.elapsed();
    assert_eq!(r["exit_code"], 0);
    let again = Instant::now();
    f.exec(&t, json!({"command": ["true"]})).await.unwrap();
    let second = again.elapsed();
    let pooled = info["labels"].get("tether.pool").is_some();
    f.call("containers.remove", json!({}), Some(&t))
        .await
        .unwrap();
    (
        created.as_micros() as u64,
        ready.as_micros() as u64,
        second.as_micros() as u64,
        pooled,
    )
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let f = fleet_with(true, |c| {
        c.pool = vec![PoolConfig {
            image: BUSYBOX_IMAGE.into(),
            size: 2,
            ..Default::default()
        }]
    })
    .await;
    let (mut hit_create, mut hit_ready) = (hist(), hist());
    let (mut cold_create, mut cold_ready) = (hist(), hist());
    let (mut hit_second, mut cold_second) = (hist(), hist());
    let mut refill = hist();
    for i in 0..n + 2 {
        // Untimed: the pool is full again.
        let wait = Instant::now();
        loop {
            if create_stats(&f).await["pool_free"].as_u64() == Some(2) {
                break;
            }
            assert!(
                wait.elapsed() < Duration::from_secs(120),
                "the pool refills"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (c, r, r2, pooled) = one(&f, json!({})).await;
        assert!(pooled, "a plain create takes the pool's container");
        let (cc, cr, cr2, cold_pooled) = one(&f, json!({"name": unique("cold")})).await;
        assert!(!cold_pooled);
        if i < 2 {
            continue; // warm-up
        }
        hit_create.record(c).unwrap();
        hit_ready.record(r).unwrap();
        hit_second.record(r2).unwrap();
        cold_create.record(cc).unwrap();
        cold_ready.record(cr).unwrap();
        cold_second.record(cr2).unwrap();
    }
    let s = create_stats(&f).await;
    let refills = s["pool_refills"].as_u64().unwrap_or(0).max(1);
    refill
        .record(s["pool_refill_ms_total"].as_u64().unwrap_or(0) * 1000 / refills)
        .unwrap();
    println!(
        "\nspace create, {n} of each, interleaved (daemon on: {})",
        tether_testkit::orchestrator::space_daemon_on()
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10}",
        "path", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, h) in [
        ("pool hit: create replied", &hit_create),
        ("cold create: create replied", &cold_create),
        ("pool hit: + first exec of true", &hit_ready),
        ("cold create: + first exec of true", &cold_ready),
        ("pool hit: the second exec alone", &hit_second),
        ("cold create: the second exec alone", &cold_second),
    ] {
        println!(
            "{:<40} {:>10.2} {:>10.2} {:>10.2}",
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
        "ratio pool/cold (create replied): p50 {:.3}x  p99 {:.3}x   (target: pool hit p50 <= 20 ms)",
        r(&hit_create, &cold_create, 0.5),
        r(&hit_create, &cold_create, 0.99)
    );
    println!(
        "pool refill (create + start of a free container), mean over {refills}: {:.1} ms; stats {s}",
        ms(refill.value_at_quantile(0.5))
    );
    drop(f);
}
