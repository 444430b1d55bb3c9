//! The gateway's own settings: providers, routes, resilience, privacy, limits.
//!
//! Two types, as ripgrep does with flags: [`GatewayConfig`] is what the operator wrote (serde,
//! top level of `tether.toml` next to the bus settings, `TETHER_*` env), and
//! [`GatewayConfig::validate`] turns it into checked settings or a [`ConfigError`] naming the
//! bad key (the binary exits 64). API keys are never in this struct: only the *name* of the
//! environment variable or the *path* of the file that holds one. The key itself is read once,
//! into a [`Secret`] that prints as `***`, in [`crate::provider`].

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tether_bus::config::Secret;

/// What a provider speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI-compatible: `POST {base}/chat/completions`, `{base}/embeddings`, and `{base}/rerank`
    /// (vLLM serves all three). Ollama, vLLM, llama.cpp server, MLX servers, hosted APIs.
    #[default]
    Openai,
    /// A rerank server: `POST {base}/rerank` only (text-embeddings-inference, Cohere-style).
    Rerank,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Rerank => "rerank",
        }
    }

    /// Whether this kind of provider serves `op`.
    pub fn serves(self, op: Op) -> bool {
        match self {
            ProviderKind::Openai => true,
            ProviderKind::Rerank => op == Op::Rank,
        }
    }
}

/// The three model operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Chat,
    Embed,
    Rank,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Chat => "chat",
            Op::Embed => "embed",
            Op::Rank => "rank",
        }
    }
}

/// One back end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Unique name, used in routes, replies and stats.
    pub name: String,
    /// `http(s)://host:port/prefix` — e.g. `http://127.0.0.1:11434/v1`. The only place the
    /// gateway ever sends this provider's traffic (redirects are not followed).
    pub base_url: String,
    pub kind: ProviderKind,
    /// Name of an environment variable holding the API key (sent as `Authorization: Bearer`).
    pub api_key_env: Option<String>,
    /// A file holding the API key (surrounding whitespace trimmed).
    pub api_key_file: Option<PathBuf>,
    /// One attempt's budget: the whole response, or for a stream the wait for the headers and
    /// between two chunks. The caller's deadline bounds it further.
    pub timeout_ms: u64,
    /// Budget to open a connection.
    pub connect_timeout_ms: u64,
    /// Calls in flight at once. When full, the call falls back to the next provider; the last
    /// provider of a route is waited for (within the deadline).
    pub max_concurrency: usize,
    /// Runs on this machine or network the operator trusts; the only kind privacy mode uses.
    pub local: bool,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            base_url: String::new(),
            kind: ProviderKind::Openai,
            api_key_env: None,
            api_key_file: None,
            timeout_ms: 120_000,
            connect_timeout_ms: 3_000,
            max_concurrency: 64,
            local: false,
        }
    }
}

/// One provider of a route, with the model name that provider knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    /// Empty: the model name the caller asked for.
    pub upstream_model: String,
}

/// A model name or glob (`*`, `?`) → providers in fallback order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub model: String,
    pub targets: Vec<TargetConfig>,
}

