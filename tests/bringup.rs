//! `tether up` on the default launch file: a server and the listed nodes come up, `tether ps`
//! lists them, and Ctrl-C leaves no process behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn up_default_launch_file_then_ps_then_ctrl_c_leaves_nothing() {
    let tether = tether_testkit::cargo_bin("tether").expect("tether binary");
    let launch = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/bringup.toml");
    let work = tempfile::tempdir().expect("tmp");
    let url = format!("nats://127.0.0.1:{}", free_port());
    let mut up = Command::new(&tether)
        .args(["up", "--launch", launch, "--server", &url])
        .current_dir(work.path())
        .env("TETHER_SIGNING_KEY_FILE", work.path().join("key.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tether up");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = up.stdout.take().expect("stdout");
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().expect("lock").push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines
        .lock()
        .expect("lock")
        .iter()
        .any(|l| l.contains("fleet is up"))
    {
        assert!(
            up.try_wait().expect("wait").is_none(),
            "tether up exited early: {:?}",
            lines.lock().expect("lock")
        );
        assert!(
            Instant::now() < deadline,
            "fleet not up in 60 s: {:?}",
            lines.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The bus refuses anonymous connections: `tether ps` connects with an operator token it
    // signs from the fleet's signing key.
    let ps = Command::new(&tether)
        .args(["ps", "--server", &url])
        .env("TETHER_SIGNING_KEY_FILE", work.path().join("key.pem"))
        .output()
        .expect("ps");
    let table = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.status.success(), "{table}");
    assert!(
        table.contains("permission-node") && table.contains("agents.register"),
        "{table}"
    );
    assert!(
        table.contains("container-orchestrator") && table.contains("containers.exec"),
        "{table}"
    );
    assert!(
        table.contains("shell-server") && table.contains("shell.exec"),
        "{table}"
    );
    assert!(
        table.contains("a2a-gateway") && table.contains("a2a.*.send"),
        "{table}"
    );
    assert!(
        table.contains("model-gateway") && table.contains("model.models"),
        "{table}"
    );

    // A call through the fleet with an operator token made offline from the dev key.
    let token = Command::new(&tether)
        .args(["token", "issue", "--operator", "--key-file"])
        .arg(work.path().join("key.pem"))
        .output()
        .expect("token");
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let reg = Command::new(&tether)
        .args([
            "agent",
            "register",
            "agent-1",
            "--space",
            "space-1",
            "--scope",
            "shell:exec",
            "--server",
            &url,
            "--token",
            &token,
        ])
        .output()
        .expect("register");
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let issued = Command::new(&tether)
        .args([
            "token", "issue", "--agent", "agent-1", "--server", &url, "--token", &token,
        ])
        .output()
        .expect("issue");
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&issued.stdout)
            .trim()
            .split('.')
            .count(),
        3,
        "the token alone on stdout"
    );
    let bad = Command::new(&tether)
        .args([
            "call",
            "/agents/get",
            r#"{"agent_id":"nobody"}"#,
            "--server",
            &url,
            "--token",
            &token,
        ])
        .output()
        .expect("call");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // The model gateway with no providers: it answers, with no models.
    let models = Command::new(&tether)
        .args([
            "call",
            "model.models",
            "{}",
            "--server",
            &url,
            "--token",
            &token,
        ])
        .output()
        .expect("call");
    let out = String::from_utf8_lossy(&models.stdout);
    assert!(
        models.status.success(),
        "{}",
        String::from_utf8_lossy(&models.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("model.models answers JSON");
    // proto3 JSON leaves an empty list out.
    assert!(v.is_object(), "{out}");
    assert_eq!(
        v["models"].as_array().map_or(0, Vec::len),
        0,
        "no providers, no models: {out}"
    );
    let none = Command::new(&tether)
        .args(["call", "nobody.home", "--server", &url])
        .output()
        .expect("call");
    assert_eq!(
        none.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );

    // Ctrl-C.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "tether up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().expect("reader");
    assert!(status.success(), "{status}");
    let lines = lines.lock().expect("lock").clone();
    let pids: Vec<i32> = lines
        .iter()
        .filter(|l| l.starts_with("[tether] started"))
        .filter_map(|l| {
            l.split("pid ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        pids.len() >= 2,
        "a nats-server and a node were started: {lines:?}"
    );
    for pid in pids {
        assert!(!alive(pid), "process {pid} is still alive after Ctrl-C");
    }
}

#[test]
fn depends_on_is_enforced_and_dead_nodes_restart() {
    let tether = tether_testkit::cargo_bin("tether").expect("tether binary");
    let node = env!("CARGO_BIN_EXE_tether-test-node");
    let work = tempfile::tempdir().expect("tmp");
    let launch = work.path().join("launch.toml");
    std::fs::write(
        &launch,
        format!(
            r#"
[[nodes]]
name = "second"
command = "{node}"
env = {{ TETHER_NODE_NAME = "second" }}
depends_on = ["first"]
bus_user = "admin"

[[nodes]]
name = "first"
command = "{node}"
env = {{ TETHER_NODE_NAME = "first" }}
replicas = 2
restart = "on-failure"
bus_user = "admin"
"#
        ),
    )
    .expect("write");
    let url = format!("nats://127.0.0.1:{}", free_port());
    let mut up = Command::new(&tether)
        .args(["up", "--server", &url, "--launch"])
        .arg(&launch)
        .current_dir(work.path())
        .env("TETHER_BUS_KEYS_DIR", work.path().join("bus-keys"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tether up");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = up.stdout.take().expect("stdout");
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().expect("lock").push(line);
        }
    });
    let wait_for = |what: &str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = lines
                .lock()
                .expect("lock")
                .iter()
                .find(|l| l.contains(what))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no `{what}` in {:?}",
                lines.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("fleet is up", 60);
    let snapshot = lines.lock().expect("lock").clone();
    let pos = |p: &str| {
        snapshot
            .iter()
            .position(|l| l.contains(p))
            .unwrap_or_else(|| panic!("no `{p}` in {snapshot:?}"))
    };
    assert!(
        pos("first is ready") < pos("started [second#0]"),
        "second started before first was ready: {snapshot:?}"
    );
    // Kill one replica of `first`: it comes back.
    let started = wait_for("started [first#1] pid", 1);
    let pid: i32 = started
        .rsplit("pid ")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for("[first#1] restarted", 30);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(up.wait().expect("wait").success());
    reader.join().expect("reader");
    let all = lines.lock().expect("lock").clone();
    let pids: Vec<i32> = all
        .iter()
        .filter(|l| l.starts_with("[tether] started") || l.contains("restarted, pid"))
        .filter_map(|l| {
            l.split("pid ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    for pid in pids {
        assert!(!alive(pid), "process {pid} is still alive");
    }
    // Stopped in reverse order.
    assert!(
        all.iter().position(|l| l.contains("second stopped"))
            < all.iter().position(|l| l.contains("first stopped")),
        "{all:?}"
    );
}

#[test]
fn a_bad_launch_file_exits_64() {
    let tether = tether_testkit::cargo_bin("tether").expect("tether binary");
    let work = tempfile::tempdir().expect("tmp");
    let launch = work.path().join("bad.toml");
    std::fs::write(
        &launch,
        "[[nodes]]\nname = \"a\"\ncommand = \"x\"\ndepends_on = [\"ghost\"]\n",
    )
    .expect("write");
    let out = Command::new(&tether)
        .args(["up", "--launch"])
        .arg(&launch)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));
}
