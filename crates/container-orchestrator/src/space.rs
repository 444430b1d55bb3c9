//! Space bindings: space → {host_id, container_id} in the KV bucket `tether_spaces`.
//!
//! A binding is written in two steps so two creates for one space cannot both win: first a
//! reservation with an empty `container_id` (KV `create`, which fails when the key exists),
//! then, once the engine has made the container, the full record (KV `update` on the
//! reservation's revision). Removal compares the container id and the revision, so a stale
//! unbind never drops a newer binding. The bucket is shared by every host's orchestrator;
//! each reconciles only its own `host_id`'s records.

use async_nats::jetstream::{self, kv};
use tether_bus::kv::Bucket;
use tether_bus::{Encoding, Problem};
use tether_proto::SpaceBinding;

#[derive(Clone)]
pub struct Spaces {
    bindings: Bucket<SpaceBinding>,
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
        let config = kv::Config {
            bucket: bucket.to_string(),
            description: "tether: space bindings (space -> host, container)".into(),
            history: 1,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        // JSON, as bindings have always been stored.
        let bindings = Bucket::open(js, config, Encoding::Json)
            .await?
            .named("space bindings");
        Ok(Spaces { bindings })
    }

    pub async fn get(&self, space: &str) -> Result<Option<(SpaceBinding, u64)>, Problem> {
        self.bindings.get(space).await
    }

    /// Reserves `b.space` (or records `b` outright when it names a container: adoption).
    pub async fn reserve(&self, b: &SpaceBinding) -> Result<Reserve, Problem> {
        for _ in 0..3 {
            if let Some(rev) = self.bindings.create(&b.space, b).await? {
                return Ok(Reserve::Reserved(rev));
            }
            if let Some((existing, rev)) = self.get(&b.space).await? {
                return Ok(Reserve::Exists(existing, rev));
            }
            // Deleted between the two calls: try again.
        }
        Err(Problem::conflict(format!(
            "space `{}` is being changed concurrently; try again",
            b.space
        )))
    }

    /// Completes a reservation (or replaces a record) at `revision`.
    pub async fn bind(&self, b: &SpaceBinding, revision: u64) -> Result<u64, Problem> {
        self.bindings
            .update(&b.space, b, revision)
            .await?
            .ok_or_else(|| Problem::conflict(format!("space `{}` changed meanwhile", b.space)))
    }

    /// Drops the binding at `revision` (only if nobody changed it since).
    pub async fn unbind_at(&self, space: &str, revision: u64) -> Result<bool, Problem> {
        let dropped = self.bindings.delete_at(space, revision).await?;
        if !dropped {
            tracing::debug!(space, "binding changed before unbind");
        }
        Ok(dropped)
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
        let mut out = Vec::new();
        for k in self.bindings.keys().await? {
            if let Some(b) = self.get(&k).await? {
                out.push(b);
            }
        }
        Ok(out)
    }
}
