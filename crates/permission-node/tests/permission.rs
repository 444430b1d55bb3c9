//! The permission node and token verification in other nodes, against a real nats-server.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tether_auth::{Claims, Scope, ScopeSet, SigningKey};
use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, Endpoint, Node, NodeHandle, Problem, Request};
use tether_permission_node::PermissionConfig;
use tether_proto::{Agent, AgentList, EchoReply, EchoRequest, IssuedToken, KeySet};
use tether_testkit::{Fleet, bus, call};

async fn permission_node(url: &str, key: SigningKey, cfg: PermissionConfig) -> NodeHandle {
    tether_testkit::permission_node(&bus(url), key, cfg)
        .await
        .expect("permission node")
}

async fn whoami(req: Request<EchoRequest>) -> Result<EchoReply, Problem> {
    let c = &req.caller;
    Ok(EchoReply {
        message: req.body.message.clone(),
        agent_id: c.agent_id.clone(),
        space: c.space.clone(),
        scopes: c.scopes.to_strings(),
        ..Default::default()
    })
}

/// Another node on the runtime, verifying tokens from KV like every real node.
async fn other_node(url: &str) -> NodeHandle {
    Node::new("other-node", "1.0.0")
        .endpoint(Endpoint::new("other.whoami", whoami).scope(Scope::ShellExec))
        .start(bus(url))
        .await
        .expect("other node")
}

async fn fleet() -> Fleet {
    Fleet::start().await.expect("fleet")
}

async fn register(f: &Fleet, agent: &str, space: &str, scopes: &[&str]) -> Agent {
    let v = f
        .call(
            "agents.register",
            serde_json::json!({"agent_id": agent, "space": space, "scopes": scopes}),
            Some(&f.op),
        )
        .await
        .expect("register");
    serde_json::from_value(v).expect("agent")
}

async fn issue(f: &Fleet, agent: &str) -> IssuedToken {
    let v = f
        .call(
            "tokens.issue",
            serde_json::json!({"agent_id": agent}),
            Some(&f.op),
        )
        .await
        .expect("issue");
    serde_json::from_value(v).expect("token")
}

#[tokio::test]
async fn register_issue_verify_round_trip() {
    let f = fleet().await;
    let other = other_node(&f.nats.url()).await;
    let a = register(&f, "agent-a", "space-a", &["shell:exec", "model:call"]).await;
    assert_eq!(a.space, "space-a");
    // Idempotent for the same input; 409 for another space.
    assert_eq!(
        register(&f, "agent-a", "space-a", &["shell:exec", "model:call"])
            .await
            .space,
        "space-a"
    );
    let e = f
        .call(
            "agents.register",
            serde_json::json!({"agent_id": "agent-a", "space": "space-b", "scopes": []}),
            Some(&f.op),
        )
        .await;
    assert_eq!(e.expect_err("conflict").status, 409);

    let t = issue(&f, "agent-a").await;
    assert_eq!(
        (t.agent_id.as_str(), t.space.as_str()),
        ("agent-a", "space-a")
    );
    let r = f
        .call(
            "other.whoami",
            serde_json::json!({"message": "hi"}),
            Some(&t.token),
        )
        .await
        .expect("verified");
    assert_eq!(r["agent_id"], "agent-a");
    assert_eq!(r["space"], "space-a");
    assert_eq!(r["scopes"], serde_json::json!(["shell:exec", "model:call"]));

    // The public key set is published; the issuing kid is in it.
    let ks: KeySet = serde_json::from_value(
        f.call("auth.keys", serde_json::json!({}), None)
            .await
            .expect("keys"),
    )
    .expect("keyset");
    assert!(ks.keys.iter().any(|k| k.kid == t.kid && k.alg == "EdDSA"));
    other.shutdown().await.expect("stop");
}

fn sign_raw(header: serde_json::Value, claims: &serde_json::Value, key: &SigningKey) -> String {
    // Re-sign by hand through the real key, for tokens with odd claims.
    let _ = header;
    let c: Claims = serde_json::from_value(claims.clone()).expect("claims");
    key.sign(&c).expect("sign")
}

