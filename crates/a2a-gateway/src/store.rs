//! Tasks, durable in JetStream: one KV record per task (key `<space>.<task_id>`, every change
//! a compare-and-set on its revision through [`Bucket::modify`]) and a stream of task events
//! (`a2a_events.<space>.<task_id>`, each event numbered by the task's `seq`).
//!
//! The one design decision to know: the KV record is the truth and the stream announces it.
//! A change is written to KV first and then published with `Nats-Msg-Id: <space>.<task>.<seq>`,
//! and every writer first re-publishes the record's last event (a duplicate the stream drops)
//! before it writes the next one — so if a gateway dies between its write and its publish, the
//! next change, or a follower that sees the record ahead of the stream ([`Follow`]), puts the
//! missing event on the stream in order. At most the last event can be missing, and a follower
//! never sees a gap or a double: it forwards event `n` only after `n - 1`.
//!
//! For speed, without weakening that: a replica starts a task's next change from the record it
//! last wrote (the compare-and-set still checks it is current; if not, it decides again on the
//! stored one), answers a change once it is written (the event's stream acknowledgement is
//! awaited in the background), and a caller following a task it has just created subscribes to
//! the task's event subject before the work is queued instead of making a stream consumer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use a2a::StreamResponse;
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use bytes::Bytes;
use futures::StreamExt;
use tether_bus::kv::{Bucket, Change, Record};
use tether_bus::{Encoding, Problem};

use crate::config::A2aConfig;
use crate::error;
use crate::record::{TaskRecord, key};

/// Header numbering a task event.
pub const EVENT_SEQ: &str = "A2A-Event-Seq";

impl Record for TaskRecord {}

/// The task store of one gateway replica.
pub struct Tasks {
    bucket: Bucket<TaskRecord>,
    js: jetstream::Context,
    events: stream::Stream,
    /// The tasks bucket's own stream (`KV_<bucket>`), for listing a space.
    kv_stream: stream::Stream,
    /// The record this replica last wrote per task key, with its revision.
    recent: Mutex<HashMap<String, (TaskRecord, u64)>>,
    /// Highest event this replica has seen on the stream, per task key: spares a re-publish.
    published: Mutex<HashMap<String, u64>>,
}

const PUBLISHED_CAP: usize = 16_384;

impl Tasks {
    pub async fn open(js: &jetstream::Context, cfg: &A2aConfig) -> anyhow::Result<Self> {
        let bucket = Bucket::open(
            js,
            cfg.bucket(&cfg.a2a_tasks_bucket, "A2A tasks (a2a-gateway)"),
            Encoding::Json,
        )
        .await?
        .named("A2A task store")
        .timeout(Duration::from_secs(10));
        let events = tether_bus::jobs::ensure_stream(
            js,
            cfg.stream(
                &cfg.a2a_events_stream,
                "A2A task events (a2a-gateway)",
                "a2a_events.>",
            ),
        )
        .await?;
        let kv_stream = js
            .get_stream(format!("KV_{}", cfg.a2a_tasks_bucket))
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the task bucket's stream: {e}"))?;
        Ok(Self {
            bucket,
            js: js.clone(),
            events,
            kv_stream,
            published: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
        })
    }

    /// The task of a space, or `None` (another space's task is simply not there).
    pub async fn get(&self, space: &str, task_id: &str) -> Result<Option<TaskRecord>, Problem> {
        if !tether_bus::subject::is_valid_token(task_id) {
            return Ok(None);
        }
        Ok(self.bucket.get(&key(space, task_id)).await?.map(|(r, _)| r))
    }

    /// Stores a new task and announces it (event 1).
    pub async fn create(&self, rec: TaskRecord) -> Result<TaskRecord, Problem> {
        self.create_with(rec, async { Ok(()) }).await
    }

    /// Stores a new task, then announces it while `alongside` runs (e.g. queueing its work:
    /// the two publishes share one round trip).
    pub async fn create_with(
        &self,
        rec: TaskRecord,
        alongside: impl Future<Output = Result<(), Problem>>,
    ) -> Result<TaskRecord, Problem> {
        let k = key(&rec.space, &rec.task.id);
        let Some(revision) = self.bucket.create(&k, &rec).await? else {
            return Err(Problem::conflict(format!(
                "task {} exists already",
                rec.task.id
            )));
        };
        self.remember(&k, &rec, revision);
        tokio::try_join!(self.publish(&rec), alongside)?;
        Ok(rec)
    }

