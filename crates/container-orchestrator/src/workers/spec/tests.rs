//! Unit tests of a deploy request's checks, a replica's container and slot assignment.

use super::*;
use crate::labels::{LABEL_EXPIRES, LABEL_KIND, LABEL_SPACE};

fn req() -> DeployWorkerRequest {
    DeployWorkerRequest {
        name: "echo".into(),
        agent_id: "bot".into(),
        image: "img".into(),
        replicas: 2,
        ..Default::default()
    }
}

fn check(r: DeployWorkerRequest) -> Result<DeployWorkerRequest, Problem> {
    validate_deploy(&r, &Policy::for_tests())
}

#[test]
fn defaults_are_filled_in() {
    let s = check(req()).expect("valid");
    assert_eq!((s.replicas, s.min_replicas, s.max_replicas), (2, 0, 2));
    assert_eq!(s.profile, DEFAULT_PROFILE);
    assert_eq!(s.restart, "always");
    let l = s.resource_limits.expect("limits");
    assert_eq!(
        (l.memory_mb, l.pids_limit, l.timeout_seconds),
        (512, 256, 0)
    );
    let s = check(DeployWorkerRequest {
        replicas: 0,
        min_replicas: 3,
        ..req()
    })
    .expect("valid");
    assert_eq!((s.replicas, s.max_replicas), (3, 3));
    let s = check(DeployWorkerRequest {
        replicas: 0,
        ..req()
    })
    .expect("valid");
    assert_eq!(s.replicas, 1);
    assert_eq!(
        (s.target_backlog_per_replica, s.scale_down_after_seconds),
        (0, 0)
    );
    // Scaled: 0 replicas when the minimum is 0, and the scaling defaults.
    let s = check(DeployWorkerRequest {
        replicas: 0,
        max_replicas: 4,
        ..req()
    })
    .expect("valid");
    assert_eq!((s.replicas, s.min_replicas, s.max_replicas), (0, 0, 4));
    assert_eq!(
        (s.target_backlog_per_replica, s.scale_down_after_seconds),
        (DEFAULT_TARGET_BACKLOG, DEFAULT_SCALE_DOWN_AFTER_SECONDS)
    );
}

#[test]
fn bad_input_is_refused() {
    let cases: Vec<(DeployWorkerRequest, u16, &str)> = vec![
        (
            DeployWorkerRequest {
                name: "".into(),
                ..req()
            },
            400,
            "`name` is required",
        ),
        (
            DeployWorkerRequest {
                name: "Bad_Name".into(),
                ..req()
            },
            400,
            "`name`",
        ),
        (
            DeployWorkerRequest {
                name: "-x".into(),
                ..req()
            },
            400,
            "`name`",
        ),
        (
            DeployWorkerRequest {
                name: "x".repeat(64),
                ..req()
            },
            400,
            "`name`",
        ),
        (
            DeployWorkerRequest {
                agent_id: "".into(),
                ..req()
            },
            400,
            "`agent_id`",
        ),
        (
            DeployWorkerRequest {
                agent_id: "a.b".into(),
                ..req()
            },
            400,
            "`agent_id`",
        ),
        (
            DeployWorkerRequest {
                image: "".into(),
                ..req()
            },
            400,
            "`image`",
        ),
        (
            DeployWorkerRequest {
                profile: "coder".into(),
                ..req()
            },
            422,
            "profile",
        ),
        (
            DeployWorkerRequest {
                restart: "sometimes".into(),
                ..req()
            },
            400,
            "`restart`",
        ),
        (
            DeployWorkerRequest {
                replicas: 3,
                max_replicas: 2,
                ..req()
            },
            400,
            "`replicas`",
        ),
        (
            DeployWorkerRequest {
                replicas: 1,
                min_replicas: 2,
                max_replicas: 4,
                ..req()
            },
            400,
            "`replicas`",
        ),
        (
            DeployWorkerRequest {
                min_replicas: 3,
                max_replicas: 2,
                ..req()
            },
            400,
            "`min_replicas`",
        ),
        (
            DeployWorkerRequest {
                target_backlog_per_replica: 10,
                ..req()
            },
            400,
            "`min_replicas` < `max_replicas`",
        ),
        (
            DeployWorkerRequest {
                max_replicas: 4,
                target_backlog_per_replica: 100_001,
                ..req()
            },
            400,
            "`target_backlog_per_replica`",
        ),
        (
            DeployWorkerRequest {
                max_replicas: 4,
                scale_down_after_seconds: 86_401,
                ..req()
            },
            400,
            "`scale_down_after_seconds`",
        ),
        (
            DeployWorkerRequest {
                max_replicas: 65,
                ..req()
            },
            400,
            "at most 64",
        ),
        (
            DeployWorkerRequest {
                resource_limits: Some(ResourceLimits {
                    timeout_seconds: 60,
                    ..Default::default()
                }),
                ..req()
            },
            400,
            "do not expire",
        ),
        (
            DeployWorkerRequest {
                resource_limits: Some(ResourceLimits {
                    memory_mb: 1,
                    ..Default::default()
                }),
                ..req()
            },
            400,
            "memory_mb",
        ),
        (
            DeployWorkerRequest {
                env: HashMap::from([("TETHER_TOKEN".to_string(), "x".to_string())]),
                ..req()
            },
            400,
            "TETHER_",
        ),
    ];
    for (r, status, needle) in cases {
        let p = check(r.clone()).expect_err(&format!("{r:?}"));
        assert_eq!(p.status, status, "{r:?}: {}", p.detail);
        assert!(
            p.detail.contains(needle),
            "{needle:?} not in {:?}",
            p.detail
        );
    }
}

