//! Who may call is in the handler's type: an endpoint whose handler takes a `Caller` is
//! protected without being told, a public one takes `Option<Caller>`, and an inconsistent
//! raw endpoint answers 401 instead of panicking.

mod common;

use common::*;
use tether_auth::Scope;
use tether_bus::{Caller, Endpoint, Node, PublicRequest, RawRequest, Reply, Request};
use tether_proto::{EchoReply, EchoRequest};
use tether_testkit::NatsServer;

async fn whoami(req: Request<EchoRequest>) -> Result<EchoReply, tether_bus::Problem> {
    let c: &Caller = &req.caller;
    Ok(EchoReply {
        agent_id: c.agent_id.clone(),
        ..Default::default()
    })
}

async fn anyone(req: PublicRequest<EchoRequest>) -> Result<EchoReply, tether_bus::Problem> {
    Ok(EchoReply {
        agent_id: req.caller.map(|c| c.agent_id).unwrap_or_default(),
        message: req.body.message,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_caller_typed_handler_is_protected_and_a_public_one_is_not() {
    let nats = NatsServer::start().await.expect("nats");
    let keys = Keys::new();
    let node = Node::new("caller-node", "1.0.0")
        .verifier(keys.verifier())
        // No `.scope`, no `.authenticated`: the `Caller` in the handler's type protects it.
        .endpoint(Endpoint::new("c.whoami", whoami))
        .endpoint(Endpoint::public("c.anyone", anyone))
        // Public raw endpoint whose handler nonetheless asks for a `Request<T>` (with a
        // `Caller`): inconsistent, answered 401, never a panic.
        .endpoint(Endpoint::raw("c.raw", |raw: RawRequest| async move {
            let req: Request<EchoRequest> = raw.decode()?;
            Ok::<_, tether_bus::Problem>(Reply::new(req.caller.agent_id, "text/plain"))
        }))
        .start(config(&nats.url()))
        .await
        .expect("node");
    let c = nats.client().await.expect("client");
    let token = keys.token("a1", "s1", &[Scope::ShellExec]);

    assert_problem(
        &request(&c, "c.whoami", json_headers(None), "{}").await,
        401,
    );
    let m = request(&c, "c.whoami", json_headers(Some(&token)), "{}").await;
    assert!(is_ok_reply(&m));
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
    assert_eq!(v["agent_id"], "a1");

    let m = request(&c, "c.anyone", json_headers(None), r#"{"message":"hi"}"#).await;
    assert!(is_ok_reply(&m));
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
    assert_eq!(
        (v["message"].as_str(), v["agent_id"].as_str()),
        (Some("hi"), Some(""))
    );

    assert_problem(
        &request(&c, "c.raw", json_headers(Some(&token)), "{}").await,
        401,
    );
    // The node kept serving.
    assert!(is_ok_reply(
        &request(&c, "c.anyone", json_headers(None), "{}").await
    ));
    node.shutdown().await.expect("shutdown");
}
