//! Issue 15's acceptance tests, end to end: a real nats-server with the auth callout, the
//! gateway (in-process, or the `a2a-gateway` binary where one is killed) and the
//! `a2a-echo-worker` binary as processes on their own bus identities, callers on theirs.
//! Killing a worker or a gateway mid-task, several workers, no worker, cancel, a follow-up
//! message: every task ends in exactly one terminal state, no event lost or doubled.
//!
//! Each echo worker names itself in its artifacts' metadata (`worker`, `attempt`), so a test
//! sees who served a task and on which delivery.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(25);

/// A message sent with `returnImmediately`.
fn queued(text: &str) -> Value {
    let mut body = message(text);
    body["configuration"] = json!({"returnImmediately": true});
    body
}

fn id_of(task: &Value) -> String {
    task["id"].as_str().expect("task id").to_string()
}

fn working(s: &str) -> bool {
    s == "TASK_STATE_WORKING"
}

fn completed(s: &str) -> bool {
    s == "TASK_STATE_COMPLETED"
}

/// The task's events on the stream: numbered 1..n gap-free, exactly one terminal status (the
/// last event). The states its status events set, in order.
async fn check_events(fleet: &A2aFleet, task: &str) -> (Vec<Value>, Vec<String>) {
    let events = fleet.task_events("s1", task).await;
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "{events:?}"
    );
    let events: Vec<Value> = events.into_iter().map(|(_, e)| e).collect();
    let states: Vec<String> = events
        .iter()
        .filter_map(|e| e.get("statusUpdate").and(event_state(e)))
        .map(str::to_string)
        .collect();
    let terminal = events
        .iter()
        .filter(|e| event_state(e).is_some_and(is_terminal))
        .count();
    assert_eq!(terminal, 1, "exactly one terminal event: {events:?}");
    assert!(
        event_state(events.last().expect("events")).is_some_and(is_terminal),
        "the terminal event is the last: {events:?}"
    );
    (events, states)
}

