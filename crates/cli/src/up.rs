//! `tether up`: bring a fleet up from a launch file, keep it up, take it down in order.
//!
//! A launch file (TOML, in the spirit of ROS 2 launch files):
//!
//! ```toml
//! secrets_file = "../.tether/secrets.env"      # optional KEY=VALUE lines, injected, never logged
//!
//! [bus]
//! url = "nats://127.0.0.1:4222"
//! server_config = "../nats/nats-server.conf"   # used (with authorization added) when nothing answers
//!
//! [parameters]                                 # given to every node as TETHER_<KEY>
//! log = "info"
//!
//! [[nodes]]
//! name = "permission-node"
//! command = "permission-node"
//! args = []
//! env = { TETHER_CREATE_SIGNING_KEY = "true" }
//! replicas = 1
//! restart = "on-failure"                       # never | on-failure | always
//! depends_on = []
//! ready_timeout_seconds = 30
//! bus_user = "permission-node"                 # a node kind's bus credentials (default: its
//!                                              # name's, if a kind), or "admin"
//!
//! [[workers]]                                  # deployed once every node is ready, removed
//! name = "echo"                                # on stop: [`crate::up_workers`]
//! agent = "echo-w"
//! image = "tether/a2a-echo-worker:dev"
//! ```
//!
//! Relative paths are resolved against the launch file's folder. Nodes start in dependency
//! order, and a node starts only after everything it depends on answers `$SRV.PING.<name>`
//! (enforced: a dependency that never answers stops the bringup). Each replica is its own
//! process group; output lines are prefixed `[name#replica]`. On SIGINT/SIGTERM everything
//! stops in reverse order (SIGTERM, a grace period, then SIGKILL), the nats-server we
//! started last of all.
//!
//! The bus authorizes every connection: the server `tether up` starts runs with the key
//! bundle of [`crate::bus_access`], `tether up` itself talks to it as the bundle's admin, and
//! each node gets only its own kind's credentials.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::{CliError, EXIT_CONFIG};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchFile {
    #[serde(default)]
    pub bus: BusSection,
    #[serde(default)]
    pub secrets_file: Option<PathBuf>,
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    /// Worker deployments made once every node is ready ([`crate::up_workers`]).
    #[serde(default)]
    pub workers: Vec<crate::up_workers::WorkerEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSection {
    #[serde(default = "default_url")]
    pub url: String,
    #[serde(default)]
    pub server_config: Option<PathBuf>,
}

impl Default for BusSection {
    fn default() -> Self {
        Self {
            url: default_url(),
            server_config: None,
        }
    }
}

fn default_url() -> String {
    tether_bus::config::DEFAULT_NATS_URL.into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    Never,
    #[default]
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub restart: Restart,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default = "thirty")]
    pub ready_timeout_seconds: u64,
    /// The bus credentials it gets: a node kind's name (default: its own name, when that is
    /// one), or `admin` (every permission: for development nodes of your own).
    #[serde(default)]
    pub bus_user: Option<String>,
}

fn one() -> u32 {
    1
}
fn thirty() -> u64 {
    30
}

fn config_err(m: impl Into<String>) -> CliError {
    CliError::new(EXIT_CONFIG, m)
}

impl LaunchFile {
    /// Parses and validates; returns the nodes in start order.
    pub fn parse(text: &str) -> Result<(LaunchFile, Vec<usize>), CliError> {
        let lf: LaunchFile =
            toml::from_str(text).map_err(|e| config_err(format!("invalid launch file: {e}")))?;
        let mut names = HashSet::new();
        for n in &lf.nodes {
            if !tether_bus::subject::is_valid_token(&n.name) {
                return Err(config_err(format!(
                    "node name {:?}: use A-Z a-z 0-9 - _",
                    n.name
                )));
            }
            if !names.insert(n.name.as_str()) {
                return Err(config_err(format!("node `{}` is listed twice", n.name)));
            }
            if n.command.trim().is_empty() {
                return Err(config_err(format!("node `{}` has no command", n.name)));
            }
            if n.replicas == 0 || n.replicas > 64 {
                return Err(config_err(format!(
                    "node `{}`: replicas must be 1..=64",
                    n.name
                )));
            }
            if let Some(u) = n.bus_user.as_deref()
                && !crate::bus_access::is_bus_user(u)
            {
                return Err(config_err(format!(
                    "node `{}`: unknown bus_user {u:?} (a node kind's name, or admin)",
                    n.name
                )));
            }
        }
        for n in &lf.nodes {
            for d in &n.depends_on {
                if !names.contains(d.as_str()) {
                    return Err(config_err(format!(
                        "node `{}` depends on `{d}`, which is not in the launch file",
                        n.name
                    )));
                }
            }
        }
        crate::up_workers::check(&lf.workers)?;
        let order = topo_order(&lf.nodes)?;
        Ok((lf, order))
    }
}

