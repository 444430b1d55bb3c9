//! `tether up` with `[[workers]]`: a fleet of the permission node and the orchestrator (the
//! workspace's binaries, built by `cargo build --workspace --bins`) on the real engine, whose
//! launch file deploys a worker with 2 replicas of an agent it registers `workers:hosted`.
//! Each replica gets its token file; Ctrl-C removes the replicas before the nodes stop. A
//! deployment the orchestrator refuses stops the bringup with its answer; an entry that is
//! wrong on its face stops it before anything starts.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_testkit::docker::{Cleanup, busybox_image, host_label, labeled_containers, run};
use tether_testkit::{cargo_bin, free_port, unique};

const WAIT: Duration = Duration::from_secs(120);

/// `tether up` running in `work`, its output lines collected.
struct Up {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Up {
    fn start(work: &Path, launch: &Path) -> Up {
        let url = format!("nats://127.0.0.1:{}", free_port().expect("a free port"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        for (k, _) in std::env::vars() {
            if (k.starts_with("TETHER_") && k != "TETHER_NATS_SERVER") || k == "NATS_URL" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["up", "--server", &url, "--launch"])
            .arg(launch)
            .current_dir(work)
            .env("TETHER_SIGNING_KEY_FILE", work.join("key.pem"))
            .env("TETHER_BUS_KEYS_DIR", work.join("bus-keys"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tether up");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            let l2 = l.clone();
            let errs = std::thread::spawn(move || {
                for line in BufReader::new(err.expect("stderr"))
                    .lines()
                    .map_while(Result::ok)
                {
                    l2.lock().expect("lock").push(line);
                }
            });
            for line in BufReader::new(out.expect("stdout"))
                .lines()
                .map_while(Result::ok)
            {
                l.lock().expect("lock").push(line);
            }
            let _ = errs.join();
        });
        Up {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// Waits for a line containing `needle`; panics if `tether up` exits first.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.lines().iter().any(|l| l.contains(needle)) {
            assert!(
                self.child.try_wait().expect("wait").is_none(),
                "tether up exited before {needle:?}: {:#?}",
                self.lines()
            );
            assert!(
                Instant::now() < deadline,
                "no {needle:?}: {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its exit code (within [`WAIT`]) and every line it printed.
    fn exit(&mut self) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "tether up did not stop: {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(r) = self.reader.take() {
            r.join().expect("reader");
        }
        (status.code(), self.lines())
    }

    fn interrupt(&self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("SIGINT");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A launch file in `work`: the permission node and the orchestrator for `host`, then
/// `workers` (TOML).
fn launch_file(work: &Path, host: &str, workers: &str) -> std::path::PathBuf {
    let js = work.join("js");
    std::fs::write(
        work.join("nats.conf"),
        format!(
            "jetstream {{ store_dir: {:?} }}\n",
            js.display().to_string()
        ),
    )
    .expect("server conf");
    let bin = |n: &str| {
        cargo_bin(n)
            .expect("node binary built")
            .display()
            .to_string()
    };
    let text = format!(
        r#"
[bus]
server_config = "nats.conf"

[[nodes]]
name = "permission-node"
command = {perm:?}
env = {{ TETHER_CREATE_SIGNING_KEY = "true" }}

[[nodes]]
name = "container-orchestrator"
command = {orch:?}
env = {{ TETHER_HOST_ID = {host:?}, TETHER_JANITOR_INTERVAL_SECONDS = "1" }}
depends_on = ["permission-node"]

{workers}
"#,
        perm = bin("permission-node"),
        orch = bin("container-orchestrator"),
    );
    let p = work.join("launch.toml");
    std::fs::write(&p, text).expect("launch file");
    p
}

/// A replica that says so once its token file is there, then waits for SIGTERM.
const COMMAND: &str = r#"while [ ! -s "$TETHER_TOKEN_FILE" ]; do sleep 0.2; done; echo token-ok; trap 'exit 0' TERM; while :; do sleep 1; done"#;

#[test]
fn up_deploys_the_launch_files_workers_and_removes_them_on_ctrl_c() {
    let image = busybox_image().expect("test image");
    let work = tempfile::tempdir().expect("tmp");
    let (host, name, agent) = (unique("upw"), unique("w"), unique("agent"));
    let mut cleanup = Cleanup::default();
    cleanup.label(host_label(&host));
    let workers = format!(
        r#"
[[workers]]
name = {name:?}
agent = {agent:?}
image = {image:?}
command = {COMMAND:?}
env = {{ MODE = "a" }}
replicas = 2
register = {{ space = "workers", scopes = ["a2a:serve"] }}
"#
    );
    let launch = launch_file(work.path(), &host, &workers);
    let mut up = Up::start(work.path(), &launch);
    up.wait_for(&format!(
        "worker `{name}` deployed: 2 replicas of agent `{agent}`"
    ));
    up.wait_for("fleet is up");

    // Both replicas run, each got its token (the agent was registered `workers:hosted`).
    let label = format!("tether.worker={name}");
    let deadline = Instant::now() + WAIT;
    loop {
        let replicas = labeled_containers(&label);
        let ok = replicas.len() == 2
            && replicas
                .iter()
                .all(|c| run(&["logs", c]).contains("token-ok"));
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two replicas with their token: {replicas:?} {:#?}",
            up.lines()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in labeled_containers(&label) {
        let env = run(&["inspect", "-f", "{{.Config.Env}}", &c]);
        assert!(env.contains("MODE=a"), "{env}");
    }

    up.interrupt();
    let (code, lines) = up.exit();
    assert_eq!(code, Some(0), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("worker `{name}` removed"))),
        "{lines:#?}"
    );
    assert!(
        labeled_containers(&label).is_empty(),
        "replicas left after Ctrl-C"
    );
    assert!(labeled_containers(&host_label(&host)).is_empty());
}

#[test]
fn a_refused_deployment_stops_the_bringup_and_a_bad_entry_starts_nothing() {
    let image = busybox_image().expect("test image");
    let work = tempfile::tempdir().expect("tmp");
    let host = unique("upw");
    let mut cleanup = Cleanup::default();
    cleanup.label(host_label(&host));

    // Wrong on its face: refused when the file is read, nothing started.
    let bad = format!(
        "[[workers]]\nname = \"w\"\nagent = \"a\"\nimage = {image:?}\nreplicas = 5\nmax_replicas = 2\n"
    );
    let launch = launch_file(work.path(), &host, &bad);
    let (code, lines) = Up::start(work.path(), &launch).exit();
    assert_eq!(code, Some(64), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("worker `w`") && l.contains("max_replicas")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("started")), "{lines:#?}");

    // An agent nobody registered: the orchestrator's refusal, and everything stops.
    let name = unique("w");
    let unknown = format!(
        "[[workers]]\nname = {name:?}\nagent = \"nobody\"\nimage = {image:?}\ncommand = \"sleep 60\"\n"
    );
    let launch = launch_file(work.path(), &host, &unknown);
    let (code, lines) = Up::start(work.path(), &launch).exit();
    assert_eq!(code, Some(1), "{lines:#?}");
    assert!(
        lines.iter().any(
            |l| l.contains(&format!("worker `{name}`: workers.deploy refused (404)"))
                && l.contains("no agent `nobody`")
        ),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("nats-server stopped")),
        "{lines:#?}"
    );
    assert!(labeled_containers(&host_label(&host)).is_empty());
}
