//! The A2A gateway: A2A 1.0 (Agent2Agent) on NATS subjects, every task durable in JetStream,
//! and an HTTP bridge so standard A2A clients reach the fleet's workers.
//!
//! Callers send A2A requests to `a2a.<agent>.<op>` (`send`, `stream`, `get`, `list`, `cancel`,
//! `subscribe`, `card`); the agent's workers — any number, written with `tether-a2a-worker`
//! or as a Python `a2a-sdk` AgentExecutor through `python/tether-a2a` — pull the work from
//! a durable JetStream consumer and report every event back through `a2a.<agent>.work.event`.
//! The gateway itself keeps no state: any number of replicas serve the same tasks.
//!
//! # Layout
//! - [`config`]: settings (`a2a_*`).
//! - [`error`]: A2A errors as tether problems (`a2aError`, `a2aCode`).
//! - [`record`]: a task as stored, and the pure rules that change it.
//! - [`store`]: the task KV bucket and the task-event stream; following a task.
//! - [`work`]: work items, the agents' consumers, the cancel signal.
//! - [`cards`]: agent cards, stored and served.
//! - [`deliveries`]: a work item out of deliveries fails its task.
//! - [`lenient`]: what ProtoJSON peers may leave out, filled in before reading.
//! - [`protobuf`]: A2A's protobuf form, read into and written from the JSON one.
//! - [`unknown`]: an operation nobody serves is answered MethodNotFound.
//! - [`ops`]: the bus endpoints; [`chunks`]: streamed answers.
//! - [`http`]: the HTTP JSON-RPC bridge, which forwards every call to [`ops`] over the bus.
//!
//! The one design decision to know: the task's KV record is the truth; the event stream
//! announces each change, numbered, so a caller who lost its gateway re-subscribes anywhere
//! and misses nothing ([`store`]).

pub mod cards;
pub mod chunks;
pub mod config;
pub mod deliveries;
pub mod error;
pub mod http;
pub mod lenient;
pub mod ops;
pub mod protobuf;
pub mod record;
pub mod store;
pub mod unknown;
pub mod work;

use std::future::Future;
use std::sync::Arc;

use tether_bus::{
    BusConfig, Endpoint, KvVerifier, Node, NodeHandle, Problem, RawRequest, Reply, Scope, Verify,
};
use tokio_util::sync::CancellationToken;

pub use config::A2aConfig;

pub const NAME: &str = "a2a-gateway";

/// One replica's handles on the shared task state.
pub struct Gateway {
    pub cfg: A2aConfig,
    pub tasks: Arc<store::Tasks>,
    pub work: work::Work,
    pub cards: cards::Cards,
    /// Base URL of the HTTP bridge named in served cards.
    pub bridge_url: Option<String>,
    /// The deployment's subject prefix with its dot (`""` without one).
    pub subject_prefix: String,
}

impl Gateway {
    pub async fn open(
        bus: &BusConfig,
        cfg: A2aConfig,
        client: async_nats::Client,
        bridge_url: Option<String>,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let js = async_nats::jetstream::new(client.clone());
        let tasks = Arc::new(store::Tasks::open(&js, &cfg).await?);
        let work = work::Work::open(&js, client, &cfg, bus).await?;
        let cards = cards::Cards::open(&js, &cfg).await?;
        let subject_prefix = bus
            .subject("a2a")
            .strip_suffix("a2a")
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            cfg,
            tasks,
            work,
            cards,
            bridge_url,
            subject_prefix,
        })
    }
}

type Op =
    fn(Arc<Gateway>, RawRequest) -> futures::future::BoxFuture<'static, Result<Reply, Problem>>;

fn endpoint(gw: &Arc<Gateway>, path: &str, name: &str, op: Op) -> Endpoint {
    let (concurrency, max) = (gw.cfg.a2a_max_concurrency, gw.cfg.a2a_max_message_bytes);
    let gw = gw.clone();
    Endpoint::raw(path, move |r| op(gw.clone(), r))
        .name(name)
        .max_concurrency(concurrency)
        // The gateway checks sizes itself, to answer A2A's error; the bus's own limit is
        // only a backstop.
        .max_payload(max.saturating_mul(2))
}

