//! The orchestrator on a real 3-node JetStream cluster (R3 buckets and streams), given the
//! whole server list: SIGKILL the server it is connected to while async tool jobs run and
//! execs loop. It serves again through another server, every job acknowledged before the kill
//! completes once with its own result, and the killed server comes back into the cluster.
//!
//! The failover gap is measured and printed here, with a generous bound (the machine may be
//! busy); the 2 s target is judged by `cargo bench -p tether-container-orchestrator --bench
//! failover` on the median of several kills.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tether_testkit::cluster::wait_connected_elsewhere;
use tether_testkit::docker::{Cleanup, busybox_image, host_label};
use tether_testkit::{ClusterFleet, NodeKind, eventually, exec_ok, orchestrator, unique};

const JOBS: usize = 40;
/// A bound on the failover gap that only a hang crosses (the target is 2 s).
const GAP_BOUND: Duration = Duration::from_secs(15);
/// One exec attempt; a lost or late one is asked again.
const EXEC_WAIT: Duration = Duration::from_secs(2);
const SCOPES: &[&str] = &[
    "containers:write",
    "containers:exec",
    "containers:read",
    "tools:run",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_fails_over_and_loses_no_acknowledged_job() {
    let mut f = ClusterFleet::start(3).await.expect("cluster");
    let image = busybox_image().expect("test image");
    let host = unique("cl");
    let mut engine = Cleanup::default();
    engine.label(host_label(&host));

    // The orchestrator, in-process, on its own client (to see which server it is on).
    let bus = f.cluster.node_bus(NodeKind::Orchestrator);
    let client = tether_bus::connect::connect(
        &bus,
        tether_container_orchestrator::NAME,
        &Default::default(),
    )
    .await
    .expect("connect");
    let mut cfg = orchestrator::config(&host);
    cfg.kv_replicas = 3;
    let orch = tether_container_orchestrator::build(&bus, cfg, &client)
        .await
        .expect("build")
        .start_with_client(bus.clone(), client.clone())
        .await
        .expect("start");

    let t = f.agent(&unique("a"), &unique("s"), SCOPES).await;
    tether_testkit::call(&f.c, "containers.create", json!({"image": image}), Some(&t))
        .await
        .expect("space container");
    eventually(
        Duration::from_secs(60),
        "an exec before the kill",
        || async { exec_ok(&f.c, &t, EXEC_WAIT).await.then_some(()) },
    )
    .await;

    // Jobs acknowledged ("queued") before the kill.
    let job = |i: usize| {
        json!({"tool_name": "echo-i", "session_id": "failover", "image": image, "async": true,
               "command": "sleep 1; echo \"{\\\"i\\\": $I}\"", "parameters": {"i": i}})
    };
    let queued: Vec<Value> = futures::stream::iter(0..JOBS)
        .map(|i| tether_testkit::call(&f.c, "tools.execute", job(i), Some(&t)))
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|r| r.expect("job queued"))
        .collect();
    let ids: Vec<String> = queued
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "queued", "{r}");
            r["execution_id"].as_str().expect("id").to_string()
        })
        .collect();

    // Kill the orchestrator's server while jobs run.
    let port = client.server_info().port;
    let victim = f
        .cluster
        .member_on(port)
        .expect("the orchestrator's server");
    eventually(Duration::from_secs(60), "a job running", || async {
        let r = tether_testkit::poll(&f.c, "tools.get", json!({"execution_id": ids[0]}), Some(&t))
            .await?;
        (r["status"] != "queued").then_some(())
    })
    .await;
    let killed = Instant::now();
    f.cluster.members[victim].kill().await;

    // Execs work again through another server.
    let gap = eventually(GAP_BOUND, "an exec served after the kill", || async {
        exec_ok(&f.c, &t, EXEC_WAIT).await.then(|| killed.elapsed())
    })
    .await;
    let now_on = wait_connected_elsewhere(&client, port).await;
    println!(
        "failover: exec served again {:.0} ms after SIGKILL of member {victim}; orchestrator now on port {now_on}",
        gap.as_secs_f64() * 1e3
    );

    // Every acknowledged job completes once, with its own result.
    for (i, id) in ids.iter().enumerate() {
        let r = eventually(Duration::from_secs(180), "every job completes", || async {
            let r = tether_testkit::poll(&f.c, "tools.get", json!({"execution_id": id}), Some(&t))
                .await?;
            matches!(r["status"].as_str(), Some("completed" | "failed")).then_some(r)
        })
        .await;
        assert_eq!(r["status"], "completed", "job {i}: {r}");
        assert_eq!(
            r["result"],
            json!({"i": i}),
            "job {i} has its own result: {r}"
        );
    }

    // The server comes back and rejoins: through it alone, the R3 bucket's peers are current.
    f.cluster.members[victim]
        .restart()
        .await
        .expect("restart the killed member");
    let alone = f.cluster.members[victim]
        .client()
        .await
        .expect("connect to it");
    let js = async_nats::jetstream::new(alone);
    // Generous: a restarted 2.10 member catches up under the load of a whole CI run (60 s was
    // once not enough); this bounds a hang, it measures nothing.
    eventually(Duration::from_secs(150), "the member rejoins", || async {
        let mut s = js.get_stream("KV_tether_spaces").await.ok()?;
        let info = s.info().await.ok()?;
        let c = info.cluster.as_ref()?;
        let replicas_current = c.replicas.iter().all(|r| r.current);
        (c.leader.is_some() && c.replicas.len() == 2 && replicas_current).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "an exec after the rejoin",
        || async { exec_ok(&f.c, &t, EXEC_WAIT).await.then_some(()) },
    )
    .await;

    orch.shutdown().await.expect("orchestrator stops");
    f.perm.take();
    engine.run();
}
