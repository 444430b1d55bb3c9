//! Local subprocesses: the last fallback, for development (`allow_local_exec`).
//!
//! A command runs as `<local_shell> -c <script>` in a process group of its own, with a clean
//! environment (a few basics of this server's, never its secrets, plus the request's), stdin
//! closed. At the deadline the whole group is killed (exit 137, `timed_out`); when the shell
//! itself ends, what it left running in its group is killed too, so a call never outlives
//! itself. Output beyond the cap is read and dropped (counted, never buffered).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tether_bus::Problem;
use tether_proto::ExecResult;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::stream::StreamOut;

/// Variables a local command inherits from this server (nothing else does).
const INHERITED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM",
];

pub struct LocalSpec {
    pub shell: String,
    pub script: String,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Bytes kept (stdout and stderr together).
    pub max_output: usize,
}

#[derive(Clone, Copy)]
enum Kind {
    Out,
    Err,
}

async fn pump(
    mut r: impl tokio::io::AsyncRead + Unpin,
    kind: Kind,
    tx: mpsc::Sender<(Kind, Bytes)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((kind, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (nothing left in the group) is the normal case after a clean exit.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Runs the script; the result's stdout still holds the trailer.
pub async fn run(
    spec: LocalSpec,
    mut stream: Option<&mut StreamOut>,
) -> Result<ExecResult, Problem> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&spec.shell);
    cmd.arg("-c")
        .arg(&spec.script)
        .current_dir(&spec.workdir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for k in INHERITED {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !spec.workdir.is_dir() {
            Problem::bad_request(format!(
                "workdir `{}` does not exist here",
                spec.workdir.display()
            ))
        } else {
            Problem::internal(format!("cannot start {}: {e}", spec.shell))
        }
    })?;
    let pid = child.id();
    let (tx, mut rx) = mpsc::channel::<(Kind, Bytes)>(64);
    if let Some(o) = child.stdout.take() {
        tokio::spawn(pump(o, Kind::Out, tx.clone()));
    }
    if let Some(e) = child.stderr.take() {
        tokio::spawn(pump(e, Kind::Err, tx.clone()));
    }
    drop(tx);

    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut kept = 0usize;
    let mut total: u64 = 0;
    let mut truncated = false;
    let mut status = None;
    let mut timed_out = false;
    let mut open = true;
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    // After the deadline (or the shell's end), what is still in the pipes gets this long.
    let mut drain_until: Option<tokio::time::Instant> = None;
    while open || status.is_none() {
        tokio::select! {
            m = rx.recv(), if open => match m {
                Some((kind, b)) => {
                    total += b.len() as u64;
                    let room = spec.max_output.saturating_sub(kept);
                    let take = b.len().min(room);
                    if take < b.len() {
                        truncated = true;
                    }
                    let part = &b[..take];
                    kept += take;
                    match kind {
                        Kind::Out => stdout.extend_from_slice(part),
                        Kind::Err => stderr.extend_from_slice(part),
                    }
                    if let Some(s) = stream.as_deref_mut() {
                        match kind {
                            Kind::Out => s.stdout(part).await,
                            Kind::Err => s.stderr(part).await,
                        }
                    }
                }
                None => open = false,
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                // Whatever the command left running in its group ends with it.
                kill_group(pid);
                drain_until.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            _ = &mut deadline, if !timed_out && status.is_none() => {
                timed_out = true;
                kill_group(pid);
            }
            _ = async {
                match drain_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            }, if status.is_some() && open => {
                // A process that left the group still holds the pipes: stop reading.
                truncated = true;
                break;
            }
        }
    }
    let exit_code = match status {
        Some(Ok(st)) => {
            use std::os::unix::process::ExitStatusExt;
            st.code()
                .or_else(|| st.signal().map(|s| 128 + s))
                .unwrap_or(-1)
        }
        Some(Err(e)) => {
            return Err(Problem::internal(format!(
                "cannot wait for the command: {e}"
            )));
        }
        None => -1,
    };
    Ok(ExecResult {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated,
        timed_out,
        duration_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
        oom_killed: false,
        container_id: String::new(),
        output_bytes: total,
    })
}
