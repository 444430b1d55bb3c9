//! Tool runs against the real Docker engine and a real nats-server (issue 5): results,
//! failures and deadlines, bad input, async jobs on two orchestrator processes with one
//! SIGKILLed mid-run, idempotency keys, cancel.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tether_testkit::NodeKind;

pub const TOOL_SCOPES: &[&str] = &["tools:run", "relics:write", "containers:read"];

fn tool(image: &str, command: &str) -> Value {
    json!({"tool_name": "t", "image": image, "command": command})
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

#[tokio::test]
async fn sync_runs_report_result_failure_and_timeout_and_leave_nothing() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, TOOL_SCOPES).await;

    // Parameters as variables and as one document; the last JSON line is the result.
    let r = f
        .call(
            "tools.execute",
            with(
                tool(
                    &f.image,
                    r#"echo working; echo "$TETHER_PARAMETERS" >&2; echo "{\"sum\": $((A + B))}""#,
                ),
                json!({"parameters": {"a": 1, "b": 2}, "session_id": "sess1"}),
            ),
            Some(&t),
        )
        .await
        .expect("execute");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["result"], json!({"sum": 3}));
    assert_eq!(r["stdout"], "working\n{\"sum\": 3}\n");
    assert_eq!(r["stderr"], "{\"a\":1,\"b\":2}\n");
    assert_eq!(r["session_id"], "sess1");
    assert_eq!(r["space"], space.as_str());
    let id = r["execution_id"].as_str().expect("id").to_string();
    assert!(f.engine_containers().is_empty(), "the container is removed");
    // Any replica can read it back.
    let g = f
        .call("tools.get", json!({"execution_id": id}), Some(&t))
        .await
        .expect("get");
    assert_eq!(g["result"], json!({"sum": 3}));
    assert_eq!(g["status"], "completed");
    let l = f
        .call("tools.logs", json!({"execution_id": id}), Some(&t))
        .await
        .expect("logs");
    assert_eq!(l["stdout"], "working\n{\"sum\": 3}\n");

    // Its own failure: exit 3 with its stderr; exit 124 is a failure too, not a timeout.
    let r = f
        .call(
            "tools.execute",
            tool(&f.image, "echo bad input >&2; exit 3"),
            Some(&t),
        )
        .await
        .expect("execute");
    assert_eq!(r["status"], "failed");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stderr"], "bad input\n");
    assert!(r["result"].is_null());
    assert!(
        r["result_note"]
            .as_str()
            .is_some_and(|n| n.contains("no result")),
        "{r}"
    );
    let r = f
        .call("tools.execute", tool(&f.image, "exit 124"), Some(&t))
        .await
        .expect("execute");
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(124))
    );

    // Past its deadline: killed, `timed_out`, in about its timeout.
    let started = Instant::now();
    let r = f
        .call(
            "tools.execute",
            with(
                tool(&f.image, "echo before; sleep 60"),
                json!({"resource_limits": {"timeout_seconds": 2}}),
            ),
            Some(&t),
        )
        .await
        .expect("execute");
    let took = started.elapsed();
    assert_eq!(r["status"], "timed_out", "{r}");
    assert_eq!(r["stdout"], "before\n");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert!(
        f.engine_containers().is_empty(),
        "the timed-out container is removed"
    );

    // What it used: sampled while it ran.
    let r = f.call(
        "tools.execute",
        tool(
            &f.image,
            // Busy for three seconds of wall time, so sampling sees it even on a loaded engine.
            "end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done; echo '{\"n\": 1}'",
        ),
        Some(&t),
    )
    .await
    .expect("execute");
    assert_eq!(r["status"], "completed");
    let u = &r["resource_usage"];
    assert!(num(&u["samples"]) >= 1, "{u}");
    assert!(num(&u["cpu_time_ms"]) > 0, "{u}");
    assert!(num(&u["peak_memory_bytes"]) > 0, "{u}");

    // A result too big to return twice (as the line and parsed: protobuf keeps a double per
    // number) still completes, once, with its output; the parsed result gives way, with a note.
    let r = f
        .call(
            "tools.execute",
            with(
                tool(
                    &f.image,
                    "printf '['; yes '1,' | head -n 100000 | tr -d '\\n'; echo '1]'",
                ),
                json!({"max_output_bytes": 900_000}),
            ),
            Some(&t),
        )
        .await
        .expect("a big result");
    assert_eq!(r["status"], "completed", "{}", r["detail"]);
    assert!(r["result"].is_null());
    assert!(
        r["result_note"]
            .as_str()
            .is_some_and(|n| n.contains("too large")),
        "{}",
        r["result_note"]
    );
    let out = r["stdout"].as_str().expect("stdout");
    assert!(
        out.starts_with("[1,1,") && out.ends_with(",1]\n"),
        "{}",
        out.len()
    );
    let g = f
        .call(
            "tools.get",
            json!({"execution_id": r["execution_id"]}),
            Some(&t),
        )
        .await
        .expect("get");
    assert_eq!(g["stdout"], r["stdout"]);

    // cleanup: false keeps the container (labelled for the janitor).
    let r = f
        .call(
            "tools.execute",
            with(tool(&f.image, "true"), json!({"cleanup": false})),
            Some(&t),
        )
        .await
        .expect("execute");
    let kept = r["container_id"].as_str().expect("container").to_string();
    assert_eq!(f.engine_containers(), vec![kept.clone()]);
    docker(&["rm", "-f", &kept]);

    // Another space's run does not exist for this agent.
    let other = f.agent(&unique("b"), &unique("s"), TOOL_SCOPES).await;
    let e = f
        .call("tools.get", json!({"execution_id": id}), Some(&other))
        .await
        .expect_err("other space");
    assert_eq!(e.status, 404);
}

