//! The daemon's settings: from its environment (never a secret: the bus token is a file path)
//! and its command line (`tether-spaced [-- <command> <args>...]`).
//!
//! Design decision: no config file and no figment. The daemon is put into containers it does
//! not own, so everything it needs arrives the way a container's init gets it — environment
//! and argv — and a bad setting ends it with exit 64 before anything runs.
//!
//! The space: with `TETHER_NATS_URL`, either `TETHER_SPACE_ID` names it ([`Space::Fixed`]),
//! or — pool mode, for a container created before its space is known — it is empty or unset
//! and `TETHER_DAEMON_BIND_FILE` names an absolute path where the bind file (`bind`) will be
//! written ([`Space::Pending`]); the exec server waits for it before joining the bus. With
//! both set the space wins and the bind file is ignored (a warning says so), so a fixed
//! daemon behaves exactly as before whatever else its environment holds. With neither, the
//! daemon does not start.
//!
//! Bind over the bus: in pool mode, `TETHER_DAEMON_POOL_SPACE` (a space id, checked as
//! `TETHER_SPACE_ID`; a bad one is exit 64) names the pool pseudo-space the waiting exec
//! server listens on for a bind request (`busbind`). With a fixed space it is ignored with a
//! warning (not refused): as with the bind file, a fixed daemon behaves exactly as before.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The bus server(s): a URL or a comma-separated list.
pub const ENV_NATS_URL: &str = "TETHER_NATS_URL";
/// File holding the daemon's bus token (the NATS auth token), re-read at every (re)connect.
pub const ENV_TOKEN_FILE: &str = "TETHER_DAEMON_TOKEN_FILE";
/// The space this daemon serves.
pub const ENV_SPACE: &str = "TETHER_SPACE_ID";
/// Pool mode: the bind file (see `bind`) the exec server waits for when no
/// [`ENV_SPACE`] is set. Absolute; usually in the container's tmpfs secret directory.
pub const ENV_BIND_FILE: &str = "TETHER_DAEMON_BIND_FILE";
/// Pool mode with bind over the bus: the pool pseudo-space (`tether-pool-<hex>`, a space id)
/// whose exec subject the waiting exec server serves for bind requests (`busbind`). Ignored,
/// with a warning, outside pool mode.
pub const ENV_POOL_SPACE: &str = "TETHER_DAEMON_POOL_SPACE";
/// The deployment's subject prefix (the bus nodes' `subject_prefix`), when it has one: the
/// daemon then serves `<prefix>.spaces.<space>.daemon.exec`, where its bus identity allows.
pub const ENV_SUBJECT_PREFIX: &str = "TETHER_DAEMON_SUBJECT_PREFIX";
/// Default command timeout, milliseconds.
pub const ENV_DEFAULT_TIMEOUT_MS: &str = "TETHER_DAEMON_DEFAULT_TIMEOUT_MS";
/// Most commands running at once; beyond, a request is answered 429.
pub const ENV_MAX_RUNNING: &str = "TETHER_DAEMON_MAX_RUNNING";
/// Prefix of the variables that are the daemon's own and never passed to commands.
pub const DAEMON_ENV_PREFIX: &str = "TETHER_DAEMON_";

/// Longest timeout a request may ask for (as `containers.exec`: 24 h).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Output cap when a request names none.
pub const DEFAULT_MAX_OUTPUT: u32 = 1024 * 1024;
/// Largest output cap a request may ask for.
pub const MAX_OUTPUT: u32 = 64 * 1024 * 1024;

/// What the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// `None`: no bus (the daemon is only an init); a warning says so.
    pub bus: Option<BusSettings>,
    /// The image's original command (argv after `--`), run as the main workload.
    pub main: Option<Vec<OsString>>,
    pub limits: Limits,
}

/// Where and as whom the daemon joins the bus.
#[derive(Clone, Debug)]
pub struct BusSettings {
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub space: Space,
    /// Pool mode only: the pool pseudo-space of [`ENV_POOL_SPACE`] (`None` otherwise).
    pub pool_space: Option<String>,
    /// The deployment's subject prefix (`None`: none).
    pub prefix: Option<String>,
}

