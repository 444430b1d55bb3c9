//! Streaming calls (SendStreamingMessage, SubscribeToTask): the bus's ordered chunks
//! relayed as Server-Sent Events, each `data:` one whole JSON-RPC response carrying one A2A
//! `StreamResponse`, the way the A2A JSON-RPC binding (§9.4.2) and the official SDKs frame it.
//!
//! Design decision: the bridge subscribes to a fresh subject of its own inbox BEFORE it sends
//! the bus request (same connection, so the server has the subscription before the gateway
//! can publish), and only answers `text/event-stream` once the gateway accepted the call: a
//! refusal is one ordinary JSON-RPC error, not a stream. The request's reply (the task as
//! submitted) is not relayed; the first chunk repeats it. A gap in `Tether-Stream-Seq` ends
//! the stream with an error event rather than relaying a stream with holes.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::{Message, Subscriber};
use axum::http::HeaderMap as HttpHeaders;
use axum::response::sse::Event;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};
use tether_bus::Problem;

use super::forward::Bus;
use super::jsonrpc::{self, RpcError};
use crate::error::A2aError;

pub const STREAM_SUBJECT: &str = "Tether-Stream-Subject";
pub const STREAM: &str = "Tether-Stream";
pub const STREAM_SEQ: &str = "Tether-Stream-Seq";

/// Opens a streaming call: subscribe, send, then the SSE events (or the refusal).
#[allow(clippy::too_many_arguments)]
pub async fn open(
    bus: &Bus,
    agent: &str,
    op: &str,
    http: &HttpHeaders,
    body: Bytes,
    id: serde_json::Value,
    timeout: Duration,
    idle: Duration,
) -> Result<impl Stream<Item = Result<Event, Infallible>> + Send + 'static, RpcError> {
    let inbox = bus.client.new_inbox();
    let sub = bus.client.subscribe(inbox.clone()).await.map_err(|e| {
        RpcError::from_problem(
            id.clone(),
            A2aError::Internal.problem(format!("cannot subscribe to a stream subject: {e}")),
        )
    })?;
    bus.call(
        agent,
        op,
        http,
        &[(STREAM_SUBJECT, inbox.as_str())],
        body,
        timeout,
    )
    .await
    .map_err(|p| RpcError::from_problem(id.clone(), p))?;
    Ok(relay(sub, id, idle))
}

struct State {
    sub: Subscriber,
    id: Value,
    expected: u64,
    idle: Duration,
    done: bool,
}

fn relay(
    sub: Subscriber,
    id: Value,
    idle: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let st = State {
        sub,
        id,
        expected: 1,
        idle,
        done: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let step = match tokio::time::timeout(st.idle, st.sub.next()).await {
            Ok(Some(m)) => classify(&m, st.expected),
            Ok(None) => Step::Broken("the stream's bus subscription closed".into()),
            Err(_) => Step::Broken(format!(
                "no stream chunk for {} ms; resume with SubscribeToTask",
                st.idle.as_millis()
            )),
        };
        let event = match step {
            Step::Event(v) => {
                st.expected += 1;
                data_event(&jsonrpc::result(&st.id, v))
            }
            Step::End => return None,
            Step::Error(p) => {
                st.done = true;
                error_event(RpcError::from_problem(st.id.clone(), p))
            }
            Step::Broken(why) => {
                st.done = true;
                error_event(RpcError::from_problem(
                    st.id.clone(),
                    A2aError::Internal.problem(why),
                ))
            }
        };
        Some((Ok(event), st))
    })
}

/// `Event::data` refuses a carriage return; compact serde_json output never has a raw one
/// (they are escaped inside strings).
fn data_event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// An error as the official SDKs expect it in a stream: `event: error` with a JSON-RPC
/// error response as its data.
fn error_event(e: RpcError) -> Event {
    Event::default()
        .event("error")
        .data(e.to_json("").to_string())
}

