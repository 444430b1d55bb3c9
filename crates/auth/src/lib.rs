//! tether identity: JWT claims, Ed25519 signing, verification over a key set, typed scopes.
//!
//! No I/O: keys come in as PEM text or [`PublicKey`] values, time comes in as `now_unix`.
//! The node runtime (`tether-bus`) feeds this from JetStream KV; the permission node signs.
//!
//! The design decision: the algorithm is pinned. [`verify`] reads the header first and
//! refuses anything but `EdDSA` before it looks up a key, so `alg: none` and the classic
//! "HS256 signed with the public key as HMAC secret" confusion cannot reach a verifier.
//! Time checks (`exp`, `nbf`, key retirement) are done here with an explicit `now` and a
//! leeway, so they are deterministic and testable.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

pub mod inbox;

/// Why a token or key was refused. Messages never contain token or key material.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm `{0}` is not accepted (only EdDSA)")]
    Algorithm(String),
    #[error("unknown signing key `{0}`")]
    UnknownKey(String),
    #[error("signing key `{0}` is retired")]
    KeyRetired(String),
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("unknown scope `{0}`")]
    UnknownScope(String),
    #[error("token revoked")]
    Revoked,
    #[error("key error: {0}")]
    Key(String),
}

impl AuthError {
    /// A short stable code, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::KeyRetired(_) => "key_retired",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::UnknownScope(_) => "unknown_scope",
            AuthError::Revoked => "revoked",
            AuthError::Key(_) => "key",
        }
    }
}

/// What a token lets its holder do. `operator` implies every other scope and any space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Operator,
    AgentsAdmin,
    AgentsRead,
    TokensIssue,
    ContainersRead,
    ContainersWrite,
    ContainersExec,
    ToolsRun,
    RelicsWrite,
    ShellExec,
    ModelCall,
    EventsRead,
    /// Call other agents over A2A (`a2a.<agent>.send` and the rest).
    A2aCall,
    /// Serve A2A work as the token's agent (a worker).
    A2aServe,
    /// The agent may be run by the orchestrator as a worker deployment: the orchestrator may
    /// obtain its tokens (`tokens.worker`) while a deployment names it. Grants nothing on
    /// the bus by itself, and is left out of the tokens the orchestrator obtains.
    WorkersHosted,
    /// The bus identity of a space's daemon (`tether-spaced`): answer the exec requests of
    /// the token's space, nothing else. Issued only by `tokens.daemon`; never registered.
    DaemonServe,
}

impl Scope {
    pub const ALL: &'static [Scope] = &[
        Scope::Operator,
        Scope::AgentsAdmin,
        Scope::AgentsRead,
        Scope::TokensIssue,
        Scope::ContainersRead,
        Scope::ContainersWrite,
        Scope::ContainersExec,
        Scope::ToolsRun,
        Scope::RelicsWrite,
        Scope::ShellExec,
        Scope::ModelCall,
        Scope::EventsRead,
        Scope::A2aCall,
        Scope::A2aServe,
        Scope::WorkersHosted,
        Scope::DaemonServe,
    ];

    /// What an agent registered without scopes gets (`tether agent register` with no
    /// `--scope`): everything it needs to work in its own space — its containers, tools,
    /// relics, the shell, models, events, and calling A2A agents. Not given by default:
    /// serving as an A2A worker (`a2a:serve`), and every administrative scope.
    pub const AGENT_DEFAULTS: &'static [Scope] = &[
        Scope::ContainersRead,
        Scope::ContainersWrite,
        Scope::ContainersExec,
        Scope::ToolsRun,
        Scope::RelicsWrite,
        Scope::ShellExec,
        Scope::ModelCall,
        Scope::EventsRead,
        Scope::A2aCall,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Operator => "operator",
            Scope::AgentsAdmin => "agents:admin",
            Scope::AgentsRead => "agents:read",
            Scope::TokensIssue => "tokens:issue",
            Scope::ContainersRead => "containers:read",
            Scope::ContainersWrite => "containers:write",
            Scope::ContainersExec => "containers:exec",
            Scope::ToolsRun => "tools:run",
            Scope::RelicsWrite => "relics:write",
            Scope::ShellExec => "shell:exec",
            Scope::ModelCall => "model:call",
            Scope::EventsRead => "events:read",
            Scope::A2aCall => "a2a:call",
            Scope::A2aServe => "a2a:serve",
            Scope::WorkersHosted => "workers:hosted",
            Scope::DaemonServe => "daemon:serve",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        Scope::ALL
            .iter()
            .copied()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| AuthError::UnknownScope(s.to_string()))
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of scopes; serialized as an array of strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeSet(BTreeSet<Scope>);

