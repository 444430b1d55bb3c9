//! The MCP tool `exec_command`, served with the official Rust MCP SDK (`rmcp`) over stdio
//! (`shell-server mcp --stdio`, token from `TETHER_TOKEN`) and streamable HTTP (token from
//! each request's `Authorization` header).
//!
//! Key decisions:
//! - One tool, one code path: a call becomes a `ShellExecRequest` for [`Shell::exec`], the
//!   same as `shell.exec` on the bus; the token is verified on every call (revocation is
//!   live), and its space alone decides where the command runs.
//! - Failures the caller can act on (no scope, nowhere to run, bad arguments, orchestrator
//!   down) are MCP tool errors (`isError: true`) carrying the status and reason; a command
//!   exiting non-zero is a normal result with its exit code. JSON-RPC errors are left for
//!   protocol faults (an unknown tool).
//! - HTTP: a request without a valid token is answered 401 before MCP sees it, as the MCP
//!   authorization spec asks; the server is stateless (no MCP sessions), so any replica
//!   serves any request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use tether_bus::auth::{AUTHORIZATION, BearerToken, parse_bearer};
use tether_bus::{Caller, Problem, Verify};
use tether_proto::{ExecResult, ShellExecRequest};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shell::Shell;

pub const TOOL: &str = "exec_command";

/// JSON-RPC error code of a request refused for want of a valid token (HTTP 401).
pub const UNAUTHORIZED_CODE: i32 = -32001;

/// Where a call's token comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// The HTTP request's `Authorization` header.
    Http,
    /// A fixed token (stdio: `TETHER_TOKEN`), or none.
    Fixed(Option<Arc<str>>),
}

/// The MCP server: one tool over the shared [`Shell`].
#[derive(Clone)]
pub struct McpShell {
    shell: Arc<Shell>,
    verifier: Arc<dyn Verify>,
    tokens: TokenSource,
}

/// Arguments of `exec_command`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    command: String,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    reset: bool,
}

fn input_schema() -> JsonObject {
    let v = serde_json::json!({
        "type": "object",
        "properties": {
            "command": {
                "type": "string",
                "description": "Shell command line (POSIX sh), run once in your own workspace container."
            },
            "workdir": {
                "type": "string",
                "description": "Absolute directory to run in. Default: where your previous command left off (cd persists between calls)."
            },
            "timeout_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Kill the command after this many seconds (default: the server's)."
            },
            "reset": {
                "type": "boolean",
                "description": "Forget the remembered directory and exported variables first."
            }
        },
        "required": ["command"],
        "additionalProperties": false
    });
    match v {
        serde_json::Value::Object(m) => m,
        // The literal above is an object.
        _ => JsonObject::new(),
    }
}

pub fn tool() -> Tool {
    Tool::new(
        TOOL,
        "Run a shell command in your own workspace (your space's container). The working \
         directory and exported variables persist between calls, like an interactive shell. \
         Returns stdout, stderr and the exit code; a non-zero exit is a normal result.",
        input_schema(),
    )
    .with_annotations(
        ToolAnnotations::new()
            .read_only(false)
            .destructive(true)
            .idempotent(false)
            .open_world(true),
    )
}

fn tool_error(p: &Problem) -> CallToolResult {
    let mut r = CallToolResult::error(vec![ContentBlock::text(format!(
        "{} {}: {}",
        p.status, p.title, p.detail
    ))]);
    r.structured_content = Some(serde_json::json!({
        "status": p.status,
        "title": p.title,
        "detail": p.detail,
    }));
    r
}

/// The text an MCP client shows: the output, then one status line.
fn result_text(r: &ExecResult) -> String {
    let mut t = r.stdout.clone();
    if !r.stderr.is_empty() {
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        t.push_str("[stderr]\n");
        t.push_str(&r.stderr);
    }
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    t.push_str(&format!("[exit code {}", r.exit_code));
    if r.timed_out {
        t.push_str(", timed out: killed");
    }
    if r.oom_killed {
        t.push_str(", killed: out of memory");
    }
    if r.truncated {
        t.push_str(&format!(
            ", output truncated ({} bytes in all)",
            r.output_bytes
        ));
    }
    t.push(']');
    t
}

impl McpShell {
    pub fn new(shell: Arc<Shell>, verifier: Arc<dyn Verify>, tokens: TokenSource) -> Self {
        Self {
            shell,
            verifier,
            tokens,
        }
    }

