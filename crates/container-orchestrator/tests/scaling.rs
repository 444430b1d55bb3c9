//! Scaling a worker deployment on its agent's backlog (issue 17, item 4, acceptance): the
//! example Rust worker (`a2a-echo-worker`, 4 tasks at a time) in an image built here, deployed
//! between 0 and 4 replicas with a target of 10 queued or running tasks per replica; the A2A
//! gateway and the permission node on a real nats-server that containers reach. With no work
//! the deployment goes to 0; 200 tasks of 1 s take it up to 4 (never more), and once they are
//! done it goes back to 0. Every decision is a `scaled` event on `events.workers.<name>` with
//! the numbers behind it, and the figures are in the orchestrator's `$SRV.STATS`.
//!
//! Needs the workspace's binaries built (`cargo build --workspace --bins`; `just test` does).

mod common;

use std::time::{Duration, Instant};

use common::a2a::A2aFleet;
use common::*;
use serde_json::{Value, json};

const AGENT: &str = "scale-w";
const MAX: u64 = 4;
const TARGET: u64 = 10;
/// The quiet period before a scale-down: short, but longer than a replica takes to start and
/// publish its card.
const QUIET: u64 = 3;
const TASKS: usize = 200;
const WAIT: Duration = Duration::from_secs(60);

/// A number in an event or a reply (events carry JSON numbers as floats, replies 64-bit ones as
/// strings).
fn num(v: &Value) -> u64 {
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 => f as u64,
        _ => tether_testkit::num(v),
    }
}

async fn a2a(f: &Fleet, op: &str, body: Value, token: &str) -> Option<Result<Value, Problem>> {
    common::a2a::request(f, AGENT, op, body, token).await
}

async fn send(f: &Fleet, caller: &str, text: &str) -> String {
    common::a2a::send(f, AGENT, caller, text).await
}

