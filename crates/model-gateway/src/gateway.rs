//! The gateway's state and its one algorithm: route a call, then try providers in order.
//!
//! [`Gateway::plan`] turns a model name into candidates (exact routes before globs, in config
//! order; providers of the wrong kind dropped; under privacy only local ones — and a refusal,
//! never a remote call, when none is left). [`Gateway::execute`] walks the candidates: skip a
//! provider whose circuit is open or that is full (unless it is the last), retry connect
//! errors, 429 and 5xx with jittered exponential backoff, fall back on timeouts and unreadable
//! answers, stop at once on a 4xx about the request, a broken stream or a cancellation — all
//! inside the caller's deadline, which bounds every attempt, backoff and wait.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use rand::Rng;
use tether_bus::{Caller, Problem};
use tokio_util::sync::CancellationToken;

use crate::accounting::{Accounting, RateLimiter};
use crate::breaker::Breaker;
use crate::config::{ConfigError, GatewayConfig, Op, load_key};
use crate::glob;
use crate::provider::{Failure, Provider, Redactor};

/// Header carrying the caller's deadline in milliseconds (the request field `timeout_ms` is the
/// other way; the smaller wins).
pub const TIMEOUT_HEADER: &str = "Tether-Timeout-Ms";

/// Status of a call cancelled by its caller (`model.cancel`, or the stream's listener left).
pub const CANCELLED: u16 = 499;

struct Route {
    pattern: String,
    glob: bool,
    targets: Vec<(usize, String)>,
}

/// One provider to try, with the model name it knows.
pub struct Candidate {
    pub provider: Arc<Provider>,
    pub upstream_model: String,
}

/// Where a call may go.
pub struct Plan {
    pub candidates: Vec<Candidate>,
    pub private: bool,
}

/// Who answered.
#[derive(Clone, Debug)]
pub struct Served {
    pub provider: String,
    pub upstream_model: String,
    pub local: bool,
    pub attempts: u32,
}

/// What one attempt gets.
pub struct Attempt {
    pub provider: Arc<Provider>,
    pub upstream_model: String,
    /// End of this attempt's budget: the provider's timeout, within the call's deadline.
    pub until: Instant,
    /// The call's deadline.
    pub deadline: Instant,
}

pub struct Gateway {
    pub cfg: GatewayConfig,
    pub providers: Vec<Arc<Provider>>,
    routes: Vec<Route>,
    pub accounting: Accounting,
    limiter: RateLimiter,
    running: Mutex<HashMap<(String, String), CancellationToken>>,
}

/// A running call that `model.cancel` can reach; unregisters itself when dropped.
pub struct Running<'a> {
    gw: &'a Gateway,
    key: Option<(String, String)>,
    pub token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.gw
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
        }
    }
}

