//! The orchestrator against the real Docker engine and a real nats-server: every acceptance
//! point of issue 4 (round trip, isolation between spaces, limits, bad input, events,
//! recovery, never touching what is not ours).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn echo_hello_round_trip_and_exit_codes() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let mut events =
        f.c.subscribe(format!("events.containers.{space}"))
            .await
            .expect("sub");
    let info = f.create_space(&t, json!({"workdir": "/work"})).await;
    assert_eq!(info["space"], space.as_str());
    assert_eq!(info["kind"], "space");
    assert_eq!(info["state"], "running");
    assert_eq!(info["host_id"], f.host_id.as_str());
    // Hardened: read-only root, limits always set, labels.
    assert_eq!(info["read_only_root"], true);
    assert_eq!(info["resource_limits"]["memory_mb"], 512);
    assert_eq!(info["resource_limits"]["pids_limit"], 256);
    assert_eq!(info["resource_limits"]["cpu_limit"], 1.0);
    assert_eq!(info["labels"]["tether.managed"], "true");
    assert!(
        info["labels"]["tether.expires"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let id = info["container_id"].as_str().expect("id").to_string();
    let hc = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Privileged}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}} {{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}",
        &id,
    ]);
    assert_eq!(
        hc,
        "false [ALL] [no-new-privileges:true] 256 536870912 1000000000"
    );
    let created = next_event(&mut events, "tether.container.created").await;
    assert_eq!(created["data"]["container_id"], id.as_str());
    assert_eq!(created["specversion"], "1.0");
    assert!(created["traceparent"].is_string());
    next_event(&mut events, "tether.container.started").await;

    // The binding is in KV.
    let b = f.binding(&space).await.expect("bound");
    assert_eq!(b["container_id"], id.as_str());
    assert_eq!(b["host_id"], f.host_id.as_str());

    let r = f
        .exec(&t, json!({"command": "echo hello"}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "hello\n");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["truncated"], false);

    let r = f
        .exec(&t, json!({"command": "echo oops >&2; exit 3"}))
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stderr"], "oops\n");

    // argv form, its environment, workdir, stdin, the writable workdir on a read-only root.
    let r = f
        .exec(
            &t,
            json!({"command": ["sh", "-c", "echo $TETHER_SPACE $FOO $(pwd); cat; touch /ro 2>/dev/null || echo ro; touch x && echo rw"],
                   "env": {"FOO": "bar"}, "stdin": "from-stdin\n"}),
        )
        .await
        .expect("exec");
    assert_eq!(
        r["stdout"],
        format!("{space} bar /work\nfrom-stdin\nro\nrw\n").as_str()
    );
    let r = f
        .exec(&t, json!({"command": "id -u", "user": "65534"}))
        .await
        .expect("exec as user");
    assert_eq!(r["stdout"], "65534\n");

    // inspect, list, logs, stats through the bus.
    let i = f
        .call("containers.inspect", json!({}), Some(&t))
        .await
        .expect("inspect");
    assert_eq!(i["container_id"], id.as_str());
    let l = f
        .call("containers.list", json!({}), Some(&t))
        .await
        .expect("list");
    assert_eq!(l["containers"].as_array().expect("list").len(), 1);
    let lg = f
        .call("containers.logs", json!({"tail": 10}), Some(&t))
        .await
        .expect("logs");
    assert_eq!(lg["container_id"], id.as_str());
    let st = f
        .call("containers.stats", json!({}), Some(&t))
        .await
        .expect("stats");
    assert_eq!(num(&st["memory_limit_bytes"]), 512 * 1024 * 1024);
    assert!(num(&st["pids_current"]) >= 1);
    assert_eq!(num(&st["pids_limit"]), 256);

    // Host-addressed twin.
    let r = f
        .call(
            &format!("hosts.{}.containers.exec", f.host_id),
            json!({"command": "echo twin"}),
            Some(&t),
        )
        .await
        .expect("twin");
    assert_eq!(r["stdout"], "twin\n");

    // stop, start, remove; the binding goes with the container.
    let s = f
        .call("containers.stop", json!({"grace_seconds": 5}), Some(&t))
        .await
        .expect("stop");
    assert_eq!(s["state"], "exited");
    let ex = next_event(&mut events, "tether.container.exited").await;
    assert_eq!(ex["data"]["container_id"], id.as_str());
    let s = f
        .call("containers.start", json!({}), Some(&t))
        .await
        .expect("start");
    assert_eq!(s["state"], "running");
    let rm = f
        .call("containers.remove", json!({}), Some(&t))
        .await
        .expect("remove");
    assert_eq!(rm["unbound"], true);
    next_event(&mut events, "tether.container.removed").await;
    assert!(f.binding(&space).await.is_none());
    assert!(f.engine_containers().is_empty());
}

