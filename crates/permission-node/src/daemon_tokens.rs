//! `tokens.daemon`: the bus identity of a space's daemon (`tether-spaced`), asked by the
//! orchestrator that runs the space's container and writes the token into it.
//!
//! Design decision (ARCHITECTURE.md, "Space daemon"): like `tokens.worker`, the endpoint is
//! public at the token level and the bus lets only the orchestrator's NATS user (and
//! operators) publish it ([`crate::access`]). The token is not an agent's: its subject is
//! `tether-spaced.<space>` (a `.` no agent id may hold), its space the one asked for, its
//! one scope `daemon:serve`, which the auth callout turns into exactly "subscribe to
//! `spaces.<space>.daemon.exec` and answer what arrives there" ([`crate::access::for_claims`]).
//! No agent can be registered with that scope, so this is the only way to obtain it.
//!
//! What the permission node cannot check: whether the space has a container. Spaces are the
//! orchestrator's state, and an orchestrator already runs every space's commands; a daemon
//! token lets its holder do less than that — answer the exec requests of one space, which only
//! ever come from the orchestrators. So the node checks the space's name and nothing more.

use std::sync::Arc;

use tether_auth::{Scope, ScopeSet};
use tether_bus::{Problem, PublicRequest};
use tether_proto::{Agent, IssueDaemonTokenRequest, IssuedToken};

use crate::{State, sign, validate_id};

/// The subject of a daemon token of `space`.
pub fn daemon_subject(space: &str) -> String {
    format!("tether-spaced.{space}")
}

pub(crate) async fn issue_daemon(
    st: Arc<State>,
    req: PublicRequest<IssueDaemonTokenRequest>,
) -> Result<IssuedToken, Problem> {
    let b = &req.body;
    validate_id("space", &b.space)?;
    let daemon = Agent {
        agent_id: daemon_subject(&b.space),
        space: b.space.clone(),
        ..Default::default()
    };
    let issued = sign(
        &st,
        &daemon,
        ScopeSet::from_iter([Scope::DaemonServe]),
        b.ttl_seconds,
    )?;
    tracing::info!(space = %b.space, jti = %issued.jti, "space daemon token issued");
    Ok(issued)
}