/// The node (not started) around an opened gateway.
pub fn node(gw: Arc<Gateway>, verifier: Arc<dyn Verify>) -> Node {
    use futures::FutureExt;
    let g = gw.clone();
    let mut n = Node::new(NAME, env!("CARGO_PKG_VERSION"))
        .description("A2A 1.0 on the bus: tasks durable in JetStream, served by worker fleets")
        .verifier(verifier)
        .task("a2a-max-deliveries", move |ctx| {
            deliveries::follow(g, ctx.client.clone(), ctx.shutdown.clone())
        });
    let prefix = gw.subject_prefix.clone();
    n = n.task("a2a-unknown-ops", move |ctx| {
        unknown::answer(ctx.client.clone(), prefix, ctx.shutdown.clone())
    });
    if let Some(u) = &gw.bridge_url {
        n = n.metadata("a2a_url", u.clone());
    }
    let caller_ops: [(&str, Op); 6] = [
        ("send", |g, r| g.send(r).boxed()),
        ("stream", |g, r| g.stream(r).boxed()),
        ("get", |g, r| g.get(r).boxed()),
        ("list", |g, r| g.list(r).boxed()),
        ("cancel", |g, r| g.cancel(r).boxed()),
        ("subscribe", |g, r| g.subscribe(r).boxed()),
    ];
    for (op, f) in caller_ops {
        n = n.endpoint(
            endpoint(&gw, &format!("a2a.*.{op}"), &format!("a2a-{op}"), f).scope(Scope::A2aCall),
        );
    }
    n = n.endpoint(endpoint(&gw, "a2a.*.card", "a2a-card", |g, r| {
        g.card(r).boxed()
    }));
    n = n.endpoint(
        endpoint(&gw, "a2a.agents", "a2a-agents", |g, r| g.agents(r).boxed()).scope(Scope::A2aCall),
    );
    let worker_ops: [(&str, Op); 2] = [
        ("event", |g, r| g.work_event(r).boxed()),
        ("card", |g, r| g.work_card(r).boxed()),
    ];
    for (op, f) in worker_ops {
        n = n.endpoint(
            endpoint(
                &gw,
                &format!("a2a.*.work.{op}"),
                &format!("a2a-work-{op}"),
                f,
            )
            .scope(Scope::A2aServe),
        );
    }
    n
}

/// What a started gateway holds on to.
pub struct Running {
    pub node: NodeHandle,
    pub http: Option<http::HttpServer>,
    stop: CancellationToken,
}

impl Running {
    /// The HTTP bridge's URL of an agent, when the bridge runs.
    pub fn agent_url(&self, agent: &str) -> Option<String> {
        self.http.as_ref().map(|h| h.agent_url(agent))
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        let r = self.node.shutdown().await;
        if let Some(h) = self.http {
            h.shutdown().await;
        }
        self.stop.cancel();
        r
    }
}

async fn open(
    bus: &BusConfig,
    cfg: A2aConfig,
    client: async_nats::Client,
    stop: CancellationToken,
) -> anyhow::Result<(Node, Option<http::HttpServer>)> {
    cfg.validate()?;
    let js = async_nats::jetstream::new(client.clone());
    let verifier: Arc<dyn Verify> = Arc::new(KvVerifier::start(&js, bus, stop).await?);
    let http = http::start(&cfg, bus, client.clone()).await?;
    let bridge = match (&http, cfg.a2a_public_url.trim()) {
        (_, u) if !u.is_empty() => Some(u.trim_end_matches('/').to_string()),
        (Some(h), _) => Some(format!("http://{}", h.addr)),
        (None, _) => None,
    };
    let gw = Arc::new(Gateway::open(bus, cfg, client, bridge).await?);
    Ok((node(gw, verifier), http))
}

/// Opens everything on an existing connection and starts serving (tests and embedding).
pub async fn start_with_client(
    bus: BusConfig,
    cfg: A2aConfig,
    client: async_nats::Client,
) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let (n, http) = match open(&bus, cfg, client.clone(), stop.clone()).await {
        Ok(x) => x,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    match n.start_with_client(bus, client).await {
        Ok(node) => Ok(Running { node, http, stop }),
        Err(e) => {
            if let Some(h) = http {
                h.shutdown().await;
            }
            stop.cancel();
            Err(e)
        }
    }
}

/// Connects and starts serving (tests and embedding).
pub async fn start(bus: BusConfig, cfg: A2aConfig) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let client = tether_bus::connect::connect(&bus, NAME, &stop).await?;
    start_with_client(bus, cfg, client).await
}

/// Serves until `shutdown`, then drains (the one node startup path, `tether_bus::startup`).
pub async fn run(
    bus: BusConfig,
    cfg: A2aConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tether_bus::startup::serve(NAME, bus, shutdown, |b| async move {
        let (n, http) = open(&b.bus, cfg, b.client, b.stopped).await?;
        Ok(match http {
            None => n,
            // The bridge closes as the node starts draining; bus requests in flight finish.
            Some(h) => n.task("a2a-http", move |ctx| async move {
                ctx.shutdown.cancelled().await;
                h.shutdown().await;
                Ok(())
            }),
        })
    })
    .await
}
