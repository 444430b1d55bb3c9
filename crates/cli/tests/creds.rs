//! `tether agent creds`: what an agent process needs to connect to the authorized bus. The CLI
//! itself connects with the operator's token (no NATS credentials configured), and the printed
//! credentials connect an agent that gets its own permissions.

use std::process::{Command, Output};

use tether_testkit::Fleet;

/// Runs `tether` off the test's runtime thread: the fleet's auth callout runs on it and must
/// answer the CLI's connect.
async fn tether(args: &[&str], token: &str) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let token = token.to_string();
    tokio::task::spawn_blocking(move || run(&args, &token))
        .await
        .expect("join")
}

fn run(args: &[String], token: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") || k == "NATS_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.env("TETHER_TOKEN", token)
        .env("TETHER_SIGNING_KEY_FILE", "/nonexistent/key.pem")
        .output()
        .expect("tether runs")
}

#[tokio::test]
async fn agent_creds_connect_an_agent_with_its_own_permissions() {
    let f = Fleet::start().await.expect("fleet");
    f.agent("creds-a", "creds-space", &["shell:exec"]).await;
    let url = f.nats.plain_url();
    let out = tether(
        &["agent", "creds", "creds-a", "--json", "--server", &url],
        f.operator(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(f.nats.log_path()).unwrap_or_default()
    );
    let creds: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(creds["url"], url.as_str());
    assert_eq!(creds["inbox_prefix"], "_INBOX.creds-a");
    assert!(creds["expires_at"].as_i64().unwrap_or(0) > tether_auth::now_unix());
    let token = creds["token"].as_str().expect("token");

    let c = async_nats::ConnectOptions::new()
        .token(token.to_string())
        .custom_inbox_prefix(creds["inbox_prefix"].as_str().expect("prefix"))
        .connect(url.as_str())
        .await
        .expect("the printed credentials connect");
    let keys = c.request("auth.keys", "{}".into()).await.expect("answered");
    assert!(String::from_utf8_lossy(&keys.payload).contains("keys"));

    // The environment form carries the same three things.
    let env = tether(
        &["agent", "creds", "creds-a", "--server", &url],
        f.operator(),
    )
    .await;
    let text = String::from_utf8_lossy(&env.stdout);
    for line in [
        format!("TETHER_NATS_URL={url}"),
        "TETHER_NATS_INBOX_PREFIX=_INBOX.creds-a".to_string(),
        "TETHER_NATS_TOKEN=".to_string(),
    ] {
        assert!(text.contains(&line), "missing {line} in:\n{text}");
    }
}

#[tokio::test]
async fn creds_of_an_unknown_agent_or_without_a_token_are_refused() {
    let f = Fleet::start().await.expect("fleet");
    let url = f.nats.plain_url();
    let out = tether(
        &["agent", "creds", "nobody", "--server", &url],
        f.operator(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No token and no signing key: the bus refuses the CLI's connection, and says why.
    let out = tether(&["agent", "creds", "nobody", "--server", &url], "").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
}
