//! `just bench` for bus authorization: what the auth callout costs, measured in one run.
//!
//! - connect time (p50/p99 of sequential connects): anonymous to an open server (the
//!   baseline), a configured user on the authorized server (no callout), and an agent with its
//!   token through the permission node's callout;
//! - the bus round trip (p50/p99 sequential, throughput with 64 in flight) of the same raw
//!   request/reply between two plain clients, on the open server and, on the authorized one,
//!   between an agent connection and a node-side responder. Authorization is decided at
//!   connect, so the target is no measurable change per message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tether_testkit::{Fleet, NatsServer};

const CONNECTS: usize = 200;
const SEQ: usize = 3_000;
const WARMUP: usize = 300;
const INFLIGHT: usize = 64;
const THROUGHPUT_FOR: Duration = Duration::from_secs(2);
const SUBJECT: &str = "shell.exec";

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn connect_times<F, Fut>(mut connect: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<async_nats::Client>>,
{
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..CONNECTS {
        let t = Instant::now();
        let c = connect().await.expect("connect");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
        drop(c);
    }
    (micros(&h, 0.5), micros(&h, 0.99))
}

/// A raw responder on `c` that echoes every request on [`SUBJECT`].
async fn responder(c: async_nats::Client) {
    let mut sub = c.subscribe(SUBJECT).await.expect("subscribe");
    c.flush().await.expect("flush");
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                let _ = c.publish(r, m.payload).await;
            }
        }
    });
}

async fn round_trip(c: &async_nats::Client) -> (f64, f64, f64) {
    let body = bytes::Bytes::from_static(b"{\"command\":\"true\"}");
    for _ in 0..WARMUP {
        c.request(SUBJECT, body.clone())
            .await
            .expect("warm-up reply");
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..SEQ {
        let t = Instant::now();
        c.request(SUBJECT, body.clone()).await.expect("reply");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..INFLIGHT)
        .map(|_| {
            let (c, b, done) = (c.clone(), body.clone(), done.clone());
            tokio::spawn(async move {
                while start.elapsed() < THROUGHPUT_FOR {
                    if c.request(SUBJECT, b.clone()).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let rps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    (micros(&h, 0.5), micros(&h, 0.99), rps)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let open = NatsServer::start_open().await?;
    let f = Fleet::start().await?;
    let token = f.agent("bench-agent", "bench-space", &["shell:exec"]).await;

    let plain = open.plain_url();
    let (a50, a99) = connect_times(|| tether_testkit::connect(&plain)).await;
    let admin = f.url();
    let (u50, u99) = connect_times(|| tether_testkit::connect(&admin)).await;
    let (t50, t99) = connect_times(|| f.connect_as(&token)).await;
    println!("bus connect, {CONNECTS} sequential connects (p50 / p99, µs):");
    println!("  anonymous, open server (baseline)   {a50:>9.0} / {a99:>9.0}");
    println!(
        "  configured user, authorized server  {u50:>9.0} / {u99:>9.0}   p50 x{:.2}",
        u50 / a50
    );
    println!(
        "  agent token through the callout     {t50:>9.0} / {t99:>9.0}   p50 x{:.2}",
        t50 / a50
    );

    responder(tether_testkit::connect(&plain).await?).await;
    let base = round_trip(&tether_testkit::connect(&plain).await?).await;
    responder(f.nats.client().await?).await;
    let authz = round_trip(&f.connect_as(&token).await?).await;
    println!(
        "bus round trip, raw request/reply, {SEQ} sequential + {INFLIGHT} in flight for {THROUGHPUT_FOR:?}:"
    );
    println!(
        "  without authorization (baseline)  p50 {:>7.1} µs  p99 {:>7.1} µs  {:>8.0} req/s",
        base.0, base.1, base.2
    );
    println!(
        "  with authorization (agent)        p50 {:>7.1} µs  p99 {:>7.1} µs  {:>8.0} req/s   p50 x{:.3}, throughput {:.0}%",
        authz.0,
        authz.1,
        authz.2,
        authz.0 / base.0,
        100.0 * authz.2 / base.2
    );
    Ok(())
}