fn topo_order(nodes: &[NodeSpec]) -> Result<Vec<usize>, CliError> {
    let idx: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut state = vec![0u8; nodes.len()]; // 0 new, 1 visiting, 2 done
    let mut order = Vec::new();
    fn visit(
        i: usize,
        nodes: &[NodeSpec],
        idx: &HashMap<&str, usize>,
        state: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), CliError> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                return Err(config_err(format!(
                    "dependency cycle through `{}`",
                    nodes[i].name
                )));
            }
            _ => {}
        }
        state[i] = 1;
        for d in &nodes[i].depends_on {
            visit(idx[d.as_str()], nodes, idx, state, order)?;
        }
        state[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..nodes.len() {
        visit(i, nodes, &idx, &mut state, &mut order)?;
    }
    Ok(order)
}

/// Env name for a `[parameters]` key: `log` → `TETHER_LOG`; an upper-case name is kept.
pub fn param_env_name(key: &str) -> String {
    if key
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        key.to_string()
    } else {
        format!(
            "TETHER_{}",
            key.to_ascii_uppercase().replace(['-', '.'], "_")
        )
    }
}

fn param_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads `KEY=VALUE` lines (comments and blanks skipped).
pub fn read_secrets(path: &Path) -> Result<Vec<(String, String)>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_err(format!("cannot read secrets file {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            config_err(format!("{}:{}: expected KEY=VALUE", path.display(), n + 1))
        })?;
        out.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
    }
    Ok(out)
}

/// Finds a node's binary: a path, else next to this executable, else on PATH.
pub fn resolve_command(command: &str, base: &Path) -> PathBuf {
    if command.contains('/') {
        let p = PathBuf::from(command);
        return if p.is_absolute() { p } else { base.join(p) };
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join(command);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(command)
}

fn log(msg: &str) {
    println!("[tether] {msg}");
}

fn signal_group(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // The child leads its own process group: signal the whole group.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
    }
}

async fn terminate(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    signal_group(pid, nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

fn pipe_output(child: &mut Child, prefix: String) {
    if let Some(out) = child.stdout.take() {
        let p = prefix.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                println!("{p} {l}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                println!("{prefix} {l}");
            }
        });
    }
}

/// Everything a replica needs to be (re)started.
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    fn spawn(&self, prefix: &str) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        pipe_output(&mut child, prefix.to_string());
        Ok(child)
    }
}

/// Runs one replica: start, restart per policy with backoff, stop when told.
async fn supervise(
    launch: Arc<Launch>,
    policy: Restart,
    prefix: String,
    stop: CancellationToken,
    first: Child,
) {
    let mut child = first;
    let mut failures = 0u32;
    loop {
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop.cancelled() => {
                terminate(&mut child, Duration::from_secs(10)).await;
                return;
            }
        };
        let ok = status.as_ref().is_ok_and(|s| s.success());
        let restart = match policy {
            Restart::Never => false,
            Restart::OnFailure => !ok,
            Restart::Always => true,
        };
        log(&format!(
            "{prefix} exited ({}){}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string()),
            if restart { "; restarting" } else { "" }
        ));
        if !restart {
            // Wait for the bringup to end.
            stop.cancelled().await;
            return;
        }
        failures = failures.saturating_add(1);
        let backoff = Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)))
            .min(Duration::from_secs(30));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        match launch.spawn(&prefix) {
            Ok(c) => {
                log(&format!("{prefix} restarted, pid {}", c.id().unwrap_or(0)));
                child = c;
            }
            Err(e) => {
                log(&format!("{prefix} could not be restarted: {e}"));
                stop.cancelled().await;
                return;
            }
        }
    }
}

