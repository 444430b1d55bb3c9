//! One command: spawn it directly, stream its output as it comes, push its exit the moment
//! the reaper hears of it, kill its whole tree at the deadline.
//!
//! Design decisions:
//! - The command is spawned with `std::process::Command` as the leader of a new process group
//!   (`process_group(0)`), through the [`Reaper`] (never `tokio::process`: one waiter owns
//!   every exit status). Its pipes become tokio pipes; one task reads both and numbers chunks
//!   in the order they are read, so `Tether-Seq` is the order of arrival.
//! - The exit is sent as soon as the leader has exited and what it wrote has been read from
//!   the pipes (at most [`DRAIN_LIMIT`] more bytes: a background child still writing does not
//!   hold the reply). Background children that outlive the leader are left running, as a
//!   shell leaves its `&` jobs; only a timeout kills them (`kill::kill_tree`).
//! - Output past `max_output` (stdout + stderr together, as `containers.exec` counts) is read
//!   and dropped, so the command never blocks on a full pipe; the exit says `truncated` and
//!   how much was written in all.
//! - A command's environment, in one place (`command`): the daemon's (the container's)
//!   without the daemon's own `TETHER_DAEMON_*` variables, then the base env (a pool daemon's
//!   bind file's `env`, none otherwise), then the request's `env`; a later one wins.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tether_proto::{DaemonExecExit, DaemonExecStarted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::config::strip_daemon_env;
use crate::reaper::{Exit, Reaper};
use crate::reply::{self, Refusal};
use crate::request::Plan;

/// Bytes read per chunk at most.
const CHUNK: usize = 32 * 1024;
/// Bytes still read from the pipes after the leader exited, at most.
pub const DRAIN_LIMIT: usize = 1024 * 1024;

/// The process groups of the commands running now, for signal forwarding, and a wake-up
/// for whoever waits until none runs (the exec server's shutdown).
#[derive(Clone, Debug, Default)]
pub struct Running(Arc<RunningInner>);

#[derive(Debug, Default)]
struct RunningInner {
    groups: Mutex<HashSet<i32>>,
    emptied: Notify,
}

