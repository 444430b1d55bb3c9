//! The test fleet with an orchestrator on the real Docker engine (feature `orchestrator`): a
//! host id of its own per test, so parallel tests never see each other's containers, and every
//! container and network of that host removed when the test ends, also on panic.
//!
//! Shared by the orchestrator's and the shell-server's tests; what only one of them needs
//! (the orchestrator binary as a child process, the shell-server) stays in that crate.

use std::ops::{Deref, DerefMut};

use anyhow::Context;
use serde_json::{Value, json};
use tether_bus::{BusConfig, NodeHandle};
use tether_container_orchestrator::OrchestratorConfig;

use crate::docker::{self, host_label, labeled_containers};
use crate::fleet::{Fleet, NodeKind, Problem, unique};

/// Set to `off`, the orchestrators of tests run without the space daemon (every exec takes
/// the engine's path); otherwise space containers get the static daemon
/// ([`crate::spaced_static`]) and the test server listens where containers reach it.
pub const SPACE_DAEMON_ENV: &str = "TETHER_TEST_SPACE_DAEMON";

/// Whether the tests' orchestrators put the space daemon into space containers.
pub fn space_daemon_on() -> bool {
    std::env::var(SPACE_DAEMON_ENV).map_or(true, |v| v != "off")
}

/// The static daemon's path for an orchestrator of a test; panics when it is not built.
pub fn space_daemon_binary() -> String {
    crate::spaced_static()
        .unwrap_or_else(|e| panic!("the tests need the static space daemon: {e}"))
        .display()
        .to_string()
}

/// An orchestrator config for tests: host `host_id`, janitor every second, the space daemon
/// as [`space_daemon_on`] says (containers reach the bus at the derived
/// `host.docker.internal` URL of a server started by [`OrchFleet::start`]).
pub fn config(host_id: &str) -> OrchestratorConfig {
    let daemon = space_daemon_on();
    OrchestratorConfig {
        host_id: host_id.into(),
        janitor_interval_seconds: 1,
        space_daemon: daemon,
        space_daemon_binary: if daemon {
            space_daemon_binary()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

/// The orchestrator in-process on `bus` (e.g. [`Fleet::node_bus`] of its kind).
pub async fn start(bus: &BusConfig, cfg: OrchestratorConfig) -> anyhow::Result<NodeHandle> {
    let client = tether_bus::connect::options(bus, tether_container_orchestrator::NAME)
        .await?
        .connect(tether_bus::connect::servers(&bus.nats_url)?)
        .await
        .context("connect the orchestrator")?;
    tether_container_orchestrator::build(bus, cfg, &client)
        .await
        .context("build orchestrator")?
        .start_with_client(bus.clone(), client)
        .await
        .context("start orchestrator")
}

/// Every container (running or not) the orchestrator of `host_id` made: full ids, sorted.
pub fn host_containers(host_id: &str) -> Vec<String> {
    labeled_containers(&host_label(host_id))
}

/// A [`Fleet`] (derefs to it) with a host id of its own and, when asked, an orchestrator for
/// that host in-process.
///
/// Drops the orchestrator first, then the fleet (server, permission node, then the engine
/// cleanup of this host's label).
pub struct OrchFleet {
    /// `None` when started without one, or after a test took it down.
    pub orch: Option<NodeHandle>,
    pub host_id: String,
    /// The busybox test image (empty for a fleet without the engine).
    pub image: String,
    pub fleet: Fleet,
}

impl OrchFleet {
    /// The test image, a fleet, host id `prefix-…` cleaned up on drop, and (with `node`) an
    /// orchestrator for it at [`config`] changed by `tweak`. With the space daemon on, the
    /// server listens on every interface, so the daemons in containers reach it.
    pub async fn start(
        prefix: &str,
        node: bool,
        tweak: impl FnOnce(&mut OrchestratorConfig),
    ) -> anyhow::Result<OrchFleet> {
        Self::start_under(None, prefix, node, tweak).await
    }

    /// [`OrchFleet::start`] for a deployment with subject prefix `subject_prefix` (`None`:
    /// none; see [`crate::NatsServer::start_under`]): the permission node, its auth callout
    /// and the orchestrator all serve under it, the orchestrator hands it to the space daemons,
    /// and the fleet's `call`, `agent`, `create_space` and `exec` ask under it.
    pub async fn start_under(
        subject_prefix: Option<&str>,
        prefix: &str,
        node: bool,
        tweak: impl FnOnce(&mut OrchestratorConfig),
    ) -> anyhow::Result<OrchFleet> {
        let containers = space_daemon_on();
        let nats = match subject_prefix {
            Some(p) => crate::NatsServer::start_under(p, containers).await?,
            None if containers => crate::NatsServer::start_for_containers().await?,
            None => crate::NatsServer::start().await?,
        };
        let fleet = Fleet::on(nats, Default::default()).await?;
        Self::start_on(fleet, prefix, node, tweak).await
    }

    /// [`OrchFleet::start`] on `fleet` (e.g. one whose server containers reach).
    pub async fn start_on(
        mut fleet: Fleet,
        prefix: &str,
        node: bool,
        tweak: impl FnOnce(&mut OrchestratorConfig),
    ) -> anyhow::Result<OrchFleet> {
        let image = docker::busybox_image()?;
        let host_id = unique(prefix);
        fleet.clean_label(host_label(&host_id));
        let orch = if node {
            let mut cfg = config(&host_id);
            tweak(&mut cfg);
            Some(start(&fleet.node_bus(NodeKind::Orchestrator), cfg).await?)
        } else {
            None
        };
        Ok(OrchFleet {
            orch,
            host_id,
            image,
            fleet,
        })
    }

    /// A fleet that never touches the engine (no image, no orchestrator).
    pub fn without_engine(fleet: Fleet, prefix: &str) -> OrchFleet {
        OrchFleet {
            orch: None,
            host_id: unique(prefix),
            image: String::new(),
            fleet,
        }
    }

    /// Creates the caller's space container (busybox) with `extra` fields merged in; panics
    /// when refused.
    pub async fn create_space(&self, token: &str, extra: Value) -> Value {
        assert!(!self.image.is_empty(), "a fleet without the engine");
        let mut body = json!({"image": self.image});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.call("containers.create", body, Some(token))
            .await
            .unwrap_or_else(|p| panic!("create space container: {p:?}"))
    }

    /// `containers.exec` as `token`.
    pub async fn exec(&self, token: &str, body: Value) -> Result<Value, Problem> {
        self.call("containers.exec", body, Some(token)).await
    }

    /// Managed containers of this test's host, straight from the engine (full ids, sorted).
    pub fn engine_containers(&self) -> Vec<String> {
        host_containers(&self.host_id)
    }

    /// The space binding of `space` in KV, as JSON.
    pub async fn binding(&self, space: &str) -> Option<Value> {
        let js = async_nats::jetstream::new(self.c.clone());
        let kv = js
            .get_key_value("tether_spaces")
            .await
            .unwrap_or_else(|e| panic!("bucket tether_spaces: {e}"));
        kv.get(space)
            .await
            .unwrap_or_else(|e| panic!("kv get {space}: {e}"))
            .map(|b| serde_json::from_slice(&b).unwrap_or_else(|e| panic!("binding json: {e}")))
    }
}

impl Deref for OrchFleet {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

impl DerefMut for OrchFleet {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }
}