/// Waits until `replicas` instances of `name` answer `$SRV.PING.<name>`.
async fn wait_ready(
    client: &async_nats::Client,
    name: &str,
    replicas: u32,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let inbox = client.new_inbox();
        if let Ok(mut sub) = client.subscribe(inbox.clone()).await {
            let _ = client
                .publish_with_reply(format!("$SRV.PING.{name}"), inbox, "".into())
                .await;
            let mut ids = HashSet::new();
            let window = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(Some(m)) = tokio::time::timeout_at(window, sub.next()).await {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload)
                    && let Some(id) = v["id"].as_str()
                {
                    ids.insert(id.to_string());
                }
            }
            if ids.len() >= replicas as usize {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Options of `tether up`.
pub struct UpArgs {
    pub launch: PathBuf,
    /// Overrides `[bus].url`.
    pub server: Option<String>,
}

/// Brings the fleet up and keeps it up until `shutdown` resolves.
pub async fn up(
    args: UpArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.launch).map_err(|e| {
        config_err(format!(
            "cannot read launch file {}: {e}",
            args.launch.display()
        ))
    })?;
    let (lf, order) = LaunchFile::parse(&text)?;
    let base = args
        .launch
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let url = crate::up_bus::bus_url(args.server.as_deref(), &lf.bus.url, |k| {
        std::env::var(k).ok()
    });
    let secrets = match &lf.secrets_file {
        Some(p) => {
            let p = base.join(p);
            if p.exists() {
                read_secrets(&p)?
            } else {
                Vec::new()
            }
        }
        None => Vec::new(),
    };
    tokio::pin!(shutdown);

    // The bus: use the one that answers, or start one.
    let mut nats_child: Option<Child> = None;
    // The bus checks every connection: `tether up` talks to it as the bundle's admin user,
    // and each node connects as its own kind's user.
    let access = crate::bus_access::LocalBus::load_or_create()?;
    let admin = access.admin_url(&url);
    let client =
        match tokio::time::timeout(Duration::from_secs(2), crate::up_bus::admin_connect(&admin))
            .await
        {
            Ok(Ok(c)) => {
                log(&format!("using the bus at {url}"));
                c
            }
            _ => {
                crate::up_bus::refuse_to_start_a_server(&url).await?;
                let (host, port) = crate::up_bus::host_port(&url);
                let mut cmd = Command::new(
                    std::env::var("TETHER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into()),
                );
                let conf = access.write_server_conf(
                    lf.bus
                        .server_config
                        .as_ref()
                        .map(|p| base.join(p))
                        .as_deref(),
                )?;
                cmd.arg("-c").arg(conf);
                cmd.args(["-a", host.as_str(), "-p", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .kill_on_drop(true);
                let mut child = cmd
                    .spawn()
                    .map_err(|e| CliError::new(1, format!("cannot start nats-server: {e}")))?;
                pipe_output(&mut child, "[nats-server]".into());
                log(&format!(
                    "started nats-server, pid {}, at {url}",
                    child.id().unwrap_or(0)
                ));
                nats_child = Some(child);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                loop {
                    if let Ok(Ok(c)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        crate::up_bus::admin_connect(&admin),
                    )
                    .await
                    {
                        break c;
                    }
                    if tokio::time::Instant::now() > deadline {
                        if let Some(c) = nats_child.as_mut() {
                            terminate(c, Duration::from_secs(5)).await;
                        }
                        return Err(CliError::new(
                            1,
                            format!("nats-server did not come up at {url}"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };

    let mut common: Vec<(String, String)> = vec![("TETHER_NATS_URL".into(), url.clone())];
    for (k, v) in &lf.parameters {
        common.push((param_env_name(k), param_value(v)));
    }
    common.extend(secrets);

    // Start in order; each stage's supervisors, so we can stop in reverse.
    let mut stages: Vec<(String, CancellationToken, Vec<tokio::task::JoinHandle<()>>)> = Vec::new();
    let mut failed: Option<CliError> = None;
    for &i in &order {
        let n = &lf.nodes[i];
        let mut env = common.clone();
        env.extend(access.node_env(&n.name, n.bus_user.as_deref(), &url));
        env.extend(n.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let launch = Arc::new(Launch {
            program: resolve_command(&n.command, &base),
            args: n.args.clone(),
            env,
        });
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for r in 0..n.replicas {
            let prefix = format!("[{}#{r}]", n.name);
            match launch.spawn(&prefix) {
                Ok(c) => {
                    log(&format!("started {prefix} pid {}", c.id().unwrap_or(0)));
                    tasks.push(tokio::spawn(supervise(
                        launch.clone(),
                        n.restart,
                        prefix,
                        stop.clone(),
                        c,
                    )));
                }
                Err(e) => {
                    failed = Some(CliError::new(
                        1,
                        format!(
                            "cannot start {} ({}): {e}",
                            n.name,
                            launch.program.display()
                        ),
                    ));
                    break;
                }
            }
        }
        stages.push((n.name.clone(), stop, tasks));
        if failed.is_some() {
            break;
        }
        let ready = tokio::select! {
            r = wait_ready(&client, &n.name, n.replicas, Duration::from_secs(n.ready_timeout_seconds)) => r,
            _ = &mut shutdown => { failed = Some(CliError::new(0, "interrupted")); false }
        };
        if failed.is_some() {
            break;
        }
        if !ready {
            failed = Some(CliError::new(
                1,
                format!(
                    "{} did not answer $SRV.PING.{} within {} s",
                    n.name, n.name, n.ready_timeout_seconds
                ),
            ));
            break;
        }
        log(&format!("{} is ready", n.name));
    }

    let mut deployed = Vec::new();
    if failed.is_none() {
        let (names, r) = tokio::select! {
            r = crate::up_workers::bring_up(&client, &lf.workers) => r,
            _ = &mut shutdown => (Vec::new(), Err(CliError::new(0, "interrupted"))),
        };
        deployed = names;
        failed = r.err();
    }
    if failed.is_none() {
        log("fleet is up; Ctrl-C stops it");
        shutdown.await;
    }
    log("stopping");
    crate::up_workers::take_down(&client, &deployed).await;
    for (name, stop, tasks) in stages.into_iter().rev() {
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        log(&format!("{name} stopped"));
    }
    if let Some(mut c) = nats_child {
        terminate(&mut c, Duration::from_secs(10)).await;
        log("nats-server stopped");
    }
    match failed {
        Some(e) if e.code != 0 => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<String>, i32> {
        LaunchFile::parse(s)
            .map(|(lf, o)| o.into_iter().map(|i| lf.nodes[i].name.clone()).collect())
            .map_err(|e| e.code)
    }

    #[test]
    fn orders_by_dependencies() {
        let f = r#"
[[nodes]]
name = "c"
command = "x"
depends_on = ["b"]
[[nodes]]
name = "a"
command = "x"
[[nodes]]
name = "b"
command = "x"
depends_on = ["a"]
"#;
        assert_eq!(parse(f), Ok(vec!["a".to_string(), "b".into(), "c".into()]));
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\ndepends_on = [\"zz\"]",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\ndepends_on = [\"b\"]\n[[nodes]]\nname = \"b\"\ncommand = \"x\"\ndepends_on = [\"a\"]",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\n[[nodes]]\nname = \"a\"\ncommand = \"y\"",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\nreplcas = 2",
            "[[nodes]]\nname = \"a b\"\ncommand = \"x\"",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\nrestart = \"sometimes\"",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\nreplicas = 0",
            "[[nodes]]\nname = \"a\"\ncommand = \"x\"\nbus_user = \"root\"",
            "not toml [",
        ] {
            assert_eq!(parse(bad), Err(EXIT_CONFIG), "{bad}");
        }
    }

    #[test]
    fn env_names_and_secrets() {
        assert_eq!(param_env_name("log"), "TETHER_LOG");
        assert_eq!(
            param_env_name("allow-local-exec"),
            "TETHER_ALLOW_LOCAL_EXEC"
        );
        assert_eq!(param_env_name("RUST_BACKTRACE"), "RUST_BACKTRACE");
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("s.env");
        std::fs::write(&p, "# c\nA=1\n\nB = \"two\"\n").expect("write");
        assert_eq!(
            read_secrets(&p).expect("read"),
            vec![("A".into(), "1".into()), ("B".into(), "two".into())]
        );
        std::fs::write(&p, "oops\n").expect("write");
        assert!(read_secrets(&p).is_err());
    }
}
