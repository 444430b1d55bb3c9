//! `cargo bench -p tether-model-gateway`: what the gateway adds to a model call, and how many
//! streams it holds at once.
//!
//! 1. Round trip: the same non-streamed chat call to a stand-in OpenAI server, directly over
//!    HTTP (reqwest, a pooled keep-alive connection) and through the gateway (NATS request →
//!    token check → route → HTTP → reply). p50/p99 of each, the difference and the ratio.
//!    Target: at most 1 ms added at p50.
//! 2. 1000 concurrent streaming calls: each subscribes to its own stream subject, all are in
//!    flight at the stand-in at once (its peak count is printed), every one must finish without
//!    error with its chunks in order and concatenating to the final message.
//!
//! Real parts only: nats-server, the permission node issuing the token, HTTP over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tether_model_gateway::GatewayConfig;

const ROUND_TRIPS: usize = 3000;
const WARMUP: usize = 300;
const STREAMS: usize = 1000;

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let f = fleet().await;
    let token = f.agent("bench-agent", "bench-space", &["model:call"]).await;
    let llm = StandIn::start("llm").await;
    let mut p = provider("llm", &llm.base_url(), true);
    p.max_concurrency = 4096;
    p.timeout_ms = 60_000;
    let cfg = GatewayConfig {
        endpoint_concurrency: 4096,
        ..config(vec![p], vec![route("m", &[("llm", "")])])
    };
    let gw = f.gateway(cfg).await;

    // --- 1. round trip -------------------------------------------------------------------
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let url = format!("{}/chat/completions", llm.base_url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "ping"}]});
    let direct = |http: reqwest::Client, url: String, body: Value| async move {
        let r = http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("send");
        assert!(r.status().is_success());
        let v: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
        assert!(v["choices"][0]["message"]["content"].is_string());
    };
    let via_gateway = |c: async_nats::Client, token: String, body: Value| async move {
        let r = call(&c, "model.chat", body, Some(&token))
            .await
            .expect("gateway call");
        assert_eq!(r["provider"], "llm");
    };
    for _ in 0..WARMUP {
        direct(http.clone(), url.clone(), body.clone()).await;
        via_gateway(f.c.clone(), token.clone(), body.clone()).await;
    }
    let mut h_direct = Histogram::<u64>::new(3).expect("hist");
    let mut h_gw = Histogram::<u64>::new(3).expect("hist");
    // Interleaved, so both see the same machine state.
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        direct(http.clone(), url.clone(), body.clone()).await;
        h_direct.record(us(t.elapsed())).expect("record");
        let t = Instant::now();
        via_gateway(f.c.clone(), token.clone(), body.clone()).await;
        h_gw.record(us(t.elapsed())).expect("record");
    }

    // --- 2. 1000 concurrent streams ------------------------------------------------------
    llm.state.stream_words.store(10, Ordering::SeqCst);
    llm.state.delay_ms.store(50, Ordering::SeqCst);
    llm.state.peak_in_flight.store(0, Ordering::SeqCst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let c = f.c.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let subject = c.new_inbox();
            let mut sub = c.subscribe(subject.clone()).await.map_err(|e| e.to_string())?;
            let body = json!({"model": "m", "messages": [{"role": "user", "content": format!("stream {i}")}],
                              "stream": true, "stream_subject": subject, "timeout_ms": 60000});
            let reply = call(&c, "model.chat", body, Some(&token))
                .await
                .map_err(|e| format!("{} {}", e.status, e.detail))?;
            let mut text = String::new();
            let mut seq = 0u64;
            loop {
                let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .map_err(|_| "chunk timeout".to_string())?
                    .ok_or("subscription closed")?;
                let chunk: Value = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
                if chunk["seq"].as_u64() != Some(seq) {
                    return Err(format!("chunk {} out of order (expected {seq})", chunk["seq"]));
                }
                seq += 1;
                text.push_str(chunk["delta"]["content"].as_str().unwrap_or_default());
                if chunk["done"] == true {
                    break;
                }
            }
            if text != content(&reply) {
                return Err("chunks do not concatenate to the final message".into());
            }
            Ok::<u64, String>(seq)
        }));
    }
    let mut ok = 0usize;
    let mut errors: Vec<String> = Vec::new();
    let mut chunks = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => {
                ok += 1;
                chunks += n;
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let stream_wall = started.elapsed();
    let peak = llm.state.peak_in_flight.load(Ordering::SeqCst);

    // --- report --------------------------------------------------------------------------
    let p = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
    let (d50, d99, g50, g99) = (
        p(&h_direct, 0.5),
        p(&h_direct, 0.99),
        p(&h_gw, 0.5),
        p(&h_gw, 0.99),
    );
    println!();
    println!(
        "model-gateway bench ({ROUND_TRIPS} interleaved round trips after {WARMUP} warm-up; times in µs)"
    );
    println!("| path                         |    p50 |    p99 |");
    println!("|------------------------------|-------:|-------:|");
    println!("| direct HTTP to the stand-in  | {d50:>6} | {d99:>6} |");
    println!("| through the gateway (NATS)   | {g50:>6} | {g99:>6} |");
    println!(
        "| added by the gateway         | {:>6} | {:>6} |",
        g50.saturating_sub(d50),
        g99.saturating_sub(d99)
    );
    println!(
        "ratio gateway/direct: p50 {:.2}x, p99 {:.2}x; target ≤ 1000 µs added at p50: {}",
        g50 as f64 / d50 as f64,
        g99 as f64 / d99 as f64,
        if g50.saturating_sub(d50) <= 1000 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!();
    println!(
        "| concurrent streams | ok   | errors | chunks | peak in flight at the provider | wall time |"
    );
    println!(
        "|-------------------:|-----:|-------:|-------:|-------------------------------:|----------:|"
    );
    println!(
        "| {STREAMS:>18} | {ok:>4} | {:>6} | {chunks:>6} | {peak:>30} | {:>7} ms |",
        errors.len(),
        stream_wall.as_millis()
    );
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
    gw.shutdown().await.expect("shutdown");
    assert!(errors.is_empty(), "{} streaming calls failed", errors.len());
}