#[test]
fn a_replica_is_a_hardened_worker_in_no_space() {
    let policy = Policy::for_tests();
    let spec = check(req()).expect("valid");
    let d = WorkerDeployment {
        spec: Some(spec),
        generation: 3,
        created_by: "op".into(),
        uid: "u1".into(),
        ..Default::default()
    };
    let c = replica(&d, 1, &policy).expect("replica");
    assert_eq!(c.kind, Kind::Worker);
    assert_eq!(c.labels[LABEL_KIND], "worker");
    assert_eq!(c.labels[LABEL_WORKER], "echo");
    assert_eq!(c.labels[LABEL_REPLICA], "1");
    assert_eq!(c.labels[LABEL_GENERATION], "3");
    assert_eq!(c.labels[LABEL_DEPLOYMENT], "u1");
    assert!(!c.labels.contains_key(LABEL_SPACE));
    assert!(!c.labels.contains_key(LABEL_EXPIRES));
    assert!(c.read_only_root);
    assert!(c.env.contains(&"TETHER_AGENT_ID=bot".to_string()));
    // The token's path, never a token; the file lives on the replica's secret volume.
    assert!(
        c.env
            .contains(&"TETHER_TOKEN_FILE=/run/tether/token".to_string())
    );
    assert!(!c.env.iter().any(|e| e.starts_with("TETHER_TOKEN=")));
    assert_eq!(c.secret_dir.as_deref(), Some("/run/tether"));
    assert!(c.env.contains(&format!("TETHER_WORKER_NAME={}", c.name)));
    assert!(!c.env.iter().any(|e| e.starts_with("TETHER_SPACE=")));
    assert_eq!(c.network_mode, "bridge");
    assert!(c.name.starts_with("tether-worker-echo-1-"), "{}", c.name);
}

#[test]
fn the_template_ignores_replica_counts() {
    let a = check(req()).expect("valid");
    let b = check(DeployWorkerRequest {
        replicas: 3,
        max_replicas: 5,
        ..req()
    })
    .expect("valid");
    assert_eq!(template(&a), template(&b));
    let mut env = req();
    env.env.insert("X".into(), "1".into());
    assert_ne!(template(&a), template(&check(env).expect("valid")));
}

/// A policy with profile `coder`: a fixed rw and ro mount, a host-gateway entry, bridge,
/// 1 GiB by default, requests may add read-only mounts from /srv/shared.
fn coder_policy() -> Policy {
    use crate::config::{AllowedMount, ProfileLimits, ProfileMount};
    let mut policy = Policy::for_tests();
    policy.cfg.profiles.insert(
        "coder".into(),
        Profile {
            mounts: vec![
                ProfileMount {
                    source: "/srv/auth".into(),
                    target: "/auth".into(),
                    mode: MountMode::Rw,
                },
                ProfileMount {
                    source: "/srv/secrets".into(),
                    target: "/secrets".into(),
                    mode: MountMode::Ro,
                },
            ],
            allowed_mounts: vec![AllowedMount {
                path: "/srv/shared".into(),
                writable: false,
            }],
            extra_hosts: vec!["host.docker.internal:host-gateway".into()],
            network: "none".into(),
            env_file: String::new(),
            resource_limits: ProfileLimits {
                memory_mb: 1024,
                ..Default::default()
            },
        },
    );
    policy
}

