//! The bus endpoints: the A2A operations callers send to `a2a.<agent>.<op>` and the two a
//! worker sends to `a2a.<agent>.work.<op>`. Each takes A2A JSON and answers A2A JSON; every
//! refusal is an [`A2aError`] problem and changes nothing.
//!
//! The one design decision to know: who asks comes only from the verified token — the task's
//! space (its A2A tenant) is the caller's, a task of another space is not found, and a worker
//! may act only for the agent its token names.

use std::sync::Arc;
use std::time::Duration;

use a2a::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, SendMessageRequest,
    StreamResponse, SubscribeToTaskRequest, TaskState,
};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tether_bus::{Caller, Encoding, Problem, RawRequest, Reply};
use tokio::time::Instant;

use crate::Gateway;
use crate::chunks::{Chunks, STREAM_SUBJECT};
use crate::error::{self, A2aError};
use crate::protobuf::{Answer, Request as PbRequest, reply, request_json};
use crate::record::{self, Asker, TaskRecord, settles};
use crate::store::Follow;
use crate::work::WorkItem;

/// The A2A protocol version header, and the one version served.
pub const VERSION_HEADER: &str = "A2A-Version";
pub const VERSION: &str = "1.0";
/// A caller's deadline for a blocking send, in milliseconds.
pub const TIMEOUT_HEADER: &str = "Tether-Timeout-Ms";

fn header<'a>(r: &'a RawRequest, name: &str) -> Option<&'a str> {
    r.headers
        .get(name)
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The agent a subject names: `[prefix.]a2a.<agent>.<op>` or `[prefix.]a2a.<agent>.work.<op>`.
fn agent_of(subject: &str, from_end: usize) -> Result<String, Problem> {
    let parts: Vec<&str> = subject.split('.').collect();
    parts
        .len()
        .checked_sub(from_end)
        .and_then(|i| parts.get(i))
        .filter(|a| tether_bus::subject::is_valid_token(a))
        .map(|a| a.to_string())
        .ok_or_else(|| {
            A2aError::InvalidParams.problem(format!("no agent id in subject {subject:?}"))
        })
}

/// What every caller operation checks first: protocol version, encoding, size.
fn check_request(r: &RawRequest, max_bytes: usize) -> Result<(), Problem> {
    match header(r, VERSION_HEADER) {
        Some(v) if v == VERSION || v.starts_with("1.0.") => {}
        Some(v) => {
            return Err(A2aError::VersionNotSupported.problem(format!(
                "A2A-Version {v:?} is not served; this gateway speaks {VERSION}"
            )));
        }
        None => {
            return Err(A2aError::VersionNotSupported.problem(format!(
                "missing A2A-Version header (a missing version means 0.3, which is not served; send `A2A-Version: {VERSION}`)"
            )));
        }
    }
    check_size(r, max_bytes)
}

/// 413 (InvalidRequest to an A2A client) for a body over `max_bytes`.
fn check_size(r: &RawRequest, max_bytes: usize) -> Result<(), Problem> {
    if r.payload.len() > max_bytes {
        return Err(A2aError::InvalidRequest.with_status(
            413,
            format!(
                "request of {} bytes is over the limit of {max_bytes}",
                r.payload.len()
            ),
        ));
    }
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    parse_with(body, |_| {})
}

/// Reads a request's JSON, first filling in with `fill` what ProtoJSON may leave out.
fn parse_with<T: DeserializeOwned>(
    body: &[u8],
    fill: impl FnOnce(&mut Value),
) -> Result<T, Problem> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| A2aError::ParseError.problem(format!("malformed JSON: {e}")))?;
    fill(&mut v);
    serde_json::from_value(v).map_err(|e| {
        A2aError::InvalidParams.problem(format!("not the operation's A2A request: {e}"))
    })
}

pub fn json<T: Serialize>(v: &T) -> Result<Reply, Problem> {
    let body = serde_json::to_vec(v)
        .map_err(|e| Problem::internal(format!("cannot encode the answer: {e}")))?;
    Ok(Reply::new(Bytes::from(body), "application/json"))
}

fn caller(r: &RawRequest) -> Result<&Caller, Problem> {
    r.caller
        .as_ref()
        .ok_or_else(|| Problem::unauthorized("a token is required"))
}

/// The space a caller's tasks live in (an operator token without a space uses `_`).
fn space_of(c: &Caller) -> String {
    if c.space.is_empty() {
        "_".into()
    } else {
        c.space.clone()
    }
}

