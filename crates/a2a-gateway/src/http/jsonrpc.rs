//! JSON-RPC 2.0 framing of A2A's JSON-RPC binding: reading a request object, naming its
//! method's bus operation, and writing responses and errors.
//!
//! Design decision: an error's `data` follows the A2A 1.0 binding (§9.5: an array of
//! ProtoJSON `Any` objects): a `google.rpc.ErrorInfo` with the A2A reason first (what the
//! official SDKs read), then the tether problem document as a `google.protobuf.Struct`, so
//! nothing the bus said is lost.

use serde_json::{Map, Value, json};
use tether_bus::Problem;

use crate::error::A2aError;

const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const STRUCT_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";
const A2A_DOMAIN: &str = "a2a-protocol.org";

/// What a JSON-RPC method asks of the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Forwarded to `a2a.<agent>.<op>`, one reply.
    Unary(&'static str),
    /// Forwarded to `a2a.<agent>.<op>` with a stream subject; answered with SSE.
    Streaming(&'static str),
    /// Answered by the bridge itself with this error.
    Refused(A2aError),
    Unknown,
}

impl Method {
    pub fn of(name: &str) -> Method {
        use a2a::jsonrpc::methods as m;
        match name {
            m::SEND_MESSAGE => Method::Unary("send"),
            m::GET_TASK => Method::Unary("get"),
            m::LIST_TASKS => Method::Unary("list"),
            m::CANCEL_TASK => Method::Unary("cancel"),
            m::SEND_STREAMING_MESSAGE => Method::Streaming("stream"),
            m::SUBSCRIBE_TO_TASK => Method::Streaming("subscribe"),
            m::GET_EXTENDED_AGENT_CARD => Method::Refused(A2aError::ExtendedAgentCardNotConfigured),
            m::CREATE_PUSH_CONFIG
            | m::GET_PUSH_CONFIG
            | m::LIST_PUSH_CONFIGS
            | m::DELETE_PUSH_CONFIG => Method::Refused(A2aError::PushNotificationNotSupported),
            _ => Method::Unknown,
        }
    }
}

/// A well-formed JSON-RPC request (its `params` an object, `{}` when absent).
#[derive(Debug)]
pub struct RpcRequest {
    pub id: Value,
    pub method: String,
    pub params: Map<String, Value>,
}

/// A JSON-RPC error before it is framed: code, message, the problem it stands for.
#[derive(Debug)]
pub struct RpcError {
    pub id: Value,
    pub code: i32,
    pub problem: Problem,
}

impl RpcError {
    /// An error the bridge itself decides (`error` names code and status).
    pub fn local(id: Value, error: A2aError, detail: impl Into<String>) -> Self {
        Self::from_problem(id, error.problem(detail))
    }

    /// The JSON-RPC form of a bus problem (code from its `a2aCode`, else from its status).
    pub fn from_problem(id: Value, problem: Problem) -> Self {
        let (code, _) = A2aError::of(&problem);
        Self { id, code, problem }
    }

    /// `{"jsonrpc":"2.0","id":…,"error":{code, message, data}}`.
    pub fn to_json(&self, instance: &str) -> Value {
        let p = &self.problem;
        let doc: Value = serde_json::from_slice(&p.to_body(instance)).unwrap_or(Value::Null);
        let message = if p.detail.is_empty() {
            p.title.clone()
        } else {
            p.detail.clone()
        };
        json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": {
                "code": self.code,
                "message": message,
                "data": [
                    {
                        "@type": ERROR_INFO_TYPE,
                        "reason": a2a::error_reason(self.code),
                        "domain": A2A_DOMAIN,
                        "metadata": {
                            "status": p.status.to_string(),
                            "title": p.title,
                        },
                    },
                    { "@type": STRUCT_TYPE, "value": doc },
                ],
            },
        })
    }
}

