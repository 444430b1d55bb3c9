//! The endpoints: `model.chat`, `model.embed`, `model.rank`, `model.models`, `model.cancel`.
//!
//! Each call goes, in order: caller (the runtime verified the token and the `model:call`
//! scope) → per-agent rate limit (429) → request checks (400) → deadline → route and privacy
//! (404 / 422) → [`Gateway::execute`] → accounting. Accounting happens for every call that got
//! past the runtime, success or not, under the verified agent id.
//!
//! Streaming: deltas are published on the request's `stream_subject` as [`ChatChunk`]s with a
//! gap-free `seq`, each with a reply subject that belongs to this call. When nobody listens on
//! the stream subject any more, the server answers that reply subject with a "no responders"
//! status; the call is then cancelled, which drops the upstream connection, so a caller that
//! went away stops the generation it asked for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use async_nats::HeaderMap;
use futures::StreamExt;
use tether_bus::codec::CONTENT_TYPE;
use tether_bus::subject::is_valid_publish_subject;
use tether_bus::{Caller, Encoding, Problem, Request};
use tether_proto::{
    ChatChoice, ChatChunk, ChatCompletion, ChatDelta, ChatRequest, EmbedReply, EmbedRequest,
    ModelCancelReply, ModelCancelRequest, ModelUsage, ModelsReply, ModelsRequest, ProviderHealth,
    RankReply, RankRequest, RoutableModel,
};

use crate::accounting::{Record, UNROUTABLE};
use crate::config::Op;
use crate::gateway::{Attempt, Gateway, Served};
use crate::openai::{self, StreamAccum};
use crate::provider::Failure;

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
const MAX_MESSAGES: usize = 10_000;
const MAX_INPUTS: usize = 2_048;
const MAX_DOCUMENTS: usize = 10_000;

fn check_model(model: &str) -> Result<(), Problem> {
    if model.is_empty() {
        return Err(Problem::bad_request("model is required"));
    }
    if model.len() > 256 || model.contains(char::is_control) {
        return Err(Problem::bad_request(
            "model must be at most 256 printable characters",
        ));
    }
    Ok(())
}

fn check_request_id(id: &str) -> Result<(), Problem> {
    if id.len() > 128 || id.contains(|c: char| c.is_control() || c.is_whitespace()) {
        return Err(Problem::bad_request(
            "request_id must be at most 128 characters without spaces",
        ));
    }
    Ok(())
}

fn check_chat(r: &ChatRequest, prefixes: &[String]) -> Result<(), Problem> {
    check_model(&r.model)?;
    check_request_id(&r.request_id)?;
    if r.messages.is_empty() {
        return Err(Problem::bad_request("messages must not be empty"));
    }
    if r.messages.len() > MAX_MESSAGES {
        return Err(Problem::bad_request(format!(
            "at most {MAX_MESSAGES} messages"
        )));
    }
    for (i, m) in r.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(Problem::bad_request(format!(
                "messages[{i}].role must be one of {}",
                ROLES.join(", ")
            )));
        }
    }
    if let Some(t) = r.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(Problem::bad_request("temperature must be between 0 and 2"));
    }
    if let Some(p) = r.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(Problem::bad_request("top_p must be in (0, 1]"));
    }
    if r.max_tokens == Some(0) {
        return Err(Problem::bad_request("max_tokens must be > 0"));
    }
    if r.stop.len() > 16 {
        return Err(Problem::bad_request("at most 16 stop sequences"));
    }
    if r.stream {
        let s = &r.stream_subject;
        if s.is_empty() {
            return Err(Problem::bad_request(
                "stream: true needs a stream_subject to publish the chunks to",
            ));
        }
        if !is_valid_publish_subject(s) || !prefixes.iter().any(|p| s.starts_with(p.as_str())) {
            return Err(Problem::bad_request(format!(
                "stream_subject must be a subject without wildcards starting with one of: {}",
                prefixes.join(", ")
            )));
        }
    } else if !r.stream_subject.is_empty() {
        return Err(Problem::bad_request(
            "stream_subject is only used with stream: true",
        ));
    }
    Ok(())
}

impl Gateway {
    fn account(
        &self,
        op: Op,
        agent: &str,
        model: &str,
        result: Result<&Served, &Problem>,
        usage: &ModelUsage,
        started: Instant,
    ) {
        let latency = started.elapsed();
        let model_key = if self.is_routable(model) {
            model
        } else {
            UNROUTABLE
        };
        self.accounting.record(&Record {
            op,
            agent,
            model: model_key,
            ok: result.is_ok(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency,
        });
        let latency_ms = latency.as_secs_f64() * 1000.0;
        match result {
            Ok(s) => tracing::info!(
                target: "tether_model_gateway::usage",
                op = op.as_str(), agent, model = model_key, provider = %s.provider,
                upstream_model = %s.upstream_model, local = s.local, attempts = s.attempts,
                prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
                latency_ms, status = 200, "model call"
            ),
            Err(p) => tracing::info!(
                target: "tether_model_gateway::usage",
                op = op.as_str(), agent, model = model_key, status = p.status,
                detail = %p.detail, latency_ms, "model call failed"
            ),
        }
    }
}

fn now_unix() -> u32 {
    u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX)
}

