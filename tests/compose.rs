//! The compose fleet (deploy/compose.yaml) as an operator runs it: `deploy/compose.sh up` (what
//! `just compose-up` runs) on the images `just image` built; a space container, execs and
//! async tool jobs through it; `docker kill` of the NATS server the orchestrator is connected
//! to, then of the orchestrator's container, while jobs run. Every acknowledged job completes
//! with its own result, execs are served again after each kill, the space keeps its container,
//! and `deploy/compose.sh down` leaves no container, network or volume behind.
//!
//! Needs the images `tether/nodes:dev` and `tether/nats:dev` (`just image`; `just test` builds
//! them first). The fleet gets a project name, ports, a host id and a key directory of its own,
//! so it never touches a compose fleet of the developer's.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tether_testkit::{eventually, exec_ok, poll, unique};

const TAG: &str = "dev";
const JOBS: usize = 16;
/// Bounds only a hang crosses: a fleet of seven containers starting on a busy 2-core machine,
/// and an orchestrator's restart (its jobs come back after their ack wait, 30 s).
const UP: Duration = Duration::from_secs(240);
/// One exec attempt; a lost or late one is asked again.
const EXEC_WAIT: Duration = Duration::from_secs(5);
const RESUME: Duration = Duration::from_secs(120);
const JOB_DONE: Duration = Duration::from_secs(300);
const SCOPES: &[&str] = &[
    "containers:write",
    "containers:exec",
    "containers:read",
    "tools:run",
];

/// The fleet of one test: `deploy/compose.sh` with its own settings; taken down on drop.
struct Compose {
    env: Vec<(&'static str, String)>,
    project: String,
    host_id: String,
    state: tempfile::TempDir,
}

impl Compose {
    fn new() -> Self {
        let project = unique("tc").to_lowercase().replace('_', "-");
        let host_id = unique("compose");
        let state = tempfile::tempdir().expect("state dir");
        let nats = three_free_ports();
        let env = vec![
            ("TETHER_COMPOSE_PROJECT", project.clone()),
            ("TETHER_IMAGE_TAG", TAG.to_string()),
            ("TETHER_HOST_ID", host_id.clone()),
            ("TETHER_NATS_PORT", nats.to_string()),
            ("TETHER_MCP_PORT", port().to_string()),
            ("TETHER_A2A_PORT", port().to_string()),
            ("TETHER_COMPOSE_STATE", state.path().display().to_string()),
            ("TETHER_COMPOSE_WAIT", UP.as_secs().to_string()),
        ];
        Compose {
            env,
            project,
            host_id,
            state,
        }
    }

    fn script(&self, args: &[&str]) -> Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compose.sh");
        Command::new(script)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run deploy/compose.sh")
    }

    fn env(&self, key: &str) -> &str {
        &self.env.iter().find(|(k, _)| *k == key).expect("set").1
    }

    fn urls(&self) -> String {
        let p: u16 = self.env("TETHER_NATS_PORT").parse().expect("port");
        (p..p + 3)
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The id of the container of a compose service.
    fn container(&self, service: &str) -> String {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let service = format!("label=com.docker.compose.service={service}");
        let id = docker(&["ps", "-aq", "--filter", &project, "--filter", &service]);
        assert!(!id.is_empty() && !id.contains('\n'), "{service}: {id:?}");
        id
    }

    /// What is left of the project and of its orchestrator's containers and networks.
    fn leftovers(&self) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let host = format!("label=tether.host={}", self.host_id);
        [
            vec!["ps", "-aq", "--filter", &project],
            vec!["network", "ls", "-q", "--filter", &project],
            vec!["volume", "ls", "-q", "--filter", &project],
            vec!["ps", "-aq", "--filter", &host],
            vec!["network", "ls", "-q", "--filter", &host],
        ]
        .iter()
        .map(|args| docker(args))
        .filter(|out| !out.is_empty())
        .collect()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the fleet said, for the failure's report (the containers go with `down`).
            let out = self.script(&["logs", "--no-color", "--tail", "60"]);
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let _ = self.script(&["down"]);
    }
}

fn docker(args: &[&str]) -> String {
    tether_testkit::docker::run(args)
}

/// A port whose next two are free too (the three servers' client ports).
fn three_free_ports() -> u16 {
    for _ in 0..100 {
        let p = port();
        if p < 65000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no three consecutive free ports");
}

fn operator_token(key: &Path) -> String {
    let tether = tether_testkit::cargo_bin("tether").expect("tether binary");
    let out = Command::new(tether)
        .args(["token", "issue", "--operator", "--ttl", "3600"])
        .env("TETHER_SIGNING_KEY_FILE", key)
        .output()
        .expect("tether token issue");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// The compose service of the NATS server the orchestrator is connected to (from each
/// server's `/connz`, read inside its container).
fn orchestrators_server(fleet: &Compose) -> Option<&'static str> {
    ["nats-0", "nats-1", "nats-2"].into_iter().find(|s| {
        let connz = docker(&[
            "exec",
            &fleet.container(s),
            "wget",
            "-qO-",
            "http://127.0.0.1:8222/connz?limit=4096",
        ]);
        serde_json::from_str::<Value>(&connz).is_ok_and(|v| {
            v["connections"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == "container-orchestrator"))
        })
    })
}

