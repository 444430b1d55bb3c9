//! Worker deployments (issue 17, item 1) on the real engine and a real nats-server: replicas
//! kept alive through a `docker kill` and a SIGKILL of the orchestrator (no duplicate, no
//! orphan), scaled, rolled one at a time on a spec change, removed; bad input refused with
//! nothing changed; exited replicas replaced with a growing backoff, or left as `restart`
//! says. Every wait is on an event or the engine's state, under a deadline.

mod common;

use std::time::Duration;

use common::*;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tether_testkit::NodeKind;

/// A replica that stays up and stops on SIGTERM.
fn command() -> Value {
    json!([
        "sh",
        "-c",
        "trap 'exit 0' TERM INT; while :; do sleep 1; done"
    ])
}

fn running(name: &str) -> Vec<String> {
    worker_replicas(name, "-q")
}

fn all(name: &str) -> Vec<String> {
    worker_replicas(name, "-aq")
}

fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, id])
}

/// The worker events of a deployment, in order.
struct Events(async_nats::Subscriber);

impl Events {
    async fn new(f: &Fleet, name: &str) -> Events {
        Events(
            f.c.subscribe(format!("events.workers.{name}"))
                .await
                .expect("subscribe"),
        )
    }

    /// The next worker event about replicas, within 60 s. Token refusals are skipped: the
    /// credentials of replicas are `worker_a2a.rs`'s subject.
    async fn next(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), self.0.next())
                .await
                .expect("a worker event within 60 s")
                .expect("subscription open");
            let v: Value = serde_json::from_slice(&m.payload).expect("event json");
            assert_eq!(v["specversion"], "1.0", "{v}");
            if v["type"] != "tether.worker.token_refused" {
                return v;
            }
        }
    }

    /// The data of the next events, which must be `actions` in this order.
    async fn expect(&mut self, actions: &[&str]) -> Vec<Value> {
        let mut out = Vec::new();
        for a in actions {
            let e = self.next().await;
            assert_eq!(e["type"], format!("tether.worker.{a}"), "{e}");
            out.push(e["data"].clone());
        }
        out
    }
}

/// Registers each of `ids` in space `workers`, marked `workers:hosted`: `workers.deploy`
/// refuses any other agent.
async fn hosted(f: &Fleet, ids: &[&str]) {
    for id in ids {
        f.agent(id, "workers", &["workers:hosted"]).await;
    }
}

async fn deploy(f: &Fleet, body: Value) -> Result<Value, Problem> {
    f.call("workers.deploy", body, Some(&f.op)).await
}

async fn scale(f: &Fleet, name: &str, replicas: u32) -> Result<Value, Problem> {
    f.call(
        "workers.scale",
        json!({"name": name, "replicas": replicas}),
        Some(&f.op),
    )
    .await
}