/// Which space the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Space {
    /// Named by [`ENV_SPACE`]: served from the start.
    Fixed(String),
    /// Pool mode: named by the bind file at this path, once it is there.
    Pending(PathBuf),
}

/// Bounds on what a request may ask.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub default_max_output: u32,
    pub max_output: u32,
    pub max_running: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(60),
            max_timeout: MAX_TIMEOUT,
            default_max_output: DEFAULT_MAX_OUTPUT,
            max_output: MAX_OUTPUT,
            max_running: 256,
        }
    }
}

impl Config {
    /// Reads the settings from `env` (name → value) and the arguments after the program name.
    /// The error names the bad setting.
    pub fn from_parts(
        env: impl Fn(&str) -> Option<String>,
        args: impl IntoIterator<Item = OsString>,
    ) -> Result<Config, String> {
        let mut args = args.into_iter();
        let main = match args.next() {
            None => None,
            Some(a) if a == "--" => {
                let rest: Vec<OsString> = args.collect();
                if rest.is_empty() {
                    return Err("nothing after `--`: give the command to run".into());
                }
                Some(rest)
            }
            Some(a) => {
                return Err(format!(
                    "unexpected argument {a:?}: usage is `tether-spaced [-- <command> [args...]]`"
                ));
            }
        };
        let mut limits = Limits::default();
        if let Some(v) = env(ENV_DEFAULT_TIMEOUT_MS) {
            let ms: u64 = v
                .parse()
                .ok()
                .filter(|ms| *ms > 0 && Duration::from_millis(*ms) <= MAX_TIMEOUT)
                .ok_or_else(|| format!("{ENV_DEFAULT_TIMEOUT_MS}={v:?} is not 1..=86400000"))?;
            limits.default_timeout = Duration::from_millis(ms);
        }
        if let Some(v) = env(ENV_MAX_RUNNING) {
            limits.max_running = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{ENV_MAX_RUNNING}={v:?} is not a positive number"))?;
        }
        let bus = match env(ENV_NATS_URL).filter(|u| !u.trim().is_empty()) {
            None => None,
            Some(url) => {
                let space = space(&env)?;
                let pool_space = pool_space(&env, &space)?;
                let token_file = env(ENV_TOKEN_FILE)
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from);
                let prefix = env(ENV_SUBJECT_PREFIX).filter(|p| !p.is_empty());
                if let Some(p) = &prefix {
                    check_prefix(p)?;
                }
                Some(BusSettings {
                    url,
                    token_file,
                    space,
                    pool_space,
                    prefix,
                })
            }
        };
        Ok(Config { bus, main, limits })
    }
}

/// The space from [`ENV_SPACE`], else pool mode from [`ENV_BIND_FILE`] (module doc).
fn space(env: &impl Fn(&str) -> Option<String>) -> Result<Space, String> {
    let bind_file = env(ENV_BIND_FILE).filter(|p| !p.is_empty());
    match env(ENV_SPACE).filter(|s| !s.is_empty()) {
        Some(space) => {
            check_space_id(&space).map_err(|e| format!("{ENV_SPACE}: {e}"))?;
            if bind_file.is_some() {
                tracing::warn!("{ENV_SPACE} is set: {ENV_BIND_FILE} is ignored");
            }
            Ok(Space::Fixed(space))
        }
        None => match bind_file.map(PathBuf::from) {
            Some(p) if p.is_absolute() && p.file_name().is_some() => Ok(Space::Pending(p)),
            Some(p) => Err(format!(
                "{ENV_BIND_FILE}={} is not an absolute file path",
                p.display()
            )),
            None => Err(format!(
                "neither {ENV_SPACE} nor {ENV_BIND_FILE} is set (with {ENV_NATS_URL} one is needed)"
            )),
        },
    }
}

