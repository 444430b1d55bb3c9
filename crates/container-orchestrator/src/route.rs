//! Sending a request on to the node of another host, as the caller (the other node checks
//! the token again).

use std::time::Duration;

use tether_bus::{Problem, Request};

/// Sends a request on to another node's subject as the caller (the other node checks the
/// token again).
pub async fn forward<Q, R>(req: &Request<Q>, subject: String) -> Result<R, Problem>
where
    Q: prost::Message + serde::Serialize,
    R: prost::Message + serde::de::DeserializeOwned + Default,
{
    forward_within(req, subject, Duration::from_secs(60)).await
}

/// [`forward`], waiting up to `timeout` for the other node's answer.
pub async fn forward_within<Q, R>(
    req: &Request<Q>,
    subject: String,
    timeout: Duration,
) -> Result<R, Problem>
where
    Q: prost::Message + serde::Serialize,
    R: prost::Message + serde::de::DeserializeOwned + Default,
{
    let body = req.encoding.encode(&req.body)?;
    let request = async_nats::client::Request::new()
        .payload(body)
        .headers(req.headers.clone())
        .timeout(Some(timeout));
    let msg = req
        .ctx
        .client
        .send_request(subject.clone(), request)
        .await
        .map_err(|e| Problem::unavailable(format!("cannot reach `{subject}`: {e}")))?;
    if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
        return Err(p);
    }
    req.encoding.decode::<R>(&msg.payload)
}
