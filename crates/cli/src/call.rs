//! `tether call SUBJECT [JSON]`: one request, the reply printed; a service error printed as
//! its problem with exit code 1.

use std::time::Duration;

use bytes::Bytes;
use tether_bus::Problem;

use crate::{CliError, EXIT_NO_ANSWER, EXIT_SERVICE_ERROR};

/// What to send.
pub struct CallArgs {
    pub subject: String,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub token: Option<String>,
    pub timeout: Duration,
    pub prefix: Option<String>,
    /// Send protobuf: the JSON body is encoded as this message type.
    pub proto: Option<String>,
    /// Decode a protobuf reply as this message type (default: the request type's usual reply).
    pub reply_type: Option<String>,
}

/// The reply as the CLI prints it.
pub struct CallOutput {
    pub stdout: String,
}

/// The subject for a path, with an optional deployment prefix.
pub fn subject_of(path: &str, prefix: Option<&str>) -> String {
    let s = tether_bus::subject::normalize(path);
    match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}.{s}"),
        None => s,
    }
}

macro_rules! proto_types {
    ($($name:ident),* $(,)?) => {
        /// JSON → protobuf bytes for a named message type.
        pub fn json_to_proto(type_name: &str, json: &str) -> Result<Vec<u8>, String> {
            match type_name {
                $(stringify!($name) => {
                    let v: tether_proto::$name = serde_json::from_str(json).map_err(|e| format!("body is not a valid {}: {e}", type_name))?;
                    Ok(prost::Message::encode_to_vec(&v))
                })*
                _ => Err(format!("unknown message type `{type_name}`; known: {}", [$(stringify!($name)),*].join(", "))),
            }
        }

        /// Protobuf bytes → pretty JSON for a named message type.
        pub fn proto_to_json(type_name: &str, bytes: &[u8]) -> Result<String, String> {
            match type_name {
                $(stringify!($name) => {
                    let v: tether_proto::$name = prost::Message::decode(bytes).map_err(|e| format!("reply is not a valid {}: {e}", type_name))?;
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
                })*
                _ => Err(format!("unknown message type `{type_name}`")),
            }
        }
    };
}

proto_types!(
    Empty,
    EchoRequest,
    EchoReply,
    RegisterAgentRequest,
    Agent,
    AgentRef,
    ListAgentsRequest,
    AgentList,
    RevokeRequest,
    RevokeResponse,
    IssueTokenRequest,
    IssuedToken,
    KeySet,
);

/// The usual reply type of a request type, for `--proto` without `--reply-type`.
fn default_reply_type(request_type: &str) -> Option<&'static str> {
    Some(match request_type {
        "EchoRequest" => "EchoReply",
        "RegisterAgentRequest" | "AgentRef" => "Agent",
        "ListAgentsRequest" => "AgentList",
        "RevokeRequest" => "RevokeResponse",
        "IssueTokenRequest" => "IssuedToken",
        "Empty" => "KeySet",
        _ => return None,
    })
}

/// Sends the request and renders the reply.
pub async fn call(client: &async_nats::Client, a: &CallArgs) -> Result<CallOutput, CliError> {
    let subject = subject_of(&a.subject, a.prefix.as_deref());
    if !tether_bus::subject::is_valid_publish_subject(&subject) {
        return Err(CliError::new(
            2,
            format!("not a subject to call: {:?}", a.subject),
        ));
    }
    let mut headers = async_nats::HeaderMap::new();
    let payload: Bytes = match &a.proto {
        Some(t) => {
            headers.insert("Content-Type", "application/protobuf");
            Bytes::from(json_to_proto(t, &a.body).map_err(|e| CliError::new(2, e))?)
        }
        None => {
            if !a.body.trim().is_empty() {
                serde_json::from_str::<serde_json::Value>(&a.body)
                    .map_err(|e| CliError::new(2, format!("the request body is not JSON: {e}")))?;
            }
            headers.insert("Content-Type", "application/json");
            Bytes::from(a.body.clone())
        }
    };
    if let Some(t) = a.token.as_deref().filter(|t| !t.is_empty()) {
        headers.insert("Authorization", format!("Bearer {t}").as_str());
    }
    // A2A requests name their protocol version; `tether call` speaks the one tether serves.
    if subject.split('.').any(|t| t == "a2a")
        && !a
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("A2A-Version"))
    {
        headers.insert("A2A-Version", "1.0");
    }
    for (k, v) in &a.headers {
        headers.insert(k.as_str(), v.as_str());
    }
    let req = async_nats::Request::new().headers(headers).payload(payload);
    let reply = tether_bus::connect::request(client, subject.clone(), req, a.timeout)
        .await
        .map_err(|e| {
            use tether_bus::connect::RequestFailure as F;
            CliError::new(
                EXIT_NO_ANSWER,
                match e {
                    F::NoResponders => format!("no node serves {subject}"),
                    F::TimedOut(t) => format!("no reply from {subject} within {t:?}"),
                    F::ConnectionLost => format!("request to {subject}: {e}"),
                    F::Other(e) => format!("request to {subject} failed: {e}"),
                },
            )
        })?;
    if let Some(p) = Problem::from_reply(reply.headers.as_ref(), &reply.payload) {
        return Err(CliError::new(
            EXIT_SERVICE_ERROR,
            format!("{} {}: {}", p.status, p.title, p.detail),
        ));
    }
    let is_proto = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .is_some_and(|v| v.as_str().starts_with("application/protobuf"));
    let stdout = if is_proto {
        let t = a
            .reply_type
            .as_deref()
            .or_else(|| a.proto.as_deref().and_then(default_reply_type));
        match t {
            Some(t) => proto_to_json(t, &reply.payload)
                .map_err(|e| CliError::new(EXIT_SERVICE_ERROR, e))?,
            None => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&reply.payload)
            }
        }
    } else {
        match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&reply.payload).into_owned(),
        }
    };
    Ok(CallOutput { stdout })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert_eq!(subject_of("/containers/create", None), "containers.create");
        assert_eq!(
            subject_of("containers.create", Some("prod")),
            "prod.containers.create"
        );
    }

    #[test]
    fn proto_round_trip() {
        let b = json_to_proto("AgentRef", r#"{"agent_id":"a1"}"#).expect("encode");
        assert!(
            proto_to_json("AgentRef", &b)
                .expect("decode")
                .contains("a1")
        );
        assert!(
            json_to_proto("Nope", "{}")
                .expect_err("unknown")
                .contains("known:")
        );
        assert!(json_to_proto("AgentRef", r#"{"x":1}"#).is_err());
    }
}
