//! Relics: session-scoped service containers (a cache, a database, a browser) on their
//! session's private network, reachable by the session's other containers at
//! `http://<relic_name>:<port><endpoint>` and by nothing else.
//!
//! A relic is named `tether-relic.<space>.<session>.<relic_name>` (so the engine refuses a
//! second of the same name) and joins the session network with its name as alias and host
//! name. Its health check runs *inside* the relic (`wget`/`curl` to 127.0.0.1, or `nc` for a
//! bare port) through an engine exec, so it answers the same whether the orchestrator runs on
//! the host or in a container, and never depends on a route from the node to the network
//! (an internal network has none). A relic that is not healthy within its timeout is reported
//! `unhealthy` and removed.
//!
//! Relics of a session live on the host of its network (the session record says which); a
//! request that arrives elsewhere is forwarded to `hosts.<host_id>.relics.<op>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{EndpointSettings, NetworkingConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, ListContainersOptionsBuilder};
use tether_bus::{Caller, Node, Problem, Request, Scope};
use tether_proto::{
    CreateContainerRequest, RelicInfo, RelicList, RelicListRequest, RelicRef, RelicStartRequest,
};

use crate::docker::EngineErrorKind;
use crate::exec::ExecSpec;
use crate::labels::{
    LABEL_HEALTH_ENDPOINT, LABEL_HEALTH_PORT, LABEL_HOST, LABEL_KIND, LABEL_MANAGED, LABEL_RELIC,
    LABEL_RELIC_ID, LABEL_SESSION, LABEL_SPACE,
};
use crate::route::{Elsewhere, Routed, Routes};
use crate::sessions::{check_session, create_network, find_network};
use crate::spec::{ContainerSpec, Policy, is_valid_image_ref, validate_create};
use crate::state::{Orchestrator, Shared};

const DEFAULT_HEALTH_TIMEOUT: i32 = 30;
const MAX_HEALTH_TIMEOUT: i32 = 600;

/// Probes from inside the relic: `$1` = URL (may be empty), `$2` = port. Exit 0 = healthy,
/// 127 = the image has no probe tool. The exec's own deadline bounds it (no `wget -T`: it
/// crashes Debian's static busybox 1.35).
const PROBE: &str = r#"
url="$1"; port="$2"
if [ -n "$url" ]; then
  if command -v wget >/dev/null 2>&1; then exec wget -q -O /dev/null "$url"; fi
  if command -v curl >/dev/null 2>&1; then exec curl -fsS -o /dev/null -m 3 "$url"; fi
  exit 127
fi
if command -v nc >/dev/null 2>&1; then exec nc -z -w 3 127.0.0.1 "$port"; fi
exit 127
"#;

type T = Arc<Shared>;

fn bad(m: impl Into<String>) -> Problem {
    Problem::bad_request(m)
}

fn is_valid_relic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_valid_endpoint(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 1024
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-._~%!$&'()*+,;=:@?".contains(c))
}

pub fn container_name(space: &str, session: &str, relic: &str) -> String {
    format!("tether-relic.{space}.{session}.{relic}")
}

/// Adds `relics.*` and the host-addressed twins.
pub fn endpoints(node: Node, t: &T) -> Node {
    // A start may wait out a health check of minutes: bounded like tool runs.
    let max = t.o.policy.cfg.max_concurrent_tools;
    Routes::new(node, &t.o.hosts, t.clone())
        .serve_bounded("relics.start", Scope::RelicsWrite, max, start)
        .serve("relics.get", Scope::RelicsWrite, get)
        .serve("relics.list", Scope::RelicsWrite, list)
        .serve("relics.stop", Scope::RelicsWrite, stop)
        .serve("relics.delete", Scope::RelicsWrite, delete)
        .node()
}

/// Where a session's relics live: `None` = here (or nowhere yet).
async fn session_host(t: &Shared, space: &str, session: &str) -> Result<Option<String>, Problem> {
    Ok(t.sessions
        .get(space, session)
        .await?
        .filter(|(r, _)| !r.closed && crate::state::expires(r) > chrono::Utc::now())
        .map(|(r, _)| r.host_id)
        .filter(|h| !h.is_empty() && *h != t.o.host_id))
}

const SESSION_ELSEWHERE: &str = "the session lives";

