//! One run: a work message from delivery to its ack — decode, execute with in-progress notes,
//! settle the task if the executor did not, then ack (or give the message back).
//!
//! Design decision: the message is acked only once the run's final event was answered
//! (accepted, or refused because the task is terminal or the attempt stale). An executor
//! error or panic is a FAILED event, never a nak; only an unreachable gateway, or a drain
//! deadline that cut the run short, gives the message back (nak) for another delivery.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use a2a::TaskState;
use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::events::{EventError, Events, Sender};
use crate::executor::{Executor, TaskContext};
use crate::wire::{EventReply, WorkItem};

/// Delay before a message given back is delivered again.
const REDELIVER_AFTER: Duration = Duration::from_secs(1);

/// How a worker's runs ended (shared, readable while it runs).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Work messages received.
    pub received: AtomicU64,
    /// Acks the server confirmed.
    pub acked: AtomicU64,
    /// Acks that failed (the message comes again).
    pub ack_failed: AtomicU64,
    /// Messages given back (gateway unreachable, or cut short by the drain deadline).
    pub given_back: AtomicU64,
    /// Undecodable work items, terminated.
    pub rejected: AtomicU64,
}

/// The runs in progress, by task, so a cancel signal finds its run.
#[derive(Clone, Default)]
pub(crate) struct Running {
    inner: Arc<Mutex<RunningInner>>,
}

#[derive(Default)]
struct RunningInner {
    next: u64,
    runs: HashMap<u64, (String, String, CancellationToken)>,
}

/// Removes its run from [`Running`] when dropped.
pub(crate) struct RunGuard {
    running: Running,
    id: u64,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.running.lock().runs.remove(&self.id);
    }
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, space: &str, task_id: &str, token: CancellationToken) -> RunGuard {
        let mut g = self.lock();
        g.next += 1;
        let id = g.next;
        g.runs
            .insert(id, (space.to_string(), task_id.to_string(), token));
        RunGuard {
            running: self.clone(),
            id,
        }
    }

    /// Cancels the runs of `task_id` in `space`; returns how many there were.
    pub(crate) fn cancel(&self, space: &str, task_id: &str) -> usize {
        let g = self.lock();
        let mut n = 0;
        for (s, t, token) in g.runs.values() {
            if s == space && t == task_id {
                token.cancel();
                n += 1;
            }
        }
        n
    }
}

/// What every run of a worker shares.
pub(crate) struct Shared<E> {
    pub executor: Arc<E>,
    pub sender: Sender,
    pub running: Running,
    pub progress_every: Duration,
    /// Fired when the drain deadline passed: unfinished runs give their message back.
    pub abort: CancellationToken,
    pub stats: Arc<WorkerStats>,
}

/// How a run leaves its message.
#[derive(Debug, PartialEq, Eq)]
enum Settle {
    Ack,
    GiveBack,
}

