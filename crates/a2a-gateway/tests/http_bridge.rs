//! The HTTP bridge's translation, against a stand-in for the gateway's bus endpoints on a
//! real nats-server (`standin`). End-to-end with the real gateway is tested elsewhere.

mod standin;

use reqwest::StatusCode;
use serde_json::{Value, json};
use standin::*;
use tether_a2a_gateway::A2aConfig;
use tether_a2a_gateway::http;
use tether_bus::BusConfig;
use tether_testkit::NatsServer;

#[tokio::test]
async fn unary_methods_are_forwarded_with_headers_and_params() {
    let mut rig = Rig::start().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases = [
        (
            "SendMessage",
            "send",
            json!({"message": {"messageId": "m1", "role": "ROLE_USER",
            "parts": [{"text": "hi"}]}}),
            json!({"task": task("t-1", "TASK_STATE_COMPLETED")}),
        ),
        (
            "GetTask",
            "get",
            json!({"id": "t-9", "historyLength": 2}),
            task("t-9", "TASK_STATE_WORKING"),
        ),
        (
            "ListTasks",
            "list",
            json!({"pageSize": 5}),
            json!({"tasks": [task("t-1", "TASK_STATE_COMPLETED")],
            "nextPageToken": "", "pageSize": 50, "totalSize": 1}),
        ),
        (
            "CancelTask",
            "cancel",
            json!({"id": "t-2"}),
            task("t-2", "TASK_STATE_CANCELED"),
        ),
    ];
    for (method, op, params, want) in cases {
        let (status, v) = rig
            .rpc(method, params.clone(), &[AUTH, V1, ("traceparent", tp)])
            .await;
        assert_eq!(status, StatusCode::OK, "{method}: {v}");
        assert_eq!(
            v,
            json!({"jsonrpc": "2.0", "id": "req-1", "result": want}),
            "{method}"
        );
        let seen = rig.next_seen().await;
        assert_eq!(seen.subject, format!("a2a.{AGENT}.{op}"));
        assert_eq!(seen.body, params, "{method}: params are the bus body");
        assert_eq!(seen.header("Authorization"), Some(AUTH.1));
        assert_eq!(seen.header("A2A-Version"), Some("1.0"));
        assert_eq!(seen.header("traceparent"), Some(tp));
        assert_eq!(seen.header("Content-Type"), Some("application/json"));
        assert_eq!(seen.header("Tether-Timeout-Ms"), None);
    }

    // A missing version or token is not invented: the gateway decides (missing = 0.3).
    let (status, _) = rig.rpc("GetTask", json!({"id": "t-3"}), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = rig.next_seen().await;
    assert_eq!(
        (seen.header("A2A-Version"), seen.header("Authorization")),
        (None, None)
    );

    // A blocking send's deadline travels as Tether-Timeout-Ms (capped at a2a_max_wait_ms).
    let send = json!({"message": {"messageId": "m2", "role": "ROLE_USER", "parts": []}});
    rig.rpc(
        "SendMessage",
        send.clone(),
        &[AUTH, V1, ("Tether-Timeout-Ms", "1500")],
    )
    .await;
    assert_eq!(
        rig.next_seen().await.header("Tether-Timeout-Ms"),
        Some("1500")
    );
    rig.rpc(
        "SendMessage",
        send.clone(),
        &[("Tether-Timeout-Ms", "999999999")],
    )
    .await;
    assert_eq!(
        rig.next_seen().await.header("Tether-Timeout-Ms"),
        Some("300000")
    );
    let (_, v) = rig
        .rpc("SendMessage", send, &[("Tether-Timeout-Ms", "soon")])
        .await;
    assert_eq!(error_code(&v), -32602);
    rig.shutdown().await;
}

#[tokio::test]
async fn bus_problems_become_json_rpc_errors() {
    let mut rig = Rig::start().await;
    let (status, v) = rig
        .rpc("GetTask", json!({"id": "missing"}), &[AUTH, V1])
        .await;
    assert_eq!(status, StatusCode::OK, "JSON-RPC errors are HTTP 200: {v}");
    assert_eq!(v["id"], "req-1");
    assert_eq!(error_code(&v), -32001);
    assert_eq!(v["error"]["message"], "no task \"missing\"");
    let info = &v["error"]["data"][0];
    assert_eq!(info["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
    assert_eq!(info["reason"], "TASK_NOT_FOUND");
    assert_eq!(info["domain"], "a2a-protocol.org");
    let doc = &v["error"]["data"][1]["value"];
    assert_eq!(
        (doc["status"].as_u64(), doc["a2aError"].as_str()),
        (Some(404), Some("TaskNotFound"))
    );
    rig.next_seen().await;

    let (_, v) = rig
        .rpc("CancelTask", json!({"id": "done"}), &[AUTH, V1])
        .await;
    assert_eq!(error_code(&v), -32002);
    rig.next_seen().await;

    // The stream's refusal is a plain JSON-RPC error, not an event stream.
    let resp = rig
        .http
        .post(rig.url())
        .header("Accept", "text/event-stream")
        .body(
            json!({"jsonrpc": "2.0", "id": 4, "method": "SubscribeToTask",
            "params": {"id": "terminal"}})
            .to_string(),
        )
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/json")
    );
    let v: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!((error_code(&v), v["id"].as_i64()), (-32004, Some(4)));
    rig.next_seen().await;
    rig.shutdown().await;
}

#[tokio::test]
async fn streams_relay_chunks_in_order_then_end() {
    let mut rig = Rig::start().await;
    let params =
        json!({"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}});
    let events = stream(&rig, "SendStreamingMessage", params.clone()).await;
    let seen = rig.next_seen().await;
    assert_eq!(seen.subject, "a2a.echo.stream");
    assert_eq!(seen.body, params);
    assert_eq!(seen.header("Authorization"), Some(AUTH.1));
    let to = seen
        .header("Tether-Stream-Subject")
        .expect("stream subject");
    assert!(to.starts_with("_INBOX"), "{to}");

    let kinds: Vec<&str> = events
        .iter()
        .map(|(name, v)| {
            assert_eq!(name, "message");
            assert_eq!(
                (v["jsonrpc"].as_str(), v["id"].as_i64()),
                (Some("2.0"), Some(11))
            );
            let r = v["result"].as_object().expect("result object");
            assert_eq!(r.len(), 1, "one StreamResponse member");
            r.keys().next().map(String::as_str).unwrap_or_default()
        })
        .collect();
    assert_eq!(
        kinds,
        ["task", "statusUpdate", "artifactUpdate", "statusUpdate"]
    );
    assert_eq!(
        events[0].1["result"]["task"]["status"]["state"],
        "TASK_STATE_SUBMITTED"
    );
    assert_eq!(
        events[2].1["result"]["artifactUpdate"]["artifact"]["parts"][0]["text"],
        "héllo"
    );
    assert_eq!(
        events[3].1["result"]["statusUpdate"]["status"]["state"],
        "TASK_STATE_COMPLETED"
    );

    let events = stream(&rig, "SubscribeToTask", json!({"id": "t-5"})).await;
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].1["result"]["task"]["id"], "t-5");
    let seen = rig.next_seen().await;
    assert_eq!(
        (seen.subject.as_str(), &seen.body),
        ("a2a.echo.subscribe", &json!({"id": "t-5"}))
    );
    assert!(seen.header("Tether-Stream-Subject").is_some());
    rig.shutdown().await;
}

#[tokio::test]
async fn a_gap_or_an_error_chunk_ends_the_stream_with_an_error_event() {
    let mut rig = Rig::start().await;
    let events = stream(&rig, "SubscribeToTask", json!({"id": "gap"})).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "message");
    assert_eq!(events[1].0, "error");
    assert_eq!(error_code(&events[1].1), -32603);
    assert_eq!(events[1].1["id"], 11);
    rig.next_seen().await;

    let events = stream(&rig, "SubscribeToTask", json!({"id": "fail"})).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].0, "error");
    assert_eq!(error_code(&events[1].1), -32006);
    assert_eq!(events[1].1["error"]["message"], "the worker said nonsense");
    rig.shutdown().await;
}

