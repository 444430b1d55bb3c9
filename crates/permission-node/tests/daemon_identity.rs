//! `tokens.daemon` and what a space daemon's credential allows on the bus (issue 18): only
//! the orchestrator may ask for one; it answers its own space's exec requests — a real
//! `tether-spaced` streams a long output through it — and a stolen one can neither listen to,
//! nor publish on, another space's subjects, nor touch the JetStream API or any KV bucket.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_nats::{Event, ServerError};
use serde_json::json;
use tether_permission_node::access::NodeKind;
use tether_proto::DaemonExecRequest;
use tether_space_daemon::client::{self, Failure};
use tether_testkit::{Fleet, cargo_bin, connect_with_events, unique, unverified_claims};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(30);

async fn ask(c: &async_nats::Client, body: serde_json::Value) -> Result<String, (u16, String)> {
    tether_testkit::call(c, "tokens.daemon", body, None)
        .await
        .map(|v| v["token"].as_str().expect("a token").to_string())
        .map_err(|p| (p.status, p.detail))
}

/// Waits until the server reported `Permissions Violation for <what> "<subject>"` on the
/// connection whose events are `events`.
async fn violation(events: &mut UnboundedReceiver<Event>, seen: &mut Vec<String>, needle: &str) {
    let until = Instant::now() + WAIT;
    loop {
        if seen.iter().any(|e| e.trim() == needle) {
            return;
        }
        match tokio::time::timeout_at(until.into(), events.recv()).await {
            Ok(Some(Event::ServerError(ServerError::Other(e)))) => seen.push(e),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the event stream ended"),
            Err(_) => panic!("no `{needle}`; the server reported: {seen:#?}"),
        }
    }
}

/// The host build of the daemon serving `space` with the token in `token_file`.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(url: &str, space: &str, token_file: &Path) -> Daemon {
    let bin = cargo_bin("tether-spaced").expect("tether-spaced built");
    let child = Command::new(bin)
        .env("TETHER_NATS_URL", url)
        .env("TETHER_DAEMON_TOKEN_FILE", token_file)
        .env("TETHER_SPACE_ID", space)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn tether-spaced");
    Daemon(child)
}

