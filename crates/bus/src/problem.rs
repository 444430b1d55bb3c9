//! The error model: every error a caller can see is a [`Problem`] with one HTTP-style status.
//!
//! On the wire an error reply carries the NATS micro headers `Nats-Service-Error` (the title)
//! and `Nats-Service-Error-Code` (the status), plus an RFC 9457 Problem+JSON body — always
//! JSON, whatever the request's encoding, so `nats req` users can read it.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

/// Header carrying the error description (NATS micro protocol).
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Header carrying the numeric error code (NATS micro protocol).
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// Media type of an error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// A caller-visible failure: status, a short title, a human detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub title: String,
    pub detail: String,
    /// RFC 9457 extension members, added to the body beside the standard ones (e.g. the
    /// A2A gateway's `a2aError` and `a2aCode`); empty for most problems.
    pub extensions: BTreeMap<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: u16, detail: impl Into<String>) -> Self {
        Self {
            status,
            title: title_of(status).to_string(),
            detail: detail.into(),
            extensions: BTreeMap::new(),
        }
    }

    /// Adds an extension member to the body (a standard member's name is ignored).
    pub fn with_extension(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        if !STANDARD_MEMBERS.contains(&name) {
            self.extensions.insert(name.to_string(), value.into());
        }
        self
    }
    pub fn bad_request(d: impl Into<String>) -> Self {
        Self::new(400, d)
    }
    pub fn unauthorized(d: impl Into<String>) -> Self {
        Self::new(401, d)
    }
    pub fn forbidden(d: impl Into<String>) -> Self {
        Self::new(403, d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(404, d)
    }
    pub fn conflict(d: impl Into<String>) -> Self {
        Self::new(409, d)
    }
    pub fn too_large(d: impl Into<String>) -> Self {
        Self::new(413, d)
    }
    pub fn unprocessable(d: impl Into<String>) -> Self {
        Self::new(422, d)
    }
    pub fn too_many(d: impl Into<String>) -> Self {
        Self::new(429, d)
    }
    pub fn internal(d: impl Into<String>) -> Self {
        Self::new(500, d)
    }
    pub fn unavailable(d: impl Into<String>) -> Self {
        Self::new(503, d)
    }
    pub fn timeout(d: impl Into<String>) -> Self {
        Self::new(504, d)
    }

    /// The `type` URI of the problem document.
    pub fn type_uri(&self) -> String {
        format!("https://tether.dev/problems/{}", slug(self.status))
    }

    /// The wire form.
    pub fn to_proto(&self, instance: &str) -> tether_proto::Problem {
        tether_proto::Problem {
            r#type: self.type_uri(),
            title: self.title.clone(),
            status: u32::from(self.status),
            detail: self.detail.clone(),
            instance: instance.to_string(),
        }
    }

    /// The Problem+JSON body.
    pub fn to_body(&self, instance: &str) -> Bytes {
        // Serializing a struct of strings and an integer cannot fail.
        let proto = self.to_proto(instance);
        if self.extensions.is_empty() {
            return serde_json::to_vec(&proto)
                .map(Bytes::from)
                .unwrap_or_default();
        }
        let mut doc = match serde_json::to_value(&proto) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for (k, v) in &self.extensions {
            doc.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&doc)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// Reads a problem back from an error reply (headers and body), as a client does.
    pub fn from_reply(headers: Option<&async_nats::HeaderMap>, body: &[u8]) -> Option<Problem> {
        let code = headers?
            .get(SERVICE_ERROR_CODE)?
            .as_str()
            .parse::<u16>()
            .ok()?;
        let title = headers
            .and_then(|h| h.get(SERVICE_ERROR))
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| title_of(code).to_string());
        let doc = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body).ok();
        let detail = match &doc {
            Some(d) => d
                .get("detail")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            None => String::from_utf8_lossy(body).into_owned(),
        };
        let extensions = doc
            .into_iter()
            .flatten()
            .filter(|(k, _)| !STANDARD_MEMBERS.contains(&k.as_str()))
            .collect();
        Some(Problem {
            status: code,
            title,
            detail,
            extensions,
        })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.title, self.detail)
    }
}

impl std::error::Error for Problem {}

/// The members RFC 9457 defines (never overwritten by an extension).
const STANDARD_MEMBERS: &[&str] = &["type", "title", "status", "detail", "instance"];

/// Short, stable titles per status.
pub fn title_of(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        s if s < 500 => "Client Error",
        _ => "Server Error",
    }
}

fn slug(status: u16) -> String {
    title_of(status).to_ascii_lowercase().replace(' ', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_problem_json() {
        let p = Problem::not_found("no such agent: a1");
        let v: serde_json::Value = serde_json::from_slice(&p.to_body("agents.get")).expect("json");
        assert_eq!(v["status"], 404);
        assert_eq!(v["title"], "Not Found");
        assert_eq!(v["detail"], "no such agent: a1");
        assert_eq!(v["type"], "https://tether.dev/problems/not-found");
        assert_eq!(v["instance"], "agents.get");
    }

    #[test]
    fn reads_back_from_reply() {
        let p = Problem::conflict("x");
        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR, p.title.as_str());
        h.insert(SERVICE_ERROR_CODE, "409");
        assert_eq!(Problem::from_reply(Some(&h), &p.to_body("s")), Some(p));
        assert_eq!(Problem::from_reply(None, b"{}"), None);
    }

    #[test]
    fn extensions_travel_in_the_body() {
        let p = Problem::not_found("no task t1")
            .with_extension("a2aError", "TaskNotFound")
            .with_extension("a2aCode", -32001)
            .with_extension("status", 200);
        let v: serde_json::Value = serde_json::from_slice(&p.to_body("a2a.x.get")).expect("json");
        assert_eq!(v["status"], 404, "a standard member is never overwritten");
        assert_eq!(v["a2aError"], "TaskNotFound");
        assert_eq!(v["a2aCode"], -32001);
        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR, p.title.as_str());
        h.insert(SERVICE_ERROR_CODE, "404");
        assert_eq!(Problem::from_reply(Some(&h), &p.to_body("s")), Some(p));
    }
}
