//! Run-profiles (`[profiles.<name>]` of the orchestrator's config; the types are in
//! [`crate::config`], the checks here): what a worker replica of a
//! profile gets besides the hardened defaults — fixed bind mounts with their mode, extra
//! hosts, its network, environment from a secrets file, default limits — and the host paths a
//! request may add mounts from (`allowed_mounts`).
//!
//! Design decisions:
//! - A request names a profile and can never widen it: its own `mounts` must lie under the
//!   profile's `allowed_mounts` (the allowlist mechanism of `containers.create`, moved under
//!   the profile), and it cannot name a network or extra hosts at all. Which profiles a caller
//!   may use is authorization: `workers.deploy` is operator-only, and an operator may name any
//!   configured profile. Agent-initiated deploys (not built) would need a scope
//!   `profiles:<name>` per profile.
//! - `default` always exists and is today's hardened defaults: no fixed mount, no extra host,
//!   the node's `space_network_mode`. The old top-level `allowed_mounts` is read as
//!   `[profiles.default].allowed_mounts` (both lists count), and `containers.create` (spaces,
//!   tools, relics) checks mounts against the `default` profile's list.
//! - The secrets file (`env_file`, `KEY=VALUE` lines) is read when a replica is made, on the
//!   host that makes it, and reaches the replica only as the file `/run/tether/env` in its
//!   tmpfs secret volume (written by the workers' `credentials` module), never as container environment, in
//!   KV, a reply or a log line. Its path is checked at config load, so a typo stops the node
//!   (exit 64) instead of failing every replica.
//! - A profile's `network` left empty is the node's `space_network_mode` (`bridge` by default),
//!   not `none`: a worker must reach the bus. `none` is allowed for a profile whose replicas
//!   need no network of their own (their bus then has to be reachable otherwise — in practice
//!   never, so it is a deliberate operator choice).

use crate::config::{InvalidConfig, OrchestratorConfig};
use crate::spec::{is_env_name, validate_abs_path, validate_extra_hosts};

/// Where a replica's secret directory is mounted; no profile mount may cover it.
const SECRET_DIR: &str = "/run/tether";

/// Largest secrets file read (it travels in one archive into a 64 KiB tmpfs).
const MAX_ENV_FILE_BYTES: u64 = 32 * 1024;

/// Checks every profile at config load.
pub fn check(cfg: &OrchestratorConfig) -> Result<(), InvalidConfig> {
    for (name, p) in cfg.effective_profiles() {
        let bad = |m: String| Err(InvalidConfig(format!("[profiles.{name}] {m}")));
        if !is_profile_name(&name) {
            return bad("the name must be 1-63 characters of a-z 0-9 - _".into());
        }
        for m in &p.allowed_mounts {
            if !m.path.starts_with('/') || m.path.split('/').any(|s| s == "..") {
                return bad(format!(
                    "allowed_mounts path {:?} must be absolute, without `..`",
                    m.path
                ));
            }
        }
        for m in &p.mounts {
            let source = validate_abs_path("source", &m.source).map_err(|e| e.detail);
            let target = validate_abs_path("target", &m.target).map_err(|e| e.detail);
            let (source, target) = match (source, target) {
                (Ok(s), Ok(t)) => (s, t),
                (Err(e), _) | (_, Err(e)) => return bad(format!("mounts: {e}")),
            };
            if source == "/"
                || ["/", "/proc", "/sys", "/dev", SECRET_DIR]
                    .iter()
                    .any(|d| target == *d || (*d != "/" && target.starts_with(&format!("{d}/"))))
                || SECRET_DIR.starts_with(&format!("{target}/"))
            {
                return bad(format!(
                    "mounts: {source:?} → {target:?}: the source may not be / and the target may not be or hold /, /proc, /sys, /dev or {SECRET_DIR}"
                ));
            }
        }
        let mut targets: Vec<&str> = p.mounts.iter().map(|m| m.target.as_str()).collect();
        targets.sort_unstable();
        if targets.windows(2).any(|w| w[0] == w[1]) {
            return bad("mounts: two mounts on one target".into());
        }
        validate_extra_hosts(&p.extra_hosts)
            .map_err(|e| InvalidConfig(format!("[profiles.{name}] extra_hosts: {}", e.detail)))?;
        let n = p.network.as_str();
        if n == "host" || n.contains(':') || n.starts_with(crate::labels::SESSION_NETWORK_PREFIX) {
            return bad(format!(
                "network {n:?}: host, container:… and session networks cannot be used"
            ));
        }
        let l = p.resource_limits;
        let memory_ok = l.memory_mb == 0
            || (l.memory_mb >= crate::spec::MIN_MEMORY_MB && l.memory_mb <= cfg.max_memory_mb);
        let cpu_ok =
            l.cpu_limit == 0.0 || (l.cpu_limit >= 0.01 && l.cpu_limit <= cfg.max_cpu_limit);
        let pids_ok = l.pids_limit == 0
            || (l.pids_limit >= crate::spec::MIN_PIDS && l.pids_limit <= cfg.max_pids_limit);
        if !(memory_ok && cpu_ok && pids_ok) {
            return bad("resource_limits must be within the node's minimums and maximums".into());
        }
        if !p.env_file.is_empty() {
            if !p.env_file.starts_with('/') {
                return bad(format!("env_file {:?} must be absolute", p.env_file));
            }
            // Parsed now so a bad file stops the node; its values are dropped at once.
            read_env_file(&p.env_file)
                .map_err(|e| InvalidConfig(format!("[profiles.{name}] env_file: {e}")))?;
        }
    }
    Ok(())
}

