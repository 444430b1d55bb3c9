//! A node: a name, a version, endpoints, background tasks — served the same way for all.
//!
//! Who may call is in the handler's type: [`Endpoint::new`] serves only callers with a valid
//! token and hands the handler their [`Caller`]; [`Endpoint::public`] serves anyone, with a
//! [`PublicRequest`].
//!
//! Request path, in order (each step's failure is answered with a [`Problem`] and changes
//! nothing): size limit (413) → `Authorization` on protected endpoints (401) → scope (403) →
//! decode (400) → handler, with a panic caught and answered 500. Each endpoint is a queue
//! subscription served by spawned tasks, bounded by a semaphore, so one slow request never
//! holds up the next and replicas share the load.
//!
//! Lifecycle: configure → active → draining → stopped, each published on
//! `events.nodes.<name>`. Draining stops taking new requests (the subscriptions are drained,
//! so requests already delivered are still served), waits for in-flight work up to the
//! deadline, then stops background tasks and the `$SRV` responders.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, jetstream};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_auth::Scope;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};

use crate::auth::{Caller, KvVerifier, Verify};
use crate::codec::{CONTENT_TYPE, Encoding};
use crate::config::BusConfig;
use crate::micro::{EndpointInfo, EndpointStats, Identity, StatsData, Verb};
use crate::problem::{PROBLEM_CONTENT_TYPE, SERVICE_ERROR, SERVICE_ERROR_CODE};
use crate::request::header;
pub use crate::request::{CallerKind, PublicRequest, RawRequest, Reply, Request};
use crate::{Problem, telemetry};

/// What every handler can reach: the bus, JetStream, config, and the node's stop signal.
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    pub js: jetstream::Context,
    pub config: Arc<BusConfig>,
    pub node: Arc<str>,
    pub instance_id: Arc<str>,
    /// Cancelled when the node starts draining.
    pub shutdown: CancellationToken,
}

impl Ctx {
    /// The full subject for a service path (deployment prefix applied).
    pub fn subject(&self, path: &str) -> String {
        self.config.subject(path)
    }
}

type Handler = Arc<dyn Fn(RawRequest) -> BoxFuture<'static, Result<Reply, Problem>> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Public,
    Authenticated,
    Scope(Scope),
}

/// One endpoint: a service path, the access it needs, a handler.
pub struct Endpoint {
    path: String,
    name: Option<String>,
    access: Access,
    max_concurrency: Option<usize>,
    max_payload: Option<usize>,
    metadata: BTreeMap<String, String>,
    handler: Handler,
}

impl Endpoint {
    /// A protected typed endpoint: only callers with a valid token reach the handler, which
    /// gets their [`Caller`]; [`Endpoint::scope`] also requires a scope. The body is decoded
    /// into `T` (JSON or protobuf) and the reply `R` encoded the same way.
    pub fn new<T, R, F, Fut>(path: impl Into<String>, f: F) -> Self
    where
        T: prost::Message + DeserializeOwned + Default + Send + 'static,
        R: prost::Message + Serialize + Send + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Problem>> + Send + 'static,
    {
        let mut e = Self::typed(path, f);
        e.access = Access::Authenticated;
        e
    }

