//! Warm pools (issue 18), on the real Docker engine and a real nats-server: a create that
//! matches a pool is served by a free pool container (renamed for its space, its limits
//! updated, the request's environment delivered), two spaces never get one container, a
//! restart of the orchestrator keeps exactly the free containers it had and the taken ones
//! their spaces, a taken container expires like any other, and a spec that matches no pool is
//! created as before. Runs on either exec path (the space daemon on or off).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tether_container_orchestrator::config::PoolConfig;
use tether_testkit::docker::BUSYBOX_IMAGE;

/// Bounds a hang (containers made while other tests load the engine); measures nothing.
const WAIT: Duration = Duration::from_secs(90);

fn pool_of(size: u32) -> PoolConfig {
    PoolConfig {
        image: BUSYBOX_IMAGE.into(),
        size,
        memory_mb: 128,
        ..Default::default()
    }
}

async fn pooled(size: u32) -> Fleet {
    fleet_with(true, |c| c.pool = vec![pool_of(size)]).await
}

/// The free pool containers of the test's host, from the engine (ids).
fn free(f: &Fleet) -> BTreeSet<String> {
    let out = docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label=tether.host={}", f.host_id),
        "--filter",
        "label=tether.pool",
        "--filter",
        "status=running",
        "--format",
        "{{.ID}} {{.Names}}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, n)| n.starts_with("tether-pool."))
        .map(|(id, _)| id.to_string())
        .collect()
}

/// Waits until the pool holds exactly `n` free containers, ready to be taken (the engine
/// lists them, and the node counts them free once their daemon is on the bus), and returns
/// them.
async fn pool_filled(f: &Fleet, n: usize) -> BTreeSet<String> {
    eventually(WAIT, &format!("{n} free pool containers"), || async {
        let s = free(f);
        let counted = num(&stats(f).await["pool_free"]);
        (s.len() == n && counted == n as u64).then_some(s)
    })
    .await
}

/// The pool counters in the orchestrator's `$SRV.STATS` (`containers-create` data).
async fn stats(f: &Fleet) -> Value {
    endpoint_stats(f, "containers-create").await
}

#[tokio::test]
async fn a_matching_create_is_served_from_the_pool_and_the_pool_refills() {
    let f = pooled(2).await;
    let ready = pool_filled(&f, 2).await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let info = f
        .create_space(
            &t,
            json!({"env": {"GREETING": "hi"}, "resource_limits": {"memory_mb": 64}}),
        )
        .await;
    let id = info["container_id"].as_str().expect("id").to_string();
    assert!(ready.contains(&id), "{id} is not one of the free {ready:?}");
    assert_eq!(info["space"], space.as_str(), "{info}");
    assert!(
        info["container_name"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("tether-space.{space}."))),
        "{info}"
    );
    assert_eq!(info["resource_limits"]["memory_mb"], 64, "limits updated");
    assert!(info["expires_at"].as_str().is_some_and(|e| !e.is_empty()));
    // The space's and the request's variables reach commands (through the space daemon,
    // bound at the take, when it is on: the reply came once it served).
    let daemon_before = num(&endpoint_stats(&f, "containers-exec").await["exec_daemon"]);
    let r = f
        .exec(
            &t,
            json!({"command": "echo $TETHER_SPACE $GREETING $OWN", "env": {"OWN": "x"}}),
        )
        .await
        .expect("exec");
    assert_eq!(r["stdout"], format!("{space} hi x\n"), "{r}");
    assert_eq!(r["container_id"], id.as_str());
    let daemon_after = num(&endpoint_stats(&f, "containers-exec").await["exec_daemon"]);
    let by_daemon = u64::from(tether_testkit::orchestrator::space_daemon_on());
    assert_eq!(daemon_after - daemon_before, by_daemon, "the exec's path");
    // Bound in KV, listed as the space's, and nobody else's.
    let b = f.binding(&space).await.expect("binding");
    assert_eq!(b["container_id"], id.as_str());
    let list = f
        .call("containers.list", json!({}), Some(&t))
        .await
        .expect("list");
    let listed: Vec<&str> = list["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["container_id"].as_str())
        .collect();
    assert_eq!(listed, [id.as_str()], "{list}");
    let other = f.agent(&unique("b"), &unique("s"), SCOPES).await;
    let p = f
        .exec(&other, json!({"container": id, "command": "true"}))
        .await
        .expect_err("another space's container");
    assert_eq!(p.status, 403, "{p:?}");
    let s = stats(&f).await;
    assert_eq!(num(&s["pool_hits"]), 1, "{s}");
    // With the daemon, the bind went over the bus (the fast path), not through the files.
    assert_eq!(num(&s["pool_bus_binds"]), by_daemon, "{s}");
    // The pool is filled again, without the taken one.
    let again = pool_filled(&f, 2).await;
    assert!(!again.contains(&id));
    assert!(num(&stats(&f).await["pool_refills"]) >= 3);
}

