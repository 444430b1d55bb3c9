//! The one code path every front end uses (`shell.exec` on the bus, `exec_command` over MCP
//! stdio and HTTP): validate → resolve the target from the verified caller → restore the
//! caller's session → run once (through the orchestrator, or locally) → cut the trailer,
//! apply the caller's cap → save the session → the `ExecResult`.
//!
//! The shell-server holds no Docker access and no identity of its own: every exec it asks of
//! the orchestrator carries the caller's own token (and trace context), so the orchestrator
//! checks again that this caller may run in that container.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use tether_bus::codec::{CONTENT_TYPE, Encoding};
use tether_bus::connect::RequestFailure;
use tether_bus::{BusConfig, Caller, Problem, Scope};
use tether_proto::{ExecRequest, ExecResult, ShellExecRequest};

use crate::config::ShellConfig;
use crate::local::{self, LocalSpec};
use crate::session::{self, Sessions};
use crate::stream::StreamOut;
use crate::target::{Resolver, Target};
use crate::wrap::{self, Restore, TRAILER_ROOM, Wrapped};

/// Longest command line accepted.
const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// After the reply, stream messages still in flight get this long to arrive.
const STREAM_SETTLE: Duration = Duration::from_secs(2);

/// Checked parameters of one command.
#[derive(Debug)]
pub struct Params {
    pub command: String,
    pub workdir: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub max_output: usize,
    pub stream: Option<String>,
    pub reset: bool,
}

pub struct Shell {
    cfg: Arc<ShellConfig>,
    bus: Arc<BusConfig>,
    client: Client,
    resolver: Resolver,
    sessions: Sessions,
}

impl Shell {
    /// Opens the buckets this server reads and writes.
    pub async fn open(bus: &BusConfig, cfg: ShellConfig, client: Client) -> anyhow::Result<Shell> {
        let js = async_nats::jetstream::new(client.clone());
        let resolver = Resolver::open(
            &js,
            &cfg.spaces_bucket,
            cfg.kv_replicas,
            &cfg.target_container,
            cfg.allow_local_exec,
        )
        .await?;
        let sessions = Sessions::open(
            &js,
            &cfg.sessions_bucket,
            cfg.kv_replicas,
            Duration::from_secs(cfg.session_ttl_seconds),
        )
        .await?;
        Ok(Shell {
            cfg: Arc::new(cfg),
            bus: Arc::new(bus.clone()),
            client,
            resolver,
            sessions,
        })
    }

