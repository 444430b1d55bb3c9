//! `just bench` for the cluster (issue 16): request/reply through a bus node on a 3-node
//! JetStream cluster against the same on one server, and the failover gap.
//!
//! 1. Latency, sequential (p50/p99): a node with a public echo endpoint, its caller on
//!    (a) the same single server; (b) a 3-node cluster, the caller on another member than the
//!    node (one route hop each way, as most callers of a fleet are). Ratio (b)/(a).
//! 2. Failover gap: the node is given the whole server list; SIGKILL the member it is
//!    connected to and time until a caller on a surviving member gets its echo answered
//!    (requests with a 100 ms timeout, back to back). The killed member is started again
//!    before the next run, and each run kills the node's current server. Median of the runs
//!    (target: at most 2 s).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tether_bus::{BusConfig, CallerKind, Endpoint, Node, NodeHandle, Problem, Request};
use tether_proto::{EchoReply, EchoRequest};
use tether_testkit::{NatsCluster, NatsServer};

const SEQ: usize = 2_000;
const WARMUP: usize = 300;
const KILLS: usize = 5;
const SUBJECT: &str = "bench.cluster";

async fn echo<C: CallerKind>(req: Request<EchoRequest, C>) -> Result<EchoReply, Problem> {
    Ok(EchoReply {
        message: req.body.message,
        ..Default::default()
    })
}

async fn node(url: String) -> anyhow::Result<NodeHandle> {
    Node::new("bench-cluster", "1.0.0")
        .endpoint(Endpoint::public(SUBJECT, echo))
        .start(BusConfig {
            nats_url: url,
            log: "warn".into(),
            ..Default::default()
        })
        .await
}

fn body() -> bytes::Bytes {
    bytes::Bytes::from_static(br#"{"message":"hello"}"#)
}

/// p50 and p99 of sequential echoes, in ms.
async fn latency(c: &async_nats::Client) -> (f64, f64) {
    for _ in 0..WARMUP {
        let _ = c.request(SUBJECT, body()).await;
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..SEQ {
        let t = Instant::now();
        c.request(SUBJECT, body()).await.expect("echo");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    (
        h.value_at_quantile(0.5) as f64 / 1e6,
        h.value_at_quantile(0.99) as f64 / 1e6,
    )
}

/// A member other than the one on `port`, and a client of it alone.
async fn caller_elsewhere(cluster: &NatsCluster, port: u16) -> async_nats::Client {
    let m = cluster
        .members
        .iter()
        .find(|m| m.port() != port)
        .expect("another member");
    m.client().await.expect("client")
}

/// Time from SIGKILL of the node's server to the first echo served.
async fn one_failover(cluster: &mut NatsCluster, n: &NodeHandle) -> Duration {
    let port = n.ctx().client.server_info().port;
    let victim = cluster.member_on(port).expect("the node's server");
    let c = caller_elsewhere(cluster, port).await;
    c.request(SUBJECT, body()).await.expect("echo before");
    let killed = Instant::now();
    cluster.members[victim].kill().await;
    loop {
        let r = tokio::time::timeout(Duration::from_millis(100), c.request(SUBJECT, body())).await;
        if matches!(r, Ok(Ok(_))) {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "no failover");
    }
    let gap = killed.elapsed();
    cluster.members[victim]
        .restart()
        .await
        .expect("restart the member");
    gap
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("error")
        .with_writer(std::io::stderr)
        .init();
    let single = NatsServer::start().await?;
    let n1 = node(single.url()).await?;
    let (s50, s99) = latency(&single.client().await?).await;
    n1.shutdown().await?;

    let mut cluster = NatsCluster::start().await?;
    let n3 = node(cluster.url()).await?;
    let c = caller_elsewhere(&cluster, n3.ctx().client.server_info().port).await;
    let (c50, c99) = latency(&c).await;
    println!("request/reply through a node, {SEQ} sequential (after {WARMUP} warm-up):");
    println!("                                         p50 (ms)   p99 (ms)   p50 ratio  p99 ratio");
    println!(
        "  one server (baseline)                  {s50:8.3}   {s99:8.3}   x {:6.2}   x {:6.2}",
        1.0, 1.0
    );
    println!(
        "  3-node cluster, caller on another node {c50:8.3}   {c99:8.3}   x {:6.2}   x {:6.2}",
        c50 / s50,
        c99 / s99
    );

    let mut gaps = Vec::new();
    for _ in 0..KILLS {
        gaps.push(one_failover(&mut cluster, &n3).await);
    }
    let mut ms: Vec<f64> = gaps.iter().map(|g| g.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "failover gap, SIGKILL of the node's server → first echo served ({KILLS} runs): median {:.0} ms (runs {}) (target: at most 2000 ms)",
        ms[ms.len() / 2],
        ms.iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    n3.shutdown().await?;
    Ok(())
}