#[tokio::test]
async fn two_spaces_never_get_the_same_container() {
    let f = pooled(2).await;
    pool_filled(&f, 2).await;
    let mut agents = Vec::new();
    for _ in 0..4 {
        let space = unique("s");
        let t = f.agent(&unique("a"), &space, SCOPES).await;
        agents.push((space, t));
    }
    let infos =
        futures::future::join_all(agents.iter().map(|(_, t)| f.create_space(t, json!({})))).await;
    let ids: BTreeSet<&str> = infos
        .iter()
        .map(|i| i["container_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 4, "{infos:?}");
    for ((space, t), info) in agents.iter().zip(&infos) {
        assert_eq!(info["space"], space.as_str());
        let r = f
            .exec(t, json!({"command": "echo $TETHER_SPACE"}))
            .await
            .expect("exec");
        assert_eq!(r["stdout"], format!("{space}\n"));
        assert_eq!(r["container_id"], info["container_id"]);
    }
    let s = stats(&f).await;
    assert_eq!(num(&s["pool_hits"]) + num(&s["pool_misses"]), 4, "{s}");
    assert!(num(&s["pool_hits"]) >= 1, "{s}");
}

#[tokio::test]
async fn a_restart_keeps_the_pool_consistent() {
    let mut f = pooled(2).await;
    pool_filled(&f, 2).await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let info = f.create_space(&t, json!({"env": {"K": "v"}})).await;
    let id = info["container_id"].as_str().expect("id").to_string();
    let kept = pool_filled(&f, 2).await;
    stop_orchestrator(&mut f).await;
    let bus = f.node_bus(tether_testkit::NodeKind::Orchestrator);
    let mut cfg = orch_config(&f.host_id);
    cfg.pool = vec![pool_of(2)];
    f.orch = Some(start_orchestrator(&bus, cfg).await);
    // The new node's first fill pass has run once its stats say what is free.
    eventually(WAIT, "the restarted node's pool", || async {
        (num(&stats(&f).await["pool_free"]) == 2).then_some(())
    })
    .await;
    assert_eq!(
        free(&f),
        kept,
        "the same free containers: none lost, none added"
    );
    // The taken container is still its space's, with its environment (read back).
    let r = f
        .exec(&t, json!({"command": "echo $TETHER_SPACE $K"}))
        .await
        .expect("exec after restart");
    assert_eq!(r["stdout"], format!("{space} v\n"), "{r}");
    assert_eq!(r["container_id"], id.as_str());
    // The next create takes one of the kept containers.
    let t2 = f.agent(&unique("a"), &unique("s"), SCOPES).await;
    let info2 = f.create_space(&t2, json!({})).await;
    assert!(kept.contains(info2["container_id"].as_str().expect("id")));
}

#[tokio::test]
async fn a_taken_container_expires_like_any_other() {
    let f = pooled(1).await;
    let ready = pool_filled(&f, 1).await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let info = f
        .create_space(&t, json!({"resource_limits": {"timeout_seconds": 2}}))
        .await;
    let id = info["container_id"].as_str().expect("id").to_string();
    assert!(ready.contains(&id));
    eventually(
        WAIT,
        "the expired container removed and unbound",
        || async {
            let gone = !f.engine_containers().contains(&id);
            (gone && f.binding(&space).await.is_none()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_spec_that_matches_no_pool_is_created_as_today() {
    let f = pooled(1).await;
    let ready = pool_filled(&f, 1).await;
    let cases = [
        json!({"session_id": "sess"}),
        json!({"network_mode": "none"}),
        json!({"name": unique("mine")}),
    ];
    for extra in cases {
        let space = unique("s");
        let t = f.agent(&unique("a"), &space, SCOPES).await;
        let info = f.create_space(&t, extra.clone()).await;
        let id = info["container_id"].as_str().expect("id");
        assert!(!ready.contains(id), "{extra}: took the pool's");
        assert_eq!(info["labels"]["tether.space"], space.as_str(), "{extra}");
        assert!(info["labels"].get("tether.pool").is_none(), "{extra}");
    }
    let s = stats(&f).await;
    assert_eq!(
        (num(&s["pool_hits"]), num(&s["pool_misses"])),
        (0, 0),
        "{s}"
    );
    assert_eq!(free(&f), ready);
}

#[tokio::test]
async fn a_restarted_taken_container_gets_its_bind_file_again() {
    let f = pooled(1).await;
    let ready = pool_filled(&f, 1).await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let info = f.create_space(&t, json!({"env": {"K": "v"}})).await;
    assert!(ready.contains(info["container_id"].as_str().expect("id")));
    for op in ["containers.stop", "containers.start"] {
        f.call(op, json!({}), Some(&t))
            .await
            .unwrap_or_else(|p| panic!("{op}: {p:?}"));
    }
    // The tmpfs came back empty; the start wrote the bind file (and the token) again.
    let r = f
        .exec(&t, json!({"command": "echo $TETHER_SPACE $K", "user": "0"}))
        .await
        .expect("exec as root");
    assert_eq!(r["stdout"], format!("{space} v\n"), "{r}");
    let r = f
        .exec(
            &t,
            json!({"command": ["cat", "/run/tether/bind"], "user": "0"}),
        )
        .await
        .expect("read the bind file");
    let bind: Value = serde_json::from_str(r["stdout"].as_str().expect("out")).expect("json");
    assert_eq!(bind["space"], space.as_str());
    if tether_testkit::orchestrator::space_daemon_on() {
        eventually(WAIT, "an exec through the daemon again", || async {
            let before = num(&endpoint_stats(&f, "containers-exec").await["exec_daemon"]);
            let r = f.exec(&t, json!({"command": "echo $K"})).await.ok()?;
            let after = num(&endpoint_stats(&f, "containers-exec").await["exec_daemon"]);
            (after > before && r["stdout"] == "v\n").then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn free_containers_of_a_pool_no_longer_configured_are_removed() {
    let mut f = pooled(1).await;
    let ready = pool_filled(&f, 1).await;
    stop_orchestrator(&mut f).await;
    let bus = f.node_bus(tether_testkit::NodeKind::Orchestrator);
    f.orch = Some(start_orchestrator(&bus, orch_config(&f.host_id)).await);
    eventually(
        WAIT,
        "the unconfigured pool's container removed",
        || async {
            let gone = ready.iter().all(|id| !f.engine_containers().contains(id));
            gone.then_some(())
        },
    )
    .await;
}
