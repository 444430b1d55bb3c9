//! The Kubernetes manifests (`deploy/k8s`). `scripts/check-k8s.py` (also `just k8s-check`)
//! renders them with `kubectl kustomize`, validates every object against the Kubernetes API's
//! schemas (kubernetes-validate, strict) and checks the invariants schemas cannot see; here it
//! must pass on the manifests and refuse broken variants of them, and the NATS configuration
//! the StatefulSet mounts must be one nats-server accepts next to the `authorization.conf` that
//! `tether bus init` writes (the Secret's content).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root")
}

/// `scripts/check-k8s.py <dir>`: its exit code and everything it printed.
fn check(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new("python3")
        .arg(repo().join("scripts/check-k8s.py"))
        .arg(dir)
        .current_dir(repo())
        .output()
        .expect("run python3 scripts/check-k8s.py");
    (out.status.code(), text(&out))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_manifests_render_validate_and_keep_their_invariants() {
    let (code, out) = check(&repo().join("deploy/k8s"));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("every invariant holds"), "{out}");
}

/// A kustomization in a temporary folder: `deploy/k8s` plus `extra` (patches, generators).
fn overlay(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    // kustomize takes another kustomization only by a relative path.
    let up = "../".repeat(dir.path().components().count() - 1);
    let base = repo().join("deploy/k8s");
    let base = base.strip_prefix("/").expect("an absolute path");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!("resources:\n  - {up}{}\n{extra}", base.display()),
    )
    .expect("write kustomization.yaml");
    dir
}

/// A JSON 6902 patch of one object, as `extra` for [`overlay`].
fn patch(kind: &str, name: &str, ops: &str) -> String {
    let ops = ops.replace('\n', "\n      ");
    format!("patches:\n  - target: {{kind: {kind}, name: {name}}}\n    patch: |\n      {ops}\n")
}

#[test]
fn the_check_refuses_broken_manifests() {
    let sc = "/spec/template/spec/containers/0/securityContext";
    let cases = [
        (
            "an unknown field",
            patch(
                "Deployment",
                "shell-server",
                "- {op: add, path: /spec/replica, value: 2}",
            ),
            "'replica' was unexpected",
        ),
        (
            "a value of the wrong type",
            patch(
                "StatefulSet",
                "nats",
                "- {op: replace, path: /spec/replicas, value: three}",
            ),
            "'three' is not of type 'integer'",
        ),
        (
            "a container that may run as root",
            patch(
                "Deployment",
                "a2a-gateway",
                &format!("- {{op: replace, path: {sc}/runAsNonRoot, value: false}}"),
            ),
            "Deployment/a2a-gateway container a2a-gateway: not runAsNonRoot",
        ),
        (
            "a writable root filesystem",
            patch(
                "DaemonSet",
                "container-orchestrator",
                &format!("- {{op: remove, path: {sc}/readOnlyRootFilesystem}}"),
            ),
            "root filesystem not readOnlyRootFilesystem",
        ),
        (
            "a Deployment without a readiness probe",
            patch(
                "Deployment",
                "permission-node",
                "- {op: remove, path: /spec/template/spec/containers/0/readinessProbe}",
            ),
            "Deployment/permission-node container permission-node: no readinessProbe",
        ),
        (
            "a one-member bus",
            patch(
                "StatefulSet",
                "nats",
                "- {op: replace, path: /spec/replicas, value: 1}",
            ),
            "NATS needs 3 replicas",
        ),
        (
            "an orchestrator without the Docker socket",
            patch(
                "DaemonSet",
                "container-orchestrator",
                "- {op: remove, path: /spec/template/spec/containers/0/volumeMounts/0}",
            ),
            "does not mount the host's /var/run/docker.sock",
        ),
        (
            "a node with another node's bus key",
            patch(
                "Deployment",
                "model-gateway",
                "- {op: replace, path: /spec/template/spec/containers/0/env/0/value, value: /etc/tether/bus-keys/permission-node.nk}",
            ),
            "is not model-gateway's own key",
        ),
        (
            "a key in the repository",
            "secretGenerator:\n  - name: leaked\n    literals: [key=value]\n".to_string(),
            "a Secret is rendered",
        ),
    ];
    for (what, extra, expected) in cases {
        let dir = overlay(&extra);
        let (code, out) = check(dir.path());
        assert_eq!(code, Some(1), "{what}: the check should refuse it:\n{out}");
        assert!(
            out.contains(expected),
            "{what}: expected {expected:?} in:\n{out}"
        );
    }
}

#[test]
fn the_nats_configuration_is_accepted_with_the_bus_authorization() {
    let dir = tempfile::tempdir().expect("tmp");
    let tether = tether_testkit::cargo_bin("tether").expect("tether binary");
    let init = Command::new(tether)
        .args(["bus", "init", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run tether bus init");
    assert!(init.status.success(), "{}", text(&init));
    // As the pod mounts them: nats.conf beside the Secret's authorization.conf.
    std::fs::copy(
        repo().join("deploy/k8s/nats.conf"),
        dir.path().join("nats.conf"),
    )
    .expect("copy nats.conf");
    let server = tether_testkit::nats_server_binary().expect("nats-server");
    let test = |server_name: Option<&str>| {
        let mut cmd = Command::new(&server);
        cmd.arg("-c").arg(dir.path().join("nats.conf")).arg("-t");
        cmd.env_remove("SERVER_NAME");
        if let Some(n) = server_name {
            cmd.env("SERVER_NAME", n);
        }
        cmd.output().expect("run nats-server -t")
    };
    let ok = test(Some("nats-0"));
    assert!(ok.status.success(), "{server}: {}", text(&ok));
    // The check is real: without the pod's SERVER_NAME the configuration is refused.
    let refused = test(None);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("SERVER_NAME"), "{}", text(&refused));
}
