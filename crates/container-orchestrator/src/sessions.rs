//! Sessions: the private network of a session's relics, the session record in KV, and
//! `sessions.cleanup`.
//!
//! A session is `(space, session_id)` — two spaces may use the same session id and never
//! share anything. Its network is a Docker `internal` bridge named
//! `tether-session.<space>.<session>` and labelled like every managed object, so the engine's
//! labels say whose it is; requests can never name such a network themselves.
//!
//! The record (`tether_sessions`, key `<space>.<session>`) holds the host of the session's
//! network and relics, and its expiry. Every orchestrator's janitor reads the records and
//! removes its own part of a session that expired or was cleaned up, so a session whose tool
//! containers ran on several hosts is cleaned everywhere.

use std::collections::HashMap;
use std::sync::Arc;

use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};
use tether_bus::{Caller, Node, Problem, Request, Scope};
use tether_proto::{SessionCleanupReply, SessionCleanupRequest, SessionRecord};

use crate::docker::EngineError;
use crate::labels::{
    KIND_SESSION_NETWORK, LABEL_CREATED_BY, LABEL_EXECUTION, LABEL_HOST, LABEL_KIND, LABEL_MANAGED,
    LABEL_SESSION, LABEL_SPACE, SESSION_NETWORK_PREFIX,
};
use crate::route::{Elsewhere, Routed, Routes};
use crate::state::{Change, Orchestrator, Shared, expires, is_terminal};

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

pub fn network_name(space: &str, session: &str) -> String {
    format!("{SESSION_NETWORK_PREFIX}{space}.{session}")
}

fn labels_filter(o: &Orchestrator, extra: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    let mut l = vec![
        format!("{LABEL_MANAGED}=true"),
        format!("{LABEL_HOST}={}", o.host_id),
    ];
    l.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    HashMap::from([("label".to_string(), l)])
}

/// The session's network on this host: (id, name).
pub async fn find_network(
    o: &Orchestrator,
    space: &str,
    session: &str,
) -> Result<Option<(String, String)>, EngineError> {
    let filters = labels_filter(
        o,
        &[
            (LABEL_KIND, KIND_SESSION_NETWORK),
            (LABEL_SPACE, space),
            (LABEL_SESSION, session),
        ],
    );
    let opts = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let mut list = o.engine.docker().list_networks(Some(opts)).await?;
    list.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(list
        .into_iter()
        .next()
        .map(|n| (n.id.unwrap_or_default(), n.name.unwrap_or_default())))
}

/// Every session network of this host (optionally of one space and session).
pub async fn networks(
    o: &Orchestrator,
    space: &str,
    session: &str,
) -> Result<Vec<bollard::models::Network>, EngineError> {
    let mut extra = vec![(LABEL_KIND, KIND_SESSION_NETWORK)];
    if !space.is_empty() {
        extra.push((LABEL_SPACE, space));
    }
    if !session.is_empty() {
        extra.push((LABEL_SESSION, session));
    }
    let filters = labels_filter(o, &extra);
    let opts = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    Ok(o.engine.docker().list_networks(Some(opts)).await?)
}

/// Makes the session's internal network (the caller holds the session lock).
pub async fn create_network(
    o: &Orchestrator,
    space: &str,
    session: &str,
    agent: &str,
) -> Result<(String, String), EngineError> {
    let name = network_name(space, session);
    let labels = HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_HOST.to_string(), o.host_id.clone()),
        (LABEL_KIND.to_string(), KIND_SESSION_NETWORK.to_string()),
        (LABEL_SPACE.to_string(), space.to_string()),
        (LABEL_SESSION.to_string(), session.to_string()),
        (LABEL_CREATED_BY.to_string(), agent.to_string()),
    ]);
    let r = o
        .engine
        .docker()
        .create_network(NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            internal: Some(true),
            attachable: Some(false),
            labels: Some(labels),
            ..Default::default()
        })
        .await?;
    tracing::info!(network = %name, id = %r.id, space, session, "session network created");
    Ok((r.id, name))
}