fn task_answer(rec: &TaskRecord, history_length: Option<i32>) -> StreamResponse {
    StreamResponse::Task(record::view(&rec.task, history_length))
}

impl Gateway {
    fn mine(&self, rec: Option<TaskRecord>, agent: &str, id: &str) -> Result<TaskRecord, Problem> {
        rec.filter(|r| r.agent == agent)
            .ok_or_else(|| error::not_found(id))
    }

    /// Accepts a caller's message: a new task, or the next turn of an interrupted one; the
    /// work item is queued either way.
    async fn follower(
        &self,
        follow: bool,
        space: &str,
        id: &str,
        seq: u64,
    ) -> Result<Option<Follow>, Problem> {
        match follow {
            true => self.tasks.follow_live(space, id, seq).await.map(Some),
            false => Ok(None),
        }
    }

    /// With `follow`, the task's events are followed from before its work is queued (so none
    /// can be missed, without replaying the stream).
    async fn accept(
        &self,
        agent: &str,
        c: &Caller,
        req: SendMessageRequest,
        follow: bool,
    ) -> Result<(TaskRecord, Option<Follow>), Problem> {
        record::check_message(&req.message)?;
        if req
            .configuration
            .as_ref()
            .and_then(|c| c.task_push_notification_config.as_ref())
            .is_some()
        {
            return Err(A2aError::PushNotificationNotSupported
                .problem("push notifications are not supported"));
        }
        if !self.cards.known(agent).await? {
            return Err(A2aError::InvalidParams.with_status(
                404,
                format!("no agent {agent:?}: none of its workers has published a card"),
            ));
        }
        let space = space_of(c);
        let message = req.message.clone();
        let item = |task: &a2a::Task| {
            let mut m = message.clone();
            m.task_id = Some(task.id.clone());
            m.context_id = Some(task.context_id.clone());
            WorkItem {
                space: space.clone(),
                task: task.clone(),
                message: m,
            }
        };
        match message.task_id.clone().filter(|t| !t.is_empty()) {
            None => {
                let who = Asker {
                    agent,
                    space: &space,
                    caller: &c.agent_id,
                };
                let rec = record::new_task(&who, message.clone(), req.metadata);
                // Following starts before the work is queued, so no event can be missed.
                let f = self.follower(follow, &space, &rec.task.id, rec.seq).await?;
                let work = item(&rec.task);
                let rec = self
                    .tasks
                    .create_with(rec, self.work.submit(agent, &work))
                    .await?;
                Ok((rec, f))
            }
            Some(id) => {
                self.mine(self.tasks.get(&space, &id).await?, agent, &id)?;
                let m = message.clone();
                let rec = self
                    .tasks
                    .change(&space, &id, |r| r.follow_up(m.clone()).map(|_| true))
                    .await?;
                let f = self.follower(follow, &space, &rec.task.id, rec.seq).await?;
                self.work.submit(agent, &item(&rec.task)).await?;
                Ok((rec, f))
            }
        }
    }