/// `{"jsonrpc":"2.0","id":…,"result":…}`.
pub fn result(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// Reads a request body: malformed JSON → ParseError, anything but a request object
/// (a batch, a wrong `jsonrpc`, a bad id or method) → InvalidRequest, `params` not an object
/// → InvalidParams. The id is kept for the error whenever it could be read.
pub fn parse(body: &[u8]) -> Result<RpcRequest, RpcError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        RpcError::local(
            Value::Null,
            A2aError::ParseError,
            format!("invalid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = v else {
        let what = if v.is_array() {
            "batch requests are not supported"
        } else {
            "the body must be a JSON-RPC 2.0 request object"
        };
        return Err(RpcError::local(Value::Null, A2aError::InvalidRequest, what));
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => Value::Null,
        Some(id @ (Value::String(_) | Value::Number(_))) => id,
        Some(_) => {
            return Err(RpcError::local(
                Value::Null,
                A2aError::InvalidRequest,
                "`id` must be a string, a number or null",
            ));
        }
    };
    let invalid = |id: &Value, d: &str| RpcError::local(id.clone(), A2aError::InvalidRequest, d);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(&id, "`jsonrpc` must be exactly \"2.0\""));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => return Err(invalid(&id, "`method` must be a non-empty string")),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(RpcError::local(
                id,
                A2aError::InvalidParams,
                "`params` must be an object",
            ));
        }
    };
    Ok(RpcRequest { id, method, params })
}

/// The caller's deadline for a blocking send, from an HTTP `Tether-Timeout-Ms` header
/// (A2A 1.0's SendMessageConfiguration has no deadline field): a positive integer, capped
/// at `max_ms`; anything else is InvalidParams.
pub fn timeout_ms(header: Option<&str>, max_ms: u64) -> Result<Option<u64>, String> {
    let Some(h) = header else { return Ok(None) };
    match h.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(n.min(max_ms))),
        _ => Err(format!(
            "Tether-Timeout-Ms {h:?} must be a positive number of milliseconds"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let r = parse(br#"{"jsonrpc":"2.0","id":7,"method":"GetTask","params":{"id":"t"}}"#)
            .expect("valid");
        assert_eq!((r.id, r.method.as_str()), (json!(7), "GetTask"));
        assert_eq!(parse(b"{").expect_err("bad json").code, -32700);
        assert_eq!(parse(b"[1]").expect_err("batch").code, -32600);
        assert_eq!(parse(b"42").expect_err("number").code, -32600);
        let e = parse(br#"{"jsonrpc":"1.0","id":"x","method":"GetTask"}"#).expect_err("v1");
        assert_eq!((e.code, e.id), (-32600, json!("x")));
        let e = parse(br#"{"jsonrpc":"2.0","id":{},"method":"GetTask"}"#).expect_err("id");
        assert_eq!((e.code, e.id), (-32600, Value::Null));
        let e = parse(br#"{"jsonrpc":"2.0","id":1,"method":"GetTask","params":[1]}"#)
            .expect_err("params");
        assert_eq!(e.code, -32602);
        let ok = parse(br#"{"jsonrpc":"2.0","id":1,"method":"GetExtendedAgentCard"}"#)
            .expect("no params");
        assert!(ok.params.is_empty());
    }

    #[test]
    fn methods_map_to_operations() {
        assert_eq!(Method::of("SendMessage"), Method::Unary("send"));
        assert_eq!(
            Method::of("SendStreamingMessage"),
            Method::Streaming("stream")
        );
        assert_eq!(
            Method::of("SubscribeToTask"),
            Method::Streaming("subscribe")
        );
        assert_eq!(
            Method::of("ListTaskPushNotificationConfigs"),
            Method::Refused(A2aError::PushNotificationNotSupported)
        );
        assert_eq!(Method::of("message/send"), Method::Unknown);
    }

    #[test]
    fn errors_carry_error_info_and_the_problem() {
        let e = RpcError::from_problem(json!(1), crate::error::not_found("t1"));
        let v = e.to_json("/a2a/x");
        assert_eq!(v["error"]["code"], -32001);
        assert_eq!(v["error"]["data"][0]["reason"], "TASK_NOT_FOUND");
        assert_eq!(v["error"]["data"][1]["value"]["a2aError"], "TaskNotFound");
        assert_eq!(v["error"]["data"][1]["value"]["status"], 404);
    }

    #[test]
    fn timeouts_are_checked() {
        assert_eq!(timeout_ms(None, 10), Ok(None));
        assert_eq!(timeout_ms(Some("5"), 10), Ok(Some(5)));
        assert_eq!(timeout_ms(Some("50"), 10), Ok(Some(10)));
        assert!(timeout_ms(Some("0"), 10).is_err());
        assert!(timeout_ms(Some("x"), 10).is_err());
    }
}
