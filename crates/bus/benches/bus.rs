//! `just bench` for the runtime: request/reply through a bus node (JSON decode, auth hook,
//! tracing on) against raw async-nats request/reply, in one run on one nats-server; plus
//! token verification cost and the round trip with and without verification.
//!
//! Prints p50/p99 latency (sequential requests) and throughput (64 requests in flight), and
//! each as a ratio to the raw baseline. Sizes are bounded so it finishes in about a minute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tether_auth::{Claims, KeySet, Scope, ScopeSet, SigningKey, Validation};
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, CallerKind, Endpoint, Node, Problem, Request, StaticVerifier};
use tether_proto::{EchoReply, EchoRequest};
use tether_testkit::NatsServer;

const SEQ: usize = 3_000;
const ROUNDS: usize = 3;
const WARMUP: usize = 500;
const INFLIGHT: usize = 64;
const THROUGHPUT_FOR: Duration = Duration::from_secs(2);

struct Result_ {
    name: &'static str,
    p50: f64,
    p99: f64,
    rps: f64,
}

async fn latency(
    c: &async_nats::Client,
    subject: &str,
    headers: &async_nats::HeaderMap,
    body: &bytes::Bytes,
) -> (f64, f64) {
    for _ in 0..WARMUP {
        let _ = c
            .request_with_headers(subject.to_string(), headers.clone(), body.clone())
            .await;
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..SEQ {
        let t = Instant::now();
        let r = c
            .request_with_headers(subject.to_string(), headers.clone(), body.clone())
            .await
            .expect("reply");
        assert!(
            r.headers
                .as_ref()
                .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()),
            "error reply in bench"
        );
        h.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    (
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

async fn throughput(
    c: &async_nats::Client,
    subject: &str,
    headers: &async_nats::HeaderMap,
    body: &bytes::Bytes,
) -> f64 {
    let start = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..INFLIGHT)
        .map(|_| {
            let (c, s, h, b, done) = (
                c.clone(),
                subject.to_string(),
                headers.clone(),
                body.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                while start.elapsed() < THROUGHPUT_FOR {
                    if c.request_with_headers(s.clone(), h.clone(), b.clone())
                        .await
                        .is_ok()
                    {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn echo<C: CallerKind>(req: Request<EchoRequest, C>) -> Result<EchoReply, Problem> {
    Ok(EchoReply {
        message: req.body.message,
        ..Default::default()
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let cfg = BusConfig {
        nats_url: nats.url(),
        log: "warn".into(),
        ..Default::default()
    };
    // Tracing on: the subscriber with the OpenTelemetry layer, as in production.
    let _t = tether_bus::telemetry::init(&cfg, "bench")?;

    let key = SigningKey::generate()?;
    let mut set = KeySet::default();
    set.insert(key.public_key())?;
    let auth = AuthConfig::default();
    let claims = Claims::new(
        &auth.issuer,
        &auth.audience,
        "bench-agent",
        "bench-space",
        [Scope::ShellExec].into_iter().collect::<ScopeSet>(),
        tether_auth::now_unix(),
        3600,
    );
    let token = key.sign(&claims)?;

    // Baseline: a raw async-nats responder on its own connection to the same server, echoing
    // the payload back (no decoding at all: the strictest baseline for the node).
    let raw_client = nats.client().await?;
    let mut sub = raw_client.subscribe("bench.raw").await?;
    let rc = raw_client.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = rc.publish(reply, m.payload).await;
            }
        }
    });

    // The production verifier: public key published in KV, verifier following it.
    let js = async_nats::jetstream::new(raw_client.clone());
    let keys =
        tether_bus::kv::open_or_create_bucket(&js, tether_bus::auth::keys_bucket_config(&auth, 1))
            .await?;
    keys.put(key.kid(), serde_json::to_vec(&key.public_key())?.into())
        .await?;
    let node = Node::new("bench-node", "1.0.0")
        .endpoint(Endpoint::public("bench.node", echo))
        .endpoint(Endpoint::new("bench.auth", echo).scope(Scope::ShellExec))
        .start(cfg)
        .await?;

    let c = nats.client().await?;
    let body = bytes::Bytes::from_static(br#"{"message":"hello"}"#);
    let plain = async_nats::HeaderMap::new();
    let mut json = async_nats::HeaderMap::new();
    json.insert("Content-Type", "application/json");
    let mut authed = json.clone();
    authed.insert("Authorization", format!("Bearer {token}").as_str());

    // Each node path is measured against a raw responder receiving the very same bytes and
    // headers, so the ratio is what the runtime adds, not what headers cost on the wire.
    // Rounds interleave the paths, and each figure is the median over rounds, so a burst of
    // load from elsewhere on the machine shifts every path alike instead of one.
    let paths = [
        ("raw, JSON headers", "bench.raw", &json),
        ("node, public endpoint", "bench.node", &json),
        ("raw, JSON + bearer headers", "bench.raw", &authed),
        ("node, same request, no verify", "bench.node", &authed),
        ("node, token verified", "bench.auth", &authed),
    ];
    let mut rounds: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (k, (_, subject, headers)) in paths.iter().enumerate() {
            let (p50, p99) = latency(&c, subject, headers, &body).await;
            let rps = throughput(&c, subject, headers, &body).await;
            rounds[k].push((p50, p99, rps));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let results: Vec<Result_> = paths
        .iter()
        .zip(rounds)
        .map(|((name, _, _), r)| Result_ {
            name,
            p50: median(r.iter().map(|x| x.0).collect()),
            p99: median(r.iter().map(|x| x.1).collect()),
            rps: median(r.iter().map(|x| x.2).collect()),
        })
        .collect();
    let _ = &plain;

    // Token verification alone.
    let v = Validation {
        issuer: auth.issuer.clone(),
        audience: auth.audience.clone(),
        leeway_secs: 30,
    };
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..20_000 {
        let t = Instant::now();
        let _ = tether_auth::verify(&token, &set, &v, tether_auth::now_unix())?;
        h.record(t.elapsed().as_nanos() as u64)?;
    }
    let verify_p50_us = h.value_at_quantile(0.5) as f64 / 1000.0;
    // The per-request cost once a token has been seen (expiry and revocation still checked).
    let cached = StaticVerifier::new(set.clone(), &auth);
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..50_000 {
        let t = Instant::now();
        let _ = tether_bus::Verify::verify(&cached, &token).await?;
        h.record(t.elapsed().as_nanos() as u64)?;
    }
    let cached_p50_us = h.value_at_quantile(0.5) as f64 / 1000.0;

    println!(
        "\n== bus benchmark (one nats-server; median of {ROUNDS} interleaved rounds of {SEQ} sequential requests and {INFLIGHT} in flight for throughput) =="
    );
    println!(
        "{:<32} {:>10} {:>10} {:>12}",
        "path", "p50 µs", "p99 µs", "req/s"
    );
    for r in &results {
        println!(
            "{:<32} {:>10.1} {:>10.1} {:>12.0}",
            r.name, r.p50, r.p99, r.rps
        );
    }
    let ratio = |a: &Result_, b: &Result_| (a.p50 / b.p50, a.rps / b.rps);
    let (pub_p50, pub_rps) = ratio(&results[1], &results[0]);
    let (full_p50, full_rps) = ratio(&results[4], &results[2]);
    let (ver_p50, ver_rps) = ratio(&results[4], &results[3]);
    println!(
        "\nnode (JSON decode, tracing) vs raw:              p50 ×{pub_p50:.3} ({:+.1}%), throughput {:.0}% of raw",
        (pub_p50 - 1.0) * 100.0,
        pub_rps * 100.0
    );
    println!(
        "node (JSON decode, auth hook, tracing) vs raw:  p50 ×{full_p50:.3} ({:+.1}%, target ≤ +10%), throughput {:.0}% of raw (target ≥ 80%)",
        (full_p50 - 1.0) * 100.0,
        full_rps * 100.0
    );
    println!(
        "token verification: {verify_p50_us:.1} µs p50 on first sight of a token (Ed25519), {cached_p50_us:.2} µs p50 per request after (cache; expiry and revocation still checked)"
    );
    println!(
        "round trip with vs without verification:        p50 ×{ver_p50:.3} ({:+.1}%, target ≤ +5%), throughput ×{ver_rps:.3}",
        (ver_p50 - 1.0) * 100.0
    );
    node.shutdown().await?;
    Ok(())
}
