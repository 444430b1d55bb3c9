//! The HTTP bridge: A2A's JSON-RPC binding at `POST /a2a/<agent>` (SSE for the streaming
//! methods) and the agent card at `GET /a2a/<agent>/.well-known/agent-card.json`, for
//! unmodified A2A clients.
//!
//! Design decision: the bridge has no A2A logic of its own. Every call is forwarded to the
//! gateway's bus endpoint `a2a.<agent>.<op>` with the caller's `Authorization`,
//! `A2A-Version` and trace headers, exactly as a NATS caller would send it, so tokens,
//! versions, spaces and task rules are decided in one place. The bridge only frames JSON-RPC,
//! refuses what never reaches the bus (wrong `Host`, bad agent id, malformed or oversize
//! bodies, unknown methods, push-notification and extended-card methods), and relays stream
//! chunks as SSE.
//!
//! Layout: [`jsonrpc`] request parsing and response/error framing, [`forward`] the bus
//! request, [`sse`] streaming calls.

mod forward;
mod jsonrpc;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tether_bus::{BusConfig, Problem};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::A2aConfig;
use crate::error::A2aError;
use forward::Bus;
use jsonrpc::{Method, RpcError};

/// HTTP header a tether-aware client may send to bound a blocking `SendMessage`
/// (forwarded to the gateway as the bus header of the same name).
pub const TIMEOUT_HEADER: &str = "Tether-Timeout-Ms";
/// How much longer than the gateway may take the bridge waits for a bus reply.
const REPLY_MARGIN: Duration = Duration::from_secs(5);

/// The running bridge.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// The base URL of an agent's A2A endpoint: `http://<addr>/a2a/<agent>`.
    pub fn agent_url(&self, agent: &str) -> String {
        format!("http://{}/a2a/{agent}", self.addr)
    }

    /// Stops taking connections, ends open streams, and waits for the server task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds `a2a_listen` and serves the bridge, forwarding every call to the bus endpoints;
/// `None` when `a2a_listen` is empty.
pub async fn start(
    cfg: &A2aConfig,
    bus: &BusConfig,
    client: async_nats::Client,
) -> anyhow::Result<Option<HttpServer>> {
    let Some(addr) = cfg.listen_addr()? else {
        return Ok(None);
    };
    let stop = CancellationToken::new();
    let app = Arc::new(App::new(cfg, bus, client, stop.clone()));
    let hosts = Arc::new(Hosts::new(&cfg.a2a_allowed_hosts));
    let router = Router::new()
        .route("/a2a/{agent}", post(rpc))
        .route("/a2a/{agent}/.well-known/agent-card.json", get(card))
        .with_state(app)
        .layer(middleware::from_fn_with_state(hosts, check_host));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for A2A HTTP on {addr}: {e}"))?;
    let addr = listener.local_addr()?;
    let s = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(async move { s.cancelled_owned().await })
            .await
        {
            tracing::error!(error = %e, "A2A HTTP listener failed");
        }
    });
    tracing::info!(url = %format!("http://{addr}/a2a/<agent>"), "A2A JSON-RPC bridge listening");
    Ok(Some(HttpServer { addr, stop, task }))
}

/// What every handler shares.
struct App {
    bus: Bus,
    max_body: usize,
    /// Bus reply deadline of the quick operations.
    request_timeout: Duration,
    /// Longest a blocking send may wait in the gateway.
    max_wait: Duration,
    cancel_grace: Duration,
    stop: CancellationToken,
}

impl App {
    fn new(
        cfg: &A2aConfig,
        bus: &BusConfig,
        client: async_nats::Client,
        stop: CancellationToken,
    ) -> Self {
        Self {
            bus: Bus {
                client,
                config: bus.clone(),
            },
            max_body: cfg.a2a_max_message_bytes,
            request_timeout: Duration::from_secs(bus.request_timeout_seconds.max(1)),
            max_wait: Duration::from_millis(cfg.a2a_max_wait_ms),
            cancel_grace: Duration::from_millis(cfg.a2a_cancel_grace_ms),
            stop,
        }
    }

    /// How long to wait for the reply of `op` (the gateway's own wait plus a margin).
    fn reply_timeout(&self, op: &str, send_ms: Option<u64>) -> Duration {
        match op {
            "send" => send_ms.map_or(self.max_wait, Duration::from_millis) + REPLY_MARGIN,
            "cancel" => self.request_timeout.max(self.cancel_grace + REPLY_MARGIN),
            _ => self.request_timeout,
        }
    }
}