/// Counts a finishing event per execution id.
fn record(m: async_nats::Message, finished: &mut HashMap<String, usize>) {
    let v: Value = serde_json::from_slice(&m.payload).expect("event");
    let ty = v["type"].as_str().unwrap_or_default().to_string();
    if ty != "tether.tool.queued" && ty != "tether.tool.running" {
        *finished
            .entry(
                v["data"]["execution_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default() += 1;
        assert_eq!(ty, "tether.tool.completed", "{v}");
    }
}

/// Orchestrator processes of the job tests: short ack wait (a dead worker is noticed in
/// seconds), more workers than the default.
fn spawn_worker(bus: &tether_bus::BusConfig, host_id: &str, config: &std::path::Path) -> Child {
    spawn_node(
        bus,
        host_id,
        Some(config),
        &[
            ("TETHER_TOOL_JOB_ACK_WAIT_SECONDS", "3"),
            ("TETHER_TOOL_WORKERS", "6"),
        ],
    )
}

/// The tool container on host `h` once there is one, and the execution it runs. Asked again
/// until both are known: a `docker` command can fail on a loaded engine, and an empty
/// execution id would make every later `tools.get` a 400.
async fn tool_container(h: &str) -> (String, String) {
    eventually(Duration::from_secs(30), "tool running", || async {
        host_containers(h).into_iter().find_map(|c| {
            let execution = docker(&[
                "inspect",
                "-f",
                "{{index .Config.Labels \"tether.execution\"}}",
                &c,
            ]);
            (!execution.is_empty()).then_some((c, execution))
        })
    })
    .await
}

#[tokio::test]
async fn async_jobs_run_once_on_two_replicas_through_a_sigkill() {
    const N: usize = 200;
    let mut f = fleet_with(false, |_| {}).await;
    let (ha, hb) = (unique("ha"), unique("hb"));
    f.clean_label(host_label(&ha));
    f.clean_label(host_label(&hb));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    // Containers run as root without capabilities: the file must be writable by anyone.
    std::fs::write(data.join("runs"), "").expect("runs file");
    std::process::Command::new("chmod")
        .args(["-R", "a+rwx", data.to_str().expect("path")])
        .status()
        .expect("chmod");
    let config = dir.path().join("tether.toml");
    std::fs::write(
        &config,
        format!(
            "allowed_mounts = [{{ path = \"{}\", writable = true }}]\n",
            data.display()
        ),
    )
    .expect("config");
    let mut a = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &ha, &config);
    let _b = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &hb, &config);
    wait_up(&f, &ha).await;
    wait_up(&f, &hb).await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, TOOL_SCOPES).await;
    let mut events = f.c.subscribe("events.tools.>").await.expect("sub");

    // Each run appends its execution id to a shared file: a second run of a job shows as a
    // second line.
    let job = |i: usize| {
        json!({
            "tool_name": "count", "session_id": "jobs", "image": f.image, "async": true,
            "command": "sleep 0.4; echo $TETHER_EXECUTION_ID >> /data/runs; echo \"{\\\"i\\\": $I}\"",
            "parameters": {"i": i},
            "mounts": [{"source": data.display().to_string(), "target": "/data", "writable": true}],
        })
    };
    let submitted = Instant::now();
    let mut ids = Vec::with_capacity(N);
    let replies = futures::stream::iter(0..N)
        .map(|i| f.call("tools.execute", job(i), Some(&t)))
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
    for r in replies {
        let r = r.expect("submit");
        assert_eq!(r["status"], "queued");
        ids.push(r["execution_id"].as_str().expect("id").to_string());
    }
    // The same idempotency key twice: one execution.
    let keyed = with(job(N), json!({"idempotency_key": "once-only"}));
    let k1 = f
        .call("tools.execute", keyed.clone(), Some(&t))
        .await
        .expect("keyed");
    let k2 = f
        .call("tools.execute", keyed, Some(&t))
        .await
        .expect("keyed again");
    assert_eq!(k1["execution_id"], k2["execution_id"]);
    assert_eq!(k2["duplicate"], true);
    ids.push(k1["execution_id"].as_str().expect("id").to_string());

    // SIGKILL replica A once a good part is done, while it has runs going.
    let mut finished: HashMap<String, usize> = HashMap::new();
    while finished.len() < N / 3 {
        let m = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("progress")
            .expect("sub open");
        record(m, &mut finished);
    }
    let running_on_a = host_containers(&ha).len();
    let _ = a.0.kill();
    let _ = a.0.wait();
    // Every job completes, once. Events are at-most-once: one the killed replica had not yet
    // sent when it died is lost with it, while its record says `completed`. So the wait ends
    // when every job has its completion event or, once events stop coming, a completed record.
    let until = Instant::now() + Duration::from_secs(150);
    let without_event = loop {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
            record(m, &mut finished);
        }
        let mut missing = 0;
        for id in ids.iter().filter(|id| !finished.contains_key(*id)) {
            let r = f
                .poll("tools.get", json!({"execution_id": id}), Some(&t))
                .await;
            if !r.is_some_and(|r| r["status"] == "completed") {
                missing += 1;
            }
        }
        if missing == 0 {
            break ids.len() - finished.len();
        }
        assert!(
            Instant::now() < until,
            "only {} of {} jobs finished",
            ids.len() - missing,
            ids.len()
        );
    };
    let elapsed = submitted.elapsed();
    let mut redelivered = 0;
    for id in &ids {
        // Never two completions of one job (the records and the runs file say it ran once).
        assert!(
            finished.get(id).copied().unwrap_or(0) <= 1,
            "one completion of {id}"
        );
        let r = f
            .call("tools.get", json!({"execution_id": id}), Some(&t))
            .await
            .expect("get");
        assert_eq!(r["status"], "completed", "{r}");
        if r["attempt"].as_u64().unwrap_or(0) > 1 {
            redelivered += 1;
        }
    }
    if running_on_a > 0 {
        assert!(
            redelivered > 0,
            "the killed replica's jobs were run again elsewhere"
        );
    }
    let runs = std::fs::read_to_string(data.join("runs")).expect("runs");
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for l in runs.lines() {
        *per_id.entry(l).or_default() += 1;
    }
    let dup: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "jobs ran twice: {dup:?}");
    assert_eq!(per_id.len(), ids.len(), "every job ran");
    // The killed replica's half-made containers were adopted or removed.
    eventually(
        Duration::from_secs(20),
        "no tool container left",
        || async {
            (host_containers(&ha).is_empty() && host_containers(&hb).is_empty()).then_some(())
        },
    )
    .await;
    eprintln!(
        "{} jobs in {elapsed:?} on 2 replicas ({running_on_a} containers on A when it was killed, {redelivered} redelivered, {without_event} completion events lost with A)",
        ids.len()
    );

    // A comes back; a running job is cancelled from whichever replica gets the request.
    let _a = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &ha, &config);
    wait_up(&f, &ha).await;
    let r = f
        .call(
            "tools.execute",
            with(tool(&f.image, "sleep 120"), json!({"async": true})),
            Some(&t),
        )
        .await
        .expect("submit");
    let id = r["execution_id"].as_str().expect("id").to_string();
    eventually(Duration::from_secs(30), "job running", || async {
        let r = f
            .poll("tools.get", json!({"execution_id": id}), Some(&t))
            .await?;
        (r["status"] == "running" && r["container_id"] != "").then_some(())
    })
    .await;
    let r = f
        .call("tools.cancel", json!({"execution_id": id}), Some(&t))
        .await
        .expect("cancel");
    assert_eq!(r["status"], "cancelled", "{r}");
    let e = f
        .call("tools.cancel", json!({"execution_id": id}), Some(&t))
        .await
        .expect_err("finished");
    assert_eq!(e.status, 409);
    eventually(
        Duration::from_secs(20),
        "cancelled container removed",
        || async {
            (host_containers(&ha).is_empty() && host_containers(&hb).is_empty()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_sync_run_whose_node_died_is_finished_by_the_next_one() {
    let mut f = fleet_with(false, |_| {}).await;
    let h = unique("hs");
    f.clean_label(host_label(&h));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "").expect("config");
    let mut node = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &h, &config);
    wait_up(&f, &h).await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;

    // A sync run whose caller waits; its node is SIGKILLed while the tool runs.
    let (c, tok, image) = (f.c.clone(), t.clone(), f.image.clone());
    let caller = tokio::spawn(async move {
        call(
            &c,
            "tools.execute",
            with(
                tool(&image, "echo partial; sleep 60"),
                json!({"resource_limits": {"timeout_seconds": 2}}),
            ),
            Some(&tok),
        )
        .await
    });
    let (container, execution) = tool_container(&h).await;
    // Killed once the tool really runs (it printed), not between its container's create and
    // start: that is another case (a run that never started), with another outcome.
    eventually(Duration::from_secs(30), "tool printed", || async {
        docker(&["logs", &container])
            .contains("partial")
            .then_some(())
    })
    .await;
    let _ = node.0.kill();
    let _ = node.0.wait();
    // Its caller would wait out its own timeout; it is not what this test is about.
    caller.abort();
    // No node serves while it is down: no responders, once the server has seen the killed
    // connection close (a request routed to it just before gets no answer at all).
    eventually(Duration::from_secs(30), "no node serves", || async {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            f.call("tools.get", json!({"execution_id": execution}), Some(&t)),
        )
        .await;
        matches!(r, Ok(Err(Problem { status: 503, .. }))).then_some(())
    })
    .await;

    // The node comes back (a new instance, the same host): its janitor adopts the container,
    // which its deadline stops, and records the run as timed out, with what the tool printed,
    // and removes the container.
    let _node = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &h, &config);
    wait_up(&f, &h).await;
    // A bound on a hang, generous: the engine may be busy with the other tests' containers.
    let r = eventually(
        Duration::from_secs(180),
        "abandoned run finished",
        || async {
            let r = f
                .poll("tools.get", json!({"execution_id": execution}), Some(&t))
                .await?;
            (r["status"] != "running").then_some(r)
        },
    )
    .await;
    assert_eq!(r["status"], "timed_out", "{r}");
    assert!(
        r["detail"].as_str().is_some_and(|d| d.contains("stopped")),
        "{r}"
    );
    assert_eq!(r["stdout"], "partial\n", "{r}");
    eventually(Duration::from_secs(30), "container removed", || async {
        host_containers(&h).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_no_host_can_run_is_recorded_failed_on_its_last_delivery() {
    // The node that takes submissions runs no jobs; the worker comes later.
    let mut f = fleet_with(true, |c| c.tool_workers = 0).await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;
    // An image that is there at submission and gone by the time a worker takes the job.
    let gone = format!("tether-test/gone:{}", unique("i"));
    docker(&["tag", &f.image, &gone]);
    let r = f
        .call(
            "tools.execute",
            with(tool(&gone, "true"), json!({"async": true})),
            Some(&t),
        )
        .await
        .expect("submit");
    assert_eq!(r["status"], "queued");
    let id = r["execution_id"].as_str().expect("id").to_string();
    docker(&["rmi", &gone]);

    let w = unique("w");
    f.clean_label(host_label(&w));
    let mut cfg = orch_config(&w);
    cfg.tool_job_max_deliver = 3;
    let worker = start_orchestrator(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        cfg,
    )
    .await;
    // Left for another host twice, then failed for good: not `running` until the TTL.
    let r = eventually(Duration::from_secs(60), "job given up", || async {
        let r = f
            .poll("tools.get", json!({"execution_id": id}), Some(&t))
            .await?;
        is_final(&r).then_some(r)
    })
    .await;
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["attempt"], 3, "{r}");
    assert!(
        r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not on host") && d.contains(&w)),
        "{r}"
    );
    assert!(host_containers(&w).is_empty());
    worker.shutdown().await.expect("shutdown");
}

fn is_final(r: &Value) -> bool {
    !matches!(r["status"].as_str(), Some("queued" | "running"))
}

#[tokio::test]
async fn a_job_that_finished_while_its_worker_was_dead_is_adopted_by_its_outcome() {
    let mut f = fleet_with(false, |_| {}).await;
    let (ha, hb) = (unique("ha"), unique("hb"));
    f.clean_label(host_label(&ha));
    f.clean_label(host_label(&hb));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "").expect("config");
    // A longer ack wait than the other job tests: the redelivery must come well after the
    // deadline, and the tool must end well before it, even on a loaded engine.
    let worker = |h: &str| {
        spawn_node(
            &f.nats.node_bus(NodeKind::Orchestrator),
            h,
            Some(&config),
            &[("TETHER_TOOL_JOB_ACK_WAIT_SECONDS", "6")],
        )
    };
    let mut a = worker(&ha);
    wait_up(&f, &ha).await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;
    // Exits well before its 3 s deadline; its worker is SIGKILLed while it runs, and the job
    // comes back (ack wait 6 s) only after the deadline has passed.
    let r = f
        .call(
            "tools.execute",
            with(
                tool(&f.image, "sleep 1; echo '{\"ok\": 1}'"),
                json!({"async": true, "resource_limits": {"timeout_seconds": 3}}),
            ),
            Some(&t),
        )
        .await
        .expect("submit");
    let id = r["execution_id"].as_str().expect("id").to_string();
    eventually(Duration::from_secs(30), "tool running", || async {
        host_containers(&ha).into_iter().next()
    })
    .await;
    let _ = a.0.kill();
    let _ = a.0.wait();
    let _b = worker(&hb);
    let r = eventually(Duration::from_secs(60), "job finished", || async {
        let r = f
            .poll("tools.get", json!({"execution_id": id}), Some(&t))
            .await?;
        is_final(&r).then_some(r)
    })
    .await;
    // What the tool did decides, not the clock of the attempt that adopted it.
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["result"], json!({"ok": 1}), "{r}");
    assert_eq!(r["attempt"], 2, "{r}");
    assert_eq!(r["stdout"], "{\"ok\": 1}\n");
    eventually(Duration::from_secs(20), "container removed", || async {
        host_containers(&ha).is_empty().then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Issue 13: resource usage of short runs, sync runs adopted after a SIGKILL, job retries
// de-duplicated across a server restart.

#[tokio::test]
async fn a_second_long_run_reports_its_usage_sampled_from_the_start() {
    let f = fleet().await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;
    // Busy for about a second of wall time, then a result: the kind of run that reported
    // `samples: 0` when the engine's stats came late. Three at once, so the engine is busy
    // with more than one of them; and one busy until its deadline kills it.
    let busy = "sleep 1 & while kill -0 $! 2>/dev/null; do :; done; echo '{\"n\": 1}'";
    let run = |body: Value| f.call("tools.execute", body, Some(&t));
    let (a, b, c, killed) = tokio::join!(
        run(tool(&f.image, busy)),
        run(tool(&f.image, busy)),
        run(tool(&f.image, busy)),
        run(with(
            tool(&f.image, "while :; do :; done"),
            json!({"resource_limits": {"timeout_seconds": 1}}),
        )),
    );
    for r in [a, b, c] {
        let r = r.expect("execute");
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["result"], json!({"n": 1}), "{r}");
        let u = &r["resource_usage"];
        // Sampled from the start, several times a second, whatever the engine's stats
        // collector is doing: a second-long run has several samples.
        assert!(num(&u["samples"]) >= 3, "{u}");
        assert!(num(&u["cpu_time_ms"]) > 0, "{u}");
        assert!(num(&u["peak_memory_bytes"]) > 0, "{u}");
    }
    // Killed at its deadline: read once more before the kill.
    let r = killed.expect("execute");
    assert_eq!(r["status"], "timed_out", "{r}");
    let u = &r["resource_usage"];
    assert!(num(&u["samples"]) >= 1, "{u}");
    assert!(num(&u["cpu_time_ms"]) > 0, "{u}");
    assert!(num(&u["peak_memory_bytes"]) > 0, "{u}");
    assert!(
        f.engine_containers().is_empty(),
        "the containers are removed"
    );
}

#[tokio::test]
async fn a_sync_run_whose_node_was_killed_is_adopted_by_the_restarted_node() {
    let mut f = fleet_with(false, |_| {}).await;
    let h = unique("hk");
    f.clean_label(host_label(&h));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "").expect("config");
    let mut node = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &h, &config);
    wait_up(&f, &h).await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;

    // A sync run of a few seconds, well inside its deadline (30 s).
    const TOOL_SECONDS: u64 = 10;
    let (c, tok, image) = (f.c.clone(), t.clone(), f.image.clone());
    let caller = tokio::spawn(async move {
        call(
            &c,
            "tools.execute",
            with(
                tool(
                    &image,
                    &format!("echo started; sleep {TOOL_SECONDS}; echo '{{\"done\": 1}}'"),
                ),
                json!({"resource_limits": {"timeout_seconds": 30}}),
            ),
            Some(&tok),
        )
        .await
    });
    let (container, execution) = tool_container(&h).await;
    // Killed once the tool really runs (it printed), not between its container's create and
    // start: a run that never started is recorded failed (see the janitor), not adopted. The
    // node notes the container in the record before it starts it, so the record names it now.
    // (Not polled for: on a loaded machine a `tools.get` round can outlast the whole run.)
    eventually(Duration::from_secs(30), "tool printed", || async {
        docker(&["logs", &container])
            .contains("started")
            .then_some(())
    })
    .await;
    let _ = node.0.kill();
    let _ = node.0.wait();
    let killed = Instant::now();
    caller.abort();

    // Restarted at once: the new instance adopts the container and records what the tool
    // did as soon as it ends — not `running` until the deadline, then `failed`.
    let _node = spawn_worker(&f.nats.node_bus(NodeKind::Orchestrator), &h, &config);
    wait_up(&f, &h).await;
    let r = eventually(
        Duration::from_secs(TOOL_SECONDS + 50),
        "adopted run finished",
        || async {
            let r = f
                .poll("tools.get", json!({"execution_id": execution}), Some(&t))
                .await?;
            is_final(&r).then_some(r)
        },
    )
    .await;
    eprintln!("finished {:?} after the kill: {r}", killed.elapsed());
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(r["result"], json!({"done": 1}), "{r}");
    assert_eq!(r["stdout"], "started\n{\"done\": 1}\n", "{r}");
    assert_eq!(r["attempt"], 2, "{r}");
    eventually(Duration::from_secs(30), "container removed", || async {
        host_containers(&h).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_publish_retried_after_a_server_restart_is_deduplicated_and_runs_once() {
    let mut f = fleet().await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;
    // The job as it goes to the stream, to publish it again as a retrying publisher would.
    let mut jobs = f.c.subscribe("jobs.tools.>").await.expect("sub");
    let r = f
        .call(
            "tools.execute",
            with(tool(&f.image, "echo '{\"ok\": 1}'"), json!({"async": true})),
            Some(&t),
        )
        .await
        .expect("submit");
    let id = r["execution_id"].as_str().expect("id").to_string();
    let sent = tokio::time::timeout(Duration::from_secs(10), jobs.next())
        .await
        .expect("job published")
        .expect("sub open");
    let headers = sent.headers.clone().expect("headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(id.as_str())
    );
    let c = f.c.clone();
    let get = || async {
        call(&c, "tools.get", json!({"execution_id": id}), Some(&t))
            .await
            .ok()
    };
    let done = eventually(Duration::from_secs(60), "job finished", || async {
        get().await.filter(is_final)
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");

    // The server restarts (same store); the publisher retries within the duplicate window.
    f.nats.restart().await.expect("restart");
    let js = async_nats::jetstream::new(f.c.clone());
    let ack = eventually(Duration::from_secs(30), "retry acknowledged", || async {
        js.publish_with_headers(
            sent.subject.to_string(),
            headers.clone(),
            sent.payload.clone(),
        )
        .await
        .ok()?
        .await
        .ok()
    })
    .await;
    assert!(
        ack.duplicate,
        "the retry is known as a duplicate after the restart: {ack:?}"
    );
    let mut stream = js.get_stream("TETHER_TOOL_JOBS").await.expect("stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 1, "one job in the stream: {info:?}");
    // It ran once: the record is the first run's, untouched.
    let r = eventually(Duration::from_secs(30), "orchestrator back", get).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["attempt"], 1, "{r}");
    assert_eq!(r["finished_at"], done["finished_at"], "{r}");
}

#[tokio::test]
async fn a_job_stream_made_as_a_work_queue_is_kept_and_still_runs_jobs() {
    // An earlier version made the stream as a work queue; the server refuses to change a
    // stream's retention, and the node starts with the stream as it is (and says so).
    let mut f = fleet_with(false, |_| {}).await;
    let js = async_nats::jetstream::new(f.c.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TETHER_TOOL_JOBS".into(),
        subjects: vec!["jobs.tools.>".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .expect("a work-queue stream");
    let h = unique("wq");
    f.clean_label(host_label(&h));
    let node = start_orchestrator(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        orch_config(&h),
    )
    .await;
    let t = f.agent(&unique("a"), &unique("s"), TOOL_SCOPES).await;
    let r = f
        .call(
            "tools.execute",
            with(tool(&f.image, "echo '{\"ok\": 1}'"), json!({"async": true})),
            Some(&t),
        )
        .await
        .expect("submit");
    let id = r["execution_id"].as_str().expect("id").to_string();
    let r = eventually(Duration::from_secs(60), "job finished", || async {
        let r = f
            .poll("tools.get", json!({"execution_id": id}), Some(&t))
            .await?;
        is_final(&r).then_some(r)
    })
    .await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["result"], json!({"ok": 1}), "{r}");
    let mut stream = js.get_stream("TETHER_TOOL_JOBS").await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    node.shutdown().await.expect("shutdown");
}