#[tokio::test]
async fn agents_cannot_touch_another_space() {
    let f = fleet().await;
    let (sa, sb) = (unique("sa"), unique("sb"));
    let ta = f.agent(&unique("a"), &sa, SCOPES).await;
    let tb = f.agent(&unique("b"), &sb, SCOPES).await;
    f.create_space(&ta, json!({})).await;
    let b = f.create_space(&tb, json!({})).await;
    let b_id = b["container_id"].as_str().expect("id").to_string();
    let b_name = b["container_name"].as_str().expect("name").to_string();
    let before = docker(&[
        "inspect",
        "-f",
        "{{.State.StartedAt}} {{.State.Status}} {{.RestartCount}}",
        &b_id,
    ]);

    let ops = [
        ("containers.exec", json!({"command": "touch /tmp/pwned"})),
        ("containers.inspect", json!({})),
        ("containers.stop", json!({})),
        ("containers.remove", json!({})),
        ("containers.start", json!({})),
        ("containers.logs", json!({})),
        ("containers.stats", json!({})),
    ];
    let host_prefix = format!("hosts.{}.", f.host_id);
    for (subject, base) in &ops {
        for target in [
            json!({"container": b_id}),
            json!({"container": &b_id[..12]}),
            json!({"container": b_name}),
            json!({"space": sb}),
            json!({"container": b_id, "space": sa}),
        ] {
            let mut body = base.clone();
            for (k, v) in target.as_object().expect("obj") {
                body[k] = v.clone();
            }
            for s in [subject.to_string(), format!("{host_prefix}{subject}")] {
                let e = f
                    .call(&s, body.clone(), Some(&ta))
                    .await
                    .expect_err("must be refused");
                assert_eq!(e.status, 403, "{s} {body}: {e:?}");
            }
        }
    }
    // Nor can A create into B's space, nor list it.
    let e = f
        .call(
            "containers.create",
            json!({"image": f.image, "space": sb}),
            Some(&ta),
        )
        .await
        .expect_err("create in another space");
    assert_eq!(e.status, 403);
    let e = f
        .call("containers.list", json!({"space": sb}), Some(&ta))
        .await
        .expect_err("list another space");
    assert_eq!(e.status, 403);
    let l = f
        .call("containers.list", json!({}), Some(&ta))
        .await
        .expect("own list");
    assert!(
        l["containers"]
            .as_array()
            .expect("list")
            .iter()
            .all(|c| c["space"] == sa.as_str())
    );

    // B's container is untouched.
    let after = docker(&[
        "inspect",
        "-f",
        "{{.State.StartedAt}} {{.State.Status}} {{.RestartCount}}",
        &b_id,
    ]);
    assert_eq!(before, after);
    let r = f
        .exec(&tb, json!({"command": "ls /tmp/pwned 2>&1; echo ok"}))
        .await
        .expect("B execs");
    assert!(r["stdout"].as_str().expect("out").ends_with("ok\n"));
    assert!(
        !r["stdout"]
            .as_str()
            .expect("out")
            .starts_with("/tmp/pwned\n")
    );
    // An operator may act on any space.
    let r = f
        .exec(&f.op, json!({"space": sb, "command": "echo op"}))
        .await
        .expect("operator exec");
    assert_eq!(r["stdout"], "op\n");
}

/// The hog: one 64 MiB read of zeros into a buffer, so a 16 MiB container is OOM-killed at
/// once. (`head -c 200m /dev/zero | tail` grew by pipe-sized steps and, with a few at once on
/// two cores, sat at the limit, busy reclaiming, for 60–100 s before the kernel killed it.
/// Measured with `docker run -m 16m`, six at once: `dd` was killed within 2 s every time, the
/// pipeline took up to 104 s.)
const HOG: &str = "dd if=/dev/zero of=/dev/null bs=64M count=1";