fn health(id: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Health.Status}}", id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_fleet_survives_a_killed_server_and_a_killed_orchestrator() {
    for image in ["tether/nodes", "tether/nats"] {
        let tagged = format!("{image}:{TAG}");
        assert!(
            !docker(&["image", "ls", "-q", &tagged]).is_empty(),
            "{tagged} is not built: run `just image` first (`just test` does)"
        );
    }
    let busybox = tether_testkit::docker::busybox_image().expect("test image");
    let fleet = Compose::new();
    let up = fleet.script(&["up"]);
    assert!(
        up.status.success(),
        "compose up: {}\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );

    // An operator as in the README: a token from the signing key compose-up made.
    let op = operator_token(&fleet.state.path().join("signing-key.pem"));
    let cfg = tether_bus::BusConfig {
        nats_url: fleet.urls(),
        nats_token: Some(tether_bus::config::Secret::new(op.clone())),
        ..Default::default()
    };
    let c = tether_bus::connect::options(&cfg, "compose-test")
        .await
        .expect("options")
        .connect(tether_bus::connect::servers(&cfg.nats_url).expect("urls"))
        .await
        .expect("connect to the compose bus");

    let t = tether_testkit::register_agent(&c, None, &op, &unique("a"), &unique("s"), SCOPES).await;
    let space = tether_testkit::call(&c, "containers.create", json!({"image": busybox}), Some(&t))
        .await
        .expect("space container");
    let container = space["container_id"].as_str().expect("id").to_string();
    eventually(RESUME, "an exec in the new space", || async {
        exec_ok(&c, &t, EXEC_WAIT).await.then_some(())
    })
    .await;

    // Jobs acknowledged ("queued") before the kills.
    let job = |i: usize| {
        json!({"tool_name": "echo-i", "session_id": "compose", "image": busybox, "async": true,
               "command": "sleep 2; echo \"{\\\"i\\\": $I}\"", "parameters": {"i": i}})
    };
    let ids: Vec<String> = futures::stream::iter(0..JOBS)
        .map(|i| tether_testkit::call(&c, "tools.execute", job(i), Some(&t)))
        .buffered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|r| {
            let r = r.expect("job queued");
            assert_eq!(r["status"], "queued", "{r}");
            r["execution_id"].as_str().expect("id").to_string()
        })
        .collect();

    // 1. The NATS server the orchestrator is on.
    let server = eventually(RESUME, "the orchestrator's server", || async {
        orchestrators_server(&fleet)
    })
    .await;
    let server_id = fleet.container(server);
    let killed = Instant::now();
    docker(&["kill", &server_id]);
    let gap = eventually(RESUME, "an exec after the server's kill", || async {
        exec_ok(&c, &t, EXEC_WAIT).await.then(|| killed.elapsed())
    })
    .await;
    println!(
        "compose: killed {server} (the orchestrator's server): exec served again after {gap:?}"
    );

    // 2. The orchestrator, while jobs run; `docker kill` is a stop the restart policy obeys,
    // so it is started again as a supervisor would.
    eventually(RESUME, "a job running", || async {
        let r = poll(&c, "tools.get", json!({"execution_id": ids[0]}), Some(&t)).await?;
        (r["status"] != "queued").then_some(())
    })
    .await;
    let orchestrator = fleet.container("container-orchestrator");
    let killed = Instant::now();
    docker(&["kill", &orchestrator]);
    docker(&["start", &orchestrator]);
    let gap = eventually(
        RESUME,
        "an exec after the orchestrator's restart",
        || async { exec_ok(&c, &t, EXEC_WAIT).await.then(|| killed.elapsed()) },
    )
    .await;
    println!("compose: killed and started the orchestrator: exec served again after {gap:?}");

    // Nothing acknowledged is lost: every job completes once, with its own result.
    for (i, id) in ids.iter().enumerate() {
        let r = eventually(JOB_DONE, "every job completes", || async {
            let r = poll(&c, "tools.get", json!({"execution_id": id}), Some(&t)).await?;
            matches!(r["status"].as_str(), Some("completed" | "failed")).then_some(r)
        })
        .await;
        assert_eq!(r["status"], "completed", "job {i}: {r}");
        assert_eq!(r["result"], json!({"i": i}), "job {i}: {r}");
    }
    println!("compose: all {JOBS} acknowledged jobs completed with their own results");
    // The space kept its container (no second one was made).
    let spaces = docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=tether.host={}", fleet.host_id),
        "--filter",
        "label=tether.kind=space",
    ]);
    assert_eq!(spaces, container, "the space's one container");

    // The killed server comes back healthy into the cluster.
    docker(&["start", &server_id]);
    eventually(UP, "the killed server healthy again", || async {
        (health(&server_id) == "healthy").then_some(())
    })
    .await;
    eventually(RESUME, "an exec at the end", || async {
        exec_ok(&c, &t, EXEC_WAIT).await.then_some(())
    })
    .await;

    // Every bucket and stream has three replicas, whichever node made it.
    let jsz = docker(&[
        "exec",
        &fleet.container("nats-1"),
        "wget",
        "-qO-",
        "http://127.0.0.1:8222/jsz?accounts=true&streams=true&config=true",
    ]);
    let jsz: Value = serde_json::from_str(&jsz).expect("jsz");
    let streams: Vec<(String, u64)> = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            let name = s["name"].as_str().unwrap_or_default().to_string();
            (name, s["config"]["num_replicas"].as_u64().unwrap_or(0))
        })
        .collect();
    assert!(
        streams.iter().any(|(n, _)| n == "KV_tether_keys"),
        "{streams:?}"
    );
    assert!(streams.iter().all(|(_, r)| *r == 3), "{streams:?}");

    drop(c);
    let down = fleet.script(&["down"]);
    assert!(down.status.success(), "compose down: {down:?}");
    assert_eq!(fleet.leftovers(), Vec::<String>::new(), "left behind");
}

/// A free loopback port.
fn port() -> u16 {
    tether_testkit::free_port().expect("free port")
}
