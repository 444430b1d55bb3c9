//! The [`Executor`] trait an agent implements, and the [`TaskContext`] of one run.
//!
//! Design decision: the executor only does the work and reports it through
//! [`crate::Events`]; everything else — settling the task when it returns without a final
//! state, turning an error or a panic into FAILED, cancellation, acks — is the library's, so
//! an executor cannot leave a task hanging.

use std::future::Future;

use a2a::{Message, Task};
use tokio_util::sync::CancellationToken;

use crate::events::Events;

/// What one run of a task gets to know.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The task as it stands (its history includes `message`).
    pub task: Task,
    /// The message this run is for: the first one, or the caller's follow-up to an
    /// INPUT_REQUIRED / AUTH_REQUIRED task.
    pub message: Message,
    /// The caller's space (the task's tenant).
    pub space: String,
    /// Who asked (from the caller's verified token; empty if the gateway did not say).
    pub caller_agent_id: String,
    /// 1 on the first delivery of this work item; more after a worker died mid-run.
    pub attempt: u64,
    /// Cancelled when the task is to be canceled (the caller's cancel, or a reply asking for
    /// it) or the gateway stopped the run. The executor should return soon after; the
    /// library then records CANCELED unless the run already settled.
    pub cancelled: CancellationToken,
}

impl TaskContext {
    /// The text of the message's text parts, joined by newlines.
    pub fn text(&self) -> String {
        self.message
            .parts
            .iter()
            .filter_map(|p| p.as_text())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An agent's logic.
///
/// `execute` runs one task and reports through `events`. When it returns:
/// - after the gateway answered a terminal or interrupted state: nothing more is sent;
/// - `Ok(())` otherwise: the library records COMPLETED (CANCELED when `cancelled` fired);
/// - `Err(e)` (or a panic): FAILED with the error's text as the status message (CANCELED when
///   `cancelled` fired).
///
/// Implement it with `async fn execute(...)`; the future must be `Send`.
pub trait Executor: Send + Sync + 'static {
    fn execute(
        &self,
        ctx: TaskContext,
        events: Events,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}
