//! Profiling harness for the request path, to run a responder under valgrind's callgrind
//! (which counts instructions repeatably, unlike wall-clock figures on a shared machine).
//! The responder and the client are separate processes, so the count is the responder's only.
//!
//! ```text
//! profile node   <nats-url> <requests> <token-file>   # the bench's node (echo, auth hook)
//! profile raw    <nats-url> <requests>                # the bench's raw async-nats responder
//! profile client <nats-url> <subject> <requests> <in-flight> [token-file]
//! ```
//!
//! A responder prints `ready` once it serves and exits after `<requests>` requests. Use
//! (`crates/bus/examples/profile.sh` does it all): start the responder under
//! `valgrind --tool=callgrind --instr-atstart=no`, run a warm-up client, switch collection
//! on with `callgrind_control -i on`, run the measured client; instructions ÷ requests is the
//! cost per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tether_auth::{Claims, KeySet, Scope, ScopeSet, SigningKey};
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, CallerKind, Endpoint, Node, Problem, Request};
use tether_proto::{EchoReply, EchoRequest};

async fn echo<C: CallerKind>(req: Request<EchoRequest, C>) -> Result<EchoReply, Problem> {
    Ok(EchoReply {
        message: req.body.message,
        ..Default::default()
    })
}

fn arg(args: &[String], i: usize) -> anyhow::Result<&str> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| anyhow::anyhow!("missing argument {i}; see the module docs"))
}

async fn node(url: &str, total: u64, token_file: &str) -> anyhow::Result<()> {
    let cfg = BusConfig {
        nats_url: url.into(),
        log: "warn".into(),
        ..Default::default()
    };
    let _t = tether_bus::telemetry::init(&cfg, "profile")?;
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
    std::fs::write(token_file, key.sign(&claims)?)?;
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client.clone());
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
    println!("ready");
    let served = || node.requests_served("bench-node") + node.requests_served("bench-auth");
    while served() < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await
}

async fn raw(url: &str, total: u64) -> anyhow::Result<()> {
    let client = async_nats::connect(url).await?;
    let mut sub = client.subscribe("bench.raw").await?;
    client.flush().await?;
    println!("ready");
    let mut n = 0;
    while n < total {
        let Some(m) = sub.next().await else { break };
        if let Some(reply) = m.reply {
            let _ = client.publish(reply, m.payload).await;
        }
        n += 1;
    }
    client.flush().await?;
    Ok(())
}

async fn client(
    url: &str,
    subject: &str,
    n: u64,
    inflight: u64,
    token: Option<String>,
) -> anyhow::Result<()> {
    let c = async_nats::connect(url).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    if let Some(t) = token {
        headers.insert("Authorization", format!("Bearer {}", t.trim()).as_str());
    }
    let body = bytes::Bytes::from_static(br#"{"message":"hello"}"#);
    let left = Arc::new(AtomicU64::new(n));
    let tasks: Vec<_> = (0..inflight)
        .map(|_| {
            let (c, s, h, b, left) = (
                c.clone(),
                subject.to_string(),
                headers.clone(),
                body.clone(),
                left.clone(),
            );
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1))
                    .is_ok()
                {
                    let r = c
                        .request_with_headers(s.clone(), h.clone(), b.clone())
                        .await?;
                    anyhow::ensure!(
                        r.headers
                            .as_ref()
                            .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()),
                        "error reply"
                    );
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, 2)?;
    match arg(&args, 1)? {
        "node" => node(url, arg(&args, 3)?.parse()?, arg(&args, 4)?).await,
        "raw" => raw(url, arg(&args, 3)?.parse()?).await,
        "client" => {
            let token = match args.get(6) {
                Some(f) => Some(std::fs::read_to_string(f)?),
                None => None,
            };
            client(
                url,
                arg(&args, 3)?,
                arg(&args, 4)?.parse()?,
                arg(&args, 5)?.parse()?,
                token,
            )
            .await
        }
        other => anyhow::bail!("unknown mode {other}; see the module docs"),
    }
}
