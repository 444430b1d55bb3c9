//! Layered node configuration.
//!
//! Layers, later wins: built-in defaults → a TOML file (`tether.toml`, or `--config`) →
//! `NATS_URL` → `TETHER_*` environment variables (`TETHER_NATS_URL`, `TETHER_AUTH__ISSUER`:
//! a double underscore nests). A node's own settings live at the top level next to the bus
//! settings, so one file and one env prefix configure a whole node; each node extracts its
//! own struct from the same [`Figment`].
//!
//! NATS connection settings are all spelled `nats_*` so that, for instance, the agent token
//! in `TETHER_TOKEN` can never be mistaken for a NATS server token.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The default bus address when nothing is configured.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// A configured secret. `Debug` and `Display` never show it, and it serializes as `"***"`,
/// so a whole config can be logged without leaking.
#[derive(Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself. Call only where it is handed to the component that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// TLS options for the bus connection.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TlsConfig {
    /// Require TLS even if the server does not ask for it.
    pub required: bool,
    /// PEM file of root certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// How tokens are verified.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AuthConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// Clock skew allowed on `exp` / `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// KV bucket holding the public keys (`kid` → key).
    pub keys_bucket: String,
    /// KV bucket holding revocations (`agent.<id>` / `jti.<id>`).
    pub revoked_bucket: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "tether".into(),
            audience: "tether".into(),
            leeway_seconds: 30,
            keys_bucket: "tether_keys".into(),
            revoked_bucket: "tether_revoked".into(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Settings every node shares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BusConfig {
    /// Bus address(es), comma separated.
    pub nats_url: String,
    pub nats_user: Option<String>,
    pub nats_password: Option<Secret>,
    pub nats_token: Option<Secret>,
    /// A NATS `.creds` file (JWT + nkey seed).
    pub nats_creds_file: Option<PathBuf>,
    /// A file holding a user nkey seed: how a node connects as its node kind's NATS user.
    pub nats_nkey_file: Option<PathBuf>,
    /// A file holding a tether token to connect with (the auth callout checks it), read again
    /// at every (re)connect, so whoever renews the file renews the connection.
    pub nats_token_file: Option<PathBuf>,
    /// Where replies to this client's requests arrive. Default: `_INBOX.<agent id>` when it
    /// connects with a token, `_INBOX_NODES.<client name>` otherwise (`tether_auth::inbox`).
    pub nats_inbox_prefix: Option<String>,
    pub nats_tls: TlsConfig,
    /// Optional deployment prefix put in front of every subject (`prod` → `prod.containers.create`).
    pub subject_prefix: Option<String>,
    /// Queue group of every endpoint, so replicas share the load.
    pub queue_group: String,
    /// Requests one endpoint handles at once; more wait in the subscription.
    pub max_concurrency: usize,
    /// Largest request payload accepted (bytes); larger ones are answered 413.
    pub max_payload_bytes: usize,
    /// Time in-flight work gets to finish after SIGTERM.
    pub drain_timeout_seconds: u64,
    /// Default timeout for requests this node makes to other nodes.
    pub request_timeout_seconds: u64,
    /// `tracing` filter, e.g. `info,tether_bus=debug`.
    pub log: String,
    pub log_format: LogFormat,
    /// Replicas of the shared buckets any node may be first to create (the signing keys and
    /// revocations its token verifier reads): `TETHER_KV_REPLICAS`, the setting the
    /// permission node and the orchestrator read for their own buckets too. On a 3-node
    /// cluster give every node 3, or an R1 keys bucket on one server stops every verifier
    /// that starts while that server is down.
    pub kv_replicas: usize,
    /// OTLP/HTTP endpoint for trace export (e.g. `http://127.0.0.1:4318/v1/traces`); off when unset.
    pub otlp_endpoint: Option<String>,
    pub auth: AuthConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.into(),
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_creds_file: None,
            nats_nkey_file: None,
            nats_token_file: None,
            nats_inbox_prefix: None,
            nats_tls: TlsConfig::default(),
            subject_prefix: None,
            queue_group: "tether".into(),
            max_concurrency: 256,
            max_payload_bytes: 1024 * 1024,
            drain_timeout_seconds: 30,
            request_timeout_seconds: 30,
            log: "info".into(),
            log_format: LogFormat::Text,
            kv_replicas: 1,
            otlp_endpoint: None,
            auth: AuthConfig::default(),
        }
    }
}

impl BusConfig {
    /// The full subject for a service path: `/containers/create` or `containers.create`,
    /// with the deployment prefix when one is configured.
    pub fn subject(&self, path: &str) -> String {
        let s = crate::subject::normalize(path);
        match self.subject_prefix.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => format!("{p}.{s}"),
            None => s,
        }
    }
}