    pub fn config(&self) -> &ShellConfig {
        &self.cfg
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks a request against this server's limits (nothing runs on a bad one).
    pub fn validate(&self, caller: &Caller, b: &ShellExecRequest) -> Result<Params, Problem> {
        let cfg = &self.cfg;
        if b.command.trim().is_empty() {
            return Err(Problem::bad_request("`command` is required"));
        }
        if b.command.len() > MAX_COMMAND_BYTES {
            return Err(Problem::too_large(format!(
                "`command` is {} bytes; at most {MAX_COMMAND_BYTES}",
                b.command.len()
            )));
        }
        if b.command.contains('\0') {
            return Err(Problem::bad_request("`command` must not contain NUL bytes"));
        }
        let workdir = if b.workdir.is_empty() {
            None
        } else {
            let w = &b.workdir;
            if !w.starts_with('/') || w.contains('\0') || w.len() > 4096 {
                return Err(Problem::bad_request(format!(
                    "`workdir` {w:?} must be an absolute path"
                )));
            }
            Some(w.clone())
        };
        if b.env.len() > 256 {
            return Err(Problem::bad_request("`env` holds at most 256 variables"));
        }
        for (k, v) in &b.env {
            if !wrap::is_name(k) || k.starts_with("__tether") {
                return Err(Problem::bad_request(format!(
                    "`env` name {k:?} is not a variable name"
                )));
            }
            if v.contains('\0') {
                return Err(Problem::bad_request(format!(
                    "`env` value of {k} must not contain NUL bytes"
                )));
            }
        }
        let t = b.timeout_seconds;
        let timeout = if !t.is_finite() || t < 0.0 {
            return Err(Problem::bad_request(format!(
                "`timeout_seconds` must be positive (got {t})"
            )));
        } else if t == 0.0 {
            cfg.default_timeout_seconds
        } else if t > cfg.max_timeout_seconds {
            return Err(Problem::bad_request(format!(
                "`timeout_seconds` must be at most {} (got {t})",
                cfg.max_timeout_seconds
            )));
        } else {
            t
        };
        let max_output = match b.max_output_bytes {
            0 => cfg.default_output_bytes,
            n if n < 0 || n > cfg.max_output_bytes => {
                return Err(Problem::bad_request(format!(
                    "`max_output_bytes` must be between 1 and {} (got {n})",
                    cfg.max_output_bytes
                )));
            }
            n => n,
        };
        let stream = match (b.stream, b.stream_subject.as_str()) {
            (false, "") => None,
            (false, _) => {
                return Err(Problem::bad_request(
                    "`stream_subject` is set but `stream` is not",
                ));
            }
            (true, "") => {
                return Err(Problem::bad_request(
                    "`stream: true` needs a `stream_subject` (e.g. a fresh _INBOX subject)",
                ));
            }
            (true, s) => Some(tether_bus::subject::check_stream_subject(s, caller)?),
        };
        Ok(Params {
            command: b.command.clone(),
            workdir,
            env: b.env.clone().into_iter().collect(),
            timeout: Duration::from_secs_f64(timeout),
            max_output: usize::try_from(max_output).unwrap_or(0),
            stream,
            reset: b.reset,
        })
    }

    /// Runs one command for `caller`. `headers` go with the request to the orchestrator: the
    /// caller's token and the trace context.
    pub async fn exec(
        &self,
        caller: &Caller,
        headers: HeaderMap,
        req: &ShellExecRequest,
    ) -> Result<ExecResult, Problem> {
        caller.require(Scope::ShellExec)?;
        let p = self.validate(caller, req)?;
        let key = session::key(caller)?;
        // Two independent KV reads: the binding and the session, at once.
        let (target, previous) = tokio::join!(self.resolver.resolve(caller), async {
            if p.reset {
                self.sessions.forget(&key).await.map(|()| None)
            } else {
                self.sessions.load(&key).await
            }
        });
        let target = target?;
        let label = target.label();
        let previous = previous?.filter(|s| s.target == label);
        let remember_env = self.cfg.remember_env;
        let restore = match &previous {
            Some(s) => Restore {
                cwd: (p.workdir.is_none() && !s.cwd.is_empty()).then(|| s.cwd.clone()),
                exports: s.exports.clone().into_iter().collect(),
                unset: s.unset.clone(),
            },
            None => Restore::default(),
        };
        let w = wrap::wrap(&p.command, &restore, remember_env);
        let mut stream = p
            .stream
            .clone()
            .map(|subject| StreamOut::new(self.client.clone(), subject, &w, p.max_output));
        let raw = match &target {
            Target::Local => self.run_local(&p, &w, stream.as_mut()).await?,
            Target::Space { host_id, .. } => {
                let subject = if host_id.is_empty() {
                    "containers.exec".to_string()
                } else {
                    format!("hosts.{host_id}.containers.exec")
                };
                self.run_container(&subject, String::new(), headers, &p, &w, stream.as_mut())
                    .await?
            }
            Target::Container(name) => {
                self.run_container(
                    "containers.exec",
                    name.clone(),
                    headers,
                    &p,
                    &w,
                    stream.as_mut(),
                )
                .await?
            }
        };
        if let Some(s) = stream.as_mut() {
            s.end(raw.exit_code).await;
        }
        let (result, trailer) = finish(raw, &w, p.max_output);
        if let Some(t) = trailer {
            let mut next = previous.clone().unwrap_or_default();
            if let Some(cwd) = t.cwd {
                next.cwd = cwd;
            }
            if let Some((exports, unset)) = t.env {
                if wrap::exports_fit(&exports, &unset) {
                    next.exports = exports.into_iter().collect();
                    next.unset = unset;
                } else {
                    tracing::debug!(agent = %caller.agent_id, "exported variables too large to remember");
                }
            }
            next.target = label;
            let changed = match &previous {
                Some(prev) => {
                    prev.cwd != next.cwd || prev.exports != next.exports || prev.unset != next.unset
                }
                None => true,
            };
            if changed {
                next.updated_at =
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                self.sessions.save(&key, &next).await?;
            }
        }
        Ok(result)
    }

    async fn run_local(
        &self,
        p: &Params,
        w: &Wrapped,
        stream: Option<&mut StreamOut>,
    ) -> Result<ExecResult, Problem> {
        let workdir = match (&p.workdir, self.cfg.local_workdir.as_str()) {
            (Some(w), _) => PathBuf::from(w),
            (None, "") => std::env::current_dir()
                .map_err(|e| Problem::internal(format!("no working directory: {e}")))?,
            (None, d) => PathBuf::from(d),
        };
        local::run(
            LocalSpec {
                shell: self.cfg.local_shell.clone(),
                script: w.script.clone(),
                workdir,
                env: p.env.clone().into_iter().collect(),
                timeout: p.timeout,
                max_output: p.max_output + TRAILER_ROOM,
            },
            stream,
        )
        .await
    }

    async fn run_container(
        &self,
        path: &str,
        container: String,
        mut headers: HeaderMap,
        p: &Params,
        w: &Wrapped,
        mut stream: Option<&mut StreamOut>,
    ) -> Result<ExecResult, Problem> {
        let subject = self.bus.subject(path);
        // The orchestrator streams to our own inbox; we relay without the trailer.
        let mut inbox = match stream {
            Some(_) => {
                let s = self.client.new_inbox();
                let sub = self
                    .client
                    .subscribe(s.clone())
                    .await
                    .map_err(|e| Problem::unavailable(format!("cannot subscribe: {e}")))?;
                Some((s, sub))
            }
            None => None,
        };
        let body = ExecRequest {
            container,
            space: String::new(),
            command: Some(tether_proto::to_pb_value(serde_json::json!([
                "sh", "-c", w.script
            ]))),
            workdir: p.workdir.clone().unwrap_or_default(),
            env: p.env.clone().into_iter().collect(),
            user: String::new(),
            stdin: String::new(),
            timeout_seconds: p.timeout.as_secs_f64(),
            max_output_bytes: i32::try_from(p.max_output + TRAILER_ROOM).unwrap_or(i32::MAX),
            stream: inbox.is_some(),
            stream_subject: inbox.as_ref().map(|(s, _)| s.clone()).unwrap_or_default(),
        };
        let enc = Encoding::Protobuf;
        let payload = enc.encode(&body)?;
        headers.insert(CONTENT_TYPE, enc.content_type());
        let wait = p.timeout + Duration::from_secs_f64(self.cfg.orchestrator_grace_seconds);
        let request = async_nats::client::Request::new()
            .payload(payload)
            .headers(headers);
        let call = tether_bus::connect::request(&self.client, subject.clone(), request, wait);
        tokio::pin!(call);
        let mut ended = false;
        let reply = loop {
            match (&mut inbox, stream.as_deref_mut()) {
                (Some((_, sub)), Some(out)) if !ended => {
                    tokio::select! {
                        r = &mut call => break r,
                        m = sub.next() => match m {
                            Some(m) => ended = out.relay(&m).await,
                            None => ended = true,
                        },
                    }
                }
                _ => break (&mut call).await,
            }
        };
        let msg = reply.map_err(|e| match e {
            RequestFailure::NoResponders => Problem::unavailable(format!(
                "no container-orchestrator answers on `{subject}`; is it running? (try again when it is back)"
            )),
            RequestFailure::TimedOut(_) => Problem::timeout(format!(
                "the orchestrator did not answer on `{subject}` within {:.0} s",
                wait.as_secs_f64()
            )),
            RequestFailure::ConnectionLost => Problem::unavailable(
                "the bus connection was lost while the command was out: it may or may not have run",
            ),
            RequestFailure::Other(e) => {
                Problem::unavailable(format!("cannot reach the orchestrator: {e}"))
            }
        })?;
        if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
            return Err(p);
        }
        let result: ExecResult = Encoding::of(msg.headers.as_ref()).decode(&msg.payload)?;
        // Stream messages published before the reply may still be on their way to us.
        if let (Some((_, sub)), Some(out)) = (&mut inbox, stream) {
            let until = tokio::time::Instant::now() + STREAM_SETTLE;
            while !ended {
                match tokio::time::timeout_at(until, sub.next()).await {
                    Ok(Some(m)) => ended = out.relay(&m).await,
                    _ => break,
                }
            }
        }
        Ok(result)
    }
}

