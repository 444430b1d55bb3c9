//! Unit tests of `validate_create` and the checks it is made of.

use super::*;
use crate::config::AllowedMount;

fn policy() -> Policy {
    Policy {
        cfg: OrchestratorConfig {
            allowed_networks: vec!["shared-cache".into()],
            allowed_mounts: vec![
                AllowedMount {
                    path: "/srv/secrets".into(),
                    writable: false,
                },
                AllowedMount {
                    path: "/srv/agents/{space}".into(),
                    writable: true,
                },
            ],
            ..Default::default()
        },
        host_id: "h1".into(),
        host_cpus: 2.0,
        host_memory_mb: 4096,
        container_nats_url: "nats://host.docker.internal:4222".into(),
        subject_prefix: None,
    }
}

fn req() -> CreateContainerRequest {
    CreateContainerRequest {
        image: "tether-test/busybox:latest".into(),
        ..Default::default()
    }
}

fn check(r: CreateContainerRequest) -> Result<ContainerSpec, Problem> {
    validate_create(&r, "s1", "a1", &policy(), chrono::Utc::now())
}

#[test]
fn defaults_are_hardened_and_labelled() {
    let s = check(req()).expect("valid");
    assert_eq!(s.kind, Kind::Space);
    assert_eq!(
        (s.memory_mb, s.cpu_limit, s.pids_limit),
        (512, 1.0, 256),
        "limits always set"
    );
    assert!(s.read_only_root);
    assert_eq!(s.writable_paths, vec!["/tmp".to_string()]);
    assert_eq!(s.labels[LABEL_MANAGED], "true");
    assert_eq!(s.labels[LABEL_SPACE], "s1");
    assert_eq!(s.labels[LABEL_HOST], "h1");
    assert_eq!(s.labels[LABEL_KIND], "space");
    assert!(s.labels.contains_key(LABEL_EXPIRES));
    assert!(s.env.contains(&"TETHER_SPACE=s1".to_string()));
    assert!(
        s.env
            .iter()
            .any(|e| e.starts_with("TETHER_NATS_URL=nats://"))
    );
    assert!(
        s.extra_hosts
            .contains(&"host.docker.internal:host-gateway".to_string())
    );
    assert_eq!(s.network_mode, "bridge");
    assert!(s.cmd.is_some(), "a space container gets the idle command");
    assert!(s.name.starts_with("tether-space-s1-"));
}

#[test]
fn bad_limits_are_refused() {
    let cases = [
        (-1, 0.0, 0, 0),
        (3, 0.0, 0, 0),
        (1_000_000, 0.0, 0, 0),
        (0, -1.0, 0, 0),
        (0, 65.0, 0, 0),
        (0, 3.0, 0, 0), // more than the host's 2 CPUs
        (0, f64::NAN, 0, 0),
        (0, 0.0, -5, 0),
        (0, 0.0, 1_000_000, 0),
        (0, 0.0, 0, -1),
    ];
    for (m, c, p, t) in cases {
        let mut r = req();
        r.resource_limits = Some(ResourceLimits {
            memory_mb: m,
            cpu_limit: c,
            pids_limit: p,
            timeout_seconds: t,
        });
        let e = check(r).expect_err("must be refused");
        assert_eq!(e.status, 400, "{m} {c} {p} {t}: {e}");
        assert!(e.detail.contains("resource_limits"), "{e}");
    }
}