#[tokio::test]
async fn bad_tokens_are_401_and_change_nothing() {
    let f = fleet().await;
    register(&f, "victim", "space-v", &["shell:exec"]).await;
    let good = issue(&f, "victim").await.token;
    let a = AuthConfig::default();
    let now = tether_auth::now_unix();
    let base = serde_json::to_value(Claims::new(
        &a.issuer,
        &a.audience,
        "operator",
        "",
        [Scope::Operator].into_iter().collect(),
        now,
        600,
    ))
    .expect("claims");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        sign_raw(serde_json::json!({}), &c, &f.key)
    };
    let parts: Vec<String> = f.op.split('.').map(str::to_string).collect();
    let b64 = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
    let mut payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).expect("b64")).expect("json");
    payload["space"] = serde_json::json!("elsewhere");
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).expect("sig");
    sig[5] ^= 0x40;
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(f.key.kid().to_string());
        let x = f.key.public_key().x;
        jsonwebtoken::encode(
            &h,
            &base,
            &jsonwebtoken::EncodingKey::from_secret(x.as_bytes()),
        )
        .expect("hs")
    };
    let stranger = SigningKey::generate().expect("key");
    // The victim's token, then the victim revoked.
    f.call(
        "agents.revoke",
        serde_json::json!({"agent_id": "victim"}),
        Some(&f.op),
    )
    .await
    .expect("revoke");

    let cases: Vec<(&str, Option<String>)> = vec![
        ("expired", Some(with("exp", serde_json::json!(now - 3600)))),
        (
            "not yet valid",
            Some(with("nbf", serde_json::json!(now + 3600))),
        ),
        (
            "wrong audience",
            Some(with("aud", serde_json::json!("someone-else"))),
        ),
        (
            "wrong issuer",
            Some(with("iss", serde_json::json!("mallory"))),
        ),
        (
            "tampered payload",
            Some(format!(
                "{}.{}.{}",
                parts[0],
                b64(&serde_json::to_vec(&payload).expect("j")),
                parts[2]
            )),
        ),
        (
            "tampered signature",
            Some(format!("{}.{}.{}", parts[0], parts[1], b64(&sig))),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                parts[1]
            )),
        ),
        ("HS256 with the public key as secret", Some(hs256)),
        (
            "unknown kid",
            Some(
                stranger
                    .sign(&serde_json::from_value(base.clone()).expect("c"))
                    .expect("sign"),
            ),
        ),
        ("revoked agent", Some(good)),
        ("garbage", Some("not-a-token".into())),
        ("empty header", None),
    ];
    let list = || f.call("agents.list", serde_json::json!({}), Some(&f.op));
    let before: AgentList = serde_json::from_value(list().await.expect("list")).expect("agents");
    for (name, token) in cases {
        let mut h = async_nats::HeaderMap::new();
        match &token {
            Some(t) => h.insert("Authorization", format!("Bearer {t}").as_str()),
            None => h.insert("Authorization", ""),
        }
        let body = serde_json::json!({"agent_id": format!("new-{}", name.replace(' ', "-")), "space": "s", "scopes": []});
        let m =
            f.c.request_with_headers("agents.register", h, body.to_string().into())
                .await
                .expect("reply");
        let p = tether_bus::Problem::from_reply(m.headers.as_ref(), &m.payload)
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(p.status, 401, "{name}: {p}");
        if let Some(t) = token.filter(|t| t.len() > 20) {
            assert!(!p.detail.contains(&t), "{name}: the error echoes the token");
        }
    }
    let after: AgentList = serde_json::from_value(list().await.expect("list")).expect("agents");
    assert_eq!(before, after, "nothing changed");
}

