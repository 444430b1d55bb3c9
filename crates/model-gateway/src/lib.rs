//! The model gateway: agents call `model.chat`, `model.embed` and `model.rank` on the bus;
//! the gateway routes each call by model name to an OpenAI-compatible or `/rerank` back end,
//! retries and falls back, streams tokens back, keeps privacy, and accounts usage per agent.
//! Agents never hold provider keys and never reach a provider themselves.
//!
//! # Layout
//! - [`config`]: providers, routes and policies as the operator writes them, validated.
//! - [`provider`]: one back end over HTTP (its client, key, breaker, limit) and the
//!   classification of every failure.
//! - [`gateway`]: routing, privacy, deadlines, and the retry / fallback / breaker walk.
//! - [`api`]: the endpoints.
//! - [`openai`], [`sse`]: the upstream wire formats.
//! - [`breaker`], [`accounting`], [`glob`]: small parts with their own tests.
//!
//! The one design decision to know: everything a provider sends back is read into the bus's
//! proto types and rebuilt — nothing upstream is forwarded verbatim — so the answer's shape is
//! the gateway's contract whatever the back end, and no provider text reaches a caller or a log
//! without passing the key redactor.

pub mod accounting;
pub mod api;
pub mod breaker;
pub mod config;
pub mod gateway;
pub mod glob;
pub mod openai;
pub mod provider;
pub mod sse;

use std::future::Future;
use std::sync::Arc;

use tether_bus::{BusConfig, Endpoint, Node, Scope};

pub use config::{
    ConfigError, GatewayConfig, Op, ProviderConfig, ProviderKind, RouteConfig, TargetConfig,
};
pub use gateway::Gateway;

pub const NAME: &str = "model-gateway";

/// Builds the node, reading API keys from the process environment.
pub fn build(cfg: GatewayConfig) -> Result<Node, ConfigError> {
    build_with_env(cfg, &|k| std::env::var(k).ok())
}

/// Builds the node with `env` standing in for the environment (for `api_key_env`).
pub fn build_with_env(
    cfg: GatewayConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Node, ConfigError> {
    let gw = Arc::new(Gateway::new(cfg, env)?);
    Ok(node(gw))
}

/// The node around a gateway.
pub fn node(gw: Arc<Gateway>) -> Node {
    let concurrency = gw.cfg.endpoint_concurrency;
    // Names only: base URLs and keys are not for `$SRV.INFO`.
    let providers = gw
        .providers
        .iter()
        .map(|p| {
            format!(
                "{}:{}:{}",
                p.name,
                p.kind.as_str(),
                if p.local { "local" } else { "remote" }
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let stats = gw.clone();
    let mut node = Node::new(NAME, env!("CARGO_PKG_VERSION"))
        .description("vendor-neutral chat, embeddings and reranking for agents")
        .metadata("providers", providers)
        .metadata("privacy", if gw.cfg.privacy { "on" } else { "off" })
        .stats_data(Arc::new(move |endpoint: &str| match endpoint {
            "model-chat" => Some(stats.accounting.snapshot(Op::Chat)),
            "model-embed" => Some(stats.accounting.snapshot(Op::Embed)),
            "model-rank" => Some(stats.accounting.snapshot(Op::Rank)),
            "model-models" => {
                serde_json::to_value(api::provider_health(&stats, std::time::Instant::now()))
                    .ok()
                    .map(|p| serde_json::json!({ "providers": p }))
            }
            _ => None,
        }));
    let g = gw.clone();
    node = node.endpoint(
        Endpoint::new("model.chat", move |r| api::chat(g.clone(), r))
            .scope(Scope::ModelCall)
            .max_concurrency(concurrency),
    );
    let g = gw.clone();
    node = node.endpoint(
        Endpoint::new("model.embed", move |r| api::embed(g.clone(), r))
            .scope(Scope::ModelCall)
            .max_concurrency(concurrency),
    );
    let g = gw.clone();
    node = node.endpoint(
        Endpoint::new("model.rank", move |r| api::rank(g.clone(), r))
            .scope(Scope::ModelCall)
            .max_concurrency(concurrency),
    );
    let g = gw.clone();
    node = node.endpoint(
        Endpoint::new("model.models", move |r| {
            let reply = api::models(&g, &r);
            async move { Ok(reply) }
        })
        .scope(Scope::ModelCall),
    );
    let g = gw;
    node.endpoint(
        Endpoint::new("model.cancel", move |r| {
            let reply = api::cancel(&g, &r);
            async move { reply }
        })
        .scope(Scope::ModelCall),
    )
}

/// Serves until `shutdown` resolves, then drains (in-flight calls finish within the bus's
/// drain deadline).
pub async fn run(
    bus: BusConfig,
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let node = build(cfg)?;
    node.run(bus, shutdown).await
}
