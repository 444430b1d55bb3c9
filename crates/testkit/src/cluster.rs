//! A real 3-node nats-server JetStream cluster, and a fleet on it: what the scale-out tests
//! and benchmarks run against. Every member is a [`NatsServer`] (loopback port, own store,
//! watchdog, kill/restart), all with one key bundle, so a node's nkey and the auth callout work
//! on whichever member a client reaches.
//!
//! Design decision: members are started together and waited on together — a JetStream
//! cluster answers nothing until a quorum of its members elected a meta leader — and the
//! cluster counts as started once it places a replicated stream (every peer known). A cluster
//! that places none within 30 s is thrown away and a new one started: nats-server
//! 2.10 sometimes bootstraps a meta group whose leader never learns the third peer (its debug
//! log says "Peer selection: required 3 nodes but found 2" for as long as it runs; reproduced
//! with plain 2.10.26 servers in about 1 of 20 starts on a loaded machine, never with 2.15).

use std::time::Duration;

use anyhow::Context;
use tether_auth::SigningKey;
use tether_bus::{BusConfig, NodeHandle};
use tether_permission_node::PermissionConfig;
use tether_permission_node::access::NodeKind;
use tether_permission_node::callout::CalloutConfig;
use tether_permission_node::server_conf::{ADMIN_USER, BusKeys};

use crate::fleet::{operator_token, permission_node};
use crate::nats::{NatsServer, SpawnError, free_port};

/// Members of a [`NatsCluster`].
pub const MEMBERS: usize = 3;
/// How long a started cluster may take to place a replicated stream before it is started anew
/// (a healthy one takes 2–3 s with six clusters starting at once on two cores).
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting the cluster when a picked port was taken meanwhile or the cluster
/// placed no replicated stream.
const START_ATTEMPTS: usize = 3;

/// Three nats-server processes routed into one JetStream cluster, authorization on.
pub struct NatsCluster {
    pub members: Vec<NatsServer>,
    admin_password: String,
}

impl NatsCluster {
    /// Starts the three members and waits until every one answers JetStream and the cluster
    /// places a replicated stream; a cluster that does not is replaced (see the module doc).
    pub async fn start() -> anyhow::Result<NatsCluster> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let cluster = match Self::try_start().await {
                Ok(c) => c,
                Err(SpawnError::PortInUse(e)) => {
                    last = Some(e);
                    continue;
                }
                Err(SpawnError::Other(e)) => return Err(e),
            };
            match cluster.wait_placement().await {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    eprintln!("tether-testkit: {e:#}; starting a new cluster");
                    last = Some(e);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("the cluster did not start"))
            .context(format!(
                "no working cluster after {START_ATTEMPTS} attempts"
            )))
    }

    async fn try_start() -> Result<NatsCluster, SpawnError> {
        let keys = BusKeys::generate();
        let ports = (0..MEMBERS)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16)>>>()
            .map_err(SpawnError::Other)?;
        let name = crate::unique("tether-test");
        let mut members = Vec::new();
        for (i, (client, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(c, _)| c != client)
                .map(|(_, r)| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let conf = format!(
                "server_name: n{i}\ncluster {{\n  name: {name}\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            members.push(NatsServer::member(&keys, *client, conf).map_err(SpawnError::Other)?);
        }
        for m in &mut members {
            m.spawn()?;
        }
        for m in &mut members {
            m.wait_ready().await?;
        }
        Ok(NatsCluster {
            members,
            admin_password: keys.admin_password.clone(),
        })
    }

    /// Waits until the cluster places a replicated stream: every member answering JetStream
    /// is not enough, since the meta leader may not know all peers yet ("no suitable peers
    /// for placement" for an R3 bucket, seen on a loaded machine).
    async fn wait_placement(&self) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.members[0].client().await?);
        let probe = async_nats::jetstream::stream::Config {
            name: "tether_test_placement".into(),
            subjects: vec!["tether.test.placement".into()],
            num_replicas: MEMBERS,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + PLACEMENT_TIMEOUT;
        loop {
            match js.create_stream(probe.clone()).await {
                Ok(_) => {
                    js.delete_stream(&probe.name)
                        .await
                        .context("delete the placement probe")?;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(anyhow::anyhow!(
                        "the cluster placed no replicated stream within {PLACEMENT_TIMEOUT:?}: {e}"
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Every member's `nats://127.0.0.1:PORT`, comma-separated (what nodes are given).
    pub fn plain_urls(&self) -> String {
        self.members
            .iter()
            .map(NatsServer::plain_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The list as the break-glass admin user (credentials on the first URL count for all).
    pub fn url(&self) -> String {
        let list = self.plain_urls();
        let rest = list.trim_start_matches("nats://");
        format!("nats://{ADMIN_USER}:{}@{rest}", self.admin_password)
    }

    /// The bus config of a node of `kind`: the whole list, that kind's own nkey.
    pub fn node_bus(&self, kind: NodeKind) -> BusConfig {
        BusConfig {
            nats_url: self.plain_urls(),
            ..self.members[0].node_bus(kind)
        }
    }

    /// The permission node's auth-callout settings (one bundle for every member).
    pub fn callout(&self) -> CalloutConfig {
        self.members[0].callout()
    }

    /// The member listening on `port`.
    pub fn member_on(&self, port: u16) -> Option<usize> {
        self.members.iter().position(|m| m.port() == port)
    }
}

/// A permission node (with the auth callout) on a [`NatsCluster`], connected through the list.
pub struct ClusterFleet {
    /// The permission node; dropped before the cluster.
    pub perm: Option<NodeHandle>,
    /// Stops the auth callout when the fleet drops.
    pub callout: Option<tokio_util::sync::DropGuard>,
    pub key: SigningKey,
    /// An operator token.
    pub op: String,
    /// A client of the cluster as its admin user.
    pub c: async_nats::Client,
    pub cluster: NatsCluster,
}

impl ClusterFleet {
    /// Registers agent `id` in `space` with `scopes` and returns a token for it.
    pub async fn agent(&self, id: &str, space: &str, scopes: &[&str]) -> String {
        crate::register_agent(&self.c, None, &self.op, id, space, scopes).await
    }

    /// A cluster with the permission node's buckets at `replicas` copies.
    pub async fn start(replicas: usize) -> anyhow::Result<ClusterFleet> {
        let cluster = NatsCluster::start().await?;
        let key = SigningKey::generate().context("generate key")?;
        let bus = cluster.node_bus(NodeKind::Permission);
        let cfg = PermissionConfig {
            kv_replicas: replicas,
            ..Default::default()
        };
        let perm = permission_node(
            &bus,
            SigningKey::from_pem(&key.to_pem()).context("key from pem")?,
            cfg,
        )
        .await?;
        let c = crate::connect(&cluster.url()).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        tether_permission_node::callout::start(
            &bus,
            &cluster.callout(),
            &async_nats::jetstream::new(c.clone()),
            stop.clone(),
        )
        .await
        .context("start the auth callout")?;
        Ok(ClusterFleet {
            perm: Some(perm),
            callout: Some(stop.drop_guard()),
            op: operator_token(&key)?,
            key,
            c,
            cluster,
        })
    }
}

/// How long [`wait_connected_elsewhere`] polls at most.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// Waits until `client` is connected to a server other than the one on `port`; returns the
/// port it is connected to.
pub async fn wait_connected_elsewhere(client: &async_nats::Client, port: u16) -> u16 {
    crate::eventually(
        RECONNECT_WAIT,
        "the client reconnects elsewhere",
        || async {
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            let now = client.server_info().port;
            (connected && now != port).then_some(now)
        },
    )
    .await
}
