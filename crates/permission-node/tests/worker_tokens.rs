//! `tokens.worker`: the orchestrator (its own NATS user) obtains the tokens of worker
//! replicas, only for an agent registered `workers:hosted` that a deployment in
//! `tether_workers` names; nobody else on the bus may even ask.

use std::time::Duration;

use serde_json::{Value, json};
use tether_bus::kv::open_or_create_bucket;
use tether_permission_node::access::NodeKind;
use tether_testkit::{Fleet, connect_with_events, unverified_claims};

async fn ask(
    c: &async_nats::Client,
    worker: &str,
    agent: &str,
) -> Result<Value, tether_bus::Problem> {
    tether_testkit::call(
        c,
        "tokens.worker",
        json!({"worker": worker, "agent_id": agent, "ttl_seconds": 20}),
        None,
    )
    .await
}

#[tokio::test]
async fn the_orchestrator_gets_tokens_only_for_hosted_agents_a_deployment_names() {
    let f = Fleet::start().await.expect("fleet");
    f.agent("bot-w", "space-w", &["a2a:serve", "workers:hosted"])
        .await;
    f.agent("plain-w", "space-w", &["a2a:serve"]).await;
    let orch = f
        .connect_node(NodeKind::Orchestrator)
        .await
        .expect("the orchestrator's user connects");

    // No deployments bucket yet: no deployment names anyone.
    let p = ask(&orch, "echo", "bot-w").await.expect_err("no bucket");
    assert_eq!(p.status, 403, "{p:?}");

    let js = async_nats::jetstream::new(f.c.clone());
    let bucket = open_or_create_bucket(
        &js,
        async_nats::jetstream::kv::Config {
            bucket: "tether_workers".into(),
            history: 1,
            ..Default::default()
        },
    )
    .await
    .expect("bucket");
    for (name, agent) in [("echo", "bot-w"), ("plain", "plain-w")] {
        let d = json!({"spec": {"name": name, "agent_id": agent, "image": "img", "replicas": 1}, "generation": 1, "uid": name});
        bucket
            .put(name, serde_json::to_vec(&d).expect("json").into())
            .await
            .expect("put");
    }

    let t = ask(&orch, "echo", "bot-w").await.expect("issued");
    let c = unverified_claims(t["token"].as_str().expect("token"));
    assert_eq!(c["sub"], "bot-w");
    assert_eq!(c["space"], "space-w");
    assert_eq!(c["scopes"], json!(["a2a:serve"]), "the mark is not carried");
    assert_eq!(
        c["exp"].as_i64().expect("exp") - c["iat"].as_i64().expect("iat"),
        20
    );
    // int64 is a string in proto JSON.
    assert_eq!(
        t["expires_at"].as_str(),
        Some(c["exp"].to_string().as_str())
    );

    // Every refusal says why and issues nothing.
    let cases = [
        ("plain", "plain-w", 403, "workers:hosted"),
        ("other", "bot-w", 403, "no worker deployment"),
        ("plain", "bot-w", 403, "no worker deployment"),
        ("echo", "nobody", 404, "no agent"),
        ("echo", "a.b", 400, "agent_id"),
        ("", "bot-w", 400, "worker"),
    ];
    for (worker, agent, status, says) in cases {
        let p = ask(&orch, worker, agent).await.expect_err(worker);
        assert_eq!(p.status, status, "{worker}/{agent}: {p:?}");
        assert!(p.detail.contains(says), "{worker}/{agent}: {}", p.detail);
    }

    // Revoked: no more tokens.
    f.call(
        "agents.revoke",
        json!({"agent_id": "bot-w"}),
        Some(f.operator()),
    )
    .await
    .expect("revoke");
    let p = ask(&orch, "echo", "bot-w").await.expect_err("revoked");
    assert_eq!(p.status, 403);
    assert!(p.detail.contains("revoked"), "{}", p.detail);
}

#[tokio::test]
async fn no_agent_may_ask_for_a_worker_token() {
    let f = Fleet::start().await.expect("fleet");
    // Every scope an agent can hold short of operator (`daemon:serve` is no agent's).
    let all: Vec<&str> = tether_auth::Scope::ALL
        .iter()
        .filter(|s| {
            ![
                tether_auth::Scope::Operator,
                tether_auth::Scope::DaemonServe,
            ]
            .contains(s)
        })
        .map(|s| s.as_str())
        .collect();
    let token = f.agent("greedy-w", "space-g", &all).await;
    let cfg = tether_bus::BusConfig {
        nats_url: f.nats.plain_url(),
        nats_token: Some(tether_bus::config::Secret::new(token)),
        ..Default::default()
    };
    let (c, mut rx) = connect_with_events(&cfg, "greedy").await.expect("connect");
    let req = async_nats::Request::new()
        .payload(
            json!({"worker": "echo", "agent_id": "greedy-w"})
                .to_string()
                .into(),
        )
        .timeout(Some(Duration::from_secs(2)));
    assert!(
        c.send_request("tokens.worker", req).await.is_err(),
        "an agent's request for a worker token is answered"
    );
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no permissions violation reported within 10 s")
            .expect("events");
        if let async_nats::Event::ServerError(e) = e
            && e.to_string()
                .to_lowercase()
                .contains("permissions violation")
        {
            assert!(e.to_string().contains("tokens.worker"), "{e}");
            break;
        }
    }
}