    /// A public typed endpoint: no token needed, the handler gets a [`PublicRequest`].
    pub fn public<T, R, F, Fut>(path: impl Into<String>, f: F) -> Self
    where
        T: prost::Message + DeserializeOwned + Default + Send + 'static,
        R: prost::Message + Serialize + Send + 'static,
        F: Fn(PublicRequest<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Problem>> + Send + 'static,
    {
        Self::typed(path, f)
    }

    fn typed<T, C, R, F, Fut>(path: impl Into<String>, f: F) -> Self
    where
        T: prost::Message + DeserializeOwned + Default + Send + 'static,
        C: CallerKind,
        R: prost::Message + Serialize + Send + 'static,
        F: Fn(Request<T, C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Problem>> + Send + 'static,
    {
        let f = Arc::new(f);
        Self::raw(path, move |raw: RawRequest| {
            let f = f.clone();
            async move {
                let req = raw.decode::<T, C>()?;
                let enc = req.encoding;
                let out = f(req).await?;
                let body = enc.encode(&out)?;
                Ok(match enc {
                    // JSON is the default: a bare reply spares every client a header block.
                    Encoding::Json => Reply {
                        body,
                        headers: HeaderMap::new(),
                    },
                    Encoding::Protobuf => Reply::new(body, enc.content_type()),
                })
            }
        })
    }

    /// An endpoint that handles the raw payload; public until [`Endpoint::scope`] or
    /// [`Endpoint::authenticated`].
    pub fn raw<F, Fut>(path: impl Into<String>, f: F) -> Self
    where
        F: Fn(RawRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, Problem>> + Send + 'static,
    {
        Self {
            path: path.into(),
            name: None,
            access: Access::Public,
            max_concurrency: None,
            max_payload: None,
            metadata: BTreeMap::new(),
            handler: Arc::new(move |r| Box::pin(f(r))),
        }
    }

    /// Requires a valid token carrying `scope` (operator implies every scope).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.access = Access::Scope(scope);
        self
    }

    /// Requires a valid token, whatever its scopes (the handler decides). What
    /// [`Endpoint::new`] does already; to protect a raw or public endpoint.
    pub fn authenticated(mut self) -> Self {
        self.access = Access::Authenticated;
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = Some(n.max(1));
        self
    }

    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    pub fn metadata(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.metadata.insert(k.into(), v.into());
        self
    }
}

type Task = Box<dyn FnOnce(Ctx) -> BoxFuture<'static, anyhow::Result<()>> + Send>;

/// Builds and runs a node.
pub struct Node {
    name: String,
    version: String,
    description: String,
    metadata: BTreeMap<String, String>,
    endpoints: Vec<Endpoint>,
    verifier: Option<Arc<dyn Verify>>,
    stats_data: Option<StatsData>,
    tasks: Vec<(String, Task)>,
}

impl Node {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            metadata: BTreeMap::new(),
            endpoints: Vec::new(),
            verifier: None,
            stats_data: None,
            tasks: Vec::new(),
        }
    }

    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    /// Public metadata in `$SRV.INFO` (never put secrets here).
    pub fn metadata(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.metadata.insert(k.into(), v.into());
        self
    }

    pub fn endpoint(mut self, e: Endpoint) -> Self {
        self.endpoints.push(e);
        self
    }

    /// The token verifier. Without one, a node with protected endpoints uses [`KvVerifier`].
    pub fn verifier(mut self, v: Arc<dyn Verify>) -> Self {
        self.verifier = Some(v);
        self
    }

    /// Per-endpoint `data` in `$SRV.STATS`.
    pub fn stats_data(mut self, f: StatsData) -> Self {
        self.stats_data = Some(f);
        self
    }

