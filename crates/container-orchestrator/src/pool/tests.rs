use std::collections::HashMap;

use tether_proto::{CreateContainerRequest, MountSpec, ResourceLimits};

use super::*;
use crate::config::OrchestratorConfig;
use crate::labels::LABEL_POOL;

fn policy(pools: Vec<PoolConfig>) -> Policy {
    let mut p = Policy::for_tests();
    p.cfg.pool = pools;
    p
}

fn busybox(size: u32) -> PoolConfig {
    PoolConfig {
        image: "busybox:latest".into(),
        size,
        ..Default::default()
    }
}

fn request(f: impl FnOnce(&mut CreateContainerRequest)) -> CreateContainerRequest {
    let mut r = CreateContainerRequest {
        image: "busybox:latest".into(),
        ..Default::default()
    };
    f(&mut r);
    r
}

fn spec_of(r: &CreateContainerRequest, p: &Policy) -> ContainerSpec {
    validate_create(r, "s1", "a1", p, chrono::Utc::now()).expect("valid")
}

#[test]
fn a_plain_space_create_matches_the_pool_of_its_image() {
    let p = policy(vec![busybox(2)]);
    let pool = Pool::new(&p);
    assert_eq!(pool.entries.len(), 1);
    // Other limits and environment still match: both are given at bind time.
    let r = request(|r| {
        r.env = HashMap::from([("A".to_string(), "1".to_string())]);
        r.resource_limits = Some(ResourceLimits {
            memory_mb: 64,
            ..Default::default()
        });
    });
    let e = pool.matching(&r, &spec_of(&r, &p)).expect("a match");
    assert_eq!(e.key, pool.entries[0].key);
}

#[test]
fn what_a_pool_container_cannot_take_later_is_a_miss() {
    let p = policy(vec![busybox(1)]);
    let pool = Pool::new(&p);
    let misses = [
        request(|r| r.image = "other:1".into()),
        request(|r| r.name = "mine".into()),
        request(|r| r.session_id = "sess".into()),
        request(|r| r.labels = HashMap::from([("x".to_string(), "y".to_string())])),
        request(|r| r.network_mode = "none".into()),
        request(|r| r.writable_root = true),
        request(|r| r.workdir = "/work".into()),
        request(|r| {
            r.command = Some(tether_proto::pbjson_types::Value {
                kind: Some(tether_proto::pbjson_types::value::Kind::StringValue(
                    "sleep 1".into(),
                )),
            })
        }),
        request(|r| r.create_only = true),
        request(|r| r.kind = "tool".into()),
    ];
    for r in misses {
        assert!(pool.matching(&r, &spec_of(&r, &p)).is_none(), "{r:?}");
    }
    // A mount (allowed by the profile) is a miss too.
    let mut p = p;
    p.cfg.allowed_mounts = vec![crate::config::AllowedMount {
        path: "/tmp".into(),
        writable: false,
    }];
    let r = request(|r| {
        r.mounts = vec![MountSpec {
            source: "/tmp".into(),
            target: "/data".into(),
            writable: false,
        }]
    });
    assert!(pool.matching(&r, &spec_of(&r, &p)).is_none());
    // No pools: nothing matches.
    let none = Pool::new(&policy(vec![]));
    let r = request(|_| {});
    assert!(none.matching(&r, &spec_of(&r, &p)).is_none());
}

#[test]
fn a_pool_container_is_in_no_space_until_taken() {
    let p = policy(vec![busybox(1)]);
    let t = template(&p.cfg.pool[0], &p).expect("template");
    assert!(t.space.is_empty());
    for l in [LABEL_SPACE, LABEL_SESSION, LABEL_EXPIRES] {
        assert!(!t.labels.contains_key(l), "{l}");
    }
    assert_eq!(t.labels[LABEL_POOL], shape_key(&t));
    assert!(!t.env.iter().any(|e| e.starts_with("TETHER_SPACE=")));
    assert!(t.env.iter().any(|e| e.starts_with("TETHER_NATS_URL=")));
    assert_eq!(t.secret_dir.as_deref(), Some("/run/tether"));
    let n = free_name(&t.labels[LABEL_POOL]);
    assert!(crate::labels::is_free_pool(&t.labels, &n), "{n}");
    assert!(crate::spec::is_valid_container_name(&n), "{n}");
}

#[test]
fn takes_never_hand_out_one_container_twice() {
    let p = policy(vec![busybox(2)]);
    let pool = Pool::new(&p);
    let key = pool.entries[0].key.clone();
    pool.set_free(&key, vec!["c1".into(), "c2".into()]);
    let a = pool.pop(&key).expect("one");
    let b = pool.pop(&key).expect("two");
    assert_ne!(a, b);
    assert!(pool.pop(&key).is_none());
    // A fill pass that listed them before their rename does not make them free again.
    pool.set_free(&key, vec!["c1".into(), "c2".into(), "c3".into()]);
    assert_eq!(pool.free_count(&key), 1);
    assert_eq!(pool.pop(&key).as_deref(), Some("c3"));
    // One whose space could not be reserved goes back.
    pool.put_back(&key, &a);
    assert_eq!(pool.pop(&key), Some(a));
}

#[test]
fn bad_pool_configs_are_refused() {
    let cfg = |pools: Vec<PoolConfig>| OrchestratorConfig {
        pool: pools,
        ..Default::default()
    };
    assert!(check(&cfg(vec![busybox(1)])).is_ok());
    assert!(check(&cfg(vec![busybox(0)])).is_err());
    assert!(check(&cfg(vec![busybox(MAX_SIZE + 1)])).is_err());
    let mut bad = busybox(1);
    bad.image = "not an image".into();
    assert!(check(&cfg(vec![bad])).is_err());
    assert!(check(&cfg(vec![busybox(1); MAX_POOLS + 1])).is_err());
}