    async fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, Problem> {
        let token: String = match &self.tokens {
            TokenSource::Fixed(Some(t)) => t.to_string(),
            TokenSource::Fixed(None) => {
                return Err(Problem::unauthorized(
                    "no token: set TETHER_TOKEN to the agent's token",
                ));
            }
            TokenSource::Http => {
                let parts = ctx
                    .extensions
                    .get::<axum::http::request::Parts>()
                    .ok_or_else(|| Problem::unauthorized("no HTTP request to read a token from"))?;
                let value = parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Problem::unauthorized(
                            "missing Authorization header (expected `Bearer <token>`)",
                        )
                    })?;
                let mut h = async_nats::HeaderMap::new();
                h.insert(AUTHORIZATION, value);
                parse_bearer(Some(&h))?.to_string()
            }
        };
        let claims = self
            .verifier
            .verify(&token)
            .await
            .map_err(|e| tether_bus::auth::unauthorized(&e))?;
        Ok(Caller::from_claims(claims, BearerToken::new(&token)))
    }

    async fn exec(
        &self,
        args: Option<JsonObject>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ExecResult, Problem> {
        let caller = self.caller(ctx).await?;
        let args = args.unwrap_or_default();
        for k in ["container", "space", "container_id", "host", "host_id"] {
            if args.contains_key(k) {
                return Err(Problem::bad_request(format!(
                    "`{k}` cannot be chosen: exec_command runs in the space of your token"
                )));
            }
        }
        let a: ExecArgs = serde_json::from_value(serde_json::Value::Object(args))
            .map_err(|e| Problem::bad_request(format!("invalid arguments: {e}")))?;
        let req = ShellExecRequest {
            command: a.command,
            workdir: a.workdir.unwrap_or_default(),
            timeout_seconds: a.timeout_seconds.unwrap_or(0.0),
            reset: a.reset,
            ..Default::default()
        };
        let mut headers = async_nats::HeaderMap::new();
        tether_bus::telemetry::inject_current(&mut headers);
        caller.bearer().insert_into(&mut headers);
        self.shell.exec(&caller, headers, &req).await
    }
}

impl ServerHandler for McpShell {
    fn get_info(&self) -> ServerConfig {
        let mut c = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        c.server_info = Implementation::new("tether-shell-server", env!("CARGO_PKG_VERSION"));
        c.instructions = Some(
            "exec_command runs shell commands in your own workspace container; `cd` and \
             `export` persist between calls."
                .into(),
        );
        c
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(vec![tool()]))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        (name == TOOL).then(tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if request.name != TOOL {
            return Err(ErrorData::invalid_params(
                format!("unknown tool `{}`; this server has `{TOOL}`", request.name),
                None,
            ));
        }
        let r = match self.exec(request.arguments, &context).await {
            Ok(r) => {
                let mut out = CallToolResult::success(vec![ContentBlock::text(result_text(&r))]);
                out.structured_content = serde_json::to_value(&r).ok();
                out
            }
            Err(p) => tool_error(&p),
        };
        Ok(r.into())
    }
}

/// The HTTP listener: the MCP endpoint behind a token check.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub path: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }

    /// Stops taking connections and ends open MCP streams.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn require_token(
    State(verifier): State<Arc<dyn Verify>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let problem = match value {
        None => Some(Problem::unauthorized(
            "missing Authorization header (expected `Bearer <token>`)",
        )),
        Some(v) => {
            let mut h = async_nats::HeaderMap::new();
            h.insert(AUTHORIZATION, v.as_str());
            match parse_bearer(Some(&h)) {
                Err(p) => Some(p),
                Ok(t) => verifier
                    .verify(t)
                    .await
                    .err()
                    .map(|e| tether_bus::auth::unauthorized(&e)),
            }
        }
    };
    match problem {
        None => next.run(req).await,
        Some(p) => {
            // A JSON-RPC error body, which MCP clients surface as the reason; the problem
            // document rides along in `data`.
            let body = serde_json::json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {
                    "code": UNAUTHORIZED_CODE,
                    "message": format!("{} {}: {}", p.status, p.title, p.detail),
                    "data": p.to_proto(req.uri().path()),
                },
            });
            let mut r = (StatusCode::UNAUTHORIZED, body.to_string()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            r
        }
    }
}

/// Binds and serves the MCP endpoint until [`HttpServer::shutdown`].
pub async fn serve_http(
    shell: Arc<Shell>,
    verifier: Arc<dyn Verify>,
    addr: SocketAddr,
) -> anyhow::Result<HttpServer> {
    let cfg = shell.config().clone();
    let stop = CancellationToken::new();
    let mut http_cfg = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_cancellation_token(stop.child_token());
    if cfg.mcp_allowed_hosts.iter().any(|h| h == "*") {
        http_cfg = http_cfg.disable_allowed_hosts();
    } else if !cfg.mcp_allowed_hosts.is_empty() {
        http_cfg = http_cfg.with_allowed_hosts(cfg.mcp_allowed_hosts.clone());
    }
    let handler = McpShell::new(shell, verifier.clone(), TokenSource::Http);
    let service: StreamableHttpService<McpShell, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        http_cfg,
    );
    let router = axum::Router::new()
        .nest_service(&cfg.mcp_path, service)
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            require_token,
        ));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for MCP on {addr}: {e}"))?;
    let addr = listener.local_addr()?;
    let s = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(async move { s.cancelled_owned().await })
            .await
        {
            tracing::error!(error = %e, "MCP HTTP listener failed");
        }
    });
    tracing::info!(url = %format!("http://{addr}{}", cfg.mcp_path), "MCP streamable HTTP listening");
    Ok(HttpServer {
        addr,
        path: cfg.mcp_path,
        stop,
        task,
    })
}

/// Serves MCP over this process's stdin/stdout until the client closes it.
pub async fn serve_stdio(
    shell: Arc<Shell>,
    verifier: Arc<dyn Verify>,
    token: Option<String>,
) -> anyhow::Result<()> {
    use rmcp::ServiceExt;
    if token.is_none() {
        tracing::warn!("TETHER_TOKEN is not set: every exec_command call will be refused");
    }
    let handler = McpShell::new(shell, verifier, TokenSource::Fixed(token.map(Arc::from)));
    let running = handler
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("MCP stdio session failed to start: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("MCP stdio session ended with an error: {e}"))?;
    Ok(())
}