#[tokio::test]
async fn memory_hog_is_oom_killed_and_reported() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let mut events =
        f.c.subscribe(format!("events.containers.{space}"))
            .await
            .expect("sub");
    f.create_space(&t, json!({"resource_limits": {"memory_mb": 16}}))
        .await;
    let r = f
        .exec(&t, json!({"command": HOG, "timeout_seconds": 60}))
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 137, "{r}");
    assert_eq!(r["oom_killed"], true, "{r}");
    assert_eq!(r["timed_out"], false);
    let ev = next_event(&mut events, "tether.container.oom").await;
    assert_eq!(ev["data"]["space"], space.as_str());
    // The node carries on, and so does the container, unless the kernel chose its main
    // process as the OOM victim (the kernel's choice, seen once in many runs): then the node
    // reports it as no longer running.
    let r = f
        .exec(&t, json!({"command": "echo alive"}))
        .await
        .expect("exec");
    if r["stdout"] != "alive\n" {
        let info = f
            .call("containers.inspect", json!({}), Some(&t))
            .await
            .expect("inspect");
        assert_ne!(
            info["state"], "running",
            "exec answered {r} in a running container"
        );
    }

    // A container whose main process is the hog: exited, OOM-killed, and said so.
    let tool = f
        .call(
            "containers.create",
            json!({"image": f.image, "kind": "tool", "command": HOG,
               "resource_limits": {"memory_mb": 16}}),
            Some(&t),
        )
        .await
        .expect("tool");
    let id = tool["container_id"].as_str().expect("id").to_string();
    // Inspect is asked once the engine has told both: its `die` and `oom` come either way
    // round.
    let ex = container_events(
        &mut events,
        &id,
        &["tether.container.exited", "tether.container.oom"],
    )
    .await
    .remove(0);
    assert_eq!(ex["data"]["exit_code"].as_f64(), Some(137.0));
    let i = f
        .call("containers.inspect", json!({"container": id}), Some(&t))
        .await
        .expect("inspect");
    assert_eq!(i["oom_killed"], true);
    assert_eq!(i["state"], "exited");
}

#[tokio::test]
async fn fork_bomb_is_held_by_the_pids_limit() {
    let f = fleet().await;
    let (s1, s2) = (unique("bomb"), unique("calm"));
    let t1 = f.agent(&unique("a"), &s1, SCOPES).await;
    let t2 = f.agent(&unique("b"), &s2, SCOPES).await;
    let bomb = f
        .create_space(&t1, json!({"resource_limits": {"pids_limit": 32}}))
        .await;
    let bomb_id = bomb["container_id"].as_str().expect("id").to_string();
    f.create_space(&t2, json!({})).await;
    let started = Instant::now();
    // Forks until the pids limit says no, the children keep every pid but one, and the
    // command stays alive (without forking) past its deadline.
    let bomb_exec = f.exec(
        &t1,
        json!({"command": "(while :; do sleep 1000 & done); exec sleep 1000", "timeout_seconds": 5, "max_output_bytes": 4096}),
    );
    let others = async {
        // While it runs (it has forked many sleeps, as the engine sees), the node serves
        // others and their containers work.
        eventually(Duration::from_secs(30), "the bomb is forking", || async {
            let top = docker(&["top", &bomb_id]);
            (top.matches("sleep 1000").count() >= 16).then_some(())
        })
        .await;
        let pids = docker(&["inspect", "-f", "{{.HostConfig.PidsLimit}}", &bomb_id]);
        assert_eq!(pids, "32");
        for _ in 0..3 {
            let r = f
                .exec(&t2, json!({"command": "echo calm"}))
                .await
                .expect("exec");
            assert_eq!(r["stdout"], "calm\n");
        }
        let cgroup_pids = docker(&["exec", &bomb_id, "cat", "/sys/fs/cgroup/pids/pids.current"]);
        if let Ok(n) = cgroup_pids.parse::<u32>() {
            assert!(n <= 32, "pids held at the limit: {n}");
        }
        f.call("containers.list", json!({}), Some(&t2))
            .await
            .expect("list");
    };
    let (r, ()) = tokio::join!(bomb_exec, others);
    let r = r.expect("bomb exec answered");
    assert_eq!(r["timed_out"], true, "{r}");
    assert!(
        r["stderr"].as_str().expect("stderr").contains("can't fork"),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(45));
    // The bomb is gone from its container: only init, the idle loop and ps are left.
    eventually(Duration::from_secs(30), "bomb processes gone", || async {
        let r = f
            .exec(&t1, json!({"command": "ps -o pid,comm | wc -l"}))
            .await
            .ok()?;
        let n: u32 = r["stdout"].as_str()?.trim().parse().ok()?;
        // header + docker-init + sh + sleep + exec sh + ps + wc
        (n <= 8).then_some(())
    })
    .await;
}

