//! Request and reply encoding: JSON by default, protobuf when the request says
//! `Content-Type: application/protobuf`. The reply uses the request's encoding.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Problem;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON: &str = "application/json";
pub const PROTOBUF: &str = "application/protobuf";

/// A payload encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Json,
    Protobuf,
}

impl Encoding {
    /// The encoding named by a request's headers (JSON when absent or unknown).
    pub fn of(headers: Option<&async_nats::HeaderMap>) -> Self {
        Self::of_content_type(
            headers
                .and_then(|h| h.get(CONTENT_TYPE))
                .map(|v| v.as_str()),
        )
    }

    /// The encoding named by a `Content-Type` value (JSON when absent or unknown).
    pub fn of_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct) if is_protobuf(ct) => Encoding::Protobuf,
            _ => Encoding::Json,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::Protobuf => PROTOBUF,
        }
    }

    /// Decodes a request body. An empty JSON body means `{}`, so `nats req agents.list ''` works.
    pub fn decode<T>(self, body: &[u8]) -> Result<T, Problem>
    where
        T: prost::Message + DeserializeOwned + Default,
    {
        match self {
            Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
            Encoding::Json => serde_json::from_slice(body)
                .map_err(|e| Problem::bad_request(format!("malformed JSON request: {e}"))),
            Encoding::Protobuf => T::decode(body)
                .map_err(|e| Problem::bad_request(format!("malformed protobuf request: {e}"))),
        }
    }

    pub fn encode<T>(self, value: &T) -> Result<Bytes, Problem>
    where
        T: prost::Message + Serialize,
    {
        match self {
            Encoding::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| Problem::internal(format!("could not encode reply: {e}"))),
            Encoding::Protobuf => Ok(Bytes::from(value.encode_to_vec())),
        }
    }
}

fn is_protobuf(ct: &str) -> bool {
    let base = ct.split(';').next().unwrap_or("").trim();
    [
        PROTOBUF,
        "application/x-protobuf",
        "application/vnd.google.protobuf",
    ]
    .iter()
    .any(|p| base.eq_ignore_ascii_case(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::AgentRef;

    #[test]
    fn picks_encoding_from_header() {
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(Encoding::of(Some(&h)), Encoding::Json);
        h.insert(CONTENT_TYPE, "application/protobuf; charset=binary");
        assert_eq!(Encoding::of(Some(&h)), Encoding::Protobuf);
        assert_eq!(Encoding::of(None), Encoding::Json);
    }

    #[test]
    fn both_round_trip() {
        let v = AgentRef {
            agent_id: "a".into(),
        };
        for e in [Encoding::Json, Encoding::Protobuf] {
            let b = e.encode(&v).expect("encode");
            assert_eq!(e.decode::<AgentRef>(&b).expect("decode"), v);
        }
        assert_eq!(
            Encoding::Json.decode::<AgentRef>(b"").expect("empty"),
            AgentRef::default()
        );
        let err = Encoding::Json
            .decode::<AgentRef>(b"{nope")
            .expect_err("bad");
        assert_eq!(err.status, 400);
    }
}
