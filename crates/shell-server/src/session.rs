//! Remembered shell sessions in KV (`tether_shell_sessions`), one per agent and space.
//!
//! Kept in JetStream, not in this process, so any replica serves an agent's next command
//! from where its previous one (served by another replica) left off. Concurrent commands of
//! one agent behave like two terminals: each starts from the last saved state and the last to
//! finish is what the next command sees. Entries expire after the configured idle time.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::kv::Bucket;
use tether_bus::{Caller, Encoding, Problem};
use tether_proto::ShellSession;

/// How long a KV read or write may take before the request is answered 503.
const KV_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Sessions {
    kv: Bucket<ShellSession>,
}

/// The session key of a caller: `s_<space>.a_<agent>` (`nospace.a_<agent>` without a space).
pub fn key(caller: &Caller) -> Result<String, Problem> {
    let ok = |s: &str| tether_bus::subject::is_valid_token(s);
    if !ok(&caller.agent_id) || !(caller.space.is_empty() || ok(&caller.space)) {
        return Err(Problem::bad_request(
            "the token's agent id or space cannot name a shell session",
        ));
    }
    Ok(if caller.space.is_empty() {
        format!("nospace.a_{}", caller.agent_id)
    } else {
        format!("s_{}.a_{}", caller.space, caller.agent_id)
    })
}

impl Sessions {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        ttl: Duration,
    ) -> anyhow::Result<Sessions> {
        let kv = Bucket::open(
            js,
            kv::Config {
                bucket: bucket.to_string(),
                description: "tether: shell sessions (space.agent -> cwd, exports)".into(),
                history: 1,
                max_age: ttl,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
            Encoding::Json,
        )
        .await?
        .named("shell sessions")
        .timeout(KV_WAIT);
        Ok(Sessions { kv })
    }

    pub async fn load(&self, key: &str) -> Result<Option<ShellSession>, Problem> {
        match self.kv.get(key).await {
            Ok(s) => Ok(s.map(|(s, _)| s)),
            // 500 is the bucket's "unreadable record": a fresh start, not a broken shell.
            Err(p) if p.status == 500 => {
                tracing::warn!(key, error = %p.detail, "unreadable shell session; starting afresh");
                Ok(None)
            }
            Err(p) => Err(p),
        }
    }

    pub async fn save(&self, key: &str, s: &ShellSession) -> Result<(), Problem> {
        self.kv.put(key, s).await.map(|_| ())
    }

    pub async fn forget(&self, key: &str) -> Result<(), Problem> {
        self.kv.delete(key).await
    }
}