impl Running {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        // Poisoning cannot leave a set of integers inconsistent.
        self.0
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn insert(&self, pgid: i32) {
        self.set().insert(pgid);
    }
    fn remove(&self, pgid: i32) {
        let mut set = self.set();
        set.remove(&pgid);
        if set.is_empty() {
            self.0.emptied.notify_waiters();
        }
    }
    /// Sends `sig` to every running command's process group.
    pub fn signal_all(&self, sig: Signal) {
        for pgid in self.set().iter() {
            let _ = killpg(Pid::from_raw(*pgid), sig);
        }
    }
    pub fn len(&self) -> usize {
        self.set().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Returns once no command runs.
    pub async fn until_empty(&self) {
        loop {
            // Made before the check, so an emptying in between still wakes it.
            let emptied = self.0.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// Where one exec's messages go.
struct Out {
    client: Client,
    reply: Subject,
    seq: u32,
}

impl Out {
    async fn send(&mut self, headers: HeaderMap, body: Bytes) {
        if let Err(e) = self
            .client
            .publish_with_headers(self.reply.clone(), headers, body)
            .await
        {
            // The command still runs to its end (and is killed at its deadline) either way.
            tracing::debug!(error = %e, "cannot publish an exec message");
        }
        self.seq += 1;
    }
    async fn kind(&mut self, stream: &str, body: Bytes) {
        let h = reply::headers(self.seq, stream);
        self.send(h, body).await;
    }
}

/// Output accounting against the cap.
struct Output {
    cap: u64,
    sent: u64,
    stdout: u64,
    stderr: u64,
    chunks: u32,
    truncated: bool,
}

impl Output {
    async fn emit(&mut self, out: &mut Out, stream: &'static str, data: &[u8]) {
        let n = data.len() as u64;
        if stream == reply::STDOUT {
            self.stdout += n;
        } else {
            self.stderr += n;
        }
        let room = self.cap.saturating_sub(self.sent);
        let take = n.min(room) as usize;
        if take < data.len() {
            self.truncated = true;
        }
        if take > 0 {
            self.sent += take as u64;
            self.chunks += 1;
            out.kind(stream, Bytes::copy_from_slice(&data[..take]))
                .await;
        }
    }
}

/// Publishes `refusal` as the whole answer to `reply`.
pub async fn refuse(client: &Client, reply: Subject, refusal: &Refusal) {
    let (h, body) = refusal.message();
    let mut out = Out {
        client: client.clone(),
        reply,
        seq: 0,
    };
    out.send(h, body).await;
}

/// Runs `plan` over the base environment `base_env`, answering on `reply` (see
/// `proto/daemon.proto` for the messages).
pub async fn execute(
    plan: Plan,
    base_env: &[(String, String)],
    reaper: &Reaper,
    running: &Running,
    client: &Client,
    reply: Subject,
) {
    let started_at = Instant::now();
    let Some((program, args)) = plan.argv.split_first() else {
        // `request::decode` never makes an empty argv; a Plan made elsewhere is refused too.
        refuse(client, reply, &Refusal::bad_request("argv is empty")).await;
        return;
    };
    let mut cmd = command(program, args, base_env, &plan);
    let (mut child, exit_rx) = match reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            refuse(client, reply, &Refusal::from_spawn(program, &e)).await;
            return;
        }
    };
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    running.insert(pid);
    let mut out = Out {
        client: client.clone(),
        reply,
        seq: 0,
    };
    out.kind(
        reply::STARTED,
        reply::json(&DaemonExecStarted { pid: child.id() }),
    )
    .await;

    if let (Some(data), Some(stdin)) = (plan.stdin, child.stdin.take()) {
        match pipe::Sender::from_owned_fd(OwnedFd::from(stdin)) {
            Ok(mut w) => {
                tokio::spawn(async move {
                    // A command that does not read its input closes the pipe: not an error.
                    let _ = w.write_all(&data).await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot use the stdin pipe"),
        }
    }
    let mut stdout = child
        .stdout
        .take()
        .and_then(|p| pipe::Receiver::from_owned_fd(OwnedFd::from(p)).ok());
    let mut stderr = child
        .stderr
        .take()
        .and_then(|p| pipe::Receiver::from_owned_fd(OwnedFd::from(p)).ok());
    let mut output = Output {
        cap: u64::from(plan.max_output),
        sent: 0,
        stdout: 0,
        stderr: 0,
        chunks: 0,
        truncated: false,
    };
    let (mut b1, mut b2) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let deadline = tokio::time::sleep(plan.timeout);
    tokio::pin!(deadline);
    tokio::pin!(exit_rx);
    let mut timed_out = false;
    let exit = loop {
        // Unbiased: a command flooding one stream must starve neither the other stream nor
        // its exit nor its deadline.
        tokio::select! {
            r = read_some(&mut stdout, &mut b1) => match r {
                Some(n) => output.emit(&mut out, reply::STDOUT, &b1[..n]).await,
                None => stdout = None,
            },
            r = read_some(&mut stderr, &mut b2) => match r {
                Some(n) => output.emit(&mut out, reply::STDERR, &b2[..n]).await,
                None => stderr = None,
            },
            status = &mut exit_rx => break status.unwrap_or_else(|_| {
                tracing::error!(pid, "the reaper dropped a command's exit");
                Exit::Code(255)
            }),
            () = &mut deadline, if !timed_out => {
                timed_out = true;
                let killed = crate::kill::kill_tree_off_thread(pid).await;
                tracing::info!(pid, killed, "command timed out: its process tree was killed");
            }
        }
    };
    running.remove(pid);
    drain(&mut stdout, &mut stderr, &mut output, &mut out, &mut b1).await;
    let exit_msg = DaemonExecExit {
        exit_code: exit.code(),
        signal: match exit {
            Exit::Signal(s) => s,
            Exit::Code(_) => 0,
        },
        timed_out,
        truncated: output.truncated,
        stdout_bytes: output.stdout,
        stderr_bytes: output.stderr,
        chunks: output.chunks,
        duration_ms: u32::try_from(started_at.elapsed().as_millis()).unwrap_or(u32::MAX),
    };
    out.kind(reply::EXIT, reply::json(&exit_msg)).await;
}

/// The command of `plan`: direct spawn, own process group, piped output, its environment
/// as the module doc says.
fn command(program: &str, args: &[String], base_env: &[(String, String)], plan: &Plan) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).process_group(0);
    strip_daemon_env(&mut cmd);
    cmd.envs(base_env.iter().map(|(k, v)| (k, v)));
    cmd.envs(plan.env.iter().map(|(k, v)| (k, v)));
    if let Some(w) = &plan.workdir {
        cmd.current_dir(w);
    }
    if let Some(ids) = plan.user {
        cmd.uid(ids.uid).gid(ids.gid);
    }
    cmd.stdin(if plan.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// The next bytes of a pipe: `None` at its end (or error); pending forever without a pipe.
async fn read_some(p: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    match p {
        Some(r) => match r.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

/// Reads what is already in the pipes once the leader is gone, without waiting for more.
///
/// With plain `read(2)` on the (non-blocking) pipe, not tokio's `try_read`: that one returns
/// `WouldBlock` without reading while the reactor has not yet seen the pipe readable, which
/// under load (a hundred commands at once) lost whole outputs written just before the exit.
async fn drain(
    stdout: &mut Option<pipe::Receiver>,
    stderr: &mut Option<pipe::Receiver>,
    output: &mut Output,
    out: &mut Out,
    buf: &mut [u8],
) {
    let mut budget = DRAIN_LIMIT;
    for (p, stream) in [(stdout, reply::STDOUT), (stderr, reply::STDERR)] {
        let Some(r) = p.as_mut() else { continue };
        while budget > 0 {
            let want = buf.len().min(budget);
            match nix::unistd::read(&*r, &mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    budget -= n;
                    output.emit(out, stream, &buf[..n]).await;
                }
            }
        }
    }
}