#[test]
fn a_profile_gives_its_mounts_hosts_network_and_limits() {
    let policy = coder_policy();
    let asked = DeployWorkerRequest {
        profile: "coder".into(),
        mounts: vec![tether_proto::MountSpec {
            source: "/srv/shared/docs".into(),
            target: "/docs".into(),
            writable: false,
        }],
        ..req()
    };
    let spec = validate_deploy(&asked, &policy).expect("valid");
    assert_eq!(spec.resource_limits.expect("limits").memory_mb, 1024);
    let d = WorkerDeployment {
        spec: Some(spec),
        generation: 1,
        ..Default::default()
    };
    let c = replica(&d, 0, &policy).expect("replica");
    let m = |s: &str, t: &str, w: bool| BindMount {
        source: s.into(),
        target: t.into(),
        writable: w,
    };
    assert_eq!(
        c.mounts,
        vec![
            m("/srv/shared/docs", "/docs", false),
            m("/srv/auth", "/auth", true),
            m("/srv/secrets", "/secrets", false),
        ]
    );
    assert_eq!(c.network_mode, "none");
    // The gateway entry the profile names; none added for the bus on network none.
    assert_eq!(c.extra_hosts, vec!["host.docker.internal:host-gateway"]);
    assert!(!c.env.iter().any(|e| e.starts_with("TETHER_ENV_FILE=")));
}

#[test]
fn a_request_cannot_widen_its_profile() {
    let policy = coder_policy();
    let with = |source: &str, target: &str, writable: bool, profile: &str| DeployWorkerRequest {
        profile: profile.into(),
        mounts: vec![tether_proto::MountSpec {
            source: source.into(),
            target: target.into(),
            writable,
        }],
        ..req()
    };
    let cases = [
        (with("/etc", "/x", false, "coder"), 403, "not under"),
        (with("/srv/shared/a", "/x", true, "coder"), 403, "read-only"),
        // The default profile allows nothing.
        (with("/srv/shared/a", "/x", false, ""), 403, "not under"),
        (
            with("/srv/shared/a", "/run/tether", false, "coder"),
            400,
            "/run/tether",
        ),
        (with("/srv/shared/a", "/auth", false, "coder"), 400, "/auth"),
        (
            DeployWorkerRequest {
                profile: "nope".into(),
                ..req()
            },
            422,
            "unknown profile \"nope\": this orchestrator has `coder`, `default`",
        ),
    ];
    for (r, status, needle) in cases {
        let p = validate_deploy(&r, &policy).expect_err(&format!("{r:?}"));
        assert_eq!(p.status, status, "{r:?}: {}", p.detail);
        assert!(
            p.detail.contains(needle),
            "{needle:?} not in {:?}",
            p.detail
        );
    }
}

fn slots(v: &[(u32, &str)]) -> Vec<WorkerSlot> {
    v.iter()
        .map(|(i, h)| WorkerSlot {
            index: *i,
            host_id: (*h).into(),
        })
        .collect()
}

#[test]
fn slots_spread_stay_and_leave_gone_hosts() {
    let c = vec!["a".to_string(), "b".to_string()];
    let none = |_: &str| false;
    let s = assign(&[], 3, &c, none).expect("assigned");
    assert_eq!(s, slots(&[(0, "a"), (1, "b"), (2, "a")]));
    // Scaling keeps what is placed.
    let up = assign(&s, 4, &c, none).expect("assigned");
    assert_eq!(up, slots(&[(0, "a"), (1, "b"), (2, "a"), (3, "b")]));
    let down = assign(&up, 1, &c, none).expect("assigned");
    assert_eq!(down, slots(&[(0, "a")]));
    // A gone host's slots move to the live candidates.
    let moved = assign(&up, 4, &["b".to_string()], |h| h == "a").expect("assigned");
    assert_eq!(moved, slots(&[(0, "b"), (1, "b"), (2, "b"), (3, "b")]));
    // No candidate for a slot that needs one.
    assert!(assign(&[], 1, &[], none).is_none());
    // A slot on a host that is not gone stays even without candidates.
    assert_eq!(assign(&down, 1, &[], none), Some(down.clone()));
}
