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
    python(
        "nats_interop.py",
        &[&nats.url(), "py-interop", "interop.echo"],
        &["request/reply ok", "problem ok", "ping/info ok", "stats ok"],
    )
    .await;
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn nats_py_connects_as_an_agent_and_gets_only_its_permissions() {
    let f = Fleet::start().await.expect("fleet");
    let token = f.agent("py-agent", "py-space", &["shell:exec"]).await;
    python(
        "nats_agent.py",
        &[&f.nats.plain_url(), &token, "py-agent"],
        &["request ok", "violations ok"],
    )
    .await;
}

/// Runs `tests/py/<script>` with `args` (off the runtime thread: an in-process node or auth
/// callout must keep answering) and checks that it succeeded and printed every line of `checks`.
async fn python(script: &str, args: &[&str], checks: &[&str]) {
    let script = format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).args(args).output()
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
    for check in checks {
        assert!(stdout.contains(check), "missing `{check}` in:\n{stdout}");
    }
}
