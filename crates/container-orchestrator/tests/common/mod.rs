//! Fixtures: the test fleet with an orchestrator on the real Docker engine (from
//! `tether_testkit::orchestrator`), plus what only these tests need: events, and the
//! orchestrator binary as a child process for crash and restart tests.

#![allow(dead_code, unused_imports)]

pub mod a2a;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_container_orchestrator::OrchestratorConfig;
pub use tether_testkit::docker::{host_label, run as docker};
pub use tether_testkit::orchestrator::{
    OrchFleet as Fleet, config as orch_config, host_containers, start as start_orchestrator_node,
};
pub use tether_testkit::{Problem, call, eventually, num, unique};

pub const SCOPES: &[&str] = &["containers:write", "containers:exec", "containers:read"];

/// The orchestrator at `cfg` in-process against `url`.
pub async fn start_orchestrator(
    bus: &tether_bus::BusConfig,
    cfg: OrchestratorConfig,
) -> tether_bus::NodeHandle {
    start_orchestrator_node(bus, cfg)
        .await
        .expect("start orchestrator")
}

/// A fleet and (unless `with_orchestrator` is false) an orchestrator at `tweak`ed config.
pub async fn fleet_with(
    with_orchestrator: bool,
    tweak: impl FnOnce(&mut OrchestratorConfig),
) -> Fleet {
    Fleet::start("t", with_orchestrator, tweak)
        .await
        .expect("fleet")
}

pub async fn fleet() -> Fleet {
    fleet_with(true, |_| {}).await
}

/// Stops the fleet's orchestrator, once it has drained.
pub async fn stop_orchestrator(f: &mut Fleet) {
    f.orch
        .take()
        .expect("the orchestrator")
        .shutdown()
        .await
        .expect("the orchestrator drains");
}

/// Waits for an event of `kind` on a subscription (generously: the engine may be busy with
/// the other tests' containers; this bounds a hang, it measures nothing).
pub async fn next_event(sub: &mut async_nats::Subscriber, kind: &str) -> Value {
    next_event_within(sub, kind, Duration::from_secs(60)).await
}

/// [`next_event`] within `within`.
pub async fn next_event_within(
    sub: &mut async_nats::Subscriber,
    kind: &str,
    within: Duration,
) -> Value {
    use futures::StreamExt;
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no `{kind}` event within {within:?}"))
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).expect("event json");
        if v["type"] == kind {
            return v;
        }
    }
}

/// Waits until `sub` has carried an event of each of `kinds` about `container_id`, in any order
/// (the engine's `die` and `oom` come either way round); returns them in the order of `kinds`.
pub async fn container_events(
    sub: &mut async_nats::Subscriber,
    container_id: &str,
    kinds: &[&str],
) -> Vec<Value> {
    use futures::StreamExt;
    let within = Duration::from_secs(60);
    let until = Instant::now() + within;
    let mut seen: Vec<Option<Value>> = vec![None; kinds.len()];
    while seen.iter().any(Option::is_none) {
        let left = until.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| {
                let got: Vec<&str> = kinds
                    .iter()
                    .zip(&seen)
                    .filter_map(|(k, v)| v.as_ref().map(|_| *k))
                    .collect();
                panic!("not all of {kinds:?} for {container_id} within {within:?}: only {got:?}")
            })
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).expect("event json");
        if v["data"]["container_id"] != container_id {
            continue;
        }
        if let Some(i) = kinds.iter().position(|k| v["type"] == *k) {
            seen[i] = Some(v);
        }
    }
    seen.into_iter().flatten().collect()
}

