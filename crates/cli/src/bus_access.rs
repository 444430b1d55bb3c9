//! The local fleet's bus credentials (`tether up`): one key bundle
//! ([`tether_permission_node::server_conf::BusKeys`]) kept next to the signing key, the
//! nats-server configuration that enforces it, and each node's share of it.
//!
//! The bundle lives in `$TETHER_BUS_KEYS_DIR`, else `bus-keys/` beside the signing key
//! (`~/.local/share/tether/bus-keys`), made on first use (0700, files 0600). The server
//! configuration `tether up` starts nats-server with is written there too
//! (`nats-server.conf`: the launch file's configuration with the accounts,
//! node users and auth callout), because it holds the break-glass admin password.

use std::path::{Path, PathBuf};

use tether_permission_node::access::NodeKind;
use tether_permission_node::callout::CalloutConfig;
use tether_permission_node::server_conf::{ADMIN_USER, BusKeys};

use crate::CliError;

/// The bundle and where it is.
pub struct LocalBus {
    pub dir: PathBuf,
    keys: BusKeys,
}

/// Whether `u` names bus credentials a launch file's node may get: a node kind or `admin`.
pub fn is_bus_user(u: &str) -> bool {
    u == ADMIN_USER || NodeKind::ALL.iter().any(|k| k.name() == u)
}

/// `$TETHER_BUS_KEYS_DIR`, else `bus-keys/` beside the default signing key.
pub fn bundle_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TETHER_BUS_KEYS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let key = tether_bus::config::default_signing_key_path();
    key.parent()
        .map_or_else(|| PathBuf::from("bus-keys"), |p| p.join("bus-keys"))
}

impl LocalBus {
    /// The bundle at [`bundle_dir`], made there when there is none.
    pub fn load_or_create() -> Result<Self, CliError> {
        Self::load_or_create_in(bundle_dir())
    }

    /// The bundle in `dir`, made there when there is none.
    pub fn load_or_create_in(dir: PathBuf) -> Result<Self, CliError> {
        let keys = BusKeys::load_or_create(&dir)
            .map_err(|e| CliError::new(1, format!("bus keys at {}: {e:#}", dir.display())))?;
        Ok(LocalBus { dir, keys })
    }

    /// `url` with the admin user's credentials: how `tether up` itself talks to the bus.
    pub fn admin_url(&self, url: &str) -> String {
        match url.split_once("://") {
            Some((scheme, rest)) => format!(
                "{scheme}://{ADMIN_USER}:{}@{rest}",
                self.keys.admin_password
            ),
            None => format!("{ADMIN_USER}:{}@{url}", self.keys.admin_password),
        }
    }

    /// Writes `authorization.conf` (the accounts, node users and auth callout: public keys and
    /// the admin password) and `nats-server.conf` (the text of `base` when given, else
    /// JetStream in `.tether/nats`, then the authorization) into the bundle; returns the latter.
    pub fn write_server_conf(&self, base: Option<&Path>) -> Result<PathBuf, CliError> {
        // Inlined, not included: nats-server resolves every `include` against the including
        // file's folder, so an absolute path cannot be included.
        let head = match base {
            Some(b) => {
                let text = std::fs::read_to_string(b)
                    .map_err(|e| CliError::new(1, format!("server config {}: {e}", b.display())))?;
                format!("# from {}\n{text}\n", b.display())
            }
            None => "jetstream {\n  store_dir: \".tether/nats\"\n}\n".to_string(),
        };
        write_private(
            &self.dir.join("authorization.conf"),
            &format!(
                "# written by tether: who may connect to the bus (include it in every server's config)\n{}",
                self.keys.authorization_conf(None)
            ),
        )?;
        let path = self.dir.join("nats-server.conf");
        write_private(
            &path,
            &format!("# written by tether\n{head}include \"authorization.conf\"\n"),
        )?;
        Ok(path)
    }

    /// The environment giving node `name` its bus credentials: those of `bus_user` (a node
    /// kind's name, or `admin` with the bus at `url`), by default of its own name when that is
    /// a node kind; nothing otherwise (it brings its own).
    pub fn node_env(&self, name: &str, bus_user: Option<&str>, url: &str) -> Vec<(String, String)> {
        let who = bus_user.unwrap_or(name);
        if who == ADMIN_USER {
            return vec![("TETHER_NATS_URL".into(), self.admin_url(url))];
        }
        // An unknown `bus_user` was refused when the launch file was read.
        let Some(kind) = NodeKind::ALL.iter().find(|k| k.name() == who) else {
            return vec![];
        };
        let path = |p: PathBuf| p.display().to_string();
        let mut env = vec![(
            "TETHER_NATS_NKEY_FILE".to_string(),
            path(BusKeys::node_seed_file(&self.dir, *kind)),
        )];
        if *kind == NodeKind::Permission {
            let c = CalloutConfig::from_bundle(&self.dir);
            for (k, v) in [
                ("TETHER_CALLOUT__ISSUER_SEED_FILE", c.issuer_seed_file),
                ("TETHER_CALLOUT__NKEY_FILE", c.nkey_file),
                ("TETHER_CALLOUT__SYSTEM_NKEY_FILE", c.system_nkey_file),
            ] {
                if let Some(v) = v {
                    env.push((k.to_string(), path(v)));
                }
            }
        }
        env
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    tether_permission_node::server_conf::write_secret(path, text)
        .map_err(|e| CliError::new(1, format!("{e:#}")))
}