/// `model.chat`.
pub async fn chat(gw: Arc<Gateway>, req: Request<ChatRequest>) -> Result<ChatCompletion, Problem> {
    let started = Instant::now();
    let caller = req.caller.clone();
    let r = chat_call(&gw, &req, &caller, started).await;
    let usage = r.as_ref().ok().and_then(|c| c.usage).unwrap_or_default();
    let served = r.as_ref().map(|c| Served {
        provider: c.provider.clone(),
        upstream_model: c.upstream_model.clone(),
        local: c.local,
        attempts: c.attempts,
    });
    gw.account(
        Op::Chat,
        &caller.agent_id,
        &req.body.model,
        served.as_ref().map_err(|p| *p),
        &usage,
        started,
    );
    r
}

async fn chat_call(
    gw: &Gateway,
    req: &Request<ChatRequest>,
    caller: &Caller,
    started: Instant,
) -> Result<ChatCompletion, Problem> {
    gw.admit(&caller.agent_id)?;
    let body = &req.body;
    check_chat(body, &gw.cfg.stream_subject_prefixes)?;
    if body.stream && body.stream_subject.starts_with("_INBOX") {
        // An inbox is someone's: chunks go only into the caller's own (or a node's).
        tether_bus::subject::check_stream_subject(&body.stream_subject, caller)?;
    }
    let deadline = gw.deadline(body.timeout_ms, &req.headers, started)?;
    let plan = gw.plan(Op::Chat, &body.model, gw.private(body.privacy, caller))?;
    let running = gw.register(&caller.agent_id, &body.request_id)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if body.stream {
        return chat_stream(gw, req, &plan, deadline, &running.token, id).await;
    }
    let (c, served) = gw
        .execute(
            Op::Chat,
            &body.model,
            &plan,
            deadline,
            &running.token,
            |a: Attempt| {
                let up = openai::chat_body(body, &a.upstream_model, false);
                async move {
                    let v = a
                        .provider
                        .post_json("/chat/completions", &up, a.until)
                        .await?;
                    openai::parse_completion(&v)
                }
            },
        )
        .await?;
    Ok(ChatCompletion {
        id: if c.id.is_empty() { id } else { c.id },
        object: "chat.completion".into(),
        created: if c.created == 0 {
            now_unix()
        } else {
            c.created
        },
        model: body.model.clone(),
        choices: c.choices,
        usage: Some(c.usage),
        provider: served.provider,
        upstream_model: served.upstream_model,
        local: served.local,
        attempts: served.attempts,
    })
}

/// Publishes chunks in order on the stream subject.
struct Chunks {
    client: async_nats::Client,
    subject: String,
    probe: String,
    encoding: Encoding,
    id: String,
    model: String,
    seq: AtomicU32,
    started: AtomicBool,
}

impl Chunks {
    async fn publish(&self, mut chunk: ChatChunk) -> Result<(), Failure> {
        chunk.seq = self.seq.fetch_add(1, Ordering::SeqCst);
        chunk.id = self.id.clone();
        chunk.object = "chat.completion.chunk".into();
        chunk.model = self.model.clone();
        let payload = self
            .encoding
            .encode(&chunk)
            .map_err(|p| Failure::Broken(p.detail))?;
        self.started.store(true, Ordering::SeqCst);
        let sent = match self.encoding {
            Encoding::Json => {
                self.client
                    .publish_with_reply(self.subject.clone(), self.probe.clone(), payload)
                    .await
            }
            Encoding::Protobuf => {
                let mut h = HeaderMap::new();
                h.insert(CONTENT_TYPE, self.encoding.content_type());
                self.client
                    .publish_with_reply_and_headers(
                        self.subject.clone(),
                        self.probe.clone(),
                        h,
                        payload,
                    )
                    .await
            }
        };
        sent.map_err(|e| Failure::Broken(format!("cannot publish a chunk: {e}")))
    }

