//! The node runtime against a real nats-server: micro protocol, errors, auth hook, replicas,
//! faults, drain. Acceptance tests of the bus issue.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use tether_auth::Scope;
use tether_bus::{Endpoint, Node};
use tether_proto::{EchoReply, EchoRequest};
use tether_testkit::NatsServer;

#[tokio::test]
async fn echo_round_trip_json_and_protobuf() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");

    let m = request(&c, "t.echo", json_headers(None), r#"{"message":"hi"}"#).await;
    assert!(is_ok_reply(&m));
    let r: EchoReply = serde_json::from_slice(&m.payload).expect("json reply");
    assert_eq!(r.message, "hi");
    assert_eq!(r.node, "echo-node");

    // Protobuf in, protobuf out.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/protobuf");
    let body = prost::Message::encode_to_vec(&EchoRequest {
        message: "pb".into(),
        delay_ms: 0,
    });
    let m = request(&c, "t.echo", h, body).await;
    assert_eq!(
        m.headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str()),
        Some("application/protobuf")
    );
    let r: EchoReply = prost::Message::decode(m.payload.as_ref()).expect("protobuf reply");
    assert_eq!(r.message, "pb");
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_requests_get_problems_and_node_keeps_serving() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let cfg = tether_bus::BusConfig {
        max_payload_bytes: 4096,
        ..config(&nats.url())
    };
    let node = echo_node(cfg, &keys).await;
    let c = nats.client().await.expect("client");

    // Malformed JSON → 400.
    let b = assert_problem(
        &request(&c, "t.echo", json_headers(None), "{not json").await,
        400,
    );
    assert!(
        b["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("malformed JSON"),
        "{b}"
    );
    // Unknown field → 400 naming it.
    let b = assert_problem(
        &request(&c, "t.echo", json_headers(None), r#"{"mesage":"x"}"#).await,
        400,
    );
    assert!(
        b["detail"].as_str().unwrap_or_default().contains("mesage"),
        "{b}"
    );
    // Oversize → 413.
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(8000));
    assert_problem(&request(&c, "t.echo", json_headers(None), big).await, 413);
    // Missing / malformed Authorization on a protected endpoint → 401.
    assert_problem(
        &request(&c, "t.whoami", json_headers(None), "{}").await,
        401,
    );
    let mut h = json_headers(None);
    h.insert("Authorization", "Basic abc");
    assert_problem(&request(&c, "t.whoami", h, "{}").await, 401);
    assert_problem(
        &request(&c, "t.whoami", json_headers(Some("garbage")), "{}").await,
        401,
    );
    // Valid token without the scope → 403.
    let t = keys.token("a1", "s1", &[Scope::ModelCall]);
    assert_problem(
        &request(&c, "t.whoami", json_headers(Some(&t)), "{}").await,
        403,
    );
    // A panicking handler → 500.
    let b = assert_problem(
        &request(&c, "t.echo", json_headers(None), r#"{"message":"panic"}"#).await,
        500,
    );
    assert!(
        !b["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("asked to panic"),
        "internals do not leak: {b}"
    );

    // Still serving, and the verified caller reaches the handler.
    let t = keys.token("agent-7", "space-7", &[Scope::ShellExec]);
    let m = request(
        &c,
        "t.whoami",
        json_headers(Some(&t)),
        r#"{"message":"after"}"#,
    )
    .await;
    assert!(is_ok_reply(&m), "{:?}", String::from_utf8_lossy(&m.payload));
    let r: EchoReply = serde_json::from_slice(&m.payload).expect("reply");
    assert_eq!(
        (r.agent_id.as_str(), r.space.as_str()),
        ("agent-7", "space-7")
    );
    assert_eq!(r.scopes, vec!["shell:exec".to_string()]);
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn micro_protocol_ping_info_stats() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");

    let ping: serde_json::Value = serde_json::from_slice(
        &request(&c, "$SRV.PING.echo-node", Default::default(), "")
            .await
            .payload,
    )
    .expect("ping");
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "echo-node");
    let id = ping["id"].as_str().expect("id").to_string();

    let info: serde_json::Value = serde_json::from_slice(
        &request(
            &c,
            &format!("$SRV.INFO.echo-node.{id}"),
            Default::default(),
            "",
        )
        .await
        .payload,
    )
    .expect("info");
    let subjects: HashSet<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    assert_eq!(subjects, HashSet::from(["t.echo", "t.whoami"]));
    assert_eq!(info["endpoints"][0]["queue_group"], "tether");

    let count = |v: &serde_json::Value| -> (u64, u64) {
        let e = v["endpoints"]
            .as_array()
            .expect("eps")
            .iter()
            .find(|e| e["subject"] == "t.echo")
            .expect("t.echo")
            .clone();
        (
            e["num_requests"].as_u64().unwrap_or(0),
            e["num_errors"].as_u64().unwrap_or(0),
        )
    };
    let stats = |c: async_nats::Client| async move {
        let m = request(&c, "$SRV.STATS.echo-node", Default::default(), "").await;
        serde_json::from_slice::<serde_json::Value>(&m.payload).expect("stats")
    };
    let before = count(&stats(c.clone()).await);
    request(&c, "t.echo", json_headers(None), "{}").await;
    request(&c, "t.echo", json_headers(None), "{bad").await;
    let after = count(&stats(c.clone()).await);
    assert_eq!(after.0, before.0 + 2, "requests counted");
    assert_eq!(after.1, before.1 + 1, "errors counted");
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn two_replicas_share_requests_without_duplicates() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let a = echo_node(config(&nats.url()), &keys).await;
    let b = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");
    // Count every reply message arriving, not just the first per request.
    let n = 200;
    let mut inbox = c.subscribe("replies.>").await.expect("sub");
    for i in 0..n {
        c.publish_with_reply(
            "t.echo",
            format!("replies.{i}"),
            format!(r#"{{"message":"{i}"}}"#).into(),
        )
        .await
        .expect("publish");
    }
    let mut seen = HashSet::new();
    let mut by_instance = std::collections::HashMap::<String, usize>::new();
    let mut total = 0;
    while seen.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
            .await
            .expect("replies arrive")
            .expect("msg");
        total += 1;
        seen.insert(m.subject.to_string());
        let r: EchoReply = serde_json::from_slice(&m.payload).expect("reply");
        *by_instance.entry(r.instance_id).or_default() += 1;
    }
    // Nothing more arrives: no request was answered twice.
    let extra = tokio::time::timeout(Duration::from_millis(500), inbox.next()).await;
    assert!(extra.is_err(), "a request was answered twice");
    assert_eq!(total, n);
    assert_eq!(
        by_instance.len(),
        2,
        "both replicas served: {by_instance:?}"
    );
    assert_eq!(
        a.requests_served("t-echo") + b.requests_served("t-echo"),
        n as u64
    );
    a.shutdown().await.expect("a");
    b.shutdown().await.expect("b");
}

#[tokio::test]
async fn requests_are_served_concurrently() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");
    // 20 requests that each take 500 ms: served one at a time they would need 10 s.
    let started = std::time::Instant::now();
    let calls = (0..20).map(|_| {
        let c = c.clone();
        async move { request(&c, "t.echo", json_headers(None), r#"{"delay_ms":500}"#).await }
    });
    let replies = futures::future::join_all(calls).await;
    assert!(replies.iter().all(is_ok_reply));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "endpoint served requests one at a time"
    );
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn reconnects_after_server_restart() {
    let mut nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");
    assert!(is_ok_reply(
        &request(&c, "t.echo", json_headers(None), "{}").await
    ));

    nats.kill().await;
    nats.restart().await.expect("restart");
    // The node reconnects by itself and serves again within 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            c.request_with_headers("t.echo", json_headers(None), "{}".into()),
        )
        .await;
        if let Ok(Ok(m)) = r
            && is_ok_reply(&m)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node did not serve again within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn drain_finishes_in_flight_requests() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = echo_node(config(&nats.url()), &keys).await;
    let c = nats.client().await.expect("client");
    let tag = tether_testkit::unique("drain");
    let messages: Vec<String> = (0..5).map(|i| format!("{tag}-{i}")).collect();
    let inflight: Vec<_> = messages
        .iter()
        .map(|m| {
            let c = c.clone();
            let body = format!(r#"{{"message":"{m}","delay_ms":700}}"#);
            tokio::spawn(async move { request(&c, "t.echo", json_headers(None), body).await })
        })
        .collect();
    // Once every request is being served, drain.
    tether_testkit::eventually(Duration::from_secs(10), "requests in flight", || async {
        messages.iter().all(|m| echo_started(m)).then_some(())
    })
    .await;
    node.shutdown().await.expect("shutdown");
    for h in inflight {
        let m = h.await.expect("join");
        assert!(is_ok_reply(&m), "in-flight request completed during drain");
    }
    // After drain, nobody serves the subject any more.
    let r = c.request("t.echo", "{}".into()).await;
    assert!(r.is_err(), "a drained node must not take new requests");
}

#[tokio::test]
async fn lifecycle_events_are_published() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let c = nats.client().await.expect("client");
    let mut events = c.subscribe("events.nodes.echo-node").await.expect("sub");
    c.flush().await.expect("flush");
    let node = echo_node(config(&nats.url()), &keys).await;
    node.shutdown().await.expect("shutdown");
    let mut states = Vec::new();
    while states.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("event")
            .expect("msg");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()));
        states.push(v["data"]["state"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(states, ["configure", "active", "draining", "stopped"]);
}

#[tokio::test]
async fn traceparent_is_continued_across_a_hop() {
    // Node B calls node A with outgoing_headers(); A sees B's caller's trace id.
    let nats = NatsServer::start().await.expect("nats");
    let seen = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen2 = seen.clone();
    let a = Node::new("hop-a", "1.0.0")
        .endpoint(Endpoint::public(
            "hop.a",
            move |req: tether_bus::PublicRequest<EchoRequest>| {
                let seen = seen2.clone();
                async move {
                    *seen.lock().expect("lock") = req
                        .headers
                        .get("traceparent")
                        .map(|v| v.as_str().to_string());
                    Ok(EchoReply::default())
                }
            },
        ))
        .start(config(&nats.url()))
        .await
        .expect("a");
    let b = Node::new("hop-b", "1.0.0")
        .endpoint(Endpoint::public(
            "hop.b",
            |req: tether_bus::PublicRequest<EchoRequest>| async move {
                let h = req.outgoing_headers();
                req.ctx
                    .client
                    .request_with_headers("hop.a", h, "{}".into())
                    .await
                    .map_err(|e| tether_bus::Problem::unavailable(e.to_string()))?;
                Ok(EchoReply::default())
            },
        ))
        .start(config(&nats.url()))
        .await
        .expect("b");
    let c = nats.client().await.expect("client");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut h = json_headers(None);
    h.insert("traceparent", tp);
    assert!(is_ok_reply(&request(&c, "hop.b", h, "{}").await));
    let got = seen
        .lock()
        .expect("lock")
        .clone()
        .expect("A received a traceparent");
    assert!(
        got.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "trace id carried: {got}"
    );
    a.shutdown().await.expect("a");
    b.shutdown().await.expect("b");
}

#[tokio::test]
async fn bounded_concurrency_is_respected() {
    let nats = NatsServer::start().await.expect("nats");
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n2, p2) = (now.clone(), peak.clone());
    let node = Node::new("bounded", "1.0.0")
        .endpoint(
            Endpoint::public(
                "b.work",
                move |_req: tether_bus::PublicRequest<EchoRequest>| {
                    let (now, peak) = (n2.clone(), p2.clone());
                    async move {
                        let cur = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(cur, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(EchoReply::default())
                    }
                },
            )
            .max_concurrency(3),
        )
        .start(config(&nats.url()))
        .await
        .expect("node");
    let c = nats.client().await.expect("client");
    let calls = (0..12).map(|_| {
        let c = c.clone();
        async move { request(&c, "b.work", json_headers(None), "{}").await }
    });
    futures::future::join_all(calls).await;
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_reply_larger_than_the_server_carries_is_a_problem_not_silence() {
    let nats = NatsServer::start_with_config("max_payload: 262144")
        .await
        .expect("nats");
    let keys = Keys::new();
    // Replies `delay_ms` KiB of text.
    let big = |req: tether_bus::PublicRequest<EchoRequest>| async move {
        Ok::<_, tether_bus::Problem>(EchoReply {
            message: "x".repeat(req.body.delay_ms as usize * 1024),
            ..Default::default()
        })
    };
    let node = Node::new("big-node", "1.0.0")
        .verifier(keys.verifier())
        .endpoint(Endpoint::public("t.big", big))
        .start(config(&nats.url()))
        .await
        .expect("node starts");
    let c = nats.client().await.expect("client");
    let m = request(&c, "t.big", json_headers(None), r#"{"delay_ms": 100}"#).await;
    assert!(is_ok_reply(&m));
    assert!(m.payload.len() > 100 * 1024);
    let b = assert_problem(
        &request(&c, "t.big", json_headers(None), r#"{"delay_ms": 300}"#).await,
        500,
    );
    assert!(
        b["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than the bus carries"),
        "{b}"
    );
    node.shutdown().await.expect("shutdown");
}
