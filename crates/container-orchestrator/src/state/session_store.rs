//! Session records in KV (`tether_sessions`, key `<space>.<session>`): the host of a
//! session's network and relics, and its expiry.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::kv::{Bucket, Change};
use tether_bus::{Encoding, Problem};
use tether_proto::SessionRecord;

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Session records in KV (protobuf).
#[derive(Clone)]
pub struct SessionStore {
    records: Bucket<SessionRecord>,
}

impl SessionStore {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        max_ttl_seconds: i32,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let config = kv::Config {
            bucket: bucket.to_string(),
            description: "tether: sessions (host of their network, expiry)".into(),
            history: 1,
            max_age: Duration::from_secs(u64::try_from(max_ttl_seconds).unwrap_or(86_400) + 86_400),
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let records = Bucket::open(js, config, Encoding::Protobuf)
            .await?
            .named("sessions");
        Ok(Self { records })
    }

    fn key(space: &str, session: &str) -> String {
        format!("{space}.{session}")
    }

    pub async fn get(
        &self,
        space: &str,
        session: &str,
    ) -> Result<Option<(SessionRecord, u64)>, Problem> {
        self.records.get(&Self::key(space, session)).await
    }

    /// Opens (or reopens, or extends) a session on `host` until at least `until`. Returns the
    /// record; its `host_id` is another host's when the session lives there.
    pub async fn touch(
        &self,
        space: &str,
        session: &str,
        host: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<SessionRecord, Problem> {
        let stored = self
            .records
            .modify(&Self::key(space, session), |current| {
                let Some(mut r) = current else {
                    return Ok(Change::Write(SessionRecord {
                        space: space.into(),
                        session_id: session.into(),
                        created_at: rfc3339(now()),
                        expires_at: rfc3339(until),
                        closed: false,
                        host_id: host.into(),
                    }));
                };
                let expired = r.closed || expires(&r) <= now();
                if r.host_id != host && !expired {
                    return Ok(Change::Keep);
                }
                if expired {
                    r.host_id = host.into();
                    r.closed = false;
                    r.created_at = rfc3339(now());
                    r.expires_at = rfc3339(until);
                } else if expires(&r) >= until {
                    return Ok(Change::Keep);
                } else {
                    r.expires_at = rfc3339(until);
                }
                Ok(Change::Write(r))
            })
            .await?;
        stored.map(|s| s.value).ok_or_else(|| {
            Problem::conflict(format!(
                "session `{session}` is being changed concurrently; try again"
            ))
        })
    }

    /// Marks a session closed (every janitor then removes its part).
    pub async fn close(&self, space: &str, session: &str) -> Result<(), Problem> {
        self.records
            .modify(&Self::key(space, session), |current| {
                Ok(match current {
                    None => Change::Keep,
                    Some(mut r) => {
                        r.closed = true;
                        r.expires_at = rfc3339(now());
                        Change::Write(r)
                    }
                })
            })
            .await?;
        Ok(())
    }

    pub async fn all(&self) -> Result<Vec<SessionRecord>, Problem> {
        let mut out = Vec::new();
        for k in self.records.keys().await? {
            if let Some((space, session)) = k.split_once('.')
                && let Some((r, _)) = self.get(space, session).await?
            {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// When a session expires (now, when its record cannot say).
pub fn expires(r: &SessionRecord) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(&r.expires_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| now())
}
