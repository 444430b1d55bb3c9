//! A deployment request checked into its stored form, the container of one replica, and the
//! assignment of replica slots to hosts. Pure: every bad-input case is a unit test.
//!
//! A replica's container is made through the same [`validate_create`] as every other
//! container (kind `worker`: no space, no expiry), so it is hardened the same way; the worker
//! labels and `TETHER_WORKER*` variables are added after, as tool runs add theirs, with
//! `TETHER_AGENT_ID`, `TETHER_TOKEN_FILE` (a path) and the tmpfs volume the token is written to.

use std::collections::HashMap;

use tether_bus::Problem;
use tether_proto::{
    CreateContainerRequest, DeployWorkerRequest, ResourceLimits, WorkerDeployment, WorkerSlot,
};

use super::credentials::{TOKEN_DIR, TOKEN_PATH};
use crate::labels::{LABEL_DEPLOYMENT, LABEL_GENERATION, LABEL_REPLICA, LABEL_WORKER};
use crate::spec::{ContainerSpec, Kind, Policy, validate_create};

/// The only profile there is until the orchestrator's `[profiles.<name>]` config exists: the
/// hardened defaults every container gets.
pub const DEFAULT_PROFILE: &str = "default";

/// What an exited replica gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Replaced, whatever its exit code.
    Always,
    /// Replaced unless it exited with 0.
    OnFailure,
    /// Left as it is (for its logs).
    Never,
}

impl Restart {
    pub fn parse(s: &str) -> Result<Restart, Problem> {
        match s {
            "" | "always" => Ok(Restart::Always),
            "on-failure" => Ok(Restart::OnFailure),
            "never" => Ok(Restart::Never),
            other => Err(Problem::bad_request(format!(
                "`restart` must be always, on-failure or never (got {other:?})"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::Never => "never",
        }
    }
    /// Whether a replica that exited with `code` is replaced.
    pub fn replaces(self, code: i64) -> bool {
        match self {
            Restart::Always => true,
            Restart::OnFailure => code != 0,
            Restart::Never => false,
        }
    }
}

/// A deployment name: `[a-z0-9][a-z0-9-]{0,62}` (a KV key, a subject token, part of
/// container names).
pub fn check_name(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::bad_request("`name` is required"));
    }
    let ok = name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Problem::bad_request(format!(
            "`name` {name:?} must be 1-63 characters of a-z 0-9 -, starting with a letter or digit"
        )))
    }
}

/// Checks a deploy request and fills in every default: the stored spec. `max_replicas` is the
/// orchestrator's bound (`max_worker_replicas`).
pub fn validate_deploy(
    b: &DeployWorkerRequest,
    policy: &Policy,
) -> Result<DeployWorkerRequest, Problem> {
    check_name(&b.name)?;
    if b.agent_id.is_empty() {
        return Err(Problem::bad_request("`agent_id` is required"));
    }
    if !tether_bus::subject::is_valid_token(&b.agent_id) {
        return Err(Problem::bad_request(format!(
            "`agent_id` {:?} must be 1-128 characters of A-Z a-z 0-9 - _",
            b.agent_id
        )));
    }
    let profile = match b.profile.as_str() {
        "" | DEFAULT_PROFILE => DEFAULT_PROFILE,
        other => {
            return Err(Problem::unprocessable(format!(
                "unknown profile {other:?}: this orchestrator has only `{DEFAULT_PROFILE}` (named profiles are not configurable yet)"
            )));
        }
    };
    let restart = Restart::parse(&b.restart)?;
    let limit = policy.cfg.max_worker_replicas;
    let min = b.min_replicas;
    let replicas = match b.replicas {
        0 => min.max(1),
        n => n,
    };
    let max = match b.max_replicas {
        0 => replicas.max(min),
        n => n,
    };
    if max > limit {
        return Err(Problem::bad_request(format!(
            "`max_replicas` (or `replicas`) must be at most {limit} (got {max})"
        )));
    }
    if min > max {
        return Err(Problem::bad_request(format!(
            "`min_replicas` ({min}) must be at most `max_replicas` ({max})"
        )));
    }
    check_replicas(replicas, min, max)?;
    let asked = b.resource_limits.unwrap_or_default();
    if asked.timeout_seconds != 0 {
        return Err(Problem::bad_request(
            "`resource_limits.timeout_seconds` must be 0: worker replicas do not expire",
        ));
    }
    let mut spec = DeployWorkerRequest {
        name: b.name.clone(),
        agent_id: b.agent_id.clone(),
        image: b.image.clone(),
        command: b.command.clone(),
        env: b.env.clone(),
        profile: profile.into(),
        resource_limits: Some(asked),
        replicas,
        min_replicas: min,
        max_replicas: max,
        restart: restart.as_str().into(),
    };
    // Everything else (image, command, env, limits) is checked as for any container, and the
    // limits are stored as resolved, so every host makes the same replica.
    let c = container(&spec, 0, 1, "", policy)?;
    spec.resource_limits = Some(ResourceLimits {
        timeout_seconds: 0,
        ..c.limits()
    });
    Ok(spec)
}