#[tokio::test]
async fn a_daemon_credential_serves_its_own_space_and_nothing_else() {
    let f = Fleet::start().await.expect("fleet");
    let (space, other) = (unique("sp"), unique("other"));
    let orch = f
        .connect_node(NodeKind::Orchestrator)
        .await
        .expect("the orchestrator's user connects");

    // Bad input: a clear 400, no token.
    for (body, says) in [
        (json!({}), "`space` is required"),
        (json!({"space": "a.b"}), "`space` must be"),
        (json!({"space": "a b"}), "`space` must be"),
    ] {
        let (status, detail) = ask(&orch, body.clone()).await.expect_err("refused");
        assert_eq!(status, 400, "{body}: {detail}");
        assert!(detail.contains(says), "{body}: {detail}");
    }
    // No agent holds the scope, so registering it is refused.
    let p = f
        .call(
            "agents.register",
            json!({"agent_id": unique("a"), "space": space, "scopes": ["daemon:serve"]}),
            Some(f.operator()),
        )
        .await
        .expect_err("daemon:serve is not an agent's");
    assert_eq!(p.status, 400, "{p:?}");
    // Nor is any agent registered into a warm-pool container's own space.
    let pool_space = format!("{}{}", tether_auth::POOL_SPACE_PREFIX, "0123456789ab");
    let p = f
        .call(
            "agents.register",
            json!({"agent_id": unique("a"), "space": pool_space, "scopes": []}),
            Some(f.operator()),
        )
        .await
        .expect_err("a pool container's space is no agent's");
    assert_eq!(p.status, 400, "{p:?}");
    assert!(p.detail.contains("warm-pool"), "{p:?}");
    // An agent (whatever its scopes) may not even ask.
    let agent = f.agent(&unique("a"), &space, &[]).await;
    let (as_agent, mut agent_events) = connect_with_events(
        &tether_bus::BusConfig {
            nats_url: f.nats.plain_url(),
            nats_token: Some(tether_bus::config::Secret::new(agent)),
            ..Default::default()
        },
        "agent",
    )
    .await
    .expect("the agent connects");
    as_agent
        .publish("tokens.daemon", json!({"space": space}).to_string().into())
        .await
        .expect("publish");
    as_agent.flush().await.expect("flush");
    violation(
        &mut agent_events,
        &mut Vec::new(),
        "Permissions Violation for Publish to \"tokens.daemon\"",
    )
    .await;

    let token = ask(&orch, json!({"space": space, "ttl_seconds": 120}))
        .await
        .expect("the orchestrator gets a daemon token");
    let claims = unverified_claims(&token);
    assert_eq!(claims["sub"], format!("tether-spaced.{space}"));
    assert_eq!(claims["space"], space.as_str());
    assert_eq!(claims["scopes"], json!(["daemon:serve"]));
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        120
    );

    // A real daemon serves its space with it: a command whose output comes in many chunks,
    // every one of them an answer to the one request.
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("daemon-token");
    std::fs::write(&token_file, &token).expect("token file");
    let _daemon = daemon(&f.nats.plain_url(), &space, &token_file);
    let req = DaemonExecRequest {
        command: "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.002; done".into(),
        timeout_ms: 20_000,
        ..Default::default()
    };
    let out = tether_testkit::eventually(WAIT, "the daemon answers", || async {
        match client::exec(&orch, &space, &req, WAIT).await {
            Ok(out) => Some(out),
            Err(Failure::NoResponders) => None,
            Err(e) => panic!("exec through the daemon: {e:?}"),
        }
    })
    .await;
    assert_eq!(out.exit.exit_code, 0);
    let stdout = String::from_utf8(out.stream("stdout")).expect("utf-8");
    assert_eq!(stdout.lines().count(), 300, "{stdout}");
    assert!(stdout.ends_with("line 299\n"));
    assert!(
        out.chunks.len() > 1,
        "one chunk only: the test proves nothing"
    );

    // The credential, stolen: everything beyond answering its own space is refused.
    let (thief, mut events) = connect_with_events(
        &tether_bus::BusConfig {
            nats_url: f.nats.plain_url(),
            nats_token: Some(tether_bus::config::Secret::new(token.clone())),
            ..Default::default()
        },
        "thief",
    )
    .await
    .expect("the daemon credential connects");
    let other_exec = format!("spaces.{other}.daemon.exec");
    let own_exec = format!("spaces.{space}.daemon.exec");
    let mut subs = Vec::new();
    for s in [other_exec.as_str(), "spaces.>", ">", "$KV.>", "_INBOX.>"] {
        subs.push(thief.subscribe(s.to_string()).await.expect("subscribe"));
    }
    subs.push(
        thief
            .queue_subscribe(other_exec.clone(), "tether-spaced".into())
            .await
            .expect("queue subscribe"),
    );
    let publishes = [
        other_exec.clone(),
        own_exec.clone(),
        "containers.exec".to_string(),
        "tokens.issue".to_string(),
        "tokens.daemon".to_string(),
        "_INBOX.someone.reply".to_string(),
        "$KV.tether_agents.thief".to_string(),
        "$JS.API.INFO".to_string(),
        "$JS.API.STREAM.INFO.KV_tether_agents".to_string(),
        "$JS.API.DIRECT.GET.KV_tether_agents".to_string(),
        "$JS.API.STREAM.MSG.GET.KV_tether_agents".to_string(),
        "$JS.API.CONSUMER.CREATE.KV_tether_agents".to_string(),
    ];
    for s in &publishes {
        thief
            .publish(s.clone(), "{}".into())
            .await
            .expect("publish");
    }
    thief.flush().await.expect("flush");
    let mut seen = Vec::new();
    for s in [other_exec.as_str(), "spaces.>", ">", "$KV.>", "_INBOX.>"] {
        violation(
            &mut events,
            &mut seen,
            &format!("Permissions Violation for Subscription to \"{s}\""),
        )
        .await;
    }
    violation(
        &mut events,
        &mut seen,
        &format!(
            "Permissions Violation for Subscription to \"{other_exec}\" using queue \"tether-spaced\""
        ),
    )
    .await;
    for s in &publishes {
        violation(
            &mut events,
            &mut seen,
            &format!("Permissions Violation for Publish to \"{s}\""),
        )
        .await;
    }
    // Its own space's subject it may listen to: no violation for it came.
    let own = thief.subscribe(own_exec.clone()).await.expect("subscribe");
    thief.flush().await.expect("flush");
    drop(own);
    assert!(
        !seen
            .iter()
            .any(|e| e.contains(&format!("Subscription to \"{own_exec}\""))),
        "{seen:#?}"
    );
    // And the daemon still serves its space.
    let again = client::exec(&orch, &space, &req, WAIT)
        .await
        .expect("exec after the attempts");
    assert_eq!(again.exit.exit_code, 0);
}
