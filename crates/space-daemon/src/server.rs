//! The exec server: the second process of the daemon, started (and restarted) by the init
//! (`supervisor`) as `/proc/self/exe` with [`ENV_SERVE_FOR`] set, which serves exec on the bus.
//!
//! Design decisions:
//! - Its own session (`setsid`): every command it starts leads its own process group inside
//!   this session, so when the server dies the init finds what it left by session id and
//!   kills it (`kill::kill_session`) — no command runs on unsupervised past its deadline.
//! - A child subreaper, so orphans of its commands come to it (its reaper reaps them, and a
//!   timeout's `kill_tree` still finds them as its children).
//! - `PR_SET_PDEATHSIG(SIGKILL)`: it dies with the init (on a host, where an init's exit does
//!   not end a pid namespace). If the init is already gone when that is set, it exits at once.
//! - SIGTERM/SIGINT (forwarded by the init) go to every running command's process group; the
//!   server then stops serving and exits once no command runs, or after [`STOP_GRACE`].
//! - Named `spaced-exec` (`/proc/<pid>/comm`), so it can be told from the init in `ps`.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::BusSettings;
use crate::config::Config;
use crate::exec::Running;
use crate::reaper::Reaper;
use crate::serve;

/// Set on the exec server to its init's pid: the marker of this role (a `TETHER_DAEMON_*`
/// variable, so no command ever sees it).
pub const ENV_SERVE_FOR: &str = "TETHER_DAEMON_SERVE_FOR";
/// The exec server's process name.
pub const NAME: &str = "spaced-exec";
/// How long a stopping server waits for its commands to end after forwarding the signal.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs the exec server for the init `init_pid` until its connection closes for good (exit
/// 0), it cannot serve (70), or it is told to stop (0). The init restarts it unless stopping.
pub async fn run(cfg: Config, init_pid: i32) -> anyhow::Result<i32> {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot tie the exec server's life to the init's");
    }
    if nix::unistd::getppid().as_raw() != init_pid {
        tracing::warn!(init_pid, "the init is gone: the exec server does not start");
        return Ok(0);
    }
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!(error = %e, "no session of its own: commands may outlive a crash");
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper: orphans go to init");
    }
    if let Ok(name) = std::ffi::CString::new(NAME) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    let Some(bus) = cfg.bus else {
        anyhow::bail!("the exec server started without bus settings");
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let reaper = Reaper::start()?;
    let running = Running::default();
    let serving = serving(bus, cfg.limits, reaper, running.clone());
    tokio::pin!(serving);
    let sig = tokio::select! {
        code = &mut serving => return Ok(code),
        _ = term.recv() => Signal::SIGTERM,
        _ = int.recv() => Signal::SIGINT,
    };
    tracing::info!(signal = %sig, commands = running.len(), "stopping: forwarding the signal");
    running.signal_all(sig);
    // Commands finish (and answer) while the subscription still runs.
    tokio::select! {
        _ = tokio::time::timeout(STOP_GRACE, running.until_empty()) => {}
        _ = &mut serving => {}
    }
    Ok(0)
}

/// [`serve::serve`] as an exit code: 0 when the connection closed for good, 70 when it could
/// not serve at all.
async fn serving(
    bus: BusSettings,
    limits: crate::config::Limits,
    reaper: Reaper,
    running: Running,
) -> i32 {
    match serve::serve(bus, limits, reaper, running).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "exec is not served");
            70
        }
    }
}
