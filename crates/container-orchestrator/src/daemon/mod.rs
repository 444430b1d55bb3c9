//! The space daemon (`tether-spaced`, crate `tether-space-daemon`) in space containers: put
//! in, started as the init, given its bus identity, and used for `containers.exec`.
//!
//! - [`volume`]: the binary reaches containers through an engine named volume
//!   `tether-spaced-<first 12 hex of its sha256>`, filled once per engine through the archive
//!   API of a created, never started helper container of the space's own image (so it works
//!   when the orchestrator itself runs in a container with only the engine's socket: no host
//!   path is mounted anywhere), and mounted read-only at [`DIR`] into every space container.
//!   The volume is content-addressed and shared by every orchestrator of the engine, so it
//!   carries `tether.managed` and `tether.kind=space-daemon` but no host label; a new binary
//!   is a new volume (an old one is left for the operator to remove).
//! - [`setup`]: at `containers.create` of a space container, its entrypoint becomes
//!   `[DIR/tether-spaced, "--", <image entrypoint…>, <command or image Cmd…>]`, the engine's
//!   init is off (the daemon is the init and reaps every child), the environment gets
//!   `TETHER_SPACE_ID` and `TETHER_DAEMON_TOKEN_FILE` (a path, never a token), the secret
//!   tmpfs volume is mounted at `/run/tether`, and the label `tether.daemon=<volume>` says the
//!   container has it. The container still runs as the image's user. Anything that fails
//!   here (the volume, the image's inspect) creates the container as before, without daemon.
//! - [`token`]: the daemon's token (`tokens.daemon`, only the orchestrator's identity may ask;
//!   it allows subscribing to `spaces.<space>.daemon.exec` and answering what it received,
//!   nothing else) is written as `/run/tether/daemon-token` (0400, owned by the container's
//!   user, which the daemon runs as: a name is resolved by the engine in the container's own
//!   `/etc/passwd`, the archive API's `copyUIDGID` — chosen over "numeric ids only, else
//!   root", which left the daemon of every image with a named user off the bus) and renewed at half its life, through
//!   `crate::credentials`; the containers are found from their labels every 30 s, so after a
//!   restart of the orchestrator every running one gets a fresh token.
//! - [`exec`]: `containers.exec` of a local container with the label goes to its daemon
//!   when its token was delivered, the request names no `user` (the container has no
//!   CAP_SETUID: the daemon can run commands only as its own user, so a request naming one
//!   keeps the engine's exec, which can) and its timeout is at most [`MAX_TIMEOUT`]. The
//!   result is the engine path's, field for field. No daemon answering (no responders, no
//!   message at all within `client::FIRST_REPLY` — a request that reached a daemon killed as
//!   it arrived — or a refusal before `started`) falls back to the engine; a stream that breaks after `started`
//!   is a 502 (the command ran: it is never run twice). The daemon enforces the deadline
//!   itself (its process group and every descendant), also when this node dies mid-exec, so
//!   such commands carry no `TETHER_EXEC_*` and the janitor's reaper has nothing to do for
//!   them.
//!
//! Off when `space_daemon` is false, when the binary is missing (said once at start), or when
//! containers have no bus URL (`container_nats_url` resolves empty). Counters (daemon path,
//! engine path, engine fallbacks) are the `data` of the `containers-exec` endpoint in
//! `$SRV.STATS`.

pub mod exec;
pub mod setup;
pub mod token;
pub mod volume;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::credentials::Credentials;
use crate::docker::Engine;
use crate::spec::Policy;

/// Where the daemon's volume is mounted in a space container.
pub const DIR: &str = "/.tether-spaced";
/// The binary's name in the volume.
pub const BINARY: &str = "tether-spaced";
/// The secret directory (a tmpfs volume) of a space container with the daemon.
pub const SECRET_DIR: &str = "/run/tether";
/// `TETHER_DAEMON_TOKEN_FILE` of every space container with the daemon.
pub const TOKEN_PATH: &str = "/run/tether/daemon-token";
/// The bind file's name in [`SECRET_DIR`]: a pool container's space and environment, which its
/// daemon waits for (`TETHER_DAEMON_BIND_FILE`; the `pool` module).
pub const BIND_NAME: &str = "bind";
/// Execs with a longer timeout keep the engine's path.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The `$SRV.STATS` endpoint whose `data` are the counters.
pub const STATS_ENDPOINT: &str = "containers-exec";

/// The binary as found at start.
#[derive(Clone, Debug)]
pub struct Binary {
    pub path: PathBuf,
    /// `tether-spaced-<first 12 hex of sha256>`.
    pub volume: String,
    pub sha256: String,
}

/// The daemon's settings and state on this node.
pub struct Daemon {
    /// `None`: new space containers get no daemon.
    pub binary: Option<Binary>,
    /// Route execs to containers that have a daemon (`space_daemon`).
    pub route: bool,
    pub ttl_seconds: u32,
    /// The deployment's subject prefix: daemons serve `<prefix>.spaces.<space>.daemon.exec`.
    pub subject_prefix: Option<String>,
    pub engine: Engine,
    /// The daemons' tokens, by container id.
    pub tokens: Credentials<token::DaemonGrant>,
    /// The volume is known to hold the binary (filled or checked by this process).
    pub(crate) filled: tokio::sync::Mutex<bool>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    daemon: AtomicU64,
    engine: AtomicU64,
    fallback: AtomicU64,
}