/// The node's settings (top level of `tether.toml`, or `TETHER_<KEY>`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GatewayConfig {
    /// Privacy mode for every request: only local providers.
    pub privacy: bool,
    /// Agents (token `sub`) whose requests are always private.
    pub privacy_agents: Vec<String>,
    /// Spaces whose agents' requests are always private.
    pub privacy_spaces: Vec<String>,
    /// Deadline of a call that names none.
    pub default_timeout_ms: u64,
    /// Longest deadline a caller may ask for (longer ones are capped).
    pub max_timeout_ms: u64,
    /// Retries on one provider after a connect error, 429 or 5xx (never after another 4xx).
    pub retries: u32,
    /// First backoff; doubles per retry, with jitter, up to `retry_backoff_max_ms`.
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Consecutive failures that open a provider's circuit (0 = never).
    pub breaker_failures: u32,
    /// How long an open circuit skips its provider before one probe call is let through.
    pub breaker_cooldown_ms: u64,
    /// Requests per agent per minute across chat, embed and rank (0 = unlimited).
    pub rate_limit_per_minute: u32,
    /// Requests each endpoint serves at once (streams included).
    pub endpoint_concurrency: usize,
    /// Subjects a stream may be published to start with one of these.
    pub stream_subject_prefixes: Vec<String>,
    /// Largest upstream response body accepted.
    pub max_response_bytes: usize,
    pub providers: Vec<ProviderConfig>,
    pub routes: Vec<RouteConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            privacy: false,
            privacy_agents: Vec::new(),
            privacy_spaces: Vec::new(),
            default_timeout_ms: 120_000,
            max_timeout_ms: 600_000,
            retries: 2,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 2_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
            rate_limit_per_minute: 0,
            endpoint_concurrency: 1024,
            stream_subject_prefixes: vec![
                "_INBOX.".into(),
                "_INBOX_NODES.".into(),
                "model.stream.".into(),
            ],
            max_response_bytes: 64 * 1024 * 1024,
            providers: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// A configuration the gateway refuses to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid model-gateway configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(s: impl Into<String>) -> ConfigError {
    ConfigError(s.into())
}

impl GatewayConfig {
    /// Checks everything that can be checked without the network; keys are read here too, so a
    /// missing key stops the start instead of failing every call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.name.is_empty() || p.name.len() > 64 || p.name.contains(char::is_whitespace) {
                return Err(bad(format!(
                    "providers[{i}].name must be 1-64 characters without spaces"
                )));
            }
            if !names.insert(p.name.as_str()) {
                return Err(bad(format!("provider {:?} is defined twice", p.name)));
            }
            check_base_url(&p.base_url)
                .map_err(|e| bad(format!("provider {:?}: base_url {e}", p.name)))?;
            if p.timeout_ms == 0 || p.connect_timeout_ms == 0 {
                return Err(bad(format!(
                    "provider {:?}: timeout_ms and connect_timeout_ms must be > 0",
                    p.name
                )));
            }
            if p.max_concurrency == 0 {
                return Err(bad(format!(
                    "provider {:?}: max_concurrency must be > 0",
                    p.name
                )));
            }
            if p.api_key_env.is_some() && p.api_key_file.is_some() {
                return Err(bad(format!(
                    "provider {:?}: set api_key_env or api_key_file, not both",
                    p.name
                )));
            }
        }
        let mut patterns = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.model.is_empty() || r.model.len() > 256 {
                return Err(bad(format!("routes[{i}].model must be 1-256 characters")));
            }
            if !patterns.insert(r.model.as_str()) {
                return Err(bad(format!("route {:?} is defined twice", r.model)));
            }
            if r.targets.is_empty() {
                return Err(bad(format!("route {:?} has no targets", r.model)));
            }
            for t in &r.targets {
                if !names.contains(t.provider.as_str()) {
                    return Err(bad(format!(
                        "route {:?} names unknown provider {:?}",
                        r.model, t.provider
                    )));
                }
            }
        }
        if self.default_timeout_ms == 0 || self.max_timeout_ms < self.default_timeout_ms {
            return Err(bad(
                "default_timeout_ms must be > 0 and at most max_timeout_ms",
            ));
        }
        if self.endpoint_concurrency == 0 {
            return Err(bad("endpoint_concurrency must be > 0"));
        }
        if self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(bad("retry_backoff_max_ms must be ≥ retry_backoff_ms"));
        }
        if self.retries > 10 {
            return Err(bad("retries must be at most 10"));
        }
        if self.stream_subject_prefixes.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "stream_subject_prefixes must not contain an empty prefix",
            ));
        }
        Ok(())
    }
}

/// Accepts `http://` or `https://` with a host; no query or fragment (paths are appended).
fn check_base_url(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| format!("is not a URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (use api_key_env or api_key_file)".into());
    }
    Ok(())
}

