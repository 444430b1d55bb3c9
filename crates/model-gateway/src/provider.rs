//! One back end over HTTP: its client, key, breaker and concurrency limit, and the
//! classification of everything that can go wrong into a [`Failure`].
//!
//! Design decisions:
//! - Each provider has its own `reqwest` client that follows no redirects and uses no proxy, so
//!   the only host ever contacted for it is its configured `base_url`.
//! - The key lives in a sensitive `Authorization` header value built once; it is never
//!   formatted. Every text that comes back from a provider (error reasons) or from the HTTP
//!   stack goes through [`Redactor`] before it reaches a log line or a reply, because providers
//!   do echo keys ("Incorrect API key provided: sk-…").

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tether_bus::config::Secret;
use tokio::sync::Semaphore;

use crate::breaker::Breaker;
use crate::config::{ConfigError, ProviderConfig, ProviderKind};
use crate::sse::SseParser;

/// Replaces every configured key with `***` in text bound for logs or replies.
#[derive(Default)]
pub struct Redactor {
    keys: Vec<Secret>,
}

impl Redactor {
    pub fn new(keys: Vec<Secret>) -> Self {
        Self { keys }
    }

    pub fn redact(&self, s: &str) -> String {
        let mut out = s.to_string();
        for k in &self.keys {
            if !k.expose().is_empty() && out.contains(k.expose()) {
                out = out.replace(k.expose(), "***");
            }
        }
        out
    }
}

/// Why one attempt on one provider did not produce an answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// No connection (refused, reset, DNS): retried.
    Connect(String),
    /// The attempt's budget ran out: not retried on this provider (the time is gone), next one.
    Timeout,
    /// 429: retried after `Retry-After` or the backoff.
    Throttled {
        retry_after: Option<Duration>,
        reason: String,
    },
    /// 5xx: retried.
    Server { status: u16, reason: String },
    /// 401/403/407: the gateway's credentials are wrong; next provider, never the caller's fault.
    Credentials { status: u16, reason: String },
    /// Any other 4xx: the request itself is bad; answered to the caller, never retried.
    Rejected { status: u16, reason: String },
    /// A 2xx the gateway cannot read: next provider.
    Protocol(String),
    /// The stream broke after chunks were already published: the call fails (no fallback, the
    /// caller has seen part of an answer).
    Broken(String),
    /// The caller cancelled or went away.
    Cancelled(&'static str),
}

impl Failure {
    /// Worth another attempt on the same provider.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Failure::Connect(_) | Failure::Throttled { .. } | Failure::Server { .. }
        )
    }

    /// Counts against the provider's circuit.
    pub fn provider_fault(&self) -> bool {
        !matches!(self, Failure::Rejected { .. } | Failure::Cancelled(_))
    }

    /// Ends the whole call (no fallback).
    pub fn terminal(&self) -> bool {
        matches!(
            self,
            Failure::Rejected { .. } | Failure::Broken(_) | Failure::Cancelled(_)
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connection failed: {e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Throttled { reason, .. } => write!(f, "HTTP 429: {reason}"),
            Failure::Server { status, reason }
            | Failure::Credentials { status, reason }
            | Failure::Rejected { status, reason } => write!(f, "HTTP {status}: {reason}"),
            Failure::Protocol(e) => write!(f, "unreadable answer: {e}"),
            Failure::Broken(e) => write!(f, "stream broke: {e}"),
            Failure::Cancelled(why) => f.write_str(why),
        }
    }
}