pub(crate) async fn run_one<E: Executor>(msg: jetstream::Message, shared: Arc<Shared<E>>) {
    shared.stats.received.fetch_add(1, Ordering::Relaxed);
    let attempt = msg
        .info()
        .map(|i| u64::try_from(i.delivered).unwrap_or(1))
        .unwrap_or(1)
        .max(1);
    let item = match serde_json::from_slice::<WorkItem>(&msg.payload) {
        Ok(w) if !w.space.is_empty() && !w.task.id.is_empty() => w,
        Ok(_) => return reject(&msg, &shared, "work item without space or task id").await,
        Err(e) => return reject(&msg, &shared, &format!("undecodable work item: {e}")).await,
    };
    let cancel = CancellationToken::new();
    let _guard = shared
        .running
        .insert(&item.space, &item.task.id, cancel.clone());
    let events = Events::new(
        shared.sender.clone(),
        item.space.clone(),
        item.task.id.clone(),
        item.task.context_id.clone(),
        attempt,
        cancel.clone(),
    );
    let span = tracing::info_span!("a2a_run", task = %item.task.id, space = %item.space, attempt);
    let ctx = TaskContext {
        caller_agent_id: item.caller_agent_id(),
        task: item.task,
        message: item.message,
        space: item.space,
        attempt,
        cancelled: cancel.clone(),
    };
    let executor = shared.executor.clone();
    let whole = async {
        let r = AssertUnwindSafe(executor.execute(ctx, events.clone()))
            .catch_unwind()
            .await;
        let error = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => Some(format!("the executor panicked: {}", panic_text(&panic))),
        };
        close(&events, &cancel, error).await
    };
    tokio::pin!(whole);
    let mut ticker = tether_bus::jobs::progress_ticker(shared.progress_every);
    let settle = loop {
        tokio::select! {
            biased;
            s = &mut whole => break Some(s),
            _ = shared.abort.cancelled() => break None,
            _ = ticker.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(parent: &span, error = %e, "could not send in-progress note");
                }
            }
        }
    };
    let r = match settle {
        Some(Settle::Ack) => msg.double_ack().await.map(|()| &shared.stats.acked),
        Some(Settle::GiveBack) => msg
            .ack_with(AckKind::Nak(Some(REDELIVER_AFTER)))
            .await
            .map(|()| &shared.stats.given_back),
        None => {
            tracing::warn!(parent: &span, "drain deadline passed; giving the work back unfinished");
            msg.ack_with(AckKind::Nak(None))
                .await
                .map(|()| &shared.stats.given_back)
        }
    };
    match r {
        Ok(counter) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            shared.stats.ack_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(parent: &span, error = %e, "could not settle the work message; it will be redelivered");
        }
    }
}

async fn reject<E>(msg: &jetstream::Message, shared: &Shared<E>, why: &str) {
    tracing::error!(subject = %msg.subject, error = %why, "dropping a work item");
    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "could not terminate a bad work item");
    }
}

/// After the executor returned: records the closing state unless the run settled already.
async fn close(events: &Events, cancel: &CancellationToken, error: Option<String>) -> Settle {
    if events.settled() {
        return Settle::Ack;
    }
    let r = if cancel.is_cancelled() {
        events.canceled().await
    } else if let Some(e) = &error {
        tracing::warn!(task = %events.task_id(), error = %e, "executor failed");
        events.fail(e.clone()).await
    } else {
        events.status(TaskState::Completed, None).await
    };
    closing_settle(&r)
}

fn closing_settle(r: &Result<EventReply, EventError>) -> Settle {
    match r {
        Ok(_) | Err(EventError::Stopped(_)) => Settle::Ack,
        Err(EventError::Invalid(e)) => {
            // Sending it again would be refused again; the task stays as the gateway has it.
            tracing::error!(error = %e, "the gateway refused the closing event");
            Settle::Ack
        }
        Err(EventError::Unavailable(e)) => {
            tracing::warn!(error = %e, "the closing event was not answered; giving the work back");
            Settle::GiveBack
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_answers_decide_the_ack() {
        let ok = Ok(crate::wire::EventReply::default());
        assert_eq!(closing_settle(&ok), Settle::Ack);
        assert_eq!(
            closing_settle(&Err(EventError::Stopped("409".into()))),
            Settle::Ack
        );
        assert_eq!(
            closing_settle(&Err(EventError::Invalid("400".into()))),
            Settle::Ack
        );
        assert_eq!(
            closing_settle(&Err(EventError::Unavailable("no gateway".into()))),
            Settle::GiveBack
        );
    }

    #[test]
    fn cancel_finds_only_its_task() {
        let r = Running::default();
        let a = CancellationToken::new();
        let b = CancellationToken::new();
        let _ga = r.insert("s1", "t1", a.clone());
        let gb = r.insert("s2", "t1", b.clone());
        assert_eq!(r.cancel("s1", "t1"), 1);
        assert!(a.is_cancelled() && !b.is_cancelled());
        drop(gb);
        assert_eq!(r.cancel("s2", "t1"), 0);
    }

    #[test]
    fn panics_are_named() {
        let p: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_text(&p), "boom");
        let p: Box<dyn std::any::Any + Send> = Box::new(String::from("bang"));
        assert_eq!(panic_text(&p), "bang");
    }
}
