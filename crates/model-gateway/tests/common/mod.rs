//! Test support shared by the gateway's tests and benchmark: stand-in model servers that speak
//! the OpenAI chat/embeddings (JSON and SSE) and `/rerank` wire formats, a real nats-server
//! with a real permission node issuing tokens (`tether_testkit::Fleet`), and the gateway on it.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tether_bus::NodeHandle;
use tether_model_gateway::{
    GatewayConfig, ProviderConfig, ProviderKind, RouteConfig, TargetConfig,
};
pub use tether_testkit::{
    CALL_TIMEOUT, Fleet, Problem, bus, call, eventually, operator_token, request,
};

/// How a stand-in answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Ok,
    /// 500 with a JSON error.
    Fail500,
    /// Headers, then a body that never completes (a space every 50 ms, so a closed connection
    /// is noticed at the next write).
    Hang,
    /// 400 with an OpenAI-style error message.
    Reject400(String),
    /// 400 whose message quotes the Authorization header it got, as some APIs do.
    EchoKey400,
    /// 429 with `Retry-After: 0`.
    Throttle429,
    /// A redirect to somewhere else.
    Redirect(String),
    /// 200 with a body that is not JSON.
    Garbage,
}

pub struct StandInState {
    pub name: String,
    pub mode: Mutex<Mode>,
    /// Answer 500 to this many calls first, then follow `mode`.
    pub fail_first: AtomicU64,
    /// Wait this long before answering (and between stream chunks).
    pub delay_ms: AtomicU64,
    pub calls: AtomicU64,
    pub chat_calls: AtomicU64,
    pub embed_calls: AtomicU64,
    pub rank_calls: AtomicU64,
    pub in_flight: AtomicU64,
    /// The most calls in flight at once.
    pub peak_in_flight: AtomicU64,
    /// Responses the client stopped reading before they were complete.
    pub disconnected: AtomicU64,
    pub last_auth: Mutex<Option<String>>,
    pub last_body: Mutex<Option<Value>>,
    /// Words of a streamed answer.
    pub stream_words: AtomicU64,
}

pub struct StandIn {
    pub addr: SocketAddr,
    pub state: Arc<StandInState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    pub async fn start(name: &str) -> StandIn {
        let state = Arc::new(StandInState {
            name: name.to_string(),
            mode: Mutex::new(Mode::Ok),
            fail_first: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            chat_calls: AtomicU64::new(0),
            embed_calls: AtomicU64::new(0),
            rank_calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            last_auth: Mutex::new(None),
            last_body: Mutex::new(None),
            stream_words: AtomicU64::new(6),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/rerank", post(rerank))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn { addr, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        *self.state.mode.lock().unwrap() = m;
    }

    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn disconnected(&self) -> u64 {
        self.state.disconnected.load(Ordering::SeqCst)
    }

    pub fn last_auth(&self) -> Option<String> {
        self.state.last_auth.lock().unwrap().clone()
    }

    pub fn last_body(&self) -> Option<Value> {
        self.state.last_body.lock().unwrap().clone()
    }
}

/// A loopback port with nothing listening: connections are refused.
pub fn refused_base_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

/// Counts a response the client abandoned.
struct Watch {
    state: Arc<StandInState>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.state.disconnected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn watch(state: &Arc<StandInState>) -> Watch {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    Watch {
        state: state.clone(),
        done: false,
    }
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Common behaviour of every endpoint; `None` means "answer normally".
async fn misbehave(
    state: &Arc<StandInState>,
    headers: &HeaderMap,
    w: &mut Option<Watch>,
) -> Option<Response> {
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Some(json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": {"message": "transient failure", "type": "server_error"}}),
        ));
    }
    let mode = state.mode.lock().unwrap().clone();
    match mode {
        Mode::Ok => None,
        Mode::Fail500 => Some(json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": {"message": format!("{} is broken", state.name), "type": "server_error"}}),
        )),
        Mode::Reject400(msg) => Some(json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}),
        )),
        Mode::EchoKey400 => {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            Some(json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": format!("Incorrect request; you sent {auth}"), "type": "invalid_request_error"}}),
            ))
        }
        Mode::Throttle429 => Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("content-type", "application/json"), ("retry-after", "0")],
                json!({"error": {"message": "slow down"}}).to_string(),
            )
                .into_response(),
        ),
        Mode::Redirect(to) => {
            Some((StatusCode::TEMPORARY_REDIRECT, [("location", to)], "").into_response())
        }
        Mode::Garbage => Some(
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                "<html>oops</html>",
            )
                .into_response(),
        ),
        Mode::Hang => {
            let w = w.take();
            let s = futures::stream::unfold(w, |w| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, Infallible>(Bytes::from_static(b" ")), w))
            });
            Some(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from_stream(s))
                    .unwrap(),
            )
        }
    }
}

