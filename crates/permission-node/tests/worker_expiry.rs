//! A long-running worker across token expiries (issue 14): the worker holds tokens of a few
//! seconds, renewed in its token file by a refresher; the server closes its connection at each
//! token's expiry, and the shipped client ([`tether_bus::connect::options`], which reads the
//! file again at every reconnect) comes back with the renewed one. Through all of it the
//! worker pulls its work through the gateway's work endpoints and loses none of it.
//!
//! The A2A gateway does not exist yet: a stand-in node (as the admin) serves
//! `a2a.<agent>.work.next` and `a2a.<agent>.work.done` and keeps the record.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Event, ServerError};
use serde_json::{Value, json};
use tether_auth::{Scope, SigningKey};
use tether_bus::{BusConfig, Endpoint, Node, Problem, RawRequest, Reply};
use tether_testkit::{Fleet, connect_with_events, eventually, sign_token};

const AGENT: &str = "worker-w";
const SPACE: &str = "space-w";
/// Items the worker does (at [`WORK`] each: longer than four token lifetimes).
const ITEMS: u64 = 40;
/// How long the worker works on one item.
const WORK: Duration = Duration::from_millis(300);
/// Token lifetime, seconds.
const LIFETIME: u64 = 3;

/// The stand-in gateway's record.
#[derive(Default)]
struct Ledger {
    /// `next` requests served.
    handed: u32,
    /// `done` requests received, per item (a retried one counts again).
    done_requests: BTreeMap<u64, u32>,
    /// Items completed, in order, each once.
    completed: Vec<u64>,
}

fn item(req: &RawRequest) -> Result<(u64, Value), Problem> {
    let v: Value = serde_json::from_slice(&req.payload)
        .map_err(|e| Problem::new(400, format!("not JSON: {e}")))?;
    let k = v["k"]
        .as_u64()
        .ok_or_else(|| Problem::new(400, "no item number `k`"))?;
    Ok((k, v))
}

fn reply(v: Value) -> Result<Reply, Problem> {
    Ok(Reply::new(v.to_string(), "application/json"))
}

/// `next {k}` hands out item k (once k-1 is done); `done {k, result}` completes it, once.
async fn stand_in(bus: BusConfig, ledger: Arc<Mutex<Ledger>>) -> tether_bus::NodeHandle {
    let l = ledger.clone();
    let next = Endpoint::raw(format!("a2a.{AGENT}.work.next"), move |req: RawRequest| {
        let l = l.clone();
        async move {
            let (k, _) = item(&req)?;
            let mut l = l.lock().map_err(|_| Problem::new(500, "poisoned"))?;
            l.handed += 1;
            if k > l.completed.len() as u64 {
                return Err(Problem::new(409, format!("item {k} asked before its turn")));
            }
            reply(json!({"k": k, "input": k}))
        }
    });
    let done = Endpoint::raw(format!("a2a.{AGENT}.work.done"), move |req: RawRequest| {
        let l = ledger.clone();
        async move {
            let (k, v) = item(&req)?;
            if v["result"].as_u64() != Some(k * k) {
                return Err(Problem::new(400, format!("wrong result for {k}: {v}")));
            }
            let mut l = l.lock().map_err(|_| Problem::new(500, "poisoned"))?;
            *l.done_requests.entry(k).or_default() += 1;
            let first = !l.completed.contains(&k);
            if first {
                if k != l.completed.len() as u64 {
                    return Err(Problem::new(409, format!("item {k} done out of order")));
                }
                l.completed.push(k);
            }
            reply(json!({"k": k, "first": first}))
        }
    });
    Node::new("a2a-gateway-stand-in", "0.0.0")
        .endpoint(next)
        .endpoint(done)
        .start(bus)
        .await
        .expect("the stand-in gateway starts")
}

/// Tokens written: (when, their `exp`).
type Written = Mutex<Vec<(SystemTime, i64)>>;

/// The `exp` of a token (read, not verified).
fn exp_of(token: &str) -> i64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    let v: Value = serde_json::from_slice(&raw).expect("claims");
    v["exp"].as_i64().expect("exp")
}

/// Writes a fresh token into `path` atomically (temporary file, then rename).
fn renew(key: &SigningKey, path: &Path, written: &Written) {
    let token = sign_token(
        key,
        AGENT,
        SPACE,
        [Scope::A2aServe].into_iter().collect(),
        LIFETIME,
    )
    .expect("sign");
    let exp = exp_of(&token);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::rename(&tmp, path).expect("rename token");
    written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((SystemTime::now(), exp));
}

/// Renews the token file every second, forever.
async fn refresher(key: &SigningKey, path: &Path, written: &Written) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        renew(key, path, written);
    }
}

