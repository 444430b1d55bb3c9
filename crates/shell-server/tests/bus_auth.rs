//! The bus as an attacker finds it (issue 14): agent B, connected with its own token, tries
//! everything a plain NATS connection allowed before authorization — listening to every
//! subject, to the nodes' queue group, to agent A's inbox; the JetStream API; reading and
//! writing every KV bucket by name; forging A's space events and replies — while agent A keeps
//! working through the shell-server and the orchestrator on the real Docker engine. The server
//! refuses each attempt with a permission violation, B sees none of A's traffic, nothing B
//! wrote lands anywhere, and both A's and B's own requests keep working.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Event, ServerError};
use common::*;
use futures::{FutureExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Every KV bucket of the fleet (permission node, orchestrator, shell-server).
const BUCKETS: &[&str] = &[
    "tether_keys",
    "tether_agents",
    "tether_revoked",
    "tether_spaces",
    "tether_hosts",
    "tether_workers",
    "tether_sessions",
    "tether_tool_results",
    "tether_shell_sessions",
];

/// The server errors reported on a connection, waited for by text.
struct Violations {
    events: UnboundedReceiver<Event>,
    seen: Vec<String>,
    disconnects: usize,
}

impl Violations {
    /// Waits until the server reported `Permissions Violation for <what> "<subject>"`.
    async fn expect(&mut self, what: &str, subject: &str, until: Instant) {
        let needle = format!("Permissions Violation for {what} \"{subject}\"");
        loop {
            if self.seen.iter().any(|e| e.trim() == needle) {
                return;
            }
            match tokio::time::timeout_at(until.into(), self.events.recv()).await {
                Ok(Some(Event::ServerError(ServerError::Other(e)))) => self.seen.push(e),
                Ok(Some(Event::Disconnected)) => self.disconnects += 1,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the attacker's event stream ended"),
                Err(_) => panic!(
                    "no `{needle}` reported by the server; reported: {:#?}",
                    self.seen
                ),
            }
        }
    }
}

/// The permission violations in the server's log that a connection other than the
/// attacker's caused (a node or agent A missing a permission it needs).
fn others_violations(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        // The attacker as 2.1x logs it (client name, then `TETHER/user:<id>`) and as 2.10 does
        // (`User "<id>"`).
        .filter(|l| {
            l.contains("Violation") && !l.contains(":attacker\"") && !l.contains("User \"atk-b\"")
        })
        .map(str::to_string)
        .collect()
}

/// Agent A's work while B attacks: `shell.exec` and `containers.exec` alternately on A's own
/// connection, each checked, until `stop` (at least `min` requests). Returns how many.
async fn a_works(
    a: async_nats::Client,
    token: String,
    stop: CancellationToken,
    min: usize,
    log: std::path::PathBuf,
) -> usize {
    let mut i = 0;
    while i < min || !stop.is_cancelled() {
        let subject = if i % 2 == 0 {
            "shell.exec"
        } else {
            "containers.exec"
        };
        let body = json!({"command": format!("echo a-{i}")});
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            call(&a, subject, body, Some(&token)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "A's {subject} #{i}: no reply in 30 s; violations in the server log: {:#?}",
                others_violations(&log)
            )
        })
        .unwrap_or_else(|p| panic!("A's {subject} #{i}: {p:?}"));
        assert_eq!(r["exit_code"], 0, "A's {subject} #{i}: {r}");
        assert_eq!(r["stdout"], format!("a-{i}\n"), "A's {subject} #{i}");
        i += 1;
    }
    i
}

/// The last sequence of each bucket's stream, as the admin sees it.
async fn last_sequences(js: &jetstream::Context) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for b in BUCKETS {
        let seq = match js.get_stream(format!("KV_{b}")).await {
            Ok(mut s) => s.info().await.unwrap().state.last_sequence,
            Err(_) => 0,
        };
        out.push((b.to_string(), seq));
    }
    out
}