    /// A failure once chunks went out cannot fall back: the caller has seen part of an answer.
    fn after_start(&self, f: Failure) -> Failure {
        match f {
            Failure::Cancelled(_) | Failure::Broken(_) => f,
            f if self.started.load(Ordering::SeqCst) => Failure::Broken(f.to_string()),
            f => f,
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn chat_stream(
    gw: &Gateway,
    req: &Request<ChatRequest>,
    plan: &crate::gateway::Plan,
    deadline: Instant,
    cancel: &tokio_util::sync::CancellationToken,
    id: String,
) -> Result<ChatCompletion, Problem> {
    let body = &req.body;
    let client = req.ctx.client.clone();
    let probe = client.new_inbox();
    let mut probe_sub = client
        .subscribe(probe.clone())
        .await
        .map_err(|e| Problem::unavailable(format!("cannot watch the stream subject: {e}")))?;
    let watch = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while let Some(m) = probe_sub.next().await {
                if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    tracing::debug!("nobody listens on the stream subject any more: cancelling");
                    cancel.cancel();
                    break;
                }
            }
        })
    };
    let _watch = AbortOnDrop(watch);
    let chunks = Chunks {
        client,
        subject: body.stream_subject.clone(),
        probe,
        encoding: req.encoding,
        id: id.clone(),
        model: body.model.clone(),
        seq: AtomicU32::new(0),
        started: AtomicBool::new(false),
    };
    let chunks = &chunks;
    let (acc, served) = gw
        .execute(
            Op::Chat,
            &body.model,
            plan,
            deadline,
            cancel,
            |a: Attempt| {
                let up = openai::chat_body(body, &a.upstream_model, true);
                async move {
                    let mut events = a
                        .provider
                        .open_stream("/chat/completions", &up, a.until)
                        .await?;
                    let mut acc = StreamAccum::default();
                    loop {
                        let idle = (Instant::now() + a.provider.timeout).min(a.deadline);
                        let data = match events.next(idle).await {
                            Ok(Some(d)) => d,
                            Ok(None) => break,
                            Err(f) => return Err(chunks.after_start(f)),
                        };
                        match acc.absorb(&data) {
                            Ok(Some(delta)) => {
                                chunks
                                    .publish(ChatChunk {
                                        provider: a.provider.name.clone(),
                                        delta: Some(delta),
                                        ..Default::default()
                                    })
                                    .await?;
                            }
                            Ok(None) => {}
                            Err(f) => return Err(chunks.after_start(f)),
                        }
                    }
                    if acc.finish_reason.is_empty()
                        && acc.content.is_empty()
                        && acc.tool_calls.is_empty()
                    {
                        return Err(chunks.after_start(Failure::Protocol(
                            "the stream ended without an answer".into(),
                        )));
                    }
                    Ok(acc)
                }
            },
        )
        .await?;
    let usage = acc.usage.unwrap_or_default();
    let finish_reason = if acc.finish_reason.is_empty() {
        "stop".to_string()
    } else {
        acc.finish_reason.clone()
    };
    chunks
        .publish(ChatChunk {
            provider: served.provider.clone(),
            delta: Some(ChatDelta::default()),
            finish_reason: finish_reason.clone(),
            done: true,
            usage: Some(usage),
            ..Default::default()
        })
        .await
        .map_err(|f| Problem::new(502, f.to_string()))?;
    Ok(ChatCompletion {
        id: if acc.id.is_empty() {
            id
        } else {
            acc.id.clone()
        },
        object: "chat.completion".into(),
        created: if acc.created == 0 {
            now_unix()
        } else {
            acc.created
        },
        model: body.model.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: Some(acc.message()),
            finish_reason,
        }],
        usage: Some(usage),
        provider: served.provider,
        upstream_model: served.upstream_model,
        local: served.local,
        attempts: served.attempts,
    })
}

/// `model.embed`.
pub async fn embed(gw: Arc<Gateway>, req: Request<EmbedRequest>) -> Result<EmbedReply, Problem> {
    let started = Instant::now();
    let caller = req.caller.clone();
    let r = embed_call(&gw, &req, &caller, started).await;
    let usage = r.as_ref().ok().and_then(|c| c.usage).unwrap_or_default();
    let served = r.as_ref().map(|c| Served {
        provider: c.provider.clone(),
        upstream_model: c.upstream_model.clone(),
        local: c.local,
        attempts: c.attempts,
    });
    gw.account(
        Op::Embed,
        &caller.agent_id,
        &req.body.model,
        served.as_ref().map_err(|p| *p),
        &usage,
        started,
    );
    r
}

