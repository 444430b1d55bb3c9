//! Identity commands: the signing key, the first operator token (offline), and agents and
//! their tokens through the permission node.

use std::path::{Path, PathBuf};

use tether_auth::{Claims, Scope, ScopeSet, SigningKey};
use tether_bus::config::AuthConfig;

use crate::{CliError, EXIT_CONFIG};

/// `tether keys init`: writes a new Ed25519 signing key (mode 0600, folder 0700).
pub fn keys_init(path: &Path, force: bool) -> Result<String, CliError> {
    if path.exists() && !force {
        return Err(CliError::new(
            1,
            format!("{} exists; use --force to replace it", path.display()),
        ));
    }
    let key = SigningKey::generate().map_err(|e| CliError::new(1, e.to_string()))?;
    write_key(path, &key, force)?;
    Ok(key.kid().to_string())
}

fn write_key(path: &Path, key: &SigningKey, force: bool) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o
        .open(path)
        .map_err(|e| CliError::new(1, format!("cannot write {}: {e}", path.display())))?;
    f.write_all(key.to_pem().as_bytes())
        .map_err(|e| CliError::new(1, e.to_string()))
}

/// The key file to use: the flag, else the configured `signing_key_file` (the permission
/// node's setting, from the same layers), else the default path shared with `tether up`.
pub fn key_path(flag: Option<&Path>, layers: Option<&tether_bus::Layers>) -> PathBuf {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct KeySetting {
        signing_key_file: Option<PathBuf>,
    }
    flag.map(Path::to_path_buf)
        .or_else(|| {
            layers
                .and_then(|l| l.node::<KeySetting>().ok())
                .and_then(|k| k.signing_key_file)
        })
        .unwrap_or_else(tether_bus::config::default_signing_key_path)
}

/// `tether token issue --operator`: signs an operator token offline from the key file.
pub fn operator_token(
    key_file: &Path,
    ttl_secs: u64,
    auth: &AuthConfig,
) -> Result<(String, Claims), CliError> {
    let pem = std::fs::read_to_string(key_file).map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot read signing key {}: {e} (run `tether keys init`, or `tether up` once for a dev key)", key_file.display()),
        )
    })?;
    let key = SigningKey::from_pem(&pem)
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("{}: {e}", key_file.display())))?;
    let scopes: ScopeSet = [Scope::Operator].into_iter().collect();
    let claims = Claims::new(
        &auth.issuer,
        &auth.audience,
        "operator",
        "",
        scopes,
        tether_auth::now_unix(),
        ttl_secs,
    );
    let token = key
        .sign(&claims)
        .map_err(|e| CliError::new(1, e.to_string()))?;
    Ok((token, claims))
}

/// What an agent process needs to connect: `tether agent creds`.
pub struct AgentCreds {
    pub url: String,
    pub token: String,
    pub inbox_prefix: String,
    pub expires_at: i64,
}

/// The credentials of `agent_id` from a `tokens.issue` answer, for the bus at `url` (any
/// credentials of the operator's own in the URL are left out).
pub fn agent_creds(
    url: &str,
    agent_id: &str,
    issued: &serde_json::Value,
) -> Result<AgentCreds, CliError> {
    let token = issued["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| CliError::new(1, "the permission node answered no token"))?;
    Ok(AgentCreds {
        url: tether_bus::connect::display_url(url),
        token: token.to_string(),
        inbox_prefix: tether_auth::inbox::agent_inbox_prefix(agent_id),
        // pbjson writes 64-bit integers as strings.
        expires_at: issued["expires_at"]
            .as_i64()
            .or_else(|| issued["expires_at"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or_default(),
    })
}

impl AgentCreds {
    /// `KEY=value` lines a tether client reads (`TETHER_NATS_*`), and the `nats` CLI's flags.
    pub fn env(&self) -> String {
        format!(
            "# bus credentials; the token expires at unix time {exp}\n\
             TETHER_NATS_URL={url}\nTETHER_NATS_TOKEN={token}\nTETHER_TOKEN={token}\n\
             TETHER_NATS_INBOX_PREFIX={inbox}\n\
             # nats CLI: nats --server {url} --token \"$TETHER_NATS_TOKEN\" --inbox-prefix {inbox} \\\n\
             #   request shell.exec '{{\"command\":\"id\"}}' -H \"Authorization:Bearer $TETHER_TOKEN\"",
            exp = self.expires_at,
            url = self.url,
            token = self.token,
            inbox = self.inbox_prefix,
        )
    }

    pub fn json(&self) -> String {
        serde_json::json!({
            "url": self.url,
            "token": self.token,
            "inbox_prefix": self.inbox_prefix,
            "expires_at": self.expires_at,
        })
        .to_string()
    }
}