#[tokio::test]
async fn scope_and_space_rules_are_403() {
    let f = fleet().await;
    register(
        &f,
        "admin-a",
        "space-a",
        &["agents:admin", "agents:read", "shell:exec"],
    )
    .await;
    register(&f, "plain-b", "space-b", &["shell:exec"]).await;
    let admin = issue(&f, "admin-a").await.token;
    let plain = issue(&f, "plain-b").await.token;
    // Missing scope.
    let e = f
        .call(
            "agents.register",
            serde_json::json!({"agent_id": "x", "space": "space-b", "scopes": []}),
            Some(&plain),
        )
        .await;
    assert_eq!(e.expect_err("scope").status, 403);
    // Naming another space in a request field.
    let e = f
        .call(
            "agents.register",
            serde_json::json!({"agent_id": "y", "space": "space-b", "scopes": ["shell:exec"]}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("space").status, 403);
    let e = f
        .call(
            "agents.list",
            serde_json::json!({"space": "space-b"}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("space").status, 403);
    let e = f
        .call(
            "agents.get",
            serde_json::json!({"agent_id": "plain-b"}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("space").status, 403);
    let e = f
        .call(
            "agents.revoke",
            serde_json::json!({"agent_id": "plain-b"}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("space").status, 403);
    let e = f
        .call(
            "tokens.issue",
            serde_json::json!({"agent_id": "plain-b"}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("other agent").status, 403);
    // Granting a scope it does not hold.
    let e = f
        .call(
            "agents.register",
            serde_json::json!({"agent_id": "z", "space": "space-a", "scopes": ["operator"]}),
            Some(&admin),
        )
        .await;
    assert_eq!(e.expect_err("escalation").status, 403);
    // Allowed within its own space.
    f.call(
        "agents.register",
        serde_json::json!({"agent_id": "z", "space": "space-a", "scopes": ["shell:exec"]}),
        Some(&admin),
    )
    .await
    .expect("own space");
    // The operator may name any space.
    let v = f
        .call(
            "agents.list",
            serde_json::json!({"space": "space-b"}),
            Some(&f.op),
        )
        .await
        .expect("operator");
    assert_eq!(v["agents"].as_array().map(Vec::len), Some(1));
    // An agent refreshes its own token; asking for scopes beyond its own is refused.
    f.call(
        "tokens.issue",
        serde_json::json!({"agent_id": "plain-b"}),
        Some(&plain),
    )
    .await
    .expect("refresh");
    let e = f
        .call(
            "tokens.issue",
            serde_json::json!({"agent_id": "plain-b", "scopes": ["agents:admin"]}),
            Some(&plain),
        )
        .await;
    assert_eq!(e.expect_err("more scopes").status, 403);
}

#[tokio::test]
async fn bad_input_is_400_or_404() {
    let f = fleet().await;
    for body in [
        serde_json::json!({"agent_id": "", "space": "s"}),
        serde_json::json!({"agent_id": "a b", "space": "s"}),
        serde_json::json!({"agent_id": "a", "space": "s.t"}),
        serde_json::json!({"agent_id": "a", "space": "s", "scopes": ["root"]}),
        serde_json::json!({"agent_id": "a", "space": "s", "extra": 1}),
    ] {
        let e = f.call("agents.register", body.clone(), Some(&f.op)).await;
        assert_eq!(e.expect_err("bad").status, 400, "{body}");
    }
    let e = f
        .call(
            "agents.get",
            serde_json::json!({"agent_id": "nobody"}),
            Some(&f.op),
        )
        .await;
    assert_eq!(e.expect_err("404").status, 404);
    let e = f
        .call(
            "tokens.issue",
            serde_json::json!({"agent_id": "nobody"}),
            Some(&f.op),
        )
        .await;
    assert_eq!(e.expect_err("404").status, 404);
    let e = f
        .call("agents.revoke", serde_json::json!({}), Some(&f.op))
        .await;
    assert_eq!(e.expect_err("400").status, 400);
    let v = f
        .call("agents.list", serde_json::json!({}), Some(&f.op))
        .await
        .expect("list");
    assert_eq!(v["agents"], serde_json::json!([]), "nothing was created");
}

async fn wait_refused(c: &async_nats::Client, token: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Err(Problem { status: 401, .. }) =
            call(c, "other.whoami", serde_json::json!({}), Some(token)).await
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "still accepted after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn revocation_reaches_every_node_within_a_second() {
    let f = fleet().await;
    // Two running verifying nodes, each on its own connection.
    let n1 = other_node(&f.nats.url()).await;
    let n2 = Node::new("other-node-2", "1.0.0")
        .endpoint(Endpoint::new("other2.whoami", whoami).scope(Scope::ShellExec))
        .start(bus(&f.nats.url()))
        .await
        .expect("n2");
    register(&f, "r1", "space-r", &["shell:exec"]).await;
    let t1 = issue(&f, "r1").await;
    let t1b = issue(&f, "r1").await;
    for s in ["other.whoami", "other2.whoami"] {
        f.call(s, serde_json::json!({}), Some(&t1.token))
            .await
            .expect("valid before");
    }
    // Revoke one token by jti.
    f.call(
        "agents.revoke",
        serde_json::json!({"jti": t1.jti}),
        Some(&f.op),
    )
    .await
    .expect("revoke jti");
    let took = wait_refused(&f.c, &t1.token, Duration::from_secs(1)).await;
    println!("jti revocation took {took:?}");
    f.call("other.whoami", serde_json::json!({}), Some(&t1b.token))
        .await
        .expect("the other token still works");
    // Revoke the agent: every node refuses all its tokens within a second.
    let start = Instant::now();
    f.call(
        "agents.revoke",
        serde_json::json!({"agent_id": "r1"}),
        Some(&f.op),
    )
    .await
    .expect("revoke agent");
    loop {
        let a = f
            .call("other.whoami", serde_json::json!({}), Some(&t1b.token))
            .await;
        let b = f
            .call("other2.whoami", serde_json::json!({}), Some(&t1b.token))
            .await;
        if matches!(a, Err(Problem { status: 401, .. }))
            && matches!(b, Err(Problem { status: 401, .. }))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "revocation not effective everywhere within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("agent revocation took {:?}", start.elapsed());
    // And a revoked agent gets no new token.
    let e = f
        .call(
            "tokens.issue",
            serde_json::json!({"agent_id": "r1"}),
            Some(&f.op),
        )
        .await;
    assert_eq!(e.expect_err("revoked").status, 403);
    n1.shutdown().await.expect("n1");
    n2.shutdown().await.expect("n2");
}

#[tokio::test]
async fn rotated_key_keeps_old_tokens_valid_until_they_expire() {
    let mut f = fleet().await;
    let short = PermissionConfig {
        max_token_ttl_seconds: 3,
        ..Default::default()
    };
    let other = Node::new("other-node", "1.0.0")
        .endpoint(Endpoint::new("other.whoami", whoami).scope(Scope::ShellExec))
        .start(BusConfig {
            auth: AuthConfig {
                leeway_seconds: 0,
                ..Default::default()
            },
            ..bus(&f.nats.url())
        })
        .await
        .expect("other");
    register(&f, "rot", "space-rot", &["shell:exec"]).await;
    // Restart the permission node with short tokens, then issue one with the old key.
    f.perm.take().expect("perm").shutdown().await.expect("stop");
    let old_key = SigningKey::from_pem(&f.key.to_pem()).expect("pem");
    let p = permission_node(&f.nats.url(), old_key, short.clone()).await;
    let old_token = issue(&f, "rot").await;
    p.shutdown().await.expect("stop");

    // Rotate: a new key takes over.
    let new_key = SigningKey::generate().expect("key");
    let new_kid = new_key.kid().to_string();
    let p = permission_node(&f.nats.url(), new_key, short).await;
    let new_token = issue(&f, "rot").await;
    assert_eq!(new_token.kid, new_kid);
    assert_ne!(old_token.kid, new_kid);
    // The old token is still valid right after the rotation…
    f.call(
        "other.whoami",
        serde_json::json!({}),
        Some(&old_token.token),
    )
    .await
    .expect("old token valid after rotation");
    f.call(
        "other.whoami",
        serde_json::json!({}),
        Some(&new_token.token),
    )
    .await
    .expect("new token valid");
    let ks: KeySet = serde_json::from_value(
        f.call("auth.keys", serde_json::json!({}), None)
            .await
            .expect("keys"),
    )
    .expect("ks");
    let old = ks
        .keys
        .iter()
        .find(|k| k.kid == old_token.kid)
        .expect("old key still published");
    assert!(
        old.not_after >= old_token.expires_at,
        "old key retires no earlier than its tokens expire"
    );
    // …and refused once it expired (3 s tokens).
    wait_refused(&f.c, &old_token.token, Duration::from_secs(10)).await;
    p.shutdown().await.expect("stop");
    other.shutdown().await.expect("other");
}

#[tokio::test]
async fn two_replicas_answer_consistently() {
    let f = fleet().await;
    let second = permission_node(
        &f.nats.url(),
        SigningKey::from_pem(&f.key.to_pem()).expect("pem"),
        PermissionConfig::default(),
    )
    .await;
    register(&f, "c1", "space-c", &["shell:exec"]).await;
    let mut instances = std::collections::HashSet::new();
    for i in 0..40 {
        let v = f
            .call(
                "agents.get",
                serde_json::json!({"agent_id": "c1"}),
                Some(&f.op),
            )
            .await
            .expect("get");
        assert_eq!(v["space"], "space-c", "round {i}");
        let e = f
            .call(
                "agents.register",
                serde_json::json!({"agent_id": "c1", "space": "other", "scopes": ["shell:exec"]}),
                Some(&f.op),
            )
            .await;
        assert_eq!(e.expect_err("409").status, 409);
    }
    // Both replicas really served.
    let m =
        f.c.request("$SRV.STATS.permission-node", "".into())
            .await
            .expect("stats");
    let _ = m;
    let mut inbox = f.c.subscribe("stats.reply").await.expect("sub");
    f.c.publish_with_reply("$SRV.STATS.permission-node", "stats.reply", "".into())
        .await
        .expect("pub");
    while instances.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut inbox))
            .await
            .expect("stats")
            .expect("msg");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        let served: u64 = v["endpoints"]
            .as_array()
            .expect("eps")
            .iter()
            .map(|e| e["num_requests"].as_u64().unwrap_or(0))
            .sum();
        assert!(served > 0, "replica {} served nothing", v["id"]);
        instances.insert(v["id"].as_str().unwrap_or_default().to_string());
    }
    second.shutdown().await.expect("stop");
}

#[test]
fn scope_set_is_typed() {
    assert!(ScopeSet::parse(&["shell:exec"]).is_ok());
}