fn record(state: &StandInState, headers: &HeaderMap, body: &Value) {
    state.calls.fetch_add(1, Ordering::SeqCst);
    *state.last_auth.lock().unwrap() = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    *state.last_body.lock().unwrap() = Some(body.clone());
}

fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The answer a stand-in gives: who it is and what it was asked.
pub fn answer_of(name: &str, question: &str) -> String {
    format!("{name} heard: {question}")
}

async fn chat(
    State(state): State<Arc<StandInState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": format!("bad json: {e}")}}),
            );
        }
    };
    record(&state, &headers, &body);
    state.chat_calls.fetch_add(1, Ordering::SeqCst);
    let mut w = Some(watch(&state));
    if let Some(r) = misbehave(&state, &headers, &mut w).await {
        if let Some(mut w) = w {
            w.done = true;
        }
        return r;
    }
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let text = answer_of(&state.name, &last_user_text(&body));
    let tool = body["tools"][0]["function"]["name"]
        .as_str()
        .map(str::to_string);
    let prompt_tokens = body["messages"].to_string().split_whitespace().count() as u64;
    let completion_tokens = text.split_whitespace().count() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let created = 1_700_000_000u64;
    if body["stream"] != json!(true) {
        let (message, finish) = match &tool {
            Some(t) => (
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": t, "arguments": "{\"city\":\"Paris\"}"}}]}),
                "tool_calls",
            ),
            None => (json!({"role": "assistant", "content": text}), "stop"),
        };
        if let Some(mut w) = w {
            w.done = true;
        }
        return json_response(
            StatusCode::OK,
            json!({
                "id": "chatcmpl-standin", "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        );
    }
    // SSE, exactly as OpenAI sends it.
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_standin",
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let finish = match &tool {
        Some(t) => {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": t, "arguments": ""}}]}),
                Value::Null,
            ));
            for part in ["{\"city\":", "\"Paris\"}"] {
                events.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                    Value::Null,
                ));
            }
            "tool_calls"
        }
        None => {
            // Split into pieces that end in spaces, like tokens.
            let words = state.stream_words.load(Ordering::SeqCst).max(1) as usize;
            let mut pieces: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
            while pieces.len() < words {
                pieces.push(format!("w{} ", pieces.len()));
            }
            for p in pieces {
                events.push(chunk(json!({"content": p}), Value::Null));
            }
            "stop"
        }
    };
    events.push(chunk(json!({}), json!(finish)));
    if body["stream_options"]["include_usage"] == json!(true) {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_string());
    let delay = state.delay_ms.load(Ordering::SeqCst);
    let s = futures::stream::unfold((0usize, events, w), move |(i, events, mut w)| async move {
        if i >= events.len() {
            if let Some(w) = w.as_mut() {
                w.done = true;
            }
            return None;
        }
        if i > 0 && delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let b = Bytes::from(events[i].clone());
        Some((Ok::<_, Infallible>(b), (i + 1, events, w)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(s))
        .unwrap()
}

async fn embeddings(
    State(state): State<Arc<StandInState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    record(&state, &headers, &body);
    state.embed_calls.fetch_add(1, Ordering::SeqCst);
    let mut w = Some(watch(&state));
    if let Some(r) = misbehave(&state, &headers, &mut w).await {
        if let Some(mut w) = w {
            w.done = true;
        }
        return r;
    }
    if let Some(mut w) = w {
        w.done = true;
    }
    let input: Vec<String> = body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    let data: Vec<Value> = input
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"object": "embedding", "index": i, "embedding": embedding_of(s)}))
        .collect();
    let tokens: usize = input.iter().map(|s| s.split_whitespace().count()).sum();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

