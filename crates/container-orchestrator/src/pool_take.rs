//! Taking a free pool container for a space (the steps and why in this order: the `pool`
//! module). The caller has popped the container and reserved the space; from the rename on, the
//! container is the space's, and a failure removes it.

use std::sync::Arc;
use std::time::Duration;

use tether_bus::{Ctx, Problem};
use tether_proto::{ContainerInfo, IssueDaemonTokenRequest, IssuedToken, SpaceBinding};
use tether_space_daemon::bind::{BIND_HEADER, BIND_VERSION, Bind, BindRequest};

use crate::credentials::{Grant, request_token};
use crate::daemon::token::{DaemonGrant, TOKEN_NAME};
use crate::daemon::{BIND_NAME, SECRET_DIR};
use crate::docker::files::{Owner, SecretFile, Side};
use crate::docker::{Meta, info_from_inspect};
use crate::labels::{pool_space, taken_name};
use crate::pool::Entry;
use crate::spec::ContainerSpec;
use crate::state::Orchestrator;

/// How long a bind over the bus may take before the files are written instead.
const BUS_BIND_WAIT: Duration = Duration::from_secs(5);
/// Largest bind file read back (the daemon's own bound).
const BIND_MAX: usize = tether_space_daemon::bind::MAX_BYTES as usize;

/// Binds free container `id` of pool `entry` to the space of `binding` (reserved at `rev`)
/// as the request's validated `spec` asks. `Ok(None)`: the container could not be renamed
/// (gone meanwhile); the reservation is released and the caller creates as without a pool.
/// What does not depend on another step runs at once: the rename with the token request, the
/// inspect for the reply with the bind.
pub async fn take(
    o: &Arc<Orchestrator>,
    ctx: &Ctx,
    entry: &Entry,
    id: &str,
    spec: &ContainerSpec,
    mut binding: SpaceBinding,
    rev: u64,
) -> Result<Option<ContainerInfo>, Problem> {
    let space = binding.space.clone();
    let env = space_env(spec);
    let checked = Bind {
        space: space.clone(),
        env: env.clone(),
    }
    .check();
    if let Err(e) = checked {
        o.pool.put_back(&entry.key, id);
        release(o, &space, rev).await;
        return Err(Problem::bad_request(format!(
            "the space's environment: {e}"
        )));
    }
    // What it was made as (cached by the fill pass): its pool space (from the free name,
    // before the rename) and whether it has the daemon.
    let made = o.engine.managed(id).await.ok();
    let free = made.as_ref().and_then(|m| pool_space(m.pool, &m.name));
    let daemon = o.daemon.route && made.as_ref().is_some_and(|m| !m.daemon.is_empty());
    let name = taken_name(&space, spec.expires_at.timestamp(), &id[..12.min(id.len())]);
    let (renamed, token) = tokio::join!(o.engine.rename(id, &name), async {
        if daemon {
            daemon_token(o, ctx, &space).await
        } else {
            None
        }
    });
    if let Err(e) = renamed {
        tracing::warn!(container = %id, error = %e, "pool container could not be taken: created instead");
        remove(o, id).await;
        release(o, &space, rev).await;
        return Ok(None);
    }
    binding.container_id = id.to_string();
    binding.container_name = name;
    let rev = match o.spaces.bind(&binding, rev).await {
        Ok(r) => r,
        Err(p) => {
            remove(o, id).await;
            release(o, &space, rev).await;
            return Err(p);
        }
    };
    let given = Given {
        env,
        free,
        token,
        daemon,
    };
    match deliver(o, ctx, entry, id, spec, given).await {
        Ok(info) => {
            tracing::info!(container = %id, space = %space, pool = %entry.key, "space served from the pool");
            Ok(Some(info))
        }
        Err(p) => {
            remove(o, id).await;
            release(o, &space, rev).await;
            Err(p)
        }
    }
}

/// What a take hands over: the space's environment, the pool space its daemon serves while
/// free, the daemon's token for the space, whether it has a daemon.
struct Given {
    env: Vec<String>,
    free: Option<String>,
    token: Option<IssuedToken>,
    daemon: bool,
}