    /// The record this replica last wrote, if it is the one whose last event is `seq`
    /// (event numbers are unique per write, so it is the stored record as of that event).
    pub fn written_at(&self, space: &str, task_id: &str, seq: u64) -> Option<TaskRecord> {
        self.recalled(&key(space, task_id))
            .map(|(r, _)| r)
            .filter(|r| r.seq == seq)
    }

    /// Keeps the record this replica last wrote for a task, with its revision: its next
    /// change starts from it instead of reading (the compare-and-set still checks it).
    fn remember(&self, k: &str, rec: &TaskRecord, revision: u64) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() >= PUBLISHED_CAP {
            r.clear();
        }
        r.insert(k.to_string(), (rec.clone(), revision));
    }

    fn recalled(&self, k: &str) -> Option<(TaskRecord, u64)> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(k)
            .cloned()
    }

    /// Changes a task by `f` (compare-and-set; `f` may run again on a newer record) and
    /// announces the change. `f` returns whether it changed anything; an error of `f` is
    /// returned and nothing is written. A missing task is TaskNotFound.
    pub async fn change<F>(
        self: &Arc<Self>,
        space: &str,
        task_id: &str,
        mut f: F,
    ) -> Result<TaskRecord, Problem>
    where
        F: FnMut(&mut TaskRecord) -> Result<bool, Problem>,
    {
        if !tether_bus::subject::is_valid_token(task_id) {
            return Err(error::not_found(task_id));
        }
        let k = key(space, task_id);
        // Decide on what this replica last wrote, else on one read (the usual case: nobody
        // else writes the task meanwhile); only a lost compare-and-set reads again, through
        // `modify`.
        let (first, remembered) = match self.recalled(&k) {
            Some(r) => (Some(r), true),
            None => (self.bucket.get(&k).await?, false),
        };
        let Some((mut rec, revision)) = first else {
            return Err(error::not_found(task_id));
        };
        self.ensure_published(&rec).await?;
        match f(&mut rec) {
            Ok(true) => {
                if let Some(rev) = self.bucket.update(&k, &rec, revision).await? {
                    self.remember(&k, &rec, rev);
                    self.announce(&rec).await?;
                    return Ok(rec);
                }
            }
            Ok(false) if !remembered => return Ok(rec),
            Err(e) if !remembered => return Err(e),
            // A remembered record may be behind: only a write it wins counts.
            _ => {}
        }
        // Lost the race, or decided on a remembered record that may be behind: decide again
        // on the stored one (re-publishing its last event first, as every writer does).
        if let Some((fresh, _)) = self.bucket.get(&k).await? {
            self.ensure_published(&fresh).await?;
        }
        let stored = self
            .bucket
            .modify(&k, |seen| {
                let Some(mut rec) = seen else {
                    return Err(error::not_found(task_id));
                };
                Ok(if f(&mut rec)? {
                    Change::Write(rec)
                } else {
                    Change::Keep
                })
            })
            .await?
            .ok_or_else(|| error::not_found(task_id))?;
        if stored.written {
            self.remember(&k, &stored.value, stored.revision);
            self.announce(&stored.value).await?;
        }
        Ok(stored.value)
    }

    /// The tasks of `space` (every agent's; the caller filters): the last value of each of
    /// the space's keys, read through an ordered consumer of the bucket's stream.
    pub async fn list(&self, space: &str) -> Result<Vec<TaskRecord>, Problem> {
        let unavailable = |e: &dyn std::fmt::Display| {
            Problem::unavailable(format!("A2A task store unavailable: {e}"))
        };
        let consumer = self
            .kv_stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: format!("$KV.{}.{space}.*", self.bucket.store().name),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        let mut left = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        while left > 0 {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Err(_) => return Err(unavailable(&"timed out listing tasks")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(unavailable(&e)),
                Ok(Some(Ok(m))) => m,
            };
            left -= 1;
            // Deletes and purges carry an operation header and no record.
            let deleted = m
                .headers
                .as_ref()
                .is_some_and(|h| h.get("KV-Operation").is_some());
            if !deleted && let Ok(r) = serde_json::from_slice::<TaskRecord>(&m.payload) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn subject(space: &str, task_id: &str) -> String {
        format!("a2a_events.{space}.{task_id}")
    }

    /// The stream messages announcing the events of the record's last write: subject,
    /// headers (event number, de-duplication id) and body of each, in order.
    fn event_messages(
        rec: &TaskRecord,
    ) -> Result<Vec<(String, async_nats::HeaderMap, Bytes)>, Problem> {
        rec.written_events()
            .map(|(seq, event)| {
                let body = serde_json::to_vec(event)
                    .map_err(|e| Problem::internal(format!("cannot encode a task event: {e}")))?;
                let mut h = async_nats::HeaderMap::new();
                h.insert(EVENT_SEQ, seq.to_string().as_str());
                h.insert(
                    tether_bus::jobs::MSG_ID,
                    format!("{}.{}.{seq}", rec.space, rec.task.id).as_str(),
                );
                Ok((
                    Self::subject(&rec.space, &rec.task.id),
                    h,
                    Bytes::from(body),
                ))
            })
            .collect()
    }

    /// Publishes the events of the record's last write; the acknowledgements to wait for.
    async fn send_events(&self, rec: &TaskRecord) -> Result<Vec<PublishAckFuture>, Problem> {
        let mut acks = Vec::new();
        for (subject, h, body) in Self::event_messages(rec)? {
            acks.push(
                self.js
                    .publish_with_headers(subject, h, body)
                    .await
                    .map_err(|e| events_unavailable(&e))?,
            );
        }
        Ok(acks)
    }

    /// Publishes the events of the record's last write and waits for the stream to store them.
    async fn publish(&self, rec: &TaskRecord) -> Result<(), Problem> {
        for ack in self.send_events(rec).await? {
            ack.await.map_err(|e| events_unavailable(&e))?;
        }
        self.seen(&key(&rec.space, &rec.task.id), rec.seq);
        Ok(())
    }

    /// Publishes the events of the record's last write without waiting for the stream's
    /// acknowledgements (a change answers one round trip sooner). Events of one replica reach
    /// the stream in the order they were written; one the stream did not take is put there
    /// again by the task's next writer or by a follower that finds the record ahead.
    async fn announce(self: &Arc<Self>, rec: &TaskRecord) -> Result<(), Problem> {
        let acks = self.send_events(rec).await?;
        let (me, k, seq) = (self.clone(), key(&rec.space, &rec.task.id), rec.seq);
        // Counted as published from now on (this replica's next change of the task does not
        // publish it again), unless the stream refuses it.
        self.seen(&k, seq);
        tokio::spawn(async move {
            for ack in acks {
                if let Err(e) = ack.await {
                    me.unseen(&k, seq);
                    tracing::warn!(task = %k, seq, error = %e, "task event not stored; its next writer or follower publishes it again");
                    return;
                }
            }
        });
        Ok(())
    }

    fn seen(&self, k: &str, seq: u64) {
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= PUBLISHED_CAP {
            p.clear();
        }
        let e = p.entry(k.to_string()).or_insert(0);
        *e = (*e).max(seq);
    }

    fn unseen(&self, k: &str, seq: u64) {
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if p.get(k) == Some(&seq) {
            p.remove(k);
        }
    }

    /// Re-publishes the record's last event unless this replica knows it is on the stream.
    async fn ensure_published(&self, rec: &TaskRecord) -> Result<(), Problem> {
        let known = {
            let p = self.published.lock().unwrap_or_else(|e| e.into_inner());
            p.get(&key(&rec.space, &rec.task.id)).copied().unwrap_or(0)
        };
        if known >= rec.seq {
            return Ok(());
        }
        self.publish(rec).await
    }

    /// Follows a task's events after `after` (its snapshot's `seq`), in order, replaying them
    /// from the stream: for a task that may have changed since the snapshot was read.
    pub async fn follow(
        self: &Arc<Self>,
        space: &str,
        task_id: &str,
        after: u64,
    ) -> Result<Follow, Problem> {
        let consumer = self
            .events
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js_inbox(),
                filter_subject: Self::subject(space, task_id),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| Problem::unavailable(format!("A2A task events unavailable: {e}")))?;
        let consumer_name = consumer.cached_info().name.clone();
        let messages = consumer
            .messages()
            .await
            .map_err(|e| Problem::unavailable(format!("A2A task events unavailable: {e}")))?;
        Ok(self.follower(
            space,
            task_id,
            after,
            Source::Replay {
                messages: Box::new(messages),
                consumer_name,
            },
        ))
    }

    /// Follows a task's events after `after` as they are published, with a plain
    /// subscription: for a task nobody else can change before the caller goes on (it is
    /// about to queue the task's work). Cheaper than [`Tasks::follow`]: no consumer to make.
    pub async fn follow_live(
        self: &Arc<Self>,
        space: &str,
        task_id: &str,
        after: u64,
    ) -> Result<Follow, Problem> {
        let sub = self
            .js
            .client()
            .subscribe(Self::subject(space, task_id))
            .await
            .map_err(|e| Problem::unavailable(format!("A2A task events unavailable: {e}")))?;
        Ok(self.follower(space, task_id, after, Source::Live(sub)))
    }

    fn follower(
        self: &Arc<Self>,
        space: &str,
        task_id: &str,
        after: u64,
        source: Source,
    ) -> Follow {
        Follow {
            tasks: self.clone(),
            space: space.to_string(),
            task_id: task_id.to_string(),
            next: after + 1,
            pending: BTreeMap::new(),
            source,
        }
    }

    fn js_inbox(&self) -> String {
        // The node's own inbox prefix (`_INBOX_NODES.<node>`), which its permissions allow.
        self.js_client().new_inbox()
    }

    fn js_client(&self) -> async_nats::Client {
        self.js.client()
    }
}

