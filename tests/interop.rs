//! Independent clients: the Python `nats-py` package talks to a node built on the runtime, and
//! connects as an agent through the bus's auth callout.

use std::process::Command;

use tether_bus::{BusConfig, Endpoint, Node, Problem, PublicRequest};
use tether_proto::{EchoReply, EchoRequest};
use tether_testkit::{Fleet, NatsServer};

async fn echo(req: PublicRequest<EchoRequest>) -> Result<EchoReply, Problem> {
    Ok(EchoReply {
        message: req.body.message,
        ..Default::default()
    })
}

#[tokio::test]
async fn nats_py_client_uses_a_node() {
    let nats = NatsServer::start().await.expect("nats");
    let node = Node::new("py-interop", "1.0.0")
        .endpoint(Endpoint::public("interop.echo", echo))
        .start(BusConfig {
            nats_url: nats.url(),
            ..Default::default()
        })
        .await
        .expect("node");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/nats_interop.py");
    let url = nats.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, url.as_str(), "py-interop", "interop.echo"])
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs (scripts/install-deps.sh installs nats-py)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["request/reply ok", "problem ok", "ping/info ok", "stats ok"] {
        assert!(stdout.contains(check), "missing `{check}` in:\n{stdout}");
    }
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn nats_py_connects_as_an_agent_and_gets_only_its_permissions() {
    let f = Fleet::start().await.expect("fleet");
    let token = f.agent("py-agent", "py-space", &["shell:exec"]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/nats_agent.py");
    let url = f.nats.plain_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, url.as_str(), token.as_str(), "py-agent"])
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs (scripts/install-deps.sh installs nats-py)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python agent failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["request ok", "violations ok"] {
        assert!(stdout.contains(check), "missing `{check}` in:\n{stdout}");
    }
}
