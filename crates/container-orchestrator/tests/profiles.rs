//! Run-profiles (issue 17, item 3) on the real engine and a real nats-server, with the
//! orchestrator binary reading `[profiles.coder]` from its config file: a `coder` replica sees
//! its auth folder writable and its secrets folder read-only, reaches a server listening on
//! the host through `host.docker.internal`, and gets the secrets file as `/run/tether/env`
//! whose values appear nowhere else (`docker inspect`, replies, the node's log). A request
//! asking for a mount outside its profile, or naming an unknown profile, is refused and
//! creates nothing. Every wait is on an event or a connection, under a deadline.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tether_testkit::NodeKind;
use tokio::io::AsyncBufReadExt;

/// A replica that stays up and stops on SIGTERM.
fn command() -> Value {
    json!([
        "sh",
        "-c",
        "trap 'exit 0' TERM INT; while :; do sleep 1; done"
    ])
}

/// `docker exec <id> sh -c <script>`: whether it exited 0, and its output.
fn exec(id: &str, script: &str) -> (bool, String) {
    let out = Command::new("docker")
        .args(["exec", id, "sh", "-c", script])
        .output()
        .expect("docker exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The first `tether.worker.created` event's container id (token refusals skipped: the
/// agent is not registered, credentials are `worker_a2a.rs`'s subject).
async fn created(sub: &mut async_nats::Subscriber) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("a worker event within 60 s")
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).expect("event json");
        match v["type"].as_str() {
            Some("tether.worker.token_refused") => continue,
            Some("tether.worker.created") => {
                return v["data"]["container_id"].as_str().expect("id").to_string();
            }
            _ => panic!("unexpected worker event {v}"),
        }
    }
}

