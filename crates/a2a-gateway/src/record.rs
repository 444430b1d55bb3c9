//! A task as the gateway stores it, and the pure rules that change it: a new task, a caller's
//! follow-up message, a worker's event, a cancel. Every change yields the one A2A event
//! ([`StreamResponse`]) that announces it, so the store can number and publish it.
//!
//! The one design decision to know: a worker's events carry the delivery attempt of the work
//! item they belong to. An event of an older attempt than the task has seen is refused (a
//! worker that lost its item to redelivery cannot touch the task), a newer attempt starts over
//! (the artifacts of the abandoned attempt are dropped), and a terminal task refuses every
//! event — so a task redelivered after a worker died ends in exactly one terminal state.

use std::collections::HashMap;

use a2a::{
    Message, Role, StreamResponse, Task, TaskArtifactUpdateEvent, TaskState, TaskStatus,
    TaskStatusUpdateEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tether_bus::Problem;

use crate::error::A2aError;

/// Metadata key under which the gateway records who asked (from the verified token).
pub const TETHER_META: &str = "tether";

/// One task in the tasks bucket (key [`key`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub task: Task,
    /// The agent serving the task.
    pub agent: String,
    pub space: String,
    /// The agent id of the caller who created the task.
    pub caller: String,
    /// Events so far; the last one is `last_event`, numbered `seq`.
    pub seq: u64,
    pub last_event: StreamResponse,
    /// The events of the same write before `last_event` (a worker's batch), oldest first,
    /// numbered up to `seq - 1`; empty for a write of one event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_events: Vec<StreamResponse>,
    /// The highest work-item delivery attempt a worker has reported (0: no worker yet).
    pub attempt: u64,
    pub cancel_requested: bool,
    pub updated_ms: i64,
}

/// The tasks bucket key of a task.
pub fn key(space: &str, task_id: &str) -> String {
    format!("{space}.{task_id}")
}

/// Whether a state ends a blocking send: terminal or interrupted.
pub fn settles(state: &TaskState) -> bool {
    state.is_terminal() || matches!(state, TaskState::InputRequired | TaskState::AuthRequired)
}

fn now_status(state: TaskState, message: Option<Message>) -> TaskStatus {
    TaskStatus {
        state,
        message,
        timestamp: Some(chrono::Utc::now()),
    }
}

fn status_event(task: &Task) -> StreamResponse {
    StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
        task_id: task.id.clone(),
        context_id: task.context_id.clone(),
        status: task.status.clone(),
        metadata: None,
    })
}

/// Checks a caller's message: an id, at least one part.
pub fn check_message(m: &Message) -> Result<(), Problem> {
    if m.message_id.trim().is_empty() {
        return Err(A2aError::InvalidParams.problem("message.messageId is required"));
    }
    if m.parts.is_empty() {
        return Err(A2aError::InvalidParams.problem("message.parts must not be empty"));
    }
    Ok(())
}

/// Who is asking, from the verified token.
pub struct Asker<'a> {
    pub agent: &'a str,
    pub space: &'a str,
    pub caller: &'a str,
}

/// A new SUBMITTED task for a caller's first message (the task id is minted here).
pub fn new_task(
    who: &Asker<'_>,
    mut message: Message,
    metadata: Option<HashMap<String, Value>>,
) -> TaskRecord {
    let id = a2a::new_task_id();
    let context_id = message
        .context_id
        .clone()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(a2a::new_context_id);
    message.task_id = Some(id.clone());
    message.context_id = Some(context_id.clone());
    if message.role == Role::Unspecified {
        message.role = Role::User;
    }
    let mut meta = metadata.unwrap_or_default();
    meta.insert(
        TETHER_META.into(),
        json!({"callerAgentId": who.caller, "space": who.space, "agentId": who.agent}),
    );
    let task = Task {
        id,
        context_id,
        status: now_status(TaskState::Submitted, None),
        artifacts: None,
        history: Some(vec![message]),
        metadata: Some(meta),
    };
    TaskRecord {
        last_event: StreamResponse::Task(task.clone()),
        earlier_events: Vec::new(),
        task,
        agent: who.agent.to_string(),
        space: who.space.to_string(),
        caller: who.caller.to_string(),
        seq: 1,
        attempt: 0,
        cancel_requested: false,
        updated_ms: chrono::Utc::now().timestamp_millis(),
    }
}