#[tokio::test]
async fn replicas_are_kept_through_kills_restarts_scaling_and_rolls() {
    let f = fleet_with(false, |_| {}).await;
    hosted(&f, &["echo-bot"]).await;
    let bus = f.nats.node_bus(NodeKind::Orchestrator);
    let mut node = spawn_node(&bus, &f.host_id, None, &[]);
    wait_up(&f, &f.host_id).await;
    let name = unique("w");
    let mut events = Events::new(&f, &name).await;
    let spec = json!({
        "name": name, "agent_id": "echo-bot", "image": f.image, "command": command(),
        "env": {"MODE": "a"}, "replicas": 2, "max_replicas": 4,
    });

    // Two replicas, each announced, both on this host and hardened like every container.
    let r = deploy(&f, spec.clone()).await.expect("deploy");
    assert_eq!(r["changed"], true, "{r}");
    let d = &r["deployment"];
    assert_eq!(d["generation"], 1, "{r}");
    assert_eq!(d["spec"]["profile"], "default");
    assert_eq!(d["slots"].as_array().expect("slots").len(), 2);
    let made = events.expect(&["created", "created"]).await;
    let mut first: Vec<String> = made
        .iter()
        .map(|e| e["container_id"].as_str().expect("id").to_string())
        .collect();
    first.sort();
    assert_eq!(running(&name), first);
    let c = &first[0];
    assert_eq!(inspect(c, "{{.HostConfig.CapDrop}}"), "[ALL]");
    assert_eq!(inspect(c, "{{.HostConfig.ReadonlyRootfs}}"), "true");
    assert_eq!(
        inspect(c, "{{.HostConfig.SecurityOpt}}"),
        "[no-new-privileges:true]"
    );
    assert_eq!(inspect(c, "{{.HostConfig.PidsLimit}}"), "256");
    assert_eq!(
        inspect(c, "{{.HostConfig.Memory}}"),
        (512u64 << 20).to_string()
    );
    assert_eq!(inspect(c, "{{.HostConfig.Privileged}}"), "false");
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"tether.managed\"}}"),
        "true"
    );
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"tether.expires\"}}"),
        ""
    );

    // The same spec again changes nothing.
    let r = deploy(&f, spec.clone()).await.expect("deploy again");
    assert_eq!(r["changed"], false, "{r}");
    assert_eq!(r["deployment"]["generation"], 1);

    // A killed replica is replaced (and the other one kept).
    docker(&["kill", &first[0]]);
    let e = &events.expect(&["replaced"]).await[0];
    assert_eq!(e["replaced_container_id"], first[0].as_str(), "{e}");
    assert!(
        e["reason"].as_str().expect("reason").contains("exited"),
        "{e}"
    );
    let new = e["container_id"].as_str().expect("id").to_string();
    let mut now = vec![first[1].clone(), new];
    now.sort();
    eventually(Duration::from_secs(30), "the dead replica gone", || async {
        (all(&name).len() == 2).then_some(())
    })
    .await;
    assert_eq!(running(&name), now);

    // SIGKILL the orchestrator; while it is down, a surplus replica appears (slot 7).
    let _ = node.0.kill();
    let _ = node.0.wait();
    let surplus_id = run_labelled(
        &f,
        &unique("surplus"),
        &[
            "tether.kind=worker".to_string(),
            format!("tether.worker={name}"),
            "tether.replica=7".to_string(),
            "tether.generation=1".to_string(),
        ],
    );
    let _node = spawn_node(&bus, &f.host_id, None, &[]);
    // The restarted node removes the surplus one and keeps the two: no duplicate, no orphan.
    let e = &events.expect(&["removed"]).await[0];
    assert_eq!(e["container_id"], surplus_id.as_str(), "{e}");
    assert_eq!(e["reason"], "scaled down");
    assert_eq!(running(&name), now);
    assert_eq!(all(&name).len(), 2);

    // Scale to 3, then to 1 (slot 0 stays).
    let r = scale(&f, &name, 3).await.expect("scale 3");
    assert_eq!(r["changed"], true);
    let e = &events.expect(&["created"]).await[0];
    assert_eq!(e["index"].as_f64(), Some(2.0), "{e}");
    assert_eq!(running(&name).len(), 3);
    let slot0 = inspect_slot(&name, 0);
    scale(&f, &name, 1).await.expect("scale 1");
    let gone = events.expect(&["removed", "removed"]).await;
    for e in &gone {
        assert_eq!(e["reason"], "scaled down", "{e}");
    }
    eventually(Duration::from_secs(30), "one replica left", || async {
        (all(&name).len() == 1).then_some(())
    })
    .await;
    assert_eq!(running(&name), vec![slot0.clone()]);
    // Beyond `max_replicas`: refused, nothing changed.
    let p = scale(&f, &name, 5).await.expect_err("above max");
    assert_eq!(p.status, 400, "{p:?}");
    assert_eq!(running(&name), vec![slot0.clone()]);
    scale(&f, &name, 2).await.expect("scale 2");
    let e = &events.expect(&["created"]).await[0];
    assert_eq!(e["index"].as_f64(), Some(1.0), "{e}");
    let before = running(&name);
    let roll_started = chrono::Utc::now().timestamp() - 1;

    // A changed spec rolls the replicas one at a time: each new one made before its old one
    // goes.
    let mut changed = spec.clone();
    changed["env"] = json!({"MODE": "b"});
    let r = deploy(&f, changed).await.expect("deploy changed");
    assert_eq!(r["changed"], true);
    assert_eq!(r["deployment"]["generation"], 2);
    let roll = events
        .expect(&["created", "replaced", "created", "replaced"])
        .await;
    for (i, e) in roll.iter().enumerate() {
        let slot = if i < 2 { 0.0 } else { 1.0 };
        assert_eq!(e["index"].as_f64(), Some(slot), "{e}");
        assert_eq!(e["generation"].as_f64(), Some(2.0), "{e}");
    }
    assert_eq!(roll[0]["container_id"], roll[1]["container_id"]);
    assert!(
        before.contains(
            &roll[1]["replaced_container_id"]
                .as_str()
                .expect("old")
                .to_string()
        )
    );
    eventually(Duration::from_secs(30), "two new replicas", || async {
        let r = running(&name);
        (r.len() == 2 && all(&name).len() == 2 && r.iter().all(|c| !before.contains(c)))
            .then_some(())
    })
    .await;
    // The old ones were stopped, not killed: they ran their SIGTERM trap (exit 0).
    let until = (chrono::Utc::now().timestamp() + 1).to_string();
    let died = docker(&[
        "events",
        "--since",
        &roll_started.to_string(),
        "--until",
        &until,
        "--filter",
        &format!("label=tether.worker={name}"),
        "--filter",
        "event=die",
        "--format",
        "{{.Actor.ID}} {{index .Actor.Attributes \"exitCode\"}}",
    ]);
    for old in &before {
        assert!(
            died.contains(&format!("{old} 0")),
            "{old} not stopped: {died}"
        );
    }
    for c in running(&name) {
        assert!(inspect(&c, "{{.Config.Env}}").contains("MODE=b"), "{c}");
        assert_eq!(
            inspect(&c, "{{index .Config.Labels \"tether.generation\"}}"),
            "2"
        );
    }

    // workers.get and workers.list see it; remove takes every replica away.
    let g = f
        .call("workers.get", json!({"name": name}), Some(&f.op))
        .await
        .expect("get");
    assert_eq!(g["replicas"].as_array().expect("replicas").len(), 2, "{g}");
    let l = f
        .call("workers.list", json!({}), Some(&f.op))
        .await
        .expect("list");
    assert!(
        l["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["deployment"]["spec"]["name"] == name.as_str()),
        "{l}"
    );
    f.call("workers.remove", json!({"name": name}), Some(&f.op))
        .await
        .expect("remove");
    let gone = events.expect(&["removed", "removed"]).await;
    for e in &gone {
        assert_eq!(e["reason"], "deployment removed", "{e}");
    }
    eventually(Duration::from_secs(30), "no replica left", || async {
        all(&name).is_empty().then_some(())
    })
    .await;
    let p = f
        .call("workers.get", json!({"name": name}), Some(&f.op))
        .await
        .expect_err("removed");
    assert_eq!(p.status, 404);
}

