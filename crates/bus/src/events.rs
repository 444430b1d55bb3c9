//! CloudEvents-shaped events on `events.*`, so nobody has to poll.

use tether_proto::Event;

/// Builds an event (`specversion` 1.0, a fresh id, the current time).
pub fn cloud_event(
    kind: &str,
    source: &str,
    subject: &str,
    data: serde_json::Value,
    traceparent: Option<String>,
) -> Event {
    Event {
        specversion: "1.0".into(),
        id: uuid::Uuid::now_v7().to_string(),
        r#type: kind.to_string(),
        source: source.to_string(),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        subject: subject.to_string(),
        data: Some(tether_proto::to_pb_value(data)),
        traceparent: traceparent.unwrap_or_default(),
    }
}

/// Publishes an event as JSON (core NATS: fire and forget; subscribers see it live).
pub async fn publish(
    client: &async_nats::Client,
    nats_subject: String,
    event: &Event,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(event)?;
    let mut h = async_nats::HeaderMap::new();
    h.insert(crate::codec::CONTENT_TYPE, "application/cloudevents+json");
    client
        .publish_with_headers(nats_subject, h, body.into())
        .await?;
    Ok(())
}
