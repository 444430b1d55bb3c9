//! Running a command in a container: a deadline that really kills, an output cap that stops
//! buffering, and optional streaming of ordered chunks.
//!
//! Docker has no API to kill an exec, so every exec carries two variables in its environment,
//! `TETHER_EXEC_ID` and `TETHER_EXEC_DEADLINE` (unix seconds), which everything it starts
//! inherits. At the deadline a second exec runs [`KILLER`] as the same user: it stops and then
//! SIGKILLs every process whose environment holds that id, and each one's process group (runc
//! makes every exec a session leader, so that also catches children that cleared their
//! environment). The script uses shell builtins only, so one free pid is all it needs when a
//! fork bomb holds the rest (it is retried until it gets one; if it never does, the container
//! is killed and started again — the deadline holds either way). The deadline in the
//! environment belongs to the process, not to the bus request: after a crash of the node,
//! [`REAPER`] (run by the janitor) kills the execs that were still running past it.
//!
//! Output beyond the cap is read and dropped (so the command never blocks on a full pipe) and
//! reported as `truncated`. The [`Collector`] is shared with the space daemon's path
//! (the `daemon` module's `exec`), so both give the same result and the same stream.

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::docker::{EngineError, EngineErrorKind};

/// Shared prelude: `has_env FILE ENTRY`, `env_val FILE NAME` (→ `$v`), `kill_exec ID` —
/// builtins only where the shell's `read -d` exists (busybox ash, bash), else `grep -z`
/// (dash). `kill_exec` stops every process of the exec first (no new forks), then SIGKILLs
/// each with its process group, and repeats until a scan finds none (exit status 0).
const PRELUDE: &str = r#"
nod=; { IFS= read -r -d '' _x; } </dev/null 2>/dev/null; [ $? -gt 1 ] && nod=1
me=$$
has_env() {
  if [ -n "$nod" ]; then grep -qzxF -- "$2" "$1" 2>/dev/null; return; fi
  { while IFS= read -r -d '' kv; do [ "$kv" = "$2" ] && return 0; done; } 2>/dev/null < "$1"
  return 1
}
env_val() {
  if [ -n "$nod" ]; then v=$(grep -zo -- "^$2=[0-9a-f]*" "$1" 2>/dev/null); v=${v#*=}; return; fi
  v=; { while IFS= read -r -d '' kv; do case "$kv" in "$2="*) v=${kv#*=}; return;; esac; done; } 2>/dev/null < "$1"
}
kill_exec() {
  r=0
  while [ $r -lt 50 ]; do
    found=
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      [ "$p" = "$me" ] && continue
      has_env "$d/environ" "TETHER_EXEC_ID=$1" || continue
      found="$found $p"
      kill -STOP "$p" 2>/dev/null
    done
    [ -z "$found" ] && return 0
    for p in $found; do
      g=; read -r _ _ _ _ g _ 2>/dev/null < "/proc/$p/stat"
      case "$g" in ''|*[!0-9]*|0|1|"$me") ;; *) kill -9 -- "-$g" 2>/dev/null;; esac
      kill -9 "$p" 2>/dev/null
    done
    r=$((r+1))
  done
  return 1
}
"#;

/// Kills exec `$1` and everything it started.
pub const KILLER: &str = r#"
kill_exec "$1"
"#;

/// Kills the execs still running past their `TETHER_EXEC_DEADLINE` at `$1` (unix seconds),
/// with everything they started: an exec is still running when its root process (a session
/// leader: runc makes every exec one) is alive. Background processes of execs that finished
/// normally are left alone, as they are while the node runs. Prints `killed N`, `next T`
/// (the earliest deadline still ahead) and, run as root, `uid U` for processes whose
/// environment it could not read (another user's: run again as that user, since with every
/// capability dropped root can neither read nor signal them).
pub const REAPER: &str = r#"
now="$1"; next=; uids=; killed=0; ids=
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = "$me" ] && continue
  if ! { :; } 2>/dev/null < "$d/environ"; then
    u=; while read -r k val _; do [ "$k" = "Uid:" ] && { u=$val; break; }; done 2>/dev/null < "$d/status"
    case " $uids " in *" $u "*) ;; *) [ -n "$u" ] && uids="$uids $u";; esac
    continue
  fi
  sid=; read -r _ _ _ _ _ sid _ 2>/dev/null < "$d/stat"
  [ "$sid" = "$p" ] || continue
  env_val "$d/environ" TETHER_EXEC_DEADLINE
  case "$v" in ''|*[!0-9]*) continue;; esac
  if [ "$v" -le "$now" ]; then
    env_val "$d/environ" TETHER_EXEC_ID
    [ -n "$v" ] && ids="$ids $v"
  elif [ -z "$next" ] || [ "$v" -lt "$next" ]; then
    next=$v
  fi
