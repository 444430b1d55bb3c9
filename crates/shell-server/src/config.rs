//! The shell-server's own settings (top level of `tether.toml`, or `TETHER_<KEY>`), checked
//! once at start so a bad value stops the binary (exit 64) instead of failing a request.
//!
//! The fallbacks after the token's own space are opt-in: `target_container` (also read from
//! plain `TARGET_CONTAINER` when `TETHER_TARGET_CONTAINER` and the file leave it empty) and
//! `allow_local_exec`, which runs commands on the shell-server's own host and is off unless
//! a config turns it on.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ShellConfig {
    /// A managed container (id or name) to run in when the caller's space has no bound
    /// container. The orchestrator still checks that the caller may exec there.
    pub target_container: String,
    /// Run commands as local subprocesses of this server when nothing else resolves.
    /// Development only: they run as this server's user on this host.
    pub allow_local_exec: bool,
    /// Directory local commands start in; empty = this server's working directory.
    pub local_workdir: String,
    /// Shell of local commands.
    pub local_shell: String,

    /// KV bucket of space bindings (written by the orchestrator; read here).
    pub spaces_bucket: String,
    /// KV bucket of remembered shell sessions.
    pub sessions_bucket: String,
    /// A session nobody used for this long is forgotten; 0 = never.
    pub session_ttl_seconds: u64,
    pub kv_replicas: usize,
    /// Remember exported variables between calls (the directory is always remembered).
    pub remember_env: bool,

    pub default_timeout_seconds: f64,
    pub max_timeout_seconds: f64,
    /// Extra time the orchestrator gets to answer beyond the command's own timeout.
    pub orchestrator_grace_seconds: f64,
    pub default_output_bytes: i32,
    /// At most the orchestrator's `exec_max_output_bytes` minus 32 KiB (the shell's trailer).
    pub max_output_bytes: i32,
    /// `shell.exec` requests served at once by this node.
    pub max_concurrent_execs: usize,

    /// Address of the MCP streamable HTTP listener (`127.0.0.1:0` picks a free port); empty
    /// = no HTTP listener.
    pub mcp_listen: String,
    /// Path of the MCP endpoint on that listener.
    pub mcp_path: String,
    /// `Host` header values the MCP listener accepts (DNS-rebinding protection); empty =
    /// loopback names only; `["*"]` = any.
    pub mcp_allowed_hosts: Vec<String>,
}

impl Default for ShellConfig {
    fn default() -> Self {
        Self {
            target_container: String::new(),
            allow_local_exec: false,
            local_workdir: String::new(),
            local_shell: "/bin/sh".into(),
            spaces_bucket: "tether_spaces".into(),
            sessions_bucket: "tether_shell_sessions".into(),
            session_ttl_seconds: 7 * 86_400,
            kv_replicas: 1,
            remember_env: true,
            default_timeout_seconds: 120.0,
            max_timeout_seconds: 3_600.0,
            orchestrator_grace_seconds: 30.0,
            default_output_bytes: 256 * 1024,
            max_output_bytes: 768 * 1024,
            max_concurrent_execs: 256,
            mcp_listen: "127.0.0.1:8790".into(),
            mcp_path: "/mcp".into(),
            mcp_allowed_hosts: Vec::new(),
        }
    }
}

/// A configuration the node cannot run with (the binary exits 64).
#[derive(Debug, thiserror::Error)]
#[error("invalid shell-server configuration: {0}")]
pub struct InvalidConfig(pub String);

impl ShellConfig {
    /// Loads from the layers, then takes plain `TARGET_CONTAINER` when nothing else set it.
    pub fn load(layers: &tether_bus::Layers) -> Result<Self, InvalidConfig> {
        let mut c: ShellConfig = layers.node().map_err(|e| InvalidConfig(e.to_string()))?;
        c.apply_plain_env(std::env::var("TARGET_CONTAINER").ok());
        c.validate()?;
        Ok(c)
    }

    /// `TARGET_CONTAINER` (without the prefix) counts only when the setting is still empty.
    pub fn apply_plain_env(&mut self, target_container: Option<String>) {
        if self.target_container.is_empty()
            && let Some(t) = target_container.filter(|t| !t.trim().is_empty())
        {
            self.target_container = t.trim().to_string();
        }
    }

