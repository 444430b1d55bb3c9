//! Every label the node puts on engine objects, and the names it reserves. The labels are the
//! truth about a managed container (whose space, which host, what kind): only this node sets
//! them, a request never can (`tether.*` labels in a request are refused).
//!
//! One exception, because the engine cannot change a container's labels: a warm-pool container
//! (`tether.pool`, the `pool` module) is made before its space is known. Free, it is named
//! `tether-pool.<key>.<hex>` and is in no space; taken, the node renames it (once, before any
//! use) to `tether-space.<space>.<expiry, unix seconds>.<hex>`, and that name is the truth of
//! its space and expiry ([`space_of`], [`expires_of`]). Only this node renames containers, a
//! request cannot set `tether.pool`, and a space id holds no `.`, so the name reads one way.

use std::collections::HashMap;

// Every managed object.
pub const LABEL_MANAGED: &str = "tether.managed";
pub const LABEL_SPACE: &str = "tether.space";
pub const LABEL_SESSION: &str = "tether.session";
pub const LABEL_KIND: &str = "tether.kind";
pub const LABEL_EXPIRES: &str = "tether.expires";
pub const LABEL_HOST: &str = "tether.host";
pub const LABEL_CREATED_BY: &str = "tether.created_by";

// Space containers whose init is the space daemon: the daemon's volume (the `daemon` module).
pub const LABEL_DAEMON: &str = "tether.daemon";
/// On the daemon's volume: the sha256 of the binary it holds.
pub const LABEL_SHA256: &str = "tether.sha256";

// Tool containers.
pub const LABEL_TOOL: &str = "tether.tool";
pub const LABEL_EXECUTION: &str = "tether.execution";
pub const LABEL_RUNNER: &str = "tether.runner";
pub const LABEL_ATTEMPT: &str = "tether.attempt";
pub const LABEL_CLEANUP: &str = "tether.cleanup";
pub const LABEL_DEADLINE: &str = "tether.deadline";

// Relics.
pub const LABEL_RELIC: &str = "tether.relic";
pub const LABEL_RELIC_ID: &str = "tether.relic_id";
pub const LABEL_HEALTH_PORT: &str = "tether.health_port";
pub const LABEL_HEALTH_ENDPOINT: &str = "tether.health_endpoint";

// Worker replicas (`tether.kind=worker`).
pub const LABEL_WORKER: &str = "tether.worker";
pub const LABEL_REPLICA: &str = "tether.replica";
pub const LABEL_GENERATION: &str = "tether.generation";
pub const LABEL_DEPLOYMENT: &str = "tether.deployment";

// Warm-pool space containers: the pool key they were made for (the `pool` module).
pub const LABEL_POOL: &str = "tether.pool";
/// A free pool container's name: `tether-pool.<key>.<hex>`.
pub const POOL_FREE_PREFIX: &str = "tether-pool.";
/// A taken pool container's name: `tether-space.<space>.<expiry unix seconds>.<hex>`.
pub const POOL_TAKEN_PREFIX: &str = "tether-space.";

/// The name a pool container takes when it is bound to `space` until `expires_unix`.
pub fn taken_name(space: &str, expires_unix: i64, hex: &str) -> String {
    format!("{POOL_TAKEN_PREFIX}{space}.{expires_unix}.{hex}")
}

/// (space, expiry) a taken pool container's name says; `None` for any other name.
fn taken(labels: &HashMap<String, String>, name: &str) -> Option<(String, i64)> {
    labels.get(LABEL_POOL)?;
    let rest = name
        .trim_start_matches('/')
        .strip_prefix(POOL_TAKEN_PREFIX)?;
    let mut parts = rest.split('.');
    let (space, expiry, _hex) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none() && tether_bus::subject::is_valid_token(space);
    Some((space.to_string(), expiry.parse().ok()?)).filter(|_| ok)
}

