//! `tools.execute` (sync runs here, async runs through [`super::jobs`]), `tools.get`,
//! `tools.cancel` and `tools.logs` (live from the host that runs it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tether_bus::{Caller, Encoding, Endpoint, Node, Problem, RawRequest, Reply, Request, Scope};
use tether_proto::{ToolExecuteRequest, ToolExecution, ToolLogs, ToolRef};

use super::T;
use super::jobs::{CANCEL_SUBJECT, submit};
use super::prepare::{Prepared, ToolNetwork, check_id, prepare};
use super::record::{new_record, now_rfc3339, publish_event};
use super::runner::{read_logs, run_owned};
use crate::config::Limits;
use crate::route::{Elsewhere, Routed, Routes};
use crate::spec::Policy;
use crate::state::{Change, Shared, Status, is_terminal};

/// A typed endpoint whose reply is a run record: in JSON, `result` keeps the numbers the
/// tool printed (`3`, not `3.0`: protobuf's `Value` holds only doubles).
pub(super) fn record_endpoint<Q, F, Fut>(path: String, f: F) -> Endpoint
where
    Q: prost::Message + serde::de::DeserializeOwned + Default + Send + 'static,
    F: Fn(Request<Q>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<ToolExecution, Problem>> + Send + 'static,
{
    let f = Arc::new(f);
    Endpoint::raw(path, move |raw: RawRequest| {
        let f = f.clone();
        async move {
            let enc = raw.encoding;
            let rec = f(raw.decode()?).await?;
            Ok(match enc {
                Encoding::Json => {
                    let mut v = serde_json::to_value(&rec)
                        .map_err(|e| Problem::internal(format!("cannot encode the reply: {e}")))?;
                    v["result"] = rec
                        .result
                        .as_ref()
                        .map(tether_proto::from_pb_value)
                        .unwrap_or(serde_json::Value::Null);
                    let body = serde_json::to_vec(&v)
                        .map_err(|e| Problem::internal(format!("cannot encode the reply: {e}")))?;
                    Reply {
                        body: body.into(),
                        headers: async_nats::HeaderMap::new(),
                    }
                }
                Encoding::Protobuf => Reply::new(rec.encode_to_vec(), enc.content_type()),
            })
        }
    })
}

/// Adds `tools.*` (and `hosts.<host_id>.tools.logs`).
pub fn endpoints(node: Node, t: &T) -> Node {
    let max = t.o.policy.cfg.max_concurrent_tools;
    let (t1, t2, t3) = (t.clone(), t.clone(), t.clone());
    let node = node
        .endpoint(
            record_endpoint("tools.execute".into(), move |r| execute(t1.clone(), r))
                .scope(Scope::ToolsRun)
                .max_concurrency(max),
        )
        .endpoint(
            record_endpoint("tools.get".into(), move |r| get(t2.clone(), r)).scope(Scope::ToolsRun),
        )
        .endpoint(
            record_endpoint("tools.cancel".into(), move |r| cancel(t3.clone(), r))
                .scope(Scope::ToolsRun),
        );
    Routes::new(node, &t.o.hosts, t.clone())
        .serve("tools.logs", Scope::ToolsRun, logs)
        .node()
}

/// A `tools.execute` request, checked into the run it asks for.
pub struct ExecuteCall {
    p: Prepared,
}

impl ExecuteCall {
    /// Checks everything but the image and the session (which need the engine and KV); the
    /// run gets `execution_id`.
    pub fn validate(
        b: &ToolExecuteRequest,
        caller: &Caller,
        limits: &Limits,
        policy: &Policy,
        execution_id: &str,
    ) -> Result<Self, Problem> {
        let space = caller.space_for(&b.space)?;
        let p = prepare(limits, policy, b, &space, &caller.agent_id, execution_id)?;
        Ok(Self { p })
    }

    /// Runs it here and now, or queues it as a job (`async`).
    async fn apply(
        self,
        t: &T,
        req: &Request<ToolExecuteRequest>,
    ) -> Result<ToolExecution, Problem> {
        let p = self.p;
        if !t.o.engine.image_exists(&p.image).await? {
            return Err(Problem::unprocessable(format!(
                "image `{}` is not on host `{}` (the orchestrator never pulls: build or load it first)",
                p.image, t.o.host_id
            )));
        }
        let mut host_subject = None;
        if p.network == ToolNetwork::Session {
            let Some(s) = t.sessions.get(&p.space, &p.session_id).await? else {
                return Err(Problem::conflict(format!(
                    "session `{}` has no private network (start a relic first)",
                    p.session_id
                )));
            };
            if s.0.closed {
                return Err(Problem::conflict(format!(
                    "session `{}` was cleaned up",
                    p.session_id
                )));
            }
            host_subject = Some(s.0.host_id);
        }
        if p.is_async {
            return submit(t, req, p, host_subject).await;
        }
        if let Some(h) = host_subject.filter(|h| *h != t.o.host_id) {
            return Err(Problem::conflict(format!(
                "session `{}` lives on host `{h}`: run it there with `async: true`, or call the orchestrator of that host",
                p.session_id
            )));
        }
        // Sync: the record first (so get/cancel work while it runs), then the run.
        let mut rec = new_record(&p, Status::Running);
        rec.attempt = 1;
        rec.runner = req.ctx.instance_id.to_string();
        rec.host_id = t.o.host_id.clone();
        rec.started_at = rec.created_at.clone();
        t.results.create(&rec).await?;
        let runner = rec.runner.clone();
        match run_owned(t, &req.ctx, &p, rec).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // Nobody will run it again: the record says why it stopped.
                let detail = e.detail.clone();
                let _ = t
                    .results
                    .modify(&p.execution_id, |r| {
                        if is_terminal(&r.status) || r.runner != runner {
                            return Change::Keep;
                        }
                        r.status = Status::Failed.into();
                        r.detail = detail.clone();
                        r.finished_at = now_rfc3339();
                        Change::Write
                    })
                    .await;
                Err(e)
            }
        }
    }
}