/// `POST /a2a/{agent}`: one JSON-RPC call.
async fn rpc(
    State(app): State<Arc<App>>,
    agent: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let agent = match agent_id(agent) {
        Ok(a) => a,
        Err(detail) => {
            let e = RpcError::local(Value::Null, A2aError::InvalidParams, detail);
            log_call("-", "-", e.code, started);
            return rpc_json(StatusCode::BAD_REQUEST, e.to_json("/a2a"));
        }
    };
    let instance = format!("/a2a/{agent}");
    let body = match read_body(body, app.max_body).await {
        Ok(b) => b,
        Err(detail) => {
            let e = RpcError::from_problem(
                Value::Null,
                A2aError::InvalidRequest.with_status(413, detail),
            );
            log_call(&agent, "-", e.code, started);
            return rpc_json(StatusCode::PAYLOAD_TOO_LARGE, e.to_json(&instance));
        }
    };
    let (method, outcome) = match call(&app, &agent, &headers, &body).await {
        Ok((method, Answer::Json(v))) => (method, (0, rpc_json(StatusCode::OK, v))),
        Ok((method, Answer::Stream(r))) => (method, (0, r)),
        Err((method, e)) => {
            let code = e.code;
            (
                method,
                (code, rpc_json(StatusCode::OK, e.to_json(&instance))),
            )
        }
    };
    log_call(&agent, &method, outcome.0, started);
    outcome.1
}

enum Answer {
    Json(Value),
    Stream(Response),
}

/// Parses, dispatches and forwards one call; the method name (for the log) with the answer.
async fn call(
    app: &App,
    agent: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Answer), (String, RpcError)> {
    let req = jsonrpc::parse(body).map_err(|e| ("-".to_string(), e))?;
    let name = req.method.clone();
    let fail = |e: RpcError| (name.clone(), e);
    if is_protobuf(headers) {
        return Err(fail(RpcError::local(
            req.id,
            A2aError::ContentTypeNotSupported,
            "the bridge speaks A2A JSON; send Content-Type: application/json",
        )));
    }
    let params = Bytes::from(serde_json::to_vec(&req.params).unwrap_or_default());
    match Method::of(&req.method) {
        Method::Unknown => Err(fail(RpcError::local(
            req.id,
            A2aError::MethodNotFound,
            format!("method {:?} is not an A2A 1.0 method", req.method),
        ))),
        Method::Refused(err) => Err(fail(RpcError::local(
            req.id,
            err,
            format!("{} is not supported by this agent", req.method),
        ))),
        Method::Unary(op) => {
            let send_ms = if op == "send" {
                let max_ms = u64::try_from(app.max_wait.as_millis()).unwrap_or(u64::MAX);
                jsonrpc::timeout_ms(header_str(headers, TIMEOUT_HEADER), max_ms).map_err(|d| {
                    fail(RpcError::local(req.id.clone(), A2aError::InvalidParams, d))
                })?
            } else {
                None
            };
            let ms = send_ms.map(|n| n.to_string());
            let extra: Vec<(&str, &str)> = ms
                .as_deref()
                .map(|v| vec![(TIMEOUT_HEADER, v)])
                .unwrap_or_default();
            let timeout = app.reply_timeout(op, send_ms);
            let reply = app
                .bus
                .call(agent, op, headers, &extra, params, timeout)
                .await
                .map_err(|p| fail(RpcError::from_problem(req.id.clone(), p)))?;
            let result = serde_json::from_slice::<Value>(&reply).map_err(|e| {
                fail(RpcError::local(
                    req.id.clone(),
                    A2aError::Internal,
                    format!("the gateway's reply is not JSON: {e}"),
                ))
            })?;
            Ok((name.clone(), Answer::Json(jsonrpc::result(&req.id, result))))
        }
        Method::Streaming(op) => {
            let events = sse::open(
                &app.bus,
                agent,
                op,
                headers,
                params,
                req.id.clone(),
                app.request_timeout,
                app.max_wait,
            )
            .await
            .map_err(fail)?;
            let events = events.take_until(app.stop.clone().cancelled_owned());
            let r = Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response();
            Ok((name.clone(), Answer::Stream(r)))
        }
    }
}

