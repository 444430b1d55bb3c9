//! Agent cards: what a worker publishes about its agent when it starts (and again every
//! 30 s, which is how the gateway knows a worker is alive), kept in the cards bucket, and
//! served with the gateway's own facts filled in — where to reach the agent
//! (`supportedInterfaces`: the HTTP bridge's JSON-RPC URL and the NATS binding), that it
//! streams and has no push notifications, and that it wants a bearer JWT.
//!
//! The NATS binding is named by the URI [`NATS_BINDING`]; its `url` is
//! `nats:<subject prefix>a2a.<agent>` — the subjects `a2a.<agent>.<op>` of DESIGN.md.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use a2a::{AgentCard, AgentInterface, HttpAuthSecurityScheme, SecurityRequirement, SecurityScheme};
use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tether_bus::kv::{Bucket, Record};
use tether_bus::{Encoding, Problem};

use crate::config::A2aConfig;
use crate::error::A2aError;

/// The protocol binding URI of A2A over tether's NATS subjects.
pub const NATS_BINDING: &str = "https://tether.dev/a2a/bindings/nats/v1";
/// The name of the bearer scheme in served cards.
pub const BEARER: &str = "bearer";

/// A card as stored: the worker's card and when it was last published.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCard {
    pub card: Value,
    pub updated_ms: i64,
}

impl Record for StoredCard {}

pub struct Cards {
    bucket: Bucket<StoredCard>,
    fresh: Duration,
    /// Agents seen with a card lately, and when: a send need not read the card each time.
    known: Mutex<HashMap<String, Instant>>,
}

/// How long a card seen stays known without reading it again (cards are only replaced,
/// never deleted before their retention ends).
const KNOWN_FOR: Duration = Duration::from_secs(10);

