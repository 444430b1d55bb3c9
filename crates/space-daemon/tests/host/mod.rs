//! The one way the host tests (`exec.rs`, `pool.rs`) run `tether-spaced`: a child process of
//! the test (a child subreaper, not PID 1) on a real nats-server that takes one token, ended
//! by SIGTERM (then SIGKILL) when dropped. `TETHER_SPACED_BIN` runs another build of the
//! binary (a release or static one) instead of the one next to the tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_space_daemon::client::{self, Failure};
use tether_testkit::{NatsServer, cargo_bin, eventually};

pub const WAIT: Duration = Duration::from_secs(20);
/// The token the test server takes.
pub const TOKEN: &str = "daemon-test-token";

/// A daemon process serving `space` (with its files in `_dir`), ended when dropped.
pub struct Daemon {
    pub child: Child,
    pub space: String,
    pub _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    /// SIGTERM first, which the daemon forwards to its running commands, so no command of a
    /// test outlives it on the host; SIGKILL if it has not exited within the wait.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server taking [`TOKEN`], and a client of it.
pub async fn server() -> (NatsServer, async_nats::Client) {
    let nats = NatsServer::start_with_token(TOKEN)
        .await
        .expect("nats-server");
    let client = tether_testkit::connect(&nats.url()).await.expect("client");
    (nats, client)
}

/// The daemon's command, on `nats`, with its input from /dev/null; the caller adds the rest.
pub fn command(nats: &NatsServer) -> Command {
    let bin = match std::env::var_os("TETHER_SPACED_BIN") {
        Some(b) => std::path::PathBuf::from(b),
        None => cargo_bin("tether-spaced").expect("tether-spaced built"),
    };
    let mut cmd = Command::new(bin);
    cmd.env(
        "TETHER_NATS_URL",
        format!("nats://127.0.0.1:{}", nats.port()),
    )
    .stdin(Stdio::null());
    cmd
}

/// Waits until the daemon of `space` answers (it connects in the background).
pub async fn ready(client: &async_nats::Client, space: &str) {
    eventually(WAIT, "the daemon serves exec", || async {
        let req = tether_proto::DaemonExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        match client::exec(client, space, &req, WAIT).await {
            Ok(_) => Some(()),
            Err(Failure::NoResponders) => None,
            Err(e) => panic!("first exec: {e:?}"),
        }
    })
    .await;
}

/// The daemon's exec server: its one child named `spaced-exec`, if there is one now.
pub fn exec_server(d: &Daemon) -> Option<u32> {
    let init = d.child.id();
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
    let found: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == tether_space_daemon::server::NAME)
        })
        .collect();
    match found[..] {
        [pid] => Some(pid),
        _ => None,
    }
}