/// Reads a provider's key: from the environment through `env`, or from its file.
pub fn load_key(
    p: &ProviderConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(var) = &p.api_key_env {
        let v = env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
            bad(format!(
                "provider {:?}: environment variable {var} (api_key_env) is not set",
                p.name
            ))
        })?;
        return Ok(Some(Secret::new(v.trim().to_string())));
    }
    if let Some(path) = &p.api_key_file {
        let v = std::fs::read_to_string(path).map_err(|e| {
            bad(format!(
                "provider {:?}: cannot read api_key_file {}: {e}",
                p.name,
                path.display()
            ))
        })?;
        let v = v.trim();
        if v.is_empty() {
            return Err(bad(format!(
                "provider {:?}: api_key_file {} is empty",
                p.name,
                path.display()
            )));
        }
        return Ok(Some(Secret::new(v.to_string())));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            ..Default::default()
        }
    }

    fn with(providers: Vec<ProviderConfig>, routes: Vec<RouteConfig>) -> GatewayConfig {
        GatewayConfig {
            providers,
            routes,
            ..Default::default()
        }
    }

    fn route(model: &str, providers: &[&str]) -> RouteConfig {
        RouteConfig {
            model: model.into(),
            targets: providers
                .iter()
                .map(|p| TargetConfig {
                    provider: (*p).into(),
                    upstream_model: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn accepts_a_sane_config() {
        let c = with(vec![provider("a")], vec![route("m*", &["a"])]);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn refuses_bad_configs() {
        let cases = [
            with(vec![provider("a"), provider("a")], vec![]),
            with(vec![provider("")], vec![]),
            with(vec![provider("a")], vec![route("m", &["b"])]),
            with(vec![provider("a")], vec![route("m", &[])]),
            with(
                vec![provider("a")],
                vec![route("m", &["a"]), route("m", &["a"])],
            ),
            with(
                vec![ProviderConfig {
                    base_url: "ftp://x".into(),
                    ..provider("a")
                }],
                vec![],
            ),
            with(
                vec![ProviderConfig {
                    base_url: "http://user:pw@x/v1".into(),
                    ..provider("a")
                }],
                vec![],
            ),
            with(
                vec![ProviderConfig {
                    base_url: "not a url".into(),
                    ..provider("a")
                }],
                vec![],
            ),
            with(
                vec![ProviderConfig {
                    max_concurrency: 0,
                    ..provider("a")
                }],
                vec![],
            ),
            with(
                vec![ProviderConfig {
                    api_key_env: Some("X".into()),
                    api_key_file: Some("/x".into()),
                    ..provider("a")
                }],
                vec![],
            ),
            GatewayConfig {
                default_timeout_ms: 0,
                ..Default::default()
            },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "should refuse {c:?}");
        }
    }

    #[test]
    fn keys_come_from_env_or_file_and_must_exist() {
        let p = ProviderConfig {
            api_key_env: Some("K".into()),
            ..provider("a")
        };
        let k = load_key(&p, &|n| (n == "K").then(|| "sk-env ".to_string()))
            .expect("key")
            .expect("some");
        assert_eq!(k.expose(), "sk-env");
        assert_eq!(format!("{k:?}"), "Secret(***)");
        assert!(load_key(&p, &|_| None).is_err());

        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-file\n").expect("write");
        let p = ProviderConfig {
            api_key_file: Some(f.clone()),
            ..provider("a")
        };
        let k = load_key(&p, &|_| None).expect("key").expect("some");
        assert_eq!(k.expose(), "sk-file");
        std::fs::write(&f, "  \n").expect("write");
        assert!(load_key(&p, &|_| None).is_err());
        let p = ProviderConfig {
            api_key_file: Some(dir.path().join("missing")),
            ..provider("a")
        };
        assert!(load_key(&p, &|_| None).is_err());
        assert_eq!(load_key(&provider("a"), &|_| None), Ok(None));
    }
}