impl Gateway {
    /// Validates the config, reads the keys (through `env` for `api_key_env`), builds clients.
    pub fn new(
        cfg: GatewayConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        // reqwest is built without a bundled crypto provider; ring is the workspace's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut keys = Vec::new();
        for p in &cfg.providers {
            keys.push(load_key(p, env)?);
        }
        let redactor = Arc::new(Redactor::new(keys.iter().flatten().cloned().collect()));
        let mut providers = Vec::new();
        for (p, key) in cfg.providers.iter().zip(keys.iter()) {
            let breaker = Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            );
            providers.push(Arc::new(Provider::new(
                p,
                key.as_ref(),
                breaker,
                redactor.clone(),
                cfg.max_response_bytes,
            )?));
        }
        let routes = cfg
            .routes
            .iter()
            .map(|r| Route {
                pattern: r.model.clone(),
                glob: glob::is_glob(&r.model),
                targets: r
                    .targets
                    .iter()
                    .filter_map(|t| {
                        // validate() checked every provider name exists.
                        let i = cfg.providers.iter().position(|p| p.name == t.provider)?;
                        Some((i, t.upstream_model.clone()))
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            limiter: RateLimiter::new(cfg.rate_limit_per_minute),
            cfg,
            providers,
            routes,
            accounting: Accounting::default(),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Routable model names and globs, in config order.
    pub fn routable(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.pattern.as_str()).collect()
    }

    fn route(&self, model: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| !r.glob && r.pattern == model)
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.glob && glob::matches(&r.pattern, model))
            })
    }

    /// Whether a model name is routable (accounting keys only routable names).
    pub fn is_routable(&self, model: &str) -> bool {
        self.route(model).is_some()
    }

    /// Route pattern → provider names in fallback order, and whether a local one serves it.
    pub fn route_table(&self) -> Vec<(String, Vec<String>, bool)> {
        self.routes
            .iter()
            .map(|r| {
                let names = r
                    .targets
                    .iter()
                    .map(|(i, _)| self.providers[*i].name.clone())
                    .collect();
                let local = r.targets.iter().any(|(i, _)| self.providers[*i].local);
                (r.pattern.clone(), names, local)
            })
            .collect()
    }

    /// Privacy for this call: global, asked, or required for the caller's agent or space.
    pub fn private(&self, asked: bool, caller: &Caller) -> bool {
        self.cfg.privacy
            || asked
            || self
                .cfg
                .privacy_agents
                .iter()
                .any(|a| a == &caller.agent_id)
            || self.cfg.privacy_spaces.iter().any(|s| s == &caller.space)
    }

    /// The per-agent rate limit.
    pub fn admit(&self, agent: &str) -> Result<(), Problem> {
        self.limiter.check(agent, Instant::now()).map_err(|wait| {
            Problem::too_many(format!(
                "agent {agent} is over its limit of {} requests per minute; retry in {} ms",
                self.cfg.rate_limit_per_minute,
                wait.as_millis().max(1)
            ))
        })
    }

    /// The call's deadline from the request field and the header (the smaller), else the
    /// default; capped at `max_timeout_ms`.
    pub fn deadline(
        &self,
        field_ms: u32,
        headers: &HeaderMap,
        start: Instant,
    ) -> Result<Instant, Problem> {
        let header = match headers.get(TIMEOUT_HEADER) {
            None => None,
            Some(v) => Some(v.as_str().trim().parse::<u64>().map_err(|_| {
                Problem::bad_request(format!(
                    "header {TIMEOUT_HEADER} must be a number of milliseconds"
                ))
            })?),
        };
        let field = (field_ms > 0).then_some(u64::from(field_ms));
        let ms = match (field, header.filter(|h| *h > 0)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.cfg.default_timeout_ms,
        }
        .min(self.cfg.max_timeout_ms);
        Ok(start + Duration::from_millis(ms))
    }

    /// Where a call for `model` may go.
    pub fn plan(&self, op: Op, model: &str, private: bool) -> Result<Plan, Problem> {
        let route = self.route(model).ok_or_else(|| {
            Problem::not_found(format!(
                "unknown model {model:?}; routable models: {}",
                self.routable().join(", ")
            ))
        })?;
        let serving: Vec<Candidate> = route
            .targets
            .iter()
            .map(|(i, up)| Candidate {
                provider: self.providers[*i].clone(),
                upstream_model: if up.is_empty() {
                    model.to_string()
                } else {
                    up.clone()
                },
            })
            .filter(|c| c.provider.kind.serves(op))
            .collect();
        if serving.is_empty() {
            return Err(Problem::unprocessable(format!(
                "model {model:?} has no provider that serves {}",
                op.as_str()
            )));
        }
        if !private {
            return Ok(Plan {
                candidates: serving,
                private,
            });
        }
        let local: Vec<Candidate> = serving.into_iter().filter(|c| c.provider.local).collect();
        if local.is_empty() {
            return Err(Problem::unprocessable(format!(
                "privacy mode: no local provider serves model {model:?}; the request was not sent to any remote provider"
            )));
        }
        Ok(Plan {
            candidates: local,
            private,
        })
    }

    /// Makes a call cancellable by `model.cancel` under `(agent, request_id)`.
    pub fn register(&self, agent: &str, request_id: &str) -> Result<Running<'_>, Problem> {
        let token = CancellationToken::new();
        if request_id.is_empty() {
            return Ok(Running {
                gw: self,
                key: None,
                token,
            });
        }
        let key = (agent.to_string(), request_id.to_string());
        let mut m = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&key) {
            return Err(Problem::conflict(format!(
                "a call with request_id {request_id:?} is already running"
            )));
        }
        m.insert(key.clone(), token.clone());
        Ok(Running {
            gw: self,
            key: Some(key),
            token,
        })
    }

    /// Cancels the caller's call `request_id` (an operator's: anyone's). Whether one was found.
    pub fn cancel(&self, caller: &Caller, request_id: &str) -> bool {
        let m = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for ((agent, id), token) in m.iter() {
            if id == request_id && (agent == &caller.agent_id || caller.is_operator()) {
                token.cancel();
                found = true;
            }
        }
        found
    }

    fn backoff(&self, retry: u32) -> Duration {
        let base = self.cfg.retry_backoff_ms.max(1) as f64;
        let exp = base * 2f64.powi(i32::try_from(retry).unwrap_or(10));
        let capped = exp.min(self.cfg.retry_backoff_max_ms.max(1) as f64);
        let jitter = rand::rng().random_range(0.75..1.25);
        Duration::from_secs_f64(capped * jitter / 1000.0)
    }

    /// Tries the plan's candidates with `attempt` until one answers (see the module doc).
    pub async fn execute<T, F, Fut>(
        &self,
        op: Op,
        model: &str,
        plan: &Plan,
        deadline: Instant,
        cancel: &CancellationToken,
        mut attempt: F,
    ) -> Result<(T, Served), Problem>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut notes: Vec<String> = Vec::new();
        let mut attempts = 0u32;
        let n = plan.candidates.len();
        for (i, c) in plan.candidates.iter().enumerate() {
            let p = &c.provider;
            let last = i + 1 == n;
            let Some(mut admission) = p.breaker.admit(Instant::now()) else {
                notes.push(format!("{}: circuit open (skipped)", p.name));
                continue;
            };
            let _permit = match p.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) if !last => {
                    notes.push(format!(
                        "{}: at its limit of {} calls (skipped)",
                        p.name, p.max_concurrency
                    ));
                    continue;
                }
                Err(_) => {
                    tokio::select! {
                        r = tokio::time::timeout_at(deadline.into(), p.permits.clone().acquire_owned()) => match r {
                            Ok(Ok(permit)) => permit,
                            Ok(Err(_)) => return Err(Problem::unavailable("the gateway is shutting down")),
                            Err(_) => {
                                notes.push(format!("{}: at its limit of {} calls until the deadline", p.name, p.max_concurrency));
                                break;
                            }
                        },
                        _ = cancel.cancelled() => return Err(cancelled()),
                    }
                }
            };
            let mut retry = 0u32;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                attempts += 1;
                let until = (now + p.timeout).min(deadline);
                let a = Attempt {
                    provider: p.clone(),
                    upstream_model: c.upstream_model.clone(),
                    until,
                    deadline,
                };
                let r = tokio::select! {
                    r = attempt(a) => r,
                    _ = cancel.cancelled() => Err(Failure::Cancelled("cancelled")),
                };
                let f = match r {
                    Ok(v) => {
                        admission.success();
                        return Ok((
                            v,
                            Served {
                                provider: p.name.clone(),
                                upstream_model: c.upstream_model.clone(),
                                local: p.local,
                                attempts,
                            },
                        ));
                    }
                    Err(f) => f,
                };
                let now = Instant::now();
                if f.provider_fault() {
                    admission.failure(now);
                    if p.breaker.is_open(now) {
                        tracing::warn!(provider = %p.name, op = op.as_str(), failure = %f, "provider circuit open");
                    }
                } else if let Failure::Rejected { .. } = f {
                    admission.success();
                }
                tracing::debug!(provider = %p.name, op = op.as_str(), model, attempt = attempts, failure = %f, "attempt failed");
                match f {
                    Failure::Rejected { status, reason } => {
                        let status = if (400..500).contains(&status) {
                            status
                        } else {
                            400
                        };
                        return Err(Problem::new(
                            status,
                            format!("provider {} rejected the request: {reason}", p.name),
                        ));
                    }
                    Failure::Broken(e) => {
                        return Err(Problem::new(
                            502,
                            format!(
                                "provider {}: the stream broke after it started: {e}",
                                p.name
                            ),
                        ));
                    }
                    Failure::Cancelled(_) => return Err(cancelled()),
                    ref other => {
                        let tries = retry + 1;
                        let wait = match other {
                            Failure::Throttled {
                                retry_after: Some(ra),
                                ..
                            } => (*ra).max(self.backoff(retry)),
                            _ => self.backoff(retry),
                        };
                        let retry_ok = other.retryable()
                            && retry < self.cfg.retries
                            && !p.breaker.is_open(now)
                            && now + wait < deadline;
                        if !retry_ok {
                            notes.push(format!(
                                "{}: {other} ({tries} attempt{})",
                                p.name,
                                if tries == 1 { "" } else { "s" }
                            ));
                            break;
                        }
                        retry += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = cancel.cancelled() => return Err(cancelled()),
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let tried = if notes.is_empty() {
            "nothing tried".to_string()
        } else {
            notes.join("; ")
        };
        if Instant::now() >= deadline {
            return Err(Problem::timeout(format!(
                "the deadline passed before a provider answered for model {model:?}; {tried}"
            )));
        }
        if plan.private {
            return Err(Problem::unavailable(format!(
                "privacy mode: no local provider could serve model {model:?} ({tried}); remote providers are never used for a private request"
            )));
        }
        Err(Problem::unavailable(format!(
            "no provider could serve model {model:?}: {tried}"
        )))
    }
}

fn cancelled() -> Problem {
    Problem::new(
        CANCELLED,
        "the call was cancelled by its caller (model.cancel, or the stream's listener went away)",
    )
}