pub(super) async fn execute(
    t: T,
    req: Request<ToolExecuteRequest>,
) -> Result<ToolExecution, Problem> {
    let execution_id = uuid::Uuid::now_v7().simple().to_string();
    ExecuteCall::validate(
        &req.body,
        &req.caller,
        &t.o.limits,
        &t.o.policy,
        &execution_id,
    )?
    .apply(&t, &req)
    .await
}

/// The execution a `tools.get`, `tools.cancel` or `tools.logs` request names, checked.
fn check_ref(b: &ToolRef) -> Result<String, Problem> {
    check_id(&b.execution_id)?;
    Ok(b.execution_id.clone())
}

/// The record, if the caller may see it.
async fn visible(t: &Shared, caller: &Caller, id: &str) -> Result<(ToolExecution, u64), Problem> {
    let (r, rev) = t
        .results
        .get(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
    if caller.space_for(&r.space).is_err() {
        // Another space's run does not exist for this caller.
        return Err(Problem::not_found(format!("no execution `{id}`")));
    }
    Ok((r, rev))
}

/// A `tools.get` request, checked: the execution it names.
pub struct GetCall {
    id: String,
}

impl GetCall {
    pub fn validate(b: &ToolRef) -> Result<Self, Problem> {
        Ok(Self { id: check_ref(b)? })
    }

    /// The record, if the caller may see it.
    async fn apply(self, t: &T, req: &Request<ToolRef>) -> Result<ToolExecution, Problem> {
        Ok(visible(t, &req.caller, &self.id).await?.0)
    }
}

pub(super) async fn get(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
    GetCall::validate(&req.body)?.apply(&t, &req).await
}

/// A `tools.cancel` request, checked: the execution it names.
pub struct CancelCall {
    id: String,
}

impl CancelCall {
    pub fn validate(b: &ToolRef) -> Result<Self, Problem> {
        Ok(Self { id: check_ref(b)? })
    }

    /// Cancels the run and waits (bounded) for its runner to stop it.
    async fn apply(self, t: &T, req: &Request<ToolRef>) -> Result<ToolExecution, Problem> {
        let (r, _) = visible(t, &req.caller, &self.id).await?;
        if is_terminal(&r.status) {
            return Err(Problem::conflict(format!(
                "execution `{}` has finished already ({})",
                r.execution_id, r.status
            )));
        }
        let id = r.execution_id.clone();
        let changed = t
            .results
            .modify(&id, |r| {
                if is_terminal(&r.status) {
                    return Change::Keep;
                }
                r.cancel_requested = true;
                if r.status == Status::Queued.as_str() {
                    r.status = Status::Cancelled.into();
                    r.detail = "cancelled before it started".into();
                    r.finished_at = now_rfc3339();
                }
                Change::Write
            })
            .await?
            .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
        if changed.0.status == Status::Cancelled.as_str() {
            publish_event(t, &req.ctx, &changed.0).await;
            return Ok(changed.0);
        }
        if !t.cancel_running(&id) {
            let _ = req
                .ctx
                .client
                .publish(req.ctx.subject(CANCEL_SUBJECT), id.clone().into())
                .await;
        }
        // Wait (bounded) for the runner to stop it.
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let (r, _) = t
                .results
                .get(&id)
                .await?
                .ok_or_else(|| Problem::not_found(format!("no execution `{id}`")))?;
            if is_terminal(&r.status) || Instant::now() > until {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub(super) async fn cancel(t: T, req: Request<ToolRef>) -> Result<ToolExecution, Problem> {
    CancelCall::validate(&req.body)?.apply(&t, &req).await
}

/// A `tools.logs` request, checked: the execution it names.
pub struct LogsCall {
    id: String,
}

impl LogsCall {
    pub fn validate(b: &ToolRef) -> Result<Self, Problem> {
        Ok(Self { id: check_ref(b)? })
    }

    /// Live output from the host that runs it; the record's otherwise.
    async fn apply(self, t: &T, req: &Request<ToolRef>) -> Result<Routed<ToolLogs>, Problem> {
        let (r, _) = visible(t, &req.caller, &self.id).await?;
        let live = r.status == Status::Running.as_str() && !r.container_id.is_empty();
        if live && r.host_id == t.o.host_id {
            let cap = t.o.limits.default_output;
            match read_logs(t.o.engine.docker(), &r.container_id, cap).await {
                Ok((stdout, stderr, truncated)) => {
                    return Ok(Routed::Here(ToolLogs {
                        execution_id: r.execution_id,
                        status: r.status,
                        stdout,
                        stderr,
                        truncated,
                        live: true,
                    }));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "live logs unavailable; answering the record")
                }
            }
        }
        let there = (live && r.host_id != t.o.host_id)
            .then(|| Elsewhere::on(r.host_id.clone(), "the run is"));
        let recorded = ToolLogs {
            execution_id: r.execution_id,
            status: r.status,
            stdout: r.stdout,
            stderr: r.stderr,
            truncated: r.truncated,
            live: false,
        };
        Ok(match there {
            Some(there) => Routed::Prefer(there, recorded),
            None => Routed::Here(recorded),
        })
    }
}

pub(super) async fn logs(t: T, req: Request<ToolRef>) -> Result<Routed<ToolLogs>, Problem> {
    LogsCall::validate(&req.body)?.apply(&t, &req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LABEL_EXECUTION;

    /// The `tools.*` cases of what was the end-to-end bad-input test: each refused before the
    /// engine or KV is asked anything.
    #[test]
    fn bad_tool_requests_are_refused() {
        use crate::testing::{agent, decode, limits, refused};
        use serde_json::json;
        let img = "tether-test/busybox:latest";
        let with = |extra: serde_json::Value| {
            let mut v = json!({"tool_name": "t", "image": img, "command": "true"});
            for (k, x) in extra.as_object().expect("object") {
                v[k] = x.clone();
            }
            v
        };
        let cases = [
            (json!({"tool_name": "t", "command": "true"}), "image"),
            (json!({"image": img}), "tool_name"),
            (with(json!({"tool_name": "a b"})), "tool_name"),
            (with(json!({"image": "Bad Image"})), "image"),
            (
                with(json!({"resource_limits": {"timeout_seconds": -1}})),
                "timeout_seconds",
            ),
            (
                with(json!({"resource_limits": {"timeout_seconds": 100000}})),
                "timeout_seconds",
            ),
            (with(json!({"parameters": "{not json"})), "not JSON"),
            (with(json!({"parameters": [1, 2]})), "JSON object"),
            (with(json!({"network": "host"})), "network"),
            (with(json!({"network": "session"})), "session_id"),
            (
                with(json!({"async": true, "idempotency_key": "a b"})),
                "idempotency_key",
            ),
            (with(json!({"idempotency_key": "k"})), "async"),
            (with(json!({"parameters": {"path": "/src"}})), "PATH"),
            (with(json!({"env": {"TETHER_TOOL": "x"}})), "TETHER_"),
            (
                with(json!({"env": {"A": "1"}, "parameters": {"a": 2}})),
                "same name",
            ),
            (with(json!({"max_output_bytes": -1})), "max_output_bytes"),
        ];
        let (caller, limits, policy) = (agent("s1"), limits(), Policy::for_tests());
        let validate =
            |b: &ToolExecuteRequest| ExecuteCall::validate(b, &caller, &limits, &policy, "e1");
        for (body, word) in cases {
            let b: ToolExecuteRequest = decode(&body).expect("decodes");
            refused(validate(&b), 400, word, &body.to_string());
        }
        let other: ToolExecuteRequest = decode(&with(json!({"space": "other"}))).expect("decodes");
        refused(validate(&other), 403, "other", "another agent's space");
        refused(
            decode::<ToolExecuteRequest>(&json!({"tool_name": "t", "image": img, "imgae": 1})),
            400,
            "imgae",
            "unknown field",
        );
        for (body, word) in [
            (json!({"execution_id": "../x"}), "execution id"),
            (json!({}), "required"),
        ] {
            let r: ToolRef = decode(&body).expect("decodes");
            let case = body.to_string();
            refused(GetCall::validate(&r), 400, word, &case);
            refused(CancelCall::validate(&r), 400, word, &case);
            refused(LogsCall::validate(&r), 400, word, &case);
        }
        let ok: ToolExecuteRequest = decode(&with(json!({}))).expect("decodes");
        let c = validate(&ok).expect("valid");
        assert_eq!(c.p.space, "s1");
        assert_eq!(c.p.spec.labels[LABEL_EXECUTION], "e1");
    }
}
