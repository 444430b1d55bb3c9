//! Session records in KV (`tether_sessions`, key `<space>.<session>`): the host of a
//! session's network and relics, and its expiry.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use prost::Message as _;
use tether_bus::Problem;
use tether_proto::SessionRecord;

fn kv_err(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("sessions unavailable: {e}"))
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Session records in KV.
#[derive(Clone)]
pub struct SessionStore {
    kv: kv::Store,
}

impl SessionStore {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        max_ttl_seconds: i32,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let kv = tether_bus::auth::open_or_create_bucket(
            js,
            kv::Config {
                bucket: bucket.to_string(),
                description: "tether: sessions (host of their network, expiry)".into(),
                history: 1,
                max_age: Duration::from_secs(
                    u64::try_from(max_ttl_seconds).unwrap_or(86_400) + 86_400,
                ),
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self { kv })
    }

    fn key(space: &str, session: &str) -> String {
        format!("{space}.{session}")
    }

    pub async fn get(
        &self,
        space: &str,
        session: &str,
    ) -> Result<Option<(SessionRecord, u64)>, Problem> {
        match self
            .kv
            .entry(Self::key(space, session))
            .await
            .map_err(kv_err)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = SessionRecord::decode(e.value.as_ref())
                    .map_err(|err| Problem::internal(format!("corrupt session record: {err}")))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
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
        let key = Self::key(space, session);
        for _ in 0..8 {
            match self.get(space, session).await? {
                None => {
                    let r = SessionRecord {
                        space: space.into(),
                        session_id: session.into(),
                        created_at: rfc3339(now()),
                        expires_at: rfc3339(until),
                        closed: false,
                        host_id: host.into(),
                    };
                    match self.kv.create(&key, r.encode_to_vec().into()).await {
                        Ok(_) => return Ok(r),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(kv_err(e)),
                    }
                }
                Some((mut r, rev)) => {
                    let expired = r.closed || expires(&r) <= now();
                    if r.host_id != host && !expired {
                        return Ok(r);
                    }
                    if expired {
                        r.host_id = host.into();
                        r.closed = false;
                        r.created_at = rfc3339(now());
                        r.expires_at = rfc3339(until);
                    } else if expires(&r) >= until {
                        return Ok(r);
                    } else {
                        r.expires_at = rfc3339(until);
                    }
                    match self.kv.update(&key, r.encode_to_vec().into(), rev).await {
                        Ok(_) => return Ok(r),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(kv_err(e)),
                    }
                }
            }
        }
        Err(Problem::conflict(format!(
            "session `{session}` is being changed concurrently; try again"
        )))
    }

    /// Marks a session closed (every janitor then removes its part).
    pub async fn close(&self, space: &str, session: &str) -> Result<(), Problem> {
        let key = Self::key(space, session);
        for _ in 0..8 {
            let Some((mut r, rev)) = self.get(space, session).await? else {
                return Ok(());
            };
            r.closed = true;
            r.expires_at = rfc3339(now());
            match self.kv.update(&key, r.encode_to_vec().into(), rev).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Problem::conflict("session changed concurrently; try again"))
    }

    pub async fn all(&self) -> Result<Vec<SessionRecord>, Problem> {
        let mut keys = self.kv.keys().await.map_err(kv_err)?.boxed();
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(kv_err)?;
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