/// A configured back end.
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub local: bool,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub breaker: Breaker,
    pub permits: Arc<Semaphore>,
    base_url: String,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
    redactor: Arc<Redactor>,
    max_response_bytes: usize,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("local", &self.local)
            .field("base_url", &self.base_url)
            .field("api_key", &self.auth.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Collects an error and its sources into one line (reqwest's own `Display` hides the cause).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Provider {
    pub fn new(
        cfg: &ProviderConfig,
        key: Option<&Secret>,
        breaker: Breaker,
        redactor: Arc<Redactor>,
        max_response_bytes: usize,
    ) -> Result<Self, ConfigError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(cfg.max_concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tether-model-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ConfigError(format!(
                    "provider {:?}: cannot build HTTP client: {}",
                    cfg.name,
                    chain(&e)
                ))
            })?;
        let auth = match key {
            Some(k) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", k.expose())).map_err(|_| {
                        ConfigError(format!(
                            "provider {:?}: the API key holds characters not allowed in a header",
                            cfg.name
                        ))
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            name: cfg.name.clone(),
            kind: cfg.kind,
            local: cfg.local,
            timeout: Duration::from_millis(cfg.timeout_ms),
            max_concurrency: cfg.max_concurrency,
            breaker,
            permits: Arc::new(Semaphore::new(cfg.max_concurrency)),
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            client,
            auth,
            redactor,
            max_response_bytes,
        })
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max_concurrency
            .saturating_sub(self.permits.available_permits())
    }

    /// POSTs JSON and waits for the response headers; a non-2xx status is classified.
    async fn send(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, Failure> {
        let body = serde_json::to_vec(body).map_err(|e| Failure::Protocol(e.to_string()))?;
        let mut rb = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(a) = &self.auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let reason = self.reason(resp, status).await;
        Err(match status {
            429 => Failure::Throttled {
                retry_after,
                reason,
            },
            401 | 403 | 407 => Failure::Credentials { status, reason },
            s if s >= 500 => Failure::Server { status, reason },
            // 3xx (redirects are not followed: another host is never contacted) and 1xx are
            // not answers.
            s if s < 400 => Failure::Protocol(format!("HTTP {s} (redirects are not followed)")),
            _ => Failure::Rejected { status, reason },
        })
    }

    fn transport(&self, e: reqwest::Error) -> Failure {
        let connect = e.is_connect();
        let timeout = e.is_timeout();
        let msg = self.redactor.redact(&chain(&e.without_url()));
        if timeout && !connect {
            Failure::Timeout
        } else {
            // A reset or a closed connection before any answer is as transient as a refusal.
            Failure::Connect(msg)
        }
    }

    /// The provider's own words for an error: `error.message`, `error`, `detail` or `message`
    /// of a JSON body, else the start of the text; redacted, at most 500 characters.
    async fn reason(&self, mut resp: reqwest::Response, status: u16) -> String {
        let mut buf = Vec::new();
        while buf.len() < 16 * 1024 {
            match resp.chunk().await {
                Ok(Some(c)) => buf.extend_from_slice(&c),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let from_json = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                let pick = |v: &serde_json::Value| v.as_str().map(str::to_string);
                v.get("error")
                    .and_then(|e| e.get("message").and_then(pick).or_else(|| pick(e)))
                    .or_else(|| v.get("detail").and_then(pick))
                    .or_else(|| v.get("message").and_then(pick))
            });
        let mut r = from_json.unwrap_or_else(|| text.trim().to_string());
        if r.is_empty() {
            r = reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no reason given")
                .to_string();
        }
        let mut r = self.redactor.redact(&r);
        if r.chars().count() > 500 {
            r = r.chars().take(500).collect::<String>() + "…";
        }
        r
    }

    /// POSTs JSON and reads a JSON answer, all before `deadline`.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, Failure> {
        let work = async {
            let mut resp = self.send(path, body).await?;
            let mut buf = Vec::new();
            while let Some(c) = resp.chunk().await.map_err(|e| self.transport(e))? {
                buf.extend_from_slice(&c);
                if buf.len() > self.max_response_bytes {
                    return Err(Failure::Protocol(format!(
                        "answer larger than {} bytes",
                        self.max_response_bytes
                    )));
                }
            }
            serde_json::from_slice(&buf).map_err(|e| Failure::Protocol(format!("not JSON: {e}")))
        };
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// POSTs JSON that asks for a stream; returns once the headers arrived (before `deadline`).
    pub async fn open_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
        deadline: Instant,
    ) -> Result<EventStream<'_>, Failure> {
        let resp = tokio::time::timeout_at(deadline.into(), self.send(path, body))
            .await
            .unwrap_or(Err(Failure::Timeout))?;
        Ok(EventStream {
            provider: self,
            resp,
            parser: SseParser::default(),
            read: 0,
            ended: false,
        })
    }
}

/// The `data:` payloads of a server-sent-events response.
pub struct EventStream<'a> {
    provider: &'a Provider,
    resp: reqwest::Response,
    parser: SseParser,
    read: usize,
    ended: bool,
}

impl EventStream<'_> {
    /// The next event's data; `None` after `data: [DONE]` or the end of the body. Each wait
    /// for bytes ends at `deadline` (the idle budget).
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<String>, Failure> {
        loop {
            if let Some(d) = self.parser.next_event() {
                if d.trim() == "[DONE]" {
                    self.ended = true;
                    return Ok(None);
                }
                return Ok(Some(d));
            }
            if self.ended {
                return Ok(None);
            }
            let chunk = tokio::time::timeout_at(deadline.into(), self.resp.chunk())
                .await
                .map_err(|_| Failure::Timeout)?
                .map_err(|e| self.provider.transport(e))?;
            match chunk {
                Some(c) => {
                    self.read += c.len();
                    if self.read > self.provider.max_response_bytes {
                        return Err(Failure::Protocol(format!(
                            "stream larger than {} bytes",
                            self.provider.max_response_bytes
                        )));
                    }
                    self.parser.feed(&c);
                }
                None => {
                    self.parser.finish();
                    self.ended = true;
                }
            }
        }
    }
}