fn not_here(host: &str, op: &str) -> Problem {
    Problem::conflict(format!(
        "the session lives on host `{host}`; send to hosts.{host}.relics.{op}"
    ))
}

fn internal_url(relic: &str, port: u16, endpoint: &str) -> String {
    if port == 0 {
        return String::new();
    }
    format!("http://{relic}:{port}{endpoint}")
}

/// A `relics.start` request, checked: the space, the health check, and the relic's container
/// spec (named and put on the session network when it is started).
pub struct StartCall {
    space: String,
    health_port: u16,
    health_endpoint: String,
    health_timeout: Duration,
    spec: ContainerSpec,
}

impl StartCall {
    /// Checks everything but the image and the session (which need the engine and KV).
    pub fn validate(
        b: &RelicStartRequest,
        caller: &Caller,
        policy: &Policy,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, Problem> {
        let space = caller.space_for(&b.space)?;
        if b.relic_name.is_empty() {
            return Err(bad("`relic_name` is required"));
        }
        if !is_valid_relic_name(&b.relic_name) {
            return Err(bad(format!(
                "`relic_name` {:?} must be a host name: 1-63 of a-z 0-9 -, not starting or ending with -",
                b.relic_name
            )));
        }
        check_session(&b.session_id)?;
        if b.image.is_empty() {
            return Err(bad("`image` is required"));
        }
        if !is_valid_image_ref(&b.image) {
            return Err(bad(format!(
                "`image` {:?} is not an image reference",
                b.image
            )));
        }
        let health_port = match b.health_check_port {
            0 => 0,
            p if (1..=65535).contains(&p) => u16::try_from(p).unwrap_or(0),
            p => {
                return Err(bad(format!(
                    "`health_check_port` must be between 1 and 65535 (got {p})"
                )));
            }
        };
        if !b.health_check_endpoint.is_empty() {
            if !is_valid_endpoint(&b.health_check_endpoint) {
                return Err(bad(format!(
                    "`health_check_endpoint` {:?} must be a URL path starting with /",
                    b.health_check_endpoint
                )));
            }
            if health_port == 0 {
                return Err(bad("`health_check_endpoint` needs a `health_check_port`"));
            }
        }
        let secs = match b.health_check_timeout_seconds {
            0 => DEFAULT_HEALTH_TIMEOUT,
            s if (1..=MAX_HEALTH_TIMEOUT).contains(&s) => s,
            s => {
                return Err(bad(format!(
                    "`health_check_timeout_seconds` must be between 1 and {MAX_HEALTH_TIMEOUT} (got {s})"
                )));
            }
        };
        let create = CreateContainerRequest {
            image: b.image.clone(),
            session_id: b.session_id.clone(),
            kind: "relic".into(),
            env: b.env.clone(),
            command: b.command.clone(),
            resource_limits: b.resource_limits,
            network_mode: "none".into(),
            // Services write where they like (databases, caches); isolation is the network.
            writable_root: true,
            ..Default::default()
        };
        let spec = validate_create(&create, &space, &caller.agent_id, policy, now)?;
        Ok(Self {
            space,
            health_port,
            health_endpoint: b.health_check_endpoint.clone(),
            health_timeout: Duration::from_secs(u64::try_from(secs).unwrap_or(30)),
            spec,
        })
    }

    /// Starts the relic on the session's host (forwarding there when it is another), on the
    /// session network, and waits for it to be healthy.
    async fn apply(
        self,
        t: &T,
        req: &Request<RelicStartRequest>,
    ) -> Result<Routed<RelicInfo>, Problem> {
        let (caller, b) = (&req.caller, &req.body);
        let Self {
            space,
            health_port,
            health_endpoint,
            health_timeout,
            spec: spec_check,
        } = self;
        let o = &t.o;
        if let Some(host) = session_host(t, &space, &b.session_id).await? {
            // The image is checked where the relic runs; the answer waits out the health check.
            let there =
                Elsewhere::on(host, SESSION_ELSEWHERE).within(health_timeout + FORWARD_MARGIN);
            return Ok(Routed::On(there));
        }
        if !o.engine.image_exists(&b.image).await? {
            return Err(Problem::unprocessable(format!(
                "image `{}` is not on host `{}` (the orchestrator never pulls: build or load it first)",
                b.image, o.host_id
            )));
        }
        let want_network = b.create_private_network.unwrap_or(true);
        let lock = t.session_lock(&format!("{space}.{}", b.session_id)).await;
        let held = lock.lock().await;
        // The network this request made, removed again when the relic does not come up (so a
        // failed start leaves nothing behind, and cannot eat the engine's address pools).
        let mut made_network = None;
        let (network_id, network_name) = match find_network(o, &space, &b.session_id).await? {
            Some(n) => n,
            None if want_network => {
                let limit = o.policy.cfg.max_sessions_per_space;
                let have = space_networks(o, &space).await?;
                if have >= limit {
                    return Err(Problem::too_many(format!(
                        "space `{space}` has {have} session networks on host `{}` (at most {limit}): clean one up with sessions.cleanup first",
                        o.host_id
                    )));
                }
                // The record names this host before the network exists, so a concurrent start
                // on another host is forwarded here.
                let rec = t
                    .sessions
                    .touch(&space, &b.session_id, &o.host_id, spec_check.expires_at)
                    .await?;
                if rec.host_id != o.host_id {
                    return Err(not_here(&rec.host_id, "start"));
                }
                let n = create_network(o, &space, &b.session_id, &caller.agent_id).await?;
                made_network = Some(n.0.clone());
                n
            }
            None => {
                return Err(Problem::conflict(format!(
                    "session `{}` has no private network; start the relic with `create_private_network: true`",
                    b.session_id
                )));
            }
        };
        t.sessions
            .touch(&space, &b.session_id, &o.host_id, spec_check.expires_at)
            .await?;
        let relic_id = uuid::Uuid::new_v4().simple().to_string();
        let mut spec = spec_check;
        spec.name = container_name(&space, &b.session_id, &b.relic_name);
        spec.network_mode = network_name.clone();
        for (k, v) in [
            (LABEL_RELIC, b.relic_name.clone()),
            (LABEL_RELIC_ID, relic_id.clone()),
            (LABEL_HEALTH_PORT, health_port.to_string()),
            (LABEL_HEALTH_ENDPOINT, health_endpoint.clone()),
        ] {
            spec.labels.insert(k.to_string(), v);
        }
        let mut body = crate::docker::create_body(&spec, &o.policy.cfg);
        body.hostname = Some(b.relic_name.clone());
        body.networking_config = Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network_name.clone(),
                EndpointSettings {
                    aliases: Some(vec![b.relic_name.clone()]),
                    ..Default::default()
                },
            )])),
        });
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let id = match o.engine.docker().create_container(Some(opts), body).await {
            Ok(r) => r.id,
            Err(e) => {
                discard_network(o, made_network.as_deref()).await;
                let e = crate::docker::EngineError::from(e);
                return Err(match e.kind() {
                    EngineErrorKind::Conflict => Problem::conflict(format!(
                        "session `{}` has a relic `{}` already",
                        b.session_id, b.relic_name
                    )),
                    EngineErrorKind::NotFound | EngineErrorKind::Refused => {
                        Problem::unprocessable(format!("the engine refused the relic: {e}"))
                    }
                    _ => e.into(),
                });
            }
        };
        if let Err(e) = o.engine.start(&id).await {
            let _ = o.engine.remove(&id).await;
            discard_network(o, made_network.as_deref()).await;
            return Err(match e.kind() {
                EngineErrorKind::Unavailable | EngineErrorKind::Timeout => e.into(),
                _ => Problem::unprocessable(format!("the relic could not start: {e}")),
            });
        }
        tracing::info!(relic = %b.relic_name, session = %b.session_id, space = %space, container = %id, "relic started");
        // The health wait may take minutes: other starts in the session need not wait behind it,
        // unless this relic made the network (which goes again if it does not come up). The
        // record was reopened above, so the janitor leaves the session alone.
        if made_network.is_none() {
            drop(held);
        }
        let health = wait_healthy(o, &id, health_port, &health_endpoint, health_timeout).await;
        let mut info = RelicInfo {
            relic_id,
            relic_name: b.relic_name.clone(),
            session_id: b.session_id.clone(),
            status: "running".into(),
            container_id: id.clone(),
            container_name: spec.name.clone(),
            network_id,
            internal_url: internal_url(&b.relic_name, health_port, &health_endpoint),
            healthy: true,
            space,
            host_id: o.host_id.clone(),
            image: b.image.clone(),
            detail: String::new(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        if let Err(why) = health {
            tracing::warn!(container = %id, relic = %b.relic_name, why = %why, "relic unhealthy; removed");
            let _ = o.engine.remove(&id).await;
            if made_network.is_some() {
                discard_network(o, made_network.as_deref()).await;
                info.network_id.clear();
            }
            info.status = "unhealthy".into();
            info.healthy = false;
            info.detail = format!("{why}; the relic was removed");
        }
        Ok(Routed::Here(info))
    }
}

