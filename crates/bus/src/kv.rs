//! JetStream KV for nodes: buckets opened the same way everywhere, and typed records
//! ([`Bucket`]) changed by compare-and-set.
//!
//! [`Bucket<T>`] stores one proto message per key, in JSON or protobuf (the bucket says which,
//! so records written before it existed read the same). Every failure of the store — the
//! server unreachable, a timeout, an unreadable record — becomes a [`Problem`] in one place
//! here (503, or 500 for an unreadable record), named after what the bucket holds
//! ("agent registry unavailable: …").
//!
//! The one design decision to know: a change to a record is a function of the record, run by
//! [`Bucket::modify`] in a read → decide → write-at-revision loop. The function sees the
//! current value (or `None`), and says [`Change::Write`] or [`Change::Keep`] — or refuses with
//! a problem, and nothing is written. When another writer got there first the function runs
//! again on the newer value, a bounded number of times with a short jittered pause, so no
//! update is ever lost and a hot key ends in a 409, not a spin.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Problem;
use crate::codec::Encoding;

/// Opens a KV bucket, creating it with `config` when it does not exist yet.
///
/// Design decision: the bucket's stream is created here with the KV conventions
/// (`KV_<bucket>`, `$KV.<bucket>.>`, rollups, direct get, discard new) rather than through
/// async-nats' `create_key_value`, which first asks for account info in a shape nats-server
/// 2.9 did not send (kept from when 2.9 was supported; tether now needs 2.10 or later).
///
/// An existing bucket with fewer replicas than `config` asks for (made R1 by an earlier
/// version, or by a node that came first with the default) is raised to them: the server
/// copies it to the new peers while it serves. Never lowered: fewer replicas is a decision
/// for an operator, not for whichever node starts first.
///
/// Reads see every acknowledged write (see [`direct_reads`]): a replicated bucket answers gets
/// from its stream's leader only, so one made by an earlier version with direct gets is
/// changed to that here.
pub async fn open_or_create_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> anyhow::Result<kv::Store> {
    let what = format!("open KV bucket `{}`", config.bucket);
    if answered(&what, || js.get_key_value(config.bucket.clone()))
        .await?
        .is_ok()
    {
        settle(js, &config).await?;
        // Opened again: a store decides at opening whether its reads are direct gets.
        return answered(&what, || js.get_key_value(config.bucket.clone()))
            .await?
            .map_err(|e| anyhow::anyhow!("could not open KV bucket `{}`: {e}", config.bucket));
    }
    let mut stream = jetstream::stream::Config {
        name: format!("KV_{}", config.bucket),
        description: Some(config.description.clone()),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: direct_reads(config.num_replicas),
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    if config.max_bytes > 0 {
        stream.max_bytes = config.max_bytes;
    }
    if !config.max_age.is_zero() && config.max_age < Duration::from_secs(120) {
        stream.duplicate_window = config.max_age;
    }
    let placing = tokio::time::Instant::now() + PLACEMENT_WAIT;
    let created = loop {
        match answered(&what, || js.create_stream(stream.clone())).await? {
            Err(e) if no_peers_yet(&e) && tokio::time::Instant::now() < placing => {
                tracing::warn!(bucket = %config.bucket, "the cluster has no peers for the bucket yet; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => break r,
        }
    };
    if let Err(create_err) = created {
        // Another replica may have created it between our two calls; otherwise report.
        return answered(&what, || js.get_key_value(config.bucket.clone()))
            .await?
            .map_err(|_| {
                anyhow::anyhow!(
                    "could not open or create KV bucket `{}`: {create_err}",
                    config.bucket
                )
            });
    }
    answered(&what, || js.get_key_value(config.bucket.clone()))
        .await?
        .map_err(|e| anyhow::anyhow!("could not open KV bucket `{}`: {e}", config.bucket))
}

/// How long a bucket's creation is asked again while the cluster cannot place its replicas:
/// a cluster that just formed (every member started together, as compose and the test
/// fixtures do) answers "no suitable peers" until its meta layer knows them all.
const PLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// JetStream's "no suitable peers for placement" (error code 10005).
fn no_peers_yet(e: &jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j) if j.error_code().0 == 10005)
}

/// How long one JetStream API request of a node's start may go unanswered before it is asked
/// again, and how many times. Right after a cluster lost a server, a request can be lost
/// (found by the compose test: the first request of an orchestrator restarted then waited out
/// the client's 30 s request timeout, every time). Opening and creating are idempotent.
pub const API_ATTEMPT: Duration = Duration::from_secs(4);
const API_ATTEMPTS: u32 = 5;

/// `call`'s answer, asking again when one attempt gets none within [`API_ATTEMPT`].
pub async fn answered<T, Fut>(what: &str, mut call: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = T>,
{
    for attempt in 1..=API_ATTEMPTS {
        match tokio::time::timeout(API_ATTEMPT, call()).await {
            Ok(answer) => return Ok(answer),
            Err(_) => {
                tracing::warn!(
                    what,
                    attempt,
                    "a JetStream API request went unanswered; asking again"
                )
            }
        }
    }
    anyhow::bail!(
        "{what}: JetStream did not answer {API_ATTEMPTS} requests of {API_ATTEMPT:?} each"
    )
}

/// Whether a bucket of `replicas` copies answers gets as direct gets.
///
/// Design decision: only an R1 bucket does. A direct get may be answered by any replica of
/// the stream, and a follower answers from what it has applied so far — so a record written
/// and acknowledged a moment ago can read as absent (found in CI: an agent registered, then a
/// token refused for "no agent" on a three-server cluster). Without direct gets a get is the
/// stream leader's `STREAM.MSG.GET`, which has every acknowledged write.
pub fn direct_reads(replicas: usize) -> bool {
    replicas <= 1
}

/// Brings an existing bucket's stream to what `config` needs: its replicas raised to
/// `config.num_replicas` (never lowered), and direct gets as [`direct_reads`] says for the
/// replicas it ends with.
async fn settle(js: &jetstream::Context, config: &kv::Config) -> anyhow::Result<()> {
    let name = format!("KV_{}", config.bucket);
    let what = format!("read KV bucket `{}`", config.bucket);
    let mut stream = answered(&what, || js.get_stream(&name))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot read KV bucket `{}`: {e}", config.bucket))?;
    let mut stream_config = stream.cached_info().config.clone();
    let from = stream_config.num_replicas;
    let replicas = from.max(config.num_replicas);
    let direct = direct_reads(replicas);
    if replicas == from && stream_config.allow_direct == direct {
        return Ok(());
    }
    stream_config.num_replicas = replicas;
    stream_config.allow_direct = direct;
    if replicas == from {
        // Only the reads change (a bucket an earlier version made with direct gets). A node
        // that may only read the bucket (a token verifier) has no right to change it: it asks
        // once, and reads as the bucket says until its owner has changed it.
        match tokio::time::timeout(API_ATTEMPT, js.update_stream(stream_config.clone())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(bucket = %config.bucket, error = %e, "could not turn off direct gets of a replicated KV bucket; its reads may lag its writes");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(bucket = %config.bucket, "no answer to turning off direct gets of a replicated KV bucket (no right to?); its reads may lag its writes");
                return Ok(());
            }
        }
    } else {
        answered(&what, || js.update_stream(stream_config.clone()))
            .await?
            .map_err(|e| {
                anyhow::anyhow!(
                    "KV bucket `{}` has {from} replica(s); raising it to {replicas} failed: {e}",
                    config.bucket,
                )
            })?;
    }
    tracing::info!(bucket = %config.bucket, from, to = replicas, direct, "settled the replicas and reads of a KV bucket");
    let _ = stream.info().await;
    Ok(())
}

/// What a [`Bucket::modify`] function decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<T> {
    /// Store this value: created when the key has none, else written at the revision read.
    Write(T),
    /// Leave the record as it is (or absent, when there is none).
    Keep,
}