/// Cuts the trailer off a raw result and fits the rest into the caller's cap.
pub fn finish(mut raw: ExecResult, w: &Wrapped, cap: usize) -> (ExecResult, Option<wrap::Trailer>) {
    let (end, trailer) = wrap::split_trailer(&raw.stdout, w);
    let trailer_bytes = raw.stdout.len() - end;
    raw.stdout.truncate(end);
    if trailer_bytes > 0 {
        raw.output_bytes = raw.output_bytes.saturating_sub(trailer_bytes as u64);
    }
    if wrap::fit(&mut raw.stdout, &mut raw.stderr, cap) {
        raw.truncated = true;
    }
    if trailer.is_none() && raw.truncated {
        // The trailer was cut with the overflow (the output went past cap + trailer room).
        tracing::debug!("output overflowed; the shell session keeps its previous state");
    }
    (raw, trailer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_strips_and_caps() {
        let w = wrap::wrap("x", &Restore::default(), false);
        let raw = ExecResult {
            stdout: format!("{}{}/tmp\n", "a".repeat(100), w.trailer_start()),
            stderr: "e".repeat(10),
            output_bytes: 0,
            ..Default::default()
        };
        let total = (raw.stdout.len() + raw.stderr.len()) as u64;
        let raw = ExecResult {
            output_bytes: total,
            ..raw
        };
        let (r, t) = finish(raw.clone(), &w, 1000);
        assert_eq!(r.stdout, "a".repeat(100));
        assert_eq!(r.output_bytes, 110);
        assert!(!r.truncated);
        assert_eq!(t.and_then(|t| t.cwd).as_deref(), Some("/tmp"));
        let (r, _) = finish(raw, &w, 50);
        assert!(r.truncated);
        assert_eq!(r.stdout.len() + r.stderr.len(), 50);
        assert_eq!(r.stderr.len(), 10, "the short stream is kept");
    }
}