    /// A background task started once the node is active; it must return soon after
    /// `ctx.shutdown` is cancelled.
    pub fn task<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks
            .push((name.into(), Box::new(move |ctx| Box::pin(f(ctx)))));
        self
    }

    /// Runs until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        cfg: BusConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let client = crate::connect::connect(&cfg, &self.name, &stop).await?;
        self.run_with_client(cfg, client, shutdown).await
    }

    /// Like [`Node::run`] on an existing connection.
    pub async fn run_with_client(
        self,
        cfg: BusConfig,
        client: Client,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let handle = self.start_with_client(cfg, client).await?;
        tokio::select! {
            _ = shutdown => {}
            _ = handle.stop.cancelled() => {}
        }
        handle.shutdown().await
    }

    /// Connects and starts serving; returns once every endpoint is subscribed.
    pub async fn start(self, cfg: BusConfig) -> anyhow::Result<NodeHandle> {
        let stop = CancellationToken::new();
        let client = crate::connect::connect(&cfg, &self.name, &stop).await?;
        self.start_with_client(cfg, client).await
    }

    /// Like [`Node::start`] on an existing connection.
    pub async fn start_with_client(
        self,
        cfg: BusConfig,
        client: Client,
    ) -> anyhow::Result<NodeHandle> {
        let cfg = Arc::new(cfg);
        let stop = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let js = jetstream::new(client.clone());
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        let mut metadata = self.metadata.clone();
        if let Ok(h) = hostname::get() {
            metadata
                .entry("host".into())
                .or_insert_with(|| h.to_string_lossy().into_owned());
        }
        let identity = Arc::new(Identity {
            name: self.name.clone(),
            id: instance_id.clone(),
            version: self.version.clone(),
            description: self.description.clone(),
            metadata,
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        });
        let ctx = Ctx {
            client: client.clone(),
            js: js.clone(),
            config: cfg.clone(),
            node: Arc::from(self.name.as_str()),
            instance_id: Arc::from(instance_id.as_str()),
            shutdown: shutdown.clone(),
        };
        let events = Lifecycle { ctx: ctx.clone() };
        events.publish("configure").await;

        let needs_auth = self.endpoints.iter().any(|e| e.access != Access::Public);
        let verifier: Option<Arc<dyn Verify>> = match (self.verifier, needs_auth) {
            (Some(v), _) => Some(v),
            (None, true) => Some(Arc::new(KvVerifier::start(&js, &cfg, stop.clone()).await?)),
            (None, false) => None,
        };

        // Endpoints.
        let tracker = TaskTracker::new();
        let request_ctx = Arc::new(ctx.clone());
        let mut infos = Vec::new();
        for ep in self.endpoints {
            let subject = cfg.subject(&ep.path);
            let name = ep
                .name
                .clone()
                .unwrap_or_else(|| crate::subject::normalize(&ep.path).replace('.', "-"));
            let info = EndpointInfo {
                name,
                subject: subject.clone(),
                queue_group: cfg.queue_group.clone(),
                metadata: ep.metadata.clone(),
            };
            let stats = Arc::new(EndpointStats::default());
            let sub = client
                .queue_subscribe(subject.clone(), cfg.queue_group.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
            let rt = Arc::new(EndpointRt {
                access: ep.access,
                max_payload: ep.max_payload.unwrap_or(cfg.max_payload_bytes),
                handler: ep.handler,
                stats: stats.clone(),
                verifier: verifier.clone(),
                ctx: request_ctx.clone(),
            });
            let limit = Arc::new(Semaphore::new(
                ep.max_concurrency.unwrap_or(cfg.max_concurrency),
            ));
            tracker.spawn(serve_endpoint(
                sub,
                rt,
                limit,
                shutdown.clone(),
                tracker.clone(),
            ));
            infos.push((info, stats));
        }

        // $SRV.* responders (they keep answering while draining).
        let mut verb_subs = Vec::new();
        for (verb, subject) in identity.verb_subjects() {
            let sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
            verb_subs.push(sub.map(move |m| (verb, m)).boxed());
        }
        let infos = Arc::new(infos);
        let verbs = tokio::spawn(serve_verbs(
            client.clone(),
            futures::stream::select_all(verb_subs),
            identity,
            infos.clone(),
            self.stats_data,
            stop.clone(),
        ));

        // Background tasks.
        let tasks = TaskTracker::new();
        for (name, t) in self.tasks {
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = t(ctx).await
                    && !shutdown.is_cancelled() {
                        tracing::error!(task = %name, error = %format!("{e:#}"), "background task failed");
                    }
            });
        }
        // A round trip through our own `$SRV.PING`: the server handles a connection's commands
        // in order, so once it routes this request every endpoint subscription made above is
        // live. (`flush` alone only writes the socket.) Callers of `start` may rely on it.
        let own = format!("$SRV.PING.{}.{}", self.name, instance_id);
        if let Err(e) =
            tokio::time::timeout(Duration::from_secs(5), client.request(own, Bytes::new())).await
        {
            tracing::warn!(error = %e, "node could not confirm its subscriptions with the server");
        }
        events.publish("active").await;
        tracing::info!(node = %self.name, instance = %instance_id, endpoints = infos.len(), "node active");
        Ok(NodeHandle {
            ctx,
            stop,
            shutdown,
            tracker,
            tasks,
            verbs,
            events,
            endpoints: infos,
        })
    }
}