/// The one artifact of a finished echo task: its text and the worker and attempt that made it.
fn the_artifact(task: &Value) -> (String, String, u64) {
    let arts = task["artifacts"].as_array().expect("artifacts");
    assert_eq!(arts.len(), 1, "one artifact: {task}");
    let a = &arts[0];
    (
        a["parts"][0]["text"].as_str().expect("text").to_string(),
        a["metadata"]["worker"]
            .as_str()
            .expect("worker")
            .to_string(),
        a["metadata"]["attempt"].as_u64().expect("attempt"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_s_task_is_redelivered_and_completes_once() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let mut w1 = fleet.worker_process("w1", 4);
    let task = fleet
        .a2a(AGENT, "send", queued("sleep 4000 hi"), &fleet.alice)
        .await
        .expect("send")["task"]
        .clone();
    let id = id_of(&task);
    fleet.wait_task(&id, "the task is WORKING", working).await;

    // The caller follows the task through the worker's death.
    let alice = fleet.f.connect_as(&fleet.alice).await.expect("alice");
    let inbox = alice.new_inbox();
    let mut sub = alice.subscribe(inbox.clone()).await.expect("subscribe");
    let snap = fleet
        .try_a2a(
            &alice,
            "subscribe",
            json!({"id": id}),
            &fleet.alice,
            &[("Tether-Stream-Subject", &inbox)],
        )
        .await
        .expect("an answer")
        .expect("subscribe");
    assert_eq!(state(&snap["task"]), "TASK_STATE_WORKING");

    w1.kill();
    let _w2 = fleet.worker_process("w2", 4);
    let chunks = read_stream(&mut sub, WAIT).await;
    let streamed = check_stream(&chunks);
    let done = fleet.wait_task(&id, "the task completes", completed).await;
    let mut rebuilt = streamed[0]["task"].clone();
    for e in &streamed[1..] {
        apply(&mut rebuilt, e);
    }
    assert_eq!(rebuilt, done, "the stream told the whole story");

    let (text, worker, attempt) = the_artifact(&done);
    assert_eq!(
        (text.as_str(), worker.as_str(), attempt),
        ("sleep 4000 hi", "w2", 2)
    );
    let (_, states) = check_events(&fleet, &id).await;
    assert_eq!(
        states,
        [
            "TASK_STATE_WORKING",
            "TASK_STATE_WORKING",
            "TASK_STATE_COMPLETED"
        ],
        "the second delivery shows as a second WORKING"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_through_a_killed_gateway_resumes_on_another_without_loss() {
    let fleet = A2aFleet::bare().await;
    let mut gw_a = fleet.gateway_process("gateway-a", &[]);
    let a = fleet.new_gateway(&HashSet::new()).await;
    fleet.publish_card().await;
    let _w = fleet.worker_process("w1", 4);

    // Only gateway A runs: it serves the stream.
    let alice = fleet.f.connect_as(&fleet.alice).await.expect("alice");
    let inbox1 = alice.new_inbox();
    let mut sub1 = alice.subscribe(inbox1.clone()).await.expect("subscribe");
    let sent = fleet
        .try_a2a(
            &alice,
            "stream",
            message("sleep 6000 x"),
            &fleet.alice,
            &[("Tether-Stream-Subject", &inbox1)],
        )
        .await
        .expect("an answer")
        .expect("stream");
    let id = id_of(&sent["task"]);
    let until = tokio::time::Instant::now() + WAIT;
    let mut first = Vec::new();
    while !first
        .iter()
        .any(|c: &Chunk| c.body["statusUpdate"]["status"]["state"] == "TASK_STATE_WORKING")
    {
        first.push(
            next_chunk(&mut sub1, until)
                .await
                .expect("WORKING streamed"),
        );
    }

    let _gw_b = fleet.gateway_process("gateway-b", &[]);
    fleet.new_gateway(&HashSet::from([a])).await;
    gw_a.kill();

    // Subscribe again: B answers the snapshot, then what follows.
    let inbox2 = alice.new_inbox();
    let mut sub2 = alice.subscribe(inbox2.clone()).await.expect("subscribe");
    let snap = tether_testkit::eventually(WAIT, "gateway B answers subscribe", || async {
        fleet
            .try_a2a(
                &alice,
                "subscribe",
                json!({"id": id}),
                &fleet.alice,
                &[("Tether-Stream-Subject", &inbox2)],
            )
            .await?
            .ok()
    })
    .await;
    let chunks = read_stream(&mut sub2, WAIT).await;
    let events = check_stream(&chunks);
    assert_eq!(events[0], snap, "the snapshot comes first");
    let done = fleet.wait_task(&id, "the task completes", completed).await;
    let mut rebuilt = snap["task"].clone();
    for e in &events[1..] {
        apply(&mut rebuilt, e);
    }
    assert_eq!(rebuilt, done, "snapshot + later events = the final task");

    // The first stream stopped with A: no end, no terminal event, gap-free as far as it went.
    while let Some(c) = next_chunk(&mut sub1, tokio::time::Instant::now()).await {
        first.push(c);
    }
    assert!(first.iter().all(|c| c.kind == "event"), "{first:?}");
    let seqs: Vec<u64> = first.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=first.len() as u64).collect::<Vec<_>>());
    // Together, the two streams are exactly the task's events: the first covers 1..=k, the
    // second the snapshot's seq and everything after it.
    let (all, _) = check_events(&fleet, &id).await;
    let later = &events[1..];
    assert_eq!(
        later,
        &all[all.len() - later.len()..],
        "nothing lost or doubled"
    );
    let before: Vec<Value> = first[1..].iter().map(|c| c.body.clone()).collect();
    assert_eq!(before, all[1..=before.len()], "the first stream's events");
    let snap_seq = all.len() - later.len();
    // What a caller can check itself: the snapshot's event number is at most one past the
    // last event the first stream delivered.
    let last_seen = first.last().and_then(|c| c.event_seq).expect("numbered");
    assert_eq!(chunks[0].event_seq, Some(snap_seq as u64), "{chunks:?}");
    assert!(
        last_seen + 1 >= snap_seq as u64,
        "{first:?} then {chunks:?}"
    );
    assert!(
        before.len() + 1 >= snap_seq,
        "no event between the two streams is missing: first up to {}, snapshot at {snap_seq}",
        before.len() + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_share_the_work_and_each_task_completes_once() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let _w1 = fleet.worker_process("w1", 2);
    let _w2 = fleet.worker_process("w2", 2);
    // Both are waiting for work before any is queued.
    let js = jetstream::new(fleet.f.c.clone());
    tether_testkit::eventually(WAIT, "both workers pull", || async {
        let mut c: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("work_echo", "A2A_WORK")
            .await
            .ok()?;
        (c.info().await.ok()?.num_waiting >= 2).then_some(())
    })
    .await;

    let mut ids = Vec::new();
    for n in 0..8 {
        let t = fleet
            .a2a(
                AGENT,
                "send",
                queued(&format!("sleep 300 {n}")),
                &fleet.alice,
            )
            .await
            .expect("send");
        ids.push(id_of(&t["task"]));
    }
    let mut workers = HashSet::new();
    for (n, id) in ids.iter().enumerate() {
        let done = fleet.wait_task(id, "the task completes", completed).await;
        let (text, worker, attempt) = the_artifact(&done);
        assert_eq!((text, attempt), (format!("sleep 300 {n}"), 1));
        workers.insert(worker);
        let (_, states) = check_events(&fleet, id).await;
        assert_eq!(states, ["TASK_STATE_WORKING", "TASK_STATE_COMPLETED"]);
    }
    assert_eq!(
        workers,
        HashSet::from(["w1".to_string(), "w2".to_string()]),
        "both workers served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_queued_without_a_worker_runs_when_one_starts() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let task = fleet
        .a2a(AGENT, "send", queued("later"), &fleet.alice)
        .await
        .expect("send")["task"]
        .clone();
    assert_eq!(state(&task), "TASK_STATE_SUBMITTED");
    // A blocking send past its deadline answers the task as it stands: still queued.
    let waited = fleet
        .a2a_with(
            AGENT,
            "send",
            message("also later"),
            &fleet.alice,
            &[("Tether-Timeout-Ms", "300")],
        )
        .await
        .expect("send")["task"]
        .clone();
    assert_eq!(state(&waited), "TASK_STATE_SUBMITTED");

    let _w = fleet.worker_process("w1", 4);
    for (t, text) in [(&task, "later"), (&waited, "also later")] {
        let done = fleet
            .wait_task(&id_of(t), "the task completes", completed)
            .await;
        assert_eq!(the_artifact(&done), (text.to_string(), "w1".to_string(), 1));
        check_events(&fleet, &id_of(t)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_the_running_task_and_frees_the_worker() {
    let mut cfg = config();
    cfg.a2a_cancel_grace_ms = 15_000;
    let fleet = A2aFleet::start_with(cfg).await;
    fleet.publish_card().await;
    let _w = fleet.worker_process("w1", 1);
    let task = fleet
        .a2a(AGENT, "send", queued("sleep 30000"), &fleet.alice)
        .await
        .expect("send")["task"]
        .clone();
    let id = id_of(&task);
    fleet.wait_task(&id, "the task is WORKING", working).await;

    let asked = Instant::now();
    let canceled = fleet
        .a2a(AGENT, "cancel", json!({"id": id}), &fleet.alice)
        .await
        .expect("cancel");
    assert_eq!(state(&canceled), "TASK_STATE_CANCELED");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the worker recorded CANCELED within the grace ({:?})",
        asked.elapsed()
    );
    let (_, states) = check_events(&fleet, &id).await;
    assert_eq!(states, ["TASK_STATE_WORKING", "TASK_STATE_CANCELED"]);

    // Its one slot is free again: the next task runs long before the sleep would have ended.
    let next = fleet
        .a2a_with(
            AGENT,
            "send",
            message("next"),
            &fleet.alice,
            &[("Tether-Timeout-Ms", "20000")],
        )
        .await
        .expect("send")["task"]
        .clone();
    assert_eq!(state(&next), "TASK_STATE_COMPLETED", "{next}");
    assert_eq!(
        the_artifact(&next),
        ("next".to_string(), "w1".to_string(), 1)
    );
    let still = fleet
        .a2a(AGENT, "get", json!({"id": id}), &fleet.alice)
        .await
        .expect("get");
    assert_eq!(state(&still), "TASK_STATE_CANCELED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn input_required_then_a_follow_up_message_completes_the_task() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let _w = fleet.worker_process("w1", 4);
    let asked = fleet
        .a2a(AGENT, "send", message("ask"), &fleet.alice)
        .await
        .expect("send")["task"]
        .clone();
    assert_eq!(state(&asked), "TASK_STATE_INPUT_REQUIRED", "{asked}");
    assert_eq!(
        asked["status"]["message"]["parts"][0]["text"],
        "what should I echo?"
    );
    let id = id_of(&asked);

    let mut follow = message("blue");
    follow["message"]["taskId"] = json!(id);
    let done = fleet
        .a2a(AGENT, "send", follow, &fleet.alice)
        .await
        .expect("follow-up")["task"]
        .clone();
    assert_eq!(state(&done), "TASK_STATE_COMPLETED", "{done}");
    assert_eq!(done["id"], id.as_str(), "the same task");
    assert_eq!(
        the_artifact(&done),
        (
            "asked: ask; answered: blue".to_string(),
            "w1".to_string(),
            1
        )
    );
    let users: Vec<&str> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|m| m["role"] == "ROLE_USER")
        .filter_map(|m| m["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(users, ["ask", "blue"]);
    let (_, states) = check_events(&fleet, &id).await;
    assert_eq!(
        states,
        [
            "TASK_STATE_WORKING",
            "TASK_STATE_INPUT_REQUIRED",
            "TASK_STATE_SUBMITTED",
            "TASK_STATE_WORKING",
            "TASK_STATE_COMPLETED"
        ]
    );
    // A terminal task takes no more messages.
    let mut again = message("more");
    again["message"]["taskId"] = json!(id);
    let p = fleet
        .a2a(AGENT, "send", again, &fleet.alice)
        .await
        .expect_err("terminal");
    assert_eq!(a2a_error(&p), "UnsupportedOperation", "{p:?}");
}
