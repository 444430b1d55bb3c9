//! Worker deployments serving A2A (issue 17, items 1 and 2, acceptance): the example Rust
//! worker (`a2a-echo-worker`) in an image built here `FROM scratch`, deployed with 2 replicas
//! of agent `echo-w` on the real engine; the A2A gateway and the permission node on a real
//! nats-server that containers reach. Both replicas consume; a `docker kill`ed replica is
//! replaced and every task completes; the replicas outlive several token lifetimes (short
//! here) and keep serving on renewed tokens that `docker inspect` never shows, also from a
//! restarted orchestrator; revoking the agent gets the replicas' token refused within a
//! second, and their work never completes.
//!
//! Needs the workspace's binaries built (`cargo build --workspace --bins`; `just test` does).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::a2a::{A2aFleet, state};
use common::*;
use serde_json::{Value, json};
use tether_testkit::{NodeKind, unverified_claims};

const AGENT: &str = "echo-w";
/// The replicas' token lifetime: short, so the test outlives several.
const TTL: u32 = 8;
const WAIT: Duration = Duration::from_secs(60);

fn container_name(id: &str) -> String {
    docker(&["inspect", "-f", "{{.Name}}", id])
        .trim()
        .trim_start_matches('/')
        .to_string()
}

/// The token in replica `id` right now (through the engine, as `docker cp` reads it).
fn token_in(id: &str) -> Option<String> {
    let out = std::process::Command::new("docker")
        .args(["cp", "-L", &format!("{id}:/run/tether/token"), "-"])
        .output()
        .ok()?;
    if !out.status.success() || out.stdout.len() < 512 {
        return None;
    }
    // One tar entry: the header's size field, then the content.
    let size = std::str::from_utf8(&out.stdout[124..135]).ok()?;
    let size = usize::from_str_radix(size.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok()?;
    let body = out.stdout.get(512..512 + size)?;
    Some(String::from_utf8_lossy(body).trim().to_string())
}

/// The file the token link in replica `id` points at (the tar entry of the link itself).
fn link_target(id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["cp", &format!("{id}:/run/tether/token"), "-"])
        .output()
        .expect("docker cp");
    assert!(
        out.status.success() && out.stdout.len() >= 512,
        "docker cp of the link"
    );
    assert_eq!(out.stdout[156], b'2', "the token is a symlink");
    String::from_utf8_lossy(&out.stdout[157..257])
        .trim_end_matches('\0')
        .to_string()
}

/// One A2A request to the agent as `token` (5 s); `None` when nothing answered.
async fn a2a(f: &Fleet, op: &str, body: Value, token: &str) -> Option<Result<Value, Problem>> {
    common::a2a::request(f, AGENT, op, body, token).await
}

/// Sends `text` (queued) once the agent is known; the task id.
async fn send(f: &Fleet, caller: &str, text: &str) -> String {
    common::a2a::send(f, AGENT, caller, text).await
}

/// Waits until every task completed; the workers (container names) that made them.
async fn completed(f: &Fleet, caller: &str, ids: &[String]) -> Vec<String> {
    let mut by = Vec::new();
    for id in ids {
        let t = eventually(WAIT, "the task completes", || async {
            a2a(f, "get", json!({"id": id}), caller)
                .await
                .and_then(Result::ok)
                .filter(|t| state(t) == "TASK_STATE_COMPLETED")
        })
        .await;
        let worker = t["artifacts"][0]["metadata"]["worker"]
            .as_str()
            .unwrap_or_else(|| panic!("the artifact names its worker: {t}"));
        by.push(worker.to_string());
    }
    by
}

