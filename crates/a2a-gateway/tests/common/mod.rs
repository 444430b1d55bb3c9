//! Fixtures of the gateway's tests: a fleet (real nats-server with the auth callout, the
//! permission node) with an A2A gateway on its own bus user, agents of two spaces, and
//! request helpers speaking the gateway's headers; for the end-to-end tests also the
//! `a2a-gateway` and `a2a-echo-worker` binaries as processes ([`Proc`]), stream chunks, and a
//! task's events as the `A2A_EVENTS` stream holds them.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tether_a2a_gateway::{A2aConfig, Running};
use tether_bus::Problem;
use tether_testkit::{Fleet, NodeKind};

pub const AGENT: &str = "echo";

pub struct A2aFleet {
    pub f: Fleet,
    pub gw: Option<Running>,
    /// Token of the worker agent `echo` (scope a2a:serve).
    pub worker: String,
    /// A caller in space `s1` and one in space `s2` (scope a2a:call).
    pub alice: String,
    pub mallory: String,
}

pub fn config() -> A2aConfig {
    A2aConfig {
        a2a_listen: "127.0.0.1:0".into(),
        a2a_ack_wait_ms: 3_000,
        a2a_cancel_grace_ms: 3_000,
        ..Default::default()
    }
}

impl A2aFleet {
    pub async fn start() -> A2aFleet {
        Self::start_with(config()).await
    }

    pub async fn start_with(cfg: A2aConfig) -> A2aFleet {
        let mut fleet = Self::bare().await;
        fleet.gw = Some(fleet.replica(cfg).await);
        fleet
    }

    /// The fleet and its agents without a gateway (tests that run gateway processes).
    pub async fn bare() -> A2aFleet {
        let f = Fleet::start().await.expect("fleet");
        let worker = f.agent(AGENT, "workers", &["a2a:serve"]).await;
        let alice = f.agent("alice", "s1", &["a2a:call"]).await;
        let mallory = f.agent("mallory", "s2", &["a2a:call"]).await;
        A2aFleet {
            f,
            gw: None,
            worker,
            alice,
            mallory,
        }
    }

    /// Another gateway replica on the same bus.
    pub async fn replica(&self, cfg: A2aConfig) -> Running {
        tether_a2a_gateway::start(self.f.node_bus(NodeKind::A2a), cfg)
            .await
            .expect("a2a gateway replica")
    }

    /// An A2A request on the bus as `token`, with `A2A-Version: 1.0`.
    pub async fn a2a(
        &self,
        agent: &str,
        op: &str,
        body: Value,
        token: &str,
    ) -> Result<Value, Problem> {
        self.a2a_with(agent, op, body, token, &[]).await
    }

    pub async fn a2a_with(
        &self,
        agent: &str,
        op: &str,
        body: Value,
        token: &str,
        headers: &[(&str, &str)],
    ) -> Result<Value, Problem> {
        let mut h = async_nats::HeaderMap::new();
        h.insert("A2A-Version", "1.0");
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        tether_testkit::request(
            &self.f.c,
            &[&format!("a2a.{agent}"), op]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("."),
            body,
            Some(token),
            h,
            Duration::from_secs(30),
        )
        .await
    }

    /// The worker publishes the agent's card.
    pub async fn publish_card(&self) {
        self.f
            .call(
                &format!("a2a.{AGENT}.work.card"),
                json!({"name": "echo", "description": "echoes", "version": "1.0.0",
                       "skills": [{"id": "echo", "name": "echo", "description": "echo", "tags": []}]}),
                Some(&self.worker),
            )
            .await
            .expect("publish the card");
    }
}

/// A user message with one text part.
pub fn message(text: &str) -> Value {
    json!({"message": {"messageId": uuid(), "role": "ROLE_USER", "parts": [{"text": text}]}})
}

pub fn uuid() -> String {
    tether_testkit::unique("m")
}

pub fn state(task: &Value) -> &str {
    task["status"]["state"].as_str().unwrap_or_default()
}

