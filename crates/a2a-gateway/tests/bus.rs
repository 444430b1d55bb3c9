//! The gateway on the bus, end to end on a real nats-server with the auth callout: callers
//! and a worker on their own bus identities. The worker here is a few lines of async-nats
//! speaking the work contract (pull from `work_echo`, report to `a2a.echo.work.event`, ack),
//! so these tests pin the gateway's side alone; `tether-a2a-worker` and the Python worker have
//! their own end-to-end tests.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};

/// Serves `n` work items as the agent's worker: WORKING, an artifact echoing the text,
/// COMPLETED; then acks.
async fn serve_items(fleet: &A2aFleet, n: usize) {
    let c = fleet
        .f
        .connect_as(&fleet.worker)
        .await
        .expect("worker connects");
    let js = jetstream::new(c.clone());
    let consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("work_echo", "A2A_WORK")
        .await
        .expect("bind the work consumer");
    let mut msgs = consumer.messages().await.expect("pull");
    for _ in 0..n {
        let m = msgs.next().await.expect("an item").expect("item");
        let item: Value = serde_json::from_slice(&m.payload).expect("item json");
        let attempt = m.info().expect("info").delivered;
        let (space, task) = (item["space"].clone(), item["task"]["id"].clone());
        let text = item["message"]["parts"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for event in [
            json!({"statusUpdate": {"taskId": task, "contextId": "", "status": {"state": "TASK_STATE_WORKING"}}}),
            json!({"artifactUpdate": {"taskId": task, "contextId": "", "artifact": {"artifactId": "a1", "parts": [{"text": format!("echo: {text}")}]}}}),
            json!({"statusUpdate": {"taskId": task, "contextId": "", "status": {"state": "TASK_STATE_COMPLETED"}}}),
        ] {
            fleet
                .f
                .call(
                    "a2a.echo.work.event",
                    json!({"space": space, "taskId": task, "attempt": attempt, "event": event}),
                    Some(&fleet.worker),
                )
                .await
                .expect("event accepted");
        }
        m.double_ack().await.expect("ack");
    }
}

/// Sends `text` as alice with `returnImmediately`: the task as queued.
async fn queue(fleet: &A2aFleet, text: &str) -> Value {
    let mut body = message(text);
    body["configuration"] = json!({"returnImmediately": true});
    fleet
        .a2a(AGENT, "send", body, &fleet.alice)
        .await
        .expect("send")["task"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_send_get_list_and_spaces() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let card = fleet
        .a2a(AGENT, "card", json!({}), &fleet.alice)
        .await
        .expect("card");
    assert_eq!(card["name"], "echo");
    assert_eq!(card["capabilities"]["pushNotifications"], false);
    let agents = fleet.a2a("agents", "", json!({}), &fleet.alice).await;
    let agents = agents.expect("a2a.agents");
    assert_eq!(agents["agents"][0]["agentId"], AGENT, "{agents}");
    assert_eq!(agents["agents"][0]["live"], true, "{agents}");

    let worker = serve_items(&fleet, 1);
    let send = fleet.a2a(AGENT, "send", message("hello"), &fleet.alice);
    let (_, sent) = tokio::join!(worker, send);
    let task = sent.expect("send")["task"].clone();
    assert_eq!(state(&task), "TASK_STATE_COMPLETED", "{task}");
    assert_eq!(task["artifacts"][0]["parts"][0]["text"], "echo: hello");
    assert_eq!(task["metadata"]["tether"]["callerAgentId"], "alice");
    assert_eq!(task["metadata"]["tether"]["space"], "s1");
    let id = task["id"].as_str().expect("id").to_string();

    let got = fleet
        .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
        .await
        .expect("get");
    assert_eq!(got, task);
    let listed = fleet
        .a2a(AGENT, "list", json!({}), &fleet.alice)
        .await
        .expect("list");
    assert_eq!(listed["tasks"][0]["id"], id.as_str());
    assert_eq!(listed["totalSize"], 1);

    // Another space: not found, never the content.
    let p = fleet
        .a2a(AGENT, "get", json!({"id": id}), &fleet.mallory)
        .await
        .expect_err("other space");
    assert_eq!((p.status, a2a_error(&p).as_str()), (404, "TaskNotFound"));
    assert!(!format!("{p:?}").contains("echo: hello"));
    let none = fleet
        .a2a(AGENT, "list", json!({}), &fleet.mallory)
        .await
        .expect("list");
    assert_eq!(none["totalSize"], 0);
    let p = fleet
        .a2a(AGENT, "cancel", json!({"id": id}), &fleet.mallory)
        .await
        .expect_err("other space");
    assert_eq!(a2a_error(&p), "TaskNotFound");
    // A terminal task cannot be canceled.
    let p = fleet
        .a2a(AGENT, "cancel", json!({"id": id}), &fleet.alice)
        .await
        .expect_err("terminal");
    assert_eq!(
        (p.status, a2a_error(&p).as_str()),
        (409, "TaskNotCancelable")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_work_waits_for_a_worker_and_queued_tasks_cancel_here() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let queued = queue(&fleet, "later").await;
    assert_eq!(state(&queued), "TASK_STATE_SUBMITTED");
    let id = queued["id"].as_str().expect("id").to_string();

    let doomed = queue(&fleet, "never").await;
    let canceled = fleet
        .a2a(AGENT, "cancel", json!({"id": doomed["id"]}), &fleet.alice)
        .await
        .expect("cancel a queued task");
    assert_eq!(state(&canceled), "TASK_STATE_CANCELED");

    // A worker starts: the first task runs; the canceled one's item is refused as terminal.
    serve_items(&fleet, 1).await;
    let done = tether_testkit::eventually(
        Duration::from_secs(20),
        "the queued task completes",
        || async {
            let t = fleet
                .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
                .await
                .ok()?;
            (state(&t) == "TASK_STATE_COMPLETED").then_some(t)
        },
    )
    .await;
    assert_eq!(done["artifacts"][0]["parts"][0]["text"], "echo: later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let c = &fleet.f.c;
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<u8>,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("malformed JSON", "send", b"{oops".to_vec(), vec![], 400, "ParseError"),
        ("not a send request", "send", br#"{"message": 3}"#.to_vec(), vec![], 400, "InvalidParams"),
        ("no parts", "send", br#"{"message": {"messageId": "m", "role": "ROLE_USER", "parts": []}}"#.to_vec(), vec![], 400, "InvalidParams"),
        ("unknown agent", "send", serde_json::to_vec(&message("x")).expect("json"), vec![], 404, "InvalidParams"),
        ("no version", "send", serde_json::to_vec(&message("x")).expect("json"), vec![("A2A-Version", "")], 400, "VersionNotSupported"),
        ("old version", "send", serde_json::to_vec(&message("x")).expect("json"), vec![("A2A-Version", "0.3")], 400, "VersionNotSupported"),
        ("malformed protobuf", "send", b"\xff\xff\xff".to_vec(), vec![("Content-Type", "application/protobuf")], 400, "ParseError"),
        ("protobuf without a message", "send", b"\x0a\x00".to_vec(), vec![("Content-Type", "application/protobuf")], 400, "InvalidParams"),
        ("protobuf card", "card", vec![], vec![("Content-Type", "application/protobuf")], 415, "ContentTypeNotSupported"),
        ("oversize", "send", vec![b' '; 600 * 1024], vec![], 413, "InvalidRequest"),
        ("stream without a subject", "stream", serde_json::to_vec(&message("x")).expect("json"), vec![], 400, "InvalidParams"),
        ("stream into another's inbox", "stream", serde_json::to_vec(&message("x")).expect("json"), vec![("Tether-Stream-Subject", "_INBOX.mallory.x")], 400, ""),
        ("unknown task", "get", br#"{"id": "nope"}"#.to_vec(), vec![], 404, "TaskNotFound"),
        ("wildcard task id", "get", br#"{"id": "*"}"#.to_vec(), vec![], 404, "TaskNotFound"),
        ("push config", "send", serde_json::to_vec(&json!({"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}]}, "configuration": {"taskPushNotificationConfig": {"url": "http://x"}}})).expect("json"), vec![], 400, "PushNotificationNotSupported"),
    ];
    for (what, op, body, extra, status, err) in cases {
        let agent = if what == "unknown agent" {
            "nobody"
        } else {
            AGENT
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert("A2A-Version", "1.0");
        for (k, v) in &extra {
            h.insert(*k, *v);
        }
        let p = tether_testkit::request(
            c,
            &format!("a2a.{agent}.{op}"),
            body,
            Some(&fleet.alice),
            h,
            Duration::from_secs(30),
        )
        .await
        .expect_err(what);
        assert_eq!(p.status, status, "{what}: {p:?}");
        if !err.is_empty() {
            assert_eq!(a2a_error(&p), err, "{what}: {p:?}");
        }
    }
    // A card published with a token of another agent (or a caller's) is refused.
    let other = fleet.f.agent("other", "workers", &["a2a:serve"]).await;
    for t in [&other, &fleet.alice] {
        let p = fleet
            .f
            .call("a2a.echo.work.card", json!({"name": "evil"}), Some(t))
            .await
            .expect_err("someone else's card");
        assert_eq!(p.status, 403, "{p:?}");
    }
    let card = fleet
        .a2a(AGENT, "card", json!({}), &fleet.alice)
        .await
        .expect("card");
    assert_eq!(card["name"], "echo", "the card is unchanged");
    // Nothing was stored: alice has no task.
    let none = fleet
        .a2a(AGENT, "list", json!({}), &fleet.alice)
        .await
        .expect("list");
    assert_eq!(none["totalSize"], 0, "{none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_item_out_of_deliveries_fails_its_task() {
    let fleet = A2aFleet::start_with(tether_a2a_gateway::A2aConfig {
        a2a_ack_wait_ms: 1_000,
        a2a_max_deliver: 2,
        ..config()
    })
    .await;
    fleet.publish_card().await;
    let mut body = message("crash me");
    body["configuration"] = json!({"returnImmediately": true});
    let task = fleet
        .a2a(AGENT, "send", body, &fleet.alice)
        .await
        .expect("send")["task"]
        .clone();
    let id = task["id"].as_str().expect("id").to_string();
    // A worker that takes the item and dies on it, twice: nothing is ever settled.
    let c = fleet
        .f
        .connect_as(&fleet.worker)
        .await
        .expect("worker connects");
    let consumer: jetstream::consumer::PullConsumer = jetstream::new(c)
        .get_consumer_from_stream("work_echo", "A2A_WORK")
        .await
        .expect("bind");
    let mut msgs = consumer.messages().await.expect("pull");
    for n in 1..=2 {
        let m = msgs.next().await.expect("an item").expect("item");
        assert_eq!(m.info().expect("info").delivered, n);
    }
    let failed = tether_testkit::eventually(Duration::from_secs(20), "the task fails", || async {
        let t = fleet
            .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
            .await
            .ok()?;
        (state(&t) == "TASK_STATE_FAILED").then_some(t)
    })
    .await;
    let note = failed["status"]["message"]["parts"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(note.contains("delivered 2 times"), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operations_and_bad_calls_through_the_bridge_are_named() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    // On the bus (an operator: an agent may not even publish it): MethodNotFound.
    let p = fleet
        .a2a(AGENT, "bogus", json!({}), fleet.f.operator())
        .await
        .expect_err("unknown operation");
    assert_eq!(
        (p.status, a2a_error(&p).as_str()),
        (404, "MethodNotFound"),
        "{p:?}"
    );

    // Through the HTTP bridge, as an A2A client sees it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = fleet
        .gw
        .as_ref()
        .and_then(|g| g.agent_url(AGENT))
        .expect("bridge");
    let http = reqwest::Client::new();
    let post = |url: String, body: Vec<u8>| {
        http.post(url)
            .bearer_auth(&fleet.alice)
            .header("A2A-Version", "1.0")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let rpc = |method: &str, params: serde_json::Value| {
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
            .expect("json")
    };
    let cases: Vec<(&str, String, Vec<u8>, i64)> = vec![
        ("malformed JSON", url.clone(), b"{oops".to_vec(), -32700),
        (
            "unknown method",
            url.clone(),
            rpc("Bogus", json!({})),
            -32601,
        ),
        (
            "unknown task",
            url.clone(),
            rpc("GetTask", json!({"id": "nope"})),
            -32001,
        ),
        (
            "unknown agent",
            url.replace("/a2a/echo", "/a2a/nobody"),
            rpc("SendMessage", message("x")),
            -32602,
        ),
    ];
    for (what, to, body, code) in cases {
        let r = post(to, body).await.expect(what);
        let v: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.expect(what)).expect(what);
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
    }
    let r = post(url.clone(), vec![b' '; 600 * 1024])
        .await
        .expect("oversize");
    assert_eq!(r.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let none = fleet
        .a2a(AGENT, "list", json!({}), &fleet.alice)
        .await
        .expect("list");
    assert_eq!(none["totalSize"], 0, "nothing was stored: {none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_s_batch_is_one_write_announced_event_by_event() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let queued = queue(&fleet, "batch").await;
    let id = queued["id"].as_str().expect("id").to_string();
    let space = queued["metadata"]["tether"]["space"].clone();
    let artifact = json!({"artifactUpdate": {"taskId": id, "contextId": "", "artifact": {"artifactId": "a1", "parts": [{"text": "result"}]}}});
    let completed = json!({"statusUpdate": {"taskId": id, "contextId": "", "status": {"state": "TASK_STATE_COMPLETED"}}});
    let report = |extra: Value| {
        let mut b = json!({"space": space, "taskId": id, "attempt": 1});
        b.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        fleet.f.call("a2a.echo.work.event", b, Some(&fleet.worker))
    };

    // Bad batches are refused whole: the task stays as it was.
    let cases = [
        (
            "event and events",
            json!({"event": completed, "events": [artifact]}),
            400,
        ),
        ("neither", json!({}), 400),
        ("an empty batch", json!({"events": []}), 400),
        (
            "an event after the terminal one",
            json!({"events": [completed, artifact]}),
            409,
        ),
        (
            "a worker setting SUBMITTED",
            json!({"events": [artifact, {"statusUpdate": {"taskId": id, "contextId": "", "status": {"state": "TASK_STATE_SUBMITTED"}}}]}),
            400,
        ),
    ];
    for (what, extra, status) in cases {
        let p = report(extra).await.expect_err(what);
        assert_eq!(p.status, status, "{what}: {p:?}");
        let t = fleet
            .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
            .await
            .expect("get");
        assert_eq!(state(&t), "TASK_STATE_SUBMITTED", "{what}: {t}");
        assert!(t.get("artifacts").is_none(), "{what}: {t}");
    }
    assert_eq!(
        fleet
            .task_events(space.as_str().expect("space"), &id)
            .await
            .len(),
        1
    );

    // A good batch: one answer, as of its last event; every event on the stream, numbered.
    let answer = report(json!({"events": [artifact, completed]}))
        .await
        .expect("batch accepted");
    assert_eq!(answer["state"], "TASK_STATE_COMPLETED", "{answer}");
    assert_eq!(answer["seq"], 3, "{answer}");
    let events = fleet.task_events(space.as_str().expect("space"), &id).await;
    let seqs: Vec<u64> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(seqs, vec![1, 2, 3], "{events:?}");
    assert_eq!(
        events[1].1["artifactUpdate"]["artifact"]["parts"][0]["text"],
        "result"
    );
    assert_eq!(event_state(&events[2].1), Some("TASK_STATE_COMPLETED"));
    let t = fleet
        .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
        .await
        .expect("get");
    assert_eq!(state(&t), "TASK_STATE_COMPLETED");
    assert_eq!(t["artifacts"][0]["parts"][0]["text"], "result");
}