impl ScopeSet {
    /// Parses scope names; an unknown name is an error naming it.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ScopeSet, AuthError> {
        names.iter().map(|n| n.as_ref().trim().parse()).collect()
    }
    /// True when the set grants `s` (operator grants everything).
    pub fn allows(&self, s: Scope) -> bool {
        self.0.contains(&Scope::Operator) || self.0.contains(&s)
    }
    pub fn is_operator(&self) -> bool {
        self.0.contains(&Scope::Operator)
    }
    /// True when every scope of `other` is granted by this set.
    pub fn contains_all(&self, other: &ScopeSet) -> bool {
        other.0.iter().all(|s| self.allows(*s))
    }
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_string()).collect()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The set without `s`.
    pub fn without(mut self, s: Scope) -> ScopeSet {
        self.0.remove(&s);
        self
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(i: I) -> Self {
        ScopeSet(i.into_iter().collect())
    }
}

/// The claims of a tether token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The agent id.
    pub sub: String,
    pub aud: String,
    /// The space (container) the agent is bound to.
    pub space: String,
    pub scopes: ScopeSet,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

impl Claims {
    /// Fresh claims valid from `now` for `ttl_secs`, with a random `jti`.
    pub fn new(
        issuer: &str,
        audience: &str,
        agent_id: &str,
        space: &str,
        scopes: ScopeSet,
        now_unix: i64,
        ttl_secs: u64,
    ) -> Claims {
        Claims {
            iss: issuer.to_string(),
            sub: agent_id.to_string(),
            aud: audience.to_string(),
            space: space.to_string(),
            scopes,
            iat: now_unix,
            nbf: now_unix,
            exp: now_unix.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
            jti: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// A public key as published in the key set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    pub kid: String,
    pub alg: String,
    /// The raw 32-byte Ed25519 key, base64url without padding (the JWK `x`).
    pub x: String,
    /// Unix seconds after which tokens signed by this key are refused; 0 = current key.
    #[serde(default)]
    pub not_after: i64,
}

/// An Ed25519 signing key (PKCS#8). Its `Debug` shows only the `kid`.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    public: [u8; 32],
    kid: String,
    encoding: EncodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

const PEM_LABEL: &str = "PRIVATE KEY";

impl SigningKey {
    pub fn generate() -> Result<SigningKey, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| AuthError::Key("key generation failed".into()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    fn from_pkcs8(der: &[u8]) -> Result<SigningKey, AuthError> {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|_| AuthError::Key("not an Ed25519 PKCS#8 key".into()))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let kid: String = URL_SAFE_NO_PAD
            .encode(digest.as_ref())
            .chars()
            .take(16)
            .collect();
        Ok(SigningKey {
            pkcs8: der.to_vec(),
            public,
            kid,
            encoding: EncodingKey::from_ed_der(der),
        })
    }

    /// Reads a `-----BEGIN PRIVATE KEY-----` PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<SigningKey, AuthError> {
        let body: String = pem
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != format!("-----BEGIN {PEM_LABEL}-----"))
            .skip(1)
            .take_while(|l| *l != format!("-----END {PEM_LABEL}-----"))
            .collect();
        if body.is_empty() {
            return Err(AuthError::Key("no PKCS#8 PRIVATE KEY block in PEM".into()));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| AuthError::Key("PEM body is not base64".into()))?;
        Self::from_pkcs8(&der)
    }

    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        out
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            x: URL_SAFE_NO_PAD.encode(self.public),
            not_after: 0,
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(self.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, claims, &self.encoding)
            .map_err(|e| AuthError::Key(format!("signing failed: {e}")))
    }
}

#[derive(Clone)]
struct TrustedKey {
    public: PublicKey,
    decoding: DecodingKey,
}

/// The public keys a verifier trusts, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, TrustedKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .finish()
    }
}