/// Where the permission node's signing key lives when nothing else is configured:
/// `$TETHER_SIGNING_KEY_FILE`, else `$XDG_DATA_HOME/tether/signing-key.pem`, else
/// `~/.local/share/tether/signing-key.pem`. `tether up` (dev key made on first start) and
/// `tether token issue --operator` both look here, so local development needs no manual step.
pub fn default_signing_key_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_SIGNING_KEY_FILE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tether").join("signing-key.pem")
}

/// Errors of loading configuration (a binary exits 64 on these).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// The layered configuration of a node, before it is split into typed parts.
#[derive(Clone, Debug)]
pub struct Layers {
    figment: Figment,
}

impl Layers {
    /// Defaults → `path` (or `./tether.toml` when it exists) → `NATS_URL` → `TETHER_*`.
    pub fn load(path: Option<&Path>) -> Self {
        Self::load_from(
            path,
            Env::prefixed("TETHER_").split("__"),
            Env::raw().only(&["NATS_URL"]),
        )
    }

    fn load_from(path: Option<&Path>, tether_env: Env, nats_env: Env) -> Self {
        let mut figment = Figment::from(Serialized::defaults(BusConfig::default()));
        match path {
            Some(p) => figment = figment.merge(Toml::file_exact(p)),
            None => figment = figment.merge(Toml::file("tether.toml")),
        }
        figment = figment
            .merge(nats_env.map(|_| "nats_url".into()))
            .merge(tether_env);
        Self { figment }
    }

    /// Adds a provider on top (tests, or values from command-line flags).
    pub fn merge(mut self, provider: impl figment::Provider) -> Self {
        self.figment = self.figment.merge(provider);
        self
    }

    /// The bus part.
    pub fn bus(&self) -> Result<BusConfig, ConfigError> {
        let cfg: BusConfig = self.figment.extract().map_err(Box::new)?;
        if cfg.max_concurrency == 0 {
            return Err(ConfigError(Box::new(figment::Error::from(
                "max_concurrency must be at least 1".to_string(),
            ))));
        }
        Ok(cfg)
    }

    /// A node's own part, extracted from the same layers (unknown keys are other parts').
    pub fn node<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        Ok(self.figment.extract().map_err(Box::new)?)
    }

    pub fn figment(&self) -> &Figment {
        &self.figment
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn layers_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "nats_url = \"nats://file:1\"\nmax_concurrency = 7\n[auth]\nissuer = \"f\"",
            )?;
            let l = Layers::load(Some(Path::new("t.toml")));
            let c = l.bus().map_err(|e| e.to_string())?;
            assert_eq!(c.nats_url, "nats://file:1");
            assert_eq!(c.max_concurrency, 7);
            assert_eq!(c.auth.issuer, "f");
            assert_eq!(c.auth.audience, "tether");

            jail.set_env("NATS_URL", "nats://plain:2");
            let c = Layers::load(Some(Path::new("t.toml")))
                .bus()
                .map_err(|e| e.to_string())?;
            assert_eq!(c.nats_url, "nats://plain:2");

            jail.set_env("TETHER_NATS_URL", "nats://tether:3");
            jail.set_env("TETHER_AUTH__AUDIENCE", "aud2");
            jail.set_env("TETHER_TOKEN", "agent-jwt-not-a-nats-token");
            let c = Layers::load(Some(Path::new("t.toml")))
                .bus()
                .map_err(|e| e.to_string())?;
            assert_eq!(c.nats_url, "nats://tether:3");
            assert_eq!(c.auth.audience, "aud2");
            assert_eq!(c.nats_token, None);
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error_and_bad_values_too() {
        figment::Jail::expect_with(|_| {
            assert!(Layers::load(Some(Path::new("nope.toml"))).bus().is_err());
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("b.toml", "max_concurrency = \"many\"")?;
            let e = Layers::load(Some(Path::new("b.toml")))
                .bus()
                .expect_err("bad type");
            assert!(e.to_string().contains("max_concurrency"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let mut c = BusConfig {
            nats_password: Some(Secret::new("hunter2")),
            ..Default::default()
        };
        c.nats_token = Some(Secret::new("tok-123"));
        let dbg = format!("{c:?}");
        let json = serde_json::to_string(&c).expect("json");
        for s in [dbg, json] {
            assert!(!s.contains("hunter2") && !s.contains("tok-123"), "{s}");
        }
    }

    #[test]
    fn subject_prefix() {
        let mut c = BusConfig::default();
        assert_eq!(c.subject("/containers/create"), "containers.create");
        c.subject_prefix = Some("prod".into());
        assert_eq!(c.subject("containers.create"), "prod.containers.create");
    }
}
