//! Test fixtures against real parts: a real `nats-server` per test and the real Docker engine.
//!
//! Layout:
//! - [`NatsServer`] (module `nats`): `nats-server -js` (from `TETHER_NATS_SERVER`, else the
//!   current line scripts/install-deps.sh keeps in `~/.cache/tether/nats-current`, else `PATH`;
//!   2.10 or later) on a free loopback port with a temporary store; kill/stop and restart on
//!   the same port and store for fault tests; `start_with_token` for plain token auth instead of
//!   the callout (a client tested on its token file alone); `start_under` for a deployment
//!   whose subjects carry a prefix (node permissions and `node_bus` under it, so a whole
//!   [`Fleet`] on it serves `<prefix>.<subject>`); killed when dropped, and — through a small `sh` watchdog — also when
//!   the test process itself is killed (a test runner's timeout), so no server is orphaned.
//! - [`cargo_bin`]: a binary of this workspace, next to the running test executable.
//! - [`docker`]: is the engine there, the one test image (`FROM scratch` + Debian's static
//!   busybox, built locally once per machine since no registry is reachable), label cleanup.
//! - [`Fleet`] (module `fleet`): the server, the permission node in-process, an operator,
//!   `agent(id, space, scopes)`, `call` answering the reply or the [`Problem`], [`eventually`],
//!   and the engine cleanup of what the test created. Every crate's tests build on it.
//! - [`cluster`]: three members routed into one JetStream cluster ([`NatsCluster`]) and a
//!   permission node on it ([`ClusterFleet`]), for the scale-out tests and benchmarks.
//! - [`orchestrator`] (feature `orchestrator`): that fleet with an orchestrator on the engine,
//!   for the orchestrator's and the shell-server's tests.
//!
//! Key decision: fixtures wait by polling with a deadline, never by fixed sleeps, and every
//! error says what to install or build.

pub mod cluster;
pub mod docker;
pub mod fleet;
mod nats;
#[cfg(feature = "orchestrator")]
pub mod orchestrator;

use std::path::PathBuf;

use anyhow::Context;

pub use cluster::{ClusterFleet, NatsCluster};
pub use fleet::{
    Body, CALL_TIMEOUT, Fleet, NodeKind, POLL_TIMEOUT, Problem, bus, call, connect_with_events,
    eventually, exec_ok, num, operator_token, permission_node, poll, prefixed, register_agent,
    request, sign_token, unique, unverified_claims,
};
pub use nats::{NatsServer, binary as nats_server_binary, connect, free_port};

/// The running test's `target/<profile>` dir (`target/<profile>/deps/<test>` → `target/<profile>`).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the running test executable")?;
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .with_context(|| format!("{} has no parent dir", exe.display()))?;
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    Ok(dir)
}

/// The static space daemon (`just spaced`): `TETHER_SPACED_STATIC` when set, else
/// `target/x86_64-unknown-linux-gnu/<profile>/tether-spaced` of the running test's target dir.
/// What tests give the orchestrator to put into space containers (their images may have no
/// libc). The error says how to build it.
pub fn spaced_static() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_SPACED_STATIC") {
        return Ok(PathBuf::from(p));
    }
    let mut dir = profile_dir()?;
    let profile = dir
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .with_context(|| format!("{} has no profile dir name", dir.display()))?;
    dir.pop();
    let path = dir
        .join("x86_64-unknown-linux-gnu")
        .join(profile)
        .join("tether-spaced");
    if path.is_file() {
        Ok(path)
    } else {
        anyhow::bail!(
            "{} is not built: run `just spaced` (`--release` for benches) before the tests \
             (`just test` does)",
            path.display()
        )
    }
}

/// Path of a binary built by cargo in this workspace (e.g. `"tether"`, `"permission-node"`),
/// found next to the running test executable (`target/<profile>/deps/<test>` →
/// `target/<profile>/<name>`). The error says how to build it.
pub fn cargo_bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = profile_dir()?.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        anyhow::bail!(
            "{} is not built: run `cargo build --workspace --bins` before the tests (`just test` \
             does; cargo builds a package's binaries only for that package's own tests)",
            path.display()
        )
    }
}
