//! [`Events`]: how an executor reports a task's progress — each event (or batch of events,
//! [`Events::send_all`]) one `work.event` request to the gateway, answered before the next is
//! sent. A batch is written by the gateway as one change: all its events or none.
//!
//! Design decision: the gateway's reply is the truth about the task. The state it answers is
//! what the library later uses to decide whether the run settled the task (else it records
//! COMPLETED, FAILED or CANCELED itself); `cancelRequested` cancels the run's token; a 409/404
//! stops the run for good (every later event is refused locally, without a request).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a::{
    Artifact, Message, Part, Role, StreamResponse, TaskArtifactUpdateEvent, TaskState, TaskStatus,
    TaskStatusUpdateEvent,
};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::token::TokenSource;
use crate::wire::{self, AUTHORIZATION, EventBody, EventReply, Verdict};

/// Why an event was not recorded.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EventError {
    /// The task is terminal, this attempt is stale, or the task is not this agent's: the run
    /// is over; the executor should return (its token is cancelled too).
    #[error("the run was stopped by the gateway: {0}")]
    Stopped(String),
    /// The gateway refused this event as invalid; the run may go on.
    #[error("the gateway refused the event: {0}")]
    Invalid(String),
    /// The gateway could not be reached (retried for a while).
    #[error("the gateway did not answer: {0}")]
    Unavailable(String),
}

/// How event requests are sent (shared by all runs of a worker).
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    pub client: async_nats::Client,
    pub agent: String,
    /// The deployment's subject prefix (see [`wire::prefixed`]).
    pub subject_prefix: Option<String>,
    pub token: TokenSource,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// How long an unanswered event is sent again before [`EventError::Unavailable`].
    pub retry_for: Duration,
}

#[derive(Default)]
struct RunState {
    /// The task's state as the gateway last answered it.
    last_state: Option<TaskState>,
    stopped: Option<String>,
}

/// The event publisher of one run (cheap to clone; events from clones are still sent one at a
/// time, in call order).
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    sender: Sender,
    space: String,
    task_id: String,
    context_id: String,
    attempt: u64,
    cancel: CancellationToken,
    state: Mutex<RunState>,
    /// Held while a request is in flight: events are recorded in the order they were sent.
    order: tokio::sync::Mutex<()>,
}

impl Events {
    pub(crate) fn new(
        sender: Sender,
        space: String,
        task_id: String,
        context_id: String,
        attempt: u64,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                sender,
                space,
                task_id,
                context_id,
                attempt,
                cancel,
                state: Mutex::default(),
                order: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }
    pub fn context_id(&self) -> &str {
        &self.inner.context_id
    }
    pub fn attempt(&self) -> u64 {
        self.inner.attempt
    }

    /// The task's state as the gateway last answered it (`None` before the first answer).
    pub fn last_state(&self) -> Option<TaskState> {
        self.lock().last_state.clone()
    }