impl TaskRecord {
    pub fn state(&self) -> &TaskState {
        &self.task.status.state
    }

    /// The events of the last write, numbered, oldest first.
    pub fn written_events(&self) -> impl Iterator<Item = (u64, &StreamResponse)> {
        let first = self.seq - self.earlier_events.len() as u64;
        self.earlier_events
            .iter()
            .chain(std::iter::once(&self.last_event))
            .enumerate()
            .map(move |(i, e)| (first + i as u64, e))
    }

    fn record(&mut self, event: StreamResponse) -> StreamResponse {
        self.seq += 1;
        self.earlier_events.clear();
        self.last_event = event.clone();
        self.updated_ms = chrono::Utc::now().timestamp_millis();
        event
    }

    /// A caller's follow-up message to an interrupted task: back to SUBMITTED for a worker.
    pub fn follow_up(&mut self, mut message: Message) -> Result<StreamResponse, Problem> {
        let state = self.state().clone();
        if state.is_terminal() {
            return Err(A2aError::UnsupportedOperation.problem(format!(
                "task {} is terminal ({state:?}); it takes no more messages",
                self.task.id
            )));
        }
        if !matches!(state, TaskState::InputRequired | TaskState::AuthRequired) {
            return Err(A2aError::UnsupportedOperation.problem(format!(
                "task {} is still {state:?}; a follow-up message needs it to ask for input",
                self.task.id
            )));
        }
        if let Some(c) = message.context_id.as_deref().filter(|c| !c.is_empty())
            && c != self.task.context_id
        {
            return Err(A2aError::InvalidParams.problem(format!(
                "message.contextId {c:?} is not the task's context {:?}",
                self.task.context_id
            )));
        }
        message.task_id = Some(self.task.id.clone());
        message.context_id = Some(self.task.context_id.clone());
        if message.role == Role::Unspecified {
            message.role = Role::User;
        }
        self.task
            .history
            .get_or_insert_with(Vec::new)
            .push(message.clone());
        self.task.status = now_status(TaskState::Submitted, Some(message));
        // A new work item: its deliveries count from 1 again.
        self.attempt = 0;
        self.cancel_requested = false;
        let e = status_event(&self.task);
        Ok(self.record(e))
    }

    /// The gateway itself ends the task CANCELED (queued, interrupted, or past the grace).
    pub fn cancel_now(&mut self) -> Result<StreamResponse, Problem> {
        if self.state().is_terminal() {
            return Err(A2aError::TaskNotCancelable.problem(format!(
                "task {} is already {:?}",
                self.task.id,
                self.state()
            )));
        }
        self.task.status = now_status(TaskState::Canceled, None);
        let e = status_event(&self.task);
        Ok(self.record(e))
    }

    /// The work item of message `message_id` ran out of deliveries: the task ends FAILED,
    /// unless it has settled or moved on to a later message meanwhile (`None`: unchanged).
    pub fn give_up(
        &mut self,
        message_id: &str,
        deliveries: u64,
    ) -> Result<Option<StreamResponse>, Problem> {
        if settles(self.state()) {
            return Ok(None);
        }
        let history = self.task.history.as_deref().unwrap_or_default();
        let Some(at) = history.iter().position(|m| m.message_id == message_id) else {
            return Ok(None);
        };
        if history[at + 1..].iter().any(|m| m.role == Role::User) {
            return Ok(None);
        }
        let note = Message::new(
            Role::Agent,
            vec![a2a::Part::text(format!(
                "no worker finished the task: its work item was delivered {deliveries} times"
            ))],
        );
        self.task.status = now_status(TaskState::Failed, Some(note));
        let e = status_event(&self.task);
        Ok(Some(self.record(e)))
    }

