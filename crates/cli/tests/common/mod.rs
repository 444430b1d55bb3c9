//! What the CLI's end-to-end tests share: the `tether` binary run as a user would.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `tether` off the test's runtime (the fleet's auth callout must answer its connect).
pub async fn tether(args: &[&str], token: &str) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let token = token.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(&args);
        for (k, _) in std::env::vars() {
            if k.starts_with("TETHER_") || k == "NATS_URL" {
                cmd.env_remove(k);
            }
        }
        cmd.env("TETHER_TOKEN", &token)
            .env("TETHER_SIGNING_KEY_FILE", "/nonexistent/key.pem")
            .output()
            .expect("tether runs")
    })
    .await
    .expect("join")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
