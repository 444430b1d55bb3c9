//! The init: PID 1 of a space container (a child subreaper on a host), which runs the main
//! workload, reaps every orphan, and keeps the exec server (`server`) running.
//!
//! Design decisions:
//! - Two processes of one binary. A workload running as root cannot SIGKILL its pid
//!   namespace's init, but it can kill any other process it sees; so the init does nothing a
//!   workload can break (no bus, no requests: run, reap, forward, supervise), and everything
//!   that talks to the bus lives in the exec server, which it restarts.
//! - The exec server is `/proc/self/exe` (the very binary the init runs, also if the file was
//!   replaced since) with [`server::ENV_SERVE_FOR`] set to the init's pid and no arguments.
//! - Restart with backoff: at once the first time, then 100 ms after a crash, doubling up to
//!   2 s; a server that ran [`STABLE`] (10 s) or more starts the backoff over.
//! - Commands of a server that died are killed by the init (SIGKILL to the server's session,
//!   `kill::kill_session`) before the next server starts: nothing runs unsupervised past its
//!   deadline, and their callers get no exit (their wait ends in a timeout; the new server
//!   knows nothing of them). A command that called `setsid` itself and whose parent is gone
//!   is not found — the same limit as a timeout's kill.
//! - SIGTERM/SIGINT go to the main workload and to the exec server (which passes them on to
//!   its commands); from then on the server is not restarted. The init exits with the main
//!   workload's code (128+signal if killed); without a main workload it waits for the server
//!   to end (at most its grace and a second) and exits 0. When the main workload exits, the
//!   server and its commands are killed and the init exits with its code.

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::config::{Config, strip_daemon_env};
use crate::kill::kill_session;
use crate::reaper::{Exit, Reaper};
use crate::server;

/// Delay before the first restart after a crash.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A server that ran this long resets the backoff when it exits.
pub const STABLE: Duration = Duration::from_secs(10);

/// The delay before the next restart of the exec server.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The delay after a server that ran `ran` exited.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= STABLE {
            self.next = FIRST_BACKOFF;
        }
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }
}

/// One running exec server.
struct Running {
    pid: i32,
    started: Instant,
    exit: oneshot::Receiver<Exit>,
}

/// Runs the init until its main workload exits (its exit code is returned) or, without one,
/// until SIGTERM/SIGINT (0). Must run inside a tokio runtime with signals enabled.
pub async fn run(cfg: Config) -> anyhow::Result<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    if me != 1 {
        // Not the container's init (a test on a host): orphans must still come to us.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper: orphans go to init");
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let reaper = Reaper::start()?;

    let main = match cfg.main.as_deref().and_then(<[_]>::split_first) {
        None => None,
        Some((program, args)) => match spawn_main(&reaper, program, args) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(command = ?program, error = %e, "cannot run the main command");
                return Ok(match e.kind() {
                    std::io::ErrorKind::NotFound => 127,
                    _ => 126,
                });
            }
        },
    };
    let serving = cfg.bus.is_some();
    if !serving {
        tracing::warn!("no TETHER_NATS_URL: running as an init only, serving nothing");
    }
    let mut server = None;
    let mut restart_at = serving.then(Instant::now);
    let mut backoff = Backoff::default();
    let mut stopping: Option<Instant> = None;

    let main_pid = main.as_ref().map(|(pid, _)| *pid);
    let main_exit = async move {
        match main {
            Some((_, rx)) => rx.await.unwrap_or(Exit::Code(255)),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(main_exit);
    loop {
        let restart = async move {
            match restart_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let give_up = async move {
            match stopping {
                Some(at) => {
                    tokio::time::sleep_until(
                        (at + server::STOP_GRACE + Duration::from_secs(1)).into(),
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let sig = tokio::select! {
            _ = term.recv() => Signal::SIGTERM,
            _ = int.recv() => Signal::SIGINT,
            exit = &mut main_exit => {
                tracing::info!(?exit, "the main command exited");
                if let Some(s) = server.take() {
                    end_server(&s);
                }
                return Ok(exit.code());
            }
            exit = server_exit(&mut server) => {
                let Some(s) = server.take() else { continue };
                let killed = kill_session(s.pid);
                if stopping.is_some() {
                    tracing::info!(?exit, signalled = killed, "the exec server stopped");
                    if main_pid.is_none() {
                        return Ok(0);
                    }
                    continue;
                }
                let delay = backoff.after_exit(s.started.elapsed());
                tracing::warn!(?exit, signalled = killed, ?delay, "the exec server exited: restarting it");
                restart_at = Some(Instant::now() + delay);
                continue;
            }
            () = restart => {
                restart_at = None;
                match spawn_server(&reaper, me) {
                    Ok(s) => server = Some(s),
                    Err(e) => {
                        let delay = backoff.after_exit(Duration::ZERO);
                        tracing::error!(error = %e, ?delay, "cannot start the exec server");
                        restart_at = Some(Instant::now() + delay);
                    }
                }
                continue;
            }
            () = give_up => {
                tracing::warn!("the exec server did not stop in time: killing it");
                if let Some(s) = server.take() {
                    end_server(&s);
                }
                stopping = None;
                if main_pid.is_none() {
                    return Ok(0);
                }
                continue;
            }
        };
        tracing::info!(signal = %sig, "forwarding the signal");
        if stopping.is_none() {
            stopping = Some(Instant::now());
        }
        restart_at = None;
        if let Some(s) = &server {
            let _ = kill(Pid::from_raw(s.pid), sig);
        }
        match main_pid {
            Some(pid) => {
                let _ = kill(Pid::from_raw(pid), sig);
            }
            None if server.is_none() => return Ok(0),
            None => {}
        }
    }
}

/// The exit of the running server; pending without one.
async fn server_exit(server: &mut Option<Running>) -> Exit {
    match server {
        Some(s) => (&mut s.exit).await.unwrap_or(Exit::Code(255)),
        None => std::future::pending().await,
    }
}

/// Kills the server and what it runs (the init is about to exit).
fn end_server(s: &Running) {
    let _ = kill(Pid::from_raw(s.pid), Signal::SIGKILL);
    kill_session(s.pid);
}

/// Starts the main workload without the daemon's own variables.
fn spawn_main(
    reaper: &Reaper,
    program: &OsString,
    args: &[OsString],
) -> std::io::Result<(i32, oneshot::Receiver<Exit>)> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    strip_daemon_env(&mut cmd);
    let (child, rx) = reaper.spawn(&mut cmd)?;
    Ok((i32::try_from(child.id()).unwrap_or(i32::MAX), rx))
}

/// Starts the exec server: this binary again, marked with the init's pid.
fn spawn_server(reaper: &Reaper, init_pid: i32) -> std::io::Result<Running> {
    let mut cmd = Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut cmd, "tether-spaced");
    cmd.env(server::ENV_SERVE_FOR, init_pid.to_string())
        .stdin(std::process::Stdio::null());
    let (child, exit) = reaper.spawn(&mut cmd)?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    tracing::info!(pid, "the exec server started");
    Ok(Running {
        pid,
        started: Instant::now(),
        exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_a_stable_run_resets_them() {
        let mut b = Backoff::default();
        let crash = Duration::from_millis(5);
        let delays: Vec<u64> = (0..7)
            .map(|_| b.after_exit(crash).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.after_exit(STABLE), FIRST_BACKOFF);
        assert_eq!(b.after_exit(crash), Duration::from_millis(200));
    }
}
