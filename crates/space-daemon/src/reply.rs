//! The messages of one exec's reply stream (the pattern is described in `proto/daemon.proto`):
//! `started`, chunks, `exit`, or an error instead of `started`. Every message carries
//! `Tether-Seq` and `Tether-Stream`; this module is the one writer of them, and
//! [`crate::client`] the one reader.

use async_nats::HeaderMap;
use bytes::Bytes;

/// Header: the message's place in the exec's stream, 0, 1, 2, ... without gaps.
pub const SEQ: &str = "Tether-Seq";
/// Header: what the message is — [`STARTED`], [`STDOUT`], [`STDERR`], [`EXIT`], [`ERROR`].
pub const STREAM: &str = "Tether-Stream";
pub const STARTED: &str = "started";
pub const STDOUT: &str = "stdout";
pub const STDERR: &str = "stderr";
pub const EXIT: &str = "exit";
pub const ERROR: &str = "error";
/// NATS micro error headers, as every tether node answers errors.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// A request refused before anything ran: one status, one human detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub detail: String,
}

impl Refusal {
    pub fn new(status: u16, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }
    pub fn bad_request(d: impl Into<String>) -> Self {
        Self::new(400, d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(404, d)
    }

    /// The spawn's own failure: a missing program is 404, a forbidden one 403, else 500.
    pub fn from_spawn(program: &str, e: &std::io::Error) -> Self {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound => 404,
            std::io::ErrorKind::PermissionDenied => 403,
            _ => 500,
        };
        Self::new(status, format!("cannot run {program:?}: {e}"))
    }

    /// The error message: micro headers and a Problem+JSON body.
    pub fn message(&self) -> (HeaderMap, Bytes) {
        let title = title_of(self.status);
        let mut h = headers(0, ERROR);
        h.insert(SERVICE_ERROR_CODE, self.status.to_string().as_str());
        h.insert(SERVICE_ERROR, title);
        h.insert("Content-Type", "application/problem+json");
        let problem = tether_proto::Problem {
            r#type: format!(
                "https://tether.dev/problems/{}",
                title.to_ascii_lowercase().replace(' ', "-")
            ),
            title: title.to_string(),
            status: u32::from(self.status),
            detail: self.detail.clone(),
            instance: String::new(),
        };
        // A struct of strings and an integer always serializes.
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        (h, Bytes::from(body))
    }
}

/// The titles of the statuses the daemon answers (the bus's `Problem` uses the same).
fn title_of(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// The headers of message `seq` of kind `stream`.
pub fn headers(seq: u32, stream: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(SEQ, seq.to_string().as_str());
    h.insert(STREAM, stream);
    h
}

/// A JSON body of a wire message (`started`, `exit`).
pub fn json<T: serde::Serialize>(msg: &T) -> Bytes {
    // The wire types are plain structs of numbers and strings: serializing cannot fail.
    Bytes::from(serde_json::to_vec(msg).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_a_micro_error_with_a_problem_body() {
        let (h, body) = Refusal::bad_request("argv[0] is empty").message();
        assert_eq!(h.get(SERVICE_ERROR_CODE).map(|v| v.as_str()), Some("400"));
        assert_eq!(h.get(STREAM).map(|v| v.as_str()), Some(ERROR));
        assert_eq!(h.get(SEQ).map(|v| v.as_str()), Some("0"));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["status"], 400);
        assert_eq!(v["detail"], "argv[0] is empty");
        assert_eq!(v["type"], "https://tether.dev/problems/bad-request");
    }
}
