//! `tokens.worker`: the tokens of worker replicas, asked by the orchestrator that runs them.
//!
//! Design decision (ARCHITECTURE.md, "Worker credentials"): the orchestrator holds no tether
//! token of its own; it is known by its bus identity. The endpoint is public at the token
//! level, and the bus lets only the orchestrator's NATS user (and operators) publish
//! `tokens.worker` ([`crate::access`]). What a compromised orchestrator could do with that is
//! bounded by two checks the permission node makes on state the orchestrator cannot write
//! alone:
//! - the agent's record (in the permission node's own bucket) holds `workers:hosted`, which
//!   only an `agents:admin` holding it can grant: an orchestrator can never obtain the token
//!   of an agent nobody marked as runnable by it (an operator's, an admin's, any other);
//! - a deployment in `tether_workers` (read here, written by the orchestrators) names the
//!   agent: an agent marked hostable but not deployed gets no token, and removing its
//!   deployment (or revoking the agent) ends its tokens at the next renewal.
//!
//! The token carries the agent's registered scopes without `workers:hosted`, its space, and a
//! lifetime of at most `max_token_ttl_seconds`.
//!
//! `agents.hostable` answers the first check alone (registered, not revoked, marked
//! `workers:hosted`), so that `workers.deploy` refuses an agent whose replicas could never get
//! a token before it stores anything. Public at the token level like `tokens.worker` and for
//! the same reason (the orchestrator holds no token); the bus lets only the orchestrator and
//! operators publish it, and it says no more than whether the agent may be hosted.

use std::sync::Arc;

use tether_auth::Scope;
use tether_bus::kv::Bucket;
use tether_bus::{Encoding, Problem, PublicRequest};
use tether_proto::{AgentRef, Empty, IssueWorkerTokenRequest, IssuedToken, WorkerDeployment};

use crate::{State, registered_agent, sign, usable, validate_id};

pub(crate) async fn issue_worker(
    st: Arc<State>,
    req: PublicRequest<IssueWorkerTokenRequest>,
) -> Result<IssuedToken, Problem> {
    let b = &req.body;
    validate_id("worker", &b.worker)?;
    let agent = registered_agent(&st, &b.agent_id).await?;
    let registered = usable(&agent)?;
    if !marked_hosted(&registered) {
        return Err(Problem::forbidden(not_hosted(&agent.agent_id)));
    }
    let deployment = deployment(&st, &b.worker).await?;
    let named = deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .is_some_and(|s| s.agent_id == agent.agent_id);
    if !named {
        return Err(Problem::forbidden(format!(
            "no worker deployment `{}` of agent `{}`",
            b.worker, agent.agent_id
        )));
    }
    let scopes = registered.without(Scope::WorkersHosted);
    let issued = sign(&st, &agent, scopes, b.ttl_seconds)?;
    tracing::info!(agent = %agent.agent_id, worker = %b.worker, jti = %issued.jti, "worker token issued");
    Ok(issued)
}

/// `agents.hostable`: 404 for an agent that is not registered, 422 for one that is revoked or
/// not marked `workers:hosted` (the deploy that asks is well-formed; the agent is not fit).
pub(crate) async fn hostable(
    st: Arc<State>,
    req: PublicRequest<AgentRef>,
) -> Result<Empty, Problem> {
    let agent = registered_agent(&st, &req.body.agent_id).await?;
    let registered = usable(&agent).map_err(|p| Problem::unprocessable(p.detail))?;
    if !marked_hosted(&registered) {
        return Err(Problem::unprocessable(not_hosted(&agent.agent_id)));
    }
    Ok(Empty {})
}

/// `allows` would let an operator agent through: the mark itself is required.
fn marked_hosted(registered: &tether_auth::ScopeSet) -> bool {
    registered.iter().any(|s| *s == Scope::WorkersHosted)
}

fn not_hosted(agent_id: &str) -> String {
    format!(
        "agent `{agent_id}` is not registered with `workers:hosted`: the orchestrator may not run it"
    )
}

/// The deployment `name` in the orchestrator's bucket; `None` when it (or the bucket) is not
/// there. A bus that does not answer is 503, never taken for "no deployment".
async fn deployment(st: &State, name: &str) -> Result<Option<WorkerDeployment>, Problem> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let bucket = st.cfg.workers_bucket.as_str();
    let unavailable = |e: &dyn std::fmt::Display| {
        Problem::unavailable(format!("worker deployments unavailable: {e}"))
    };
    match st.js.get_stream(format!("KV_{bucket}")).await {
        Ok(_) => {}
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                return Ok(None);
            }
            _ => return Err(unavailable(&e)),
        },
    }
    let store = st
        .js
        .get_key_value(bucket)
        .await
        .map_err(|e| unavailable(&e))?;
    let deployments: Bucket<WorkerDeployment> =
        Bucket::from_store(store, Encoding::Json).named("worker deployments");
    Ok(deployments.get(name).await?.map(|(d, _)| d))
}