done
for id in $ids; do kill_exec "$id" && killed=$((killed+1)); done
echo "killed $killed"
[ -n "$next" ] && echo "next $next"
for u in $uids; do echo "uid $u"; done
exit 0
"#;

pub const STREAM_SEQ: &str = "Tether-Stream-Seq";
pub const STREAM_KIND: &str = "Tether-Stream";
pub const STREAM_EXIT: &str = "Tether-Exit-Code";

/// Where streamed chunks go.
#[derive(Clone)]
pub struct StreamTo {
    pub client: async_nats::Client,
    pub subject: String,
}

/// One command to run.
pub struct ExecSpec {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
    /// `KEY=value` (the request's; the exec id and deadline are added here).
    pub env: Vec<String>,
    pub user: Option<String>,
    pub stdin: Option<Bytes>,
    pub timeout: Duration,
    pub max_output: usize,
    pub stream: Option<StreamTo>,
}

#[derive(Debug, Default)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub timed_out: bool,
    pub duration: Duration,
    pub output_bytes: u64,
}

/// Which output stream a chunk is of.
#[derive(Clone, Copy)]
pub enum Which {
    Out,
    Err,
}

/// An exec's output as it comes, from the engine or from a space daemon: kept within the cap,
/// and streamed (numbered `stdout`/`stderr` chunks, then `end` with the exit code) when asked.
pub struct Collector {
    out: ExecOutcome,
    cap: usize,
    seq: u64,
    stream: Option<StreamTo>,
}

impl Collector {
    pub fn new(cap: usize, stream: Option<StreamTo>) -> Self {
        Self {
            out: ExecOutcome::default(),
            cap,
            seq: 0,
            stream,
        }
    }

    /// Ends the stream with the exit code and gives the outcome.
    pub async fn finish(
        mut self,
        exit_code: i32,
        timed_out: bool,
        duration: Duration,
    ) -> ExecOutcome {
        self.out.exit_code = exit_code;
        self.out.timed_out |= timed_out;
        self.out.duration = duration;
        self.publish("end", Bytes::new(), Some(exit_code)).await;
        self.out
    }

    /// Marks output as dropped (beyond a cap elsewhere) and counts bytes seen but not given.
    pub fn note(&mut self, truncated: bool, output_bytes: u64) {
        self.out.truncated |= truncated;
        self.out.output_bytes = self.out.output_bytes.max(output_bytes);
    }

    pub async fn push(&mut self, which: Which, data: Bytes) {
        self.out.output_bytes += data.len() as u64;
        let held = self.out.stdout.len() + self.out.stderr.len();
        let room = self.cap.saturating_sub(held);
        let take = room.min(data.len());
        if take < data.len() {
            self.out.truncated = true;
        }
        if take == 0 {
            return;
        }
        let part = data.slice(..take);
        match which {
            Which::Out => self.out.stdout.extend_from_slice(&part),
            Which::Err => self.out.stderr.extend_from_slice(&part),
        }
        let kind = match which {
            Which::Out => "stdout",
            Which::Err => "stderr",
        };
        self.publish(kind, part, None).await;
    }

    async fn publish(&mut self, kind: &str, body: Bytes, exit: Option<i32>) {
        let Some(s) = &self.stream else { return };
        self.seq += 1;
        let mut h = async_nats::HeaderMap::new();
        h.insert(STREAM_SEQ, self.seq.to_string().as_str());
        h.insert(STREAM_KIND, kind);
        if let Some(code) = exit {
            h.insert(STREAM_EXIT, code.to_string().as_str());
        }
        if let Err(e) = s
            .client
            .publish_with_headers(s.subject.clone(), h, body)
            .await
        {
            tracing::warn!(subject = %s.subject, error = %e, "cannot stream exec output; streaming stops");
            self.stream = None;
        }
    }
}