/// What one chunk of the bus stream means.
#[derive(Debug, PartialEq)]
enum Step {
    /// A StreamResponse to relay.
    Event(Value),
    End,
    /// The gateway's own error chunk.
    Error(Problem),
    /// The stream cannot be trusted any more (gap, garbage, silence).
    Broken(String),
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref()?.get(name).map(|v| v.as_str())
}

fn classify(m: &Message, expected: u64) -> Step {
    let kind = header(m, STREAM).unwrap_or_default();
    let seq = header(m, STREAM_SEQ).map(|s| s.trim().parse::<u64>().ok());
    let in_order = match (kind, seq) {
        ("event", Some(Some(n))) => n == expected,
        ("event", _) => false,
        // The final chunk's sequence number is checked when it has one.
        (_, Some(Some(n))) => n == expected,
        (_, Some(None)) => false,
        (_, None) => true,
    };
    if !in_order {
        let got = header(m, STREAM_SEQ).unwrap_or("none");
        return Step::Broken(format!(
            "stream chunk {expected} is missing (got sequence number {got}); resume with SubscribeToTask"
        ));
    }
    match kind {
        "event" => match serde_json::from_slice::<Value>(&m.payload) {
            Ok(v @ Value::Object(_)) => Step::Event(v),
            _ => Step::Broken(format!(
                "stream chunk {expected} is not an A2A StreamResponse"
            )),
        },
        "end" => Step::End,
        "error" => Step::Error(problem_of_chunk(m)),
        other => Step::Broken(format!("unknown stream chunk kind {other:?}")),
    }
}

/// The problem an error chunk carries: from the micro error headers when it has them, else
/// from its Problem+JSON body alone.
fn problem_of_chunk(m: &Message) -> Problem {
    if let Some(p) = Problem::from_reply(m.headers.as_ref(), &m.payload) {
        return p;
    }
    let doc = serde_json::from_slice::<Map<String, Value>>(&m.payload).unwrap_or_default();
    let status = doc
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..600).contains(s))
        .unwrap_or(500);
    let detail = doc
        .get("detail")
        .and_then(Value::as_str)
        .unwrap_or("the stream failed");
    doc.iter().fold(Problem::new(status, detail), |p, (k, v)| {
        p.with_extension(k, v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;

    fn chunk(kind: &str, seq: Option<&str>, body: &str) -> Message {
        let mut h = HeaderMap::new();
        h.insert(STREAM, kind);
        if let Some(s) = seq {
            h.insert(STREAM_SEQ, s);
        }
        Message {
            subject: "x".into(),
            reply: None,
            payload: Bytes::from(body.to_string()),
            headers: Some(h),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn chunks_in_order_are_relayed() {
        assert_eq!(
            classify(&chunk("event", Some("1"), r#"{"task":{}}"#), 1),
            Step::Event(serde_json::json!({"task": {}}))
        );
        assert_eq!(classify(&chunk("end", Some("3"), ""), 3), Step::End);
        assert_eq!(classify(&chunk("end", None, ""), 3), Step::End);
    }

    #[test]
    fn gaps_and_garbage_break_the_stream() {
        for m in [
            chunk("event", Some("3"), "{}"),
            chunk("event", None, "{}"),
            chunk("event", Some("x"), "{}"),
            chunk("end", Some("5"), ""),
            chunk("event", Some("2"), "not json"),
            chunk("stdout", Some("2"), "{}"),
        ] {
            assert!(matches!(classify(&m, 2), Step::Broken(_)), "{m:?}");
        }
    }

    #[test]
    fn error_chunks_name_the_a2a_error() {
        let body = r#"{"type":"t","title":"Not Found","status":404,"detail":"gone","a2aError":"TaskNotFound","a2aCode":-32001}"#;
        let Step::Error(p) = classify(&chunk("error", Some("2"), body), 2) else {
            panic!("an error step");
        };
        assert_eq!((p.status, p.detail.as_str()), (404, "gone"));
        assert_eq!(A2aError::of(&p).0, -32001);
        let Step::Error(p) = classify(&chunk("error", None, "???"), 2) else {
            panic!("an error step");
        };
        assert_eq!(p.status, 500);
    }
}
