//! Tool-run records (`exec.<id>`) and idempotency keys (`idem.<space>.<key>`) in KV, and the
//! status a run is in. Records change only by compare-and-set on their revision.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::kv::{Bucket, Change as Decided};
use tether_bus::{Encoding, Problem};
use tether_proto::ToolExecution;

/// Where a run is. On the wire it is its string (`ToolExecution.status`, see [`Status::as_str`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Completed,
    /// Also what a run that says nothing else is.
    #[default]
    Failed,
    TimedOut,
    Cancelled,
}

impl Status {
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Queued,
            Status::Running,
            Status::Completed,
            Status::Failed,
            Status::TimedOut,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::TimedOut | Status::Cancelled
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Status> for String {
    fn from(s: Status) -> String {
        s.as_str().to_string()
    }
}

/// Whether a record's status (as the wire has it) is final.
pub fn is_terminal(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_terminal)
}

fn kv_err(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("tool results unavailable: {e}"))
}

/// What a change to a record decided.
pub enum Change {
    Write,
    /// Leave the record as it is (the closure said why).
    Keep,
}

/// Run records (protobuf, `exec.<id>`) and idempotency keys (`idem.<space>.<key>`, holding
/// the execution id as plain text) in KV.
#[derive(Clone)]
pub struct Results {
    records: Bucket<ToolExecution>,
}

impl Results {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let config = kv::Config {
            bucket: bucket.to_string(),
            description: "tether: tool runs (exec.<id>) and idempotency keys".into(),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let records = Bucket::open(js, config, Encoding::Protobuf)
            .await?
            .named("tool results");
        Ok(Self { records })
    }

    fn key(id: &str) -> String {
        format!("exec.{id}")
    }

    pub async fn get(&self, id: &str) -> Result<Option<(ToolExecution, u64)>, Problem> {
        self.records.get(&Self::key(id)).await
    }

    pub async fn create(&self, r: &ToolExecution) -> Result<u64, Problem> {
        self.records
            .create(&Self::key(&r.execution_id), r)
            .await?
            .ok_or_else(|| {
                Problem::conflict(format!("execution `{}` exists already", r.execution_id))
            })
    }

    pub async fn delete(&self, id: &str) {
        let _ = self.records.delete(&Self::key(id)).await;
    }

    /// Reads, lets `f` change the record, writes it back by revision (decided again on a
    /// concurrent change, see [`Bucket::modify`]). `Ok(None)` when there is no record; else
    /// the record, its revision, and whether this call wrote it.
    pub async fn modify<F>(
        &self,
        id: &str,
        mut f: F,
    ) -> Result<Option<(ToolExecution, u64, bool)>, Problem>
    where
        F: FnMut(&mut ToolExecution) -> Change,
    {
        let stored = self
            .records
            .modify(&Self::key(id), |current| {
                let Some(mut r) = current else {
                    return Ok(Decided::Keep);
                };
                Ok(match f(&mut r) {
                    Change::Write => Decided::Write(r),
                    Change::Keep => Decided::Keep,
                })
            })
            .await?;
        Ok(stored.map(|s| (s.value, s.revision, s.written)))
    }

    /// Releases an idempotency key that `id` holds (a submission that queued nothing).
    pub async fn release_key(&self, space: &str, key: &str, id: &str) {
        let k = format!("idem.{space}.{key}");
        if let Ok(Some(e)) = self.records.store().entry(&k).await
            && e.operation == kv::Operation::Put
            && e.value.as_ref() == id.as_bytes()
        {
            // By revision: a key claimed again meanwhile is not touched.
            let _ = self
                .records
                .store()
                .delete_expect_revision(&k, Some(e.revision))
                .await;
        }
    }

    /// Claims an idempotency key for `id`; `Some(other)` when another run holds it.
    pub async fn claim_key(
        &self,
        space: &str,
        key: &str,
        id: &str,
    ) -> Result<Option<String>, Problem> {
        let k = format!("idem.{space}.{key}");
        for _ in 0..3 {
            match self.records.store().create(&k, id.to_string().into()).await {
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if let Some(v) = self.records.store().get(&k).await.map_err(kv_err)? {
                        return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
                    }
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Problem::conflict(
            "idempotency key is being changed concurrently; try again",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_statuses() {
        for s in [
            Status::Completed,
            Status::Failed,
            Status::TimedOut,
            Status::Cancelled,
        ] {
            assert!(is_terminal(s.as_str()));
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert!(!is_terminal(Status::Queued.as_str()) && !is_terminal(Status::Running.as_str()));
        assert!(!is_terminal("") && Status::parse("done").is_none());
    }
}