    /// Whether a worker holds the task now (a worker has reported, and it is not waiting
    /// for the caller).
    pub fn is_running(&self) -> bool {
        self.attempt > 0 && matches!(self.state(), TaskState::Working | TaskState::Submitted)
    }

    /// A worker's batch of events for `attempt`, applied in order as one write: all of them
    /// or, when any is refused, none. Returns whether anything changed.
    pub fn apply_worker_all(
        &mut self,
        attempt: u64,
        events: Vec<StreamResponse>,
    ) -> Result<bool, Problem> {
        if events.is_empty() {
            return Err(A2aError::InvalidParams.problem("a batch needs at least one event"));
        }
        let mut next = self.clone();
        let mut written = Vec::new();
        for event in events {
            let before = next.seq;
            next.apply_worker(attempt, event)?;
            if next.seq != before {
                written.push(next.last_event.clone());
            }
        }
        if written.pop().is_none() {
            return Ok(false);
        }
        next.earlier_events = written;
        *self = next;
        Ok(true)
    }

    /// A worker's event for `attempt` of the task's work item.
    pub fn apply_worker(
        &mut self,
        attempt: u64,
        event: StreamResponse,
    ) -> Result<StreamResponse, Problem> {
        if self.state().is_terminal() {
            return Err(Problem::conflict(format!(
                "task {} is terminal ({:?}); the event is dropped",
                self.task.id,
                self.state()
            )));
        }
        if attempt == 0 {
            return Err(A2aError::InvalidParams.problem("attempt must be at least 1"));
        }
        if attempt < self.attempt {
            return Err(Problem::conflict(format!(
                "stale attempt {attempt}: the task's work item was delivered again (attempt {})",
                self.attempt
            )));
        }
        if attempt > self.attempt {
            if self.attempt > 0 {
                // A new delivery starts over: what an abandoned attempt produced is gone.
                self.task.artifacts = None;
            }
            self.attempt = attempt;
        }
        let (id, ctx) = (self.task.id.clone(), self.task.context_id.clone());
        let out = match event {
            StreamResponse::StatusUpdate(mut s) => {
                if matches!(
                    s.status.state,
                    TaskState::Submitted | TaskState::Unspecified
                ) {
                    return Err(A2aError::InvalidParams.problem(
                        "a worker cannot set the state SUBMITTED (or leave it unspecified)",
                    ));
                }
                if s.status.timestamp.is_none() {
                    s.status.timestamp = Some(chrono::Utc::now());
                }
                self.task.status = s.status.clone();
                StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
                    task_id: id,
                    context_id: ctx,
                    status: s.status,
                    metadata: s.metadata,
                })
            }
            StreamResponse::ArtifactUpdate(a) => {
                let artifacts = self.task.artifacts.get_or_insert_with(Vec::new);
                match artifacts
                    .iter_mut()
                    .find(|x| x.artifact_id == a.artifact.artifact_id)
                {
                    Some(x) if a.append == Some(true) => x.parts.extend(a.artifact.parts.clone()),
                    Some(x) => *x = a.artifact.clone(),
                    None => artifacts.push(a.artifact.clone()),
                }
                StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
                    task_id: id,
                    context_id: ctx,
                    ..a
                })
            }
            StreamResponse::Message(mut m) => {
                // The agent's reply: into the history, and it completes the task unless the
                // task already waits for input.
                m.task_id = Some(id);
                m.context_id = Some(ctx);
                if m.role == Role::Unspecified {
                    m.role = Role::Agent;
                }
                self.task
                    .history
                    .get_or_insert_with(Vec::new)
                    .push(m.clone());
                if !settles(self.state()) {
                    self.task.status = now_status(TaskState::Completed, Some(m));
                }
                status_event(&self.task)
            }
            StreamResponse::Task(t) => {
                if matches!(
                    t.status.state,
                    TaskState::Submitted | TaskState::Unspecified
                ) && t.artifacts.is_none()
                {
                    // An SDK announcing the task it was given: nothing changes, nothing to say.
                    return Ok(StreamResponse::Task(self.task.clone()));
                }
                if !matches!(
                    t.status.state,
                    TaskState::Submitted | TaskState::Unspecified
                ) {
                    self.task.status = t.status;
                }
                if t.artifacts.is_some() {
                    self.task.artifacts = t.artifacts;
                }
                StreamResponse::Task(self.task.clone())
            }
        };
        Ok(self.record(out))
    }
}