/// The `data` of the orchestrator's endpoint `name` (`containers-exec`, `containers-create`)
/// in its `$SRV.STATS`.
pub async fn endpoint_stats(f: &Fleet, name: &str) -> Value {
    let m =
        f.c.request("$SRV.STATS.container-orchestrator", "".into())
            .await
            .expect("stats");
    let v: Value = serde_json::from_slice(&m.payload).expect("stats json");
    v["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["data"].clone())
        .unwrap_or_else(|| panic!("no {name} endpoint: {v}"))
}

/// The orchestrator binary as a child process (SIGKILLed on drop), for crash and restart
/// tests.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on `bus` (its URL and, on an authorized bus, the orchestrator's own nkey:
/// `f.nats.node_bus(NodeKind::Orchestrator)`) as `host_id` with a fast janitor, an optional
/// config file and extra environment.
pub fn spawn_node(
    bus: &tether_bus::BusConfig,
    host_id: &str,
    config: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_container-orchestrator"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if let Some(seed) = &bus.nats_nkey_file {
        cmd.env("TETHER_NATS_NKEY_FILE", seed);
    }
    // As `orch_config` has it: the static daemon, or none.
    if tether_testkit::orchestrator::space_daemon_on() {
        cmd.env(
            "TETHER_SPACE_DAEMON_BINARY",
            tether_testkit::orchestrator::space_daemon_binary(),
        );
    } else {
        cmd.env("TETHER_SPACE_DAEMON", "false");
    }
    cmd.env("TETHER_NATS_URL", &bus.nats_url)
        .env("TETHER_HOST_ID", host_id)
        .env("TETHER_JANITOR_INTERVAL_SECONDS", "1")
        .env("TETHER_RECONCILE_GRACE_SECONDS", "3")
        .env("TETHER_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(node_log(host_id));
    Child(cmd.spawn().expect("spawn container-orchestrator"))
}

/// Where a spawned node's log goes: nowhere, or `<host_id>.log` in the folder that
/// `TETHER_TEST_NODE_LOG_DIR` names (to see what a node did when a crash test fails).
fn node_log(host_id: &str) -> std::process::Stdio {
    let Some(dir) = std::env::var_os("TETHER_TEST_NODE_LOG_DIR") else {
        return std::process::Stdio::null();
    };
    let path = std::path::Path::new(&dir).join(format!("{host_id}.log"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f.into(),
        Err(_) => std::process::Stdio::null(),
    }
}

/// Waits until the node of `host_id` answers on its host subject.
pub async fn wait_up(f: &Fleet, host_id: &str) {
    let subject = format!("hosts.{host_id}.containers.list");
    // `poll`: a round whose reply is lost or late is asked again, not waited out.
    eventually(Duration::from_secs(60), "orchestrator answers", || async {
        f.poll(&subject, "{}", Some(&f.op)).await.map(|_| ())
    })
    .await;
}

/// No worker deployment is stored and no container is made (after refused deploys).
pub async fn nothing_deployed(f: &Fleet) {
    let l = f
        .call("workers.list", serde_json::json!({}), Some(&f.op))
        .await
        .expect("list");
    assert_eq!(l["workers"], serde_json::json!([]), "{l}");
    assert!(f.engine_containers().is_empty(), "nothing made");
}

/// Waits until the orchestrator of `asked` counts `host` live (or not).
pub async fn wait_live(f: &Fleet, asked: &str, host: &str, live: bool) {
    let subject = format!("hosts.{asked}.hosts.list");
    eventually(Duration::from_secs(15), "host list", || async {
        let l = f
            .call(&subject, serde_json::json!({}), Some(&f.op))
            .await
            .ok()?;
        l["hosts"]
            .as_array()?
            .iter()
            .any(|h| h["record"]["host_id"] == host && h["live"] == live)
            .then_some(())
    })
    .await;
}

/// Runs `sleep 600` in `f`'s image behind the orchestrator's back as container `name`, labelled
/// managed by `f`'s host and with `labels`; its id.
pub fn run_labelled(f: &Fleet, name: &str, labels: &[String]) -> String {
    let mut all = vec!["tether.managed=true".to_string(), host_label(&f.host_id)];
    all.extend(labels.iter().cloned());
    // With an init, so `sleep` ends on SIGTERM like the node's own containers.
    let mut args = vec!["run", "-d", "--init", "--name", name];
    for l in &all {
        args.extend(["--label", l.as_str()]);
    }
    args.extend([f.image.as_str(), "sleep", "600"]);
    let id = docker(&args);
    assert!(!id.is_empty(), "container {name} started");
    id
}

/// Waits until the janitor of `f`'s host has made a full pass that started after this call:
/// a managed container of that host whose `tether.expires` is long past is put on the engine,
/// and the janitor removes it on its next pass.
pub async fn janitor_pass(f: &Fleet) {
    let name = unique("witness");
    run_labelled(
        f,
        &name,
        &[
            "tether.kind=space".to_string(),
            format!("tether.space={name}"),
            "tether.expires=2000-01-01T00:00:00Z".to_string(),
        ],
    );
    eventually(
        Duration::from_secs(30),
        "a janitor pass removed the witness",
        || async {
            docker(&["ps", "-aq", "--filter", &format!("name={name}")])
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

/// Replicas of worker deployment `name` (`ps_flag` `-q`: running, `-aq`: all), straight from
/// the engine: full ids, sorted.
pub fn worker_replicas(name: &str, ps_flag: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        ps_flag,
        "--no-trunc",
        "--filter",
        "label=tether.kind=worker",
        "--filter",
        &format!("label=tether.worker={name}"),
    ]);
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// What a `stream: true` exec published on its stream subject, read until `end`.
#[derive(Debug, Default)]
pub struct Streamed {
    pub seqs: Vec<u64>,
    pub stdout: String,
    pub stderr: String,
    /// `Tether-Exit-Code` of the `end` message.
    pub exit_code: String,
}

/// Reads a streamed exec's messages from `sub` until its `end` (each within 5 s).
pub async fn read_stream(sub: &mut async_nats::Subscriber) -> Streamed {
    use futures::StreamExt;
    let mut s = Streamed::default();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("chunk in time")
            .expect("open");
        let h = m.headers.expect("headers");
        let seq = h.get("Tether-Stream-Seq").expect("seq").as_str();
        s.seqs.push(seq.parse::<u64>().expect("a number"));
        let text = String::from_utf8_lossy(&m.payload);
        match h.get("Tether-Stream").expect("kind").as_str() {
            "end" => {
                s.exit_code = h.get("Tether-Exit-Code").expect("code").as_str().into();
                return s;
            }
            "stdout" => s.stdout.push_str(&text),
            "stderr" => s.stderr.push_str(&text),
            other => panic!("unknown stream {other:?}"),
        }
    }
}
