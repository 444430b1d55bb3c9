//! A worker replica's secret environment: the file `TETHER_ENV_FILE` (`KEY=VALUE` lines) that
//! the orchestrator writes into the replica's tmpfs secret volume from its profile's
//! `env_file` — never into the container's environment, where `docker inspect` would show it.
//!
//! Design decision: the values are not put into this process's own environment. Changing it
//! is `unsafe` in Rust 2024 once threads run (and the workspace forbids `unsafe`), so a
//! [`SecretEnv`] is loaded once at start ([`crate::env::WorkerSettings::secret_env`]) and an
//! executor gives it to the processes it spawns ([`SecretEnv::apply`], for std's and tokio's
//! `Command`) — the same outcome as inheriting it. The Python adapter, which can, loads it
//! into `os.environ`. The file may appear a moment after the process starts (the orchestrator
//! writes it once the container runs): it is waited for, up to a deadline. Values are never
//! formatted: `Debug` shows the names only, and errors name a line by its number.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long a worker waits at start for its secrets file.
pub const WAIT: Duration = Duration::from_secs(30);

/// The variables of a secrets file, in file order.
#[derive(Clone, Default)]
pub struct SecretEnv(Vec<(String, String)>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl SecretEnv {
    /// Reads `path`, waiting up to `wait` for it to appear.
    pub fn load(path: &Path, wait: Duration) -> anyhow::Result<SecretEnv> {
        let deadline = Instant::now() + wait;
        let text = loop {
            match std::fs::read_to_string(path) {
                Ok(t) => break t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                    // The orchestrator writes it just after the start; a blocking wait at
                    // startup, before the runtime does any work.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => anyhow::bail!("TETHER_ENV_FILE {}: {}", path.display(), e.kind()),
            }
        };
        Self::parse(&text)
            .map_err(|line| anyhow::anyhow!("TETHER_ENV_FILE line {line} is not KEY=VALUE"))
    }

    /// `KEY=VALUE` lines (blank lines and `#` comments skipped); the bad line's number.
    pub fn parse(text: &str) -> Result<SecretEnv, usize> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let (k, v) = t.split_once('=').ok_or(i + 1)?;
            let name_ok = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok {
                return Err(i + 1);
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(SecretEnv(out))
    }

    /// The names, for a log line.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The variables, to give a process.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Gives the variables to a process about to be spawned.
    pub fn apply<'c>(&self, cmd: &'c mut std::process::Command) -> &'c mut std::process::Command {
        cmd.envs(self.vars())
    }

    /// [`SecretEnv::apply`] for tokio's `Command`.
    pub fn apply_tokio<'c>(
        &self,
        cmd: &'c mut tokio::process::Command,
    ) -> &'c mut tokio::process::Command {
        cmd.envs(self.vars())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_and_values_never_shown() {
        let e = SecretEnv::parse("# c\n\nAPI_KEY=s3cr=et\n").expect("valid");
        assert_eq!(e.vars().collect::<Vec<_>>(), [("API_KEY", "s3cr=et")]);
        assert!(!format!("{e:?}").contains("s3cr"));
        assert_eq!(SecretEnv::parse("A=1\nhunter2\n").err(), Some(2));
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("env");
        assert!(SecretEnv::load(&p, Duration::ZERO).is_err(), "missing");
        std::fs::write(&p, "K=v\n").expect("write");
        let e = SecretEnv::load(&p, Duration::ZERO).expect("loaded");
        let out = e
            .apply(std::process::Command::new("sh").args(["-c", "printf %s \"$K\""]))
            .output()
            .expect("sh");
        assert_eq!(out.stdout, b"v");
    }
}