async fn start(t: T, req: Request<RelicStartRequest>) -> Result<Routed<RelicInfo>, Problem> {
    StartCall::validate(&req.body, &req.caller, &t.o.policy, chrono::Utc::now())?
        .apply(&t, &req)
        .await
}

/// How much longer than a relic's health timeout a forwarded start waits for its answer.
const FORWARD_MARGIN: Duration = Duration::from_secs(30);

/// Session networks of `space` on this host.
async fn space_networks(o: &Orchestrator, space: &str) -> Result<usize, Problem> {
    Ok(crate::sessions::networks(o, space, "").await?.len())
}

/// Removes a session network this request made, when its first relic did not come up (an
/// engine that refuses keeps it for the janitor, which removes empty networks no live
/// session explains).
async fn discard_network(o: &Orchestrator, id: Option<&str>) {
    let Some(id) = id else { return };
    if let Err(e) = o.engine.docker().remove_network(id).await {
        tracing::warn!(network = %id, error = %e, "cannot remove the session network of a failed relic start");
    }
}

/// One probe inside the relic: Ok(true) healthy, Ok(false) not yet, Err = never will be.
async fn probe(o: &Orchestrator, id: &str, port: u16, endpoint: &str) -> Result<bool, String> {
    if port == 0 {
        return Ok(true);
    }
    let url = if endpoint.is_empty() {
        String::new()
    } else {
        format!("http://127.0.0.1:{port}{endpoint}")
    };
    let spec = ExecSpec {
        container_id: id.to_string(),
        cmd: vec![
            "sh".into(),
            "-c".into(),
            PROBE.into(),
            "probe".into(),
            url,
            port.to_string(),
        ],
        workdir: None,
        env: Vec::new(),
        user: None,
        stdin: None,
        timeout: Duration::from_secs(5),
        max_output: 4096,
        stream: None,
    };
    match crate::exec::run(o.engine.docker(), spec).await {
        Ok(out) if out.exit_code == 0 => Ok(true),
        Ok(out) if out.exit_code == 127 => Err(
            "the relic's image has no wget, curl or nc (or no sh) to run the health check with"
                .into(),
        ),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == EngineErrorKind::Conflict => Ok(false),
        Err(e) if e.kind() == EngineErrorKind::NotFound => Err("the relic is gone".into()),
        Err(e) => Err(format!("cannot run the health check: {e}")),
    }
}

