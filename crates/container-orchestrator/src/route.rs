//! One route for host forwarding. An endpoint is registered once ([`Routes::serve`]) and
//! served on its shared subject (`containers.exec`, `relics.start`, `tools.logs`…) and on its
//! host-addressed one (`hosts.<host_id>.containers.exec`…). Its handler answers with a
//! [`Routed`]: "here is the result", or "this lives on host H" ([`Elsewhere`]). Only this
//! module then decides what to do about H: a request on the shared subject is sent on to
//! `hosts.H.<path>` as the caller (with [`Request::outgoing_headers`], so the other node checks
//! the token again and the trace goes through this node); a request that came on a host
//! subject is never forwarded further and gets a 409 naming the right subject.
//!
//! A host whose heartbeat stopped ([`crate::hosts`]) is not asked at all: the request is
//! answered 503 naming it at once (a `Prefer` or `Also` answer stands on this host's part).
//! A handler may also answer its host's part and name several other hosts whose parts are
//! merged in ([`Routed::AlsoEach`]: the replicas of a worker deployment), each asked in turn;
//! a host that does not answer leaves its part out. A forward that fails maps one way: no
//! responders (host down) → 503, timeout → 504, any other failure to reach it → 503; a problem
//! the other host answered is passed on as it is.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_bus::connect::RequestFailure;
use tether_bus::{Caller, Encoding, Endpoint, Node, Problem, RawRequest, Reply, Request, Scope};

use crate::hosts::Hosts;

/// How long a forward waits for the other host's answer unless the handler says otherwise.
pub const FORWARD_WAIT: Duration = Duration::from_secs(60);

/// The other host that what a request is about lives on.
#[derive(Clone, Debug)]
pub struct Elsewhere {
    pub host: String,
    /// What lives there, as the start of the refusal: "the space is bound".
    pub what: &'static str,
    /// How long a forward waits for its answer.
    pub wait: Duration,
}

impl Elsewhere {
    pub fn on(host: impl Into<String>, what: &'static str) -> Self {
        Self {
            host: host.into(),
            what,
            wait: FORWARD_WAIT,
        }
    }

    pub fn within(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// A handler's answer.
pub enum Routed<R> {
    /// Here is the result.
    Here(R),
    /// It lives on another host: forwarded there, or refused on a host subject.
    On(Elsewhere),
    /// The other host's answer is better; this one stands in when the request came on a host
    /// subject or that host cannot answer.
    Prefer(Elsewhere, R),
    /// This host's part; the other host's part is merged in by the function when the request
    /// came on the shared subject and that host answers.
    Also(Elsewhere, R, fn(R, R) -> R),
    /// [`Routed::Also`] with several other hosts: each one's part is merged in, in order, when
    /// it answers.
    AlsoEach(Vec<Elsewhere>, R, fn(R, R) -> R),
}

/// Which of its two subjects a request came on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Shared,
    Host,
}

/// The host-addressed path of `path` on `host`: `hosts.<host>.<path>`.
pub fn host_path(host: &str, path: &str) -> String {
    format!("hosts.{host}.{path}")
}

/// Whether `req` came on `host`'s own subject for `path` rather than on the shared one.
pub fn came_addressed<T>(req: &Request<T>, host: &str, path: &str) -> bool {
    req.subject.as_str() == req.ctx.subject(&host_path(host, path))
}

/// Registers endpoints on their shared and their host-addressed subjects, with the state `S`
/// every handler gets.
pub struct Routes<S> {
    node: Node,
    hosts: Arc<Hosts>,
    state: S,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    /// Routes of this host (`hosts.me()`), forwarding only to hosts it counts as live.
    pub fn new(node: Node, hosts: &Arc<Hosts>, state: S) -> Self {
        Self {
            node,
            hosts: hosts.clone(),
            state,
        }
    }