/// The space of a managed container: its `tether.space` label, or what a taken pool
/// container's name says; empty for a free pool container and for one in no space.
pub fn space_of(labels: &HashMap<String, String>, name: &str) -> String {
    match labels.get(LABEL_SPACE) {
        Some(s) => s.clone(),
        None => taken(labels, name).map(|t| t.0).unwrap_or_default(),
    }
}

/// When a managed container expires: its `tether.expires` label, or what a taken pool
/// container's name says; `None`: never (a free pool container, a worker replica).
pub fn expires_of(
    labels: &HashMap<String, String>,
    name: &str,
) -> Option<chrono::DateTime<chrono::Utc>> {
    match labels.get(LABEL_EXPIRES) {
        Some(e) => chrono::DateTime::parse_from_rfc3339(e)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc)),
        None => chrono::DateTime::from_timestamp(taken(labels, name)?.1, 0),
    }
}

/// The space a free pool container's daemon serves before it has one (`tokens.daemon` is asked
/// for it): `tether-pool-<hex>` from its name `tether-pool.<key>.<hex>` (`pool`: it has the
/// `tether.pool` label), a space no agent can be registered into
/// (`tether_auth::POOL_SPACE_PREFIX`). `None` for any other container.
pub fn pool_space(pool: bool, name: &str) -> Option<String> {
    if !pool || !name.trim_start_matches('/').starts_with(POOL_FREE_PREFIX) {
        return None;
    }
    let hex = name.trim_start_matches('/').rsplit('.').next()?;
    let ok = !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit());
    Some(format!("{}{hex}", tether_auth::POOL_SPACE_PREFIX)).filter(|_| ok)
}

/// Whether a container is a free pool container (made for the pool, never taken).
pub fn is_free_pool(labels: &HashMap<String, String>, name: &str) -> bool {
    labels.contains_key(LABEL_POOL) && name.trim_start_matches('/').starts_with(POOL_FREE_PREFIX)
}

/// `tether.kind` of a session's network.
pub const KIND_SESSION_NETWORK: &str = "session-network";

/// Names of session networks start with this; requests may not name such a network.
pub const SESSION_NETWORK_PREFIX: &str = "tether-session.";

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str) -> (HashMap<String, String>, String) {
        let l = HashMap::from([(LABEL_POOL.to_string(), "k".to_string())]);
        (l, name.to_string())
    }

    #[test]
    fn a_taken_pool_containers_name_is_its_space_and_expiry() {
        let (l, n) = pool(&taken_name("s-1", 1_900_000_000, "ab12"));
        assert_eq!(space_of(&l, &format!("/{n}")), "s-1");
        assert_eq!(
            expires_of(&l, &n).map(|t| t.timestamp()),
            Some(1_900_000_000)
        );
        assert!(!is_free_pool(&l, &n));
        let (l, n) = pool("tether-pool.k.ab12");
        assert_eq!(space_of(&l, &n), "");
        assert_eq!(expires_of(&l, &n), None);
        assert!(is_free_pool(&l, &n));
        assert_eq!(pool_space(true, &n).as_deref(), Some("tether-pool-ab12"));
        assert_eq!(pool_space(true, &taken_name("s", 1, "ab12")), None, "taken");
        assert_eq!(pool_space(false, &n), None, "no pool label");
        // Not a pool container: the name says nothing.
        let n = taken_name("s-1", 1, "x");
        assert_eq!(space_of(&HashMap::new(), &n), "");
        // Malformed names say nothing.
        for bad in [
            "tether-space.a.b.c",
            "tether-space.s.1",
            "tether-space.s.1.x.y",
            "tether-space.*.1.x",
        ] {
            assert_eq!(space_of(&l, bad), "", "{bad}");
        }
        // A label always wins.
        let mut l = l;
        l.insert(LABEL_SPACE.into(), "lab".into());
        assert_eq!(space_of(&l, &n), "lab");
    }
}
