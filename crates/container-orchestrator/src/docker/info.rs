//! What callers see of a managed container ([`ContainerInfo`]), from the engine's inspect or
//! list summary. Its space and expiry come from the labels, or for a taken pool container
//! from its name (`crate::labels::space_of`).

use std::collections::HashMap;

use bollard::models::{ContainerInspectResponse, ContainerSummary};
use tether_proto::{ContainerInfo, MountSpec, ResourceLimits};

use super::MIB;
use crate::labels::{LABEL_KIND, LABEL_SESSION, expires_of, space_of};

fn label(l: &HashMap<String, String>, k: &str) -> String {
    l.get(k).cloned().unwrap_or_default()
}

fn rfc3339(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A listed container's name, without the engine's leading `/`.
pub fn summary_name(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

/// What callers see of an inspected managed container.
pub fn info_from_inspect(c: &ContainerInspectResponse, host_id: &str) -> ContainerInfo {
    let labels = c
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let state = c.state.as_ref();
    let hc = c.host_config.as_ref();
    let created = c.created.clone().unwrap_or_default();
    let name = c
        .name
        .as_deref()
        .unwrap_or_default()
        .trim_start_matches('/');
    let expires = rfc3339(expires_of(&labels, name));
    let ttl = match (
        chrono::DateTime::parse_from_rfc3339(&created),
        chrono::DateTime::parse_from_rfc3339(&expires),
    ) {
        (Ok(a), Ok(b)) => i32::try_from((b - a).num_seconds().max(0)).unwrap_or(i32::MAX),
        _ => 0,
    };
    let mut writable_paths: Vec<String> = hc
        .and_then(|h| h.tmpfs.as_ref())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    writable_paths.sort();
    let mounts = hc
        .and_then(|h| h.mounts.as_ref())
        .map(|ms| {
            ms.iter()
                .map(|m| MountSpec {
                    source: m.source.clone().unwrap_or_default(),
                    target: m.target.clone().unwrap_or_default(),
                    writable: !m.read_only.unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    let fin = state
        .and_then(|s| s.finished_at.clone())
        .unwrap_or_default();
    ContainerInfo {
        container_id: c.id.clone().unwrap_or_default(),
        container_name: name.to_string(),
        image: c
            .config
            .as_ref()
            .and_then(|c| c.image.clone())
            .unwrap_or_default(),
        space: space_of(&labels, name),
        session_id: label(&labels, LABEL_SESSION),
        kind: label(&labels, LABEL_KIND),
        host_id: host_id.to_string(),
        state: state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default(),
        exit_code: state
            .and_then(|s| s.exit_code)
            .map(|c| i32::try_from(c).unwrap_or(-1))
            .unwrap_or_default(),
        oom_killed: state.and_then(|s| s.oom_killed).unwrap_or(false),
        created_at: created,
        started_at: state
            .and_then(|s| s.started_at.clone())
            .filter(|s| !s.starts_with("0001-"))
            .unwrap_or_default(),
        finished_at: if fin.starts_with("0001-") {
            String::new()
        } else {
            fin
        },
        expires_at: expires,
        resource_limits: hc.map(|h| ResourceLimits {
            memory_mb: i32::try_from(h.memory.unwrap_or(0) / MIB).unwrap_or(i32::MAX),
            cpu_limit: h.nano_cpus.unwrap_or(0) as f64 / 1e9,
            pids_limit: i32::try_from(h.pids_limit.unwrap_or(0)).unwrap_or(i32::MAX),
            timeout_seconds: ttl,
        }),
        network_mode: hc.and_then(|h| h.network_mode.clone()).unwrap_or_default(),
        read_only_root: hc.and_then(|h| h.readonly_rootfs).unwrap_or(false),
        writable_paths,
        mounts,
        labels,
    }
}

/// What callers see of a listed managed container (the engine's summary is shorter).
pub fn info_from_summary(c: &ContainerSummary, host_id: &str) -> ContainerInfo {
    let labels = c.labels.clone().unwrap_or_default();
    let name = summary_name(c);
    ContainerInfo {
        container_id: c.id.clone().unwrap_or_default(),
        image: c.image.clone().unwrap_or_default(),
        space: space_of(&labels, &name),
        expires_at: rfc3339(expires_of(&labels, &name)),
        container_name: name,
        session_id: label(&labels, LABEL_SESSION),
        kind: label(&labels, LABEL_KIND),
        host_id: host_id.to_string(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
        created_at: c
            .created
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default(),
        network_mode: c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default(),
        labels,
        ..Default::default()
    }
}
