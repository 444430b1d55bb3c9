//! Every node binary starts the same way (`tether_bus::startup`): a configuration it cannot
//! use — a bad `log` filter or a bad `otlp_endpoint` included — ends it with exit 64 and a
//! line saying what is wrong, before it tries to reach the bus.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binaries, each found next to this test (built by `cargo build --workspace --bins`).
fn binaries() -> Vec<(String, std::path::PathBuf)> {
    let mut v = vec![(
        "tether-test-node".to_string(),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_tether-test-node")),
    )];
    for name in [
        "permission-node",
        "model-gateway",
        "shell-server",
        "container-orchestrator",
        "a2a-gateway",
    ] {
        v.push((
            name.to_string(),
            tether_testkit::cargo_bin(name).expect("node binary built"),
        ));
    }
    v
}

/// Runs `bin` with `env` (no config file, a bus nobody listens on); its exit code and stderr.
fn run(bin: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir.path())
        .env("TETHER_NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("TETHER_SIGNING_KEY_FILE", dir.path().join("key.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not exit on a bad configuration", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status.code(), err)
}

#[test]
fn a_bad_log_filter_exits_64() {
    for (name, bin) in binaries() {
        let (code, err) = run(&bin, &[("TETHER_LOG", "info,tether_bus=loud")]);
        assert_eq!(code, Some(64), "{name}: {err}");
        assert!(err.contains("log filter"), "{name} says why: {err}");
    }
}

#[test]
fn a_bad_otlp_endpoint_exits_64() {
    for (name, bin) in binaries() {
        let (code, err) = run(&bin, &[("TETHER_OTLP_ENDPOINT", "collector:4318")]);
        assert_eq!(code, Some(64), "{name}: {err}");
        assert!(err.contains("otlp_endpoint"), "{name} says why: {err}");
    }
}

#[test]
fn a_bad_bus_setting_exits_64() {
    for (name, bin) in binaries() {
        let (code, err) = run(&bin, &[("TETHER_MAX_CONCURRENCY", "many")]);
        assert_eq!(code, Some(64), "{name}: {err}");
        assert!(
            err.to_lowercase().contains("max_concurrency"),
            "{name} says why: {err}"
        );
    }
}