#[tokio::test]
async fn an_agent_cannot_read_steal_or_write_what_is_not_its_own() {
    let f = fleet(true).await;
    let shell = f.shell(shell_config()).await;
    let scopes: Vec<&str> = SCOPES.iter().copied().chain(["events:read"]).collect();
    let (a_id, a_space) = ("atk-a", "atk-space-a");
    let (b_id, b_space) = ("atk-b", "atk-space-b");
    let ta = f.agent(a_id, a_space, &scopes).await;
    let tb = f.agent(b_id, b_space, &scopes).await;
    f.create_space(&ta, json!({})).await;
    f.create_space(&tb, json!({})).await;

    let js = jetstream::new(f.c.clone());
    let keys_kv = js.get_key_value("tether_keys").await.unwrap();
    let keys_before: Vec<String> =
        futures::TryStreamExt::try_collect(keys_kv.keys().await.unwrap())
            .await
            .unwrap();
    let binding_before = f.binding(a_space).await.expect("A's space binding");
    let seqs_before = last_sequences(&js).await;
    // The admin listens where B will try to forge A's space events.
    let mut a_events =
        f.c.subscribe(format!("events.containers.{a_space}"))
            .await
            .unwrap();
    f.c.flush().await.unwrap();

    let a = f.connect_as(&ta).await.expect("A connects");
    let (b, events) = tether_testkit::connect_with_events(
        &tether_bus::BusConfig {
            nats_url: f.nats.plain_url(),
            nats_token: Some(tether_bus::config::Secret::new(tb.clone())),
            ..Default::default()
        },
        "attacker",
    )
    .await
    .expect("B connects with its own token");
    let mut v = Violations {
        events,
        seen: Vec::new(),
        disconnects: 0,
    };

    let stop = CancellationToken::new();
    let worker = tokio::spawn(a_works(
        a.clone(),
        ta.clone(),
        stop.clone(),
        6,
        f.nats.log_path(),
    ));
    // A is under way before B starts.
    call(&a, "auth.keys", "{}", None)
        .await
        .expect("A reaches auth.keys");

    let started = Instant::now();
    let until = started + Duration::from_secs(30);
    // Listening: everything, the services, every inbox, A's inbox, the nodes' inboxes,
    // discovery, every event, A's space's events.
    let a_inbox = format!("_INBOX.{a_id}.>");
    let a_space_events = format!("events.containers.{a_space}");
    let plain_subs = [
        ">",
        "containers.>",
        "containers.exec",
        "shell.>",
        "_INBOX.>",
        "_INBOX.*.>",
        a_inbox.as_str(),
        "_INBOX_NODES.>",
        "$SRV.>",
        "$KV.>",
        "$JS.>",
        "events.>",
        a_space_events.as_str(),
    ];
    let mut subs = Vec::new();
    for s in plain_subs {
        subs.push((s.to_string(), b.subscribe(s.to_string()).await.unwrap()));
    }
    // Stealing: the nodes' own queue group on the services A uses.
    for s in ["containers.exec", "shell.exec"] {
        subs.push((
            format!("{s} (queue tether)"),
            b.queue_subscribe(s.to_string(), "tether".into())
                .await
                .unwrap(),
        ));
    }
    b.flush().await.unwrap();

    // Requests: the JetStream API, every bucket read (direct, message get, a consumer) and
    // written by name, destroying buckets, the scopes B lacks, the callout's own subject.
    let mut requests: Vec<(String, String)> = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.KV_tether_keys",
        "$JS.API.STREAM.PURGE.KV_tether_spaces",
        "$JS.API.STREAM.DELETE.KV_tether_revoked",
        "agents.register",
        "agents.revoke",
        "agents.list",
        "$SYS.REQ.USER.AUTH",
    ]
    .iter()
    .map(|s| (s.to_string(), "{}".to_string()))
    .collect();
    for bucket in BUCKETS {
        let key = match *bucket {
            "tether_spaces" => a_space.to_string(),
            "tether_agents" => a_id.to_string(),
            _ => "attacker".to_string(),
        };
        let stream = format!("KV_{bucket}");
        requests.extend([
            (
                format!("$KV.{bucket}.{key}"),
                format!(r#"{{"attacker":"{b_id}"}}"#),
            ),
            (format!("$KV.{bucket}.attacker"), "attacker".to_string()),
            (
                format!("$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{key}"),
                String::new(),
            ),
            (
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!(r#"{{"last_by_subj":"$KV.{bucket}.{key}"}}"#),
            ),
            (
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!(r#"{{"last_by_subj":"$KV.{bucket}.{key}"}}"#),
            ),
            (
                format!("$JS.API.CONSUMER.CREATE.{stream}"),
                "{}".to_string(),
            ),
        ]);
    }
    requests.sort();
    requests.dedup_by(|x, y| x.0 == y.0);
    let attempts = requests.iter().map(|(subject, body)| {
        let b = b.clone();
        async move {
            let req = async_nats::client::Request::new()
                .payload(body.clone().into())
                .timeout(Some(Duration::from_secs(3)));
            match b.send_request(subject.clone(), req).await {
                Ok(m) => panic!(
                    "B's request on {subject} was answered: {}",
                    String::from_utf8_lossy(&m.payload)
                ),
                Err(e) => assert_eq!(
                    e.kind(),
                    async_nats::RequestErrorKind::TimedOut,
                    "B's request on {subject}: {e}"
                ),
            }
        }
    });
    futures::future::join_all(attempts).await;
    // Forging: A's space events, a reply into A's inbox.
    let forged_reply = format!("_INBOX.{a_id}.forged.1");
    for s in [a_space_events.as_str(), forged_reply.as_str()] {
        b.publish(s.to_string(), "forged-by-b".into())
            .await
            .unwrap();
    }
    b.flush().await.unwrap();

    for s in plain_subs {
        v.expect("Subscription to", s, until).await;
    }
    for s in ["containers.exec", "shell.exec"] {
        v.expect(
            "Subscription to",
            &format!("{s}\" using queue \"tether"),
            until,
        )
        .await;
    }
    for (s, _) in &requests {
        v.expect("Publish to", s, until).await;
    }
    v.expect("Publish to", &a_space_events, until).await;
    v.expect("Publish to", &forged_reply, until).await;
    let attack = started.elapsed();

    stop.cancel();
    let served = worker.await.expect("A's worker");
    // Everything routed to B before this round trip has reached B's subscriptions.
    b.flush().await.unwrap();
    for (s, sub) in &mut subs {
        if let Some(Some(m)) = sub.next().now_or_never() {
            panic!(
                "B's subscription {s} received {}: {:?}",
                m.subject, m.payload
            );
        }
    }
    // Nothing of B's landed: A's space events carry no forgery, the keys bucket holds the
    // real key only, A's binding is unchanged, no bucket has a key `attacker`.
    f.c.flush().await.unwrap();
    while let Some(Some(m)) = a_events.next().now_or_never() {
        assert_ne!(&m.payload[..], b"forged-by-b", "B forged A's space event");
    }
    let keys_after: Vec<String> = futures::TryStreamExt::try_collect(keys_kv.keys().await.unwrap())
        .await
        .unwrap();
    assert_eq!(keys_after, keys_before, "the key bucket changed");
    assert_eq!(f.binding(a_space).await, Some(binding_before));
    for bucket in BUCKETS {
        if let Ok(kv) = js.get_key_value(*bucket).await {
            assert!(
                kv.entry("attacker").await.unwrap().is_none(),
                "B wrote {bucket}.attacker"
            );
        }
    }
    let agents = js.get_key_value("tether_agents").await.unwrap();
    let a_record = agents.get(a_id).await.unwrap().expect("A's record");
    assert!(
        !String::from_utf8_lossy(&a_record).contains("attacker"),
        "B overwrote A's record"
    );
    let seqs_after = last_sequences(&js).await;
    eprintln!("bucket sequences before {seqs_before:?} after {seqs_after:?}");
    for ((b, before), (_, after)) in seqs_before.iter().zip(&seqs_after) {
        if ["tether_keys", "tether_agents", "tether_revoked"].contains(&b.as_str()) {
            assert_eq!(before, after, "{b} changed during the attack");
        }
    }

    // The server refused nobody but the attacker.
    let others = others_violations(&f.nats.log_path());
    assert!(others.is_empty(), "violations by others: {others:#?}");

    // B was never thrown out, and its own requests still work.
    assert_eq!(v.disconnects, 0, "B was disconnected");
    let keys = call(&b, "auth.keys", "{}", None)
        .await
        .expect("B's auth.keys");
    assert!(keys.to_string().contains("keys"), "{keys}");
    let r = call(&b, "shell.exec", json!({"command": "echo b"}), Some(&tb))
        .await
        .expect("B's own shell.exec");
    assert_eq!(r["stdout"], "b\n", "{r}");
    eprintln!(
        "{} attempts refused in {attack:?} while A served {served} requests",
        plain_subs.len() + 2 + requests.len() + 2
    );
    shell.shutdown().await.unwrap();
}
