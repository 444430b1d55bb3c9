//! Where a command runs, decided per request from the verified caller and this server's
//! config — never from a request field.
//!
//! Order: the token's space, when the orchestrator has bound a container to it (KV
//! `tether_spaces`, which also says which host holds it, so the exec goes straight to that
//! host's orchestrator); else the configured `target_container`; else a local subprocess when
//! `allow_local_exec` is on; else a 404 that says what was tried.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::kv::Bucket;
use tether_bus::{Caller, Encoding, Problem};
use tether_proto::SpaceBinding;

const KV_WAIT: Duration = Duration::from_secs(5);

/// The resolved target of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The caller's own space container, on `host_id` (empty: ask any orchestrator).
    Space { space: String, host_id: String },
    /// The configured static container.
    Container(String),
    /// A subprocess of this server.
    Local,
}

impl Target {
    /// A stable label, stored with the session: a session does not carry over to another
    /// target (a directory of one machine means nothing on another).
    pub fn label(&self) -> String {
        match self {
            Target::Space { space, .. } => format!("space:{space}"),
            Target::Container(c) => format!("container:{c}"),
            Target::Local => "local".into(),
        }
    }
}

pub struct Resolver {
    spaces: Bucket<SpaceBinding>,
    target_container: Option<String>,
    allow_local: bool,
}

impl Resolver {
    /// Opens the bindings bucket with the orchestrator's own settings (so whichever node
    /// starts first makes the same bucket).
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        target_container: &str,
        allow_local: bool,
    ) -> anyhow::Result<Resolver> {
        let spaces = Bucket::open(
            js,
            kv::Config {
                bucket: bucket.to_string(),
                description: "tether: space bindings (space -> host, container)".into(),
                history: 1,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
            Encoding::Json,
        )
        .await?
        .named("space bindings")
        .timeout(KV_WAIT);
        Ok(Resolver {
            spaces,
            target_container: (!target_container.is_empty()).then(|| target_container.to_string()),
            allow_local,
        })
    }

    async fn binding(&self, space: &str) -> Result<Option<SpaceBinding>, Problem> {
        Ok(self.spaces.get(space).await?.map(|(b, _)| b))
    }

    pub async fn resolve(&self, caller: &Caller) -> Result<Target, Problem> {
        if !caller.space.is_empty()
            && let Some(b) = self.binding(&caller.space).await?
        {
            let host_id = if tether_bus::subject::is_valid_token(&b.host_id) {
                b.host_id
            } else {
                String::new()
            };
            return Ok(Target::Space {
                space: caller.space.clone(),
                host_id,
            });
        }
        if let Some(c) = &self.target_container {
            return Ok(Target::Container(c.clone()));
        }
        if self.allow_local {
            return Ok(Target::Local);
        }
        let why = if caller.space.is_empty() {
            "the token is bound to no space".to_string()
        } else {
            format!(
                "space `{}` has no container (create one with containers.create)",
                caller.space
            )
        };
        Err(Problem::not_found(format!(
            "nowhere to run: {why}, no target_container is configured, and local execution is disabled (allow_local_exec = false)"
        )))
    }
}
