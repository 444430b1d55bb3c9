//! `containers.create`: a request checked into a complete spec ([`CreateCall`]), then the
//! container made — with its space reserved first when it is a space container, and whatever
//! was made removed again when a later step fails.
//!
//! A space container for a space with no binding, asked on the shared subject, is placed
//! first ([`crate::hosts`]: the live host with the image and the most free memory) and made
//! there, forwarded to `hosts.<host>.containers.create`; a create on a host-addressed subject
//! is made on that host, never placed again.

use tether_bus::{Caller, Problem, Request};
use tether_proto::{ContainerInfo, CreateContainerRequest, SpaceBinding};

use super::{O, traceparent};
use crate::docker::{EngineErrorKind, info_from_inspect};
use crate::route::{Elsewhere, Routed, came_addressed};
use crate::space::Reserve;
use crate::spec::{ContainerSpec, Kind, Policy, validate_create};
use crate::state::Orchestrator;

/// How long a create of a space container waits for its daemon to serve.
const DAEMON_READY: std::time::Duration = std::time::Duration::from_secs(5);

/// A `containers.create` request, checked: the space it is made in and the complete spec.
pub struct CreateCall {
    pub(super) space: String,
    pub(super) spec: ContainerSpec,
}

impl CreateCall {
    /// Checks everything but the image (which needs the engine) against the create policy.
    pub fn validate(
        b: &CreateContainerRequest,
        caller: &Caller,
        policy: &Policy,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, Problem> {
        if b.kind == Kind::Worker.as_str() {
            return Err(Problem::bad_request(
                "worker containers are made by `workers.deploy`, not `containers.create`",
            ));
        }
        let space = caller.space_for(&b.space)?;
        let spec = validate_create(b, &space, &caller.agent_id, policy, now)?;
        Ok(Self { space, spec })
    }

    /// Creates (and starts) the container; a failure part way removes what was made.
    async fn apply(
        self,
        o: &O,
        req: &Request<CreateContainerRequest>,
    ) -> Result<Routed<ContainerInfo>, Problem> {
        let Self { space, mut spec } = self;
        let caller = &req.caller;
        let here = o.engine.image_exists(&spec.image).await?;
        if spec.kind == Kind::Space
            && !came_addressed(req, &o.host_id, "containers.create")
            && let Some(host) = place(o, &space, &spec.image, here).await?
        {
            return Ok(Routed::On(Elsewhere::on(host, "the space is placed")));
        }
        if !here {
            return Err(Problem::unprocessable(format!(
                "image `{}` is not on host `{}` (the orchestrator never pulls: build or load it first)",
                spec.image, o.host_id
            )));
        }
        let tp = traceparent(req);
        let mut binding = SpaceBinding {
            space: space.clone(),
            host_id: o.host_id.clone(),
            container_id: String::new(),
            container_name: spec.name.clone(),
            session_id: spec.session_id.clone(),
            bound_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            bound_by: caller.agent_id.clone(),
        };
        if let Some(info) = from_pool(o, req, &spec, &binding).await? {
            return Ok(Routed::Here(info));
        }
        o.daemon.prepare(&mut spec).await;
        o.note_trace(&spec.name, tp.as_deref());
        let reservation = if spec.kind == Kind::Space {
            Some(reserve(o, &binding).await?)
        } else {
            None
        };
        let release = |rev: Option<u64>| {
            let o = o.clone();
            let space = space.clone();
            async move {
                if let Some(rev) = rev
                    && let Err(e) = o.spaces.unbind_at(&space, rev).await
                {
                    tracing::warn!(space = %space, error = %e, "cannot release space reservation");
                }
            }
        };
        let id = match o.engine.create(&spec, &o.policy.cfg).await {
            Ok(id) => id,
            Err(e) => {
                release(reservation).await;
                return Err(match e.kind() {
                    EngineErrorKind::Conflict => {
                        Problem::conflict(format!("cannot create `{}`: {e}", spec.name))
                    }
                    EngineErrorKind::NotFound | EngineErrorKind::Refused => {
                        Problem::unprocessable(format!("the engine refused the container: {e}"))
                    }
                    _ => e.into(),
                });
            }
        };
        o.note_trace(&id, tp.as_deref());
        // From here a failure removes what was made: a bad request leaves nothing behind.
        let undo = |rev: Option<u64>| {
            let o = o.clone();
            let id = id.clone();
            let release = release(rev);
            async move {
                if let Err(e) = o.engine.remove(&id).await {
                    tracing::warn!(container = %id, error = %e, "cannot remove half-made container");
                }
                release.await;
            }
        };
        let mut rev = reservation;
        if let Some(r) = reservation {
            binding.container_id = id.clone();
            match o.spaces.bind(&binding, r).await {
                Ok(new_rev) => rev = Some(new_rev),
                Err(p) => {
                    undo(None).await;
                    return Err(p);
                }
            }
        }
        if spec.start
            && let Err(e) = o.engine.start(&id).await
        {
            undo(rev).await;
            return Err(match e.kind() {
                EngineErrorKind::Unavailable | EngineErrorKind::Timeout => e.into(),
                _ => Problem::unprocessable(format!("the container could not start: {e}")),
            });
        }
        tracing::info!(container = %id, name = %spec.name, space = %space, kind = spec.kind.as_str(), daemon = spec.daemon.is_some(), by = %caller.agent_id, "container created");
        let (m, mut c) = o.engine.inspect_managed(&id).await?;
        if spec.start && !m.daemon.is_empty() {
            o.daemon.started(&m);
            // Answered once exec takes the daemon's path (a daemon without a network never
            // reaches the bus: not waited for).
            if spec.network_mode != "none" {
                let client = &req.ctx.client;
                if !o.daemon.wait_serving(client, &space, DAEMON_READY).await {
                    tracing::warn!(container = %id, space = %space, "the space daemon does not serve yet: exec takes the engine's path until it does");
                }
                c = o.engine.inspect_managed(&id).await?.1;
            }
        }
        Ok(Routed::Here(info_from_inspect(&c, &o.host_id)))
    }
}

/// A space served from a warm pool (`crate::pool`), when `spec` matches one that has a free
/// container; `None`: create it as without a pool.
async fn from_pool(
    o: &O,
    req: &Request<CreateContainerRequest>,
    spec: &ContainerSpec,
    binding: &SpaceBinding,
) -> Result<Option<ContainerInfo>, Problem> {
    let Some(entry) = o.pool.matching(&req.body, spec) else {
        return Ok(None);
    };
    let Some(id) = o.pool.pop(&entry.key) else {
        o.pool.count_hit(false);
        return Ok(None);
    };
    let rev = match reserve(o, binding).await {
        Ok(rev) => rev,
        Err(p) => {
            o.pool.put_back(&entry.key, &id);
            return Err(p);
        }
    };
    o.note_trace(&id, traceparent(req).as_deref());
    let taken = crate::pool_take::take(o, &req.ctx, entry, &id, spec, binding.clone(), rev).await?;
    o.pool.count_hit(taken.is_some());
    Ok(taken)
}

pub(super) async fn create(
    o: O,
    req: Request<CreateContainerRequest>,
) -> Result<Routed<ContainerInfo>, Problem> {
    CreateCall::validate(&req.body, &req.caller, &o.policy, chrono::Utc::now())?
        .apply(&o, &req)
        .await
}

/// The other host a new container of `space` goes to (`None`: this one). A space that has a
/// binding already is left to the reservation, which refuses it (or replaces a stale one of
/// this host).
async fn place(
    o: &Orchestrator,
    space: &str,
    image: &str,
    here: bool,
) -> Result<Option<String>, Problem> {
    if o.spaces.get(space).await?.is_some() {
        return Ok(None);
    }
    match o.hosts.place(image, here) {
        Some(h) if h != o.host_id => Ok(Some(h)),
        Some(_) => Ok(None),
        None => Err(Problem::unprocessable(format!(
            "image `{image}` is not on host `{}` nor on any other live host (the orchestrator never pulls: build or load it first)",
            o.host_id
        ))),
    }
}

/// Reserves a space for a new container (one container per space).
async fn reserve(o: &Orchestrator, b: &SpaceBinding) -> Result<u64, Problem> {
    for _ in 0..2 {
        match o.spaces.reserve(b).await? {
            Reserve::Reserved(rev) => return Ok(rev),
            Reserve::Exists(existing, rev) => {
                if existing.host_id != o.host_id {
                    // Never made again elsewhere, even when that host is gone.
                    let gone = o
                        .hosts
                        .unavailable(&existing.host_id)
                        .map(|p| format!(" ({})", p.detail))
                        .unwrap_or_default();
                    return Err(Problem::conflict(format!(
                        "space `{}` already has a container on host `{}`{gone}",
                        b.space, existing.host_id
                    )));
                }
                if existing.container_id.is_empty() {
                    let age = chrono::DateTime::parse_from_rfc3339(&existing.bound_at)
                        .map(|t| chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                        .unwrap_or_default();
                    if age.num_seconds()
                        < i64::try_from(o.policy.cfg.reconcile_grace_seconds).unwrap_or(i64::MAX)
                    {
                        return Err(Problem::conflict(format!(
                            "the container of space `{}` is being created",
                            b.space
                        )));
                    }
                } else {
                    match o.engine.inspect_managed(&existing.container_id).await {
                        Ok(_) => {
                            return Err(Problem::conflict(format!(
                                "space `{}` already has container `{}` ({})",
                                b.space, existing.container_name, existing.container_id
                            )));
                        }
                        Err(e) if e.kind() == EngineErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                // A stale record (its container is gone): drop it and try again.
                o.spaces.unbind_at(&b.space, rev).await?;
            }
        }
    }
    Err(Problem::conflict(format!(
        "space `{}` is being changed concurrently; try again",
        b.space
    )))
}
