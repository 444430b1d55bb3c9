//! The MCP tool `exec_command` with the official Python MCP client (`mcp` 2.x) over stdio
//! (`shell-server mcp --stdio` launched by the client) and streamable HTTP, on the local
//! fallback (no Docker needed): tool listing, calls, the remembering shell, tool errors, and
//! refusal without a valid token.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};

const AGENT: &[&str] = &["shell:exec"];

fn result(v: &Value, i: usize) -> &Value {
    &v["results"][i]
}

fn stdout(v: &Value, i: usize) -> String {
    result(v, i)["structured"]["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("no stdout in result {i}: {v}"))
        .to_string()
}

fn check_tool_listed(v: &Value) {
    let tools = v["tools"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(tools.len(), 1, "{v}");
    assert_eq!(tools[0]["name"], "exec_command");
    let schema = &tools[0]["input_schema"];
    assert_eq!(schema["required"], json!(["command"]));
    for p in ["command", "workdir", "timeout_seconds"] {
        assert!(schema["properties"][p].is_object(), "{p} in {schema}");
    }
}

/// The same conversation over either transport.
fn conversation(dir: &std::path::Path) -> Vec<Value> {
    let x = dir.join("x");
    std::fs::create_dir_all(&x).unwrap();
    vec![
        exec_call(json!({"command": "echo hello"})),
        exec_call(json!({"command": format!("cd {} && echo line >> f", x.display())})),
        exec_call(json!({"command": "pwd; cat f"})),
        exec_call(json!({"command": "echo oops >&2; exit 3"})),
        exec_call(json!({"command": "sleep 30", "timeout_seconds": 0.5})),
        exec_call(json!({"command": "true", "container": "someone-else"})),
        exec_call(json!({"command": "true", "space": "other"})),
        exec_call(json!({"workdir": "/tmp"})),
        exec_call(json!({"command": "pwd", "reset": true})),
    ]
}

fn check_conversation(v: &Value, dir: &std::path::Path) {
    assert_eq!(v["error"], Value::Null, "{v}");
    check_tool_listed(v);
    let x = dir.join("x");
    assert_eq!(stdout(v, 0), "hello\n");
    assert_eq!(result(v, 0)["is_error"], false);
    assert!(result(v, 0)["text"].as_str().unwrap().contains("hello"));
    // cd persisted; the side effect ran once.
    assert_eq!(stdout(v, 2), format!("{}\nline\n", x.display()));
    // A non-zero exit is a normal result with its code.
    assert_eq!(result(v, 3)["is_error"], false, "{v}");
    assert_eq!(result(v, 3)["structured"]["exit_code"], 3);
    assert_eq!(result(v, 3)["structured"]["stderr"], "oops\n");
    assert!(
        result(v, 3)["text"]
            .as_str()
            .unwrap()
            .contains("[exit code 3")
    );
    assert_eq!(result(v, 4)["structured"]["timed_out"], true);
    // Naming a container or space is a tool error with the reason; so are bad arguments.
    for i in [5, 6, 7] {
        assert_eq!(result(v, i)["is_error"], true, "{i}: {v}");
        assert!(
            result(v, i)["text"].as_str().unwrap().starts_with("400"),
            "{v}"
        );
    }
    assert!(
        result(v, 5)["text"]
            .as_str()
            .unwrap()
            .contains("space of your token")
    );
    assert_eq!(stdout(v, 8), format!("{}\n", dir.display()), "reset");
    assert_eq!(std::fs::read_to_string(x.join("f")).unwrap(), "line\n");
}

#[tokio::test]
async fn python_client_over_stdio() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let t = f.agent("a1", "s1", AGENT).await;
    let wd = dir.path().to_str().unwrap();
    let server = stdio_server(
        &f.node_bus(tether_testkit::NodeKind::Shell),
        Some(&t),
        &[
            ("TETHER_ALLOW_LOCAL_EXEC", "true"),
            ("TETHER_LOCAL_WORKDIR", wd),
        ],
    );
    let v = python_mcp(json!({
        "transport": "stdio",
        "server": server,
        "calls": conversation(dir.path()),
    }))
    .await;
    check_conversation(&v, dir.path());
}

#[tokio::test]
async fn python_client_over_stdio_without_a_valid_token_runs_nothing() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().to_str().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let no_scope = f.agent("a2", "s1", &["containers:exec"]).await;
    for (token, status) in [
        (None, "401"),
        (Some("garbage"), "401"),
        (Some(no_scope.as_str()), "403"),
    ] {
        let server = stdio_server(
            &f.node_bus(tether_testkit::NodeKind::Shell),
            token,
            &[
                ("TETHER_ALLOW_LOCAL_EXEC", "true"),
                ("TETHER_LOCAL_WORKDIR", wd),
            ],
        );
        let v = python_mcp(json!({
            "transport": "stdio",
            "server": server,
            "calls": [exec_call(json!({"command": touch}))],
        }))
        .await;
        assert_eq!(v["error"], Value::Null, "{v}");
        check_tool_listed(&v);
        assert_eq!(result(&v, 0)["is_error"], true, "{v}");
        let text = result(&v, 0)["text"].as_str().unwrap();
        assert!(text.starts_with(status), "{token:?}: {text}");
        assert!(!marker.exists(), "nothing ran");
    }
}

#[tokio::test]
async fn python_client_over_streamable_http() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let url = shell.mcp_url().unwrap();
    let t = f.agent("a1", "s1", AGENT).await;
    let v = python_mcp(json!({
        "transport": "http",
        "url": url,
        "token": t,
        "calls": conversation(dir.path()),
    }))
    .await;
    check_conversation(&v, dir.path());

    // The same shell session is seen from the bus (state lives in KV, not in a connection).
    f.sh_ok(&t, &format!("cd {}", dir.path().join("x").display()))
        .await;
    let v = python_mcp(json!({
        "transport": "http", "url": url, "token": t,
        "calls": [exec_call(json!({"command": "pwd"}))],
    }))
    .await;
    assert_eq!(
        stdout(&v, 0),
        format!("{}\n", dir.path().join("x").display())
    );
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn python_client_over_http_without_a_valid_token_runs_nothing() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let url = shell.mcp_url().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    for token in [None, Some("garbage")] {
        let v = python_mcp(json!({
            "transport": "http", "url": url, "token": token,
            "calls": [exec_call(json!({"command": touch}))],
        }))
        .await;
        let err = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{token:?}: {v}"));
        assert!(err.contains("401 Unauthorized"), "{err}");
        let why = if token.is_none() {
            "missing Authorization header"
        } else {
            "invalid token"
        };
        assert!(err.contains(why), "{err}");
        assert!(v["results"].as_array().unwrap().is_empty());
    }
    // A valid token without `shell:exec`: the tool says 403.
    let no_scope = f.agent("a2", "s1", &["containers:exec"]).await;
    let v = python_mcp(json!({
        "transport": "http", "url": url, "token": no_scope,
        "calls": [exec_call(json!({"command": touch}))],
    }))
    .await;
    assert_eq!(result(&v, 0)["is_error"], true, "{v}");
    assert!(
        result(&v, 0)["text"].as_str().unwrap().starts_with("403"),
        "{v}"
    );
    assert!(!marker.exists(), "nothing ran");

    // Plain HTTP without a token: 401 with a Problem body, before MCP.
    // (The server shares this test's runtime: the client must not block it.)
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, httpx2; r = httpx2.post(sys.argv[1], json={}); print(r.status_code, r.headers.get('www-authenticate'), r.json()['error']['data']['status'])",
                &u,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("401 Bearer error=\"invalid_token\" 401"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shell.shutdown().await.unwrap();
}
