//! A request in flight when its client's server dies fails fast with a clear error
//! (`connect::request`), instead of waiting out its timeout.

use std::time::Duration;

use futures::StreamExt;
use tether_bus::connect::{RequestFailure, request};
use tether_testkit::NatsServer;

/// Far longer than the test may take: a reply that "fails" by timing out would show here.
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_request_out_when_the_server_dies_fails_as_connection_lost() {
    let mut nats = NatsServer::start().await.expect("nats");
    let responder = nats.client().await.expect("responder");
    let mut sub = responder.subscribe("slow.echo").await.expect("sub");
    responder.flush().await.expect("flush");
    let caller = nats.client().await.expect("caller");

    // Answered normally while the connection holds.
    let answer = tokio::spawn({
        let responder = responder.clone();
        async move {
            let m = sub.next().await.expect("first request");
            responder
                .publish(m.reply.expect("reply subject"), "pong".into())
                .await
                .expect("reply");
            // The second request is held and never answered.
            sub.next().await.expect("second request")
        }
    });
    let ok = request(
        &caller,
        "slow.echo".into(),
        async_nats::Request::new(),
        TIMEOUT,
    )
    .await
    .expect("answered");
    assert_eq!(&ok.payload[..], b"pong");

    let out = tokio::spawn({
        let caller = caller.clone();
        async move {
            request(
                &caller,
                "slow.echo".into(),
                async_nats::Request::new(),
                TIMEOUT,
            )
            .await
        }
    });
    // The responder holds it: the request is out. Then the server dies.
    tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("the second request arrives")
        .expect("join");
    nats.kill().await;
    let r = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the request ends long before its timeout")
        .expect("join");
    assert!(
        matches!(r, Err(RequestFailure::ConnectionLost)),
        "connection lost, not {r:?}"
    );
    let text = RequestFailure::ConnectionLost.to_string();
    assert!(text.contains("may or may not have been served"), "{text}");
}