fn is_profile_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Why a secrets file cannot be used. Never holds a value from the file.
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("cannot read {path:?}: {kind}")]
    Read {
        path: String,
        kind: std::io::ErrorKind,
    },
    #[error("{path:?} is larger than {MAX_ENV_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path:?} line {line}: {why}")]
    Line {
        path: String,
        line: usize,
        why: &'static str,
    },
}

/// The secrets file as the bytes written into a replica: `KEY=VALUE` lines, checked (blank
/// lines and `#` comments dropped). Values are never formatted into errors.
pub fn read_env_file(path: &str) -> Result<Vec<u8>, EnvFileError> {
    let read_err = |e: std::io::Error| EnvFileError::Read {
        path: path.to_string(),
        kind: e.kind(),
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_ENV_FILE_BYTES {
        return Err(EnvFileError::TooLarge { path: path.into() });
    }
    let raw = std::fs::read(path).map_err(read_err)?;
    parse_env(&raw).map_err(|(line, why)| EnvFileError::Line {
        path: path.to_string(),
        line,
        why,
    })
}

/// Checks `KEY=VALUE` lines; what is kept, one per line. The error names the line (1-based)
/// and the rule, never the content.
pub fn parse_env(raw: &[u8]) -> Result<Vec<u8>, (usize, &'static str)> {
    let text = std::str::from_utf8(raw).map_err(|_| (0, "not UTF-8"))?;
    let mut out = Vec::with_capacity(raw.len());
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (k, _) = t.split_once('=').ok_or((i + 1, "not KEY=VALUE"))?;
        if !is_env_name(k) {
            return Err((i + 1, "the name must match [A-Za-z_][A-Za-z0-9_]*"));
        }
        if k.starts_with(crate::spec::RESERVED_ENV_PREFIX) {
            return Err((i + 1, "TETHER_* names are the orchestrator's"));
        }
        if t.contains('\0') {
            return Err((i + 1, "NUL in the line"));
        }
        out.extend_from_slice(t.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{
        AllowedMount, DEFAULT_PROFILE, MountMode, Profile, ProfileLimits, ProfileMount,
    };

    fn cfg_with(name: &str, p: Profile) -> OrchestratorConfig {
        OrchestratorConfig {
            profiles: BTreeMap::from([(name.to_string(), p)]),
            ..Default::default()
        }
    }

    #[test]
    fn default_always_exists_and_takes_the_old_allowlist() {
        let cfg = OrchestratorConfig {
            allowed_mounts: vec![AllowedMount {
                path: "/data".into(),
                writable: false,
            }],
            ..Default::default()
        };
        let all = cfg.effective_profiles();
        assert_eq!(all[DEFAULT_PROFILE].allowed_mounts.len(), 1);
        check(&cfg).expect("valid");
    }

    #[test]
    fn bad_profiles_are_refused_at_load() {
        let m = |s: &str, t: &str| ProfileMount {
            source: s.into(),
            target: t.into(),
            mode: MountMode::Ro,
        };
        let cases = [
            cfg_with("Bad.Name", Profile::default()),
            cfg_with(
                "p",
                Profile {
                    mounts: vec![m("relative", "/x")],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    mounts: vec![m("/x", "/run/tether")],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    mounts: vec![m("/x", "/run")],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    mounts: vec![m("/x", "/proc/x")],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    mounts: vec![m("/x", "/a"), m("/y", "/a")],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    extra_hosts: vec!["nohost".into()],
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    network: "host".into(),
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    env_file: "/no/such/tether/env".into(),
                    ..Default::default()
                },
            ),
            cfg_with(
                "p",
                Profile {
                    resource_limits: ProfileLimits {
                        memory_mb: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
        ];
        for c in cases {
            assert!(check(&c).is_err(), "{:?}", c.profiles);
        }
    }

    #[test]
    fn env_lines_are_checked_without_showing_values() {
        let ok = parse_env(b"# c\n\nA=1\nB_2=x=y\n").expect("valid");
        assert_eq!(ok, b"A=1\nB_2=x=y\n");
        assert_eq!(parse_env(b"A=1\nsecret-value\n"), Err((2, "not KEY=VALUE")));
        assert!(parse_env(b"TETHER_TOKEN=x\n").is_err());
        assert!(parse_env(b"1A=x\n").is_err());
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("env");
        std::fs::write(&p, "K=hunter2\nnot a line\n").expect("write");
        let e = read_env_file(&p.to_string_lossy()).expect_err("bad line");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