/// Limits, then the bind: over the bus to the daemon on its pool space (it answers once it
/// serves the space), the files written afterwards in the background (a restarted daemon
/// reads them); or, when the bus bind cannot be done, the files first and then the wait for
/// the daemon. The container as the caller sees it.
async fn deliver(
    o: &Arc<Orchestrator>,
    ctx: &Ctx,
    entry: &Entry,
    id: &str,
    spec: &ContainerSpec,
    g: Given,
) -> Result<ContainerInfo, Problem> {
    let t = &entry.template;
    if (spec.memory_mb, spec.cpu_limit, spec.pids_limit) != (t.memory_mb, t.cpu_limit, t.pids_limit)
    {
        o.engine
            .update_limits(id, spec.memory_mb, spec.cpu_limit, spec.pids_limit)
            .await
            .map_err(|e| Problem::unprocessable(format!("the engine refused the limits: {e}")))?;
    }
    o.pool.remember_env(id, g.env.clone());
    let space = spec.space.as_str();
    let by_bus = async {
        match (&g.token, &g.free) {
            (Some(token), Some(free)) => {
                Some(bus_bind(o, ctx, free, space, &g.env, &token.token).await)
            }
            _ => None,
        }
    };
    let (inspected, bound) = tokio::join!(o.engine.inspect_managed(id), by_bus);
    let (m, c) = inspected?;
    let info = info_from_inspect(&c, &o.host_id);
    match (bound, &g.token) {
        (Some(Ok(())), Some(token)) => {
            o.pool.count_bus_bind();
            // The daemon has its token: exec takes its path from now on.
            let grant = DaemonGrant {
                space: m.space.clone(),
            };
            let after = DaemonGrant::renew_after(tether_auth::now_unix(), token.expires_at);
            o.daemon.tokens.written(&m.id, grant, Side::A, after);
            let (o, ctx, token) = (o.clone(), ctx.clone(), token.clone());
            tokio::spawn(async move {
                if let Err(p) = hand_over(&o, &ctx, &m, g.env, Some(token)).await {
                    tracing::warn!(container = %m.id, error = %p.detail, "cannot write a taken pool container's bind file");
                }
            });
            return Ok(info);
        }
        (Some(Err(e)), _) => {
            tracing::warn!(container = %id, error = %e, "the pool container's daemon took no bind over the bus: its bind file is written instead");
        }
        _ => {}
    }
    hand_over(o, ctx, &m, g.env, g.token).await?;
    if g.daemon && spec.network_mode != "none" {
        let ready = Duration::from_secs(5);
        if !o.daemon.wait_serving(&ctx.client, &m.space, ready).await {
            tracing::warn!(container = %id, space = %m.space, "the space daemon does not serve yet: exec takes the engine's path until it does");
        }
    }
    Ok(info)
}

/// A token for the daemon of `space` (`None`, warned: the renewal task asks again, and exec
/// takes the engine's path until then).
async fn daemon_token(o: &Orchestrator, ctx: &Ctx, space: &str) -> Option<IssuedToken> {
    let ask = IssueDaemonTokenRequest {
        space: space.to_string(),
        ttl_seconds: o.daemon.ttl_seconds,
    };
    match request_token(ctx, "tokens.daemon", &ask).await {
        Ok(t) => Some(t),
        Err(p) => {
            tracing::warn!(space, error = %p.detail, "no token for the space daemon of a pool container yet");
            None
        }
    }
}

/// Sends the bind (space, environment, token) to the daemon serving pool space `free`; `Ok`
/// once it answered that it serves `space`.
async fn bus_bind(
    o: &Orchestrator,
    ctx: &Ctx,
    free: &str,
    space: &str,
    env: &[String],
    token: &str,
) -> Result<(), String> {
    let body = BindRequest {
        space: space.to_string(),
        env: env.to_vec(),
        token: token.to_string(),
    };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(BIND_HEADER, BIND_VERSION);
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(body.into())
        .timeout(Some(BUS_BIND_WAIT));
    let reply = ctx
        .client
        .send_request(o.daemon.exec_subject(free), req)
        .await
        .map_err(|e| e.to_string())?;
    match Problem::from_reply(reply.headers.as_ref(), &reply.payload) {
        Some(p) => Err(format!("{}: {}", p.status, p.detail)),
        None => Ok(()),
    }
}

