//! The fixtures themselves work against the real parts: start, kill/stop + restart keeping
//! JetStream data, cleanup on drop and when the test process is killed, config errors, the
//! busybox image, label cleanup.
//!
//! Tests that need a separate process (env overrides, being SIGKILLed) re-run this test binary
//! on one `#[ignore]`d helper test with `--ignored --exact`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use tether_testkit::NatsServer;

const HELPER_ENV: &str = "TETHER_TESTKIT_HELPER";

/// Polls `cond` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Running, i.e. neither gone nor a zombie.
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // "pid (comm) S ..." — the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        }
    }
}

async fn refuses_connections(url: &str) -> bool {
    !matches!(
        tokio::time::timeout(Duration::from_secs(2), tether_testkit::connect(url)).await,
        Ok(Ok(_))
    )
}

async fn stream_with_one_message(s: &NatsServer, name: &str) {
    let js = jetstream::new(s.client().await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish(format!("{}.a", name.to_lowercase()), "kept".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}

async fn assert_message_kept(s: &NatsServer, name: &str) {
    let js = jetstream::new(s.client().await.expect("client after restart"));
    let stream = js.get_stream(name).await.expect("stream survives");
    let msg = stream.get_raw_message(1).await.expect("message 1 survives");
    assert_eq!(msg.payload.as_ref(), b"kept");
}

/// The helper's command line: this test binary, on one ignored test, with `envs`.
fn helper(name: &str, envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, name);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

fn in_helper(name: &str) -> bool {
    std::env::var(HELPER_ENV).is_ok_and(|v| v == name)
}

#[tokio::test]
async fn start_answers_with_jetstream_on_loopback() {
    let s = NatsServer::start().await.expect("start");
    assert_eq!(s.plain_url(), format!("nats://127.0.0.1:{}", s.port()));
    // Authorization is on: without credentials the server refuses.
    assert!(
        refuses_connections(&s.plain_url()).await,
        "an anonymous connection was accepted"
    );
    let client = s.client().await.expect("client");
    assert!(client.server_info().jetstream, "JetStream is on");
    let mut sub = client.subscribe("ping").await.expect("subscribe");
    client.publish("ping", "x".into()).await.expect("publish");
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("message within 5 s")
        .expect("message");
    assert_eq!(m.payload.as_ref(), b"x");
    assert!(s.store_dir().starts_with(std::env::temp_dir()));
}

#[tokio::test]
async fn a_token_server_takes_only_its_token() {
    let s = NatsServer::start_with_token("shared-secret")
        .await
        .expect("start");
    assert_eq!(
        s.url(),
        format!("nats://shared-secret@127.0.0.1:{}", s.port())
    );
    assert!(
        refuses_connections(&s.plain_url()).await,
        "a connection without the token was accepted"
    );
    assert!(
        refuses_connections(&format!("nats://wrong@127.0.0.1:{}", s.port())).await,
        "a wrong token was accepted"
    );
    let client = s.client().await.expect("client with the token");
    assert!(client.server_info().jetstream, "JetStream is on");
}

#[tokio::test]
async fn kill_and_restart_keep_port_and_jetstream_data() {
    let mut s = NatsServer::start().await.expect("start");
    let port = s.port();
    let pid = s.pid().expect("pid");
    stream_with_one_message(&s, "KEEP").await;

    s.kill().await;
    assert_eq!(s.pid(), None);
    assert!(!process_running(pid), "killed server still runs");
    assert!(refuses_connections(&s.url()).await, "killed server answers");
    assert!(s.store_dir().is_dir(), "store kept after kill");
    s.kill().await; // a second kill is a no-op

    s.restart().await.expect("restart");
    assert_eq!(s.port(), port);
    assert_ne!(s.pid(), Some(pid));
    assert_message_kept(&s, "KEEP").await;
}

#[tokio::test]
async fn graceful_stop_and_restart_keep_data() {
    let mut s = NatsServer::start().await.expect("start");
    stream_with_one_message(&s, "GRACE").await;
    let pid = s.pid().expect("pid");
    s.stop().await;
    assert!(!process_running(pid), "stopped server still runs");
    assert!(
        refuses_connections(&s.url()).await,
        "stopped server answers"
    );
    s.stop().await; // a second stop is a no-op
    s.restart().await.expect("restart");
    assert_message_kept(&s, "GRACE").await;
    // restart on a running server restarts it
    let pid = s.pid().expect("pid");
    s.restart().await.expect("restart while running");
    assert!(!process_running(pid));
    assert_message_kept(&s, "GRACE").await;
}

#[tokio::test]
async fn drop_kills_the_server_and_removes_its_dir() {
    let s = NatsServer::start().await.expect("start");
    let url = s.url();
    let pid = s.pid().expect("pid");
    let dir = s.store_dir();
    assert!(process_running(pid));
    drop(s);
    assert!(
        !process_running(pid),
        "server process still runs after drop"
    );
    assert!(
        refuses_connections(&url).await,
        "server still answers after drop"
    );
    assert!(!dir.exists(), "temp dir not removed: {}", dir.display());
}

#[tokio::test]
async fn two_servers_get_different_ports() {
    let a = NatsServer::start().await.expect("start a");
    let b = NatsServer::start().await.expect("start b");
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
}

#[tokio::test]
async fn extra_config_is_applied() {
    let s = NatsServer::start_with_config("max_payload: 65536\nserver_name: testkit-extra")
        .await
        .expect("start with config");
    let info = s.client().await.expect("client").server_info();
    assert_eq!(info.max_payload, 65536);
    assert_eq!(info.server_name, "testkit-extra");
}

#[tokio::test]
async fn bad_extra_config_fails_fast_with_the_log() {
    let started = Instant::now();
    let err = NatsServer::start_with_config("this is { not valid")
        .await
        .expect_err("invalid config must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
#[ignore = "helper: run by missing_binary_is_explained in its own process"]
async fn helper_start_with_env() {
    if !in_helper("helper_start_with_env") {
        return;
    }
    match NatsServer::start().await {
        Ok(_) => println!("RESULT started"),
        Err(e) => println!("RESULT error: {e:#}"),
    }
}

/// Runs `helper_start_with_env` as `cmd` and answers its `RESULT ...` line.
fn start_result(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.find("RESULT").map(|i| l[i..].to_string()))
        .unwrap_or_else(|| panic!("helper printed no result: {stdout}"))
}

#[test]
fn missing_binary_is_explained() {
    let line = start_result(&mut helper(
        "helper_start_with_env",
        &[("TETHER_NATS_SERVER", "/nonexistent/nats-server")],
    ));
    assert!(line.contains("error"), "{line}");
    assert!(line.contains("TETHER_NATS_SERVER"), "{line}");
    assert!(line.contains("/nonexistent/nats-server"), "{line}");
}

#[test]
fn a_server_older_than_2_10_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = dir.path().join("nats-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.9.25'\n").expect("write fake");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod fake");
    let line = start_result(&mut helper(
        "helper_start_with_env",
        &[("TETHER_NATS_SERVER", fake.to_str().expect("utf-8 path"))],
    ));
    assert!(line.contains("error"), "{line}");
    assert!(line.contains("v2.9.25"), "{line}");
    assert!(line.contains("tether needs nats-server >= 2.10"), "{line}");
}

#[test]
fn the_current_line_is_used_when_none_is_on_path() {
    let home = std::env::var("HOME").unwrap_or_default();
    let current = std::path::Path::new(&home).join(".cache/tether/nats-current/bin/nats-server");
    if !current.is_file() {
        eprintln!(
            "skipped: no {} (scripts/install-deps.sh)",
            current.display()
        );
        return;
    }
    let mut cmd = helper("helper_start_with_env", &[("PATH", "/usr/bin:/bin")]);
    cmd.env_remove("TETHER_NATS_SERVER")
        .env_remove("TETHER_NATS_CURRENT_DIR")
        .env_remove("XDG_CACHE_HOME");
    assert_eq!(start_result(&mut cmd), "RESULT started");
}

#[tokio::test]
#[ignore = "helper: run by server_dies_with_a_killed_test_process in its own process"]
async fn helper_hold_server() {
    if !in_helper("helper_hold_server") {
        return;
    }
    let s = NatsServer::start().await.expect("start");
    let dir = s.log_path().parent().expect("dir").display().to_string();
    println!("SERVER {} {} {dir}", s.pid().expect("pid"), s.url());
    // Held until the parent test SIGKILLs this process (bounded in case it never does).
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(s);
}

#[tokio::test]
async fn server_dies_with_a_killed_test_process() {
    let mut child = helper("helper_hold_server", &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.find("SERVER ").map(|i| l[i..].to_string()))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("helper started a server within 20 s")
        .expect("join")
        .expect("SERVER line");
    let mut parts = line.split_whitespace().skip(1);
    let pid: u32 = parts.next().and_then(|p| p.parse().ok()).expect("pid");
    let url = parts.next().expect("url").to_string();
    let dir = std::path::PathBuf::from(parts.next().expect("dir"));
    assert!(dir.join("nats.conf").is_file(), "{}", dir.display());
    assert!(process_running(pid));

    child.kill().expect("SIGKILL helper"); // no Drop runs in there
    child.wait().expect("reap helper");

    assert!(
        eventually(Duration::from_secs(5), || !process_running(pid)).await,
        "nats-server {pid} outlived its killed test process"
    );
    assert!(refuses_connections(&url).await);
    // A SIGKILLed process cannot remove its temp dir; this test does it for its helper.
    std::fs::remove_dir_all(&dir).expect("remove the helper's temp dir");
}

#[test]
fn cargo_bin_explains_how_to_build_a_missing_binary() {
    let err = tether_testkit::cargo_bin("no-such-binary-xyz").expect_err("missing");
    let msg = err.to_string();
    assert!(msg.contains("no-such-binary-xyz"), "{msg}");
    assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
}

fn docker_out(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker").args(args).output().expect("docker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn require_docker() {
    assert!(
        tether_testkit::docker::available(),
        "the Docker engine is required for these tests"
    );
}

#[test]
fn busybox_image_runs_echo() {
    require_docker();
    let img = tether_testkit::docker::busybox_image().expect("image");
    assert_eq!(img, tether_testkit::docker::BUSYBOX_IMAGE);
    let (ok, stdout, stderr) = docker_out(&["run", "--rm", &img, "echo", "hi"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "hi\n");
    // a second call finds the image and does not rebuild
    assert_eq!(tether_testkit::docker::busybox_image().expect("again"), img);
}

/// Builds the image under a throwaway tag (so the shared tag in use by other tests is never
/// removed) and checks its contents.
#[test]
fn busybox_image_contents() {
    require_docker();
    let tag = format!("tether-test/busybox:testkit-{}", std::process::id());
    tether_testkit::docker::build_busybox_image(&tag).expect("build");
    let script = "stat -c %a /tmp; test -d /work && echo work; \
                  for a in sh ps sleep httpd wget nc; do which $a; done; \
                  id -un; echo $PATH";
    let (ok, stdout, stderr) = docker_out(&["run", "--rm", &tag, "sh", "-c", script]);
    let (_, inspect, _) = docker_out(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        &tag,
    ]);
    let _ = docker_out(&["image", "rm", "-f", &tag]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "1777\nwork\n/bin/sh\n/bin/ps\n/bin/sleep\n/bin/httpd\n/bin/wget\n/bin/nc\nroot\n/bin\n"
    );
    assert_eq!(inspect.trim(), "null [\"sh\"]");
}

#[test]
fn build_with_a_missing_busybox_is_explained() {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "helper_build_with_env",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "helper_build_with_env")
        .env("TETHER_BUSYBOX", "/nonexistent/busybox")
        .output()
        .expect("run helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("helper printed no result: {stdout}"));
    assert!(line.contains("/nonexistent/busybox"), "{line}");
    assert!(line.contains("busybox-static"), "{line}");
}

#[test]
#[ignore = "helper: run by build_with_a_missing_busybox_is_explained in its own process"]
fn helper_build_with_env() {
    if !in_helper("helper_build_with_env") {
        return;
    }
    match tether_testkit::docker::build_busybox_image("tether-test/busybox:never-built") {
        Ok(()) => println!("RESULT built"),
        Err(e) => println!("RESULT error: {e:#}"),
    }
}

#[test]
fn remove_labeled_removes_only_matching_containers() {
    require_docker();
    let img = tether_testkit::docker::busybox_image().expect("image");
    let run = format!("testkit-{}", std::process::id());
    let label = format!("{}={run}", tether_testkit::docker::TEST_RUN_LABEL);
    let other = format!("{}={run}-other", tether_testkit::docker::TEST_RUN_LABEL);
    for l in [&label, &label, &other] {
        let (ok, _, stderr) = docker_out(&["create", "--label", l, &img, "sleep", "60"]);
        assert!(ok, "{stderr}");
    }
    assert_eq!(
        tether_testkit::docker::remove_labeled(&label).expect("rm"),
        2
    );
    assert_eq!(
        tether_testkit::docker::remove_labeled(&label).expect("rm"),
        0
    );
    assert_eq!(
        tether_testkit::docker::remove_labeled(&other).expect("rm"),
        1
    );
}

#[tokio::test]
async fn a_fleet_under_a_subject_prefix_serves_and_asks_under_it() {
    let nats = NatsServer::start_under("pfx", false).await.expect("server");
    assert_eq!(
        nats.node_bus(tether_testkit::NodeKind::Orchestrator)
            .subject_prefix
            .as_deref(),
        Some("pfx")
    );
    let f = tether_testkit::Fleet::on(nats, Default::default())
        .await
        .expect("fleet");
    // Through `pfx.agents.register` and `pfx.tokens.issue`; the agent's own connection
    // (through the callout, which runs under the prefix too) may call its record there.
    let t = f.agent("alice", "s1", &["containers:read"]).await;
    let ac = f.connect_as(&t).await.expect("the callout admits alice");
    let ask = r#"{"agent_id":"alice"}"#;
    let me = tether_testkit::call(&ac, "pfx.agents.get", ask, Some(&t))
        .await
        .expect("alice's record under the prefix");
    assert_eq!(me["agent_id"], "alice", "{me}");
    let p = tether_testkit::call(&f.c, "agents.get", ask, Some(&t))
        .await
        .expect_err("nothing serves the unprefixed subject");
    assert_eq!(p.status, 503, "{p:?}");
    assert_eq!(f.subject("agents.get"), "pfx.agents.get");
}

#[tokio::test]
async fn a_bad_subject_prefix_is_refused_before_a_server_starts() {
    for bad in ["", "a..b", "pfx.", ".pfx", "p x", "p.*", ">"] {
        let e = NatsServer::start_under(bad, false).await.expect_err(bad);
        assert!(e.to_string().contains("subject prefix"), "{bad:?}: {e}");
    }
}