/// Managed containers of a session on this host.
pub async fn session_containers(
    o: &Orchestrator,
    space: &str,
    session: &str,
) -> Result<Vec<bollard::models::ContainerSummary>, EngineError> {
    let filters = labels_filter(o, &[(LABEL_SPACE, space), (LABEL_SESSION, session)]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    Ok(o.engine.docker().list_containers(Some(opts)).await?)
}

/// Removes this host's part of a session: its containers (tool runs among them are
/// recorded as cancelled) and its network.
pub async fn cleanup_local(
    t: &Shared,
    space: &str,
    session: &str,
    force: bool,
) -> Result<(Vec<String>, Vec<String>), Problem> {
    let o = &t.o;
    let containers = session_containers(o, space, session).await?;
    let mut removed = Vec::new();
    for c in containers {
        let id = c.id.clone().unwrap_or_default();
        let labels = c.labels.clone().unwrap_or_default();
        if let Some(exec) = labels.get(LABEL_EXECUTION) {
            // The run is reported as cancelled, not as a mysterious failure.
            let _ = t
                .results
                .modify(exec, |r| {
                    if is_terminal(&r.status) {
                        return Change::Keep;
                    }
                    r.cancel_requested = true;
                    Change::Write
                })
                .await;
            t.cancel_running(exec);
        }
        if !force {
            let _ = o.engine.stop(&id, o.policy.cfg.stop_grace_seconds).await;
        }
        match o.engine.remove(&id).await {
            Ok(()) => removed.push(id),
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "cannot remove session container")
            }
        }
    }
    let mut nets = Vec::new();
    for n in networks(o, space, session).await? {
        let id = n.id.unwrap_or_default();
        match o.engine.docker().remove_network(&id).await {
            Ok(()) => nets.push(id),
            Err(e) => tracing::warn!(network = %id, error = %e, "cannot remove session network"),
        }
    }
    if !removed.is_empty() || !nets.is_empty() {
        tracing::info!(
            space,
            session,
            containers = removed.len(),
            networks = nets.len(),
            "session cleaned up"
        );
    }
    Ok((removed, nets))
}

/// Adds `sessions.cleanup` and its host-addressed twin.
pub fn endpoints(node: Node, t: &Arc<Shared>) -> Node {
    Routes::new(node, &t.o.hosts, t.clone())
        .serve("sessions.cleanup", Scope::RelicsWrite, cleanup)
        .node()
}

pub fn check_session(s: &str) -> Result<(), Problem> {
    if s.is_empty() {
        return Err(Problem::bad_request("`session_id` is required"));
    }
    if !tether_bus::subject::is_valid_token(s) {
        return Err(Problem::bad_request(format!(
            "`session_id` {s:?} must be 1-128 characters of A-Z a-z 0-9 - _"
        )));
    }
    Ok(())
}

/// A `sessions.cleanup` request, checked: the space of the session.
pub struct CleanupCall {
    space: String,
}

impl CleanupCall {
    pub fn validate(b: &SessionCleanupRequest, caller: &Caller) -> Result<Self, Problem> {
        check_session(&b.session_id)?;
        let space = caller.space_for(&b.space)?;
        Ok(Self { space })
    }

    /// Cleans this host's part of the session up; the host of its network (when another) does
    /// its part too, and the reply names what both removed.
    async fn apply(
        self,
        t: &Arc<Shared>,
        req: &Request<SessionCleanupRequest>,
    ) -> Result<Routed<SessionCleanupReply>, Problem> {
        let (space, b) = (self.space, &req.body);
        let record = t.sessions.get(&space, &b.session_id).await?;
        let (containers, networks) = cleanup_local(t, &space, &b.session_id, b.force).await?;
        let here = SessionCleanupReply {
            session_id: b.session_id.clone(),
            space: space.clone(),
            removed_containers: containers,
            removed_networks: networks,
            host_id: t.o.host_id.clone(),
        };
        let Some((r, _)) = record else {
            if here.removed_containers.is_empty() && here.removed_networks.is_empty() {
                return Err(Problem::not_found(format!(
                    "no session `{}` in space `{space}`",
                    b.session_id
                )));
            }
            return Ok(Routed::Here(here));
        };
        t.sessions.close(&space, &b.session_id).await?;
        if r.host_id != t.o.host_id && !r.host_id.is_empty() {
            let there = Elsewhere::on(r.host_id, "the session's network is");
            return Ok(Routed::Also(there, here, merge_cleanups));
        }
        Ok(Routed::Here(here))
    }
}

