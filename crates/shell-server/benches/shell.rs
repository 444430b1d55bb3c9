//! `just bench` for the shell-server: `true` run in an agent's space container three ways, in
//! one run against one nats-server, one orchestrator and one container —
//! `containers.exec` directly (the baseline), `shell.exec` on the bus, and the MCP tool
//! `exec_command` over streamable HTTP (official Rust MCP client, pooled connections).
//!
//! Prints p50/p99 of sequential calls (interleaved rounds, so drift in the engine hits all
//! three alike) and each as a ratio to the baseline; the target is at most +15% for the shell
//! hop. Needs the Docker engine; without it the bench says so and exits 0.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use tether_auth::{Claims, Scope, SigningKey};
use tether_bus::BusConfig;
use tether_bus::config::AuthConfig;
use tether_testkit::NatsServer;

const ROUNDS: usize = 5;
const PER_ROUND: usize = 40;
const WARMUP: usize = 10;

fn bus(url: &str) -> BusConfig {
    BusConfig {
        nats_url: url.into(),
        ..Default::default()
    }
}

async fn request(c: &async_nats::Client, subject: &str, token: &str, body: &Value) -> Value {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Authorization", format!("Bearer {token}").as_str());
    let m = c
        .request_with_headers(subject.to_string(), h, body.to_string().into())
        .await
        .expect("reply");
    if let Some(p) = tether_bus::Problem::from_reply(m.headers.as_ref(), &m.payload) {
        panic!("{subject}: {p}");
    }
    serde_json::from_slice(&m.payload).expect("json")
}

struct Series {
    name: &'static str,
    h: Histogram<u64>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            h: Histogram::new(3).expect("histogram"),
        }
    }
    fn p(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1000.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !tether_testkit::docker::available() {
        println!("shell bench: skipped (no Docker engine)");
        return Ok(());
    }
    let image = tether_testkit::docker::busybox_image()?;
    let nats = NatsServer::start().await?;
    let url = nats.url();
    let key = SigningKey::generate()?;
    let client = tether_testkit::connect(&url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let perm = tether_permission_node::build(
        &bus(&url),
        Default::default(),
        SigningKey::from_pem(&key.to_pem())?,
        &js,
    )
    .await?
    .start_with_client(bus(&url), client)
    .await?;
    let host_id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let oc = tether_testkit::connect(&url).await?;
    let orch = tether_container_orchestrator::build(
        &bus(&url),
        tether_container_orchestrator::OrchestratorConfig {
            host_id: host_id.clone(),
            ..Default::default()
        },
        &oc,
    )
    .await?
    .start_with_client(bus(&url), oc)
    .await?;
    let shell = tether_shell_server::start(
        bus(&url),
        tether_shell_server::ShellConfig {
            mcp_listen: "127.0.0.1:0".into(),
            ..Default::default()
        },
    )
    .await?;

    let a = AuthConfig::default();
    let op = key.sign(&Claims::new(
        &a.issuer,
        &a.audience,
        "operator",
        "",
        [Scope::Operator].into_iter().collect(),
        tether_auth::now_unix(),
        3600,
    ))?;
    let c = nats.client().await?;
    request(
        &c,
        "agents.register",
        &op,
        &json!({"agent_id": "bench", "space": "bench",
                "scopes": ["shell:exec", "containers:exec", "containers:write"]}),
    )
    .await;
    let t = request(&c, "tokens.issue", &op, &json!({"agent_id": "bench"})).await;
    let token = t["token"].as_str().expect("token").to_string();
    request(&c, "containers.create", &token, &json!({"image": image})).await;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().build()?;
    let mcp = ()
        .serve(StreamableHttpClientTransport::with_client(
            http,
            StreamableHttpClientTransportConfig::with_uri(shell.mcp_url().expect("mcp listener"))
                .auth_header(token.clone()),
        ))
        .await?;
    let Value::Object(args) = json!({"command": "true"}) else {
        anyhow::bail!("args");
    };
    let body = json!({"command": "true"});

    let mut direct = Series::new("containers.exec (baseline)");
    let mut bus_shell = Series::new("shell.exec");
    let mut mcp_http = Series::new("exec_command via MCP HTTP");
    for round in 0..=ROUNDS {
        let n = if round == 0 { WARMUP } else { PER_ROUND };
        for which in 0..3 {
            for _ in 0..n {
                let t0 = Instant::now();
                match which {
                    0 => {
                        request(&c, "containers.exec", &token, &body).await;
                    }
                    1 => {
                        request(&c, "shell.exec", &token, &body).await;
                    }
                    _ => {
                        let r = mcp
                            .call_tool(
                                CallToolRequestParams::new("exec_command")
                                    .with_arguments(args.clone()),
                            )
                            .await?;
                        assert_ne!(r.is_error, Some(true), "{r:?}");
                    }
                }
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if round > 0 {
                    let s = match which {
                        0 => &mut direct,
                        1 => &mut bus_shell,
                        _ => &mut mcp_http,
                    };
                    s.h.record(ns)?;
                }
            }
        }
    }

    println!(
        "\nshell-server: `true` in a space container, {} sequential calls each ({ROUNDS} interleaved rounds)",
        ROUNDS * PER_ROUND
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "path", "p50 ms", "p99 ms", "p50 ratio", "p99 ratio"
    );
    let (b50, b99) = (direct.p(0.5), direct.p(0.99));
    for s in [&direct, &bus_shell, &mcp_http] {
        println!(
            "{:<30} {:>10.2} {:>10.2} {:>10.3} {:>10.3}",
            s.name,
            s.p(0.5) / 1000.0,
            s.p(0.99) / 1000.0,
            s.p(0.5) / b50,
            s.p(0.99) / b99
        );
    }
    let worst = (bus_shell.p(0.5) / b50).max(mcp_http.p(0.5) / b50);
    println!(
        "target: the shell hop adds at most 15% at p50 — {} (worst p50 ratio {worst:.3})",
        if worst <= 1.15 { "met" } else { "NOT met" }
    );

    mcp.cancel().await?;
    shell.shutdown().await?;
    orch.shutdown().await?;
    perm.shutdown().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {}).await;
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker rm -f $(docker ps -aq --filter label=tether.host={host_id}) >/dev/null 2>&1"
        ))
        .status();
    Ok(())
}