/// The running replica of slot `index`.
fn inspect_slot(name: &str, index: u32) -> String {
    running(name)
        .into_iter()
        .find(|c| inspect(c, "{{index .Config.Labels \"tether.replica\"}}") == index.to_string())
        .unwrap_or_else(|| panic!("no replica of slot {index}"))
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let f = fleet().await;
    hosted(&f, &["bot", "other-bot"]).await;
    let name = unique("w");
    let good = json!({
        "name": name, "agent_id": "bot", "image": f.image, "command": command(), "replicas": 1,
    });
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("name", json!("")), 400, "`name` is required"),
        (with("name", json!("Bad_Name!")), 400, "`name`"),
        (with("agent_id", json!("")), 400, "`agent_id`"),
        (
            json!({"name": name, "agent_id": "bot", "image": f.image, "replicas": 5, "max_replicas": 2}),
            400,
            "`replicas`",
        ),
        (with("max_replicas", json!(1000)), 400, "`max_replicas`"),
        (
            with("image", json!("tether-test/no-such-image:1")),
            422,
            "not on host",
        ),
        (with("profile", json!("coder")), 422, "unknown profile"),
        (with("restart", json!("sometimes")), 400, "`restart`"),
        // Scaling settings need a scaled deployment (a `max_replicas` above the minimum).
        (
            with("target_backlog_per_replica", json!(8)),
            400,
            "`min_replicas` < `max_replicas`",
        ),
        (
            with("env", json!({"TETHER_NATS_URL": "nats://elsewhere"})),
            400,
            "TETHER_",
        ),
        (with("imgae", json!("x")), 400, "imgae"),
    ];
    for (body, status, needle) in &cases {
        let p = deploy(&f, body.clone()).await.expect_err(&body.to_string());
        assert_eq!(p.status, *status, "{body}: {p:?}");
        assert!(p.detail.contains(needle), "{needle:?} not in {p:?}");
    }
    // Operators only: an agent with every container scope is refused.
    let agent = f.agent(&unique("a"), &unique("s"), SCOPES).await;
    for subject in [
        "workers.deploy",
        "workers.list",
        "workers.get",
        "workers.scale",
        "workers.remove",
    ] {
        let p = f
            .call(subject, good.clone(), Some(&agent))
            .await
            .expect_err(subject);
        assert_eq!(p.status, 403, "{subject}: {p:?}");
    }
    nothing_deployed(&f).await;

    // A good one; then another agent under its name, or a replica count beyond its bounds,
    // is refused and leaves it as it was.
    let mut events = Events::new(&f, &name).await;
    deploy(&f, good.clone()).await.expect("deploy");
    let replica = events.expect(&["created"]).await[0]["container_id"]
        .as_str()
        .expect("id")
        .to_string();
    let p = deploy(&f, with("agent_id", json!("other-bot")))
        .await
        .expect_err("another agent");
    assert_eq!(p.status, 409, "{p:?}");
    let p = scale(&f, &name, 2).await.expect_err("above max");
    assert_eq!(p.status, 400, "{p:?}");
    let p = scale(&f, "no-such-worker", 1).await.expect_err("unknown");
    assert_eq!(p.status, 404, "{p:?}");
    let g = f
        .call("workers.get", json!({"name": name}), Some(&f.op))
        .await
        .expect("get");
    assert_eq!(g["deployment"]["generation"], 1, "{g}");
    assert_eq!(g["deployment"]["spec"]["agent_id"], "bot");
    assert_eq!(g["deployment"]["spec"]["replicas"], 1);
    assert_eq!(running(&name), vec![replica.clone()]);
    // A replica is in no space: an agent cannot reach it through `containers.*`, nor make one.
    let p = f
        .exec(&agent, json!({"container": replica, "command": "true"}))
        .await
        .expect_err("exec in a replica");
    assert_eq!(p.status, 403, "{p:?}");
    let p = f
        .call(
            "containers.create",
            json!({"image": f.image, "kind": "worker"}),
            Some(&agent),
        )
        .await
        .expect_err("a worker by containers.create");
    assert_eq!(p.status, 400, "{p:?}");
    f.call("workers.remove", json!({"name": name}), Some(&f.op))
        .await
        .expect("remove");
    events.expect(&["removed"]).await;
    eventually(Duration::from_secs(30), "no replica left", || async {
        all(&name).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_spread_over_hosts_and_leave_a_host_that_is_gone() {
    // Host A in-process, host B a process; B is counted out 1.5 s after its last beat.
    let (beat, dead) = (300u64, 1500u64);
    let mut f = fleet_with(true, |c| {
        c.host_heartbeat_ms = beat;
        c.host_dead_after_ms = dead;
    })
    .await;
    hosted(&f, &["bot"]).await;
    let a = f.host_id.clone();
    let b = unique("b");
    f.clean_label(host_label(&b));
    let bus = f.nats.node_bus(NodeKind::Orchestrator);
    let (beat, dead) = (beat.to_string(), dead.to_string());
    let env = [
        ("TETHER_HOST_HEARTBEAT_MS", beat.as_str()),
        ("TETHER_HOST_DEAD_AFTER_MS", dead.as_str()),
    ];
    let mut node_b = spawn_node(&bus, &b, None, &env);
    wait_up(&f, &b).await;
    wait_live(&f, &a, &b, true).await;
    wait_live(&f, &b, &a, true).await;

    // Two replicas: one on each host, whichever got the deploy.
    let name = unique("w");
    let mut events = Events::new(&f, &name).await;
    let r = deploy(
        &f,
        json!({"name": name, "agent_id": "bot", "image": f.image, "command": command(), "replicas": 2}),
    )
    .await
    .expect("deploy");
    let mut hosts: Vec<String> = r["deployment"]["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["host_id"].as_str().expect("host").to_string())
        .collect();
    hosts.sort();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(hosts, both, "{r}");
    let made = events.expect(&["created", "created"]).await;
    let mut made_on: Vec<String> = made
        .iter()
        .map(|e| e["host_id"].as_str().expect("host").to_string())
        .collect();
    made_on.sort();
    assert_eq!(made_on, both);
    assert_eq!(host_containers(&a).len(), 1);
    let on_b = host_containers(&b);
    assert_eq!(on_b.len(), 1);
    // The shared subject gathers every host's replicas; a host subject answers its own.
    let hosts_of = |g: &Value| {
        let mut h: Vec<String> = g["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| r["host_id"].as_str().expect("host").to_string())
            .collect();
        h.sort();
        h
    };
    for _ in 0..3 {
        let g = f
            .call("workers.get", json!({"name": name}), Some(&f.op))
            .await
            .expect("get");
        assert_eq!(hosts_of(&g), both, "{g}");
        let l = f
            .call("workers.list", json!({}), Some(&f.op))
            .await
            .expect("list");
        assert_eq!(hosts_of(&l["workers"][0]), both, "{l}");
    }
    let g = f
        .call(
            &format!("hosts.{b}.workers.get"),
            json!({"name": name}),
            Some(&f.op),
        )
        .await
        .expect("get on B");
    assert_eq!(hosts_of(&g), vec![b.clone()], "{g}");

    // B dies: its slot moves to A, which makes the replica.
    let _ = node_b.0.kill(); // SIGKILL
    let _ = node_b.0.wait();
    let e = &events.expect(&["created"]).await[0];
    assert_eq!(e["host_id"], a.as_str(), "{e}");
    assert_eq!(host_containers(&a).len(), 2);
    let g = f
        .call(
            &format!("hosts.{a}.workers.get"),
            json!({"name": name}),
            Some(&f.op),
        )
        .await
        .expect("get");
    assert!(
        g["deployment"]["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .all(|s| s["host_id"] == a.as_str()),
        "{g}"
    );
    assert_eq!(g["replicas"].as_array().expect("replicas").len(), 2, "{g}");

    // B comes back and removes the replica it no longer holds.
    let _node_b = spawn_node(&bus, &b, None, &env);
    let e = &events.expect(&["removed"]).await[0];
    assert_eq!(e["host_id"], b.as_str(), "{e}");
    assert_eq!(e["container_id"], on_b[0].as_str(), "{e}");
    assert!(
        e["reason"]
            .as_str()
            .expect("reason")
            .contains(&format!("slot moved to host `{a}`")),
        "{e}"
    );
    eventually(Duration::from_secs(30), "B's replica gone", || async {
        host_containers(&b).is_empty().then_some(())
    })
    .await;
    assert_eq!(running(&name).len(), 2);
}

#[tokio::test]
async fn exited_replicas_are_replaced_with_backoff_as_restart_says() {
    let f = fleet().await;
    hosted(&f, &["bot"]).await;
    let (crashing, clean) = (unique("crash"), unique("clean"));
    let mut crashes = Events::new(&f, &crashing).await;
    let mut cleans = Events::new(&f, &clean).await;
    // One that exits 0 under `on-failure` first: it is made once and left exited.
    deploy(
        &f,
        json!({"name": clean, "agent_id": "bot", "image": f.image, "command": "exit 0", "restart": "on-failure"}),
    )
    .await
    .expect("deploy clean");
    cleans.expect(&["created"]).await;
    // One that keeps failing under `always`: replaced, each time after a longer pause.
    deploy(
        &f,
        json!({"name": crashing, "agent_id": "bot", "image": f.image, "command": "exit 3"}),
    )
    .await
    .expect("deploy crashing");
    crashes.expect(&["created"]).await;
    let mut at = Vec::new();
    for _ in 0..3 {
        let e = &crashes.expect(&["replaced"]).await[0];
        assert_eq!(e["reason"], "exited with code 3", "{e}");
        at.push(std::time::Instant::now());
    }
    // 0.5 s, 1 s, 2 s at least (less what delivery jitter takes off).
    assert!(
        at[1] - at[0] >= Duration::from_millis(800),
        "{:?}",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] >= Duration::from_millis(1800),
        "{:?}",
        at[2] - at[1]
    );
    // Every pass meanwhile left the clean exit alone.
    let g = f
        .call("workers.get", json!({"name": clean}), Some(&f.op))
        .await
        .expect("get");
    let r = g["replicas"].as_array().expect("replicas");
    assert_eq!(r.len(), 1, "{g}");
    assert_eq!(r[0]["state"], "exited", "{g}");
    // No replica event for the clean exit (token refusals aside: its agent is not registered).
    while let Some(Some(m)) = cleans.0.next().now_or_never() {
        let v: Value = serde_json::from_slice(&m.payload).expect("event json");
        assert_eq!(
            v["type"], "tether.worker.token_refused",
            "no event for the clean exit: {v}"
        );
    }
}

/// `workers.deploy` of an agent the permission node would never give a replica's token to:
/// not registered (404), registered without `workers:hosted` (422), revoked (422). Each is
/// refused with the reason and leaves no key in the bucket and no container.
#[tokio::test]
async fn an_agent_that_may_not_be_hosted_is_refused_and_nothing_is_made() {
    let f = fleet().await;
    let plain = unique("plain");
    f.agent(&plain, "workers", &["a2a:serve"]).await;
    let gone = unique("gone");
    hosted(&f, &[gone.as_str()]).await;
    f.call("agents.revoke", json!({"agent_id": gone}), Some(&f.op))
        .await
        .expect("revoke");
    let ghost = unique("ghost");
    let cases = [
        (ghost.as_str(), 404, format!("no agent `{ghost}`")),
        (
            plain.as_str(),
            422,
            "is not registered with `workers:hosted`".to_string(),
        ),
        (gone.as_str(), 422, format!("agent `{gone}` is revoked")),
    ];
    let kv = async_nats::jetstream::new(f.c.clone())
        .get_key_value("tether_workers")
        .await
        .expect("the deployments bucket (made at start)");
    for (agent, status, needle) in &cases {
        let name = unique("w");
        let body = json!({
            "name": name, "agent_id": agent, "image": f.image, "command": command(), "replicas": 2,
        });
        let p = deploy(&f, body).await.expect_err(agent);
        assert_eq!(p.status, *status, "{agent}: {p:?}");
        assert!(
            p.detail.contains(needle.as_str()),
            "{needle:?} not in {p:?}"
        );
        let p = f
            .call("workers.get", json!({"name": name}), Some(&f.op))
            .await
            .expect_err("no deployment");
        assert_eq!(p.status, 404, "{p:?}");
        let entry = kv.entry(name.as_str()).await.expect("kv read");
        assert!(entry.is_none(), "{name} stored: {entry:?}");
        assert!(all(&name).is_empty(), "{name}: a container was made");
    }
    assert!(f.engine_containers().is_empty(), "nothing made");
}
