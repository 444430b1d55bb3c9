//! A node process drains on SIGTERM: requests in flight complete, then it exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tether_testkit::NatsServer;

#[tokio::test]
async fn sigterm_completes_in_flight_requests_and_exits_zero() {
    let nats = NatsServer::start().await.expect("nats");
    let c = nats.client().await.expect("client");
    let mut events = c.subscribe("events.nodes.drain-node").await.expect("sub");
    c.flush().await.expect("flush");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-test-node"))
        .env("TETHER_NATS_URL", nats.url())
        .env("TETHER_NODE_NAME", "drain-node")
        .env("TETHER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn test node");
    // Wait for `active`.
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("node comes up")
            .expect("event");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        if v["data"]["state"] == "active" {
            break;
        }
    }
    // Ten slow requests in flight. A plain subscription on the same subject sees each request
    // when the server routes it, i.e. when it is also on its way to the node.
    let mut routed = c.subscribe("test.echo").await.expect("sub");
    c.flush().await.expect("flush");
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.request(
                    "test.echo",
                    format!(r#"{{"message":"m{i}","delay_ms":1500}}"#).into(),
                )
                .await
            })
        })
        .collect();
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(20), routed.next())
            .await
            .expect("every request routed to the node")
            .expect("subscription open");
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    for (i, call) in calls.into_iter().enumerate() {
        let m = call
            .await
            .expect("join")
            .expect("in-flight request answered");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["message"], format!("m{i}"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    // It said so on the bus.
    let mut states = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        states.push(v["data"]["state"].as_str().unwrap_or_default().to_string());
        if states.last().is_some_and(|s| s == "stopped") {
            break;
        }
    }
    assert_eq!(states, ["draining", "stopped"]);
}
