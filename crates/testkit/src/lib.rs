//! Test fixtures against real parts: a real `nats-server` per test and the real Docker engine.
//!
//! [`NatsServer`] starts `nats-server -js` (from `TETHER_NATS_SERVER` or `PATH`) on a free
//! loopback port with a temporary store, can be killed and restarted on the same port and
//! store for fault tests, and is killed when dropped — also when the test panics.
//! [`docker::busybox_image`] builds the one test image (`FROM scratch` + Debian's static
//! busybox) once per machine, since no registry is reachable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A nats-server child process with JetStream on.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra_conf: String,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn binary() -> String {
    std::env::var("TETHER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections and JetStream answers.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with_config("").await
    }

    /// Like [`NatsServer::start`], with extra lines for the server's config file.
    pub async fn start_with_config(extra_conf: &str) -> anyhow::Result<NatsServer> {
        let mut last = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("tether-nats-").tempdir()?;
            let mut s = NatsServer {
                child: None,
                port: free_port()?,
                dir,
                extra_conf: extra_conf.to_string(),
            };
            match s.spawn_and_wait().await {
                Ok(()) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let store = self.dir.path().join("store");
        let conf = format!(
            "listen: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n{}\n",
            self.port,
            store.display().to_string(),
            self.extra_conf
        );
        std::fs::write(self.conf_path(), conf)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(self.conf_path())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start `{}` (install nats-server or set TETHER_NATS_SERVER)",
                    binary()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                anyhow::bail!("nats-server exited ({status}): {}", self.log_tail());
            }
            if let Ok(Ok(client)) =
                tokio::time::timeout(Duration::from_secs(1), async_nats::connect(self.url())).await
            {
                // A raw `$JS.API.INFO` works on 2.9 and 2.1x alike (the typed account query's
                // reply shape differs between server versions).
                let info = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request("$JS.API.INFO", "".into()),
                )
                .await;
                if let Ok(Ok(m)) = info
                    && String::from_utf8_lossy(&m.payload).contains("account_info")
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.kill_now();
                anyhow::bail!("nats-server not ready within 10 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connect to {}", self.url()))
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL; the port and store are kept for [`NatsServer::restart`].
    pub async fn kill(&mut self) {
        self.kill_now();
    }

    /// Graceful stop (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_now();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                // The port may linger briefly after a kill.
                Err(e) if Instant::now() < deadline => {
                    tracing_note(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn tracing_note(e: &anyhow::Error) {
    eprintln!("testkit: nats-server restart retry: {e}");
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A binary of this workspace, found next to the running test executable.
pub fn cargo_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/test-xxxx → target/<profile>/<name>
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        anyhow::bail!(
            "{} is not built: run `cargo build --workspace --bins` (or `cargo nextest run --workspace`)",
            p.display()
        )
    }
}

pub mod docker {
    //! The Docker engine for tests, through the `docker` CLI (test support only: the
    //! orchestrator itself talks to the engine through bollard).

    use std::process::Command;

    use anyhow::Context;

    pub const BUSYBOX_IMAGE: &str = "tether-test/busybox:latest";

    /// True when the engine answers.
    pub fn available() -> bool {
        Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn image_exists(tag: &str) -> bool {
        Command::new("docker")
            .args(["image", "inspect", tag])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Builds `tether-test/busybox:latest` (`FROM scratch` + static busybox with its applets,
    /// `/tmp` and `/work`) once per machine; concurrent callers wait on a file lock.
    pub fn busybox_image() -> anyhow::Result<String> {
        if image_exists(BUSYBOX_IMAGE) {
            return Ok(BUSYBOX_IMAGE.into());
        }
        let lock_path = std::env::temp_dir().join("tether-test-busybox.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))?;
        if image_exists(BUSYBOX_IMAGE) {
            return Ok(BUSYBOX_IMAGE.into());
        }
        let busybox = std::env::var("TETHER_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into());
        let ctx = tempfile::tempdir()?;
        let root = ctx.path().join("root");
        for d in ["bin", "tmp", "work", "etc"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy(&busybox, root.join("bin/busybox"))
            .with_context(|| format!("copy {busybox} (apt-get install busybox-static)"))?;
        let list = Command::new(&busybox)
            .arg("--list")
            .output()
            .context("busybox --list")?;
        for applet in String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox")
        {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )?;
        std::fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n")?;
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY root/ /\nRUN chmod 1777 /tmp\nENV PATH=/bin\nCMD [\"sh\"]\n",
        )?;
        let out = Command::new("docker")
            .args(["build", "-q", "-t", BUSYBOX_IMAGE])
            .arg(ctx.path())
            .output()
            .context("docker build")?;
        if !out.status.success() {
            anyhow::bail!(
                "docker build of {BUSYBOX_IMAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(BUSYBOX_IMAGE.into())
    }
}
