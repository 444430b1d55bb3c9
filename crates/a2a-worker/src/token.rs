//! The worker's token: a fixed string, or a file that someone (the orchestrator) renews.
//!
//! Design decision: the file is read again only when its modification time (or size) changed,
//! so every work.* request can ask for the current token for the price of one `stat`; the
//! bus connection reads the same file on each reconnect (`tether_bus::connect`), so one
//! renewed file renews both. The token is never formatted (`Debug` hides it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tether_bus::BusConfig;
use tether_bus::config::Secret;

/// Where the Bearer token of every work.* request comes from.
#[derive(Clone)]
pub struct TokenSource(Inner);

#[derive(Clone)]
enum Inner {
    Fixed(Secret),
    File {
        path: PathBuf,
        cache: Arc<Mutex<Option<Cached>>>,
    },
}

struct Cached {
    stamp: (Option<SystemTime>, u64),
    token: String,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::Fixed(_) => f.write_str("TokenSource::Fixed(***)"),
            Inner::File { path, .. } => write!(f, "TokenSource::File({})", path.display()),
        }
    }
}

impl TokenSource {
    pub fn fixed(token: impl Into<String>) -> Self {
        Self(Inner::Fixed(Secret::new(token.into().trim().to_string())))
    }

    /// A token file, re-read whenever it changes.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self(Inner::File {
            path: path.into(),
            cache: Arc::default(),
        })
    }

    /// The current token. A file that cannot be read now falls back to the last token read
    /// from it (a renewal may be replacing it this very moment); with none, the error.
    pub fn current(&self) -> Result<String, String> {
        match &self.0 {
            Inner::Fixed(t) if t.expose().is_empty() => Err("the token is empty".into()),
            Inner::Fixed(t) => Ok(t.expose().to_string()),
            Inner::File { path, cache } => {
                let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                let stamp = stamp(path);
                if let (Some(c), Some(s)) = (cache.as_ref(), stamp)
                    && c.stamp == s
                {
                    return Ok(c.token.clone());
                }
                match tether_bus::connect::read_token(path) {
                    Ok(token) => {
                        if let Some(s) = stamp {
                            *cache = Some(Cached {
                                stamp: s,
                                token: token.clone(),
                            });
                        }
                        Ok(token)
                    }
                    Err(e) => match cache.as_ref() {
                        Some(c) => {
                            tracing::warn!(error = %e, "cannot read the token file; using the last token read");
                            Ok(c.token.clone())
                        }
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// `bus` with this token as the connection's credentials (the file's path, so each
    /// reconnect reads it again) and the agent's inbox prefix `_INBOX.<agent>`.
    pub fn bus_config(&self, mut bus: BusConfig, agent: &str) -> BusConfig {
        match &self.0 {
            Inner::Fixed(t) => {
                bus.nats_token = Some(t.clone());
                bus.nats_token_file = None;
            }
            Inner::File { path, .. } => {
                bus.nats_token_file = Some(path.clone());
                bus.nats_token = None;
            }
        }
        bus.nats_inbox_prefix = Some(tether_auth::inbox::agent_inbox_prefix(agent));
        bus
    }
}

fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").expect("write");
        let t = TokenSource::file(&path);
        assert_eq!(t.current().as_deref(), Ok("one"));
        // A different length changes the stamp even within the file system's mtime granularity.
        std::fs::write(&path, "second\n").expect("write");
        assert_eq!(t.current().as_deref(), Ok("second"));
        // Same content, newer mtime: read again, same answer.
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .expect("touch");
        assert_eq!(t.current().as_deref(), Ok("second"));
        // Gone: the last token read stands in.
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(t.current().as_deref(), Ok("second"));
    }

    #[test]
    fn a_renewal_by_symlink_swap_is_followed() {
        // How the orchestrator renews a replica's token (container-orchestrator
        // `docker::files`): two files and a link to the current one, gone for an instant.
        let dir = tempfile::tempdir().expect("temp dir");
        let link = dir.path().join("token");
        std::fs::write(dir.path().join("token.a"), "first-token").expect("write");
        std::os::unix::fs::symlink("token.a", &link).expect("link");
        let t = TokenSource::file(&link);
        assert_eq!(t.current().as_deref(), Ok("first-token"));
        std::fs::write(dir.path().join("token.b"), "second-token").expect("write");
        std::fs::remove_file(&link).expect("unlink");
        assert_eq!(
            t.current().as_deref(),
            Ok("first-token"),
            "the last token read"
        );
        std::os::unix::fs::symlink("token.b", &link).expect("link");
        assert_eq!(t.current().as_deref(), Ok("second-token"));
    }

    #[test]
    fn missing_or_empty_is_an_error_that_does_not_quote() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        assert!(TokenSource::file(&path).current().is_err());
        std::fs::write(&path, "  \n").expect("write");
        let e = TokenSource::file(&path).current().expect_err("empty");
        assert!(e.contains("empty"), "{e}");
        assert!(TokenSource::fixed(" ").current().is_err());
        assert_eq!(TokenSource::fixed("abc").current().as_deref(), Ok("abc"));
    }

    #[test]
    fn debug_hides_the_token_and_bus_config_sets_inbox() {
        let t = TokenSource::fixed("secret-jwt");
        assert!(!format!("{t:?}").contains("secret-jwt"));
        let bus = t.bus_config(BusConfig::default(), "echo");
        assert_eq!(bus.nats_inbox_prefix.as_deref(), Some("_INBOX.echo"));
        assert_eq!(
            bus.nats_token.as_ref().map(Secret::expose),
            Some("secret-jwt")
        );
        let f = TokenSource::file("/tmp/x").bus_config(BusConfig::default(), "echo");
        assert_eq!(f.nats_token_file.as_deref(), Some(Path::new("/tmp/x")));
    }
}