impl Cards {
    pub async fn open(js: &jetstream::Context, cfg: &A2aConfig) -> anyhow::Result<Self> {
        let bucket = Bucket::open(
            js,
            cfg.bucket(&cfg.a2a_cards_bucket, "A2A agent cards (a2a-gateway)"),
            Encoding::Json,
        )
        .await?
        .named("A2A agent cards")
        .timeout(Duration::from_secs(10));
        Ok(Self {
            bucket,
            fresh: Duration::from_secs(cfg.a2a_card_fresh_seconds),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Stores a worker's card for `agent` (checked: it must read as an A2A AgentCard).
    pub async fn publish(&self, agent: &str, body: &[u8]) -> Result<(), Problem> {
        let card = check_card(body)?;
        self.bucket
            .put(
                agent,
                &StoredCard {
                    card,
                    updated_ms: chrono::Utc::now().timestamp_millis(),
                },
            )
            .await?;
        Ok(())
    }

    /// Whether the agent has a card (a positive answer is remembered for a few seconds).
    pub async fn known(&self, agent: &str) -> Result<bool, Problem> {
        let seen = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .is_some_and(|t| t.elapsed() < KNOWN_FOR);
        if seen {
            return Ok(true);
        }
        let found = self.get(agent).await?.is_some();
        if found {
            let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if k.len() > 4096 {
                k.clear();
            }
            k.insert(agent.to_string(), Instant::now());
        }
        Ok(found)
    }

    pub async fn get(&self, agent: &str) -> Result<Option<StoredCard>, Problem> {
        Ok(self.bucket.get(agent).await?.map(|(c, _)| c))
    }

    /// Whether a worker re-published the card recently.
    pub fn is_live(&self, c: &StoredCard) -> bool {
        let age = chrono::Utc::now().timestamp_millis() - c.updated_ms;
        u128::try_from(age.max(0)).unwrap_or(0) <= self.fresh.as_millis()
    }

    /// Every stored card, by agent.
    pub async fn all(&self) -> Result<Vec<(String, StoredCard)>, Problem> {
        let mut out = Vec::new();
        for k in self.bucket.keys().await? {
            if let Some(c) = self.get(&k).await? {
                out.push((k, c));
            }
        }
        Ok(out)
    }
}

/// Reads a published card: JSON, an object, a name; the fields the gateway fills in may be
/// missing (workers need not know where they are reached).
pub fn check_card(body: &[u8]) -> Result<Value, Problem> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| A2aError::ParseError.problem(format!("the card is not JSON: {e}")))?;
    let Some(o) = v.as_object_mut() else {
        return Err(A2aError::InvalidParams.problem("the card must be a JSON object"));
    };
    o.entry("supportedInterfaces")
        .or_insert(Value::Array(vec![]));
    o.entry("capabilities")
        .or_insert(Value::Object(Default::default()));
    o.entry("version").or_insert(Value::String("0.0.0".into()));
    let card: AgentCard = serde_json::from_value(v.clone())
        .map_err(|e| A2aError::InvalidParams.problem(format!("not an A2A AgentCard: {e}")))?;
    if card.name.trim().is_empty() {
        return Err(A2aError::InvalidParams.problem("the card needs a name"));
    }
    Ok(v)
}

/// The card as served: the gateway's facts over the worker's.
pub fn serve(
    stored: &Value,
    agent: &str,
    bridge_url: Option<&str>,
    subject_prefix: &str,
) -> Result<AgentCard, Problem> {
    let mut card: AgentCard = serde_json::from_value(stored.clone())
        .map_err(|e| Problem::internal(format!("stored card of {agent} is unreadable: {e}")))?;
    let mut interfaces = Vec::new();
    if let Some(base) = bridge_url {
        interfaces.push(interface(&format!("{base}/a2a/{agent}"), "JSONRPC")?);
    }
    interfaces.push(interface(
        &format!("nats:{subject_prefix}a2a.{agent}"),
        NATS_BINDING,
    )?);
    card.supported_interfaces = interfaces;
    card.capabilities.streaming = Some(true);
    card.capabilities.push_notifications = Some(false);
    card.capabilities.extended_agent_card = Some(false);
    let mut schemes = HashMap::new();
    schemes.insert(
        BEARER.to_string(),
        SecurityScheme::HttpAuth(HttpAuthSecurityScheme {
            scheme: "bearer".into(),
            description: Some("a tether token (Ed25519 JWT) with scope a2a:call".into()),
            bearer_format: Some("JWT".into()),
        }),
    );
    card.security_schemes = Some(schemes);
    card.security_requirements = Some(vec![bearer_requirement()?]);
    Ok(card)
}

fn interface(url: &str, binding: &str) -> Result<AgentInterface, Problem> {
    serde_json::from_value(serde_json::json!({
        "url": url,
        "protocolBinding": binding,
        "protocolVersion": "1.0",
    }))
    .map_err(|e| Problem::internal(format!("cannot describe the interface {url}: {e}")))
}

fn bearer_requirement() -> Result<SecurityRequirement, Problem> {
    serde_json::from_value(serde_json::json!({ "schemes": { BEARER: { "list": [] } } }))
        .or_else(|_| serde_json::from_value(serde_json::json!({ BEARER: [] })))
        .map_err(|e| Problem::internal(format!("cannot state the security requirement: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_are_checked_and_served_with_the_gateways_facts() {
        assert_eq!(check_card(b"{oops").expect_err("json").status, 400);
        assert_eq!(check_card(b"[1]").expect_err("object").status, 400);
        assert_eq!(
            check_card(br#"{"name": " "}"#).expect_err("name").status,
            400
        );
        let v = check_card(br#"{"name": "echo", "description": "d", "skills": [], "x": 1}"#)
            .expect("minimal card");
        let c = serve(&v, "echo", Some("http://127.0.0.1:8791"), "").expect("serve");
        let j = serde_json::to_value(&c).expect("json");
        assert_eq!(
            j["supportedInterfaces"][0]["url"],
            "http://127.0.0.1:8791/a2a/echo"
        );
        assert_eq!(j["supportedInterfaces"][0]["protocolBinding"], "JSONRPC");
        assert_eq!(j["supportedInterfaces"][1]["protocolBinding"], NATS_BINDING);
        assert_eq!(j["capabilities"]["pushNotifications"], false);
        assert!(j["securitySchemes"][BEARER].is_object(), "{j}");
    }
}