async fn state(f: &Fleet, caller: &str, id: &str) -> String {
    a2a(f, "get", json!({"id": id}), caller)
        .await
        .and_then(Result::ok)
        .map(|t| {
            t["status"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// The next `scaled` event (its data), within `within`; checks the numbers it carries.
async fn next_scaled(sub: &mut async_nats::Subscriber, within: Duration) -> Value {
    let e = next_event_within(sub, "tether.worker.scaled", within).await;
    let d = e["data"].clone();
    let (from, to) = (num(&d["from"]), num(&d["to"]));
    let backlog = num(&d["pending"]) + num(&d["ack_pending"]);
    assert_eq!(num(&d["target"]), TARGET, "{d}");
    assert!(to <= MAX && from != to, "{d}");
    if to > from {
        // Up: as many as the backlog asks, within the bounds.
        assert_eq!(to, backlog.div_ceil(TARGET).min(MAX), "{d}");
        assert_eq!(d["reason"], "backlog above capacity", "{d}");
    } else {
        assert!(backlog < from * TARGET, "down below capacity only: {d}");
        assert_eq!(
            d["reason"],
            format!("backlog below capacity for {QUIET} s"),
            "{d}"
        );
    }
    d
}

/// The `workers-scale` figures of deployment `name` in the orchestrator's `$SRV.STATS`.
async fn stats_figures(f: &Fleet, name: &str) -> Option<Value> {
    let m =
        f.c.request("$SRV.STATS.container-orchestrator", "".into())
            .await
            .ok()?;
    let v: Value = serde_json::from_slice(&m.payload).ok()?;
    v["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "workers-scale")?["data"]["deployments"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
}

#[tokio::test]
async fn a_deployment_scales_from_zero_on_its_backlog_and_back() {
    let A2aFleet {
        f,
        gateway: _gw,
        image,
    } = A2aFleet::start("scale", AGENT, |c| {
        c.worker_scale_interval_ms = 200;
    })
    .await;
    let alice = f.agent("alice-s", "s1", &["a2a:call"]).await;
    let name = unique("scale");
    let mut events =
        f.c.subscribe(format!("events.workers.{name}"))
            .await
            .expect("subscribe");
    let deploy = |min: u64| {
        json!({
            "name": name, "agent_id": AGENT, "image": image, "replicas": 1,
            "min_replicas": min, "max_replicas": MAX,
            "target_backlog_per_replica": TARGET, "scale_down_after_seconds": QUIET,
        })
    };

    // First at least 1, so a replica publishes the agent's card (the gateway takes no task
    // for an agent it has never seen a card of): a probe task completes.
    f.call("workers.deploy", deploy(1), Some(&f.op))
        .await
        .expect("deploy");
    let probe = send(&f, &alice, "probe").await;
    eventually(WAIT, "the probe completes", || async {
        (state(&f, &alice, &probe).await == "TASK_STATE_COMPLETED").then_some(())
    })
    .await;
    // Then down to 0 allowed: no backlog, so after the quiet period the replica goes.
    let r = f
        .call("workers.deploy", deploy(0), Some(&f.op))
        .await
        .expect("deploy with min 0");
    assert_eq!(r["changed"], true, "{r}");
    assert_eq!(r["deployment"]["generation"], 1, "bounds do not roll: {r}");
    let d = next_scaled(&mut events, WAIT).await;
    assert_eq!((num(&d["from"]), num(&d["to"])), (1, 0), "{d}");
    eventually(WAIT, "no replica runs", || async {
        worker_replicas(&name, "-aq").is_empty().then_some(())
    })
    .await;

    // 200 slow tasks: up from 0, to the maximum and never beyond.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        ids.push(send(&f, &alice, &format!("sleep 1000 t-{i}")).await);
    }
    let sent = started.elapsed();
    let mut ups = Vec::new();
    loop {
        let d = next_scaled(&mut events, WAIT).await;
        assert!(num(&d["to"]) > num(&d["from"]), "only up while queued: {d}");
        if ups.is_empty() {
            assert_eq!(num(&d["from"]), 0, "the first task starts a replica: {d}");
        }
        ups.push(d.clone());
        if num(&d["to"]) == MAX {
            break;
        }
    }
    eventually(WAIT, "the maximum of replicas runs", || async {
        let n = worker_replicas(&name, "-q").len() as u64;
        assert!(n <= MAX, "{n} replicas run");
        (n == MAX).then_some(())
    })
    .await;
    let at_max = started.elapsed();
    let fig = eventually(WAIT, "the figures are in $SRV.STATS", || async {
        stats_figures(&f, &name)
            .await
            .filter(|d| num(&d["replicas"]) == MAX)
    })
    .await;
    assert_eq!(fig["agent"], AGENT, "{fig}");
    assert_eq!(fig["consumer"], format!("A2A_WORK.work_{AGENT}"), "{fig}");
    assert_eq!(num(&fig["target"]), TARGET, "{fig}");
    assert!(num(&fig["desired"]) <= MAX, "{fig}");

    // Drained: down step by step, to the minimum.
    let mut downs = Vec::new();
    loop {
        let d = next_scaled(&mut events, WAIT).await;
        assert!(
            num(&d["to"]) < num(&d["from"]),
            "only down once drained: {d}"
        );
        downs.push(d.clone());
        if num(&d["to"]) == 0 {
            assert_eq!(num(&d["pending"]) + num(&d["ack_pending"]), 0, "{d}");
            break;
        }
    }
    let at_zero = started.elapsed();
    eventually(WAIT, "no replica runs once drained", || async {
        worker_replicas(&name, "-aq").is_empty().then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(state(&f, &alice, id).await, "TASK_STATE_COMPLETED", "{id}");
    }
    let steps = |v: &[Value]| {
        v.iter()
            .map(|d| format!("{}→{}", num(&d["from"]), num(&d["to"])))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{TASKS} tasks sent in {sent:?}; up {} ({MAX} running after {at_max:?}); down {} (at 0 after {at_zero:?})",
        steps(&ups),
        steps(&downs)
    );
    f.call("workers.remove", json!({"name": name}), Some(&f.op))
        .await
        .expect("remove");
}
