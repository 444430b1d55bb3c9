//! The `permission-node` binary: makes a dev key when asked, serves on its own bus credentials,
//! answers the bus's auth callout, and never logs secrets (nor the bus's keys).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_auth::{Scope, SigningKey};
use tether_testkit::NatsServer;

#[tokio::test]
async fn binary_serves_and_never_logs_secrets() {
    let nats = NatsServer::start().await.expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let key_path = dir.path().join("keys/signing-key.pem");
    let bus = nats.node_bus(tether_testkit::NodeKind::Permission);
    let callout = nats.callout();
    let path = |p: &Option<std::path::PathBuf>| p.clone().expect("authorized bus");
    let mut child = Command::new(env!("CARGO_BIN_EXE_permission-node"))
        .env("TETHER_NATS_URL", &bus.nats_url)
        .env("TETHER_NATS_NKEY_FILE", path(&bus.nats_nkey_file))
        .env(
            "TETHER_CALLOUT__ISSUER_SEED_FILE",
            path(&callout.issuer_seed_file),
        )
        .env("TETHER_CALLOUT__NKEY_FILE", path(&callout.nkey_file))
        .env(
            "TETHER_CALLOUT__SYSTEM_NKEY_FILE",
            path(&callout.system_nkey_file),
        )
        .env("TETHER_SIGNING_KEY_FILE", &key_path)
        .env("TETHER_CREATE_SIGNING_KEY", "true")
        .env("TETHER_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Drain both pipes continuously so a chatty trace log can never block the node.
    let mut err = child.stderr.take().expect("stderr");
    let mut out = child.stdout.take().expect("stdout");
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
    let c = nats.client().await.expect("client");
    // Wait until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .request("$SRV.PING.permission-node", "".into())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "permission-node did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The dev key was made, 0600 in a 0700 folder.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::metadata(key_path.parent().expect("dir"))
            .expect("dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let pem = std::fs::read_to_string(&key_path).expect("pem");
    let key = SigningKey::from_pem(&pem).expect("key");

    let op = tether_testkit::sign_token(
        &key,
        "operator",
        "",
        [Scope::Operator].into_iter().collect(),
        600,
    )
    .expect("sign");
    let mut h = async_nats::HeaderMap::new();
    h.insert("Authorization", format!("Bearer {op}").as_str());
    let reg = c
        .request_with_headers(
            "agents.register",
            h.clone(),
            r#"{"agent_id":"a1","space":"s1","scopes":["shell:exec"]}"#.into(),
        )
        .await
        .expect("register");
    assert!(
        reg.headers
            .as_ref()
            .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none())
    );
    let issued = c
        .request_with_headers("tokens.issue", h.clone(), r#"{"agent_id":"a1"}"#.into())
        .await
        .expect("issue");
    let issued: serde_json::Value = serde_json::from_slice(&issued.payload).expect("json");
    let token = issued["token"].as_str().expect("token").to_string();
    // A failing request with a token in it, too.
    let mut bad = async_nats::HeaderMap::new();
    bad.insert("Authorization", format!("Bearer {token}x").as_str());
    let _ = c.request_with_headers("agents.list", bad, "".into()).await;
    // The agent connects with its token: the binary's callout lets it in.
    let agent = tether_bus::connect::options(
        &tether_bus::BusConfig {
            nats_url: nats.plain_url(),
            nats_token: Some(tether_bus::config::Secret::new(token.clone())),
            ..Default::default()
        },
        "agent-a1",
    )
    .await
    .expect("options")
    .connect(nats.plain_url())
    .await
    .expect("the callout lets the agent in");
    agent
        .request("auth.keys", "{}".into())
        .await
        .expect("an agent's request");
    let info = c
        .request("$SRV.INFO.permission-node", "".into())
        .await
        .expect("info");
    let info = String::from_utf8_lossy(&info.payload).to_string();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("term");
    let status = child.wait().expect("wait");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let logs = err_reader.join().expect("stderr") + &out_reader.join().expect("stdout");
    assert!(logs.contains("token issued"), "logs were captured: {logs}");
    let pem_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let sig = op.rsplit('.').next().expect("sig");
    let agent_sig = token.rsplit('.').next().expect("sig");
    let seed = |p: &Option<std::path::PathBuf>| {
        std::fs::read_to_string(path(p))
            .expect("seed")
            .trim()
            .to_string()
    };
    let (node_seed, issuer_seed) = (seed(&bus.nats_nkey_file), seed(&callout.issuer_seed_file));
    let (callout_seed, system_seed) = (seed(&callout.nkey_file), seed(&callout.system_nkey_file));
    for (what, secret) in [
        ("signing key", pem_body.as_str()),
        ("operator token", sig),
        ("agent token", agent_sig),
        ("node nkey seed", node_seed.as_str()),
        ("callout issuer seed", issuer_seed.as_str()),
        ("callout user seed", callout_seed.as_str()),
        ("system user seed", system_seed.as_str()),
    ] {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!(
                "{what} appears in the logs: {}",
                &line[..line.len().min(300)]
            );
        }
        assert!(!info.contains(secret), "{what} appears in $SRV.INFO");
    }
}
