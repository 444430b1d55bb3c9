//! What a handler receives and returns: [`Request`] (decoded, with its caller),
//! [`RawRequest`] (bytes), [`Reply`].
//!
//! The one design decision to know: the caller is in the request's type. A protected endpoint's
//! handler takes a [`Request<T>`] whose `caller` is a verified [`Caller`] — nothing to unwrap; a
//! public one takes a [`PublicRequest<T>`] (`Option<Caller>`). Turning the runtime's
//! `Option<Caller>` into a `Caller` is [`CallerKind::from_verified`]: a 401 if it is missing,
//! never a panic.

use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::auth::Caller;
use crate::codec::{CONTENT_TYPE, Encoding};
use crate::node::Ctx;
use crate::{Problem, telemetry};

/// A decoded request. `C` is what the handler knows of its caller: a verified [`Caller`] on
/// a protected endpoint ([`Endpoint::new`]), an `Option<Caller>` on a public one
/// ([`Endpoint::public`], see [`PublicRequest`]).
pub struct Request<T, C = Caller> {
    pub body: T,
    pub caller: C,
    pub subject: Subject,
    pub reply: Option<Subject>,
    pub headers: HeaderMap,
    pub encoding: Encoding,
    /// Shared by every request of the node: one reference count per request, not a copy of
    /// the connection handles.
    pub ctx: Arc<Ctx>,
}

/// The request of a public endpoint: a caller only if the endpoint was also given
/// [`Endpoint::scope`] or [`Endpoint::authenticated`].
pub type PublicRequest<T> = Request<T, Option<Caller>>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::Caller {}
    impl Sealed for Option<crate::Caller> {}
}

/// What a request carries of its caller: [`Caller`] or `Option<Caller>` (sealed).
pub trait CallerKind: sealed::Sealed + Send + Sized + 'static {
    /// From what the runtime verified; a protected request without a caller is a 401 (the
    /// runtime never builds one, and never panics if it did).
    fn from_verified(caller: Option<Caller>) -> Result<Self, Problem>;
    fn as_caller(&self) -> Option<&Caller>;
}

impl CallerKind for Caller {
    fn from_verified(caller: Option<Caller>) -> Result<Self, Problem> {
        caller.ok_or_else(|| Problem::unauthorized("this operation needs a token"))
    }
    fn as_caller(&self) -> Option<&Caller> {
        Some(self)
    }
}

impl CallerKind for Option<Caller> {
    fn from_verified(caller: Option<Caller>) -> Result<Self, Problem> {
        Ok(caller)
    }
    fn as_caller(&self) -> Option<&Caller> {
        self.as_ref()
    }
}

impl<T, C: CallerKind> Request<T, C> {
    /// Headers for a request this handler makes to another node: the trace context and, when
    /// there is a caller, its token (so the other node checks it again).
    pub fn outgoing_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if !telemetry::inject_current(&mut h)
            && let Some(tp) = self.headers.get(telemetry::TRACEPARENT)
        {
            h.insert(telemetry::TRACEPARENT, tp.as_str());
        }
        if let Some(c) = self.caller.as_caller() {
            c.bearer().insert_into(&mut h);
        }
        h
    }
}

/// An undecoded request, for endpoints that handle bytes themselves. `caller` is `Some` on
/// protected endpoints (the runtime refused the request otherwise).
pub struct RawRequest {
    pub payload: Bytes,
    pub caller: Option<Caller>,
    pub subject: Subject,
    pub reply: Option<Subject>,
    pub headers: HeaderMap,
    pub encoding: Encoding,
    /// Shared by every request of the node: one reference count per request, not a copy of
    /// the connection handles.
    pub ctx: Arc<Ctx>,
}

impl RawRequest {
    /// Decodes the body (400 when malformed) into the request a typed handler takes; a
    /// [`Request<T>`] needs a caller (401 without).
    pub fn decode<T, C>(self) -> Result<Request<T, C>, Problem>
    where
        T: prost::Message + DeserializeOwned + Default,
        C: CallerKind,
    {
        let body = self.encoding.decode::<T>(&self.payload)?;
        Ok(Request {
            body,
            caller: C::from_verified(self.caller)?,
            subject: self.subject,
            reply: self.reply,
            headers: self.headers,
            encoding: self.encoding,
            ctx: self.ctx,
        })
    }
}

/// The first value of header `name` (exact match, as `HeaderMap::get`), found by walking the
/// few headers a request has: `get` parses, allocates and SipHashes its key, which on the
/// request path cost more than the rest of the runtime's own work.
pub(crate) fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(n, _)| AsRef::<str>::as_ref(n) == name)
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str())
}

/// A reply body with its headers.
pub struct Reply {
    pub body: Bytes,
    pub headers: HeaderMap,
}

impl Reply {
    pub fn new(body: impl Into<Bytes>, content_type: &str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type);
        Self {
            body: body.into(),
            headers,
        }
    }
}