/// A task's events in order, from one after a snapshot on.
pub struct Follow {
    tasks: Arc<Tasks>,
    space: String,
    task_id: String,
    next: u64,
    pending: BTreeMap<u64, StreamResponse>,
    source: Source,
}

/// Where a follower reads events from.
enum Source {
    /// An ordered consumer of the event stream, replaying from the start (its name as
    /// created; a reset makes a new one, left to expire).
    Replay {
        messages: Box<consumer::push::Ordered>,
        consumer_name: String,
    },
    /// A plain subscription to the task's event subject: what is published from now on.
    Live(async_nats::Subscriber),
}

fn events_unavailable(e: &dyn std::fmt::Display) -> Problem {
    Problem::unavailable(format!("A2A task events unavailable: {e}"))
}

impl Drop for Follow {
    /// Deletes a replaying follower's consumer in the background: an ordered consumer left
    /// to expire lives 30 s after its follower is gone — on a busy gateway they pile up
    /// until the server refuses new ones.
    fn drop(&mut self) {
        let Source::Replay { consumer_name, .. } = &mut self.source else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let events = self.tasks.events.clone();
        let name = std::mem::take(consumer_name);
        rt.spawn(async move {
            if let Err(e) = events.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, error = %e, "follower consumer not deleted; it expires");
            }
        });
    }
}