#[test]
fn names_images_env_labels() {
    for n in ["-x", "a", "has space", "x/y", &"n".repeat(200)] {
        let mut r = req();
        r.name = n.to_string();
        assert_eq!(check(r).expect_err(n).status, 400, "{n}");
    }
    for i in ["", "UPPER SPACE", "a//b", "../x", "-x"] {
        let mut r = req();
        r.image = i.to_string();
        assert_eq!(check(r).expect_err(i).status, 400, "{i}");
    }
    let mut r = req();
    r.env.insert("TETHER_SPACE".into(), "other".into());
    assert!(
        check(r)
            .expect_err("reserved")
            .detail
            .contains("TETHER_SPACE")
    );
    let mut r = req();
    r.env.insert("1BAD".into(), "x".into());
    assert_eq!(check(r).expect_err("name").status, 400);
    let mut r = req();
    r.labels.insert("tether.space".into(), "other".into());
    assert!(check(r).expect_err("label").detail.contains("reserved"));
    let mut r = req();
    r.kind = "daemon".into();
    assert_eq!(check(r).expect_err("kind").status, 400);
}

#[test]
fn network_modes() {
    let mut r = req();
    r.network_mode = "host".into();
    assert_eq!(check(r).expect_err("host").status, 403);
    let mut r = req();
    r.network_mode = "container:abc".into();
    assert_eq!(check(r).expect_err("container").status, 403);
    let mut r = req();
    r.kind = "tool".into();
    let s = check(r).expect("tool");
    assert_eq!(s.network_mode, "none");
    assert!(s.extra_hosts.is_empty());
    assert!(s.cmd.is_none());
    let mut r = req();
    r.extra_hosts = vec!["db:not-an-ip".into()];
    assert_eq!(check(r).expect_err("extra").status, 400);
    // Names on the allowlist only: an id, an id prefix or any other name is refused.
    for (mode, ok) in [
        ("none", true),
        ("bridge", true),
        ("shared-cache", true),
        ("3f", false),
        ("a", false),
        ("9c1d0e2b7a44", false),
        ("other-net", false),
        ("tether-session.s1.x", false),
    ] {
        let mut r = req();
        r.network_mode = mode.into();
        match check(r) {
            Ok(s) => assert!(ok && s.network_mode == mode, "{mode}"),
            Err(e) => assert!(!ok && e.status == 403, "{mode}: {}", e.detail),
        }
    }
}

#[test]
fn mounts_follow_the_allowlist() {
    let m = |source: &str, target: &str, writable: bool| MountSpec {
        source: source.into(),
        target: target.into(),
        writable,
    };
    let mut r = req();
    r.mounts = vec![
        m("/srv/secrets/api", "/run/secrets", false),
        m("/srv/agents/s1/auth", "/home/auth", true),
    ];
    let s = check(r).expect("allowed");
    assert_eq!(s.mounts.len(), 2);
    assert!(!s.mounts[0].writable);
    for (mm, status) in [
        (m("/etc", "/x", false), 403),
        (m("/srv/secrets2/x", "/x", false), 403),
        (m("/srv/secrets", "/x", true), 403),
        (m("/srv/agents/s2/auth", "/x", false), 403),
        (m("/srv/secrets/../../etc", "/x", false), 400),
        (m("relative", "/x", false), 400),
        (m("/srv/secrets", "/proc/x", false), 400),
        (m("/srv/secrets", "/", false), 400),
    ] {
        let mut r = req();
        r.mounts = vec![mm.clone()];
        assert_eq!(check(r).expect_err("refused").status, status, "{mm:?}");
    }
}

#[test]
fn commands() {
    use tether_proto::to_pb_value;
    let c = |v: serde_json::Value| parse_command(Some(&to_pb_value(v)));
    assert_eq!(
        c(serde_json::json!("echo hi")).expect("s"),
        Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
    );
    assert_eq!(
        c(serde_json::json!(["true"])).expect("l"),
        Some(vec!["true".into()])
    );
    assert!(c(serde_json::json!(5)).is_err());
    assert!(c(serde_json::json!([])).is_err());
    assert!(c(serde_json::json!([1])).is_err());
    assert!(c(serde_json::json!("  ")).is_err());
    assert_eq!(c(serde_json::Value::Null).expect("null"), None);
}