    /// `a2a.<agent>.send`: blocks until the task settles, the caller's deadline, or at once.
    pub async fn send(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let req: SendMessageRequest = parse_with(
            &request_json(r.encoding, PbRequest::SendMessage, &r.payload)?,
            crate::lenient::send_request,
        )?;
        let immediate = req
            .configuration
            .as_ref()
            .and_then(|c| c.return_immediately)
            .unwrap_or(false);
        let history = req.configuration.as_ref().and_then(|c| c.history_length);
        let wait = header(&r, TIMEOUT_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(self.cfg.a2a_default_wait_ms)
            .min(self.cfg.a2a_max_wait_ms);
        let (rec, follow) = self.accept(&agent, c, req, !immediate).await?;
        let Some(mut follow) = follow else {
            return reply(r.encoding, Answer::SendMessage, &task_answer(&rec, history));
        };
        let deadline = Instant::now() + Duration::from_millis(wait);
        let space = rec.space.clone();
        loop {
            match follow.next(deadline).await? {
                None => break,
                Some((_, StreamResponse::StatusUpdate(s))) if settles(&s.status.state) => break,
                Some((_, StreamResponse::Task(t))) if settles(&t.status.state) => break,
                Some(_) => {}
            }
        }
        // The record as of the last event followed: this replica's own write when it made
        // it, else read.
        let now = match self.tasks.written_at(&space, &rec.task.id, follow.last()) {
            Some(w) => w,
            None => self.tasks.get(&space, &rec.task.id).await?.unwrap_or(rec),
        };
        reply(r.encoding, Answer::SendMessage, &task_answer(&now, history))
    }

    fn stream_to(&self, r: &RawRequest, c: &Caller) -> Result<Chunks, Problem> {
        let to = header(r, STREAM_SUBJECT).ok_or_else(|| {
            A2aError::InvalidParams.problem(format!(
                "a streamed answer needs the header {STREAM_SUBJECT} (your inbox subject)"
            ))
        })?;
        let to = tether_bus::subject::check_stream_subject(to, c)?;
        Ok(Chunks::new(r.ctx.client.clone(), to, r.encoding))
    }

    /// Streams a task's events after `rec` (whose snapshot goes first) until it settles,
    /// with `follow` (already following from `rec`) or a follower made here.
    fn spawn_stream(
        self: &Arc<Self>,
        rec: TaskRecord,
        follow: Option<Follow>,
        mut out: Chunks,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let gw = self.clone();
        tokio::spawn(async move {
            let result: Result<(), Problem> = async {
                out.event(rec.seq, &StreamResponse::Task(rec.task.clone()))
                    .await?;
                if settles(rec.state()) && rec.state().is_terminal() {
                    return Ok(());
                }
                let mut follow = match follow {
                    Some(f) => f,
                    None => gw.tasks.follow(&rec.space, &rec.task.id, rec.seq).await?,
                };
                let deadline = Instant::now() + Duration::from_millis(gw.cfg.a2a_max_stream_ms);
                loop {
                    let next = tokio::select! {
                        n = follow.next(deadline) => n?,
                        _ = shutdown.cancelled() => {
                            return Err(Problem::unavailable("the gateway is shutting down; subscribe again to follow the task"));
                        }
                    };
                    let Some((seq, e)) = next else {
                        return Err(Problem::timeout("the stream reached its time limit; subscribe again to follow the task"));
                    };
                    out.event(seq, &e).await?;
                    let done = match &e {
                        StreamResponse::StatusUpdate(s) => settles(&s.status.state),
                        StreamResponse::Task(t) => settles(&t.status.state),
                        _ => false,
                    };
                    if done {
                        return Ok(());
                    }
                }
            }
            .await;
            match result {
                Ok(()) => out.end().await,
                Err(p) => out.error(&p).await,
            }
        });
    }

    /// `a2a.<agent>.stream`: answers the new task at once, then streams its events.
    pub async fn stream(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let out = self.stream_to(&r, c)?;
        let req: SendMessageRequest = parse_with(
            &request_json(r.encoding, PbRequest::SendMessage, &r.payload)?,
            crate::lenient::send_request,
        )?;
        let (rec, follow) = self.accept(&agent, c, req, true).await?;
        let answer = reply(r.encoding, Answer::SendMessage, &task_answer(&rec, None))?;
        self.spawn_stream(rec, follow, out, r.ctx.shutdown.clone());
        Ok(answer)
    }

    /// `a2a.<agent>.subscribe`: answers the task's snapshot at once, then streams what follows.
    pub async fn subscribe(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let req: SubscribeToTaskRequest = parse(&request_json(
            r.encoding,
            PbRequest::SubscribeToTask,
            &r.payload,
        )?)?;
        let rec = self.mine(
            self.tasks.get(&space_of(c), &req.id).await?,
            &agent,
            &req.id,
        )?;
        if rec.state().is_terminal() {
            return Err(A2aError::UnsupportedOperation.problem(format!(
                "task {} is terminal ({:?}); there is nothing to follow",
                req.id,
                rec.state()
            )));
        }
        let out = self.stream_to(&r, c)?;
        let answer = reply(r.encoding, Answer::StreamResponse, &task_answer(&rec, None))?;
        self.spawn_stream(rec, None, out, r.ctx.shutdown.clone());
        Ok(answer)
    }

    /// `a2a.<agent>.get`.
    pub async fn get(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let req: GetTaskRequest =
            parse(&request_json(r.encoding, PbRequest::GetTask, &r.payload)?)?;
        let rec = self.mine(
            self.tasks.get(&space_of(c), &req.id).await?,
            &agent,
            &req.id,
        )?;
        reply(
            r.encoding,
            Answer::Task,
            &record::view(&rec.task, req.history_length),
        )
    }

    /// `a2a.<agent>.list`: the caller's space's tasks of this agent, newest first.
    pub async fn list(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let req: ListTasksRequest =
            parse(&request_json(r.encoding, PbRequest::ListTasks, &r.payload)?)?;
        let page_size = req.page_size.unwrap_or(50);
        if !(1..=100).contains(&page_size) {
            return Err(A2aError::InvalidParams.problem("pageSize must be between 1 and 100"));
        }
        let offset = match req.page_token.as_deref().filter(|t| !t.is_empty()) {
            None => 0,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| A2aError::InvalidParams.problem("unknown pageToken"))?,
        };
        let mut recs: Vec<TaskRecord> = self
            .tasks
            .list(&space_of(c))
            .await?
            .into_iter()
            .filter(|t| t.agent == agent)
            .filter(|t| {
                req.context_id
                    .as_deref()
                    .is_none_or(|x| x.is_empty() || t.task.context_id == x)
            })
            .filter(|t| {
                req.status
                    .as_ref()
                    .is_none_or(|s| *s == TaskState::Unspecified || t.state() == s)
            })
            .collect();
        recs.sort_by(|a, b| {
            b.updated_ms
                .cmp(&a.updated_ms)
                .then(a.task.id.cmp(&b.task.id))
        });
        let total = recs.len();
        let size = usize::try_from(page_size).unwrap_or(50);
        let tasks: Vec<_> = recs
            .iter()
            .skip(offset)
            .take(size)
            .map(|t| {
                let mut v = record::view(&t.task, req.history_length);
                if req.include_artifacts == Some(false) {
                    v.artifacts = None;
                }
                v
            })
            .collect();
        let next = if offset + size < total {
            (offset + size).to_string()
        } else {
            String::new()
        };
        reply(
            r.encoding,
            Answer::ListTasks,
            &ListTasksResponse {
                tasks,
                next_page_token: next,
                page_size,
                total_size: i32::try_from(total).unwrap_or(i32::MAX),
            },
        )
    }

