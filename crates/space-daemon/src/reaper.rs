//! Reaping: the one place in a daemon process (the init or the exec server) that waits for
//! children, its own and every orphan the kernel re-parents to it (the init as PID 1, or as a
//! child subreaper on a host; the exec server as a child subreaper).
//!
//! Design decision: one `waitpid(-1, WNOHANG)` loop driven by SIGCHLD owns every exit status,
//! so nothing else may wait for a child — not `std`'s `Child::wait`, not `tokio::process`
//! (which would race this loop for the same statuses). A child whose status someone wants is
//! spawned through [`Reaper::spawn`], which forks and registers the pid under the same lock
//! the loop dispatches under, so even a child that exits at once is never reaped unseen.
//! Everything else reaped (orphans) is just collected. No polling: the loop runs on SIGCHLD
//! only, and once at start for children that exited before the handler was installed.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

type Waiters = HashMap<i32, oneshot::Sender<Exit>>;

/// The reaper: spawn children whose exit you want through it.
#[derive(Clone, Debug, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task on the current runtime.
    pub fn start() -> std::io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper::default();
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and registers its pid; the receiver gets its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Reaps every child that has exited, telling those who wait.
    fn reap(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            match waiters.remove(&pid.as_raw()) {
                // The waiter may be gone (its request abandoned): nothing to tell.
                Some(tx) => drop(tx.send(exit)),
                None => tracing::debug!(pid = pid.as_raw(), ?exit, "reaped an orphan"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still a
        // map, so keep reaping rather than stop being an init.
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
