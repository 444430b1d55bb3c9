//! Space bindings: space → {host_id, container_id} in the KV bucket `tether_spaces`.
//!
//! A binding is written in two steps so two creates for one space cannot both win: first a
//! reservation with an empty `container_id` (KV `create`, which fails when the key exists),
//! then, once the engine has made the container, the full record (KV `update` on the
//! reservation's revision). Removal compares the container id and the revision, so a stale
//! unbind never drops a newer binding. The bucket is shared by every host's orchestrator;
//! each reconciles only its own `host_id`'s records.

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tether_bus::Problem;
use tether_proto::SpaceBinding;

#[derive(Clone)]
pub struct Spaces {
    kv: kv::Store,
}

fn kv_err(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("space bindings unavailable: {e}"))
}

/// Outcome of a reservation.
pub enum Reserve {
    Reserved(u64),
    /// The space is bound already (the existing record and its revision).
    Exists(SpaceBinding, u64),
}

impl Spaces {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> anyhow::Result<Spaces> {
        let kv = tether_bus::auth::open_or_create_bucket(
            js,
            kv::Config {
                bucket: bucket.to_string(),
                description: "tether: space bindings (space -> host, container)".into(),
                history: 1,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(Spaces { kv })
    }

    pub async fn get(&self, space: &str) -> Result<Option<(SpaceBinding, u64)>, Problem> {
        match self.kv.entry(space).await.map_err(kv_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let b: SpaceBinding = serde_json::from_slice(&e.value)
                    .map_err(|err| Problem::internal(format!("corrupt space binding: {err}")))?;
                Ok(Some((b, e.revision)))
            }
            _ => Ok(None),
        }
    }

    fn encode(b: &SpaceBinding) -> Result<bytes::Bytes, Problem> {
        serde_json::to_vec(b)
            .map(Into::into)
            .map_err(|e| Problem::internal(e.to_string()))
    }

    /// Reserves `b.space` (or records `b` outright when it names a container: adoption).
    pub async fn reserve(&self, b: &SpaceBinding) -> Result<Reserve, Problem> {
        for _ in 0..3 {
            match self.kv.create(&b.space, Self::encode(b)?).await {
                Ok(rev) => return Ok(Reserve::Reserved(rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if let Some((existing, rev)) = self.get(&b.space).await? {
                        return Ok(Reserve::Exists(existing, rev));
                    }
                    // Deleted between the two calls: try again.
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Problem::conflict(format!(
            "space `{}` is being changed concurrently; try again",
            b.space
        )))
    }

    /// Completes a reservation (or replaces a record) at `revision`.
    pub async fn bind(&self, b: &SpaceBinding, revision: u64) -> Result<u64, Problem> {
        self.kv
            .update(&b.space, Self::encode(b)?, revision)
            .await
            .map_err(|e| Problem::conflict(format!("space `{}` changed meanwhile: {e}", b.space)))
    }

    /// Drops the binding at `revision` (only if nobody changed it since).
    pub async fn unbind_at(&self, space: &str, revision: u64) -> Result<bool, Problem> {
        match self.kv.delete_expect_revision(space, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(e) => {
                // A wrong revision and a failure look alike here: tell them apart by reading.
                match self.get(space).await? {
                    Some((_, rev)) if rev == revision => Err(kv_err(e)),
                    _ => {
                        tracing::debug!(space, error = %e, "binding changed before unbind");
                        Ok(false)
                    }
                }
            }
        }
    }

    /// Drops the binding of `space` if it points to `container_id` on `host_id`.
    pub async fn unbind_if(
        &self,
        space: &str,
        host_id: &str,
        container_id: &str,
    ) -> Result<bool, Problem> {
        match self.get(space).await? {
            Some((b, rev)) if b.host_id == host_id && b.container_id == container_id => {
                self.unbind_at(space, rev).await
            }
            _ => Ok(false),
        }
    }

    /// Every binding with its revision.
    pub async fn all(&self) -> Result<Vec<(SpaceBinding, u64)>, Problem> {
        let mut keys = self.kv.keys().await.map_err(kv_err)?.boxed();
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(kv_err)?;
            if let Some(b) = self.get(&k).await? {
                out.push(b);
            }
        }
        Ok(out)
    }
}
