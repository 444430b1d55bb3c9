//! The bus itself checks who connects (auth callout): anonymous, expired, revoked and forged
//! tokens are refused at connect, and revoking an agent closes its live connection.

use std::time::{Duration, Instant};

use serde_json::json;
use tether_auth::{Claims, Scope, ScopeSet, SigningKey};
use tether_bus::config::AuthConfig;
use tether_testkit::{Fleet, sign_token};

fn scopes(s: &[Scope]) -> ScopeSet {
    s.iter().copied().collect()
}

/// A connect that fails (bounded, so a hang is a failure too); the error text.
async fn refused(f: &Fleet, token: Option<&str>) -> String {
    let attempt = async {
        match token {
            Some(t) => f.connect_as(t).await.map(|_| ()),
            None => tether_testkit::connect(&f.nats.plain_url())
                .await
                .map(|_| ()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("connection accepted (token: {})", token.is_some()),
        Err(_) => panic!("connect neither accepted nor refused within 20 s"),
    }
}

#[tokio::test]
async fn only_a_valid_unrevoked_token_gets_in() {
    let f = Fleet::start().await.expect("fleet");
    let good = f.agent("in-a", "space-a", &["shell:exec"]).await;
    let c = f.connect_as(&good).await.expect("a valid token connects");
    // It can call what every agent may (the public keys) and gets the reply in its inbox.
    let keys = c
        .request("auth.keys", "{}".into())
        .await
        .expect("auth.keys answers an agent");
    assert!(String::from_utf8_lossy(&keys.payload).contains("keys"));

    // An operator connects too (with every permission).
    let op = f
        .connect_as(f.operator())
        .await
        .expect("an operator token connects");
    op.request("agents.list", "{}".into())
        .await
        .expect("the operator's request is delivered");

    let e = refused(&f, None).await;
    assert!(e.to_lowercase().contains("authorization"), "anonymous: {e}");

    let a = AuthConfig::default();
    let now = tether_auth::now_unix();
    let mut old = Claims::new(
        &a.issuer,
        &a.audience,
        "in-a",
        "space-a",
        scopes(&[Scope::ShellExec]),
        now - 600,
        60,
    );
    old.iat = now - 600;
    let expired = f.key.sign(&old).expect("sign");
    refused(&f, Some(&expired)).await;

    let forger = SigningKey::generate().expect("key");
    let forged =
        sign_token(&forger, "in-a", "space-a", scopes(&[Scope::Operator]), 600).expect("sign");
    refused(&f, Some(&forged)).await;
    refused(&f, Some("not-a-jwt")).await;

    let doomed = f.agent("in-b", "space-b", &["shell:exec"]).await;
    f.call(
        "agents.revoke",
        json!({"agent_id": "in-b"}),
        Some(f.operator()),
    )
    .await
    .expect("revoke");
    tether_testkit::eventually(Duration::from_secs(10), "revoked token refused", || async {
        match tokio::time::timeout(Duration::from_secs(5), f.connect_as(&doomed)).await {
            Ok(Err(_)) => Some(()),
            _ => None,
        }
    })
    .await;
    // The good agent was never disturbed.
    c.request("auth.keys", "{}".into())
        .await
        .expect("still served");
}

#[tokio::test]
async fn revoking_an_agent_closes_its_live_connection_within_a_second() {
    let f = Fleet::start().await.expect("fleet");
    let token = f.agent("live-a", "space-l", &["shell:exec"]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = tether_bus::BusConfig {
        nats_url: f.nats.plain_url(),
        nats_token: Some(tether_bus::config::Secret::new(token)),
        ..Default::default()
    };
    let c = tether_bus::connect::options(&cfg, "victim")
        .await
        .expect("options")
        .max_reconnects(Some(1))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(cfg.nats_url.as_str())
        .await
        .expect("connect");
    c.request("auth.keys", "{}".into()).await.expect("served");
    let start = Instant::now();
    f.call(
        "agents.revoke",
        json!({"agent_id": "live-a"}),
        Some(f.operator()),
    )
    .await
    .expect("revoke");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the connection was not closed within 10 s")
            .expect("events");
        if matches!(e, async_nats::Event::Disconnected) {
            break;
        }
    }
    let took = start.elapsed();
    println!("revocation closed the live connection after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}
