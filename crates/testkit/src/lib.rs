//! Test fixtures against real parts: a real `nats-server` per test and the real Docker engine.
//!
//! Layout:
//! - [`NatsServer`] (module `nats`): `nats-server -js` (from `TETHER_NATS_SERVER`, else the
//!   current line scripts/install-deps.sh keeps in `~/.cache/tether/nats-current`, else `PATH`;
//!   2.10 or later) on a free loopback port with a temporary store; kill/stop and restart on
//!   the same port and store for fault tests; killed when dropped, and — through a small `sh` watchdog — also when
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
    eventually, exec_ok, num, operator_token, permission_node, poll, register_agent, request,
    sign_token, unique, unverified_claims,
};
pub use nats::{NatsServer, binary as nats_server_binary, connect, free_port};

/// Path of a binary built by cargo in this workspace (e.g. `"tether"`, `"permission-node"`),
/// found next to the running test executable (`target/<profile>/deps/<test>` →
/// `target/<profile>/<name>`). The error says how to build it.
pub fn cargo_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the running test executable")?;
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .with_context(|| format!("{} has no parent dir", exe.display()))?;
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
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
