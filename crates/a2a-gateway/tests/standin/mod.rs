//! The stand-in for the gateway's bus endpoints that the bridge tests run against: a node
//! with raw endpoints on `a2a.echo.*` (and `a2a.ghost.card`) that records what it received
//! and answers fixed A2A JSON, problems, and stream chunks by scenario (task id `missing`,
//! `done`, `terminal`, `gap`, `fail`); plus the bridge in front of it and HTTP helpers.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tether_a2a_gateway::A2aConfig;
use tether_a2a_gateway::error::A2aError;
use tether_a2a_gateway::http::{self, HttpServer};
use tether_bus::{BusConfig, Endpoint, Node, NodeHandle, Problem, RawRequest, Reply};
use tether_testkit::NatsServer;
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(10);
pub const AGENT: &str = "echo";

/// What the stand-in received.
#[derive(Debug)]
pub struct Seen {
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

pub fn task(id: &str, state: &str) -> Value {
    json!({"id": id, "contextId": "ctx-1", "status": {"state": state}})
}

pub fn chunk(
    client: &async_nats::Client,
    to: &str,
    seq: u64,
    kind: &str,
    body: Value,
) -> impl Future<Output = ()> {
    let mut h = HeaderMap::new();
    h.insert("Tether-Stream-Seq", seq.to_string().as_str());
    h.insert("Tether-Stream", kind);
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let (client, to) = (client.clone(), to.to_string());
    async move {
        client
            .publish_with_headers(to, h, body)
            .await
            .expect("publish chunk");
    }
}

/// Publishes the chunks of a stream scenario (named by the task id) to `to`.
pub async fn play(client: async_nats::Client, to: String, id: String) {
    let c = &client;
    chunk(
        c,
        &to,
        1,
        "event",
        json!({"task": task(&id, "TASK_STATE_SUBMITTED")}),
    )
    .await;
    match id.as_str() {
        "gap" => {
            chunk(c, &to, 3, "event", json!({"statusUpdate": {"taskId": id}})).await;
        }
        "fail" => {
            let p = A2aError::InvalidAgentResponse.problem("the worker said nonsense");
            let mut h = HeaderMap::new();
            h.insert("Tether-Stream-Seq", "2");
            h.insert("Tether-Stream", "error");
            c.publish_with_headers(to.clone(), h, p.to_body("x"))
                .await
                .expect("publish");
        }
        _ => {
            let working = json!({"statusUpdate": {"taskId": id, "contextId": "ctx-1",
                "status": {"state": "TASK_STATE_WORKING"}}});
            let artifact = json!({"artifactUpdate": {"taskId": id, "contextId": "ctx-1",
                "artifact": {"artifactId": "a1", "parts": [{"text": "héllo"}]}}});
            let done = json!({"statusUpdate": {"taskId": id, "contextId": "ctx-1",
                "status": {"state": "TASK_STATE_COMPLETED"}}});
            chunk(c, &to, 2, "event", working).await;
            chunk(c, &to, 3, "event", artifact).await;
            chunk(c, &to, 4, "event", done).await;
            chunk(c, &to, 5, "end", Value::Null).await;
        }
    }
    c.flush().await.expect("flush");
}

/// The stand-in's answer to one request.
pub async fn answer(op: &str, req: &RawRequest, body: &Value, url: &str) -> Result<Value, Problem> {
    let id = body
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("t-1")
        .to_string();
    if id == "missing" {
        return Err(tether_a2a_gateway::error::not_found(&id));
    }
    match op {
        "send" => Ok(json!({"task": task("t-1", "TASK_STATE_COMPLETED")})),
        "get" => Ok(task(&id, "TASK_STATE_WORKING")),
        "list" => Ok(json!({"tasks": [task("t-1", "TASK_STATE_COMPLETED")],
            "nextPageToken": "", "pageSize": 50, "totalSize": 1})),
        "cancel" if id == "done" => Err(A2aError::TaskNotCancelable.problem("task is terminal")),
        "cancel" => Ok(task(&id, "TASK_STATE_CANCELED")),
        "stream" | "subscribe" => {
            if id == "terminal" {
                return Err(A2aError::UnsupportedOperation.problem("task is terminal"));
            }
            let to = req
                .headers
                .get("Tether-Stream-Subject")
                .map(|v| v.as_str().to_string())
                .ok_or_else(|| Problem::bad_request("no stream subject"))?;
            tokio::spawn(play(req.ctx.client.clone(), to, id.clone()));
            Ok(json!({"task": task(&id, "TASK_STATE_SUBMITTED")}))
        }
        "card" => Ok(
            json!({"name": "echo", "description": "says it back", "version": "1",
            "capabilities": {"streaming": true},
            "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
            "supportedInterfaces": [{"url": url, "protocolBinding": "JSONRPC",
            "protocolVersion": "1.0"}]}),
        ),
        _ => Err(Problem::internal("unexpected op")),
    }
}

pub struct Rig {
    _nats: NatsServer,
    node: NodeHandle,
    pub server: HttpServer,
    seen: mpsc::UnboundedReceiver<Seen>,
    pub http: reqwest::Client,
}

impl Rig {
    pub async fn start() -> Rig {
        Self::start_with(A2aConfig::default(), None).await
    }

