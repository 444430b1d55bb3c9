//! The `model-gateway` binary: serves from a config file, keys from env and file never appear
//! in its log (captured at TRACE) nor in any reply; bad config exits 64.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;

const ENV_KEY: &str = "sk-env-7f3a9c1e5b2d4f6a8c0e";
const FILE_KEY: &str = "sk-file-1b3d5f7h9j2l4n6p8r";

#[tokio::test]
async fn keys_never_appear_in_logs_or_replies() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let env_llm = StandIn::start("env-llm").await;
    let file_llm = StandIn::start("file-llm").await;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("provider.key");
    std::fs::write(&key_path, format!("{FILE_KEY}\n")).unwrap();
    let conf = dir.path().join("tether.toml");
    std::fs::write(
        &conf,
        format!(
            r#"
retry_backoff_ms = 10
retry_backoff_max_ms = 20

[[providers]]
name = "env-keyed"
base_url = "{}"
api_key_env = "GATEWAY_TEST_PROVIDER_KEY"
local = true

[[providers]]
name = "file-keyed"
base_url = "{}"
api_key_file = "{}"

[[routes]]
model = "m-env"
targets = [{{ provider = "env-keyed", upstream_model = "up-env" }}]

[[routes]]
model = "m-file"
targets = [{{ provider = "file-keyed" }}]
"#,
            env_llm.base_url(),
            file_llm.base_url(),
            key_path.display()
        ),
    )
    .unwrap();

    // On its own bus credentials, as a deployed gateway.
    let bus = f.nats.node_bus(tether_testkit::NodeKind::Model);
    let mut child = Command::new(env!("CARGO_BIN_EXE_model-gateway"))
        .arg("--config")
        .arg(&conf)
        .env("TETHER_NATS_URL", &bus.nats_url)
        .env(
            "TETHER_NATS_NKEY_FILE",
            bus.nats_nkey_file.clone().expect("an authorized bus"),
        )
        .env("TETHER_LOG", "trace")
        .env("GATEWAY_TEST_PROVIDER_KEY", ENV_KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes continuously so a chatty trace log can never block the node.
    let mut err = child.stderr.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while f
        .c
        .request("$SRV.PING.model-gateway", "".into())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "model-gateway did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut replies = Vec::new();
    // Both keys are used: the stand-ins see them.
    let r = f
        .call("model.chat", chat_body("m-env", "hi"), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["provider"], "env-keyed");
    assert_eq!(env_llm.last_auth(), Some(format!("Bearer {ENV_KEY}")));
    replies.push(r.to_string());
    let r = f
        .call(
            "model.embed",
            json!({"model": "m-file", "input": ["x"]}),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(file_llm.last_auth(), Some(format!("Bearer {FILE_KEY}")));
    replies.push(r.to_string());
    // A stream.
    let subject = f.c.new_inbox();
    let mut sub = f.c.subscribe(subject.clone()).await.unwrap();
    let r = f.call("model.chat", json!({"model": "m-file", "messages": [{"role": "user", "content": "s"}], "stream": true, "stream_subject": subject}), Some(&token)).await.unwrap();
    replies.push(r.to_string());
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        let p = String::from_utf8_lossy(&m.payload).to_string();
        let done = p.contains("\"done\":true");
        replies.push(p);
        if done {
            break;
        }
    }
    // The provider quotes the key back in its error: the caller gets the reason, redacted.
    env_llm.set_mode(Mode::EchoKey400);
    let e = f
        .call("model.chat", chat_body("m-env", "hi"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.detail.contains("you sent Bearer ***"), "{}", e.detail);
    replies.push(e.detail);
    // Failures that get logged with provider text.
    file_llm.set_mode(Mode::EchoKey400);
    replies.push(
        f.call(
            "model.rank",
            json!({"model": "m-file", "query": "q", "documents": ["d"]}),
            Some(&token),
        )
        .await
        .unwrap_err()
        .detail,
    );
    file_llm.set_mode(Mode::Fail500);
    replies.push(
        f.call("model.chat", chat_body("m-file", "x"), Some(&token))
            .await
            .unwrap_err()
            .detail,
    );
    for s in [
        "$SRV.INFO.model-gateway",
        "$SRV.STATS.model-gateway",
        "$SRV.PING.model-gateway",
    ] {
        let m = f.c.request(s, "".into()).await.unwrap();
        replies.push(String::from_utf8_lossy(&m.payload).to_string());
    }
    replies.push(
        f.call("model.models", json!({}), Some(&token))
            .await
            .unwrap()
            .to_string(),
    );
    let info: serde_json::Value = serde_json::from_str(&replies[replies.len() - 4]).unwrap();
    assert!(
        info["metadata"]["providers"]
            .as_str()
            .unwrap()
            .contains("env-keyed:openai:local")
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let logs = err_reader.join().unwrap() + &out_reader.join().unwrap();
    assert!(logs.contains("node active"), "logs were captured: {logs}");
    assert!(logs.contains("model call"), "usage is traced: {logs}");
    assert!(
        logs.contains("you sent Bearer ***"),
        "provider reasons are logged, redacted"
    );
    for key in [ENV_KEY, FILE_KEY] {
        // The whole key and any long piece of it.
        let piece = &key[3..15];
        assert!(!logs.contains(piece), "a key is in the log");
        for r in &replies {
            assert!(!r.contains(piece), "a key is in a reply: {r}");
        }
    }
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // A key variable that is not set.
        "[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key_env = \"GATEWAY_TEST_UNSET_KEY_VARIABLE\"\n",
        // A key file that does not exist.
        "[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key_file = \"/nonexistent/key\"\n",
        // A route to an unknown provider.
        "[[routes]]\nmodel = \"m\"\ntargets = [{ provider = \"ghost\" }]\n",
        // A typo in a provider key.
        "[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_kye_env = \"X\"\n",
        // Not a URL.
        "[[providers]]\nname = \"p\"\nbase_url = \"localhost\"\n",
    ];
    for (i, conf) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, conf).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_model-gateway"))
            .arg("--config")
            .arg(&path)
            .env("TETHER_NATS_URL", "nats://127.0.0.1:1")
            .env_remove("GATEWAY_TEST_UNSET_KEY_VARIABLE")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "case {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
}