type Output =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Reads output until EOF (true) or `until` (false).
async fn drain(output: &mut Output, c: &mut Collector, until: tokio::time::Instant) -> bool {
    let sleep = tokio::time::sleep_until(until);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    c.push(Which::Out, message).await
                }
                Some(Ok(LogOutput::StdErr { message })) => c.push(Which::Err, message).await,
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "exec output stream ended with an error");
                    return true;
                }
                None => return true,
            },
            _ = &mut sleep => return false,
        }
    }
}

struct Started {
    exec_id: String,
    output: Output,
    writer: Option<tokio::task::JoinHandle<()>>,
}

/// Creates and starts an attached exec.
async fn start(
    docker: &Docker,
    container: &str,
    cmd: Vec<String>,
    env: Vec<String>,
    user: Option<String>,
    workdir: Option<String>,
    stdin: Option<Bytes>,
) -> Result<Started, EngineError> {
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(stdin.is_some()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                env: Some(env),
                cmd: Some(cmd),
                user,
                working_dir: workdir,
                ..Default::default()
            },
        )
        .await?;
    let attached = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(64 * 1024),
            }),
        )
        .await?;
    let StartExecResults::Attached { output, mut input } = attached else {
        return Err(EngineError::new(
            EngineErrorKind::Other,
            "the engine did not attach to the exec",
        ));
    };
    // Stdin is written concurrently: a command may print before (or instead of) reading.
    let writer = stdin.map(|data| {
        tokio::spawn(async move {
            let _ = input.write_all(&data).await;
            let _ = input.shutdown().await;
        })
    });
    Ok(Started {
        exec_id: created.id,
        output,
        writer,
    })
}

/// Runs a command with its deadline and output cap.
pub async fn run(docker: &Docker, spec: ExecSpec) -> Result<ExecOutcome, EngineError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let exec_id = uuid::Uuid::new_v4().simple().to_string();
    let deadline_unix = chrono::Utc::now().timestamp() + spec.timeout.as_secs_f64().ceil() as i64;
    let mut env = spec.env;
    env.push(format!("TETHER_EXEC_ID={exec_id}"));
    env.push(format!("TETHER_EXEC_DEADLINE={deadline_unix}"));
    let Started {
        exec_id: engine_exec,
        mut output,
        writer,
    } = start(
        docker,
        &spec.container_id,
        spec.cmd,
        env,
        spec.user.clone(),
        spec.workdir,
        spec.stdin,
    )
    .await?;
    let mut c = Collector::new(spec.max_output, spec.stream);
    if !drain(&mut output, &mut c, deadline).await {
        c.out.timed_out = true;
        let killed = kill(docker, &spec.container_id, &exec_id, spec.user.as_deref()).await;
        if !killed {
            // The killer never got a pid (a fork bomb holding them all) or the image has no
            // shell: the deadline still holds, at the cost of the container's processes.
            tracing::warn!(container = %spec.container_id, exec = %exec_id, "timed-out command could not be killed from inside; restarting the container");
            restart(docker, &spec.container_id).await;
        }
        // What the command printed until it died.
        let _ = drain(
            &mut output,
            &mut c,
            tokio::time::Instant::now() + Duration::from_secs(3),
        )
        .await;
    }
    if let Some(w) = writer {
        w.abort();
    }
    drop(output);
    let code = exit_code(docker, &engine_exec).await;
    Ok(c.finish(code, false, started.elapsed()).await)
}

/// The exit code once the engine has it (-1 when the process is somehow still running).
async fn exit_code(docker: &Docker, exec_id: &str) -> i32 {
    for _ in 0..40 {
        match docker.inspect_exec(exec_id).await {
            Ok(r) if r.running != Some(true) => {
                return r
                    .exit_code
                    .and_then(|c| i32::try_from(c).ok())
                    .unwrap_or(-1);
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                tracing::debug!(error = %e, "cannot inspect exec");
                return -1;
            }
        }
    }
    -1
}