    /// Why the gateway stopped this run, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.lock().stopped.clone()
    }

    /// The run is over: the gateway answered a terminal or interrupted state, or stopped it.
    pub fn settled(&self) -> bool {
        let s = self.lock();
        s.stopped.is_some() || s.last_state.as_ref().is_some_and(wire::settles)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An agent message of this task with one text part.
    pub fn agent_text(&self, text: impl Into<String>) -> Message {
        self.agent_message(vec![Part::text(text)])
    }

    /// An agent message of this task with these parts.
    pub fn agent_message(&self, parts: Vec<Part>) -> Message {
        let mut m = Message::new(Role::Agent, parts);
        m.task_id = Some(self.inner.task_id.clone());
        m.context_id = Some(self.inner.context_id.clone());
        m
    }

    /// A status update event of this task (to send, or to put in a batch).
    pub fn status_event(&self, state: TaskState, message: Option<Message>) -> StreamResponse {
        StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
            task_id: self.inner.task_id.clone(),
            context_id: self.inner.context_id.clone(),
            status: TaskStatus {
                state,
                message,
                timestamp: Some(chrono::Utc::now()),
            },
            metadata: None,
        })
    }

    /// An artifact update event of this task (`append` adds to the artifact of the same id).
    pub fn artifact_event(
        &self,
        artifact: Artifact,
        append: bool,
        last_chunk: bool,
    ) -> StreamResponse {
        StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
            task_id: self.inner.task_id.clone(),
            context_id: self.inner.context_id.clone(),
            artifact,
            append: Some(append),
            last_chunk: Some(last_chunk),
            metadata: None,
        })
    }

    /// A status update.
    pub async fn status(
        &self,
        state: TaskState,
        message: Option<Message>,
    ) -> Result<EventReply, EventError> {
        self.send(self.status_event(state, message)).await
    }

    /// The artifacts, then COMPLETED (with an optional closing message), in one request: the
    /// task's result and its end are one write at the gateway.
    pub async fn complete_with(
        &self,
        artifacts: Vec<Artifact>,
        message: Option<Message>,
    ) -> Result<EventReply, EventError> {
        let mut batch: Vec<StreamResponse> = artifacts
            .into_iter()
            .map(|a| self.artifact_event(a, false, true))
            .collect();
        batch.push(self.status_event(TaskState::Completed, message));
        self.send_all(batch).await
    }

    pub async fn working(&self) -> Result<EventReply, EventError> {
        self.status(TaskState::Working, None).await
    }

    /// COMPLETED, with an optional closing message.
    pub async fn complete(&self, message: Option<Message>) -> Result<EventReply, EventError> {
        self.status(TaskState::Completed, message).await
    }

    /// FAILED, with `text` as the status message.
    pub async fn fail(&self, text: impl Into<String>) -> Result<EventReply, EventError> {
        let m = self.agent_text(text);
        self.status(TaskState::Failed, Some(m)).await
    }

    /// REJECTED, with `text` as the status message.
    pub async fn reject(&self, text: impl Into<String>) -> Result<EventReply, EventError> {
        let m = self.agent_text(text);
        self.status(TaskState::Rejected, Some(m)).await
    }

    pub async fn canceled(&self) -> Result<EventReply, EventError> {
        self.status(TaskState::Canceled, None).await
    }

    /// INPUT_REQUIRED with the question; the run is over, the caller's next message on this
    /// task comes as a new work item.
    pub async fn input_required(&self, question: Message) -> Result<EventReply, EventError> {
        self.status(TaskState::InputRequired, Some(question)).await
    }

    /// An artifact (or a chunk of one: `append` adds to the artifact of the same id).
    pub async fn artifact(
        &self,
        artifact: Artifact,
        append: bool,
        last_chunk: bool,
    ) -> Result<EventReply, EventError> {
        self.send(self.artifact_event(artifact, append, last_chunk))
            .await
    }

    /// The agent's reply message: the gateway appends it to the history and completes the
    /// task with it (unless it is already terminal or interrupted).
    pub async fn message(&self, message: Message) -> Result<EventReply, EventError> {
        self.send(StreamResponse::Message(message)).await
    }

    /// Sends any event and waits for the gateway's answer.
    pub async fn send(&self, event: StreamResponse) -> Result<EventReply, EventError> {
        self.deliver(Some(event), Vec::new()).await
    }

    /// Sends events as one batch, which the gateway writes as one change (all or none), and
    /// waits for its answer: the task as of the last of them.
    pub async fn send_all(&self, events: Vec<StreamResponse>) -> Result<EventReply, EventError> {
        if events.is_empty() {
            return Err(EventError::Invalid("an empty batch of events".into()));
        }
        self.deliver(None, events).await
    }

    async fn deliver(
        &self,
        event: Option<StreamResponse>,
        events: Vec<StreamResponse>,
    ) -> Result<EventReply, EventError> {
        let _order = self.inner.order.lock().await;
        if let Some(why) = self.stopped() {
            return Err(EventError::Stopped(why));
        }
        let body = EventBody {
            space: self.inner.space.clone(),
            task_id: self.inner.task_id.clone(),
            attempt: self.inner.attempt,
            event,
            events,
        };
        let payload =
            Bytes::from(serde_json::to_vec(&body).map_err(|e| EventError::Invalid(e.to_string()))?);
        let s = &self.inner.sender;
        let until = Instant::now() + s.retry_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            let why = match self.request(payload.clone()).await {
                Verdict::Accepted(r) => {
                    self.lock().last_state = Some(r.state.clone());
                    if r.cancel_requested {
                        self.inner.cancel.cancel();
                    }
                    return Ok(r);
                }
                Verdict::Stop(p) => {
                    let why = p.to_string();
                    self.lock().stopped = Some(why.clone());
                    self.inner.cancel.cancel();
                    return Err(EventError::Stopped(why));
                }
                Verdict::Invalid(p) => return Err(EventError::Invalid(p.to_string())),
                Verdict::Unavailable(why) => why,
            };
            if Instant::now() + backoff > until {
                return Err(EventError::Unavailable(why));
            }
            tracing::warn!(task = %self.inner.task_id, error = %why, "work.event not answered; sending it again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn request(&self, payload: Bytes) -> Verdict {
        let s = &self.inner.sender;
        let token = match s.token.current() {
            Ok(t) => t,
            Err(e) => return Verdict::Unavailable(e),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Bearer {token}").as_str());
        tether_bus::telemetry::inject_current(&mut headers);
        let req = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(s.request_timeout));
        match s
            .client
            .send_request(
                wire::prefixed(s.subject_prefix.as_deref(), wire::event_subject(&s.agent)),
                req,
            )
            .await
        {
            Ok(m) => wire::verdict(m.headers.as_ref(), &m.payload),
            Err(e) => Verdict::Unavailable(format!("work.event request failed: {e}")),
        }
    }
}