    /// Serves `path` (e.g. `containers.exec`) on both subjects with the scope it needs.
    pub fn serve<T, R, F, Fut>(self, path: &str, scope: Scope, f: F) -> Self
    where
        T: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        R: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        F: Fn(S, Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Routed<R>, Problem>> + Send + 'static,
    {
        self.serve_with(path, scope, None, f)
    }

    /// [`Routes::serve`], at most `max` requests at a time on each subject.
    pub fn serve_bounded<T, R, F, Fut>(self, path: &str, scope: Scope, max: usize, f: F) -> Self
    where
        T: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        R: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        F: Fn(S, Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Routed<R>, Problem>> + Send + 'static,
    {
        self.serve_with(path, scope, Some(max), f)
    }

    fn serve_with<T, R, F, Fut>(
        mut self,
        path: &str,
        scope: Scope,
        max: Option<usize>,
        f: F,
    ) -> Self
    where
        T: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        R: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static,
        F: Fn(S, Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Routed<R>, Problem>> + Send + 'static,
    {
        let f = Arc::new(f);
        for via in [Via::Shared, Via::Host] {
            let subject = match via {
                Via::Shared => path.to_string(),
                Via::Host => host_path(self.hosts.me(), path),
            };
            let (f, state, hosts) = (f.clone(), self.state.clone(), self.hosts.clone());
            let path = Arc::<str>::from(path);
            let mut e = Endpoint::raw(subject, move |raw: RawRequest| {
                let (f, state, path, hosts) =
                    (f.clone(), state.clone(), path.clone(), hosts.clone());
                async move { handle(via, &path, &hosts, raw, |req| f(state, req)).await }
            })
            .scope(scope);
            if let Some(max) = max {
                e = e.max_concurrency(max);
            }
            self.node = self.node.endpoint(e);
        }
        self
    }

    pub fn node(self) -> Node {
        self.node
    }
}

/// Decodes, runs the handler, and acts on where its answer is.
async fn handle<T, R, F, Fut>(
    via: Via,
    path: &str,
    hosts: &Hosts,
    raw: RawRequest,
    f: F,
) -> Result<Reply, Problem>
where
    T: prost::Message + DeserializeOwned + Default,
    R: prost::Message + Serialize + DeserializeOwned + Default,
    F: FnOnce(Request<T>) -> Fut,
    Fut: Future<Output = Result<Routed<R>, Problem>>,
{
    let enc = raw.encoding;
    // What a forward needs once the handler has the request.
    let hop = Hop {
        payload: raw.payload.clone(),
        request: Request {
            body: (),
            caller: raw.caller.clone(),
            subject: raw.subject.clone(),
            reply: None,
            headers: raw.headers.clone(),
            encoding: enc,
            ctx: raw.ctx.clone(),
        },
        path,
        hosts,
    };
    let me = hosts.me();
    let req = raw.decode::<T, Caller>()?;
    let out = match (f(req).await?, via) {
        (Routed::Here(r), _) => r,
        (Routed::On(e), Via::Shared) => hop.forward(&e).await?,
        (Routed::On(e), Via::Host) => {
            return Err(Problem::conflict(format!(
                "{} on host `{}`, not `{me}`; send to {}",
                e.what,
                e.host,
                host_path(&e.host, path)
            )));
        }
        (Routed::Prefer(e, r), Via::Shared) => match hop.forward(&e).await {
            Ok(theirs) => theirs,
            Err(p) => {
                tracing::debug!(host = %e.host, error = %p, "host did not answer; answering from here");
                r
            }
        },
        (Routed::Also(e, r, merge), Via::Shared) => match hop.forward(&e).await {
            Ok(theirs) => merge(r, theirs),
            Err(p) => {
                tracing::warn!(host = %e.host, path, error = %p, "host did not do its part; its janitor will");
                r
            }
        },
        (Routed::AlsoEach(others, mut r, merge), Via::Shared) => {
            for e in &others {
                match hop.forward(e).await {
                    Ok(theirs) => r = merge(r, theirs),
                    Err(p) => {
                        tracing::debug!(host = %e.host, path, error = %p, "host did not answer its part")
                    }
                }
            }
            r
        }
        (Routed::Prefer(_, r) | Routed::Also(_, r, _) | Routed::AlsoEach(_, r, _), Via::Host) => r,
    };
    let body = enc.encode(&out)?;
    Ok(match enc {
        Encoding::Json => Reply {
            body,
            headers: async_nats::HeaderMap::new(),
        },
        Encoding::Protobuf => Reply::new(body, enc.content_type()),
    })
}

/// A request on its way to another host.
struct Hop<'a> {
    payload: Bytes,
    request: Request<(), Option<Caller>>,
    path: &'a str,
    hosts: &'a Hosts,
}

impl Hop<'_> {
    async fn forward<R>(&self, e: &Elsewhere) -> Result<R, Problem>
    where
        R: prost::Message + DeserializeOwned + Default,
    {
        if let Some(p) = self.hosts.refusal(&e.host).await {
            return Err(p);
        }
        let req = &self.request;
        let subject = req.ctx.subject(&host_path(&e.host, self.path));
        let request = async_nats::client::Request::new()
            .payload(self.payload.clone())
            .headers(req.outgoing_headers());
        let msg = tether_bus::connect::request(&req.ctx.client, subject, request, e.wait)
            .await
            .map_err(|err| forward_problem(&e.host, &err))?;
        if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
            return Err(p);
        }
        req.encoding.decode::<R>(&msg.payload)
    }
}

/// The one mapping of a failed forward. A forward whose connection was lost fails at once
/// (`connect::request`) rather than at its deadline; whether it ran is unknown, and said.
fn forward_problem(host: &str, e: &RequestFailure) -> Problem {
    match e {
        RequestFailure::NoResponders => {
            Problem::unavailable(format!("no orchestrator answers on host `{host}`"))
        }
        RequestFailure::TimedOut(_) => {
            Problem::timeout(format!("host `{host}` did not answer in time"))
        }
        RequestFailure::ConnectionLost => Problem::unavailable(format!(
            "the bus connection was lost while the request to host `{host}` was out: it may or may not have been served"
        )),
        RequestFailure::Other(e) => {
            Problem::unavailable(format!("cannot reach host `{host}`: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_forward_maps_one_way() {
        let status = |f: RequestFailure| forward_problem("h2", &f).status;
        assert_eq!(
            status(RequestFailure::TimedOut(Duration::from_secs(1))),
            504
        );
        assert_eq!(status(RequestFailure::NoResponders), 503);
        assert_eq!(status(RequestFailure::ConnectionLost), 503);
        assert_eq!(status(RequestFailure::Other("x".into())), 503);
        let p = forward_problem("h2", &RequestFailure::ConnectionLost);
        assert!(
            p.detail.contains("`h2`") && p.detail.contains("may or may not"),
            "{}",
            p.detail
        );
    }
}
