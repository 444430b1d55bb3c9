//! `containers.exec` through a container's space daemon (when it takes that path: the module
//! above). Everything the daemon sends is untrusted data from the container: the output is
//! kept within the request's cap by the same [`Collector`] as the engine's path (which also
//! streams it to the caller in the same format), the figures are bounded by type and never
//! trusted for more than the caller's own result, the duration is measured here, and nothing
//! the daemon sends can make this panic or wait past the request's timeout and a grace.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_bus::Problem;
use tether_proto::DaemonExecRequest;
use tether_space_daemon::client::{self, Event, Failure};

use super::{Daemon, MAX_TIMEOUT, Route};
use crate::docker::Meta;
use crate::exec::{Collector, ExecOutcome, ExecSpec, Which};

/// How long past the command's timeout the daemon's exit is waited for.
const GRACE: Duration = Duration::from_secs(30);

/// Whether `spec` goes to the container's daemon; counts the engine's path when not.
pub fn takes_daemon(d: &Daemon, m: &Meta, spec: &ExecSpec) -> bool {
    if !d.route || m.daemon.is_empty() || spec.user.is_some() || spec.timeout > MAX_TIMEOUT {
        d.count(Route::Engine);
        return false;
    }
    if !d.tokens.delivered(&m.id) {
        // Its daemon has no identity yet (or the permission node refused one).
        d.count(Route::Fallback);
        return false;
    }
    true
}

/// Runs `spec` through the daemon of `m` (check [`takes_daemon`] first): `Ok(None)` when the
/// daemon did not take it (nothing ran: the engine's path runs it, counted as a fallback).
pub async fn run(
    d: &Daemon,
    client: &async_nats::Client,
    m: &Meta,
    spec: &ExecSpec,
) -> Result<Option<ExecOutcome>, Problem> {
    let req = request(spec);
    let t0 = Instant::now();
    let collector = Arc::new(tokio::sync::Mutex::new(Collector::new(
        spec.max_output,
        spec.stream.clone(),
    )));
    let started = Arc::new(AtomicBool::new(false));
    let wait = spec.timeout + GRACE;
    let r = client::exec_with(client, &d.exec_subject(&m.space), &req, wait, |e| {
        let (c, started) = (collector.clone(), started.clone());
        async move {
            match e {
                Event::Started(_) => started.store(true, Ordering::Relaxed),
                Event::Chunk(kind, bytes) => {
                    let which = if kind == "stderr" {
                        Which::Err
                    } else {
                        Which::Out
                    };
                    c.lock().await.push(which, bytes).await;
                }
            }
        }
    })
    .await;
    let started = started.load(Ordering::Relaxed);
    let exit = match r {
        Ok(exit) => exit,
        Err(f @ (Failure::NoResponders | Failure::Silent)) => {
            d.count(Route::Fallback);
            tracing::debug!(container = %m.id, space = %m.space, silent = matches!(f, Failure::Silent), "no space daemon answers: the engine runs the command");
            return Ok(None);
        }
        Err(Failure::Refused(status, detail)) if !started => {
            d.count(Route::Fallback);
            tracing::debug!(container = %m.id, status, detail = %bounded(&detail), "the space daemon refused: the engine runs the command");
            return Ok(None);
        }
        Err(f) => {
            d.count(Route::Daemon);
            let why = match f {
                Failure::TimedOut => format!("no exit within {} s", wait.as_secs()),
                Failure::Refused(status, detail) => format!("{status} {}", bounded(&detail)),
                Failure::Protocol(p) | Failure::Bus(p) => bounded(&p),
                Failure::NoResponders | Failure::Silent => "no responders".into(),
            };
            tracing::warn!(container = %m.id, space = %m.space, started, error = %why, "the space daemon's stream broke");
            return Err(Problem::new(
                502,
                format!(
                    "the space daemon's stream broke ({why}){}",
                    if started {
                        ": the command ran and is not run again"
                    } else {
                        ""
                    }
                ),
            ));
        }
    };
    d.count(Route::Daemon);
    let mut c = Arc::try_unwrap(collector)
        .map_err(|_| Problem::internal("the exec's output is still shared"))?
        .into_inner();
    c.note(
        exit.truncated,
        exit.stdout_bytes.saturating_add(exit.stderr_bytes),
    );
    Ok(Some(
        c.finish(exit.exit_code, exit.timed_out, t0.elapsed()).await,
    ))
}

/// The daemon's request for `spec` (its user is never set: see the module above).
fn request(spec: &ExecSpec) -> DaemonExecRequest {
    let env: HashMap<String, String> = spec
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DaemonExecRequest {
        argv: spec.cmd.clone(),
        command: String::new(),
        stdin: spec
            .stdin
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
        env,
        workdir: spec.workdir.clone().unwrap_or_default(),
        user: String::new(),
        timeout_ms: u32::try_from(spec.timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1),
        max_output_bytes: u32::try_from(spec.max_output).unwrap_or(u32::MAX),
    }
}

/// At most 200 characters of a daemon's text, for a log line or a Problem.
fn bounded(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_exec() {
        let spec = ExecSpec {
            container_id: "c".into(),
            cmd: vec!["sh".into(), "-c".into(), "echo $A".into()],
            workdir: Some("/w".into()),
            env: vec!["A=b=c".into()],
            user: None,
            stdin: Some(bytes::Bytes::from_static(b"in")),
            timeout: Duration::from_millis(1500),
            max_output: 4096,
            stream: None,
        };
        let r = request(&spec);
        assert_eq!(r.argv, spec.cmd);
        assert_eq!(r.env["A"], "b=c");
        assert_eq!((r.workdir.as_str(), r.stdin.as_str()), ("/w", "in"));
        assert_eq!((r.timeout_ms, r.max_output_bytes), (1500, 4096));
        assert!(r.user.is_empty() && r.command.is_empty());
        assert_eq!(bounded(&"x".repeat(500)).len(), 200);
    }
}