/// The pool pseudo-space of [`ENV_POOL_SPACE`]: checked as a space id in pool mode, ignored
/// (a warning) with a fixed space, so a fixed daemon behaves as before whatever it is given.
fn pool_space(
    env: &impl Fn(&str) -> Option<String>,
    space: &Space,
) -> Result<Option<String>, String> {
    let Some(pool) = env(ENV_POOL_SPACE).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match space {
        Space::Fixed(_) => {
            tracing::warn!("{ENV_SPACE} is set: {ENV_POOL_SPACE} is ignored");
            Ok(None)
        }
        Space::Pending(_) => {
            check_space_id(&pool).map_err(|e| format!("{ENV_POOL_SPACE}: {e}"))?;
            Ok(Some(pool))
        }
    }
}

/// A space id must be one NATS subject token; the error quotes it.
pub fn check_space_id(space: &str) -> Result<(), String> {
    let ok = !space.is_empty()
        && space.len() <= 128
        && space
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{space:?} is not a space id (letters, digits, `-`, `_`; 1 to 128)"
        ))
    }
}

/// Removes every `TETHER_DAEMON_*` variable from what `cmd` inherits.
pub fn strip_daemon_env(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(DAEMON_ENV_PREFIX) {
            cmd.env_remove(k);
        }
    }
}

/// A subject prefix must be dot-separated tokens of letters, digits, `-`, `_`.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.len() <= 128
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ENV_SUBJECT_PREFIX}={prefix:?} is not a subject prefix (dot-separated tokens of letters, digits, `-`, `_`)"
        ))
    }
}

/// The subject a daemon of `space` serves exec on under the deployment's subject `prefix`.
pub fn exec_subject_under(prefix: Option<&str>, space: &str) -> String {
    match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}.{}", exec_subject(space)),
        None => exec_subject(space),
    }
}

