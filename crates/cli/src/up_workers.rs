//! `[[workers]]` in a launch file: the worker deployments `tether up` makes once every node is
//! ready, and removes before it stops the nodes.
//!
//! ```toml
//! [[workers]]
//! name = "echo"                        # the deployment (a-z 0-9 -, at most 63)
//! agent = "echo-w"                     # the agent its replicas run as
//! image = "tether/a2a-echo-worker:dev" # on this machine's engine (never pulled)
//! command = ["/a2a-echo-worker"]       # an argv, or a string run under `sh -c`; default: the image's
//! env = { MODE = "fast" }              # no TETHER_* (the orchestrator sets those)
//! replicas = 2                         # min_replicas, max_replicas, restart, profile as `workers.deploy`
//! register = { space = "workers", scopes = ["a2a:serve"] }   # optional, see below
//! ```
//!
//! The fields are `workers.deploy`'s, and the body is made by the same code as
//! `tether workers deploy` ([`crate::workers::Deploy`]). A replica gets a token only for an
//! agent registered with the mark `workers:hosted`, and `workers.deploy` refuses any other;
//! with `register`, `tether up` registers the agent first with those scopes and the mark
//! (an agent already registered exactly so is fine; one registered otherwise is an error).
//!
//! Everything that can be checked without the bus is checked when the file is read, before
//! anything starts ([`check`]); what only the services can say (an unknown agent, an image not
//! on the engine) stops the bringup with their answer. On stop the deployments are removed and
//! `tether up` waits (at most [`REMOVE_WAIT`]) for their replicas to be gone, before it stops
//! the orchestrator.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tether_bus::Problem;

use crate::{CliError, EXIT_CONFIG};