    /// `a2a.<agent>.cancel`: a queued or waiting task is canceled here; a running one by its
    /// worker (signalled), or here once the grace has passed.
    pub async fn cancel(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        check_request(&r, self.cfg.a2a_max_message_bytes)?;
        let agent = agent_of(&r.subject, 2)?;
        let c = caller(&r)?;
        let req: CancelTaskRequest = parse(&request_json(
            r.encoding,
            PbRequest::CancelTask,
            &r.payload,
        )?)?;
        let space = space_of(c);
        let rec = self.mine(self.tasks.get(&space, &req.id).await?, &agent, &req.id)?;
        if rec.state().is_terminal() {
            return Err(A2aError::TaskNotCancelable.problem(format!(
                "task {} is already {:?}",
                req.id,
                rec.state()
            )));
        }
        if rec.is_running() {
            let asked = self
                .tasks
                .change(&space, &req.id, |t| {
                    if t.state().is_terminal() || t.cancel_requested {
                        return Ok(false);
                    }
                    t.cancel_requested = true;
                    Ok(true)
                })
                .await?;
            let mut follow = self.tasks.follow(&space, &req.id, asked.seq).await?;
            self.work.signal_cancel(&agent, &space, &req.id).await?;
            let deadline = Instant::now() + Duration::from_millis(self.cfg.a2a_cancel_grace_ms);
            let mut now = asked;
            while !now.state().is_terminal() {
                if follow.next(deadline).await?.is_none() {
                    break;
                }
                now = self.mine(self.tasks.get(&space, &req.id).await?, &agent, &req.id)?;
            }
            if now.state().is_terminal() {
                return reply(r.encoding, Answer::Task, &now.task);
            }
        }
        let done = self
            .tasks
            .change(&space, &req.id, |t| {
                if t.state().is_terminal() {
                    return Ok(false);
                }
                t.cancel_now().map(|_| true)
            })
            .await?;
        if done.state() != &TaskState::Canceled {
            return Err(A2aError::TaskNotCancelable.problem(format!(
                "task {} ended {:?} first",
                req.id,
                done.state()
            )));
        }
        reply(r.encoding, Answer::Task, &done.task)
    }

    /// `a2a.<agent>.card` (public): the agent's card as served.
    pub async fn card(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        let agent = agent_of(&r.subject, 2)?;
        if r.encoding == Encoding::Protobuf {
            return Err(
                A2aError::ContentTypeNotSupported.problem("agent cards are served as JSON only")
            );
        }
        let stored = self.cards.get(&agent).await?.ok_or_else(|| {
            A2aError::InvalidParams.with_status(
                404,
                format!("no agent {agent:?}: none of its workers has published a card"),
            )
        })?;
        let card = crate::cards::serve(
            &stored.card,
            &agent,
            self.bridge_url.as_deref(),
            &self.subject_prefix,
        )?;
        json(&card)
    }
}