/// A record as stored after [`Bucket::modify`].
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<T> {
    pub value: T,
    pub revision: u64,
    /// Whether this call wrote it (false: the function said [`Change::Keep`]).
    pub written: bool,
}

/// How many times [`Bucket::modify`] reads and decides again after losing a race.
pub const MODIFY_ATTEMPTS: usize = 16;

/// What a [`Bucket`] can hold: every record reads and writes as JSON; a proto message also as
/// protobuf (a bucket opened with [`Encoding::Protobuf`]). Proto messages are records by the
/// blanket impl; a JSON-only type (e.g. one holding A2A's own types) says `impl Record for X {}`.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The protobuf form, when the type has one.
    fn to_protobuf(&self) -> Option<Vec<u8>> {
        None
    }
    /// Reads the protobuf form (`None`: the type has none).
    fn from_protobuf(_raw: &[u8]) -> Option<Result<Self, String>> {
        None
    }
}

impl<T> Record for T
where
    T: prost::Message + Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static,
{
    fn to_protobuf(&self) -> Option<Vec<u8>> {
        Some(self.encode_to_vec())
    }
    fn from_protobuf(raw: &[u8]) -> Option<Result<Self, String>> {
        Some(T::decode(raw).map_err(|e| e.to_string()))
    }
}

/// Typed records of one KV bucket. Cheap to clone.
pub struct Bucket<T> {
    store: kv::Store,
    encoding: Encoding,
    what: Arc<str>,
    timeout: Option<Duration>,
    _record: PhantomData<fn() -> T>,
}

