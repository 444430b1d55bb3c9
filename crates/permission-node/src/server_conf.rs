//! The keys of an authorized bus and the nats-server configuration that enforces them.
//!
//! One [`BusKeys`] bundle holds every credential a fleet's bus needs:
//! - the **issuer** account nkey the permission node signs auth-callout answers with (the
//!   server only knows its public half);
//! - the **callout** user (account `AUTH`) the permission node listens for auth requests as;
//! - the **system** user (account `SYS`) it closes revoked agents' connections with;
//! - one **node** user per node kind (account `TETHER`), with that kind's static permissions
//!   from [`crate::access`];
//! - the **admin** password: the operator's break-glass user with every permission, for when
//!   the permission node itself is down (and for test harnesses).
//!
//! Everyone else (agents, workers, operators with a token) connects with a tether token as the
//! connection's `auth_token`, and the server asks the permission node (auth callout) who it is.
//! Anonymous connections are refused: no user without credentials exists.
//!
//! The bundle is a directory of files, each mode 0600: `issuer.nk`, `callout.nk`, `system.nk`,
//! `<node name>.nk`, `admin.password`. The rendered configuration holds only public keys and
//! the admin password.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nkeys::KeyPair;

use crate::access::{NodeKind, Permissions};

/// The account every agent, worker, operator and node lives in (with JetStream).
pub const ACCOUNT: &str = "TETHER";
/// The account the auth callout service listens in.
pub const AUTH_ACCOUNT: &str = "AUTH";
/// The server's system account (connection events, `KICK`).
pub const SYSTEM_ACCOUNT: &str = "SYS";
/// The break-glass user's name.
pub const ADMIN_USER: &str = "admin";

/// Every credential of an authorized bus (see the module doc).
pub struct BusKeys {
    pub issuer: KeyPair,
    pub callout: KeyPair,
    pub system: KeyPair,
    pub nodes: Vec<(NodeKind, KeyPair)>,
    pub admin_password: String,
}

impl BusKeys {
    /// Fresh keys and a random admin password.
    pub fn generate() -> Self {
        BusKeys {
            issuer: KeyPair::new_account(),
            callout: KeyPair::new_user(),
            system: KeyPair::new_user(),
            nodes: NodeKind::ALL
                .iter()
                .map(|k| (*k, KeyPair::new_user()))
                .collect(),
            admin_password: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The file of the node kind's seed in a bundle directory.
    pub fn node_seed_file(dir: &Path, kind: NodeKind) -> PathBuf {
        dir.join(format!("{}.nk", kind.name()))
    }

    /// The issuer seed file of a bundle directory.
    pub fn issuer_seed_file(dir: &Path) -> PathBuf {
        dir.join("issuer.nk")
    }

    /// The callout user's seed file of a bundle directory.
    pub fn callout_seed_file(dir: &Path) -> PathBuf {
        dir.join("callout.nk")
    }

    /// The system user's seed file of a bundle directory.
    pub fn system_seed_file(dir: &Path) -> PathBuf {
        dir.join("system.nk")
    }

    /// The admin password file of a bundle directory.
    pub fn admin_password_file(dir: &Path) -> PathBuf {
        dir.join("admin.password")
    }

    /// Writes the bundle into `dir` (made 0700; files 0600, replaced).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
        write_secret(&Self::issuer_seed_file(dir), &seed(&self.issuer)?)?;
        write_secret(&Self::callout_seed_file(dir), &seed(&self.callout)?)?;
        write_secret(&Self::system_seed_file(dir), &seed(&self.system)?)?;
        for (kind, kp) in &self.nodes {
            write_secret(&Self::node_seed_file(dir, *kind), &seed(kp)?)?;
        }
        write_secret(&Self::admin_password_file(dir), &self.admin_password)
    }

    /// Reads a bundle written by [`BusKeys::write`].
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let nodes = NodeKind::ALL
            .iter()
            .map(|k| Ok((*k, read_seed(&Self::node_seed_file(dir, *k))?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(BusKeys {
            issuer: read_seed(&Self::issuer_seed_file(dir))?,
            callout: read_seed(&Self::callout_seed_file(dir))?,
            system: read_seed(&Self::system_seed_file(dir))?,
            nodes,
            admin_password: read_secret(&Self::admin_password_file(dir))?,
        })
    }

    /// The bundle in `dir`, made there first when there is none.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        if Self::issuer_seed_file(dir).exists() {
            return Self::load(dir);
        }
        let keys = Self::generate();
        keys.write(dir)?;
        Ok(keys)
    }

    /// The `accounts`, `system_account` and `authorization { auth_callout }` blocks of the
    /// server configuration, for a fleet whose subjects carry `prefix` (if any).
    pub fn authorization_conf(&self, prefix: Option<&str>) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut users = vec![format!(
            "      {{user: {}, password: {}}}",
            q(ADMIN_USER),
            q(&self.admin_password)
        )];
        let mut bypass = vec![q(ADMIN_USER)];
        for (kind, kp) in &self.nodes {
            users.push(format!(
                "      {{nkey: {}, permissions: {}}}  # {}",
                q(&kp.public_key()),
                perms_conf(&kind.permissions(prefix)),
                kind.name()
            ));
            bypass.push(q(&kp.public_key()));
        }
        bypass.push(q(&self.callout.public_key()));
        bypass.push(q(&self.system.public_key()));
        format!(
            "accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{users}\n    ]\n  }}\n  \
             {AUTH_ACCOUNT} {{\n    users: [ {{nkey: {callout}}} ]\n  }}\n  \
             {SYSTEM_ACCOUNT} {{\n    users: [ {{nkey: {system}}} ]\n  }}\n}}\n\
             system_account: {SYSTEM_ACCOUNT}\n\
             authorization {{\n  auth_callout {{\n    issuer: {issuer}\n    account: {AUTH_ACCOUNT}\n    \
             auth_users: [ {bypass} ]\n  }}\n}}\n",
            users = users.join("\n"),
            callout = q(&self.callout.public_key()),
            system = q(&self.system.public_key()),
            issuer = q(&self.issuer.public_key()),
            bypass = bypass.join(", "),
        )
    }
}

/// Permissions in the server configuration's syntax (which reads JSON objects).
fn perms_conf(p: &Permissions) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "{}".into())
}

fn seed(kp: &KeyPair) -> anyhow::Result<String> {
    kp.seed()
        .map_err(|e| anyhow::anyhow!("nkey without a seed: {e}"))
}

/// The key pair of an nkey seed file ([`tether_bus::connect::read_seed`] reads it).
pub fn read_seed(path: &Path) -> anyhow::Result<KeyPair> {
    let seed = tether_bus::connect::read_seed(path)?;
    KeyPair::from_seed(&seed)
        .map_err(|e| anyhow::anyhow!("{}: not an nkey seed: {e}", path.display()))
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}

/// Writes `text` (and a newline) to `path`, replacing it, readable by its owner alone (0600).
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_through_its_directory() {
        let dir = tempfile::tempdir().expect("test value");
        let keys = BusKeys::generate();
        keys.write(dir.path()).expect("test value");
        let again = BusKeys::load(dir.path()).expect("test value");
        assert_eq!(again.issuer.public_key(), keys.issuer.public_key());
        assert_eq!(again.admin_password, keys.admin_password);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(BusKeys::issuer_seed_file(dir.path()))
            .expect("test value")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let conf = keys.authorization_conf(None);
        assert!(conf.contains(&keys.issuer.public_key()));
        assert!(!conf.contains(&seed(&keys.issuer).expect("test value")));
    }
}
