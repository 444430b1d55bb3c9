//! The shell-server node: shell commands for many agents at once, each run in the caller's
//! own space — on the bus as `shell.exec`, and as the MCP tool `exec_command` over stdio and
//! streamable HTTP.
//!
//! # Layout
//! - [`config`]: settings; the opt-in fallbacks (`target_container`, `allow_local_exec`).
//! - [`target`]: where a command runs — the token's space → its bound container (KV
//!   `tether_spaces`), else `target_container`, else local, else a 404 saying why.
//! - [`wrap`]: the remembering shell as text — one `sh -c` that restores the session, runs the
//!   command once and reports the new directory and exports after a random marker.
//! - [`session`]: remembered sessions in KV (`tether_shell_sessions`), per agent and space.
//! - [`shell`]: the one exec path all front ends share.
//! - [`local`]: local subprocesses (process group, deadline kill, capped output).
//! - [`stream`]: streamed chunks to the caller, trailer cut out.
//! - [`mcp`]: the `rmcp` server (stdio, streamable HTTP behind a token check).
//!
//! The one design decision to know: the shell-server has no Docker access and no identity of
//! its own. The space comes only from the verified token (a request has no field that could
//! name another), and the orchestrator receives the caller's own token with every exec, so it
//! checks the caller again; this node can route a command, never widen what a caller may do.

pub mod config;
pub mod local;
pub mod mcp;
pub mod session;
pub mod shell;
pub mod stream;
pub mod target;
pub mod wrap;

use std::sync::Arc;

use tether_bus::{
    BusConfig, Endpoint, KvVerifier, Node, NodeHandle, Problem, Request, Scope, Verify,
};
use tether_proto::{ExecResult, ShellExecRequest};
use tokio_util::sync::CancellationToken;

pub use config::ShellConfig;
pub use shell::Shell;

pub const NAME: &str = "shell-server";

async fn exec(shell: Arc<Shell>, req: Request<ShellExecRequest>) -> Result<ExecResult, Problem> {
    shell
        .exec(&req.caller, req.outgoing_headers(), &req.body)
        .await
}

/// The node (not started) around an opened [`Shell`].
pub fn node(shell: Arc<Shell>, verifier: Arc<dyn Verify>) -> Node {
    let cfg = shell.config().clone();
    let s = shell.clone();
    Node::new(NAME, env!("CARGO_PKG_VERSION"))
        .description("shell commands in the caller's own space (shell.exec, MCP exec_command)")
        .metadata("allow_local_exec", cfg.allow_local_exec.to_string())
        .verifier(verifier)
        .endpoint(
            Endpoint::new("shell.exec", move |r| exec(s.clone(), r))
                .scope(Scope::ShellExec)
                .max_concurrency(cfg.max_concurrent_execs),
        )
}

/// A running shell-server (bus endpoints and, when configured, the MCP HTTP listener).
pub struct Running {
    pub node: NodeHandle,
    pub http: Option<mcp::HttpServer>,
    stop: CancellationToken,
}

impl Running {
    /// `http://<addr><path>` of the MCP endpoint, when it listens.
    pub fn mcp_url(&self) -> Option<String> {
        self.http.as_ref().map(mcp::HttpServer::url)
    }

    /// Stops the HTTP listener, drains the bus endpoints, stops the verifier's watches.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(h) = self.http {
            h.shutdown().await;
        }
        let r = self.node.shutdown().await;
        self.stop.cancel();
        r
    }
}

fn warn_local(cfg: &ShellConfig) {
    if cfg.allow_local_exec {
        tracing::warn!(
            "allow_local_exec is on: commands of callers without a container run as local \
             subprocesses of this server, on this host (development only)"
        );
    }
}

/// Opens the verifier (its watches run until `stop`), the shell and, when configured, the
/// MCP HTTP listener on `client`: the node (not started) and the listener.
async fn open(
    bus: &BusConfig,
    cfg: ShellConfig,
    client: async_nats::Client,
    stop: CancellationToken,
) -> anyhow::Result<(Node, Option<mcp::HttpServer>)> {
    cfg.validate()?;
    warn_local(&cfg);
    let addr = cfg.mcp_addr()?;
    let js = async_nats::jetstream::new(client.clone());
    let verifier: Arc<dyn Verify> = Arc::new(KvVerifier::start(&js, bus, stop).await?);
    let shell = Arc::new(Shell::open(bus, cfg, client).await?);
    let http = match addr {
        Some(a) => Some(mcp::serve_http(shell.clone(), verifier.clone(), a).await?),
        None => None,
    };
    let mut n = node(shell, verifier);
    if let Some(h) = &http {
        n = n.metadata("mcp_url", h.url());
    }
    Ok((n, http))
}

/// Opens everything on an existing connection and starts serving (tests and embedding).
pub async fn start_with_client(
    bus: BusConfig,
    cfg: ShellConfig,
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
    let node = match n.start_with_client(bus, client).await {
        Ok(n) => n,
        Err(e) => {
            if let Some(h) = http {
                h.shutdown().await;
            }
            stop.cancel();
            return Err(e);
        }
    };
    Ok(Running { node, http, stop })
}

/// Connects and starts serving (tests and embedding).
pub async fn start(bus: BusConfig, cfg: ShellConfig) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let client = tether_bus::connect::connect(&bus, NAME, &stop).await?;
    start_with_client(bus, cfg, client).await
}

/// Serves until `shutdown`, then drains (the one node startup path, `tether_bus::startup`).
pub async fn run(
    bus: BusConfig,
    cfg: ShellConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tether_bus::startup::serve(NAME, bus, shutdown, |b| async move {
        let (n, http) = open(&b.bus, cfg, b.client, b.stopped).await?;
        Ok(match http {
            None => n,
            // The listener closes as the node starts draining; bus requests in flight finish.
            Some(h) => n.task("mcp-http", move |ctx| async move {
                ctx.shutdown.cancelled().await;
                h.shutdown().await;
                Ok(())
            }),
        })
    })
    .await
}

/// `shell-server mcp --stdio`: MCP over stdin/stdout for one agent (`token`), reaching the
/// bus from the usual config; no bus endpoints and no HTTP listener.
pub async fn run_stdio(
    bus: BusConfig,
    cfg: ShellConfig,
    token: Option<String>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    warn_local(&cfg);
    let stop = CancellationToken::new();
    let client = tether_bus::connect::connect(&bus, NAME, &stop).await?;
    let js = async_nats::jetstream::new(client.clone());
    let verifier: Arc<dyn Verify> = Arc::new(KvVerifier::start(&js, &bus, stop.clone()).await?);
    let shell = Arc::new(Shell::open(&bus, cfg, client.clone()).await?);
    let r = mcp::serve_stdio(shell, verifier, token).await;
    stop.cancel();
    let _ = client.flush().await;
    r
}