#[test]
fn writable_paths_and_workdir() {
    let mut r = req();
    r.workdir = "/work".into();
    r.writable_paths = vec!["/data".into()];
    let s = check(r).expect("ok");
    assert_eq!(s.writable_paths, vec!["/tmp", "/work", "/data"]);
    let mut r = req();
    r.writable_paths = vec!["/proc".into()];
    assert_eq!(check(r).expect_err("proc").status, 400);
    let mut r = req();
    r.writable_root = true;
    assert!(check(r).expect("rw").writable_paths.is_empty());
}

#[test]
fn nats_url_for_containers() {
    assert_eq!(
        container_nats_url("", "nats://127.0.0.1:4222,nats://localhost:4223"),
        "nats://host.docker.internal:4222,nats://host.docker.internal:4223"
    );
    assert_eq!(
        container_nats_url("nats://bus:4222", "x"),
        "nats://bus:4222"
    );
    // The node's own credentials never reach a container.
    assert_eq!(
        container_nats_url("", "nats://admin:secret@127.0.0.1:4222"),
        "nats://host.docker.internal:4222"
    );
    assert_eq!(
        container_nats_url("nats://node:pw@bus:4222", "x"),
        "nats://bus:4222"
    );
}

/// The create cases of what was the end-to-end bad-input test (the orchestrator's and the
/// tools' one): each refused before the engine is asked anything.
#[test]
fn bad_create_requests_are_refused() {
    use crate::testing::{decode, refused};
    use serde_json::json;
    let img = "tether-test/busybox:latest";
    let now = chrono::Utc::now();
    let cases = [
        (json!({"image": img, "name": "bad name!"}), 400, "name"),
        (json!({"image": img, "name": "-x"}), 400, "name"),
        (json!({}), 400, "image"),
        (
            json!({"image": img, "resource_limits": {"memory_mb": -1}}),
            400,
            "memory_mb",
        ),
        (
            json!({"image": img, "resource_limits": {"memory_mb": 1_000_000_000}}),
            400,
            "memory_mb",
        ),
        (
            json!({"image": img, "resource_limits": {"cpu_limit": -0.5}}),
            400,
            "cpu_limit",
        ),
        (
            json!({"image": img, "resource_limits": {"cpu_limit": 1000}}),
            400,
            "cpu_limit",
        ),
        (
            json!({"image": img, "resource_limits": {"pids_limit": -1}}),
            400,
            "pids_limit",
        ),
        (
            json!({"image": img, "resource_limits": {"timeout_seconds": -5}}),
            400,
            "timeout_seconds",
        ),
        (json!({"image": img, "kind": "daemon"}), 400, "kind"),
        (
            json!({"image": img, "network_mode": "host"}),
            403,
            "network_mode",
        ),
        (
            json!({"image": img, "mounts": [{"source": "/etc", "target": "/x"}]}),
            403,
            "/etc",
        ),
        (
            json!({"image": img, "env": {"TETHER_SPACE": "x"}}),
            400,
            "TETHER_SPACE",
        ),
        (
            json!({"image": img, "labels": {"tether.managed": "false"}}),
            400,
            "reserved",
        ),
        (json!({"image": img, "command": 5}), 400, "command"),
        // Even an operator may not name a session network.
        (
            json!({"image": img, "kind": "tool", "network_mode": "tether-session.s1.x"}),
            403,
            "network",
        ),
    ];
    for (body, status, word) in cases {
        let r: CreateContainerRequest = decode(&body).expect("decodes");
        refused(
            validate_create(&r, "s1", "a1", &Policy::for_tests(), now),
            status,
            word,
            &body.to_string(),
        );
    }
    // What the node cannot decode is refused before validation.
    refused(
        decode::<CreateContainerRequest>(&json!({"image": img, "imgae": "typo"})),
        400,
        "imgae",
        "unknown field",
    );
    for raw in ["{nope", "[1,2]", "\"x\""] {
        let r = tether_bus::Encoding::Json.decode::<CreateContainerRequest>(raw.as_bytes());
        refused(r, 400, "malformed", raw);
    }
}
