//! The one way the Docker tests and the bench run the daemon as PID 1 of a container: on the
//! bus a space's daemon gets in production — a server containers reach (all interfaces, seen
//! from the container through `host.docker.internal`), the permission node's auth callout, and
//! the daemon's own identity from `tokens.daemon`, asked as the orchestrator's NATS user.

use std::path::Path;

use tether_testkit::docker::TEST_RUN_LABEL;
use tether_testkit::{Fleet, NatsServer, NodeKind, unique};

/// Where the token file is mounted in the container.
pub const TOKEN_PATH: &str = "/run/tether/daemon-token";

/// A fleet on a server containers reach, and a daemon token of `space` written to a file in
/// `dir` (returned).
pub async fn fleet_with_daemon_token(space: &str, dir: &Path) -> (Fleet, std::path::PathBuf) {
    let nats = NatsServer::start_for_containers()
        .await
        .expect("nats-server for containers");
    let f = Fleet::on(nats, Default::default())
        .await
        .expect("the permission node");
    let orch = f
        .connect_node(NodeKind::Orchestrator)
        .await
        .expect("the orchestrator's user connects");
    let issued = tether_testkit::call(
        &orch,
        "tokens.daemon",
        serde_json::json!({"space": space}),
        None,
    )
    .await
    .expect("a daemon token");
    let token = issued["token"].as_str().expect("a token");
    let file = dir.join("daemon-token");
    std::fs::write(&file, token).expect("token file");
    (f, file)
}

/// Where a pool container's daemon waits for its bind file.
pub const BIND_PATH: &str = "/run/tether/bind";

/// `docker run -d` of the busybox test image with the static `tether-spaced` (bind-mounted
/// read-only) as its entrypoint and `sleep 100000` as the main workload, every capability
/// dropped, no new privileges, `pids_limit`, on the default bridge network, on the fleet's
/// server. Labelled for the fleet's engine cleanup. Returns the container id.
///
/// `serving: Some((token_file, space))`: it serves `space` with `token_file` (mounted
/// read-only). `None`: pool mode, as the orchestrator makes a warm container — no space, no
/// token yet; `/run/tether` is an anonymous tmpfs volume (removed with the container) that
/// the engine's archive API (`docker cp`) writes into, and the daemon waits for [`BIND_PATH`].
pub fn run_container(f: &mut Fleet, serving: Option<(&Path, &str)>, pids_limit: u32) -> String {
    let args = match serving {
        Some((token_file, space)) => [
            "-v".to_string(),
            format!("{}:{TOKEN_PATH}:ro", token_file.display()),
            "-e".into(),
            format!("TETHER_SPACE_ID={space}"),
        ],
        None => [
            "--mount".into(),
            "type=volume,dst=/run/tether,volume-opt=type=tmpfs,volume-opt=device=tmpfs".into(),
            "-e".into(),
            format!("TETHER_DAEMON_BIND_FILE={BIND_PATH}"),
        ],
    };
    docker_run(f, pids_limit, &args)
}

/// The `docker run` of [`run_container`], with `args` (mounts, environment) added.
fn docker_run(f: &mut Fleet, pids_limit: u32, args: &[String]) -> String {
    let image = tether_testkit::docker::busybox_image().expect("the busybox test image");
    let spaced = tether_testkit::spaced_static().expect("the static tether-spaced");
    let label = format!("{TEST_RUN_LABEL}={}", unique("spaced"));
    f.engine.label(label.clone());
    let url = format!("nats://host.docker.internal:{}", f.nats.port());
    let out = std::process::Command::new("docker")
        .args(["run", "-d", "--label", &label])
        .args(["--add-host", "host.docker.internal:host-gateway"])
        .args(["--pids-limit", &pids_limit.to_string()])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .args(["-v", &format!("{}:/tether-spaced:ro", spaced.display())])
        .args(args)
        .args(["-e", &format!("TETHER_NATS_URL={url}")])
        .args(["-e", &format!("TETHER_DAEMON_TOKEN_FILE={TOKEN_PATH}")])
        .args(["--entrypoint", "/tether-spaced", &image])
        .args(["--", "sleep", "100000"])
        .output()
        .expect("docker run");
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