impl<T> Clone for Bucket<T> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            encoding: self.encoding,
            what: self.what.clone(),
            timeout: self.timeout,
            _record: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Bucket<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("bucket", &self.store.name)
            .field("encoding", &self.encoding)
            .finish()
    }
}

impl<T: Record> Bucket<T> {
    /// Opens (or creates, see [`open_or_create_bucket`]) the bucket of `config`, whose records
    /// are `encoding`-encoded. Errors are named after the bucket until [`Bucket::named`].
    pub async fn open(
        js: &jetstream::Context,
        config: kv::Config,
        encoding: Encoding,
    ) -> anyhow::Result<Self> {
        Ok(Self::from_store(
            open_or_create_bucket(js, config).await?,
            encoding,
        ))
    }

    /// Typed records over an opened store.
    pub fn from_store(store: kv::Store, encoding: Encoding) -> Self {
        let what = Arc::from(format!("KV bucket `{}`", store.name));
        Self {
            store,
            encoding,
            what,
            timeout: None,
            _record: PhantomData,
        }
    }

    /// What the bucket holds, for error details ("agent registry" → "agent registry
    /// unavailable: …").
    pub fn named(mut self, what: impl Into<String>) -> Self {
        self.what = Arc::from(what.into());
        self
    }

    /// A deadline for every store operation (without one, the connection's request timeout
    /// applies); an operation that passes it is answered 503.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// The untyped store (watches, and keys that hold other things than `T`).
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// The one mapping of a store failure: 503, naming what is unavailable.
    fn unavailable(&self, e: impl fmt::Display) -> Problem {
        Problem::unavailable(format!("{} unavailable: {e}", self.what))
    }

    async fn bounded<R, E: fmt::Display>(
        &self,
        op: impl Future<Output = Result<R, E>>,
    ) -> Result<Result<R, E>, Problem> {
        match self.timeout {
            Some(t) => tokio::time::timeout(t, op)
                .await
                .map_err(|_| self.unavailable("timed out")),
            None => Ok(op.await),
        }
    }

