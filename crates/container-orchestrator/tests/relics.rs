//! Relics and sessions against the real Docker engine (issue 5): health checks from inside
//! the session network, reachability from the same session only, unhealthy relics removed,
//! `sessions.cleanup` and the janitor leaving no container and no network behind.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const SCOPES: &[&str] = &["tools:run", "relics:write", "containers:read"];

fn by_labels(what: &[&str], labels: &[(&str, &str)]) -> Vec<String> {
    let mut args: Vec<String> = what.iter().map(|s| s.to_string()).collect();
    for (k, v) in labels {
        args.push("--filter".into());
        args.push(format!("label={k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args).lines().map(str::to_string).collect()
}

fn session_containers(host: &str, session: &str) -> Vec<String> {
    by_labels(
        &["ps", "-aq"],
        &[("tether.host", host), ("tether.session", session)],
    )
}

fn session_networks(host: &str, session: &str) -> Vec<String> {
    by_labels(
        &["network", "ls", "-q"],
        &[("tether.host", host), ("tether.session", session)],
    )
}

fn httpd(f: &Fleet, name: &str, session: &str, serve_health: bool) -> Value {
    let setup = if serve_health {
        "mkdir -p /www && echo ok > /www/health"
    } else {
        "mkdir -p /www"
    };
    json!({
        "relic_name": name, "session_id": session, "image": f.image,
        "command": format!("{setup} && exec httpd -f -p 8080 -h /www"),
        "health_check_endpoint": "/health", "health_check_port": 8080,
    })
}

async fn tool_in(f: &Fleet, t: &str, session: &str, command: &str, timeout: u32) -> Value {
    f.call(
        "tools.execute",
        json!({"tool_name": "probe", "session_id": session, "image": f.image,
               "network": "session", "command": command,
               "resource_limits": {"timeout_seconds": timeout}}),
        Some(t),
    )
    .await
    .expect("tool")
}

#[tokio::test]
async fn relics_serve_their_own_session_only_and_are_cleaned_up() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let (sa, sb) = (unique("sa"), unique("sb"));

    let web = f
        .call("relics.start", httpd(&f, "web", &sa, true), Some(&t))
        .await
        .expect("start web");
    assert_eq!(web["healthy"], true, "{web}");
    assert_eq!(web["status"], "running");
    assert_eq!(web["relic_name"], "web");
    assert_eq!(web["session_id"], sa.as_str());
    assert_eq!(web["internal_url"], "http://web:8080/health");
    let net = web["network_id"].as_str().expect("network").to_string();
    assert!(!net.is_empty());
    assert_eq!(
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{.Internal}} {{.Labels}}",
            &net
        ])
        .split(' ')
        .next(),
        Some("true"),
        "the session network is internal"
    );
    let relic_id = web["relic_id"].as_str().expect("relic id").to_string();

    // Another container of the same session reaches it by its internal URL.
    let r = tool_in(&f, &t, &sa, "wget -q -O- http://web:8080/health", 60).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["stdout"], "ok\n");

    // Another session's containers cannot: neither by name nor by address.
    let peer = f.call(
        "relics.start",
        json!({"relic_name": "peer", "session_id": sb, "image": f.image, "command": "sleep 600"}),
        Some(&t),
    )
    .await
    .expect("start peer");
    assert_eq!(peer["healthy"], true);
    assert_ne!(peer["network_id"], web["network_id"]);
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        web["container_id"].as_str().expect("id"),
    ]);
    assert!(!ip.is_empty());
    for url in [
        "http://web:8080/health".to_string(),
        format!("http://{ip}:8080/health"),
    ] {
        let r = tool_in(&f, &t, &sb, &format!("wget -q -O- {url}"), 3).await;
        assert_ne!(r["status"], "completed", "{url} must not be reachable: {r}");
        assert_ne!(r["stdout"], "ok\n");
    }
    // Nor a space container on the default bridge.
    let other = f
        .agent(
            &unique("o"),
            &unique("s2"),
            &["containers:write", "containers:exec"],
        )
        .await;
    f.create_space(&other, json!({})).await;
    let r = f
        .exec(
            &other,
            json!({"command": format!("wget -q -O- http://{ip}:8080/health"), "timeout_seconds": 3}),
        )
        .await
        .expect("exec");
    assert_ne!(r["exit_code"], 0, "{r}");

    // Nor may a container request name that network by its id or an id prefix (the engine
    // would take either).
    for mode in [net.clone(), net[..12].to_string(), net[..2].to_string()] {
        let e = f.call(
            "containers.create",
            json!({"image": f.image, "space": unique("s4"), "kind": "tool", "network_mode": mode}),
            Some(&f.op),
        )
        .await
        .expect_err("a session network by id");
        assert_eq!(e.status, 403, "{mode}: {}", e.detail);
        assert!(e.detail.contains("allowed_networks"), "{}", e.detail);
    }

    // get (probes again), list, a second relic of the same name.
    let g = f
        .call("relics.get", json!({"relic_id": relic_id}), Some(&t))
        .await
        .expect("get");
    assert_eq!(g["healthy"], true, "{g}");
    assert_eq!(g["container_id"], web["container_id"]);
    let g = f
        .call(
            "relics.get",
            json!({"session_id": sa, "relic_name": "web"}),
            Some(&t),
        )
        .await
        .expect("get by name");
    assert_eq!(g["relic_id"], relic_id.as_str());
    let l = f
        .call("relics.list", json!({"session_id": sa}), Some(&t))
        .await
        .expect("list");
    assert_eq!(l["relics"].as_array().map(Vec::len), Some(1));
    let e = f
        .call("relics.start", httpd(&f, "web", &sa, true), Some(&t))
        .await
        .expect_err("same name");
    assert_eq!(e.status, 409);
    // Another agent's space does not see it.
    let stranger = f.agent(&unique("x"), &unique("s3"), SCOPES).await;
    let e = f
        .call("relics.get", json!({"relic_id": relic_id}), Some(&stranger))
        .await
        .expect_err("stranger");
    assert_eq!(e.status, 404);

    // A relic whose health check never passes: unhealthy within its timeout, and removed.
    let mut sick = httpd(&f, "sick", &sa, false);
    sick["health_check_timeout_seconds"] = json!(3);
    let s = f
        .call("relics.start", sick, Some(&t))
        .await
        .expect("start sick");
    assert_eq!(s["healthy"], false, "{s}");
    assert_eq!(s["status"], "unhealthy");
    assert!(
        s["detail"].as_str().is_some_and(|d| d.contains("3 s")),
        "{s}"
    );
    assert!(
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("id={}", s["container_id"].as_str().unwrap_or("x"))
        ])
        .is_empty(),
        "the unhealthy relic is removed"
    );

    // The first relic of a new session fails its health check: its network goes with it.
    let sd = unique("sd");
    let mut sick = httpd(&f, "sick", &sd, false);
    sick["health_check_timeout_seconds"] = json!(2);
    let s = f
        .call("relics.start", sick, Some(&t))
        .await
        .expect("start sick");
    assert_eq!(s["healthy"], false, "{s}");
    assert!(session_containers(&f.host_id, &sd).is_empty());
    assert!(
        session_networks(&f.host_id, &sd).is_empty(),
        "a failed first relic leaves no network"
    );

    // stop, then delete.
    let st = f
        .call("relics.stop", json!({"relic_id": relic_id}), Some(&t))
        .await
        .expect("stop");
    assert_eq!(st["status"], "exited");
    let d = f
        .call("relics.delete", json!({"relic_id": relic_id}), Some(&t))
        .await
        .expect("delete");
    assert_eq!(d["status"], "removed");
    let e = f
        .call("relics.get", json!({"relic_id": relic_id}), Some(&t))
        .await
        .expect_err("deleted");
    assert_eq!(e.status, 404);

    // sessions.cleanup: nothing of session B is left on the engine.
    assert!(!session_containers(&f.host_id, &sb).is_empty());
    let c = f
        .call(
            "sessions.cleanup",
            json!({"session_id": sb, "force": true}),
            Some(&t),
        )
        .await
        .expect("cleanup");
    assert_eq!(
        c["removed_containers"].as_array().map(Vec::len),
        Some(1),
        "{c}"
    );
    assert_eq!(
        c["removed_networks"].as_array().map(Vec::len),
        Some(1),
        "{c}"
    );
    assert!(session_containers(&f.host_id, &sb).is_empty());
    assert!(session_networks(&f.host_id, &sb).is_empty());
    // Session A: its network only (its relics are gone); cleaned too.
    f.call("sessions.cleanup", json!({"session_id": sa}), Some(&t))
        .await
        .expect("cleanup a");
    assert!(session_containers(&f.host_id, &sa).is_empty());
    assert!(session_networks(&f.host_id, &sa).is_empty());
}