    /// The MCP listener address, when there is one.
    pub fn mcp_addr(&self) -> Result<Option<SocketAddr>, InvalidConfig> {
        if self.mcp_listen.trim().is_empty() {
            return Ok(None);
        }
        self.mcp_listen.trim().parse().map(Some).map_err(|e| {
            InvalidConfig(format!(
                "mcp_listen {:?} is not an address (ip:port): {e}",
                self.mcp_listen
            ))
        })
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |m: String| Err(InvalidConfig(m));
        if !self.target_container.is_empty() && !is_container_ref(&self.target_container) {
            return bad(format!(
                "target_container {:?} is not a container id or name",
                self.target_container
            ));
        }
        for (k, v) in [
            ("spaces_bucket", &self.spaces_bucket),
            ("sessions_bucket", &self.sessions_bucket),
        ] {
            if !tether_bus::subject::is_valid_token(v) {
                return bad(format!("{k} {v:?} is not a valid bucket name"));
            }
        }
        if !(self.default_timeout_seconds > 0.0
            && self.default_timeout_seconds <= self.max_timeout_seconds
            && self.max_timeout_seconds <= 86_400.0)
        {
            return bad(
                "default_timeout_seconds must be positive and at most max_timeout_seconds (at most 86400)"
                    .into(),
            );
        }
        if !(self.orchestrator_grace_seconds.is_finite() && self.orchestrator_grace_seconds >= 0.0)
        {
            return bad("orchestrator_grace_seconds must be 0 or more".into());
        }
        if self.default_output_bytes <= 0 || self.default_output_bytes > self.max_output_bytes {
            return bad(
                "default_output_bytes must be positive and at most max_output_bytes".into(),
            );
        }
        if self.max_concurrent_execs == 0 {
            return bad("max_concurrent_execs must be at least 1".into());
        }
        if !self.local_shell.starts_with('/') {
            return bad(format!(
                "local_shell {:?} must be an absolute path",
                self.local_shell
            ));
        }
        if !self.local_workdir.is_empty() && !self.local_workdir.starts_with('/') {
            return bad(format!(
                "local_workdir {:?} must be an absolute path",
                self.local_workdir
            ));
        }
        if !self.mcp_path.starts_with('/') || self.mcp_path.len() < 2 {
            return bad(format!(
                "mcp_path {:?} must start with / and name a path",
                self.mcp_path
            ));
        }
        self.mcp_addr()?;
        Ok(())
    }
}

/// A container id or name as the engine accepts it.
pub fn is_container_ref(s: &str) -> bool {
    let s = s.strip_prefix('/').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local_exec_is_off() {
        let c = ShellConfig::default();
        c.validate().expect("valid");
        assert!(!c.allow_local_exec);
        assert!(c.target_container.is_empty());
    }

    #[test]
    fn plain_target_container_only_fills_a_gap() {
        let mut c = ShellConfig::default();
        c.apply_plain_env(Some("box-1".into()));
        assert_eq!(c.target_container, "box-1");
        c.apply_plain_env(Some("other".into()));
        assert_eq!(c.target_container, "box-1", "a configured value wins");
        let mut c = ShellConfig::default();
        c.apply_plain_env(Some("  ".into()));
        assert!(c.target_container.is_empty());
    }

    #[test]
    fn bad_values_are_refused() {
        let cases: [fn(&mut ShellConfig); 10] = [
            |c| c.target_container = "../etc".into(),
            |c| c.default_timeout_seconds = 0.0,
            |c| c.default_timeout_seconds = 7200.0,
            |c| c.default_output_bytes = 0,
            |c| c.default_output_bytes = c.max_output_bytes + 1,
            |c| c.mcp_listen = "nowhere".into(),
            |c| c.mcp_path = "mcp".into(),
            |c| c.local_shell = "sh".into(),
            |c| c.sessions_bucket = "a.b".into(),
            |c| c.max_concurrent_execs = 0,
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut c = ShellConfig::default();
            f(&mut c);
            assert!(c.validate().is_err(), "case {i} accepted");
        }
        let c = ShellConfig {
            mcp_listen: String::new(),
            ..Default::default()
        };
        assert_eq!(c.mcp_addr().expect("ok"), None);
    }
}