/// Which path an exec took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Daemon,
    Engine,
    /// The engine, because a daemon that should have answered did not.
    Fallback,
}

impl Daemon {
    /// The daemon as configured: the binary read and hashed (a missing or unreadable one is
    /// warned about once, and new containers get no daemon).
    pub fn load(policy: &Policy, engine: Engine) -> Daemon {
        let (cfg, container_nats_url) = (&policy.cfg, &policy.container_nats_url);
        let binary = if !cfg.space_daemon {
            None
        } else if container_nats_url.trim().is_empty() {
            tracing::warn!(
                "space_daemon is on but containers have no bus URL: space containers get no daemon"
            );
            None
        } else {
            let path = binary_path(&cfg.space_daemon_binary);
            match std::fs::read(&path) {
                Ok(bytes) if !is_static_elf(&bytes) => {
                    tracing::warn!(path = %path.display(), "space_daemon is on but its binary is not a static executable (build it with `just spaced`): space containers get no daemon");
                    None
                }
                Ok(bytes) => {
                    let sha256 = sha256_hex(&bytes);
                    let volume = volume_name(&sha256);
                    tracing::info!(path = %path.display(), %volume, "space daemon on");
                    Some(Binary {
                        path,
                        volume,
                        sha256,
                    })
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "space_daemon is on but its binary cannot be read: space containers get no daemon (set space_daemon_binary)");
                    None
                }
            }
        };
        Daemon {
            binary,
            route: cfg.space_daemon,
            ttl_seconds: cfg.space_daemon_token_ttl_seconds,
            subject_prefix: policy.subject_prefix.clone(),
            engine,
            tokens: Credentials::default(),
            filled: tokio::sync::Mutex::new(false),
            counters: Counters::default(),
        }
    }

    /// The subject the daemon of `space` serves exec on.
    pub fn exec_subject(&self, space: &str) -> String {
        tether_space_daemon::config::exec_subject_under(self.subject_prefix.as_deref(), space)
    }

    pub fn count(&self, path: Route) {
        let c = &self.counters;
        match path {
            Route::Daemon => c.daemon.fetch_add(1, Ordering::Relaxed),
            Route::Engine => c.engine.fetch_add(1, Ordering::Relaxed),
            Route::Fallback => {
                c.engine.fetch_add(1, Ordering::Relaxed);
                c.fallback.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// The counters as `$SRV.STATS` data: execs through the daemon, through the engine
    /// (fallbacks included), and the engine fallbacks (a daemon that did not answer).
    pub fn stats(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "exec_daemon": c.daemon.load(Ordering::Relaxed),
            "exec_engine": c.engine.load(Ordering::Relaxed),
            "exec_engine_fallback": c.fallback.load(Ordering::Relaxed),
        })
    }
}

/// The configured path, or `tether-spaced` next to the running executable.
fn binary_path(configured: &str) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(BINARY)
}

/// A 64-bit ELF executable without an interpreter (`PT_INTERP`): it runs in an image with no
/// libc. The dynamic `tether-spaced` that `cargo build` puts next to the orchestrator would
/// not, and would keep every space container from starting.
fn is_static_elf(b: &[u8]) -> bool {
    let u16_at = |at: usize| b.get(at..at + 2).map(|x| u16::from_le_bytes([x[0], x[1]]));
    let u32_at = |at: usize| {
        b.get(at..at + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let u64_at = |at: usize| {
        b.get(at..at + 8)
            .and_then(|x| <[u8; 8]>::try_from(x).ok())
            .map(u64::from_le_bytes)
    };
    // Magic, 64-bit, little-endian.
    if b.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(size), Some(n)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..usize::from(n)).all(|i| {
        let at = phoff.saturating_add(i.saturating_mul(usize::from(size)));
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn volume_name(sha256: &str) -> String {
    format!("tether-spaced-{}", &sha256[..12.min(sha256.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_is_named_by_the_binary_hash() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(volume_name(&h), "tether-spaced-ba7816bf8f01");
        assert_eq!(binary_path("/x/y"), PathBuf::from("/x/y"));
        assert!(binary_path("").ends_with(BINARY));
    }

    #[test]
    fn only_a_static_executable_is_used() {
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&[]));
        // The test executable itself is dynamic.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(!is_static_elf(&me));
        // A minimal static ELF header: no program header at all.
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        assert!(is_static_elf(&h));
        // One PT_INTERP program header.
        h[0x20] = 64;
        h[0x36] = 56;
        h[0x38] = 1;
        h.extend_from_slice(&[3, 0, 0, 0]);
        h.resize(64 + 56, 0);
        assert!(!is_static_elf(&h));
    }
}