/// What a follower's wait brought.
enum Got {
    Event(Option<async_nats::HeaderMap>, bytes::Bytes),
    /// Nothing for a while: time to check the record itself.
    Quiet,
    Ended,
}

/// How long a follower waits on the stream before it checks the record itself.
const RECHECK: Duration = Duration::from_secs(1);

impl Follow {
    /// The number of the last event handed out (the snapshot's before any).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// The next event and its number, waiting at most until `deadline` (`Ok(None)`: the
    /// deadline passed).
    pub async fn next(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(u64, StreamResponse)>, Problem> {
        loop {
            if let Some(e) = self.pending.remove(&self.next) {
                self.next += 1;
                return Ok(Some((self.next - 1, e)));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(RECHECK);
            let got = match &mut self.source {
                Source::Replay { messages, .. } => {
                    match tokio::time::timeout(wait, messages.next()).await {
                        Ok(Some(Ok(m))) => Got::Event(m.message.headers, m.message.payload),
                        Ok(Some(Err(e))) => {
                            tracing::debug!(error = %e, "task event stream hiccup; the ordered consumer resets");
                            continue;
                        }
                        Ok(None) => Got::Ended,
                        Err(_) => Got::Quiet,
                    }
                }
                Source::Live(sub) => match tokio::time::timeout(wait, sub.next()).await {
                    Ok(Some(m)) => Got::Event(m.headers, m.payload),
                    Ok(None) => Got::Ended,
                    Err(_) => Got::Quiet,
                },
            };
            match got {
                Got::Event(headers, payload) => self.take(headers.as_ref(), &payload),
                Got::Quiet => self.recheck().await?,
                Got::Ended => return Err(Problem::unavailable("A2A task event stream ended")),
            }
        }
    }

    fn take(&mut self, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) {
        let seq = headers
            .and_then(|h| h.get(EVENT_SEQ))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let Some(seq) = seq.filter(|s| *s >= self.next) else {
            return;
        };
        match serde_json::from_slice::<StreamResponse>(payload) {
            Ok(e) => {
                self.pending.insert(seq, e);
            }
            Err(e) => tracing::warn!(seq, error = %e, "unreadable task event skipped"),
        }
    }

    /// The stream is quiet: when the record is ahead, its last event is re-published (a
    /// gateway may have died between its write and its publish).
    async fn recheck(&mut self) -> Result<(), Problem> {
        let Some(rec) = self.tasks.get(&self.space, &self.task_id).await? else {
            return Ok(());
        };
        if rec.seq >= self.next {
            for (seq, event) in rec.written_events().filter(|(n, _)| *n >= self.next) {
                self.pending.insert(seq, event.clone());
            }
            self.tasks.publish(&rec).await?;
        }
        Ok(())
    }
}