pub fn a2a_error(p: &Problem) -> String {
    p.extensions
        .get("a2aError")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

/// A binary of this workspace running on the fleet, SIGKILLed (and reaped) when dropped. Its
/// log goes to a file, printed when the test fails.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts `bin` with `env` and nothing of this process's `TETHER_*` settings, in an empty
    /// directory (no `tether.toml` is found).
    pub fn spawn(bin: &str, name: &str, env: &[(&str, String)]) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(tether_testkit::cargo_bin(bin).expect("binary"));
        for (k, _) in std::env::vars() {
            if k.starts_with("TETHER_") || k == "NATS_URL" {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .current_dir(dir.path())
            .env("TETHER_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
            _dir: dir,
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- log of {} -----\n{log}", self.name);
        }
    }
}

impl A2aFleet {
    /// An `a2a-gateway` process on its own bus user (ack wait and cancel grace 3 s, the HTTP
    /// bridge on a free port), with `extra` settings.
    pub fn gateway_process(&self, name: &str, extra: &[(&str, String)]) -> Proc {
        let bus = self.f.node_bus(NodeKind::A2a);
        let nkey = bus.nats_nkey_file.expect("an authorized bus");
        let mut env = vec![
            ("TETHER_NATS_URL", bus.nats_url),
            ("TETHER_NATS_NKEY_FILE", nkey.display().to_string()),
            ("TETHER_A2A_LISTEN", "127.0.0.1:0".into()),
            ("TETHER_A2A_ACK_WAIT_MS", "3000".into()),
            ("TETHER_A2A_CANCEL_GRACE_MS", "3000".into()),
        ];
        env.extend(extra.iter().cloned());
        Proc::spawn("a2a-gateway", name, &env)
    }

    /// An `a2a-echo-worker` process of agent `echo` with the worker token, named `name` in
    /// its artifacts' metadata, running at most `concurrency` tasks at once.
    pub fn worker_process(&self, name: &str, concurrency: usize) -> Proc {
        let env = [
            ("TETHER_NATS_URL", self.f.nats.plain_url()),
            ("TETHER_TOKEN", self.worker.clone()),
            ("TETHER_AGENT_ID", AGENT.to_string()),
            ("TETHER_WORKER_NAME", name.to_string()),
            ("TETHER_WORKER_CONCURRENCY", concurrency.to_string()),
        ];
        Proc::spawn("a2a-echo-worker", name, &env)
    }

    /// The instance ids of the gateways that answer a ping within half a second.
    pub async fn gateway_ids(&self) -> HashSet<String> {
        let c = &self.f.c;
        let inbox = c.new_inbox();
        let mut sub = c.subscribe(inbox.clone()).await.expect("subscribe");
        c.publish_with_reply("$SRV.PING.a2a-gateway", inbox, "".into())
            .await
            .expect("ping");
        let mut ids = HashSet::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload)
                && let Some(id) = v["id"].as_str()
            {
                ids.insert(id.to_string());
            }
        }
        ids
    }

    /// Waits until a gateway other than `known` answers; its id.
    pub async fn new_gateway(&self, known: &HashSet<String>) -> String {
        tether_testkit::eventually(Duration::from_secs(20), "a gateway comes up", || async {
            self.gateway_ids()
                .await
                .into_iter()
                .find(|id| !known.contains(id))
        })
        .await
    }

    /// Waits until `alice` sees task `id` in a state `pred` accepts; the task.
    pub async fn wait_task(&self, id: &str, what: &str, pred: impl Fn(&str) -> bool) -> Value {
        tether_testkit::eventually(Duration::from_secs(25), what, || async {
            let t = self
                .try_a2a(&self.f.c, "get", json!({"id": id}), &self.alice, &[])
                .await?;
            t.ok().filter(|t| pred(state(t)))
        })
        .await
    }

    /// One A2A request on `c`, waiting at most five seconds: `None` when no gateway answered
    /// (none is up, or the request went to one that just died).
    pub async fn try_a2a(
        &self,
        c: &async_nats::Client,
        op: &str,
        body: Value,
        token: &str,
        headers: &[(&str, &str)],
    ) -> Option<Result<Value, Problem>> {
        let mut h = async_nats::HeaderMap::new();
        h.insert("A2A-Version", "1.0");
        h.insert("Authorization", format!("Bearer {token}").as_str());
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        let req = async_nats::client::Request::new()
            .payload(body.to_string().into())
            .headers(h)
            .timeout(Some(Duration::from_secs(5)));
        let m = c
            .send_request(format!("a2a.{AGENT}.{op}"), req)
            .await
            .ok()?;
        match Problem::from_reply(m.headers.as_ref(), &m.payload) {
            Some(p) => Some(Err(p)),
            None => Some(Ok(serde_json::from_slice(&m.payload).expect("JSON reply"))),
        }
    }

    /// The task's events on the `A2A_EVENTS` stream, in stream order: `(A2A-Event-Seq, event)`.
    pub async fn task_events(&self, space: &str, task: &str) -> Vec<(u64, Value)> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let js = async_nats::jetstream::new(self.f.c.clone());
        let stream = js.get_stream("A2A_EVENTS").await.expect("A2A_EVENTS");
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("a2a_events.{space}.{task}"),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut msgs = consumer.messages().await.expect("messages");
        let mut out = Vec::new();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .expect("the task's events within 10 s")
                .expect("an event")
                .expect("event message");
            let seq = m
                .headers
                .as_ref()
                .and_then(|h| h.get("A2A-Event-Seq"))
                .and_then(|v| v.as_str().parse().ok())
                .expect("A2A-Event-Seq");
            out.push((seq, serde_json::from_slice(&m.payload).expect("event JSON")));
            if m.info().expect("info").pending == 0 {
                return out;
            }
        }
    }
}