/// Waits until the relic answers its health check, exits, or the timeout passes.
async fn wait_healthy(
    o: &Orchestrator,
    id: &str,
    port: u16,
    endpoint: &str,
    timeout: Duration,
) -> Result<(), String> {
    let until = Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        match o.engine.docker().inspect_container(id, None).await {
            Ok(c) => {
                let st = c.state.unwrap_or_default();
                if st.running != Some(true) {
                    return Err(format!(
                        "the relic exited (code {}) before it was healthy",
                        st.exit_code.unwrap_or(-1)
                    ));
                }
            }
            Err(e) => return Err(format!("cannot inspect the relic: {e}")),
        }
        if probe(o, id, port, endpoint).await? {
            return Ok(());
        }
        if Instant::now() + pause > until {
            return Err(format!(
                "no healthy answer on port {port}{} within {} s",
                if endpoint.is_empty() { "" } else { endpoint },
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn label(l: &HashMap<String, String>, k: &str) -> String {
    l.get(k).cloned().unwrap_or_default()
}

fn info_of(o: &Orchestrator, c: &bollard::models::ContainerSummary) -> RelicInfo {
    let l = c.labels.clone().unwrap_or_default();
    let relic = label(&l, LABEL_RELIC);
    let port: u16 = label(&l, LABEL_HEALTH_PORT).parse().unwrap_or(0);
    let endpoint = label(&l, LABEL_HEALTH_ENDPOINT);
    let status = c.state.map(|s| s.to_string()).unwrap_or_default();
    let network_id = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| n.values().next())
        .and_then(|e| e.network_id.clone())
        .unwrap_or_default();
    RelicInfo {
        relic_id: label(&l, LABEL_RELIC_ID),
        relic_name: relic.clone(),
        session_id: label(&l, LABEL_SESSION),
        healthy: status == "running",
        status,
        container_id: c.id.clone().unwrap_or_default(),
        container_name: c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        network_id,
        internal_url: internal_url(&relic, port, &endpoint),
        space: label(&l, LABEL_SPACE),
        host_id: o.host_id.clone(),
        image: c.image.clone().unwrap_or_default(),
        detail: String::new(),
        created_at: c
            .created
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default(),
    }
}

/// This host's relics matching the labels.
async fn relics(
    o: &Orchestrator,
    extra: &[(&str, &str)],
) -> Result<Vec<bollard::models::ContainerSummary>, Problem> {
    let mut l = vec![
        format!("{LABEL_MANAGED}=true"),
        format!("{LABEL_HOST}={}", o.host_id),
        format!("{LABEL_KIND}=relic"),
    ];
    l.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    let filters = HashMap::from([("label".to_string(), l)]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    Ok(o.engine
        .docker()
        .list_containers(Some(opts))
        .await
        .map_err(crate::docker::EngineError::from)?)
}

/// What a ref resolves to.
enum Found {
    Here(Box<bollard::models::ContainerSummary>),
    There(String),
}

/// A relic reference, checked: the space it is looked for in.
struct RefCall {
    space: String,
}

impl RefCall {
    /// By `relic_id`, or by `session_id` and `relic_name`.
    fn validate(r: &RelicRef, caller: &Caller) -> Result<Self, Problem> {
        let space = caller.space_for(&r.space)?;
        if !r.relic_id.is_empty() {
            if !(r.relic_id.len() <= 64 && r.relic_id.chars().all(|c| c.is_ascii_alphanumeric())) {
                return Err(bad(format!(
                    "`relic_id` {:?} is not a relic id",
                    r.relic_id
                )));
            }
            return Ok(Self { space });
        }
        check_session(&r.session_id)?;
        if r.relic_name.is_empty() {
            return Err(bad(
                "name the relic by `relic_id`, or by `session_id` and `relic_name`",
            ));
        }
        if !is_valid_relic_name(&r.relic_name) {
            return Err(bad(format!(
                "`relic_name` {:?} is not a relic name",
                r.relic_name
            )));
        }
        Ok(Self { space })
    }
}

async fn find(t: &Shared, caller: &Caller, r: &RelicRef) -> Result<Found, Problem> {
    let RefCall { space } = RefCall::validate(r, caller)?;
    let o = &t.o;
    if !r.relic_id.is_empty() {
        let mut extra = vec![(LABEL_RELIC_ID, r.relic_id.as_str())];
        if !caller.is_operator() || !r.space.is_empty() {
            extra.push((LABEL_SPACE, space.as_str()));
        }
        if let Some(c) = relics(o, &extra).await?.into_iter().next() {
            return Ok(Found::Here(Box::new(c)));
        }
        if !r.session_id.is_empty() {
            check_session(&r.session_id)?;
            if let Some(h) = session_host(t, &space, &r.session_id).await? {
                return Ok(Found::There(h));
            }
        }
        return Err(Problem::not_found(format!("no relic `{}`", r.relic_id)));
    }
    if let Some(h) = session_host(t, &space, &r.session_id).await? {
        return Ok(Found::There(h));
    }
    let extra = [
        (LABEL_SPACE, space.as_str()),
        (LABEL_SESSION, r.session_id.as_str()),
        (LABEL_RELIC, r.relic_name.as_str()),
    ];
    match relics(o, &extra).await?.into_iter().next() {
        Some(c) => Ok(Found::Here(Box::new(c))),
        None if t.sessions.get(&space, &r.session_id).await?.is_none() => Err(Problem::not_found(
            format!("no session `{}` in space `{space}`", r.session_id),
        )),
        None => Err(Problem::not_found(format!(
            "session `{}` has no relic `{}`",
            r.session_id, r.relic_name
        ))),
    }
}

/// The relic a request names, or the host of its session.
async fn find_here(
    t: &Shared,
    req: &Request<RelicRef>,
) -> Result<Result<Box<bollard::models::ContainerSummary>, Elsewhere>, Problem> {
    Ok(match find(t, &req.caller, &req.body).await? {
        Found::Here(c) => Ok(c),
        Found::There(h) => Err(Elsewhere::on(h, SESSION_ELSEWHERE)),
    })
}

async fn get(t: T, req: Request<RelicRef>) -> Result<Routed<RelicInfo>, Problem> {
    let c = match find_here(&t, &req).await? {
        Ok(c) => c,
        Err(there) => return Ok(Routed::On(there)),
    };
    let mut info = info_of(&t.o, &c);
    if info.status == "running" {
        let l = c.labels.clone().unwrap_or_default();
        let port: u16 = label(&l, LABEL_HEALTH_PORT).parse().unwrap_or(0);
        let endpoint = label(&l, LABEL_HEALTH_ENDPOINT);
        match probe(&t.o, &info.container_id, port, &endpoint).await {
            Ok(true) => {}
            Ok(false) => {
                info.healthy = false;
                info.detail = "the health check does not pass now".into();
            }
            Err(e) => {
                info.healthy = false;
                info.detail = e;
            }
        }
    }
    Ok(Routed::Here(info))
}

/// A `relics.list` request, checked: the space it lists.
pub struct ListCall {
    space: String,
}

impl ListCall {
    pub fn validate(b: &RelicListRequest, caller: &Caller) -> Result<Self, Problem> {
        let space = caller.space_for(&b.space)?;
        if !b.session_id.is_empty() {
            check_session(&b.session_id)?;
        }
        Ok(Self { space })
    }

    /// The relics of the space (of one session, from the session's host, when named).
    async fn apply(
        self,
        t: &T,
        req: &Request<RelicListRequest>,
    ) -> Result<Routed<RelicList>, Problem> {
        let (space, b) = (self.space, &req.body);
        let mut extra = vec![(LABEL_SPACE, space.as_str())];
        if !b.session_id.is_empty() {
            extra.push((LABEL_SESSION, b.session_id.as_str()));
            if let Some(h) = session_host(t, &space, &b.session_id).await? {
                return Ok(Routed::On(Elsewhere::on(h, SESSION_ELSEWHERE)));
            }
        }
        let mut relics: Vec<RelicInfo> = relics(&t.o, &extra)
            .await?
            .iter()
            .map(|c| info_of(&t.o, c))
            .collect();
        relics.sort_by(|a, b| (&a.session_id, &a.relic_name).cmp(&(&b.session_id, &b.relic_name)));
        Ok(Routed::Here(RelicList { relics }))
    }
}

async fn list(t: T, req: Request<RelicListRequest>) -> Result<Routed<RelicList>, Problem> {
    ListCall::validate(&req.body, &req.caller)?
        .apply(&t, &req)
        .await
}

async fn stop(t: T, req: Request<RelicRef>) -> Result<Routed<RelicInfo>, Problem> {
    let c = match find_here(&t, &req).await? {
        Ok(c) => c,
        Err(there) => return Ok(Routed::On(there)),
    };
    let id = c.id.clone().unwrap_or_default();
    t.o.engine
        .stop(&id, t.o.policy.cfg.stop_grace_seconds)
        .await?;
    let mut info = info_of(&t.o, &c);
    info.status = "exited".into();
    info.healthy = false;
    Ok(Routed::Here(info))
}

async fn delete(t: T, req: Request<RelicRef>) -> Result<Routed<RelicInfo>, Problem> {
    let c = match find_here(&t, &req).await? {
        Ok(c) => c,
        Err(there) => return Ok(Routed::On(there)),
    };
    let id = c.id.clone().unwrap_or_default();
    t.o.engine.remove(&id).await?;
    tracing::info!(container = %id, "relic deleted");
    let mut info = info_of(&t.o, &c);
    info.status = "removed".into();
    info.healthy = false;
    Ok(Routed::Here(info))
}

#[cfg(test)]
mod tests;