/// Runs one of the scripts above (as `user`, within 20 s) and returns its exit code and stdout.
pub async fn run_script(
    docker: &Docker,
    container: &str,
    script: &str,
    args: &[&str],
    user: Option<&str>,
) -> Result<(i32, String), EngineError> {
    let mut cmd = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("{PRELUDE}{script}"),
        "tether".to_string(),
    ];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let Started {
        exec_id,
        mut output,
        writer: _,
    } = start(
        docker,
        container,
        cmd,
        Vec::new(),
        user.map(str::to_string),
        Some("/".into()),
        None,
    )
    .await?;
    let mut c = Collector::new(64 * 1024, None);
    if !drain(
        &mut output,
        &mut c,
        tokio::time::Instant::now() + Duration::from_secs(20),
    )
    .await
    {
        return Err(EngineError::new(
            EngineErrorKind::Timeout,
            "maintenance script did not finish within 20 s",
        ));
    }
    drop(output);
    let code = exit_code(docker, &exec_id).await;
    Ok((code, String::from_utf8_lossy(&c.out.stdout).into_owned()))
}

/// Kills exec `exec_id` and everything it started; true once none is left. Retried, since
/// the killer itself needs a free pid (a fork bomb may hold them all for a moment).
pub async fn kill(docker: &Docker, container: &str, exec_id: &str, user: Option<&str>) -> bool {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match run_script(docker, container, KILLER, &[exec_id], user).await {
            Ok((0, _)) => return true,
            Ok((code, out)) => {
                tracing::debug!(attempt, code, out = %out.trim(), "killer did not finish yet")
            }
            Err(e)
                if e.kind() == EngineErrorKind::Conflict
                    || e.kind() == EngineErrorKind::NotFound =>
            {
                // The container stopped or is gone: so is every process in it.
                return true;
            }
            Err(e) => tracing::debug!(attempt, error = %e, "killer exec failed"),
        }
        if Instant::now() > give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(5)))).await;
    }
}

/// SIGKILL to the container's init (everything in it dies), then start it again.
async fn restart(docker: &Docker, container: &str) {
    let opts = bollard::query_parameters::KillContainerOptionsBuilder::default()
        .signal("KILL")
        .build();
    if let Err(e) = docker.kill_container(container, Some(opts)).await {
        tracing::warn!(container, error = %e, "cannot kill container");
    }
    for _ in 0..50 {
        match docker.inspect_container(container, None).await {
            Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => break,
        }
    }
    if let Err(e) = docker.start_container(container, None).await {
        tracing::warn!(container, error = %e, "cannot start container again");
    }
}

/// What a reaper pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    pub killed: u32,
    /// Earliest deadline still ahead (unix seconds).
    pub next: Option<i64>,
}

fn parse_reaper(out: &str) -> (u32, Option<i64>, Vec<String>) {
    let mut killed = 0;
    let mut next = None;
    let mut uids = Vec::new();
    for line in out.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("killed"), Some(n)) => killed = n.parse().unwrap_or(0),
            (Some("next"), Some(t)) => next = t.parse().ok(),
            (Some("uid"), Some(u)) if u != "0" && u.chars().all(|c| c.is_ascii_digit()) => {
                uids.push(u.to_string())
            }
            _ => {}
        }
    }
    (killed, next, uids)
}

/// Kills exec processes past their deadline in `container` (as root, then as each other user
/// whose processes root could not see).
pub async fn reap(docker: &Docker, container: &str, now_unix: i64) -> Result<Reaped, EngineError> {
    let now = now_unix.to_string();
    let (code, out) = run_script(docker, container, REAPER, &[&now], Some("0")).await?;
    if code != 0 {
        return Err(EngineError::new(
            EngineErrorKind::Other,
            format!("reaper exited {code}"),
        ));
    }
    let (mut killed, mut next, uids) = parse_reaper(&out);
    for uid in uids {
        match run_script(docker, container, REAPER, &[&now], Some(&uid)).await {
            Ok((0, out)) => {
                let (k, n, _) = parse_reaper(&out);
                killed += k;
                next = match (next, n) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok((code, _)) => tracing::debug!(uid, code, "reaper as user failed"),
            Err(e) => tracing::debug!(uid, error = %e, "reaper as user failed"),
        }
    }
    Ok(Reaped { killed, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaper_output_parses() {
        let (k, n, u) = parse_reaper("killed 2\nnext 1700000000\nuid 0\nuid 1000\nuid x\n");
        assert_eq!((k, n), (2, Some(1_700_000_000)));
        assert_eq!(u, vec!["1000".to_string()]);
        assert_eq!(parse_reaper(""), (0, None, vec![]));
    }
}