/// One agent in `a2a.agents`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    pub agent_id: String,
    pub name: String,
    pub description: String,
    pub skills: Vec<String>,
    /// A worker re-published the card recently.
    pub live: bool,
    /// When the card was last published (RFC 3339).
    pub card_updated_at: String,
    /// Work items no worker has taken yet.
    pub backlog: Option<u64>,
}

impl Gateway {
    /// `a2a.agents`: every agent with a card, and whether a worker of it is alive.
    pub async fn agents(self: Arc<Self>, _r: RawRequest) -> Result<Reply, Problem> {
        let mut out = Vec::new();
        for (agent, stored) in self.cards.all().await? {
            let card = &stored.card;
            let text = |k: &str| {
                card.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let skills = card
                .get("skills")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.get("id").and_then(|i| i.as_str()).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            out.push(AgentSummary {
                live: self.cards.is_live(&stored),
                card_updated_at: chrono::DateTime::from_timestamp_millis(stored.updated_ms)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default(),
                backlog: self.work.backlog(&agent).await,
                name: text("name"),
                description: text("description"),
                skills,
                agent_id: agent,
            });
        }
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        json(&serde_json::json!({ "agents": out }))
    }
}

/// A worker's event, or a batch of them written as one change (`a2a.<agent>.work.event`):
/// exactly one of `event` and `events`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkEvent {
    pub space: String,
    pub task_id: String,
    pub attempt: u64,
    #[serde(default)]
    pub event: Option<StreamResponse>,
    #[serde(default)]
    pub events: Vec<StreamResponse>,
}

impl WorkEvent {
    /// The events to apply, in order.
    fn into_events(self) -> Result<Vec<StreamResponse>, Problem> {
        match (self.event, self.events.is_empty()) {
            (Some(e), true) => Ok(vec![e]),
            (None, false) => Ok(self.events),
            (Some(_), false) => {
                Err(A2aError::InvalidParams.problem("give either `event` or `events`, not both"))
            }
            (None, true) => Err(A2aError::InvalidParams.problem("`event` or `events` is required")),
        }
    }
}

/// The answer to a worker's event.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkEventAnswer {
    pub state: TaskState,
    pub cancel_requested: bool,
    pub seq: u64,
}

impl Gateway {
    /// Only a worker token of the agent the subject names (or an operator) may act for it.
    fn worker_of<'a>(&self, r: &'a RawRequest) -> Result<(String, &'a Caller), Problem> {
        let agent = agent_of(&r.subject, 3)?;
        let c = caller(r)?;
        if c.agent_id != agent && !c.is_operator() {
            return Err(Problem::forbidden(format!(
                "a token of agent {:?} cannot act for agent {agent:?}",
                c.agent_id
            )));
        }
        check_size(r, self.cfg.a2a_max_message_bytes)?;
        Ok((agent, c))
    }

    /// `a2a.<agent>.work.event`: a worker reports what happened to a task it holds.
    pub async fn work_event(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        let (agent, _) = self.worker_of(&r)?;
        let ev: WorkEvent = parse_with(&r.payload, |v| {
            if let Some(e) = v.get_mut("event") {
                crate::lenient::stream_response(e);
            }
            if let Some(Value::Array(es)) = v.get_mut("events") {
                es.iter_mut().for_each(crate::lenient::stream_response);
            }
        })?;
        if !tether_bus::subject::is_valid_token(&ev.space) {
            return Err(error::not_found(&ev.task_id));
        }
        let (space, task_id, attempt) = (ev.space.clone(), ev.task_id.clone(), ev.attempt);
        let events = ev.into_events()?;
        let rec = self
            .tasks
            .change(&space, &task_id, |t| {
                // Another agent's task is not found, and nothing is written.
                if t.agent != agent {
                    return Err(error::not_found(&task_id));
                }
                t.apply_worker_all(attempt, events.clone())
            })
            .await?;
        json(&WorkEventAnswer {
            state: rec.state().clone(),
            cancel_requested: rec.cancel_requested,
            seq: rec.seq,
        })
    }

    /// `a2a.<agent>.work.card`: a worker publishes its agent's card (also its heartbeat).
    pub async fn work_card(self: Arc<Self>, r: RawRequest) -> Result<Reply, Problem> {
        let (agent, _) = self.worker_of(&r)?;
        self.cards.publish(&agent, &r.payload).await?;
        self.work.ensure_consumer(&agent).await?;
        json(&serde_json::json!({}))
    }
}