/// The orchestrator binary with `config` (its log, debug level, into `log`).
fn spawn_logged(f: &Fleet, config: &Path, log: &Path) -> Child {
    let bus = f.nats.node_bus(NodeKind::Orchestrator);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_container-orchestrator"));
    cmd.arg("--config").arg(config);
    if let Some(seed) = &bus.nats_nkey_file {
        cmd.env("TETHER_NATS_NKEY_FILE", seed);
    }
    cmd.env("TETHER_NATS_URL", &bus.nats_url)
        .env("TETHER_HOST_ID", &f.host_id)
        .env("TETHER_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    Child(cmd.spawn().expect("spawn container-orchestrator"))
}

#[tokio::test]
async fn a_coder_replica_gets_its_profile_and_nothing_more() {
    let f = fleet_with(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path();
    let auth = root.join("auth");
    let secrets = root.join("secrets");
    let shared = root.join("shared");
    for d in [&auth, &secrets, &shared] {
        std::fs::create_dir(d).expect("mkdir");
    }
    // The replica's user has no capabilities: the auth folder must be writable by anyone.
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    std::fs::write(secrets.join("key"), "mounted").expect("write");
    let secret = format!("s3cret-{}", unique("v"));
    let env_file = root.join("coder.env");
    std::fs::write(&env_file, format!("# coder\nCODER_API_KEY={secret}\n")).expect("env");

    // A server on the host, on every address (the bridge's gateway included).
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let config = root.join("tether.toml");
    std::fs::write(
        &config,
        format!(
            r#"janitor_interval_seconds = 1

[profiles.coder]
network = "bridge"
extra_hosts = ["host.docker.internal:host-gateway"]
env_file = "{env}"
mounts = [
  {{ source = "{auth}", target = "/auth", mode = "rw" }},
  {{ source = "{secrets}", target = "/secrets", mode = "ro" }},
]
allowed_mounts = [{{ path = "{shared}" }}]
resource_limits = {{ memory_mb = 256 }}
"#,
            env = env_file.display(),
            auth = auth.display(),
            secrets = secrets.display(),
            shared = shared.display(),
        ),
    )
    .expect("config");
    let log = root.join("orchestrator.log");
    let _node = spawn_logged(&f, &config, &log);
    wait_up(&f, &f.host_id).await;

    // `workers.deploy` takes only an agent registered with `workers:hosted`.
    f.agent("coder-bot", "workers", &["workers:hosted"]).await;
    // Bad input first: nothing is stored or made.
    let name = unique("coder");
    let good = json!({
        "name": name, "agent_id": "coder-bot", "image": f.image, "command": command(),
        "profile": "coder",
    });
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let outside = json!([{"source": "/etc", "target": "/host-etc"}]);
    let shared_rw =
        json!([{"source": shared.display().to_string(), "target": "/s", "writable": true}]);
    let cases = [
        (
            with("profile", json!("nope")),
            422,
            "unknown profile \"nope\"",
        ),
        (with("mounts", outside.clone()), 403, "not under"),
        (with("mounts", shared_rw), 403, "read-only"),
        // The default profile allows no mount at all.
        (
            {
                let mut b = with("mounts", outside);
                b["profile"] = json!("default");
                b
            },
            403,
            "not under",
        ),
    ];
    for (body, status, needle) in &cases {
        let p = f
            .call("workers.deploy", body.clone(), Some(&f.op))
            .await
            .expect_err(&body.to_string());
        assert_eq!(p.status, *status, "{body}: {p:?}");
        assert!(p.detail.contains(needle), "{needle:?} not in {p:?}");
    }
    nothing_deployed(&f).await;

    // A coder replica, with a read-only mount of its own from the profile's allowlist.
    let mut events =
        f.c.subscribe(format!("events.workers.{name}"))
            .await
            .expect("subscribe");
    let body = with(
        "mounts",
        json!([{"source": shared.display().to_string(), "target": "/shared"}]),
    );
    let r = f
        .call("workers.deploy", body, Some(&f.op))
        .await
        .expect("deploy");
    assert_eq!(r["deployment"]["spec"]["profile"], "coder", "{r}");
    assert_eq!(
        r["deployment"]["spec"]["resource_limits"]["memory_mb"], 256,
        "the profile's default limit: {r}"
    );
    let id = created(&mut events).await;

    // The auth folder is writable (the write lands on the host), the secrets one is not.
    let (ok, out) = exec(&id, "echo refreshed > /auth/token && cat /secrets/key");
    assert!(ok, "write to /auth: {out}");
    assert_eq!(out.trim(), "mounted");
    assert_eq!(
        std::fs::read_to_string(auth.join("token")).expect("on the host"),
        "refreshed\n"
    );
    let (ok, out) = exec(&id, "echo x > /secrets/f");
    assert!(!ok, "a write to /secrets succeeded: {out}");
    assert!(out.contains("Read-only"), "{out}");
    assert!(!secrets.join("f").exists());
    let (ok, out) = exec(&id, "echo x > /shared/f");
    assert!(!ok, "a write to /shared succeeded: {out}");

    // The host's server, through host.docker.internal (nc ends when the server closes).
    let nc = tokio::task::spawn_blocking({
        let id = id.clone();
        move || {
            exec(
                &id,
                &format!("echo hello-from-coder | nc -w 5 host.docker.internal {port}"),
            )
        }
    });
    let (conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("a connection within 30 s")
        .expect("accept");
    let mut got = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::BufReader::new(conn).read_line(&mut got),
    )
    .await
    .expect("a line within 10 s")
    .expect("read");
    assert_eq!(got, "hello-from-coder\n");
    let (ok, out) = tokio::time::timeout(Duration::from_secs(30), nc)
        .await
        .expect("nc ends once the connection is closed")
        .expect("join");
    assert!(ok, "nc: {out}");

    // The secrets file is in the replica's secret volume, and nowhere else.
    let (ok, out) = exec(&id, "cat /run/tether/env; echo; echo \"$TETHER_ENV_FILE\"");
    assert!(ok, "{out}");
    assert!(out.contains(&format!("CODER_API_KEY={secret}")), "{out}");
    assert!(out.contains("/run/tether/env"), "{out}");
    let inspect = docker(&["inspect", &id]);
    assert!(
        inspect.contains("TETHER_ENV_FILE=/run/tether/env"),
        "{inspect}"
    );
    assert!(!inspect.contains(&secret), "the value in docker inspect");
    let (ok, out) = exec(&id, "env");
    assert!(ok && !out.contains(&secret), "the value in the environment");
    let g = f
        .call("workers.get", json!({"name": name}), Some(&f.op))
        .await
        .expect("get");
    assert!(!g.to_string().contains(&secret), "the value in workers.get");
    assert!(
        !r.to_string().contains(&secret),
        "the value in the deploy reply"
    );
    let l = f
        .call("workers.list", json!({}), Some(&f.op))
        .await
        .expect("list");
    assert!(
        !l.to_string().contains(&secret),
        "the value in workers.list"
    );

    f.call("workers.remove", json!({"name": name}), Some(&f.op))
        .await
        .expect("remove");
    eventually(Duration::from_secs(30), "no replica left", || async {
        worker_replicas(&name, "-aq").is_empty().then_some(())
    })
    .await;
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("worker replica"),
        "the log is the node's: {logged}"
    );
    assert!(!logged.contains(&secret), "the value in the node's log");
}

/// A profile the node cannot use stops it at start (exit 64), naming the profile.
#[tokio::test]
async fn a_bad_profile_stops_the_node_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        "[profiles.coder]\nenv_file = \"/no/such/tether.env\"\n",
        "[profiles.coder]\nmounts = [{ source = \"/srv\", target = \"/run/tether\" }]\n",
        "[profiles.coder]\nnetwork = \"host\"\n",
        "[profiles.coder]\nmounts = [{ source = \"/srv\", target = \"/x\", mode = \"rwx\" }]\n",
        "[profiles.coder]\nnetwrok = \"bridge\"\n",
    ];
    for (i, toml) in cases.iter().enumerate() {
        let config = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&config, toml).expect("config");
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_container-orchestrator"))
            .arg("--config")
            .arg(&config)
            .env("TETHER_NATS_URL", "nats://127.0.0.1:1")
            .env("TETHER_HOST_ID", unique("bad"))
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("exits within 30 s")
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {err}");
        assert!(
            err.contains("coder") || err.contains("profiles"),
            "{toml}: {err}"
        );
    }
}
