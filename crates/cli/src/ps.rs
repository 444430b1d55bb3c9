//! `tether ps`: every live node instance, its endpoints and counts, from `$SRV.INFO` and
//! `$SRV.STATS` (the NATS micro protocol), gathered for a short window.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tether_bus::micro::{InfoResponse, StatsResponse};

/// One node instance as `ps` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub version: String,
    pub endpoints: Vec<EndpointRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointRow {
    pub subject: String,
    pub requests: u64,
    pub errors: u64,
}

/// Sends `$SRV.<verb>` and collects every reply arriving within `wait`.
async fn gather(
    client: &async_nats::Client,
    verb: &str,
    wait: Duration,
) -> anyhow::Result<Vec<async_nats::Message>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.{verb}"), inbox, "".into())
        .await?;
    client.flush().await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        out.push(m);
    }
    Ok(out)
}

/// Live instances, sorted by name then id.
pub async fn instances(
    client: &async_nats::Client,
    wait: Duration,
) -> anyhow::Result<Vec<Instance>> {
    let (pings, infos, stats) = tokio::try_join!(
        gather(client, "PING", wait),
        gather(client, "INFO", wait),
        gather(client, "STATS", wait)
    )?;
    let mut by_id: BTreeMap<(String, String), Instance> = BTreeMap::new();
    // PING finds every instance, even one that does not answer INFO.
    for m in pings {
        let Ok(p) = serde_json::from_slice::<tether_bus::micro::PingResponse>(&m.payload) else {
            continue;
        };
        let inst = Instance {
            name: p.name,
            id: p.id,
            version: p.version,
            endpoints: Vec::new(),
        };
        by_id.insert((inst.name.clone(), inst.id.clone()), inst);
    }
    for m in infos {
        let Ok(i) = serde_json::from_slice::<InfoResponse>(&m.payload) else {
            continue;
        };
        by_id.insert(
            (i.name.clone(), i.id.clone()),
            Instance {
                name: i.name,
                id: i.id,
                version: i.version,
                endpoints: i
                    .endpoints
                    .into_iter()
                    .map(|e| EndpointRow {
                        subject: e.subject,
                        requests: 0,
                        errors: 0,
                    })
                    .collect(),
            },
        );
    }
    for m in stats {
        let Ok(s) = serde_json::from_slice::<StatsResponse>(&m.payload) else {
            continue;
        };
        if let Some(inst) = by_id.get_mut(&(s.name.clone(), s.id.clone())) {
            for e in s.endpoints {
                if let Some(row) = inst.endpoints.iter_mut().find(|r| r.subject == e.subject) {
                    row.requests = e.num_requests;
                    row.errors = e.num_errors;
                }
            }
        }
    }
    Ok(by_id.into_values().collect())
}

/// The table `tether ps` prints.
pub fn render(instances: &[Instance]) -> String {
    let mut out = format!(
        "{:<24} {:<34} {:<9} {:<28} {:>9} {:>7}\n",
        "NODE", "ID", "VERSION", "ENDPOINT", "REQUESTS", "ERRORS"
    );
    for i in instances {
        if i.endpoints.is_empty() {
            out.push_str(&format!(
                "{:<24} {:<34} {:<9} {:<28} {:>9} {:>7}\n",
                i.name, i.id, i.version, "-", 0, 0
            ));
        }
        for (n, e) in i.endpoints.iter().enumerate() {
            let (name, id, ver) = if n == 0 {
                (i.name.as_str(), i.id.as_str(), i.version.as_str())
            } else {
                ("", "", "")
            };
            out.push_str(&format!(
                "{name:<24} {id:<34} {ver:<9} {:<28} {:>9} {:>7}\n",
                e.subject, e.requests, e.errors
            ));
        }
    }
    out
}
