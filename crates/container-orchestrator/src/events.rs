//! The engine's event stream → CloudEvents on `events.containers.<space>`.
//!
//! Only this host's managed containers are followed (the engine filters by label), and only
//! lifecycle actions: `create` → created, `start` → started, `die` → exited (with
//! `exit_code`), `oom` → oom, `destroy` → removed. The stream is taken from the engine rather
//! than from our own requests, so changes made behind the node's back (a `docker rm -f`, a
//! process dying) are published too; and the same events keep the node's state honest: a
//! destroyed space container is unbound at once, an OOM kill is counted for the exec that
//! caused it, a worker replica that exited or vanished wakes the worker reconciler. After a broken stream the node reconnects with `since`, skipping events it saw.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use tether_bus::Ctx;
use tether_proto::ContainerEventData;

use crate::labels::{LABEL_HOST, LABEL_KIND, LABEL_MANAGED, LABEL_SESSION};
use crate::state::Orchestrator;

/// The event action of a lifecycle change, if it is one we publish.
pub fn action_of(engine_action: &str) -> Option<&'static str> {
    // The engine may append details (`exec_start: sh`, `health_status: …`); take the verb.
    match engine_action.split(':').next().unwrap_or("").trim() {
        "create" => Some("created"),
        "start" => Some("started"),
        "die" => Some("exited"),
        "oom" => Some("oom"),
        "destroy" => Some("removed"),
        _ => None,
    }
}

/// Recently handled events (bounded), to skip the ones a reconnect replays.
#[derive(Default)]
struct Seen {
    order: std::collections::VecDeque<String>,
    set: std::collections::HashSet<String>,
}

impl Seen {
    /// False when `key` was seen already.
    fn insert(&mut self, key: String) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= 1024
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key.clone());
        self.set.insert(key);
        true
    }
}

/// Follows the engine's events until the node stops.
pub async fn follow(o: Arc<Orchestrator>, ctx: Ctx) -> anyhow::Result<()> {
    let mut last_nano: i64 = 0;
    let mut seen = Seen::default();
    let mut backoff = Duration::from_millis(200);
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_HOST}={}", o.host_id),
            ],
        ),
        (
            "event".to_string(),
            ["create", "start", "die", "oom", "destroy", "rename"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
    ]);
    loop {
        let since = (last_nano > 0).then(|| {
            format!(
                "{}.{:09}",
                last_nano / 1_000_000_000,
                last_nano % 1_000_000_000
            )
        });
        let opts = EventsOptions {
            since,
            until: None,
            filters: Some(filters.clone()),
        };
        let mut stream = o.engine.docker().events(Some(opts));
        loop {
            let next = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                n = stream.next() => n,
            };
            match next {
                Some(Ok(ev)) => {
                    backoff = Duration::from_millis(200);
                    let nano = ev.time_nano.unwrap_or(0);
                    // Events are not strictly in time order (an `oom` may be stamped after
                    // the `die` it caused), so replays after a reconnect are recognised by
                    // identity, not by time.
                    let key = format!(
                        "{nano}/{}/{}",
                        ev.actor
                            .as_ref()
                            .and_then(|a| a.id.as_deref())
                            .unwrap_or(""),
                        ev.action.as_deref().unwrap_or("")
                    );
                    if !seen.insert(key) {
                        continue;
                    }
                    last_nano = last_nano.max(nano);
                    handle(&o, &ctx, ev).await;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "engine event stream failed; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("engine event stream ended; reconnecting");
                    break;
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn handle(o: &Orchestrator, ctx: &Ctx, ev: EventMessage) {
    let raw_action = ev.action.clone().unwrap_or_default();
    let actor = ev.actor.unwrap_or_default();
    let id = actor.id.unwrap_or_default();
    let attrs = actor.attributes.unwrap_or_default();
    let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
    let name = get("name");
    if raw_action.starts_with("rename") {
        o.engine.forget(&id);
        return;
    }
    let Some(action) = action_of(&raw_action) else {
        return;
    };
    if matches!(action, "exited" | "removed") && attrs.contains_key(crate::labels::LABEL_POOL) {
        // A pool container went: the pool is filled again.
        if action == "removed" {
            o.pool.forget(&id);
        }
        o.pool.wake.notify_one();
    }
    let space = crate::labels::space_of(&attrs, &name);
    let kind = get(LABEL_KIND);
    match action {
        "oom" => o.note_oom(&id),
        "exited" | "removed" if kind == "worker" => o.workers_poke.notify_one(),
        "removed" if kind == "space" && !space.is_empty() => {
            match o.spaces.unbind_if(&space, &o.host_id, &id).await {
                Ok(true) => {
                    tracing::info!(space = %space, container = %id, "space container removed; binding dropped")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(space = %space, error = %e, "cannot drop binding"),
            }
        }
        _ => {}
    }
    let traceparent = o.trace_of(&id, &name);
    if action == "removed" {
        o.forget(&id, &name);
    }
    if space.is_empty() {
        return;
    }
    let data = ContainerEventData {
        action: action.to_string(),
        container_id: id.clone(),
        container_name: name.clone(),
        space: space.clone(),
        session_id: get(LABEL_SESSION),
        kind,
        host_id: o.host_id.clone(),
        image: get("image"),
        exit_code: if action == "exited" {
            get("exitCode").parse().unwrap_or(-1)
        } else {
            0
        },
    };
    let data = serde_json::to_value(&data).unwrap_or_default();
    let event = tether_bus::events::cloud_event(
        &format!("tether.container.{action}"),
        &format!("tether/{}/{}", crate::NAME, o.host_id),
        if name.is_empty() { &id } else { &name },
        data,
        traceparent,
    );
    let subject = ctx.subject(&format!("events.containers.{space}"));
    if let Err(e) = tether_bus::events::publish(&ctx.client, subject, &event).await {
        tracing::warn!(space = %space, action, error = %e, "cannot publish container event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_map() {
        assert_eq!(action_of("create"), Some("created"));
        assert_eq!(action_of("die"), Some("exited"));
        assert_eq!(action_of("oom"), Some("oom"));
        assert_eq!(action_of("destroy"), Some("removed"));
        assert_eq!(action_of("exec_start: sh -c true"), None);
        assert_eq!(action_of("kill"), None);
    }
}