/// Writes the bind file of taken container `m` with `env` and, when it has a daemon, the
/// daemon's token with it (`token`, else one asked for now; one archive write: the daemon
/// reads the token once the bind file is there); true when the daemon is to serve.
async fn hand_over(
    o: &Orchestrator,
    ctx: &Ctx,
    m: &Meta,
    env: Vec<String>,
    token: Option<IssuedToken>,
) -> Result<bool, Problem> {
    let bind = Bind {
        space: m.space.clone(),
        env,
    };
    let bind = serde_json::to_vec(&bind).map_err(|e| Problem::internal(e.to_string()))?;
    let file = SecretFile {
        dir: SECRET_DIR.into(),
        name: TOKEN_NAME.into(),
        mode: 0o400,
        owner: Owner::ContainerUser,
    };
    let daemon = !m.daemon.is_empty() && o.daemon.route;
    let token = match token {
        Some(t) => Some(t),
        None if daemon => daemon_token(o, ctx, &m.space).await,
        None => None,
    };
    let content = token.as_ref().map(|t| t.token.as_bytes());
    o.engine
        .put_bind(&m.id, &file, content, BIND_NAME, &bind)
        .await?;
    if daemon {
        o.daemon.tokens.forget(&m.id);
        let grant = DaemonGrant {
            space: m.space.clone(),
        };
        match &token {
            Some(t) => {
                let after = DaemonGrant::renew_after(tether_auth::now_unix(), t.expires_at);
                o.daemon.tokens.written(&m.id, grant, Side::A, after);
            }
            None => o.daemon.tokens.track(&m.id, grant),
        }
    }
    Ok(daemon)
}

/// A taken pool container was (re)started: its secret directory is a tmpfs, empty after a
/// start, so its bind file and token are written again (the environment as this node knows
/// it: from memory, which a restart of this node while the container was stopped loses — then
/// its commands get the space's own variables only, said in a warning).
pub async fn restarted(o: &Orchestrator, ctx: &Ctx, m: &Meta) {
    let env = o.pool.env_of(&m.id).unwrap_or_else(|| {
        tracing::warn!(container = %m.id, space = %m.space, "the environment of a restarted pool container is not known here: its commands get the space's own variables only");
        own_env(m)
    });
    if let Err(p) = hand_over(o, ctx, m, env, None).await {
        tracing::warn!(container = %m.id, space = %m.space, error = %p.detail, "cannot hand a restarted pool container its bind file");
    }
}

/// The space's own variables of taken container `m` (what a cold create sets).
fn own_env(m: &Meta) -> Vec<String> {
    vec![
        format!("TETHER_SPACE={}", m.space),
        format!("TETHER_SESSION={}", m.session_id),
    ]
}

/// What a taken container's commands get on top of its own environment: the request's
/// variables and the space's own (`TETHER_SPACE`, `TETHER_SESSION`); `TETHER_NATS_URL` is in
/// the container's environment already.
fn space_env(spec: &ContainerSpec) -> Vec<String> {
    spec.env
        .iter()
        .filter(|e| !e.starts_with("TETHER_NATS_URL="))
        .cloned()
        .collect()
}

/// The space environment of taken pool container `m`, for a command on the engine's exec
/// path: from memory, else read back from its bind file (after a restart of this node).
pub async fn env_of(o: &Orchestrator, m: &Meta) -> Vec<String> {
    if let Some(env) = o.pool.env_of(&m.id) {
        return env;
    }
    let path = format!("{SECRET_DIR}/{BIND_NAME}");
    let read = o.engine.read_file(&m.id, &path, BIND_MAX).await;
    let env = read.and_then(|b| Bind::parse(&b).ok()).map(|b| b.env);
    match env {
        Some(env) => {
            o.pool.remember_env(&m.id, env.clone());
            env
        }
        None => {
            tracing::warn!(container = %m.id, space = %m.space, "the bind file of a taken pool container cannot be read: its commands get the space's own variables only");
            own_env(m)
        }
    }
}

async fn remove(o: &Orchestrator, id: &str) {
    if let Err(e) = o.engine.remove(id).await {
        tracing::warn!(container = %id, error = %e, "cannot remove a pool container whose take failed");
    }
}

async fn release(o: &Orchestrator, space: &str, rev: u64) {
    if let Err(e) = o.spaces.unbind_at(space, rev).await {
        tracing::warn!(space = %space, error = %e, "cannot release space reservation");
    }
}