/// The task as a caller sees it: history cut to the last `history_length` messages.
pub fn view(task: &Task, history_length: Option<i32>) -> Task {
    let mut t = task.clone();
    if let (Some(n), Some(h)) = (history_length, t.history.as_mut()) {
        let n = usize::try_from(n.max(0)).unwrap_or(0);
        let cut = h.len().saturating_sub(n);
        h.drain(..cut);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a::{Artifact, Part};

    fn rec() -> TaskRecord {
        let who = Asker {
            agent: "echo",
            space: "s1",
            caller: "alice",
        };
        let mut m = Message::new(Role::User, vec![Part::text("hi")]);
        m.metadata = None;
        let mut meta = HashMap::new();
        meta.insert(TETHER_META.to_string(), json!({"space": "forged"}));
        new_task(&who, m, Some(meta))
    }

    fn status(state: TaskState) -> StreamResponse {
        StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
            task_id: "other".into(),
            context_id: "other".into(),
            status: TaskStatus {
                state,
                message: None,
                timestamp: None,
            },
            metadata: None,
        })
    }

    fn artifact(id: &str, text: &str, append: bool) -> StreamResponse {
        StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
            task_id: "x".into(),
            context_id: "x".into(),
            artifact: Artifact {
                artifact_id: id.into(),
                name: None,
                description: None,
                parts: vec![Part::text(text)],
                metadata: None,
                extensions: None,
            },
            append: Some(append),
            last_chunk: None,
            metadata: None,
        })
    }

    #[test]
    fn a_new_task_is_submitted_and_names_the_asker() {
        let r = rec();
        assert_eq!(r.state(), &TaskState::Submitted);
        assert_eq!(r.seq, 1);
        let meta = r.task.metadata.as_ref().expect("metadata");
        assert_eq!(
            meta[TETHER_META]["space"], "s1",
            "the caller cannot forge the space"
        );
        assert_eq!(meta[TETHER_META]["callerAgentId"], "alice");
        let h = r.task.history.as_ref().expect("history");
        assert_eq!(h[0].task_id.as_deref(), Some(r.task.id.as_str()));
    }

    #[test]
    fn worker_events_number_and_normalize() {
        let mut r = rec();
        let e = r
            .apply_worker(1, status(TaskState::Working))
            .expect("working");
        let StreamResponse::StatusUpdate(s) = e else {
            panic!("status event")
        };
        assert_eq!(s.task_id, r.task.id, "a worker cannot redirect an event");
        r.apply_worker(1, artifact("a", "one", false))
            .expect("artifact");
        r.apply_worker(1, artifact("a", "two", true))
            .expect("append");
        r.apply_worker(1, status(TaskState::Completed))
            .expect("completed");
        assert_eq!(r.seq, 5);
        assert_eq!(
            r.task.artifacts.as_ref().expect("artifacts")[0].parts.len(),
            2
        );
        let err = r
            .apply_worker(1, status(TaskState::Failed))
            .expect_err("terminal");
        assert_eq!(err.status, 409);
        assert_eq!(r.seq, 5, "a refused event changes nothing");
    }

    #[test]
    fn attempts_are_ordered() {
        let mut r = rec();
        r.apply_worker(2, status(TaskState::Working))
            .expect("attempt 2");
        r.apply_worker(2, artifact("a", "partial", false))
            .expect("artifact");
        assert_eq!(
            r.apply_worker(1, status(TaskState::Completed))
                .expect_err("stale")
                .status,
            409
        );
        r.apply_worker(3, status(TaskState::Working))
            .expect("attempt 3");
        assert!(r.task.artifacts.is_none(), "a new attempt starts over");
        assert_eq!(
            r.apply_worker(0, status(TaskState::Working))
                .expect_err("zero")
                .status,
            400
        );
        assert_eq!(
            r.apply_worker(3, status(TaskState::Submitted))
                .expect_err("submitted")
                .status,
            400
        );
    }

    #[test]
    fn a_reply_message_completes_and_follow_up_resumes() {
        let mut r = rec();
        r.apply_worker(2, status(TaskState::InputRequired))
            .expect("input");
        assert!(settles(r.state()));
        let m = Message::new(Role::User, vec![Part::text("more")]);
        r.follow_up(m).expect("follow up");
        assert_eq!(r.state(), &TaskState::Submitted);
        assert_eq!(r.task.history.as_ref().expect("history").len(), 2);
        let reply = Message::new(Role::Agent, vec![Part::text("done")]);
        r.apply_worker(1, StreamResponse::Message(reply))
            .expect("reply");
        assert_eq!(r.state(), &TaskState::Completed);
        let m = Message::new(Role::User, vec![Part::text("again")]);
        let e = r.follow_up(m).expect_err("terminal");
        assert_eq!(e.extensions["a2aError"], "UnsupportedOperation");
    }

    #[test]
    fn a_work_item_out_of_deliveries_fails_its_task_once() {
        let mut r = rec();
        let first = r.task.history.as_ref().expect("history")[0]
            .message_id
            .clone();
        assert!(r.give_up("another", 5).expect("other").is_none());
        r.apply_worker(5, status(TaskState::Working))
            .expect("working");
        assert!(r.give_up(&first, 5).expect("give up").is_some());
        assert_eq!(r.state(), &TaskState::Failed);
        assert!(
            r.give_up(&first, 5).expect("again").is_none(),
            "a settled task is left"
        );
    }

    #[test]
    fn cancel_and_views() {
        let mut r = rec();
        r.cancel_now().expect("cancel");
        assert_eq!(r.state(), &TaskState::Canceled);
        assert_eq!(r.cancel_now().expect_err("twice").status, 409);
        assert_eq!(view(&r.task, Some(0)).history.expect("history").len(), 0);
        assert_eq!(view(&r.task, None).history.expect("history").len(), 1);
    }

    #[test]
    fn a_batch_is_one_write_of_numbered_events_or_nothing() {
        let mut r = rec();
        assert!(
            r.apply_worker_all(
                1,
                vec![artifact("a", "one", false), status(TaskState::Completed)]
            )
            .expect("batch")
        );
        assert_eq!(r.seq, 3);
        assert_eq!(r.state(), &TaskState::Completed);
        let written: Vec<u64> = r.written_events().map(|(n, _)| n).collect();
        assert_eq!(written, vec![2, 3], "both events of the write, numbered");
        assert!(matches!(
            r.written_events().next(),
            Some((2, StreamResponse::ArtifactUpdate(_)))
        ));

        let mut r = rec();
        let before = r.clone();
        let err = r
            .apply_worker_all(
                1,
                vec![status(TaskState::Completed), artifact("a", "late", false)],
            )
            .expect_err("an event after the terminal one");
        assert_eq!(err.status, 409);
        assert_eq!(r, before, "a refused batch changes nothing");
        let err = r.apply_worker_all(1, vec![]).expect_err("empty");
        assert_eq!(err.status, 400);
        assert_eq!(r, before);

        r.apply_worker(1, status(TaskState::Working)).expect("one");
        assert_eq!(
            r.written_events().map(|(n, _)| n).collect::<Vec<_>>(),
            vec![2],
            "a single event's write carries only it"
        );
    }
}