#[tokio::test]
async fn the_janitor_removes_expired_sessions() {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let sc = unique("sc");
    let r = f.call(
        "relics.start",
        json!({"relic_name": "brief", "session_id": sc, "image": f.image, "command": "sleep 600",
               "resource_limits": {"timeout_seconds": 3}}),
        Some(&t),
    )
    .await
    .expect("start");
    assert_eq!(r["healthy"], true);
    assert_eq!(session_networks(&f.host_id, &sc).len(), 1);
    eventually(
        Duration::from_secs(30),
        "expired session removed",
        || async {
            (session_containers(&f.host_id, &sc).is_empty()
                && session_networks(&f.host_id, &sc).is_empty())
            .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_space_holds_a_bounded_number_of_session_networks() {
    let f = fleet_with(true, |c| c.max_sessions_per_space = 1).await;
    let t = f.agent(&unique("a"), &unique("s"), SCOPES).await;
    let (s1, s2) = (unique("s1"), unique("s2"));
    let relic = |session: &str| json!({"relic_name": "cache", "session_id": session, "image": f.image, "command": "sleep 600"});
    let r = f
        .call("relics.start", relic(&s1), Some(&t))
        .await
        .expect("first session");
    assert_eq!(r["healthy"], true, "{r}");
    // A second session of the same space: refused, nothing made.
    let e = f
        .call("relics.start", relic(&s2), Some(&t))
        .await
        .expect_err("over the limit");
    assert_eq!(e.status, 429, "{}", e.detail);
    assert!(e.detail.contains("sessions.cleanup"), "{}", e.detail);
    assert!(session_containers(&f.host_id, &s2).is_empty());
    assert!(session_networks(&f.host_id, &s2).is_empty());
    // Another relic in the first session is still fine, and another space has its own count.
    let mut second = relic(&s1);
    second["relic_name"] = json!("db");
    f.call("relics.start", second, Some(&t))
        .await
        .expect("same session");
    let other = f.agent(&unique("b"), &unique("s"), SCOPES).await;
    f.call("relics.start", relic(&s2), Some(&other))
        .await
        .expect("another space");
    // Cleaned up, the first space may open a session again.
    f.call(
        "sessions.cleanup",
        json!({"session_id": s1, "force": true}),
        Some(&t),
    )
    .await
    .expect("cleanup");
    f.call("relics.start", relic(&s2), Some(&t))
        .await
        .expect("after cleanup");
}
