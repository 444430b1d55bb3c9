//! What the unit tests of `validate` share: callers and limits as a node on a default
//! configuration has them, and the assertion a refusal is checked with. (The create policy
//! is `spec::Policy::for_tests`.)

use tether_auth::Claims;
use tether_bus::{BearerToken, Caller, ScopeSet};
use tether_bus::{Problem, Scope};

use crate::config::{Limits, OrchestratorConfig};

/// An agent of `space` holding every scope a request of the orchestrator needs.
pub fn agent(space: &str) -> Caller {
    let scopes: ScopeSet = [
        Scope::ContainersWrite,
        Scope::ContainersExec,
        Scope::ContainersRead,
        Scope::ToolsRun,
        Scope::RelicsWrite,
    ]
    .into_iter()
    .collect();
    caller(space, scopes)
}

pub fn operator() -> Caller {
    caller("", [Scope::Operator].into_iter().collect())
}

fn caller(space: &str, scopes: ScopeSet) -> Caller {
    Caller::from_claims(
        Claims {
            iss: "tether".into(),
            sub: "a1".into(),
            aud: "tether".into(),
            space: space.into(),
            scopes,
            iat: 0,
            nbf: 0,
            exp: i64::MAX,
            jti: "j".into(),
        },
        BearerToken::new("t"),
    )
}

/// The limits of the default configuration on a bus of 1 MiB messages.
pub fn limits() -> Limits {
    OrchestratorConfig::default()
        .validate()
        .expect("the default configuration is valid")
        .within_reply(1024 * 1024 - 16 * 1024)
}

/// Asserts a refusal: its status, and that its detail names `word`.
#[track_caller]
pub fn refused<T>(r: Result<T, Problem>, status: u16, word: &str, case: &str) {
    match r {
        Ok(_) => panic!("{case}: accepted, should be refused with {status}"),
        Err(p) => {
            assert_eq!(p.status, status, "{case}: {}", p.detail);
            assert!(
                p.detail.contains(word),
                "{case}: {:?} should name {word}",
                p.detail
            );
        }
    }
}

/// A JSON body decoded as the node decodes it (unknown fields and bad JSON are 400).
pub fn decode<T>(body: &serde_json::Value) -> Result<T, Problem>
where
    T: prost::Message + serde::de::DeserializeOwned + Default,
{
    tether_bus::Encoding::Json.decode::<T>(body.to_string().as_bytes())
}