/// The vector a stand-in gives for a text.
pub fn embedding_of(s: &str) -> Vec<f32> {
    vec![s.len() as f32, s.split_whitespace().count() as f32, 0.5]
}

async fn rerank(
    State(state): State<Arc<StandInState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    record(&state, &headers, &body);
    state.rank_calls.fetch_add(1, Ordering::SeqCst);
    let mut w = Some(watch(&state));
    if let Some(r) = misbehave(&state, &headers, &mut w).await {
        if let Some(mut w) = w {
            w.done = true;
        }
        return r;
    }
    if let Some(mut w) = w {
        w.done = true;
    }
    let q = body["query"].as_str().unwrap_or_default().to_lowercase();
    let docs: Vec<String> = body["documents"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut results: Vec<(usize, f64)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let words: Vec<&str> = q.split_whitespace().collect();
            let hits = words.iter().filter(|w| d.contains(*w)).count();
            (i, hits as f64 / words.len().max(1) as f64)
        })
        .collect();
    results.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    if let Some(n) = body["top_n"].as_u64() {
        results.truncate(n as usize);
    }
    let results: Vec<Value> = results
        .into_iter()
        .map(|(i, s)| json!({"index": i, "relevance_score": s}))
        .collect();
    json_response(
        StatusCode::OK,
        json!({"id": "rerank-standin", "model": body["model"], "results": results, "usage": {"total_tokens": 10}}),
    )
}

// ---------------------------------------------------------------------------------------------
// Config helpers

pub fn provider(name: &str, base_url: &str, local: bool) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        base_url: base_url.into(),
        local,
        timeout_ms: 10_000,
        ..Default::default()
    }
}

pub fn rerank_provider(name: &str, base_url: &str, local: bool) -> ProviderConfig {
    ProviderConfig {
        kind: ProviderKind::Rerank,
        ..provider(name, base_url, local)
    }
}

pub fn route(model: &str, targets: &[(&str, &str)]) -> RouteConfig {
    RouteConfig {
        model: model.into(),
        targets: targets
            .iter()
            .map(|(p, up)| TargetConfig {
                provider: (*p).into(),
                upstream_model: (*up).into(),
            })
            .collect(),
    }
}

/// Fast retries for tests.
pub fn config(providers: Vec<ProviderConfig>, routes: Vec<RouteConfig>) -> GatewayConfig {
    GatewayConfig {
        providers,
        routes,
        retry_backoff_ms: 10,
        retry_backoff_max_ms: 50,
        default_timeout_ms: 20_000,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The bus: real nats-server, real permission node

/// How long the gateway's tests wait for something that happens at once.
pub const SOON: Duration = Duration::from_secs(5);

pub async fn fleet() -> Fleet {
    Fleet::start().await.expect("fleet")
}

/// The gateway on a fleet.
pub trait Gateway {
    /// The gateway at `cfg`, in-process on this fleet's bus.
    async fn gateway(&self, cfg: GatewayConfig) -> NodeHandle;
}

impl Gateway for Fleet {
    async fn gateway(&self, cfg: GatewayConfig) -> NodeHandle {
        tether_model_gateway::build(cfg)
            .expect("config")
            .start(self.node_bus(tether_testkit::NodeKind::Model))
            .await
            .expect("gateway")
    }
}

pub fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The text of a chat completion's first choice.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