/// A task's terminal states.
pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "TASK_STATE_COMPLETED"
            | "TASK_STATE_FAILED"
            | "TASK_STATE_CANCELED"
            | "TASK_STATE_REJECTED"
    )
}

/// The state an event sets (`statusUpdate` or `task`), if any.
pub fn event_state(e: &Value) -> Option<&str> {
    e["statusUpdate"]["status"]["state"]
        .as_str()
        .or_else(|| e["task"]["status"]["state"].as_str())
}

/// `task` with event `e` applied as the A2A rules say (status replaced, artifacts added,
/// replaced or appended to, a message added to the history).
pub fn apply(task: &mut Value, e: &Value) {
    if let Some(t) = e.get("task") {
        *task = t.clone();
    } else if let Some(s) = e.get("statusUpdate") {
        task["status"] = s["status"].clone();
    } else if let Some(a) = e.get("artifactUpdate") {
        let new = &a["artifact"];
        if !task["artifacts"].is_array() {
            task["artifacts"] = json!([]);
        }
        let list = task["artifacts"].as_array_mut().expect("array");
        match list
            .iter_mut()
            .find(|x| x["artifactId"] == new["artifactId"])
        {
            Some(x) if a["append"] == true => {
                let parts = new["parts"].as_array().cloned().unwrap_or_default();
                x["parts"].as_array_mut().expect("parts").extend(parts);
            }
            Some(x) => *x = new.clone(),
            None => list.push(new.clone()),
        }
    } else if let Some(m) = e.get("message") {
        task["history"]
            .as_array_mut()
            .expect("history")
            .push(m.clone());
    }
}

/// One chunk of a streamed answer.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    /// `event`, `end` or `error`.
    pub kind: String,
    pub body: Value,
    /// The task's event number (`A2A-Event-Seq`) an event chunk carries.
    pub event_seq: Option<u64>,
}

/// The chunks on `sub` until the end (or error) chunk; panics when it is not there within
/// `within`.
pub async fn read_stream(sub: &mut async_nats::Subscriber, within: Duration) -> Vec<Chunk> {
    let until = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    loop {
        let c = next_chunk(sub, until)
            .await
            .expect("the stream's end in time");
        let last = c.kind != "event";
        out.push(c);
        if last {
            return out;
        }
    }
}

/// The next chunk on `sub`, or `None` at `until`.
pub async fn next_chunk(
    sub: &mut async_nats::Subscriber,
    until: tokio::time::Instant,
) -> Option<Chunk> {
    let m = tokio::time::timeout_at(until, sub.next()).await.ok()??;
    let h = m.headers.as_ref().expect("chunk headers");
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
    Some(Chunk {
        seq: get("Tether-Stream-Seq").parse().expect("Tether-Stream-Seq"),
        kind: get("Tether-Stream"),
        body: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
        event_seq: get("A2A-Event-Seq").parse().ok(),
    })
}

/// Checks a complete stream: gap-free seqs from 1, events then one end chunk, the first
/// event a `task` snapshot, exactly one terminal event (the last). Its events.
pub fn check_stream(chunks: &[Chunk]) -> Vec<Value> {
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(
        seqs,
        (1..=chunks.len() as u64).collect::<Vec<_>>(),
        "{chunks:?}"
    );
    let (end, events) = chunks.split_last().expect("chunks");
    assert_eq!(end.kind, "end", "{chunks:?}");
    // The task's own numbers follow on from the snapshot's, one by one.
    let numbers: Vec<u64> = events
        .iter()
        .map(|c| c.event_seq.expect("A2A-Event-Seq on every event"))
        .collect();
    let from = numbers[0];
    assert_eq!(
        numbers,
        (from..from + numbers.len() as u64).collect::<Vec<_>>(),
        "{chunks:?}"
    );
    assert!(events.iter().all(|c| c.kind == "event"), "{chunks:?}");
    let events: Vec<Value> = events.iter().map(|c| c.body.clone()).collect();
    assert!(
        events[0].get("task").is_some(),
        "snapshot first: {events:?}"
    );
    let terminal: Vec<usize> = (0..events.len())
        .filter(|i| event_state(&events[*i]).is_some_and(is_terminal))
        .collect();
    assert_eq!(
        terminal,
        vec![events.len() - 1],
        "one terminal event, last: {events:?}"
    );
    events
}