#[tokio::test]
async fn an_a2a_worker_deployment_serves_renews_its_tokens_and_stops_when_revoked() {
    let A2aFleet {
        mut f,
        gateway: _gw,
        image,
    } = A2aFleet::start("a2aw", AGENT, |c| {
        c.worker_token_ttl_seconds = TTL;
    })
    .await;
    let alice = f.agent("alice-w", "s1", &["a2a:call"]).await;

    let name = unique("echo");
    let r = f
        .call(
            "workers.deploy",
            json!({"name": name, "agent_id": AGENT, "image": image, "replicas": 2}),
            Some(&f.op),
        )
        .await
        .expect("deploy");
    assert_eq!(r["changed"], true, "{r}");
    let first = eventually(WAIT, "2 replicas run", || async {
        let r = worker_replicas(&name, "-q");
        (r.len() == 2).then_some(r)
    })
    .await;
    assert_eq!(
        docker(&[
            "ps",
            "-q",
            "--filter",
            "label=tether.kind=worker",
            "--filter",
            &format!("label=tether.host={}", f.host_id)
        ])
        .lines()
        .count(),
        2,
        "exactly the 2 replicas are workers on this host"
    );
    let started = Instant::now();

    // The token is a file, never in what the engine shows.
    let token = eventually(WAIT, "the replica's token is written", || async {
        token_in(&first[0])
    })
    .await;
    let c = unverified_claims(&token);
    assert_eq!(c["sub"], AGENT);
    assert_eq!(c["space"], "workers");
    assert_eq!(c["scopes"], json!(["a2a:serve"]));
    for id in &first {
        let inspect = docker(&["inspect", id]);
        assert!(
            inspect.contains("TETHER_TOKEN_FILE=/run/tether/token"),
            "{inspect}"
        );
        assert!(!inspect.contains(&token), "docker inspect shows the token");
        assert!(!inspect.contains("eyJ"), "docker inspect shows a JWT");
    }

    // Both consume: 8 tasks of 1.5 s with 4 slots each.
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(send(&f, &alice, &format!("sleep 1500 one-{i}")).await);
    }
    let by: HashSet<String> = completed(&f, &alice, &ids).await.into_iter().collect();
    let names: HashSet<String> = first.iter().map(|id| container_name(id)).collect();
    assert_eq!(by, names, "both replicas served");

    // docker kill one mid-task: replaced, and every task completes (redelivered).
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(send(&f, &alice, &format!("sleep 2000 two-{i}")).await);
    }
    docker(&["kill", &first[0]]);
    let second = eventually(WAIT, "the killed replica is replaced", || async {
        let r = worker_replicas(&name, "-q");
        (r.len() == 2 && !r.contains(&first[0])).then_some(r)
    })
    .await;
    completed(&f, &alice, &ids).await;
    let new = second
        .iter()
        .find(|id| !first.contains(id))
        .expect("a new replica")
        .clone();
    let new_name = container_name(&new);
    let served_by_new = eventually(WAIT, "the new replica serves", || async {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(send(&f, &alice, &format!("sleep 500 three-{i}")).await);
        }
        let by = completed(&f, &alice, &ids).await;
        by.contains(&new_name).then_some(by)
    })
    .await;
    assert!(served_by_new.contains(&new_name));

    // Past several lifetimes: the same replica holds renewed tokens and serves.
    let old = first[1].clone();
    let renewed = eventually(
        Duration::from_secs(u64::from(TTL) * 4),
        "tokens renewed past 2 lifetimes",
        || async {
            let t = token_in(&old)?;
            let exp = unverified_claims(&t)["exp"].as_i64()?;
            let issued_before = unverified_claims(&token)["exp"].as_i64()?;
            (started.elapsed() > Duration::from_secs(u64::from(TTL) * 2)
                && exp > issued_before + i64::from(TTL))
            .then_some(t)
        },
    )
    .await;
    assert_ne!(renewed, token);
    assert!(
        worker_replicas(&name, "-q").contains(&old),
        "the replica was not replaced"
    );
    let inspect = docker(&["inspect", &old]);
    assert!(
        !inspect.contains(&renewed),
        "docker inspect shows the renewed token"
    );
    // A restart of the orchestrator keeps the replicas, and the new one renews their tokens
    // (it learns them from the engine's labels, not from memory).
    let kept = worker_replicas(&name, "-q");
    stop_orchestrator(&mut f).await;
    // Read once the old one wrote its last.
    let before = token_in(&old).expect("the replica's token");
    let target = link_target(&old);
    let mut cfg = orch_config(&f.host_id);
    cfg.worker_token_ttl_seconds = TTL;
    f.orch = Some(start_orchestrator(&f.node_bus(NodeKind::Orchestrator), cfg).await);
    eventually(
        WAIT,
        "the restarted orchestrator writes a fresh token",
        || async {
            let t = token_in(&old)?;
            (unverified_claims(&t)["jti"] != unverified_claims(&before)["jti"]).then_some(())
        },
    )
    .await;
    assert_eq!(
        worker_replicas(&name, "-q"),
        kept,
        "the same replicas after the restart"
    );
    // It wrote the file not in use (it asked the engine which one is), then moved the link.
    assert_ne!(
        link_target(&old),
        target,
        "the restarted orchestrator wrote the file in use"
    );

    // Both replicas, each past a lifetime of its token (the bus closed its connection at
    // each expiry; it came back with the renewed file), still serve.
    let now: HashSet<String> = worker_replicas(&name, "-q")
        .iter()
        .map(|id| container_name(id))
        .collect();
    eventually(
        WAIT,
        "both replicas serve past their first tokens",
        || async {
            let mut ids = Vec::new();
            for i in 0..8 {
                ids.push(send(&f, &alice, &format!("sleep 1000 four-{i}")).await);
            }
            let by: HashSet<String> = completed(&f, &alice, &ids).await.into_iter().collect();
            (by == now).then_some(())
        },
    )
    .await;

    // Revoked: the replica's own token is refused by the gateway's work endpoints within a
    // second (the verifiers follow revocations live; the callout closes the replicas'
    // connections as fast: the permission node's `bus_auth` test), work in flight never
    // completes, and nothing new is served.
    let held = token_in(&old).expect("the replica's token");
    let fr = &f;
    let report = move |token: String| async move {
        // A report of no task: refused for its body (400) while the token is good.
        fr.call(
            &format!("a2a.{AGENT}.work.event"),
            json!({"taskId": "none"}),
            Some(&token),
        )
        .await
        .expect_err("not a valid report")
        .status
    };
    assert_ne!(
        report(held.clone()).await,
        401,
        "the replica's token is good"
    );
    let late = send(&f, &alice, "sleep 2000 late").await;
    eventually(WAIT, "the late task is being worked on", || async {
        a2a(&f, "get", json!({"id": late}), &alice)
            .await
            .and_then(Result::ok)
            .filter(|t| state(t) == "TASK_STATE_WORKING")
    })
    .await;
    let mut events =
        f.c.subscribe(format!("events.workers.{name}"))
            .await
            .expect("subscribe");
    f.call("agents.revoke", json!({"agent_id": AGENT}), Some(&f.op))
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    eventually(
        Duration::from_secs(1),
        "the gateway refuses the replica's token within a second of the revocation",
        || {
            let held = held.clone();
            async move { (report(held).await == 401).then_some(()) }
        },
    )
    .await;
    println!(
        "replica token refused {:?} after the revocation",
        revoked_at.elapsed()
    );
    let after = send(&f, &alice, "after").await;
    // The replicas get no more tokens, and the orchestrator says why.
    let refused = next_event(&mut events, "tether.worker.token_refused").await;
    assert!(
        refused["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{refused}"
    );
    // A bounded wait for something that must not happen: past the late task's own end, twice.
    tokio::time::sleep_until((revoked_at + Duration::from_secs(4)).into()).await;
    for id in [&late, &after] {
        let t = a2a(&f, "get", json!({"id": id}), &alice)
            .await
            .expect("the gateway answers")
            .expect("get");
        assert_ne!(
            state(&t),
            "TASK_STATE_COMPLETED",
            "a revoked agent's work completed: {t}"
        );
    }
}