#[tokio::test]
async fn timeout_kills_the_process_tree_and_output_is_capped() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    f.create_space(&t, json!({})).await;

    let started = Instant::now();
    let r = f
        .exec(
            &t,
            json!({"command": "echo before; sleep 101 & env -i sleep 102 & sleep 100", "timeout_seconds": 2}),
        )
        .await
        .expect("exec");
    let took = started.elapsed();
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["stdout"], "before\n", "output made so far");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "about 2 s: {took:?}"
    );
    assert_eq!(r["exit_code"], 137);
    eventually(Duration::from_secs(5), "sleeps gone", || async {
        let r = f.exec(&t, json!({"command": "ps -o args"})).await.ok()?;
        let ps = r["stdout"].as_str()?.to_string();
        (!ps.contains("sleep 10")).then_some(())
    })
    .await;

    // 100 MB of output: at most the cap, and said so.
    let r = f
        .exec(
            &t,
            json!({"command": "head -c 100000000 /dev/zero | tr '\\0' a; echo done >&2", "max_output_bytes": 65536, "timeout_seconds": 120}),
        )
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["truncated"], true);
    let out = r["stdout"].as_str().expect("stdout").len() + r["stderr"].as_str().expect("e").len();
    assert!(out <= 65536, "{out}");
    assert_eq!(num(&r["output_bytes"]), 100_000_005);
    // The default cap holds too, and binary output still fits one reply.
    let r = f
        .exec(&t, json!({"command": "head -c 3000000 /dev/zero"}))
        .await
        .expect("exec");
    assert_eq!(r["truncated"], true);
    assert!(r["stdout"].as_str().expect("stdout").len() <= 256 * 1024);
}