struct Lifecycle {
    ctx: Ctx,
}

impl Lifecycle {
    async fn publish(&self, state: &str) {
        let data = tether_proto::NodeLifecycle {
            node: self.ctx.node.to_string(),
            instance_id: self.ctx.instance_id.to_string(),
            version: String::new(),
            state: state.to_string(),
        };
        let data = serde_json::to_value(&data).unwrap_or_default();
        let ev = crate::events::cloud_event(
            &format!("tether.node.{state}"),
            &format!("tether/{}/{}", self.ctx.node, self.ctx.instance_id),
            &self.ctx.node,
            data,
            None,
        );
        let subject = self.ctx.subject(&format!("events.nodes.{}", self.ctx.node));
        if let Err(e) = crate::events::publish(&self.ctx.client, subject, &ev).await {
            tracing::warn!(error = %e, state, "could not publish lifecycle event");
        }
    }
}

/// A running node.
pub struct NodeHandle {
    ctx: Ctx,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    tasks: TaskTracker,
    verbs: tokio::task::JoinHandle<()>,
    events: Lifecycle,
    endpoints: Arc<Vec<(EndpointInfo, Arc<EndpointStats>)>>,
}

impl NodeHandle {
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// Requests served so far by the endpoint named `name` (for tests).
    pub fn requests_served(&self, name: &str) -> u64 {
        self.endpoints
            .iter()
            .find(|(i, _)| i.name == name)
            .map_or(0, |(_, s)| s.requests())
    }

    /// Drains: no new requests, in-flight ones finish (up to the configured deadline), then
    /// background tasks stop and the node says `stopped`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let deadline = Duration::from_secs(self.ctx.config.drain_timeout_seconds);
        self.events.publish("draining").await;
        tracing::info!(node = %self.ctx.node, "draining");
        self.shutdown.cancel();
        self.tracker.close();
        self.tasks.close();
        let drained = tokio::time::timeout(deadline, async {
            self.tracker.wait().await;
            self.tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(node = %self.ctx.node, ?deadline, "drain deadline passed with work still in flight");
        }
        self.events.publish("stopped").await;
        self.stop.cancel();
        let _ = self.verbs.await;
        let _ = self.ctx.client.flush().await;
        tracing::info!(node = %self.ctx.node, "stopped");
        Ok(())
    }
}

struct EndpointRt {
    access: Access,
    max_payload: usize,
    handler: Handler,
    stats: Arc<EndpointStats>,
    verifier: Option<Arc<dyn Verify>>,
    ctx: Arc<Ctx>,
}

async fn serve_endpoint(
    mut sub: async_nats::Subscriber,
    rt: Arc<EndpointRt>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut draining = false;
    // One cancellation future for the whole loop, not one per message.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let msg = if draining {
            sub.next().await
        } else {
            tokio::select! {
                biased;
                m = sub.next() => m,
                _ = &mut cancelled => {
                    draining = true;
                    // Stop new deliveries; what was already delivered is still served.
                    if let Err(e) = sub.drain().await {
                        tracing::warn!(error = %e, "endpoint drain failed");
                        break;
                    }
                    continue;
                }
            }
        };
        let Some(msg) = msg else { break };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        // Serve it right here if it never has to wait (an echo, a cached token): no task, no
        // cross-thread wake-up. A request that does wait continues as its own task, so the
        // endpoint still serves up to `max_concurrency` requests at once.
        let Some(work) = handle(rt.clone(), msg, permit) else {
            continue;
        };
        let mut work = Box::pin(work);
        if futures::poll!(work.as_mut()).is_pending() {
            tracker.spawn(work);
        }
    }
}