/// The subject a daemon of `space` serves exec on.
pub fn exec_subject(space: &str) -> String {
    format!("spaces.{space}.daemon.exec")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(env: &[(&str, &str)], args: &[&str]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_parts(
            |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            args.iter().map(OsString::from),
        )
    }

    #[test]
    fn the_command_follows_the_double_dash() {
        let c = cfg(&[], &["--", "nginx", "-g", "daemon off;"]).expect("valid");
        assert_eq!(c.main.expect("main").len(), 3);
        assert!(c.bus.is_none());
        assert!(cfg(&[], &["--"]).is_err());
        assert!(cfg(&[], &["nginx"]).expect_err("no dash").contains("usage"));
    }

    #[test]
    fn the_bus_needs_a_valid_space() {
        let url = (ENV_NATS_URL, "nats://127.0.0.1:4222");
        assert!(cfg(&[url], &[]).expect_err("no space").contains(ENV_SPACE));
        assert!(cfg(&[url, (ENV_SPACE, "")], &[]).is_err());
        assert!(cfg(&[url, (ENV_SPACE, "a.b")], &[]).is_err());
        assert!(cfg(&[url, (ENV_SPACE, "*")], &[]).is_err());
        let c = cfg(&[url, (ENV_SPACE, "s-1"), (ENV_TOKEN_FILE, "/t")], &[]).expect("ok");
        let bus = c.bus.expect("bus");
        assert_eq!(bus.space, Space::Fixed("s-1".into()));
        assert_eq!(exec_subject("s-1"), "spaces.s-1.daemon.exec");
        assert_eq!(bus.prefix, None);
        assert_eq!(bus.token_file, Some(PathBuf::from("/t")));
        let c = cfg(
            &[url, (ENV_SPACE, "s-1"), (ENV_SUBJECT_PREFIX, "prod.eu")],
            &[],
        )
        .expect("a prefix");
        let bus = c.bus.expect("bus");
        assert_eq!(
            exec_subject_under(bus.prefix.as_deref(), "s-1"),
            "prod.eu.spaces.s-1.daemon.exec"
        );
        for bad in ["a..b", ".a", "a.", "a b", "*", ">"] {
            assert!(
                cfg(&[url, (ENV_SPACE, "s"), (ENV_SUBJECT_PREFIX, bad)], &[]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_a_space_a_bind_file_is_pool_mode() {
        let url = (ENV_NATS_URL, "nats://127.0.0.1:4222");
        let pool = |env: &[(&str, &str)]| cfg(env, &[]).map(|c| c.bus.expect("bus").space);
        let pending = Space::Pending(PathBuf::from("/run/tether/bind"));
        assert_eq!(
            pool(&[url, (ENV_BIND_FILE, "/run/tether/bind")]),
            Ok(pending.clone())
        );
        assert_eq!(
            pool(&[url, (ENV_SPACE, ""), (ENV_BIND_FILE, "/run/tether/bind")]),
            Ok(pending)
        );
        // Both: the space wins, the bind file is ignored.
        assert_eq!(
            pool(&[url, (ENV_SPACE, "s-1"), (ENV_BIND_FILE, "/run/tether/bind")]),
            Ok(Space::Fixed("s-1".into()))
        );
        // A bad space is refused even with a bind file.
        assert!(pool(&[url, (ENV_SPACE, "a.b"), (ENV_BIND_FILE, "/b")]).is_err());
        for bad in ["bind", "run/bind", "/"] {
            let e = pool(&[url, (ENV_BIND_FILE, bad)]).expect_err(bad);
            assert!(
                e.contains(ENV_BIND_FILE) && e.contains("absolute"),
                "{bad}: {e}"
            );
        }
        let e = pool(&[url, (ENV_BIND_FILE, "")]).expect_err("empty is unset");
        assert!(e.contains(ENV_SPACE) && e.contains(ENV_BIND_FILE), "{e}");
        // Without a bus there is nothing to bind.
        assert!(
            cfg(&[(ENV_BIND_FILE, "/b")], &[])
                .expect("no bus")
                .bus
                .is_none()
        );
    }

    #[test]
    fn a_pool_space_is_checked_in_pool_mode_and_ignored_outside_it() {
        let url = (ENV_NATS_URL, "nats://127.0.0.1:4222");
        let file = (ENV_BIND_FILE, "/run/tether/bind");
        let pool = |env: &[(&str, &str)]| cfg(env, &[]).map(|c| c.bus.expect("bus").pool_space);
        assert_eq!(
            pool(&[url, file, (ENV_POOL_SPACE, "tether-pool-0a1b2c3d4e5f")]),
            Ok(Some("tether-pool-0a1b2c3d4e5f".into()))
        );
        assert_eq!(pool(&[url, file]), Ok(None));
        assert_eq!(pool(&[url, file, (ENV_POOL_SPACE, "")]), Ok(None));
        for bad in ["a.b", "*", ">", "a b"] {
            let e = pool(&[url, file, (ENV_POOL_SPACE, bad)]).expect_err(bad);
            assert!(e.contains(ENV_POOL_SPACE), "{bad}: {e}");
        }
        // A fixed daemon ignores it, even a bad one.
        assert_eq!(
            pool(&[url, (ENV_SPACE, "s-1"), (ENV_POOL_SPACE, "a.b")]),
            Ok(None)
        );
        assert!(
            cfg(&[(ENV_POOL_SPACE, "a.b")], &[])
                .expect("no bus")
                .bus
                .is_none()
        );
    }

    #[test]
    fn bad_limits_are_refused() {
        assert!(cfg(&[(ENV_DEFAULT_TIMEOUT_MS, "0")], &[]).is_err());
        assert!(cfg(&[(ENV_DEFAULT_TIMEOUT_MS, "x")], &[]).is_err());
        assert!(cfg(&[(ENV_MAX_RUNNING, "0")], &[]).is_err());
        let c = cfg(&[(ENV_DEFAULT_TIMEOUT_MS, "1500")], &[]).expect("ok");
        assert_eq!(c.limits.default_timeout, Duration::from_millis(1500));
    }
}