/// One work request, retried (after a failure the connection's reconnect caused) until
/// answered; panics on a Problem or past `until`. Returns the answer and the retries.
async fn ask(c: &async_nats::Client, verb: &str, body: Value, until: Instant) -> (Value, u32) {
    let subject = format!("a2a.{AGENT}.work.{verb}");
    let mut retries = 0;
    loop {
        assert!(
            Instant::now() < until,
            "{subject} {body} unanswered after {retries} retries"
        );
        let req = async_nats::client::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(Duration::from_secs(2)));
        match c.send_request(subject.clone(), req).await {
            Ok(m) => {
                if let Some(p) = Problem::from_reply(m.headers.as_ref(), &m.payload) {
                    panic!("{subject} {body}: {p:?}");
                }
                let v = serde_json::from_slice(&m.payload).expect("JSON answer");
                return (v, retries);
            }
            Err(e) => {
                retries += 1;
                eprintln!("{subject} {body}: {e}; retrying");
                // A failed request is not retried in a busy loop while the client reconnects.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connection events as they happened: (instant, wall clock, event).
type Timeline = Arc<Mutex<Vec<(Instant, SystemTime, Event)>>>;

#[tokio::test]
async fn a_worker_keeps_pulling_work_across_token_expiries() {
    let f = Fleet::start().await.expect("fleet");
    f.agent(AGENT, SPACE, &["a2a:serve"]).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let gateway = stand_in(f.bus(), ledger.clone()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    let written = Written::default();
    renew(&f.key, &path, &written);
    let cfg = BusConfig {
        nats_url: f.nats.plain_url(),
        nats_token_file: Some(path.clone()),
        ..Default::default()
    };
    let (c, mut events) = connect_with_events(&cfg, "worker")
        .await
        .expect("the worker connects with its token file");
    let timeline: Timeline = Arc::default();
    let t = timeline.clone();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.push((Instant::now(), SystemTime::now(), e));
        }
    });

    let started = Instant::now();
    let until = started + Duration::from_secs(120);
    let work = async {
        let mut retries = 0;
        for k in 0..ITEMS {
            let (got, r1) = ask(&c, "next", json!({"k": k}), until).await;
            let input = got["input"].as_u64().expect("input");
            tokio::time::sleep(WORK).await;
            let (_, r2) = ask(&c, "done", json!({"k": k, "result": input * input}), until).await;
            retries += r1 + r2;
        }
        retries
    };
    // The last reconnect may still be under way when the work is done.
    let reconnected = |t: &Timeline| {
        let t = t.lock().unwrap_or_else(|p| p.into_inner());
        let first_drop = t
            .iter()
            .position(|(_, _, e)| matches!(e, Event::Disconnected));
        first_drop.map_or(0, |i| {
            t[i..]
                .iter()
                .filter(|(_, _, e)| matches!(e, Event::Connected))
                .count()
        })
    };
    // The token stays renewed until the worker is back from its third close (the last may
    // still be under way when the work is done).
    let work_then_reconnects = async {
        let r = work.await;
        eventually(Duration::from_secs(20), "3 reconnects", || async {
            (reconnected(&timeline) >= 3).then_some(())
        })
        .await;
        r
    };
    let retries = tokio::select! {
        r = work_then_reconnects => r,
        _ = refresher(&f.key, &path, &written) => unreachable!("the refresher never ends"),
    };
    let worked = started.elapsed();
    assert!(worked >= Duration::from_secs(10), "{worked:?}");

    let expired = |t: &[(Instant, SystemTime, Event)]| {
        t.iter()
            .filter(|(_, _, e)| {
                matches!(e, Event::ServerError(ServerError::Other(s))
                    if s.to_lowercase().contains("expired"))
            })
            .count()
    };
    let l = std::mem::take(&mut *ledger.lock().unwrap_or_else(|p| p.into_inner()));
    assert_eq!(
        l.completed,
        (0..ITEMS).collect::<Vec<_>>(),
        "every item done exactly once, in order"
    );
    let t = std::mem::take(&mut *timeline.lock().unwrap_or_else(|p| p.into_inner()));
    let drops: Vec<&(Instant, SystemTime, Event)> = t
        .iter()
        .filter(|(_, _, e)| matches!(e, Event::Disconnected))
        .collect();
    assert!(drops.len() >= 3, "disconnects: {}", drops.len());
    assert!(
        expired(&t) >= 3,
        "the server closed the connection at the token's expiry: {:?}",
        t.iter().map(|(_, _, e)| e.to_string()).collect::<Vec<_>>()
    );
    // Figures: how long after its token's `exp` each connection was closed (the token is the
    // newest one written before the connect), and how long the reconnect took.
    let written = std::mem::take(&mut *written.lock().unwrap_or_else(|p| p.into_inner()));
    let secs = |w: &SystemTime| {
        w.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default()
    };
    let mut lines = Vec::new();
    let mut connected_at = None;
    for (i, (at, wall, e)) in t.iter().enumerate() {
        match e {
            Event::Connected => connected_at = Some(*wall),
            Event::Disconnected => {
                let exp = connected_at
                    .and_then(|c| written.iter().rev().find(|(w, _)| *w <= c))
                    .map(|(_, exp)| *exp as f64);
                let late = exp.map_or("?".into(), |x| format!("{:.0} ms", (secs(wall) - x) * 1e3));
                let back = t[i..]
                    .iter()
                    .find(|(_, _, e)| matches!(e, Event::Connected))
                    .map_or("-".into(), |(b, _, _)| format!("{:?}", *b - *at));
                lines.push(format!("closed {late} after exp, back after {back}"));
            }
            _ => {}
        }
    }
    let done_requests: u32 = l.done_requests.values().sum();
    eprintln!(
        "{ITEMS} items in {worked:?}: {} next and {done_requests} done requests, {retries} retried; \
         {} closes at expiry: {lines:#?}",
        l.handed,
        drops.len()
    );
    gateway.shutdown().await.expect("stand-in stops");
}
