//! `tether workers deploy|ls|scale|rm` against a fleet with the orchestrator binary on the real
//! engine (built by `cargo build --workspace --bins`, as `just test` does).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{tether, text};
use tether_testkit::docker::{busybox_image, host_label, labeled_containers};
use tether_testkit::{Fleet, NodeKind, cargo_bin, eventually, unique};

/// The orchestrator binary for `host` (SIGKILLed on drop).
struct Orchestrator(std::process::Child);

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_deploy_ls_scale_rm() {
    let image = busybox_image().expect("test image");
    let mut f = Fleet::start().await.expect("fleet");
    // `workers.deploy` refuses an agent not marked `workers:hosted`.
    f.agent("bot", "workers", &["workers:hosted"]).await;
    let host = unique("cli");
    f.clean_label(host_label(&host));
    let bus = f.node_bus(NodeKind::Orchestrator);
    let mut cmd = Command::new(cargo_bin("container-orchestrator").expect("orchestrator built"));
    if let Some(seed) = &bus.nats_nkey_file {
        cmd.env("TETHER_NATS_NKEY_FILE", seed);
    }
    let _orch = Orchestrator(
        cmd.env("TETHER_NATS_URL", &bus.nats_url)
            .env("TETHER_HOST_ID", &host)
            .env("TETHER_JANITOR_INTERVAL_SECONDS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn container-orchestrator"),
    );
    let url = f.nats.plain_url();
    let op = f.op.clone();
    eventually(Duration::from_secs(30), "orchestrator answers", || async {
        f.call("workers.list", "{}", Some(&op))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let name = unique("w");
    let replicas = || labeled_containers(&format!("tether.worker={name}"));

    let out = tether(
        &[
            "workers",
            "deploy",
            &name,
            "--agent",
            "bot",
            "--image",
            &image,
            "--replicas",
            "2",
            "--max",
            "3",
            "--env",
            "MODE=a",
            "--server",
            &url,
            "--",
            "sh",
            "-c",
            "while :; do sleep 1; done",
        ],
        &op,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{name} changed: 2 replicas, generation 1")),
        "{}",
        text(&out)
    );
    eventually(Duration::from_secs(30), "two replicas", || async {
        (replicas().len() == 2).then_some(())
    })
    .await;

    let out = tether(&["workers", "ls", "--server", &url], &op).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("no row: {table}"));
    assert!(row.contains("bot") && row.contains(&host), "{row}");

    let out = tether(&["workers", "scale", &name, "3", "--server", &url], &op).await;
    assert!(out.status.success(), "{}", text(&out));
    eventually(Duration::from_secs(30), "three replicas", || async {
        (replicas().len() == 3).then_some(())
    })
    .await;
    // Beyond max: the service's refusal, exit 1.
    let out = tether(&["workers", "scale", &name, "4", "--server", &url], &op).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // A bad --env is a usage error, sent nowhere.
    let out = tether(
        &[
            "workers", "deploy", &name, "--agent", "bot", "--image", &image, "--env", "X",
            "--server", &url,
        ],
        &op,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = tether(&["workers", "rm", &name, "--server", &url], &op).await;
    assert!(out.status.success(), "{}", text(&out));
    eventually(Duration::from_secs(30), "no replica left", || async {
        replicas().is_empty().then_some(())
    })
    .await;
}