    fn encode(&self, value: &T) -> Result<Bytes, Problem> {
        match self.encoding {
            Encoding::Json => serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
                Problem::internal(format!("cannot encode a record of {}: {e}", self.what))
            }),
            Encoding::Protobuf => value
                .to_protobuf()
                .map(Bytes::from)
                .ok_or_else(|| Problem::internal(format!("{} holds JSON-only records", self.what))),
        }
    }

    fn decode(&self, key: &str, raw: &[u8]) -> Result<T, Problem> {
        let r = match self.encoding {
            Encoding::Json => serde_json::from_slice(raw).map_err(|e| e.to_string()),
            Encoding::Protobuf => T::from_protobuf(raw)
                .unwrap_or_else(|| Err("JSON-only records cannot be read as protobuf".into())),
        };
        r.map_err(|e| Problem::internal(format!("unreadable record `{key}` in {}: {e}", self.what)))
    }

    /// The record at `key` and its revision; `None` when there is none (or it was deleted).
    /// An unreadable record is a 500.
    pub async fn get(&self, key: &str) -> Result<Option<(T, u64)>, Problem> {
        let entry = self
            .bounded(self.store.entry(key))
            .await?
            .map_err(|e| self.unavailable(e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((self.decode(key, &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates the record; `None` when the key holds one already.
    pub async fn create(&self, key: &str, value: &T) -> Result<Option<u64>, Problem> {
        let body = self.encode(value)?;
        match self.bounded(self.store.create(key, body)).await? {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Writes the record if it is still at `revision`; `None` when it changed since.
    pub async fn update(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<Option<u64>, Problem> {
        let body = self.encode(value)?;
        match self.bounded(self.store.update(key, body, revision)).await? {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Writes the record whatever is there (last writer wins). Returns the new revision.
    pub async fn put(&self, key: &str, value: &T) -> Result<u64, Problem> {
        let body = self.encode(value)?;
        self.bounded(self.store.put(key, body))
            .await?
            .map_err(|e| self.unavailable(e))
    }

    /// Deletes the record (absent already is fine).
    pub async fn delete(&self, key: &str) -> Result<(), Problem> {
        self.bounded(self.store.delete(key))
            .await?
            .map_err(|e| self.unavailable(e))
    }

    /// Deletes the record if it is still at `revision`; `false` when it changed since (or a
    /// failure left it in place: the record is read to tell).
    pub async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, Problem> {
        match self
            .bounded(self.store.delete_expect_revision(key, Some(revision)))
            .await?
        {
            Ok(()) => Ok(true),
            Err(e) => match self.get(key).await? {
                Some((_, rev)) if rev == revision => Err(self.unavailable(e)),
                _ => Ok(false),
            },
        }
    }

    /// Every key that holds a record.
    pub async fn keys(&self) -> Result<Vec<String>, Problem> {
        let keys = self
            .bounded(self.store.keys())
            .await?
            .map_err(|e| self.unavailable(e))?;
        self.bounded(keys.boxed().try_collect::<Vec<String>>())
            .await?
            .map_err(|e| self.unavailable(e))
    }

    /// Changes the record at `key` by compare-and-set: reads it, asks `f` what to do with the
    /// current value (`None`: no record), and writes the outcome at the revision read — or
    /// creates it, when there was none. When another writer changed the key meanwhile, `f`
    /// runs again on the newer value (up to [`MODIFY_ATTEMPTS`] times, then 409).
    ///
    /// Returns the record as stored afterwards — `None` when there is none and `f` kept it
    /// so. An error of `f` is returned as it is, and nothing is written.
    pub async fn modify<F>(&self, key: &str, mut f: F) -> Result<Option<Stored<T>>, Problem>
    where
        F: FnMut(Option<T>) -> Result<Change<T>, Problem>,
    {
        for attempt in 0..MODIFY_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let current = self.get(key).await?;
            let (seen, revision) = match current {
                Some((v, rev)) => (Some(v), Some(rev)),
                None => (None, None),
            };
            let decided = f(seen.clone())?;
            let value = match decided {
                Change::Keep => {
                    return Ok(seen.zip(revision).map(|(value, revision)| Stored {
                        value,
                        revision,
                        written: false,
                    }));
                }
                Change::Write(v) => v,
            };
            let written = match revision {
                Some(rev) => self.update(key, &value, rev).await?,
                None => self.create(key, &value).await?,
            };
            if let Some(revision) = written {
                return Ok(Some(Stored {
                    value,
                    revision,
                    written: true,
                }));
            }
            tracing::debug!(key, attempt, bucket = %self.store.name, "KV record changed meanwhile; deciding again");
        }
        Err(Problem::conflict(format!(
            "`{key}` in {} is being changed concurrently; try again",
            self.what
        )))
    }
}

/// Pause before attempt `n` (n ≥ 1) of a lost compare-and-set: a random share of 1, 2, 4 …
/// up to 32 ms, so racing writers spread out instead of colliding again in lockstep.
fn backoff(attempt: usize) -> Duration {
    let cap_ms = 1u64 << attempt.min(5);
    // Randomness without another dependency: a v4 UUID's bits.
    let r = u64::try_from(uuid::Uuid::new_v4().as_u128() & u128::from(u64::MAX)).unwrap_or(0);
    Duration::from_micros(r % (cap_ms * 1000 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        for n in 1..40 {
            assert!(backoff(n) <= Duration::from_millis(32), "{n}");
        }
    }
}
