//! Usage per agent and model — requests, errors, prompt/completion tokens, latency — and the
//! optional per-agent rate limit.
//!
//! The agent is the verified token's `sub`, never a request field. Counters are kept per
//! operation so `$SRV.STATS` can show each endpoint its own numbers (the `data` of
//! `model-chat`, `model-embed`, `model-rank`); the model key is the routable name the caller
//! asked for, or `(unroutable)`, so a caller cannot grow the table with made-up names.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Op;

/// The model key for requests that named no routable model.
pub const UNROUTABLE: &str = "(unroutable)";

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Sum of latencies, milliseconds.
    pub latency_ms_total: u64,
    pub latency_ms_max: u64,
    pub latency_ms_avg: u64,
}

/// One finished call, for accounting.
pub struct Record<'a> {
    pub op: Op,
    pub agent: &'a str,
    pub model: &'a str,
    pub ok: bool,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency: Duration,
}

#[derive(Default)]
pub struct Accounting {
    table: Mutex<HashMap<(Op, String, String), Usage>>,
}

impl Accounting {
    pub fn record(&self, r: &Record<'_>) {
        let ms = u64::try_from(r.latency.as_millis()).unwrap_or(u64::MAX);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let u = t
            .entry((r.op, r.agent.to_string(), r.model.to_string()))
            .or_default();
        u.requests += 1;
        if !r.ok {
            u.errors += 1;
        }
        u.prompt_tokens += u64::from(r.prompt_tokens);
        u.completion_tokens += u64::from(r.completion_tokens);
        u.latency_ms_total = u.latency_ms_total.saturating_add(ms);
        u.latency_ms_max = u.latency_ms_max.max(ms);
        u.latency_ms_avg = u.latency_ms_total / u.requests;
    }

    /// `{"agents": {agent: {model: Usage}}}` for one operation.
    pub fn snapshot(&self, op: Op) -> serde_json::Value {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut agents: BTreeMap<&str, BTreeMap<&str, &Usage>> = BTreeMap::new();
        for ((o, agent, model), u) in t.iter() {
            if *o == op {
                agents.entry(agent).or_default().insert(model, u);
            }
        }
        serde_json::json!({ "agents": agents })
    }

    /// One entry, for tests and the models reply.
    pub fn get(&self, op: Op, agent: &str, model: &str) -> Option<Usage> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.get(&(op, agent.to_string(), model.to_string())).cloned()
    }
}

/// A token bucket per agent: `per_minute` requests, refilled continuously, bursting to
/// `per_minute`.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` when the agent is over its rate.
    pub fn check(&self, agent: &str, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let cap = f64::from(self.per_minute);
        let per_sec = cap / 60.0;
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Full buckets carry no information: drop them so the table stays small.
        if b.len() > 10_000 {
            b.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < cap
            });
        }
        let (tokens, at) = b.entry(agent.to_string()).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_per_agent_and_model() {
        let a = Accounting::default();
        for (ok, ms) in [(true, 10), (false, 30)] {
            a.record(&Record {
                op: Op::Chat,
                agent: "a1",
                model: "m",
                ok,
                prompt_tokens: 5,
                completion_tokens: 7,
                latency: Duration::from_millis(ms),
            });
        }
        let u = a.get(Op::Chat, "a1", "m").expect("usage");
        assert_eq!((u.requests, u.errors), (2, 1));
        assert_eq!((u.prompt_tokens, u.completion_tokens), (10, 14));
        assert_eq!((u.latency_ms_max, u.latency_ms_avg), (30, 20));
        assert_eq!(a.snapshot(Op::Chat)["agents"]["a1"]["m"]["requests"], 2);
        assert_eq!(a.snapshot(Op::Embed)["agents"], serde_json::json!({}));
    }

    #[test]
    fn rate_limit_refills() {
        let r = RateLimiter::new(2);
        let t = Instant::now();
        assert!(r.check("a", t).is_ok());
        assert!(r.check("a", t).is_ok());
        let wait = r.check("a", t).expect_err("limited");
        assert!(wait <= Duration::from_secs(30) && wait > Duration::ZERO);
        assert!(r.check("b", t).is_ok(), "per agent");
        assert!(r.check("a", t + Duration::from_secs(30)).is_ok());
        assert!(RateLimiter::new(0).check("a", t).is_ok());
    }
}
