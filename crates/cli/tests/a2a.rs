//! `tether a2a ls` and `tether call` on A2A subjects, against a fleet with the A2A gateway: the
//! CLI connects with the caller's own token and sends `A2A-Version: 1.0` itself.

mod common;

use common::{tether, text};
use serde_json::json;
use tether_testkit::{Fleet, NodeKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_ls_lists_agents_with_live_workers_and_call_reaches_a2a() {
    let f = Fleet::start().await.expect("fleet");
    let gw = tether_a2a_gateway::start(
        f.node_bus(NodeKind::A2a),
        tether_a2a_gateway::A2aConfig {
            a2a_listen: String::new(),
            ..Default::default()
        },
    )
    .await
    .expect("gateway");
    let worker = f.agent("cli-echo", "workers", &["a2a:serve"]).await;
    let caller = f.agent("cli-caller", "s1", &["a2a:call"]).await;
    let url = f.nats.plain_url();

    let out = tether(&["a2a", "ls", "--server", &url], &caller).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("cli-echo"),
        "no card yet: {}",
        text(&out)
    );

    f.call(
        "a2a.cli-echo.work.card",
        json!({"name": "CLI echo", "skills": [{"id": "echo", "name": "echo", "description": "d", "tags": []}]}),
        Some(&worker),
    )
    .await
    .expect("card");
    let out = tether(&["a2a", "ls", "--server", &url], &caller).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("cli-echo"))
        .unwrap_or_else(|| panic!("no row for the agent: {table}"));
    assert!(
        row.contains("CLI echo") && row.contains("yes") && row.contains("echo"),
        "{row}"
    );

    // `tether call` on an A2A subject: the version header is added, the card comes back.
    let out = tether(&["call", "a2a.cli-echo.card", "--server", &url], &caller).await;
    assert!(out.status.success(), "{}", text(&out));
    let card: serde_json::Value = serde_json::from_slice(&out.stdout).expect("card json");
    assert_eq!(card["name"], "CLI echo");
    let out = tether(
        &[
            "call",
            "a2a.cli-echo.get",
            r#"{"id":"nope"}"#,
            "--server",
            &url,
        ],
        &caller,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("TaskNotFound") || text(&out).contains("404"),
        "{}",
        text(&out)
    );
    gw.shutdown().await.expect("shutdown");
}