/// `GET /a2a/{agent}/.well-known/agent-card.json`: the card from `a2a.<agent>.card`, as is.
async fn card(
    State(app): State<Arc<App>>,
    agent: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let agent = match agent_id(agent) {
        Ok(a) => a,
        Err(detail) => {
            log_call("-", "card", 400, started);
            return problem(&A2aError::InvalidParams.problem(detail), "/a2a");
        }
    };
    let instance = format!("/a2a/{agent}/.well-known/agent-card.json");
    let r = app
        .bus
        .call(
            &agent,
            "card",
            &headers,
            &[],
            Bytes::new(),
            app.request_timeout,
        )
        .await;
    match r {
        Ok(body) => {
            log_call(&agent, "card", 200, started);
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(p) => {
            log_call(&agent, "card", i32::from(p.status), started);
            problem(&p, &instance)
        }
    }
}

/// One debug line per call (never a header value: the token stays out of logs); `code` is
/// the JSON-RPC error code, or the HTTP status for the card, 0 for success.
fn log_call(agent: &str, method: &str, code: i32, started: Instant) {
    tracing::debug!(
        agent,
        method,
        code,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "a2a http call"
    );
}

fn agent_id(p: Result<Path<String>, PathRejection>) -> Result<String, String> {
    match p {
        Ok(Path(a)) if tether_bus::subject::is_valid_token(&a) => Ok(a),
        Ok(Path(a)) => Err(format!(
            "agent id {a:?} must be 1-128 characters of A-Z a-z 0-9 - _"
        )),
        Err(e) => Err(format!("bad agent id in the path: {e}")),
    }
}

/// The body, at most `max` bytes (the reason otherwise).
async fn read_body(body: Body, max: usize) -> Result<Bytes, String> {
    let too_large = || format!("the request body is larger than {max} bytes");
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("cannot read the request body: {e}"))?;
        if buf.len() + chunk.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn is_protobuf(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|c| {
        let c = c.to_ascii_lowercase();
        c.starts_with("application/protobuf") || c.starts_with("application/x-protobuf")
    })
}

fn rpc_json(status: StatusCode, v: Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn problem(p: &Problem, instance: &str) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, p.to_body(instance)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(tether_bus::problem::PROBLEM_CONTENT_TYPE),
    );
    r
}

/// The `Host` values the bridge answers (DNS-rebinding protection), as the shell-server's
/// MCP listener: a name alone allows any port, `name:port` that port only.
enum Hosts {
    Any,
    Only(Vec<(String, Option<u16>)>),
}

const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl Hosts {
    fn new(allowed: &[String]) -> Self {
        if allowed.iter().any(|h| h.trim() == "*") {
            return Hosts::Any;
        }
        let names: Vec<String> = if allowed.is_empty() {
            LOOPBACK.iter().map(|s| s.to_string()).collect()
        } else {
            allowed.to_vec()
        };
        Hosts::Only(names.iter().filter_map(|n| authority(n)).collect())
    }

    fn allows(&self, host: Option<&str>) -> bool {
        match self {
            Hosts::Any => true,
            Hosts::Only(list) => host.and_then(authority).is_some_and(|(h, port)| {
                list.iter()
                    .any(|(name, p)| *name == h && p.is_none_or(|p| Some(p) == port))
            }),
        }
    }
}

/// `host[:port]` → (lower-case host without IPv6 brackets, port).
fn authority(s: &str) -> Option<(String, Option<u16>)> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (host, port) = match Authority::try_from(s) {
        Ok(a) => (a.host().to_string(), a.port_u16()),
        // A bare IPv6 address (`::1`) in the configuration.
        Err(_) => (s.to_string(), None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_ascii_lowercase(), port))
}

async fn check_host(State(hosts): State<Arc<Hosts>>, req: Request, next: Next) -> Response {
    let host = header_str(req.headers(), "host");
    if hosts.allows(host) {
        return next.run(req).await;
    }
    tracing::debug!(host = host.unwrap_or(""), "a2a http: Host refused");
    problem(
        &Problem::forbidden(format!(
            "Host {:?} is not allowed (a2a_allowed_hosts)",
            host.unwrap_or("")
        )),
        req.uri().path(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_by_default() {
        let h = Hosts::new(&[]);
        for ok in [
            "localhost",
            "localhost:8791",
            "127.0.0.1:1",
            "[::1]:80",
            "LOCALHOST",
        ] {
            assert!(h.allows(Some(ok)), "{ok}");
        }
        for no in ["evil.com", "evil.com:8791", "127.0.0.2", "", "a b"] {
            assert!(!h.allows(Some(no)), "{no}");
        }
        assert!(!h.allows(None));
    }

    #[test]
    fn listed_names_and_ports() {
        let h = Hosts::new(&["agents.example".into(), "gw:8080".into()]);
        assert!(h.allows(Some("agents.example:1234")));
        assert!(h.allows(Some("gw:8080")));
        assert!(!h.allows(Some("gw:8081")));
        assert!(!h.allows(Some("localhost")));
        assert!(Hosts::new(&["*".into()]).allows(Some("anything:1")));
        assert!(Hosts::new(&["*".into()]).allows(None));
    }
}