/// Room left for a reply's headers (and the protocol line) under the server's max payload.
const REPLY_HEADROOM: usize = 4096;
/// Replies up to this size fit any server's max payload.
const SMALL_REPLY: usize = 60 * 1024;

/// The error reply of a problem: micro headers and the RFC 9457 body.
pub fn problem_reply(p: &Problem, instance: &str) -> Reply {
    let mut h = HeaderMap::new();
    h.insert(SERVICE_ERROR, p.title.as_str());
    h.insert(SERVICE_ERROR_CODE, p.status.to_string().as_str());
    h.insert(CONTENT_TYPE, PROBLEM_CONTENT_TYPE);
    Reply {
        body: p.to_body(instance),
        headers: h,
    }
}

/// Serves one request under `permit` (its place under the endpoint's concurrency limit).
/// `None` for a message without a reply subject (nothing to serve). The span and what the
/// reply needs are made before the future, so that the future holds the message once.
fn handle(
    rt: Arc<EndpointRt>,
    msg: Message,
    permit: OwnedSemaphorePermit,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let started = Instant::now();
    let Some(reply_to) = msg.reply.clone() else {
        tracing::debug!(subject = %msg.subject, "ignoring a message without reply subject");
        return None;
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %msg.subject,
        subject = %msg.subject,
        node = %rt.ctx.node,
        caller = field::Empty,
        space = field::Empty,
        status = field::Empty,
        duration_ms = field::Empty,
    );
    telemetry::set_parent_from(&span, msg.headers.as_ref());
    let done = Done {
        rt: rt.clone(),
        reply_to,
        instance: msg.subject.clone(),
        span: span.clone(),
        started,
        permit,
    };
    // `then`: the processing and the replying futures take turns in one allocation instead
    // of sitting side by side (as the locals of one async fn they did, past the allocator's
    // fast path).
    Some(
        process(rt, msg, span.clone())
            .instrument(span)
            .then(move |result| done.reply(result)),
    )
}

/// What answering a request needs once it has been processed.
struct Done {
    rt: Arc<EndpointRt>,
    reply_to: async_nats::Subject,
    instance: async_nats::Subject,
    span: tracing::Span,
    started: Instant,
    /// The request's place under the endpoint's concurrency limit, given back once answered.
    permit: OwnedSemaphorePermit,
}

impl Done {
    async fn reply(self, result: Result<Reply, Problem>) {
        let Done {
            rt,
            reply_to,
            instance,
            span,
            started,
            permit,
        } = self;
        let (reply, error) = match result {
            Ok(r) => (r, None),
            Err(p) => (problem_reply(&p, &instance), Some(p)),
        };
        // A reply the server would refuse never reaches the caller, who would wait out its
        // timeout: it gets a problem that says why instead. (Asked only of large replies: every
        // server carries 64 KiB.)
        let client = &rt.ctx.client;
        let (reply, error) = match reply.body.len() {
            n if n > SMALL_REPLY
                && n > client
                    .server_info()
                    .max_payload
                    .saturating_sub(REPLY_HEADROOM) =>
            {
                let p = Problem::internal(format!(
                    "the reply ({n} bytes) is larger than the bus carries in one message ({} bytes); ask for less output",
                    client.server_info().max_payload
                ));
                (problem_reply(&p, &instance), Some(p))
            }
            _ => (reply, error),
        };
        // Boxed: held inline, the publish futures (two, not overlapped) would more than
        // double the request's allocation.
        let sent: BoxFuture<'_, Result<(), async_nats::PublishError>> = if reply.headers.is_empty()
        {
            Box::pin(client.publish(reply_to, reply.body))
        } else {
            Box::pin(client.publish_with_headers(reply_to, reply.headers, reply.body))
        };
        let sent = sent.await;
        if let Err(e) = sent {
            tracing::warn!(parent: &span, subject = %instance, error = %e, "could not publish reply");
        }
        let elapsed = started.elapsed();
        let status = error.as_ref().map_or(200, |p| p.status);
        span.record("status", status);
        span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        match &error {
            Some(p) if p.status >= 500 => {
                tracing::warn!(parent: &span, subject = %instance, status, detail = %p.detail, "request failed")
            }
            Some(p) => {
                tracing::debug!(parent: &span, subject = %instance, status, detail = %p.detail, "request refused")
            }
            None => tracing::trace!(parent: &span, subject = %instance, "request served"),
        }
        rt.stats
            .record(elapsed, error.as_ref().map(|p| p.to_string()).as_deref());
        drop(permit);
    }
}