    pub async fn start_with(mut cfg: A2aConfig, prefix: Option<&str>) -> Rig {
        // reqwest is built without a default TLS provider (plain HTTP here, but it asks).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let nats = NatsServer::start().await.expect("nats");
        let bus = BusConfig {
            nats_url: nats.url(),
            subject_prefix: prefix.map(str::to_string),
            drain_timeout_seconds: 5,
            ..Default::default()
        };
        let (tx, seen) = mpsc::unbounded_channel();
        let card_url = Arc::new(OnceLock::<String>::new());
        let mut node = Node::new("a2a-stand-in", "0.0.1");
        for op in [
            "send",
            "stream",
            "get",
            "list",
            "cancel",
            "subscribe",
            "card",
        ] {
            let (tx, card_url) = (tx.clone(), card_url.clone());
            node = node.endpoint(Endpoint::raw(
                format!("a2a.{AGENT}.{op}"),
                move |req: RawRequest| {
                    let (tx, card_url) = (tx.clone(), card_url.clone());
                    async move {
                        let body = if req.payload.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(&req.payload)
                                .map_err(|e| Problem::bad_request(e.to_string()))?
                        };
                        let _ = tx.send(Seen {
                            subject: req.subject.to_string(),
                            headers: req.headers.clone(),
                            body: body.clone(),
                        });
                        let url = card_url.get().map(String::as_str).unwrap_or_default();
                        let v = answer(op, &req, &body, url).await?;
                        Ok(Reply::new(v.to_string(), "application/json"))
                    }
                },
            ));
        }
        node = node.endpoint(Endpoint::raw("a2a.ghost.card", |_req: RawRequest| async {
            Err::<Reply, _>(Problem::not_found("no agent card for \"ghost\""))
        }));
        let node = node.start(bus.clone()).await.expect("stand-in node");
        cfg.a2a_listen = "127.0.0.1:0".into();
        let client = nats.client().await.expect("client");
        let server = http::start(&cfg, &bus, client)
            .await
            .expect("bridge")
            .expect("a listener");
        let _ = card_url.set(server.agent_url(AGENT));
        Rig {
            _nats: nats,
            node,
            server,
            seen,
            http: reqwest::Client::builder().build().expect("reqwest"),
        }
    }

    pub fn url(&self) -> String {
        self.server.agent_url(AGENT)
    }

    pub async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the stand-in was called in time")
            .expect("stand-in channel open")
    }

    /// POSTs `body` (raw) with `headers`; the status and the JSON answer.
    pub async fn post_raw(
        &self,
        url: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut r = self.http.post(url).body(body);
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            r = r.header("Content-Type", "application/json");
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = tokio::time::timeout(WAIT, r.send())
            .await
            .expect("answered in time")
            .expect("http");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON answer, got {text:?}"));
        (status, v)
    }

    pub async fn rpc(
        &self,
        method: &str,
        params: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let body = json!({"jsonrpc": "2.0", "id": "req-1", "method": method, "params": params});
        self.post_raw(&self.url(), body.to_string(), headers).await
    }

    pub async fn shutdown(self) {
        tokio::time::timeout(WAIT, self.server.shutdown())
            .await
            .expect("bridge stops");
        self.node.shutdown().await.expect("node stops");
    }
}

pub const AUTH: (&str, &str) = ("Authorization", "Bearer tok.en.value");
pub const V1: (&str, &str) = ("A2A-Version", "1.0");

pub fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("a JSON-RPC error, got {v}"))
}

/// `(event name, data JSON)` of each SSE event in `text`.
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_string();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            (!data.is_empty()).then(|| {
                (
                    name,
                    serde_json::from_str(&data.join("\n")).expect("data is JSON"),
                )
            })
        })
        .collect()
}

pub async fn stream(rig: &Rig, method: &str, params: Value) -> Vec<(String, Value)> {
    let body = json!({"jsonrpc": "2.0", "id": 11, "method": method, "params": params});
    let resp = rig
        .http
        .post(rig.url())
        .header("Accept", "text/event-stream")
        .header(AUTH.0, AUTH.1)
        .header(V1.0, V1.1)
        .body(body.to_string())
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    // The body ends when the bridge ends the stream.
    let text = tokio::time::timeout(WAIT, resp.text())
        .await
        .expect("the stream ended in time")
        .expect("body");
    sse_events(&text)
}

pub trait JsonOrPanic {
    async fn json_or_panic(self) -> Value;
}

impl JsonOrPanic for reqwest::Response {
    async fn json_or_panic(self) -> Value {
        let text = self.text().await.expect("body");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON, got {text:?}"))
    }
}