#[tokio::test]
async fn malformed_unknown_and_unsupported_calls_never_reach_the_bus() {
    let mut rig = Rig::start().await;
    let url = rig.url();
    let cases: [(&str, i64, Value); 6] = [
        ("{not json", -32700, Value::Null),
        ("[1, 2]", -32600, Value::Null),
        (r#"{"jsonrpc":"2.0","id":3}"#, -32600, json!(3)),
        (
            r#"{"jsonrpc":"2.0","id":3,"method":"message/send","params":{}}"#,
            -32601,
            json!(3),
        ),
        (
            r#"{"jsonrpc":"2.0","id":"x","method":"GetExtendedAgentCard"}"#,
            -32007,
            json!("x"),
        ),
        (
            r#"{"jsonrpc":"2.0","id":5,"method":"CreateTaskPushNotificationConfig","params":{}}"#,
            -32003,
            json!(5),
        ),
    ];
    for (body, code, id) in cases {
        let (status, v) = rig.post_raw(&url, body, &[AUTH, V1]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((error_code(&v), &v["id"]), (code, &id), "{body}: {v}");
    }
    let (_, v) = rig
        .post_raw(
            &url,
            r#"{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{}}"#,
            &[("Content-Type", "application/protobuf")],
        )
        .await;
    assert_eq!(error_code(&v), -32005);

    // A bad agent id: 400 before anything is forwarded.
    let bad = format!("http://{}/a2a/no.dots", rig.server.addr);
    let (status, v) = rig
        .post_raw(&bad, r#"{"jsonrpc":"2.0","id":1,"method":"GetTask"}"#, &[])
        .await;
    assert_eq!((status, error_code(&v)), (StatusCode::BAD_REQUEST, -32602));
    let bad = format!("http://{}/a2a/%2A", rig.server.addr);
    let (status, _) = rig
        .post_raw(&bad, r#"{"jsonrpc":"2.0","id":1,"method":"GetTask"}"#, &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // None of these reached the stand-in: the next thing it sees is this call.
    rig.rpc("GetTask", json!({"id": "after"}), &[]).await;
    assert_eq!(rig.next_seen().await.body, json!({"id": "after"}));
    rig.shutdown().await;
}

#[tokio::test]
async fn an_oversize_body_is_413_and_a_foreign_host_403() {
    let cfg = A2aConfig {
        a2a_max_message_bytes: 2048,
        ..Default::default()
    };
    let mut rig = Rig::start_with(cfg, None).await;
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
        "params": {"message": {"messageId": "m", "role": "ROLE_USER",
        "parts": [{"text": "x".repeat(4096)}]}}});
    let (status, v) = rig.post_raw(&rig.url(), big.to_string(), &[AUTH, V1]).await;
    assert_eq!(
        (status, error_code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, -32600)
    );

    // Also when the client streams it without a length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 1500]), Ok(vec![b' '; 1500])];
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, _) = rig.post_raw(&rig.url(), body, &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let get = json!({"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "t"}});
    for host in ["evil.example", "evil.example:8791", "127.0.0.2"] {
        let resp = rig
            .http
            .post(rig.url())
            .header("Host", host)
            .body(get.to_string())
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{host}");
        let resp = rig
            .http
            .get(format!("{}/.well-known/agent-card.json", rig.url()))
            .header("Host", host)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{host}");
    }
    // `localhost` with any port is fine.
    let resp = rig
        .http
        .post(rig.url())
        .header("Host", "localhost:1234")
        .body(get.to_string())
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    // Only that last call reached the stand-in.
    assert_eq!(rig.next_seen().await.body, json!({"id": "t"}));
    rig.shutdown().await;
}

#[tokio::test]
async fn allowed_hosts_are_configurable() {
    let cfg = A2aConfig {
        a2a_allowed_hosts: vec!["agents.example".into()],
        ..Default::default()
    };
    let rig = Rig::start_with(cfg, None).await;
    let card = format!("{}/.well-known/agent-card.json", rig.url());
    for (host, want) in [
        ("agents.example:443", StatusCode::OK),
        ("localhost", StatusCode::FORBIDDEN),
    ] {
        let resp = rig
            .http
            .get(&card)
            .header("Host", host)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status(), want, "{host}");
    }
    rig.shutdown().await;
    let cfg = A2aConfig {
        a2a_allowed_hosts: vec!["*".into()],
        ..Default::default()
    };
    let rig = Rig::start_with(cfg, None).await;
    let card = format!("{}/.well-known/agent-card.json", rig.url());
    let resp = rig
        .http
        .get(&card)
        .header("Host", "anything.example")
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    rig.shutdown().await;
}

#[tokio::test]
async fn the_agent_card_is_served_from_the_bus() {
    let mut rig = Rig::start_with(A2aConfig::default(), Some("dev")).await;
    let resp = rig
        .http
        .get(format!("{}/.well-known/agent-card.json", rig.url()))
        .header(AUTH.0, AUTH.1)
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/json")
    );
    let card: Value = resp.json_or_panic().await;
    assert_eq!(card["name"], "echo");
    let seen = rig.next_seen().await;
    assert_eq!(
        seen.subject, "dev.a2a.echo.card",
        "deployment prefix applied"
    );
    assert_eq!(seen.header("Authorization"), Some(AUTH.1));

    // Without a token, nothing is invented.
    let resp = rig
        .http
        .get(format!("{}/.well-known/agent-card.json", rig.url()))
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(rig.next_seen().await.header("Authorization"), None);

    let ghost = format!(
        "http://{}/a2a/ghost/.well-known/agent-card.json",
        rig.server.addr
    );
    let resp = rig.http.get(&ghost).send().await.expect("http");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let doc: Value = resp.json_or_panic().await;
    assert_eq!(doc["status"], 404);

    let bad = format!(
        "http://{}/a2a/a.b/.well-known/agent-card.json",
        rig.server.addr
    );
    let resp = rig.http.get(&bad).send().await.expect("http");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // A JSON-RPC call goes to the prefixed subject too.
    rig.rpc("GetTask", json!({"id": "p"}), &[]).await;
    assert_eq!(rig.next_seen().await.subject, "dev.a2a.echo.get");
    rig.shutdown().await;
}

#[tokio::test]
async fn no_listener_when_a2a_listen_is_empty() {
    let nats = NatsServer::start().await.expect("nats");
    let cfg = A2aConfig {
        a2a_listen: String::new(),
        ..Default::default()
    };
    let client = nats.client().await.expect("client");
    assert!(
        http::start(&cfg, &BusConfig::default(), client)
            .await
            .expect("ok")
            .is_none()
    );
}

/// The official client (`a2a-sdk`, as the acceptance tests use it) against the bridge.
const SDK_CLIENT: &str = r#"
import asyncio, sys, httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb

async def main(url):
    async with httpx.AsyncClient(headers={"Authorization": "Bearer tok.en.value"}, timeout=10) as h:
        client = await ClientFactory(ClientConfig(httpx_client=h)).create_from_url(url)
        msg = pb.Message(message_id="m1", role=pb.ROLE_USER, parts=[pb.Part(text="hi")])
        kinds = [ev.WhichOneof("payload") async for ev in client.send_message(pb.SendMessageRequest(message=msg))]
        print("stream", ",".join(kinds))
        t = await client.get_task(pb.GetTaskRequest(id="t-9"))
        print("get", t.id, pb.TaskState.Name(t.status.state))
        for call in ("get", "subscribe"):
            try:
                if call == "get":
                    await client.get_task(pb.GetTaskRequest(id="missing"))
                else:
                    async for _ in client.subscribe(pb.SubscribeToTaskRequest(id="gap")):
                        pass
                print(call, "no error")
            except Exception as e:
                print(call, type(e).__name__)

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test]
async fn the_official_python_client_works_through_the_bridge() {
    let has_sdk = std::process::Command::new("python3")
        .args(["-c", "import a2a.client, httpx"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        eprintln!("skipped: python3 with a2a-sdk is not installed");
        return;
    }
    let rig = Rig::start().await;
    let out = tokio::time::timeout(
        WAIT * 3,
        tokio::process::Command::new("python3")
            .args(["-c", SDK_CLIENT, &rig.url()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client finished in time")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "stream task,status_update,artifact_update,status_update",
            "get t-9 TASK_STATE_WORKING",
            "get TaskNotFoundError",
            "subscribe InternalError",
        ]
    );
    rig.shutdown().await;
}