async fn embed_call(
    gw: &Gateway,
    req: &Request<EmbedRequest>,
    caller: &Caller,
    started: Instant,
) -> Result<EmbedReply, Problem> {
    gw.admit(&caller.agent_id)?;
    let body = &req.body;
    check_model(&body.model)?;
    check_request_id(&body.request_id)?;
    if body.input.is_empty() {
        return Err(Problem::bad_request("input must not be empty"));
    }
    if body.input.len() > MAX_INPUTS {
        return Err(Problem::bad_request(format!(
            "at most {MAX_INPUTS} inputs per call"
        )));
    }
    let deadline = gw.deadline(body.timeout_ms, &req.headers, started)?;
    let plan = gw.plan(Op::Embed, &body.model, gw.private(body.privacy, caller))?;
    let running = gw.register(&caller.agent_id, &body.request_id)?;
    let n = body.input.len();
    let ((data, usage), served) = gw
        .execute(
            Op::Embed,
            &body.model,
            &plan,
            deadline,
            &running.token,
            |a: Attempt| {
                let up = openai::embed_body(&body.input, &a.upstream_model);
                async move {
                    let v = a.provider.post_json("/embeddings", &up, a.until).await?;
                    openai::parse_embeddings(&v, n)
                }
            },
        )
        .await?;
    Ok(EmbedReply {
        object: "list".into(),
        data,
        model: body.model.clone(),
        usage: Some(usage),
        provider: served.provider,
        upstream_model: served.upstream_model,
        local: served.local,
        attempts: served.attempts,
    })
}

/// `model.rank`.
pub async fn rank(gw: Arc<Gateway>, req: Request<RankRequest>) -> Result<RankReply, Problem> {
    let started = Instant::now();
    let caller = req.caller.clone();
    let r = rank_call(&gw, &req, &caller, started).await;
    let served = r.as_ref().map(|c| Served {
        provider: c.provider.clone(),
        upstream_model: c.upstream_model.clone(),
        local: c.local,
        attempts: c.attempts,
    });
    gw.account(
        Op::Rank,
        &caller.agent_id,
        &req.body.model,
        served.as_ref().map_err(|p| *p),
        &ModelUsage::default(),
        started,
    );
    r
}

async fn rank_call(
    gw: &Gateway,
    req: &Request<RankRequest>,
    caller: &Caller,
    started: Instant,
) -> Result<RankReply, Problem> {
    gw.admit(&caller.agent_id)?;
    let body = &req.body;
    check_model(&body.model)?;
    check_request_id(&body.request_id)?;
    if body.query.is_empty() {
        return Err(Problem::bad_request("query must not be empty"));
    }
    if body.documents.is_empty() {
        return Err(Problem::bad_request("documents must not be empty"));
    }
    if body.documents.len() > MAX_DOCUMENTS {
        return Err(Problem::bad_request(format!(
            "at most {MAX_DOCUMENTS} documents per call"
        )));
    }
    let deadline = gw.deadline(body.timeout_ms, &req.headers, started)?;
    let plan = gw.plan(Op::Rank, &body.model, gw.private(body.privacy, caller))?;
    let running = gw.register(&caller.agent_id, &body.request_id)?;
    let n = body.documents.len();
    let top_n = body.top_n;
    let (results, served) = gw
        .execute(
            Op::Rank,
            &body.model,
            &plan,
            deadline,
            &running.token,
            |a: Attempt| {
                let up = openai::rank_body(&body.query, &body.documents, top_n, &a.upstream_model);
                async move {
                    let v = a.provider.post_json("/rerank", &up, a.until).await?;
                    openai::parse_rank(&v, n, top_n)
                }
            },
        )
        .await?;
    Ok(RankReply {
        model: body.model.clone(),
        results,
        provider: served.provider,
        upstream_model: served.upstream_model,
        local: served.local,
        attempts: served.attempts,
    })
}

/// `model.models`: what is routable now and how each provider is doing.
pub fn models(gw: &Gateway, _req: &Request<ModelsRequest>) -> ModelsReply {
    let now = Instant::now();
    ModelsReply {
        models: gw
            .route_table()
            .into_iter()
            .map(|(name, providers, local)| RoutableModel {
                name,
                providers,
                local,
            })
            .collect(),
        providers: provider_health(gw, now),
        privacy: gw.cfg.privacy,
    }
}

pub fn provider_health(gw: &Gateway, now: Instant) -> Vec<ProviderHealth> {
    gw.providers
        .iter()
        .map(|p| {
            let h = p.breaker.health(now);
            ProviderHealth {
                name: p.name.clone(),
                kind: p.kind.as_str().into(),
                local: p.local,
                healthy: h.circuit != "open",
                circuit: h.circuit.into(),
                consecutive_failures: h.consecutive_failures,
                in_flight: u32::try_from(p.in_flight()).unwrap_or(u32::MAX),
                max_concurrency: u32::try_from(p.max_concurrency).unwrap_or(u32::MAX),
            }
        })
        .collect()
}

/// `model.cancel`.
pub fn cancel(
    gw: &Gateway,
    req: &Request<ModelCancelRequest>,
) -> Result<ModelCancelReply, Problem> {
    let caller = &req.caller;
    if req.body.request_id.is_empty() {
        return Err(Problem::bad_request("request_id is required"));
    }
    check_request_id(&req.body.request_id)?;
    Ok(ModelCancelReply {
        cancelled: gw.cancel(caller, &req.body.request_id),
    })
}
