//! A real `nats-server` per test: free loopback port, temporary JetStream store, kill/restart
//! on the same port and store, and no orphan when the test process dies.
//!
//! Design decision: the server is started through a tiny `sh` watchdog that `exec`s into
//! `nats-server` (so the child's pid *is* the server's) after forking a watcher that blocks on
//! the child's stdin pipe. The test process holds the only write end; when it goes away — also
//! by SIGKILL from a test runner's timeout, when no `Drop` runs — the watcher sees EOF and
//! kills the server. The watcher only kills while it is still the server's child (its parent
//! pid is still the server's pid), so it never hits a reused pid after a deliberate kill.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tether_bus::BusConfig;
use tether_permission_node::access::NodeKind;
use tether_permission_node::callout::CalloutConfig;
use tether_permission_node::server_conf::{ADMIN_USER, BusKeys};

/// Where a test's server listens unless it is for containers.
const LOOPBACK: &str = "127.0.0.1";
/// Where a server for containers listens (they reach it through the host gateway).
const ALL_INTERFACES: &str = "0.0.0.0";

/// The key bundle's folder in the server's temp dir.
const KEYS_DIR: &str = "keys";

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the server to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsServer::stop`] waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Attempts at [`NatsServer::start`] when the picked port was taken in the meantime.
const START_ATTEMPTS: usize = 3;

/// `sh -c WATCHDOG tether-nats BIN CONF`: see the module doc. `exec 3<&0` keeps the stdin pipe
/// for the watcher (an asynchronous list's own stdin is /dev/null); `/proc/self/stat` is read by
/// the `read` builtin, so it describes the watcher itself; its 4th field is the parent pid.
const WATCHDOG: &str = r#"exec 3<&0
(
  while read -r _ <&3; do :; done
  read -r _ _ _ ppid _ </proc/self/stat
  if [ "$ppid" = "$$" ]; then kill -9 "$$" 2>/dev/null; fi
) &
exec 3<&-
exec "$1" -c "$2" </dev/null
"#;

/// A `nats-server -js` child process on a free `127.0.0.1` port with a temporary store, with
/// authorization on (as every tether bus): the accounts, node users and auth callout of a
/// fresh key bundle ([`BusKeys`]) in the temp dir. An anonymous connection is refused; the
/// permission node of a [`crate::Fleet`] answers the callout.
///
/// Dropping it kills the server and removes the store, log and keys (they live in one temp dir).
pub struct NatsServer {
    child: Option<Child>,
    /// Write end of the watchdog's pipe; dropped after the server was signalled.
    watchdog: Option<ChildStdin>,
    port: u16,
    dir: tempfile::TempDir,
    extra_conf: String,
    /// The admin password and the authorization blocks; `None` for [`NatsServer::start_open`].
    auth: Option<(String, String)>,
    /// The address it listens on: loopback, or every interface for
    /// [`NatsServer::start_for_containers`].
    listen_host: &'static str,
    /// The shared token of [`NatsServer::start_with_token`].
    token: Option<String>,
    /// The deployment's subject prefix of [`NatsServer::start_under`]: in the node users'
    /// permissions and in every [`NatsServer::node_bus`].
    subject_prefix: Option<String>,
}

/// Why a spawn did not become a ready server.
pub(crate) enum SpawnError {
    /// The port was taken (by someone else, or not yet released after a kill).
    PortInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl From<SpawnError> for anyhow::Error {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::PortInUse(e) | SpawnError::Other(e) => e,
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    // Bind and release: another process may take the port before the server does; `start`
    // retries on that.
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Where scripts/install-deps.sh keeps the current nats-server line (below the cache dir,
/// `$XDG_CACHE_HOME` or `~/.cache`), unless `TETHER_NATS_CURRENT_DIR` names another folder.
const NATS_CURRENT_DIR: &str = "tether/nats-current";
/// The oldest nats-server line tether works with: auth callout came in 2.10.
const MIN_NATS_SERVER: (u32, u32) = (2, 10);

/// The server binary: `TETHER_NATS_SERVER`, else the current line that scripts/install-deps.sh
/// installs (`bin/nats-server` in `TETHER_NATS_CURRENT_DIR`, default
/// `~/.cache/tether/nats-current`) when it is there, else `nats-server` on `PATH`. A server older
/// than 2.10 is refused; its `--version` is asked once per process.
pub fn binary() -> anyhow::Result<String> {
    static CHECKED: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = pick_binary();
            check_version(&bin).map(|()| bin)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn pick_binary() -> String {
    if let Some(b) = std::env::var("TETHER_NATS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
    {
        return b;
    }
    let current = std::env::var_os("TETHER_NATS_CURRENT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|cache| cache.join(NATS_CURRENT_DIR))
        })
        .map(|d| d.join("bin/nats-server"))
        .filter(|b| b.is_file());
    match current {
        Some(b) => b.to_string_lossy().into_owned(),
        None => "nats-server".into(),
    }
}

/// `bin --version` (`nats-server: v2.10.26`) names 2.10 or later.
fn check_version(bin: &str) -> Result<(), String> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| {
        format!(
            "cannot run `{bin} --version`: {e}: install nats-server (scripts/install-deps.sh) or set TETHER_NATS_SERVER"
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let last = text.split_whitespace().last().unwrap_or("");
    let version = last.trim_start_matches('v');
    let mut nums = version.split(['.', '-']).map(|n| n.parse::<u32>().ok());
    match (nums.next().flatten(), nums.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_NATS_SERVER => Ok(()),
        _ => Err(format!(
            "`{bin} --version` says {text:?}: tether needs nats-server >= {}.{} (auth callout); run scripts/install-deps.sh, or set TETHER_NATS_SERVER to a newer server",
            MIN_NATS_SERVER.0, MIN_NATS_SERVER.1
        )),
    }
}

impl NatsServer {
    /// Starts `nats-server -js` (binary from env `TETHER_NATS_SERVER`, else the current line from
    /// scripts/install-deps.sh, else `nats-server` on `PATH`; older than 2.10 is refused) on a
    /// free `127.0.0.1` port with a temp store dir, and waits (polling, 10 s at most) until it
    /// accepts a client connection and JetStream answers. The server logs to a file in the temp
    /// dir; its tail is part of every start error.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with_config("").await
    }

    /// Like [`NatsServer::start`], listening on every interface instead of loopback only, so
    /// containers reach it through `host.docker.internal` (the host gateway, which is where
    /// the orchestrator's `container_nats_url` points them for a loopback bus URL). The bus
    /// is authorized as always; clients of the test still use `127.0.0.1`.
    pub async fn start_for_containers() -> anyhow::Result<NatsServer> {
        Self::start_inner("", true, ALL_INTERFACES).await
    }

    /// Like [`NatsServer::start`] (or, `for_containers`, [`NatsServer::start_for_containers`])
    /// for a deployment with subject prefix `prefix` (`BusConfig::subject_prefix`): the node
    /// users' permissions are prefixed as the deployment's server config has them, and every
    /// [`NatsServer::node_bus`] carries the prefix, so each node on it — the permission node
    /// and its auth callout included — serves and asks under `<prefix>.`.
    pub async fn start_under(prefix: &str, for_containers: bool) -> anyhow::Result<NatsServer> {
        let token_ok = |t: &str| {
            !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        };
        anyhow::ensure!(
            prefix.split('.').all(token_ok),
            "subject prefix {prefix:?}: give a subject (dot-separated, non-empty tokens) without whitespace or wildcards"
        );
        let listen_host = if for_containers {
            ALL_INTERFACES
        } else {
            LOOPBACK
        };
        Self::start_full("", true, listen_host, None, Some(prefix.to_string())).await
    }

    /// A server WITHOUT authorization: only for a benchmark's baseline (the round trip with
    /// and without authorization). Tests use [`NatsServer::start`].
    pub async fn start_open() -> anyhow::Result<NatsServer> {
        Self::start_inner("", false, LOOPBACK).await
    }

    /// A server whose only authorization is one shared `token` (plain nats-server token
    /// auth, no callout): for a client tested on its own token-file handling, such as the
    /// space daemon before its bus identity exists. [`NatsServer::url`] carries the token
    /// (`nats://<token>@127.0.0.1:PORT`); [`NatsServer::plain_url`] does not.
    pub async fn start_with_token(token: &str) -> anyhow::Result<NatsServer> {
        let conf = format!(
            "authorization {{\n  token: {}\n}}",
            conf_string(Path::new(token))
        );
        Self::start_full(&conf, false, LOOPBACK, Some(token.to_string()), None).await
    }

    /// Like [`NatsServer::start`], with `extra_conf` appended to the generated config file
    /// (nats-server config syntax, e.g. `max_payload: 1MB` or an `accounts { .. }` block).
    /// `listen` and `jetstream` are set by the fixture.
    pub async fn start_with_config(extra_conf: &str) -> anyhow::Result<NatsServer> {
        Self::start_inner(extra_conf, true, LOOPBACK).await
    }

    async fn start_inner(
        extra_conf: &str,
        authorized: bool,
        listen_host: &'static str,
    ) -> anyhow::Result<NatsServer> {
        Self::start_full(extra_conf, authorized, listen_host, None, None).await
    }

    async fn start_full(
        extra_conf: &str,
        authorized: bool,
        listen_host: &'static str,
        token: Option<String>,
        subject_prefix: Option<String>,
    ) -> anyhow::Result<NatsServer> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("tether-nats-")
                .tempdir()
                .context("create temp dir for nats-server")?;
            let auth = if authorized {
                let keys = BusKeys::generate();
                keys.write(&dir.path().join(KEYS_DIR))?;
                let conf = keys.authorization_conf(subject_prefix.as_deref());
                Some((keys.admin_password.clone(), conf))
            } else {
                None
            };
            let mut s = NatsServer {
                child: None,
                watchdog: None,
                port: free_port()?,
                dir,
                extra_conf: extra_conf.to_string(),
                auth,
                listen_host,
                token: token.clone(),
                subject_prefix: subject_prefix.clone(),
            };
            match s.spawn_and_wait().await {
                Ok(()) => return Ok(s),
                Err(SpawnError::PortInUse(e)) => last = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("nats-server did not start"))
            .context(format!("no free port after {START_ATTEMPTS} attempts")))
    }

    /// The URL of the break-glass admin user, `nats://admin:<password>@127.0.0.1:PORT` (every
    /// permission, no callout): what tests connect their own clients with. Without
    /// authorization ([`NatsServer::start_open`]), the plain URL; with a shared token
    /// ([`NatsServer::start_with_token`]), `nats://<token>@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.auth {
            Some((password, _)) => {
                format!("nats://{ADMIN_USER}:{password}@127.0.0.1:{}", self.port)
            }
            None => match &self.token {
                Some(t) => format!("nats://{t}@127.0.0.1:{}", self.port),
                None => self.plain_url(),
            },
        }
    }

    /// `nats://127.0.0.1:PORT`, no credentials: for connections that bring their own (a token
    /// through the callout, a node's nkey), or none (refused).
    pub fn plain_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The key bundle directory ([`BusKeys::write`]); `None` without authorization.
    pub fn keys_dir(&self) -> Option<PathBuf> {
        self.auth.as_ref().map(|_| self.dir.path().join(KEYS_DIR))
    }

    /// The bus config of a node of `kind`, connecting as that kind's own NATS user, under
    /// the server's subject prefix ([`NatsServer::start_under`]) if it has one.
    pub fn node_bus(&self, kind: NodeKind) -> BusConfig {
        BusConfig {
            nats_url: self.plain_url(),
            nats_nkey_file: self.keys_dir().map(|d| BusKeys::node_seed_file(&d, kind)),
            subject_prefix: self.subject_prefix.clone(),
            ..Default::default()
        }
    }

    /// The subject prefix of [`NatsServer::start_under`] (`None` for every other server).
    pub fn subject_prefix(&self) -> Option<&str> {
        self.subject_prefix.as_deref()
    }

    /// Where the fleet's nodes serve `subject`: `<prefix>.<subject>` under a subject prefix,
    /// else `subject` as it is.
    pub fn subject(&self, subject: &str) -> String {
        crate::fleet::prefixed(self.subject_prefix(), subject)
    }

    /// The permission node's auth-callout settings for this server (off without authorization).
    pub fn callout(&self) -> CalloutConfig {
        self.keys_dir()
            .map(|d| CalloutConfig::from_bundle(&d))
            .unwrap_or_default()
    }

    /// The client port (kept across [`NatsServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store dir (kept across [`NatsServer::kill`] and [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// A client connection as the admin user.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        connect(&self.url()).await
    }

    /// Kills the server (SIGKILL) and waits for it; the store dir and port are kept for
    /// [`NatsServer::restart`]. A no-op when it is not running.
    pub async fn kill(&mut self) {
        self.kill_now();
    }

    /// Stops the server gracefully: SIGTERM, then waits (5 s at most, SIGKILL after that).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.watchdog = None;
    }

    /// Starts the server again on the same port with the same store dir (killing it first if
    /// it still runs) and waits until it accepts connections and JetStream answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_now();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                // The port can linger for a moment after a kill, or someone else took it.
                Err(SpawnError::PortInUse(e)) => {
                    if Instant::now() >= deadline {
                        return Err(e.context(format!("port {} stays in use", self.port)));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn write_conf(&self) -> anyhow::Result<()> {
        let store = self.store_dir();
        let conf = format!(
            "# written by tether-testkit\nlisten: {host}:{port}\njetstream {{\n  store_dir: {store}\n}}\n{auth}\n{extra}\n",
            host = self.listen_host,
            port = self.port,
            store = conf_string(&store),
            auth = self.auth.as_ref().map_or("", |(_, conf)| conf.as_str()),
            extra = self.extra_conf,
        );
        std::fs::write(self.conf_path(), conf)
            .with_context(|| format!("write {}", self.conf_path().display()))
    }

    /// A stopped member of a cluster: its own temp dir holding `keys` (one bundle for every
    /// member), `extra_conf` (the cluster block) on `port`. [`NatsServer::spawn`] starts it.
    pub(crate) fn member(keys: &BusKeys, port: u16, extra_conf: String) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tether-nats-")
            .tempdir()
            .context("create temp dir for nats-server")?;
        keys.write(&dir.path().join(KEYS_DIR))?;
        Ok(NatsServer {
            child: None,
            watchdog: None,
            port,
            dir,
            extra_conf,
            auth: Some((keys.admin_password.clone(), keys.authorization_conf(None))),
            listen_host: LOOPBACK,
            token: None,
            subject_prefix: None,
        })
    }

    async fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// Starts the process (without waiting for it to answer).
    pub(crate) fn spawn(&mut self) -> Result<(), SpawnError> {
        self.write_conf().map_err(SpawnError::Other)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .and_then(|f| Ok((f.try_clone()?, f)))
            .with_context(|| format!("open {}", self.log_path().display()))
            .map_err(SpawnError::Other)?;
        let bin = binary().map_err(SpawnError::Other)?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("tether-nats")
            .arg(&bin)
            .arg(self.conf_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log.0))
            .stderr(Stdio::from(log.1))
            .spawn()
            .context("spawn sh for nats-server")
            .map_err(SpawnError::Other)?;
        self.watchdog = child.stdin.take();
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the started server answers (its exit or [`READY_TIMEOUT`] is an error).
    pub(crate) async fn wait_ready(&mut self) -> Result<(), SpawnError> {
        let bin = binary().map_err(SpawnError::Other)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.watchdog = None;
                let log = self.log_tail();
                let e = anyhow::anyhow!(
                    "`{bin} -c {}` exited ({status}); log:\n{log}",
                    self.conf_path().display()
                );
                return Err(if log.contains("address already in use") {
                    SpawnError::PortInUse(e)
                } else if status.code() == Some(127) {
                    SpawnError::Other(e.context(format!(
                        "cannot run `{bin}`: install nats-server (scripts/install-deps.sh) or set TETHER_NATS_SERVER"
                    )))
                } else {
                    SpawnError::Other(e)
                });
            }
            if self.ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_now();
                return Err(SpawnError::Other(anyhow::anyhow!(
                    "nats-server on port {} not ready within {} s; log:\n{}",
                    self.port,
                    READY_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Accepts a connection and JetStream answers. A raw `$JS.API.INFO` request works on 2.9
    /// and 2.1x alike (the typed account query's reply shape differs between versions).
    async fn ready(&self) -> bool {
        let probe = async {
            let client = connect(&self.url()).await.ok()?;
            let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
            let body = String::from_utf8_lossy(&reply.payload);
            Some(body.contains("account_info") && !body.contains("\"error\""))
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Some(true))
        )
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 20)
    }

    /// SIGKILL, then let the watchdog go (it sees that the server is gone), then reap.
    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.watchdog = None;
            let _ = child.wait();
        }
        self.watchdog = None;
    }
}

impl Drop for NatsServer {
    /// Kills and reaps the server; the temp dir (store, log, config) is removed afterwards.
    fn drop(&mut self) {
        self.kill_now();
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// A client of `url` (one server or a comma-separated list; credentials in the URL are used,
/// as tether's own clients use them).
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let opts = tether_bus::connect::options(&crate::fleet::bus(url), "tether-testkit").await?;
    opts.connect(tether_bus::connect::servers(url)?)
        .await
        .with_context(|| format!("connect to {}", tether_bus::connect::display_url(url)))
}

/// A path as a double-quoted nats-server config string.
fn conf_string(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}
