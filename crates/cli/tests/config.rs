//! The CLI reads the same configuration layers as the nodes: `tether token issue --operator`
//! signs for the configured issuer and audience, so a fleet configured with other ones than
//! the defaults accepts the token (it refused it when the CLI signed with the defaults).

use std::path::Path;
use std::process::{Command, Output};

use tether_bus::config::AuthConfig;
use tether_bus::{BusConfig, NodeHandle};
use tether_permission_node::PermissionConfig;
use tether_testkit::NatsServer;

const ISSUER: &str = "acme-fleet";
const AUDIENCE: &str = "acme-nodes";

async fn permission_node(nats: &NatsServer, key_file: &Path) -> NodeHandle {
    let bus = BusConfig {
        nats_url: nats.url(),
        auth: AuthConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let key = tether_permission_node::load_or_create_key(key_file, true).expect("key");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    tether_permission_node::build(&bus, PermissionConfig::default(), key, &js)
        .await
        .expect("build")
        .start_with_client(bus, client)
        .await
        .expect("start")
}

/// Runs `tether` in `dir` with no `TETHER_*` from the test's own environment but `env`.
fn tether(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") || k == "NATS_URL" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("tether runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "tether failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

// Multi-threaded: the node in this process serves while the test waits on `tether` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_is_signed_for_the_configured_issuer_and_audience() {
    let nats = NatsServer::start().await.expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("signing-key.pem");
    let node = permission_node(&nats, &key).await;
    let key_arg = key.to_str().expect("utf-8 path");
    let url = nats.url();

    // Configured through the environment, as a node would be.
    let env = [
        ("TETHER_AUTH__ISSUER", ISSUER),
        ("TETHER_AUTH__AUDIENCE", AUDIENCE),
        ("TETHER_NATS_URL", url.as_str()),
    ];
    let token = stdout(&tether(
        dir.path(),
        &["token", "issue", "--operator", "--key-file", key_arg],
        &env,
    ));
    let registered = stdout(&tether(
        dir.path(),
        &[
            "agent",
            "register",
            "a1",
            "--space",
            "s1",
            "--scope",
            "shell:exec",
            "--token",
            &token,
        ],
        &env,
    ));
    assert!(registered.contains("\"a1\""), "{registered}");
    // Without --scope: the default agent scopes, not an agent that can do nothing.
    let defaults = stdout(&tether(
        dir.path(),
        &[
            "agent", "register", "a2", "--space", "s1", "--token", &token,
        ],
        &env,
    ));
    let v: serde_json::Value = serde_json::from_str(&defaults).expect("register answers JSON");
    let mut got: Vec<&str> = v["scopes"]
        .as_array()
        .unwrap_or_else(|| panic!("scopes in {v}"))
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    got.sort_unstable();
    let mut want: Vec<&str> = tether_auth::Scope::AGENT_DEFAULTS
        .iter()
        .map(|s| s.as_str())
        .collect();
    want.sort_unstable();
    assert_eq!(got, want, "{defaults}");
    assert!(!got.contains(&"a2a:serve") && !got.contains(&"operator"));

    // Configured through a file (`--config`), the bus address included.
    let conf = dir.path().join("fleet.toml");
    std::fs::write(
        &conf,
        format!(
            "nats_url = \"{url}\"\nsigning_key_file = \"{key_arg}\"\n[auth]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n"
        ),
    )
    .expect("write config");
    let conf = conf.to_str().expect("utf-8 path");
    let token = stdout(&tether(
        dir.path(),
        &["--config", conf, "token", "issue", "--operator"],
        &[],
    ));
    let listed = stdout(&tether(
        dir.path(),
        &["--config", conf, "agent", "list", "--token", &token],
        &[],
    ));
    assert!(listed.contains("\"a1\""), "{listed}");

    // With the default issuer and audience, the same fleet refuses the token (exit 1, 401).
    let default_token = stdout(&tether(
        dir.path(),
        &["token", "issue", "--operator", "--key-file", key_arg],
        &[],
    ));
    let refused = tether(
        dir.path(),
        &["agent", "list", "--token", &default_token],
        &[("TETHER_NATS_URL", url.as_str())],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    node.shutdown().await.expect("shutdown");
}

/// `tether ping <node>` as a container probe runs it: the node's own NATS user (its nkey
/// file), no token. An instance on this host answers: 0; no such node: 3; a bad name: 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_finds_the_node_on_this_host_as_its_own_bus_user() {
    let nats = NatsServer::start().await.expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let node = permission_node(&nats, &dir.path().join("key.pem")).await;
    let own = nats.node_bus(tether_testkit::NodeKind::Permission);
    let nkey = own
        .nats_nkey_file
        .as_ref()
        .and_then(|p| p.to_str())
        .expect("nkey file")
        .to_string();
    let url = nats.plain_url();
    let env = [
        ("TETHER_NATS_URL", url.as_str()),
        ("TETHER_NATS_NKEY_FILE", nkey.as_str()),
    ];
    let ok = tether(dir.path(), &["ping", "permission-node"], &env);
    let out = stdout(&ok);
    assert!(out.starts_with("permission-node "), "{out}");
    let none = tether(
        dir.path(),
        &["ping", "model-gateway", "--any", "--timeout", "300ms"],
        &env,
    );
    assert_eq!(none.status.code(), Some(3), "{none:?}");
    let bad = tether(dir.path(), &["ping", "a.b", "--timeout", "300ms"], &env);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    node.shutdown().await.expect("stop");
    let gone = tether(
        dir.path(),
        &["ping", "permission-node", "--timeout", "500ms"],
        &env,
    );
    assert_eq!(
        gone.status.code(),
        Some(3),
        "a stopped node does not answer: {gone:?}"
    );
}
