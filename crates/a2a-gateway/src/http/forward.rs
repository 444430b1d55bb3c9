//! One bus request on behalf of an HTTP caller: `a2a.<agent>.<op>` (deployment prefix
//! applied) with the caller's own credentials and protocol headers, the reply read back as
//! A2A JSON or as the problem the bus answered.
//!
//! Design decision: the bridge carries the caller's `Authorization` unchanged and decides
//! nothing about it: the gateway's endpoints verify it exactly as for a NATS caller, so the
//! bus and the bridge are one system with one set of rules.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use axum::http::HeaderMap as HttpHeaders;
use bytes::Bytes;
use tether_bus::{BusConfig, Problem};

/// HTTP request headers copied to the bus request when present (the first two are A2A's
/// service parameters, the last two W3C trace context).
const FORWARDED: [&str; 5] = [
    "Authorization",
    "A2A-Version",
    "A2A-Extensions",
    "traceparent",
    "tracestate",
];

/// The bridge's handle on the bus.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub config: BusConfig,
}

impl Bus {
    /// `a2a.<agent>.<op>` with the deployment prefix.
    pub fn subject(&self, agent: &str, op: &str) -> String {
        self.config.subject(&format!("a2a.{agent}.{op}"))
    }

    /// Sends `body` to `a2a.<agent>.<op>` with the caller's forwarded headers plus `extra`,
    /// and waits up to `timeout`: the reply body, or the problem (the bus's own, or 503 when
    /// no gateway answers, 504 when none answered in time).
    pub async fn call(
        &self,
        agent: &str,
        op: &str,
        http: &HttpHeaders,
        extra: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Problem> {
        let mut h = forwarded_headers(http);
        for (k, v) in extra {
            h.insert(*k, *v);
        }
        let subject = self.subject(agent, op);
        let req = async_nats::Request::new()
            .headers(h)
            .payload(body)
            .timeout(Some(timeout));
        let m = self
            .client
            .send_request(subject, req)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => {
                    Problem::unavailable("no a2a-gateway endpoint answers on the bus")
                }
                RequestErrorKind::TimedOut => Problem::timeout(format!(
                    "the bus did not answer within {} ms",
                    timeout.as_millis()
                )),
                RequestErrorKind::MaxPayloadExceeded => {
                    Problem::too_large(format!("the request is too large for the bus: {e}"))
                }
                _ => Problem::unavailable(format!("bus request failed: {e}")),
            })?;
        match Problem::from_reply(m.headers.as_ref(), &m.payload) {
            Some(p) => Err(p),
            None => Ok(m.payload),
        }
    }
}

/// The headers of [`FORWARDED`] the HTTP request has (a value that is not visible ASCII is
/// left out: the gateway then sees it missing and says so) plus `Content-Type: application/json`.
pub fn forwarded_headers(http: &HttpHeaders) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", "application/json");
    for name in FORWARDED {
        if let Some(v) = http.get(name).and_then(|v| v.to_str().ok()) {
            h.insert(name, v.trim());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_the_protocol_headers() {
        let mut http = HttpHeaders::new();
        http.insert("authorization", "Bearer t".parse().expect("value"));
        http.insert("a2a-version", "1.0".parse().expect("value"));
        http.insert("cookie", "x=1".parse().expect("value"));
        let h = forwarded_headers(&http);
        assert_eq!(h.get("Authorization").map(|v| v.as_str()), Some("Bearer t"));
        assert_eq!(h.get("A2A-Version").map(|v| v.as_str()), Some("1.0"));
        assert!(h.get("cookie").is_none() && h.get("traceparent").is_none());
    }
}