/// `replicas` within a deployment's bounds.
pub fn check_replicas(replicas: u32, min: u32, max: u32) -> Result<(), Problem> {
    if replicas < min || replicas > max {
        return Err(Problem::bad_request(format!(
            "`replicas` ({replicas}) must be between `min_replicas` ({min}) and `max_replicas` ({max})"
        )));
    }
    Ok(())
}

/// The spec without its replica counts: what a change of rolls the replicas.
pub fn template(s: &DeployWorkerRequest) -> DeployWorkerRequest {
    DeployWorkerRequest {
        replicas: 0,
        min_replicas: 0,
        max_replicas: 0,
        ..s.clone()
    }
}

/// The container of replica `index` of a deployment.
pub fn replica(
    d: &WorkerDeployment,
    index: u32,
    policy: &Policy,
) -> Result<ContainerSpec, Problem> {
    let spec = d.spec.clone().unwrap_or_default();
    let mut c = container(&spec, index, d.generation, &d.created_by, policy)?;
    c.labels.insert(LABEL_DEPLOYMENT.into(), d.uid.clone());
    Ok(c)
}

fn container(
    s: &DeployWorkerRequest,
    index: u32,
    generation: u32,
    created_by: &str,
    policy: &Policy,
) -> Result<ContainerSpec, Problem> {
    let short = uuid::Uuid::new_v4().simple().to_string();
    let create = CreateContainerRequest {
        image: s.image.clone(),
        name: format!("tether-worker-{}-{index}-{}", s.name, &short[..8]),
        kind: Kind::Worker.as_str().into(),
        env: s.env.clone(),
        command: s.command.clone(),
        resource_limits: s.resource_limits,
        ..Default::default()
    };
    let mut c = validate_create(&create, "", created_by, policy, chrono::Utc::now())?;
    c.env.push(format!("TETHER_WORKER={}", s.name));
    c.env.push(format!("TETHER_WORKER_REPLICA={index}"));
    // Names the instance (the worker libraries put it in what they report).
    c.env.push(format!("TETHER_WORKER_NAME={}", c.name));
    c.env.push(format!("TETHER_AGENT_ID={}", s.agent_id));
    // The path only: the token itself is written into the volume (`credentials`).
    c.env.push(format!("TETHER_TOKEN_FILE={TOKEN_PATH}"));
    c.secret_dir = Some(TOKEN_DIR.into());
    c.labels.insert(LABEL_WORKER.into(), s.name.clone());
    c.labels.insert(LABEL_REPLICA.into(), index.to_string());
    c.labels
        .insert(LABEL_GENERATION.into(), generation.to_string());
    Ok(c)
}

/// Slots for `replicas` replicas: slot i keeps its host unless that host is `gone`; a new
/// slot, or one whose host is gone, goes to the candidate (live hosts with the image, in
/// placement order) holding the fewest slots of this deployment, the first of them on a tie.
/// `None` when a slot needs a host and there is no candidate.
pub fn assign(
    current: &[WorkerSlot],
    replicas: u32,
    candidates: &[String],
    gone: impl Fn(&str) -> bool,
) -> Option<Vec<WorkerSlot>> {
    let held: HashMap<u32, &str> = current
        .iter()
        .map(|s| (s.index, s.host_id.as_str()))
        .collect();
    let mut out: Vec<WorkerSlot> = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut open = Vec::new();
    for index in 0..replicas {
        match held.get(&index) {
            Some(h) if !gone(h) => {
                *count.entry((*h).to_string()).or_default() += 1;
                out.push(WorkerSlot {
                    index,
                    host_id: (*h).to_string(),
                });
            }
            _ => open.push(index),
        }
    }
    for index in open {
        let host = candidates
            .iter()
            .min_by_key(|c| count.get(*c).copied().unwrap_or(0))?
            .clone();
        *count.entry(host.clone()).or_default() += 1;
        out.push(WorkerSlot {
            index,
            host_id: host,
        });
    }
    out.sort_by_key(|s| s.index);
    Some(out)
}

#[cfg(test)]
mod tests {
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
}