#[tokio::test]
async fn streamed_output_arrives_in_order() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    f.create_space(&t, json!({})).await;
    let inbox = f.c.new_inbox();
    let mut sub = f.c.subscribe(inbox.clone()).await.expect("sub");
    let r = f
        .exec(
            &t,
            json!({"command": "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done; echo err >&2",
                   "stream": true, "stream_subject": inbox}),
        )
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "line1\nline2\nline3\nline4\nline5\n");
    let s = read_stream(&mut sub).await;
    assert_eq!(s.exit_code, "0");
    assert_eq!(s.stdout, "line1\nline2\nline3\nline4\nline5\n");
    assert!(
        s.seqs.windows(2).all(|w| w[1] == w[0] + 1) && s.seqs[0] == 1,
        "{:?}",
        s.seqs
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_creates_nothing() {
    // What `validate` refuses is unit-tested (node/tests.rs, spec/tests.rs,
    // tools/prepare.rs, relics.rs); here, refusals that need the engine, KV or the bus, and
    // that none of them leaves anything behind.
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let tools = f
        .agent(
            &unique("t"),
            &space,
            &["tools:run", "relics:write", "containers:read"],
        )
        .await;
    let reader = f.agent(&unique("r"), &space, &["containers:read"]).await;
    let before = f.engine_containers();
    let networks = engine_networks(&f.host_id);
    let img = f.image.clone();
    let name = unique("bad");
    let e = f
        .call(
            "containers.create",
            json!({"image": "tether-test/no-such-image:latest", "name": name}),
            Some(&t),
        )
        .await
        .expect_err("refused");
    assert_eq!(e.status, 422, "{e:?}");
    assert!(e.detail.contains("no-such-image"), "{e:?}");
    // A request that validates, refused by what the engine, KV or the bus says.
    for (subject, body, status, word) in [
        (
            "tools.execute",
            json!({"tool_name": "t", "image": "tether-test/none-such:1", "command": "true"}),
            422,
            "not on host",
        ),
        (
            "tools.get",
            json!({"execution_id": "0123456789abcdef"}),
            404,
            "no execution",
        ),
        (
            "relics.get",
            json!({"session_id": "nosuch", "relic_name": "web"}),
            404,
            "no session",
        ),
        (
            "sessions.cleanup",
            json!({"session_id": "nosuch"}),
            404,
            "no session",
        ),
    ] {
        let e = f
            .call(subject, body.clone(), Some(&tools))
            .await
            .expect_err("refused");
        assert_eq!(e.status, status, "{subject} {body}: {e:?}");
        assert!(e.detail.contains(word), "{subject} {body}: {e:?}");
    }
    // Unknown containers and spaces without one.
    for (subject, body) in [
        (
            "containers.exec",
            json!({"container": "no-such-container", "command": "true"}),
        ),
        (
            "containers.inspect",
            json!({"container": "no-such-container"}),
        ),
        ("containers.stop", json!({"container": "no-such-container"})),
        (
            "containers.remove",
            json!({"container": "no-such-container"}),
        ),
        ("containers.exec", json!({"command": "true"})),
    ] {
        let e = f
            .call(subject, body.clone(), Some(&t))
            .await
            .expect_err("404");
        assert_eq!(e.status, 404, "{subject} {body}: {e:?}");
    }
    f.create_space(&t, json!({})).await;
    let made = f.engine_containers();
    assert_eq!(made.len(), before.len() + 1);
    // A bad exec on a space that has a container runs nothing.
    let e = f
        .exec(&t, json!({"command": "true", "timeout_seconds": -1}))
        .await
        .expect_err("refused");
    assert_eq!(e.status, 400, "{e:?}");
    // No token, wrong scope, a second space container.
    let e = f
        .call("containers.create", "{}", None)
        .await
        .expect_err("401");
    assert_eq!(e.status, 401);
    let e = f
        .call("containers.create", json!({"image": img}), Some(&reader))
        .await
        .expect_err("403");
    assert_eq!(e.status, 403);
    let e = f
        .call("containers.exec", json!({"command": "true"}), Some(&reader))
        .await
        .expect_err("403");
    assert_eq!(e.status, 403);
    let e = f
        .call(
            "tools.execute",
            json!({"tool_name": "t", "image": img, "command": "true"}),
            Some(&reader),
        )
        .await
        .expect_err("403");
    assert_eq!(e.status, 403);
    let e = f
        .call("containers.create", json!({"image": img}), Some(&t))
        .await
        .expect_err("one per space");
    assert_eq!(e.status, 409);
    // A refused create is refused whole: one bad field, nothing made.
    let e = f
        .call(
            "containers.create",
            json!({"image": img, "space": unique("s"), "name": name, "mounts": [{"source": "/etc", "target": "/x"}]}),
            Some(&f.op),
        )
        .await
        .expect_err("403");
    assert_eq!(e.status, 403);
    // Nothing else was created on the engine.
    assert_eq!(f.engine_containers(), made);
    assert_eq!(engine_networks(&f.host_id), networks);
    assert!(docker(&["ps", "-aq", "--filter", &format!("name={name}")]).is_empty());
}

fn engine_networks(host_id: &str) -> Vec<String> {
    let l = format!("label=tether.host={host_id}");
    let mut v: Vec<String> = docker(&["network", "ls", "-q", "--filter", &l])
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn container_removed_behind_its_back_is_unbound() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let mut events =
        f.c.subscribe(format!("events.containers.{space}"))
            .await
            .expect("sub");
    let info = f.create_space(&t, json!({})).await;
    let id = info["container_id"].as_str().expect("id").to_string();
    docker(&["rm", "-f", &id]);
    let ev = next_event(&mut events, "tether.container.removed").await;
    assert_eq!(ev["data"]["container_id"], id.as_str());
    eventually(Duration::from_secs(10), "binding dropped", || async {
        f.binding(&space).await.is_none().then_some(())
    })
    .await;
    let e = f
        .exec(&t, json!({"command": "true"}))
        .await
        .expect_err("gone");
    assert_eq!(e.status, 404);
    // The space can have a new container.
    f.create_space(&t, json!({})).await;
}

#[tokio::test]
async fn expired_containers_are_removed_by_the_janitor() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    f.create_space(&t, json!({"resource_limits": {"timeout_seconds": 2}}))
        .await;
    let keep = f
        .call(
            "containers.create",
            json!({"image": f.image, "kind": "tool", "command": "sleep 600"}),
            Some(&t),
        )
        .await
        .expect("tool");
    eventually(
        Duration::from_secs(15),
        "expired container removed",
        || async { (f.engine_containers().len() == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        f.engine_containers(),
        vec![keep["container_id"].as_str().expect("id").to_string()]
    );
    eventually(Duration::from_secs(5), "binding dropped", || async {
        f.binding(&space).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn unmanaged_containers_are_never_listed_nor_touched() {
    let mut f = fleet_with(true, |c| {
        c.unbound_policy = tether_container_orchestrator::config::UnboundPolicy::Remove;
        c.reconcile_grace_seconds = 0;
    })
    .await;
    let plain = unique("plain");
    let other_host = unique("elsewhere");
    f.engine.name(plain.clone());
    f.engine.name(other_host.clone());
    let run = |name: &str, labels: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name];
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.extend([f.image.as_str(), "sleep", "600"]);
        docker(&args)
    };
    let plain_id = run(&plain, &[]);
    let other_label = format!("tether.host={}-x", f.host_id);
    let other_id = run(
        &other_host,
        &[
            "tether.managed=true",
            "tether.kind=space",
            "tether.space=zzz",
            &other_label,
        ],
    );
    assert!(!plain_id.is_empty() && !other_id.is_empty());
    let l = f
        .call("containers.list", json!({}), Some(&f.op))
        .await
        .expect("list");
    assert!(l["containers"].as_array().expect("list").is_empty(), "{l}");
    for name in [&plain, &other_host] {
        for (subject, body) in [
            ("containers.inspect", json!({"container": name})),
            (
                "containers.exec",
                json!({"container": name, "command": "touch /tmp/x"}),
            ),
            ("containers.stop", json!({"container": name})),
            ("containers.remove", json!({"container": name})),
            ("containers.logs", json!({"container": name})),
        ] {
            let e = f
                .call(subject, body, Some(&f.op))
                .await
                .expect_err("not ours");
            assert_eq!(e.status, 404, "{subject} {name}");
        }
    }
    // Two janitor passes (remove policy, no grace) later, both still run, untouched.
    janitor_pass(&f).await;
    janitor_pass(&f).await;
    for id in [&plain_id, &other_id] {
        assert_eq!(
            docker(&["inspect", "-f", "{{.State.Running}} {{.RestartCount}}", id]),
            "true 0"
        );
        let ls = docker(&["exec", id, "ls", "/tmp"]);
        assert!(ls.is_empty(), "{ls}");
    }
}

#[tokio::test]
async fn host_addressed_twins_and_forwarding() {
    let mut f = fleet().await;
    let other = unique("t2");
    f.clean_label(host_label(&other));
    let _second = start_orchestrator(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        orch_config(&other),
    )
    .await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    // Created on the second host, addressed.
    let info = f
        .call(
            &format!("hosts.{other}.containers.create"),
            json!({"image": f.image}),
            Some(&t),
        )
        .await
        .expect("create on host 2");
    assert_eq!(info["host_id"], other.as_str());
    // The shared subject reaches it from either node (forwarded when needed).
    for i in 0..8 {
        let r = f
            .exec(&t, json!({"command": format!("echo {i}")}))
            .await
            .expect("exec via shared subject");
        assert_eq!(r["stdout"], format!("{i}\n").as_str());
    }
    // The first host neither lists nor serves it when addressed itself.
    let e = f
        .call(
            &format!("hosts.{}.containers.exec", f.host_id),
            json!({"command": "true"}),
            Some(&t),
        )
        .await
        .expect_err("bound elsewhere");
    assert_eq!(e.status, 409);
    let l = f
        .call(
            &format!("hosts.{}.containers.list", f.host_id),
            json!({}),
            Some(&f.op),
        )
        .await
        .expect("list");
    assert!(l["containers"].as_array().expect("list").is_empty());
    // One container per space across hosts.
    let e = f
        .call(
            &format!("hosts.{}.containers.create", f.host_id),
            json!({"image": f.image}),
            Some(&t),
        )
        .await
        .expect_err("space bound on host 2");
    assert_eq!(e.status, 409);
}

#[tokio::test]
async fn sigkill_restart_keeps_bindings_and_leaves_no_orphans() {
    let f = fleet_with(false, |_| {}).await;
    let mut node = spawn_node(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        &f.host_id,
        None,
        &[],
    );
    wait_up(&f, &f.host_id).await;
    let (s1, s2, s3) = (unique("keep"), unique("gone"), unique("adopt"));
    let t1 = f.agent(&unique("a"), &s1, SCOPES).await;
    let t2 = f.agent(&unique("b"), &s2, SCOPES).await;
    let t3 = f.agent(&unique("c"), &s3, SCOPES).await;
    let c1 = f.create_space(&t1, json!({})).await;
    let c2 = f.create_space(&t2, json!({})).await;
    let c3 = f.create_space(&t3, json!({})).await;

    // Mid-work: an exec with a 4 s deadline is running when the node dies.
    let inflight = {
        let c = f.c.clone();
        let t = t1.clone();
        tokio::spawn(async move {
            let _ = call(
                &c,
                "containers.exec",
                json!({"command": "sleep 300", "timeout_seconds": 4}),
                Some(&t),
            )
            .await;
        })
    };
    eventually(Duration::from_secs(10), "sleep running", || async {
        let ps = docker(&["exec", c1["container_id"].as_str()?, "ps", "-o", "args"]);
        ps.contains("sleep 300").then_some(())
    })
    .await;
    let _ = node.0.kill(); // SIGKILL
    let _ = node.0.wait();
    inflight.abort();

    // While it is down: one container vanishes, one binding is lost.
    docker(&["rm", "-f", c2["container_id"].as_str().expect("id")]);
    let js = async_nats::jetstream::new(f.c.clone());
    js.get_key_value("tether_spaces")
        .await
        .expect("bucket")
        .delete(&s3)
        .await
        .expect("delete binding");

    let _node = spawn_node(
        &f.nats.node_bus(tether_testkit::NodeKind::Orchestrator),
        &f.host_id,
        None,
        &[],
    );
    wait_up(&f, &f.host_id).await;
    // Every binding whose container lives is still (or again) there; the vanished one is not.
    let b1 = f.binding(&s1).await.expect("s1 still bound");
    assert_eq!(b1["container_id"], c1["container_id"]);
    let b3 = eventually(Duration::from_secs(15), "s3 adopted", || async {
        f.binding(&s3).await
    })
    .await;
    assert_eq!(b3["container_id"], c3["container_id"]);
    assert_eq!(b3["bound_by"], "reconcile");
    eventually(Duration::from_secs(10), "s2 unbound", || async {
        f.binding(&s2).await.is_none().then_some(())
    })
    .await;
    // Exec works again.
    let r = f
        .exec(&t1, json!({"command": "echo back"}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "back\n");
    let r = f
        .exec(&t3, json!({"command": "echo adopted"}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "adopted\n");
    // The exec orphaned by the crash is killed once its deadline passes.
    eventually(Duration::from_secs(15), "orphaned exec reaped", || async {
        let r = f.exec(&t1, json!({"command": "ps -o args"})).await.ok()?;
        (!r["stdout"].as_str()?.contains("sleep 300")).then_some(())
    })
    .await;
    // No orphan: the engine's managed containers are exactly the bound ones.
    let mut bound = vec![
        c1["container_id"].as_str().expect("id").to_string(),
        c3["container_id"].as_str().expect("id").to_string(),
    ];
    bound.sort();
    assert_eq!(f.engine_containers(), bound);
}