/// How long `tether up` waits for the orchestrator to answer `workers.list`.
pub const ORCHESTRATOR_WAIT: Duration = Duration::from_secs(60);
/// How long it waits, on stop, for the replicas of the removed deployments to be gone.
pub const REMOVE_WAIT: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One `[[workers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    pub name: String,
    pub agent: String,
    pub image: String,
    #[serde(default)]
    pub command: Option<WorkerCommand>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub min_replicas: u32,
    #[serde(default)]
    pub max_replicas: u32,
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub register: Option<Register>,
}

/// A string (run under `sh -c`) or an argv.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WorkerCommand {
    Shell(String),
    Argv(Vec<String>),
}

/// Register the agent before deploying: its space and scopes (`workers:hosted` is added).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub space: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

fn config_err(m: impl Into<String>) -> CliError {
    CliError::new(EXIT_CONFIG, m)
}

impl WorkerEntry {
    /// The `workers.deploy` body.
    pub fn body(&self) -> Result<Value, String> {
        let (command, argv) = match &self.command {
            None => (None, Vec::new()),
            Some(WorkerCommand::Shell(s)) => (Some(s.clone()), Vec::new()),
            Some(WorkerCommand::Argv(a)) => (None, a.clone()),
        };
        crate::workers::Deploy {
            name: self.name.clone(),
            agent_id: self.agent.clone(),
            image: self.image.clone(),
            command,
            argv,
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            replicas: self.replicas,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            restart: self.restart.clone(),
            profile: self.profile.clone(),
            ..Default::default()
        }
        .body()
    }

    /// The `agents.register` body, when the entry asks for one.
    fn register_body(&self) -> Option<Value> {
        let r = self.register.as_ref()?;
        let mut scopes = r.scopes.clone();
        if !scopes.iter().any(|s| s == "workers:hosted") {
            scopes.push("workers:hosted".into());
        }
        Some(json!({"agent_id": self.agent, "space": r.space, "scopes": scopes}))
    }
}

/// Checks every entry without the bus: names, duplicates, required fields, replica bounds,
/// environment, restart policy, scopes.
pub fn check(workers: &[WorkerEntry]) -> Result<(), CliError> {
    let mut names = HashSet::new();
    for w in workers {
        let bad = |m: String| config_err(format!("worker `{}`: {m}", w.name));
        if !tether_bus::subject::is_valid_name(&w.name) {
            return Err(config_err(format!(
                "worker name {:?}: 1-63 characters of a-z 0-9 -, starting with a letter or digit",
                w.name
            )));
        }
        if !names.insert(w.name.as_str()) {
            return Err(config_err(format!("worker `{}` is listed twice", w.name)));
        }
        if !tether_bus::subject::is_valid_token(&w.agent) {
            return Err(bad(format!("agent {:?}: use A-Z a-z 0-9 - _", w.agent)));
        }
        if w.image.trim().is_empty() {
            return Err(bad("has no image".into()));
        }
        let max = if w.max_replicas == 0 {
            w.replicas.max(w.min_replicas).max(1)
        } else {
            w.max_replicas
        };
        if w.replicas > max || w.min_replicas > max {
            return Err(bad(format!(
                "replicas {} and min_replicas {} must be at most max_replicas {max}",
                w.replicas, w.min_replicas
            )));
        }
        if let Some(k) = w.env.keys().find(|k| k.starts_with("TETHER_")) {
            return Err(bad(format!("env {k}: TETHER_* is set by the orchestrator")));
        }
        if let Some(r) = w.restart.as_deref()
            && !matches!(r, "always" | "on-failure" | "never")
        {
            return Err(bad(format!("restart {r:?}: always | on-failure | never")));
        }
        if let Some(WorkerCommand::Argv(a)) = &w.command
            && a.is_empty()
        {
            return Err(bad("command is an empty argv".into()));
        }
        if let Some(r) = &w.register {
            if !tether_bus::subject::is_valid_token(&r.space) {
                return Err(bad(format!(
                    "register.space {:?}: use A-Z a-z 0-9 - _",
                    r.space
                )));
            }
            tether_auth::ScopeSet::parse(&r.scopes)
                .map_err(|e| bad(format!("register.scopes: {e}")))?;
        }
        w.body().map_err(bad)?;
    }
    Ok(())
}

/// An operator token signed here from the fleet's signing key (the one the permission node
/// of a local fleet made), for one short use.
fn operator_token() -> Result<String, CliError> {
    let key = crate::identity::key_path(None, None);
    crate::identity::operator_token(&key, 600, &Default::default()).map(|(t, _)| t)
}

/// [`deploy_all`] as the operator of the local fleet; nothing at all (no signing key read)
/// for a launch file without workers.
pub async fn bring_up(
    client: &async_nats::Client,
    workers: &[WorkerEntry],
) -> (Vec<String>, Result<(), CliError>) {
    if workers.is_empty() {
        return (Vec::new(), Ok(()));
    }
    match operator_token() {
        Ok(t) => deploy_all(client, workers, &t).await,
        Err(e) => (Vec::new(), Err(e)),
    }
}

/// [`remove_all`] as the operator of the local fleet.
pub async fn take_down(client: &async_nats::Client, names: &[String]) {
    if names.is_empty() {
        return;
    }
    match operator_token() {
        Ok(t) => remove_all(client, names, &t).await,
        Err(e) => println!("[tether] workers not removed: {}", e.message),
    }
}

/// One request as `token`; the service's refusal as a [`Problem`], no answer as 503.
async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
    token: &str,
) -> Result<Value, Problem> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Authorization", format!("Bearer {token}").as_str());
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(body.to_string().into());
    let msg = tether_bus::connect::request(client, subject.to_string(), req, REQUEST_TIMEOUT)
        .await
        .map_err(|f| Problem::unavailable(f.to_string()))?;
    if let Some(p) = Problem::from_reply(msg.headers.as_ref(), &msg.payload) {
        return Err(p);
    }
    serde_json::from_slice(&msg.payload).map_err(|e| Problem::internal(e.to_string()))
}

/// Waits for the orchestrator to answer `workers.list`, registers the agents the entries ask
/// for, and deploys every entry in order. The names deployed so far come back with an error,
/// so the caller can remove them.
pub async fn deploy_all(
    client: &async_nats::Client,
    workers: &[WorkerEntry],
    token: &str,
) -> (Vec<String>, Result<(), CliError>) {
    let mut done = Vec::new();
    if workers.is_empty() {
        return (done, Ok(()));
    }
    let deadline = tokio::time::Instant::now() + ORCHESTRATOR_WAIT;
    loop {
        match request(client, "workers.list", &json!({}), token).await {
            Ok(_) => break,
            Err(p) if p.status == 503 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(p) => {
                let m = format!(
                    "the orchestrator does not answer workers.list: {}",
                    p.detail
                );
                return (done, Err(CliError::new(1, m)));
            }
        }
    }
    for w in workers {
        if let Some(body) = w.register_body()
            && let Err(p) = request(client, "agents.register", &body, token).await
        {
            let m = format!(
                "worker `{}`: cannot register agent `{}` ({}): {}",
                w.name, w.agent, p.status, p.detail
            );
            return (done, Err(CliError::new(1, m)));
        }
        // Checked when the file was read.
        let body = match w.body() {
            Ok(b) => b,
            Err(e) => return (done, Err(config_err(format!("worker `{}`: {e}", w.name)))),
        };
        match request(client, "workers.deploy", &body, token).await {
            Ok(s) => {
                println!(
                    "[tether] worker `{}` deployed: {} replicas of agent `{}`",
                    w.name, s["deployment"]["spec"]["replicas"], w.agent
                );
                done.push(w.name.clone());
            }
            Err(p) => {
                let m = format!(
                    "worker `{}`: workers.deploy refused ({}): {}",
                    w.name, p.status, p.detail
                );
                return (done, Err(CliError::new(1, m)));
            }
        }
    }
    (done, Ok(()))
}

/// Removes the deployments `names` and waits (at most [`REMOVE_WAIT`] in all) until each of
/// their replicas was announced removed. Problems are logged: stopping goes on.
pub async fn remove_all(client: &async_nats::Client, names: &[String], token: &str) {
    let deadline = tokio::time::Instant::now() + REMOVE_WAIT;
    for name in names {
        let mut events = match client.subscribe(format!("events.workers.{name}")).await {
            Ok(s) => s,
            Err(e) => {
                println!("[tether] worker `{name}`: cannot follow its events: {e}");
                continue;
            }
        };
        let removed = match request(client, "workers.remove", &json!({"name": name}), token).await {
            Ok(r) => r,
            Err(p) => {
                println!(
                    "[tether] worker `{name}` not removed ({}): {}",
                    p.status, p.detail
                );
                continue;
            }
        };
        let mut left = removed["deployment"]["slots"]
            .as_array()
            .map_or(0, Vec::len);
        while left > 0 {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(m)) => {
                    let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                    if v["type"] == "tether.worker.removed" {
                        left -= 1;
                    }
                }
                _ => break,
            }
        }
        if left > 0 {
            println!("[tether] worker `{name}` removed; {left} replicas not seen gone");
        } else {
            println!("[tether] worker `{name}` removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<WorkerEntry>, CliError> {
        #[derive(Deserialize)]
        struct F {
            workers: Vec<WorkerEntry>,
        }
        let f: F = toml::from_str(s).map_err(|e| config_err(e.to_string()))?;
        check(&f.workers).map(|()| f.workers)
    }

    #[test]
    fn an_entry_is_a_deploy_body() {
        let w = parse(
            r#"
[[workers]]
name = "echo"
agent = "echo-w"
image = "img:1"
command = ["/bin/w", "--fast"]
env = { MODE = "a" }
replicas = 2
max_replicas = 4
register = { space = "workers", scopes = ["a2a:serve"] }
"#,
        )
        .expect("good");
        let b = w[0].body().expect("body");
        assert_eq!(b["name"], "echo");
        assert_eq!(b["agent_id"], "echo-w");
        assert_eq!(b["command"], json!(["/bin/w", "--fast"]));
        assert_eq!(b["env"], json!({"MODE": "a"}));
        assert_eq!(
            (b["replicas"].as_u64(), b["max_replicas"].as_u64()),
            (Some(2), Some(4))
        );
        assert_eq!(
            w[0].register_body().expect("register")["scopes"],
            json!(["a2a:serve", "workers:hosted"])
        );
        let w =
            parse("[[workers]]\nname = \"s\"\nagent = \"a\"\nimage = \"i\"\ncommand = \"sleep 9\"")
                .expect("shell");
        assert_eq!(w[0].body().expect("body")["command"], "sleep 9");
        assert!(w[0].register_body().is_none());
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        let head = "[[workers]]\nname = \"w\"\nagent = \"a\"\nimage = \"i\"\n";
        for (extra, needle) in [
            ("replicas = 5\nmax_replicas = 2", "max_replicas"),
            ("env = { TETHER_TOKEN = \"x\" }", "TETHER_"),
            ("restart = \"sometimes\"", "restart"),
            ("command = []", "empty argv"),
            (
                "register = { space = \"s\", scopes = [\"no:such\"] }",
                "register.scopes",
            ),
            ("register = { space = \"a b\" }", "register.space"),
            ("imgae = \"x\"", "imgae"),
        ] {
            let e = parse(&format!("{head}{extra}")).expect_err(extra);
            assert_eq!(e.code, EXIT_CONFIG, "{extra}");
            assert!(
                e.message.contains(needle),
                "{needle:?} not in {}",
                e.message
            );
        }
        for (file, needle) in [
            (
                "[[workers]]\nname = \"Bad!\"\nagent = \"a\"\nimage = \"i\"",
                "worker name",
            ),
            (
                "[[workers]]\nname = \"w\"\nagent = \"a b\"\nimage = \"i\"",
                "agent",
            ),
            (
                "[[workers]]\nname = \"w\"\nagent = \"a\"\nimage = \" \"",
                "no image",
            ),
            ("[[workers]]\nname = \"w\"\nagent = \"a\"", "image"),
            (&format!("{head}{head}"), "listed twice"),
        ] {
            let e = parse(file).expect_err(file);
            assert!(
                e.message.contains(needle),
                "{needle:?} not in {}",
                e.message
            );
        }
    }
}