async fn cleanup(
    t: Arc<Shared>,
    req: Request<SessionCleanupRequest>,
) -> Result<Routed<SessionCleanupReply>, Problem> {
    CleanupCall::validate(&req.body, &req.caller)?
        .apply(&t, &req)
        .await
}

/// This host's cleanup reply with what another host removed added.
fn merge_cleanups(
    mut here: SessionCleanupReply,
    there: SessionCleanupReply,
) -> SessionCleanupReply {
    here.removed_containers.extend(there.removed_containers);
    here.removed_networks.extend(there.removed_networks);
    here
}

/// This host's part of sessions that expired or were closed, then session networks no
/// record explains (the tool janitor calls it after its own pass).
pub async fn pass(t: &Shared) -> anyhow::Result<()> {
    let records = t.sessions.all().await.map_err(|p| anyhow::anyhow!("{p}"))?;
    let mut live = std::collections::HashSet::new();
    let over = |r: &SessionRecord| r.closed || expires(r) <= now();
    for r in records {
        if !over(&r) {
            live.insert((r.space, r.session_id));
            continue;
        }
        // A relic start holds the session's lock while it reuses or makes the network and
        // reopens the record: skip a session that is starting (the next pass sees it), and
        // read the record again under the lock before removing anything.
        let lock = t
            .session_lock(&format!("{}.{}", r.space, r.session_id))
            .await;
        let Ok(_held) = lock.try_lock() else {
            live.insert((r.space, r.session_id));
            continue;
        };
        let now_rec = t
            .sessions
            .get(&r.space, &r.session_id)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        if now_rec.as_ref().is_some_and(|(r, _)| !over(r)) {
            live.insert((r.space, r.session_id));
            continue;
        }
        cleanup_local(t, &r.space, &r.session_id, true)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?;
    }
    // A network whose session has no live record (its record expired from KV, or a start
    // failed half way) and no containers.
    let grace = chrono::Duration::seconds(
        i64::try_from(t.o.policy.cfg.reconcile_grace_seconds).unwrap_or(60),
    );
    for n in networks(&t.o, "", "").await? {
        let labels = n.labels.clone().unwrap_or_default();
        let space = labels.get(LABEL_SPACE).cloned().unwrap_or_default();
        let session = labels.get(LABEL_SESSION).cloned().unwrap_or_default();
        let old = n
            .created
            .as_ref()
            .and_then(|c| chrono::DateTime::parse_from_rfc3339(&c.to_string()).ok())
            .is_some_and(|c| now() - c.with_timezone(&chrono::Utc) > grace);
        if !old || live.contains(&(space.clone(), session.clone())) {
            continue;
        }
        if session_containers(&t.o, &space, &session).await?.is_empty()
            && let Some(id) = n.id
            && t.o.engine.docker().remove_network(&id).await.is_ok()
        {
            tracing::info!(network = %id, space, session, "orphaned session network removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{agent, decode, refused};
    use serde_json::json;

    #[test]
    fn bad_cleanups_are_refused() {
        for (body, status, word) in [
            (json!({}), 400, "session_id"),
            (json!({"session_id": "a.b"}), 400, "session_id"),
            (json!({"session_id": "x", "space": "other"}), 403, "other"),
        ] {
            let b: SessionCleanupRequest = decode(&body).expect("decodes");
            refused(
                CleanupCall::validate(&b, &agent("s1")),
                status,
                word,
                &body.to_string(),
            );
        }
        let ok: SessionCleanupRequest = decode(&json!({"session_id": "x"})).expect("decodes");
        assert_eq!(
            CleanupCall::validate(&ok, &agent("s1"))
                .expect("valid")
                .space,
            "s1"
        );
    }
}