impl KeySet {
    pub fn insert(&mut self, k: PublicKey) -> Result<(), AuthError> {
        if k.alg != "EdDSA" {
            return Err(AuthError::Algorithm(k.alg));
        }
        let raw = URL_SAFE_NO_PAD
            .decode(k.x.as_bytes())
            .map_err(|_| AuthError::Key("`x` is not base64url".into()))?;
        if raw.len() != 32 {
            return Err(AuthError::Key("an Ed25519 public key is 32 bytes".into()));
        }
        let decoding = DecodingKey::from_ed_der(&raw);
        self.keys.insert(
            k.kid.clone(),
            TrustedKey {
                public: k,
                decoding,
            },
        );
        Ok(())
    }
    pub fn remove(&mut self, kid: &str) {
        self.keys.remove(kid);
    }
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid).map(|k| &k.public)
    }
    pub fn kids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.keys.keys().cloned().collect();
        v.sort();
        v
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a token must say about where it comes from and for whom.
#[derive(Clone, Debug)]
pub struct Validation {
    pub issuer: String,
    pub audience: String,
    pub leeway_secs: u64,
}

/// Seconds since the Unix epoch.
/// Spaces whose id starts with this are a warm-pool container's own before it has a space
/// (the orchestrator's `pool` module asks `tokens.daemon` for `tether-pool-<hex>`): no agent is
/// registered into one, so no agent's space can ever share a pool daemon's subject.
pub const POOL_SPACE_PREFIX: &str = "tether-pool-";

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Verifies a compact JWS and returns its claims.
pub fn verify(
    token: &str,
    keys: &KeySet,
    v: &Validation,
    now_unix: i64,
) -> Result<Claims, AuthError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("empty token".into()));
    }
    if token.split('.').count() != 3 {
        return Err(AuthError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    }
    // The header's `alg` decides nothing but refusal: read it raw, before any key lookup.
    let header_b64 = token.split('.').next().unwrap_or_default();
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64.trim_end_matches('=').as_bytes())
        .map_err(|_| AuthError::Malformed("header is not base64url".into()))?;
    let raw_header: serde_json::Value = serde_json::from_slice(&header_json)
        .map_err(|_| AuthError::Malformed("header is not JSON".into()))?;
    let alg = raw_header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if alg != "EdDSA" {
        return Err(AuthError::Algorithm(if alg.is_empty() {
            "<missing>".into()
        } else {
            alg.chars().take(16).collect()
        }));
    }
    let kid = raw_header
        .get("kid")
        .and_then(|k| k.as_str())
        .ok_or(AuthError::MissingClaim("kid"))?
        .to_string();
    let key = keys
        .keys
        .get(&kid)
        .ok_or_else(|| AuthError::UnknownKey(kid.chars().take(64).collect()))?;
    let leeway = i64::try_from(v.leeway_secs).unwrap_or(0);
    if key.public.not_after != 0 && now_unix > key.public.not_after + leeway {
        return Err(AuthError::KeyRetired(kid));
    }

    let mut val = jsonwebtoken::Validation::new(Algorithm::EdDSA);
    // Time, issuer and audience are checked below with our own clock and messages.
    val.validate_exp = false;
    val.validate_nbf = false;
    val.validate_aud = false;
    val.required_spec_claims.clear();
    let data =
        jsonwebtoken::decode::<serde_json::Value>(token, &key.decoding, &val).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm(alg.into()),
                _ => AuthError::Malformed("undecodable token".into()),
            }
        })?;
    let c = data.claims;
    let s = |k: &'static str| -> Result<String, AuthError> {
        c.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or(AuthError::MissingClaim(k))
    };
    let n = |k: &'static str| -> Result<i64, AuthError> {
        c.get(k)
            .and_then(|x| x.as_i64())
            .ok_or(AuthError::MissingClaim(k))
    };
    let exp = n("exp")?;
    let nbf = n("nbf")?;
    let iat = n("iat")?;
    if now_unix > exp + leeway {
        return Err(AuthError::Expired);
    }
    if now_unix + leeway < nbf {
        return Err(AuthError::NotYetValid);
    }
    if s("iss")? != v.issuer {
        return Err(AuthError::WrongIssuer);
    }
    if s("aud")? != v.audience {
        return Err(AuthError::WrongAudience);
    }
    let scopes: Vec<String> = c
        .get("scopes")
        .and_then(|x| x.as_array())
        .ok_or(AuthError::MissingClaim("scopes"))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or(AuthError::MissingClaim("scopes"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Claims {
        iss: s("iss")?,
        sub: s("sub")?,
        aud: s("aud")?,
        space: s("space")?,
        scopes: ScopeSet::parse(&scopes)?,
        iat,
        nbf,
        exp,
        jti: s("jti")?,
    })
}

#[cfg(test)]
mod tests;
