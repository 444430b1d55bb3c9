//! Commands routed into the caller's own container through the real orchestrator on the real
//! Docker engine: isolation under concurrency (MCP over streamable HTTP and `shell.exec`),
//! request fields that try to redirect, the static target container, the remembering shell
//! inside a container, streaming through the relay, host-addressed routing, and the
//! orchestrator going away and coming back.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};

type McpClient = RunningService<rmcp::RoleClient, ()>;

/// The official Rust MCP client over streamable HTTP, with the agent's token.
async fn mcp_client(url: &str, token: &str) -> McpClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().build().unwrap();
    let cfg = StreamableHttpClientTransportConfig::with_uri(url.to_string())
        .auth_header(token.to_string())
        .max_concurrent_requests(64);
    ().serve(StreamableHttpClientTransport::with_client(http, cfg))
        .await
        .unwrap()
}

async fn exec_tool(c: &McpClient, args: Value) -> (bool, Value) {
    let Value::Object(args) = args else {
        panic!("args")
    };
    let r = c
        .call_tool(CallToolRequestParams::new("exec_command").with_arguments(args))
        .await
        .unwrap();
    (
        r.is_error.unwrap_or(false),
        r.structured_content.unwrap_or(Value::Null),
    )
}

/// Two agents, each with its own space container; returns (token, hostname) per agent.
async fn two_agents(f: &Fleet) -> [(String, String); 2] {
    let mut out = Vec::new();
    for (agent, space) in [("a1", "s1"), ("a2", "s2")] {
        let t = f.agent(agent, space, SCOPES).await;
        f.create_space(&t, json!({})).await;
        let r =
            f.c.request_with_headers(
                "containers.exec",
                {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Authorization", format!("Bearer {t}").as_str());
                    h
                },
                json!({"command": "hostname"}).to_string().into(),
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        let host = v["stdout"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .trim()
            .to_string();
        assert!(!host.is_empty());
        out.push((t, host));
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    [a, b]
}

#[tokio::test]
async fn each_agent_sees_only_its_own_container_under_fifty_concurrent_calls() {
    let f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let agents = two_agents(&f).await;
    assert_ne!(agents[0].1, agents[1].1);
    // Each writes a file of its own first, through the shell.
    for (i, (t, _)) in agents.iter().enumerate() {
        f.sh_ok(t, &format!("echo owner-{i} > /tmp/mine")).await;
    }
    let url = shell.mcp_url().unwrap();
    let started = Instant::now();
    let runs = agents.iter().enumerate().map(|(i, (t, host))| {
        let url = url.clone();
        let f = &f;
        async move {
            let c = mcp_client(&url, t).await;
            let mcp =
                futures::future::join_all((0..50).map(|_| {
                    exec_tool(&c, json!({"command": "hostname; cat /tmp/mine; ls /tmp"}))
                }));
            let bus = futures::future::join_all(
                (0..50).map(|_| f.sh(t, json!({"command": "hostname; cat /tmp/mine"}))),
            );
            let (mcp, bus) = futures::join!(mcp, bus);
            let want = format!("{host}\nowner-{i}\n");
            for (is_error, r) in mcp {
                assert!(!is_error, "{r}");
                assert_eq!(r["exit_code"], 0, "{r}");
                assert_eq!(r["stdout"], format!("{want}mine\n"), "agent {i} over MCP");
            }
            for r in bus {
                let r = r.unwrap();
                assert_eq!(r["stdout"], want.as_str(), "agent {i} over the bus");
            }
            c.cancel().await.unwrap();
        }
    });
    futures::future::join_all(runs).await;
    eprintln!("200 concurrent execs in {:?}", started.elapsed());
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_fields_cannot_redirect_a_command() {
    let f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let [(t1, h1), (t2, h2)] = two_agents(&f).await;
    let other =
        f.c.request_with_headers(
            "containers.inspect",
            {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Authorization", format!("Bearer {t2}").as_str());
                h
            },
            "{}".into(),
        )
        .await
        .unwrap();
    let other: Value = serde_json::from_slice(&other.payload).unwrap();
    let other_id = other["container_id"].as_str().unwrap().to_string();
    // JSON naming another container or space is refused.
    for body in [
        json!({"command": "touch /tmp/intruder", "container": other_id}),
        json!({"command": "touch /tmp/intruder", "space": "s2"}),
    ] {
        let Problem {
            status: s,
            detail: d,
            ..
        } = f.sh(&t1, body).await.unwrap_err();
        assert_eq!(s, 400, "{d}");
    }
    // Protobuf with extra fields (as if a newer client sent `container`/`space`): they are
    // unknown to the shell and ignored; the command runs in the caller's own container.
    let mut pb = prost::Message::encode_to_vec(&tether_proto::ShellExecRequest {
        command: "hostname".into(),
        ..Default::default()
    });
    // (Field numbers below 16: a one-byte tag.)
    for (field, value) in [(14u8, other_id.as_str()), (15, "s2")] {
        pb.push(field << 3 | 2);
        pb.push(u8::try_from(value.len()).unwrap());
        pb.extend_from_slice(value.as_bytes());
    }
    let mut h = async_nats::HeaderMap::new();
    h.insert("Authorization", format!("Bearer {t1}").as_str());
    h.insert("Content-Type", "application/protobuf");
    let m =
        f.c.request_with_headers("shell.exec", h, pb.into())
            .await
            .unwrap();
    if let Some(p) = tether_bus::Problem::from_reply(m.headers.as_ref(), &m.payload) {
        panic!("{p}");
    }
    let r: tether_proto::ExecResult = prost::Message::decode(m.payload.as_ref()).unwrap();
    assert_eq!(r.stdout.trim(), h1);
    // MCP: a tool error with the reason.
    let c = mcp_client(&shell.mcp_url().unwrap(), &t1).await;
    let (is_error, v) = exec_tool(
        &c,
        json!({"command": "touch /tmp/intruder", "container": other_id}),
    )
    .await;
    assert!(is_error, "{v}");
    assert_eq!(v["status"], 400);
    c.cancel().await.unwrap();
    // Nothing reached the other container.
    assert_eq!(f.sh_ok(&t2, "ls /tmp; hostname").await, format!("{h2}\n"));
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn target_container_serves_tokens_without_a_bound_space() {
    let f = fleet(true).await;
    let [(t1, h1), _] = two_agents(&f).await;
    // Agent a3's space s3 has no space container, only a tool container of its own.
    let t3 = f.agent("a3", "s3", SCOPES).await;
    let name = unique("target");
    f.create_space(
        &t3,
        json!({"kind": "tool", "name": name, "command": ["sleep", "3600"]}),
    )
    .await;
    let shell = f
        .shell(tether_shell_server::ShellConfig {
            target_container: name.clone(),
            ..shell_config()
        })
        .await;
    let target_host = f.sh_ok(&t3, "hostname").await;
    assert!(!target_host.trim().is_empty());
    assert_ne!(target_host.trim(), h1);
    // The operator (no space) lands there too.
    assert_eq!(f.sh_ok(&f.op, "hostname").await, target_host);
    // A token whose space is bound still goes to its own container.
    assert_eq!(f.sh_ok(&t1, "hostname").await.trim(), h1);
    // The orchestrator still checks the caller: a space-less agent of another space may
    // not use s3's container (403 from the orchestrator, passed through).
    let t4 = f.agent("a4", "s4", SCOPES).await;
    let Problem {
        status: s,
        detail: d,
        ..
    } = f.sh(&t4, json!({"command": "hostname"})).await.unwrap_err();
    assert_eq!(s, 403, "{d}");
    shell.shutdown().await.unwrap();

    // Plain `TARGET_CONTAINER` in the environment of the binary (stdio MCP, Python client).
    let server = stdio_server(
        &f.node_bus(tether_testkit::NodeKind::Shell),
        Some(&t3),
        &[("TARGET_CONTAINER", &name)],
    );
    let v = python_mcp(json!({
        "transport": "stdio",
        "server": server,
        "calls": [exec_call(json!({"command": "hostname"}))],
    }))
    .await;
    assert_eq!(
        v["results"][0]["structured"]["stdout"],
        target_host.as_str(),
        "{v}"
    );
}

#[tokio::test]
async fn the_shell_remembers_inside_the_container() {
    let f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let [(t, _), _] = two_agents(&f).await;
    f.sh_ok(&t, "mkdir -p /tmp/x").await;
    f.sh_ok(&t, "cd /tmp/x").await;
    assert_eq!(f.sh_ok(&t, "pwd").await, "/tmp/x\n");
    f.sh_ok(&t, "cd /tmp/x && echo x >> f").await;
    assert_eq!(
        f.sh_ok(&t, "cat f; pwd").await,
        "x\n/tmp/x\n",
        "ran exactly once"
    );
    f.sh_ok(&t, "export NAME=\"a 'quoted' value\"").await;
    assert_eq!(f.sh_ok(&t, "echo \"$NAME\"").await, "a 'quoted' value\n");
    let r = f
        .sh(
            &t,
            json!({"command": "pwd; echo \"${NAME-none}\"", "reset": true}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "/\nnone\n");

    // Timeout, cap and streaming go through the orchestrator (and the relay).
    let started = Instant::now();
    let r = f
        .sh(
            &t,
            json!({"command": "echo begun; sleep 60", "timeout_seconds": 1}),
        )
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        (
            r["timed_out"].as_bool(),
            r["exit_code"].as_i64(),
            r["stdout"].as_str()
        ),
        (Some(true), Some(137), Some("begun\n"))
    );
    let r = f
        .sh(
            &t,
            json!({"command": "head -c 100000 /dev/zero | tr '\\0' a", "max_output_bytes": 500}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r["truncated"].as_bool(), r["stdout"].as_str().map(str::len)),
        (Some(true), Some(500))
    );
    assert!(num(&r["output_bytes"]) >= 100_000);
    let inbox = f.c.new_inbox();
    let mut sub = f.c.subscribe(inbox.clone()).await.unwrap();
    let r = f
        .sh(&t, json!({"command": "echo one; sleep 0.3; echo two >&2; echo three", "stream": true, "stream_subject": inbox}))
        .await
        .unwrap();
    assert_eq!(r["stdout"], "one\nthree\n");
    let (mut out, mut err, mut seq) = (String::new(), String::new(), 0u64);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("chunk within 5 s")
            .unwrap();
        let h = m.headers.clone().unwrap();
        let s: u64 = h
            .get("Tether-Stream-Seq")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert_eq!(s, seq + 1);
        seq = s;
        let text = String::from_utf8(m.payload.to_vec()).unwrap();
        assert!(!text.contains("__tether"), "{text:?}");
        match h.get("Tether-Stream").unwrap().as_str() {
            "stdout" => out.push_str(&text),
            "stderr" => err.push_str(&text),
            _ => {
                assert_eq!(h.get("Tether-Exit-Code").unwrap().as_str(), "0");
                break;
            }
        }
    }
    assert_eq!((out.as_str(), err.as_str()), ("one\nthree\n", "two\n"));
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn commands_go_to_the_host_that_holds_the_space() {
    let f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let [(t, _), _] = two_agents(&f).await;
    let orch = f.orch.as_ref().unwrap();
    let addressed = format!("hosts-{}-containers-exec", f.host_id);
    let (before_host, before_shared) = (
        orch.requests_served(&addressed),
        orch.requests_served("containers-exec"),
    );
    for _ in 0..3 {
        f.sh_ok(&t, "true").await;
    }
    assert_eq!(orch.requests_served(&addressed), before_host + 3);
    assert_eq!(orch.requests_served("containers-exec"), before_shared);
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn orchestrator_down_is_a_clear_503_and_the_shell_recovers() {
    let mut f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let [(t, host), _] = two_agents(&f).await;
    assert_eq!(f.sh_ok(&t, "hostname").await.trim(), host);
    f.orch.take().unwrap().shutdown().await.unwrap();
    let started = Instant::now();
    let Problem {
        status: s,
        detail: d,
        ..
    } = f
        .sh(&t, json!({"command": "hostname", "timeout_seconds": 5}))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s, 503, "{d}");
    assert!(d.contains("no container-orchestrator answers"), "{d}");
    // MCP says the same, as a tool error.
    let c = mcp_client(&shell.mcp_url().unwrap(), &t).await;
    let (is_error, v) = exec_tool(&c, json!({"command": "hostname"})).await;
    assert!(is_error);
    assert_eq!(v["status"], 503);
    // The orchestrator comes back; the shell-server needs nothing done.
    f.orch = Some(
        start_orchestrator(
            &f.node_bus(tether_testkit::NodeKind::Orchestrator),
            &f.host_id,
        )
        .await,
    );
    let out = eventually(Duration::from_secs(30), "exec works again", || {
        let f = &f;
        let t = t.clone();
        async move { f.sh(&t, json!({"command": "hostname"})).await.ok() }
    })
    .await;
    assert_eq!(out["stdout"].as_str().unwrap().trim(), host);
    let (is_error, v) = exec_tool(&c, json!({"command": "hostname"})).await;
    assert!(!is_error, "{v}");
    c.cancel().await.unwrap();
    shell.shutdown().await.unwrap();
}