async fn process(rt: Arc<EndpointRt>, msg: Message, span: tracing::Span) -> Result<Reply, Problem> {
    if msg.payload.len() > rt.max_payload {
        return Err(Problem::too_large(format!(
            "request is {} bytes; this endpoint accepts at most {}",
            msg.payload.len(),
            rt.max_payload
        )));
    }
    let caller = match rt.access {
        Access::Public => None,
        Access::Authenticated | Access::Scope(_) => {
            let token = crate::auth::parse_bearer_value(header(
                msg.headers.as_ref(),
                crate::auth::AUTHORIZATION,
            ))?;
            let verifier = rt.verifier.as_ref().ok_or_else(|| {
                Problem::unavailable("this node has no token verifier configured")
            })?;
            let caller = match verifier.known_caller(token) {
                Some(known) => known,
                None => verifier.verify(token).await.map(|claims| {
                    Caller::from_claims(claims, crate::auth::BearerToken::new(token))
                }),
            }
            .map_err(|e| crate::auth::unauthorized(&e))?;
            span.record("caller", caller.agent_id.as_str());
            span.record("space", caller.space.as_str());
            if let Access::Scope(s) = rt.access {
                caller.require(s)?;
            }
            Some(caller)
        }
    };
    let raw = RawRequest {
        encoding: Encoding::of_content_type(header(msg.headers.as_ref(), CONTENT_TYPE)),
        payload: msg.payload,
        caller,
        subject: msg.subject,
        reply: msg.reply,
        headers: msg.headers.unwrap_or_default(),
        ctx: rt.ctx.clone(),
    };
    match AssertUnwindSafe((rt.handler)(raw)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(panic = %what, "handler panicked; request answered 500, node keeps serving");
            Err(Problem::internal(
                "the handler failed unexpectedly; the node keeps serving",
            ))
        }
    }
}

async fn serve_verbs(
    client: Client,
    mut subs: futures::stream::SelectAll<futures::stream::BoxStream<'static, (Verb, Message)>>,
    identity: Arc<Identity>,
    endpoints: Arc<Vec<(EndpointInfo, Arc<EndpointStats>)>>,
    stats_data: Option<StatsData>,
    stop: CancellationToken,
) {
    loop {
        let (verb, msg) = tokio::select! {
            _ = stop.cancelled() => break,
            n = subs.next() => match n { Some(x) => x, None => break },
        };
        let Some(reply) = msg.reply else { continue };
        let body = match verb {
            Verb::Ping => serde_json::to_vec(&identity.ping()),
            Verb::Info => {
                let infos: Vec<EndpointInfo> = endpoints.iter().map(|(i, _)| i.clone()).collect();
                serde_json::to_vec(&identity.info(&infos))
            }
            Verb::Stats => serde_json::to_vec(&identity.stats(&endpoints, stats_data.as_ref())),
        };
        match body {
            Ok(b) => {
                if let Err(e) = client.publish(reply, b.into()).await {
                    tracing::warn!(error = %e, "could not answer $SRV request");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode $SRV reply"),
        }
    }
}
