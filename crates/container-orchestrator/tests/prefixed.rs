//! A whole fleet under a deployment's subject prefix, on the real Docker engine and a real
//! nats-server with the auth callout: the permission node, its callout and the orchestrator
//! all serve `pfx.<subject>` (their node users' permissions prefixed as the deployment's
//! server config has them), an agent creates its space through `pfx.containers.create`,
//! `pfx.containers.exec` runs through the space daemon (its path read from the `$SRV.STATS`
//! counters, which are not prefixed: the NATS micro protocol's subjects are fixed), the daemon
//! connects with its `tokens.daemon` token and serves exactly `pfx.spaces.<space>.daemon.exec`,
//! and nothing answers the unprefixed subjects.
//!
//! Needs the static daemon (`just spaced`); with `TETHER_TEST_SPACE_DAEMON=off` these tests
//! have nothing to test and return at once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The deployment's subject prefix.
const PREFIX: &str = "pfx";

/// How long a probe of the daemon's subject waits for its answer; bounds a hang.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

fn skip() -> bool {
    !tether_testkit::orchestrator::space_daemon_on()
}

/// The exec counters (daemon, engine) in the orchestrator's `$SRV.STATS`.
async fn counters(f: &Fleet) -> (u64, u64) {
    let d = endpoint_stats(f, "containers-exec").await;
    (num(&d["exec_daemon"]), num(&d["exec_engine"]))
}

/// An empty-body request on `subject` as the admin client: `Some` with the reply's problem
/// status (a daemon refuses an empty request), or `None` when nothing serves `subject`.
async fn probe(f: &Fleet, subject: &str) -> Option<u16> {
    let req = async_nats::Request::new()
        .payload(bytes::Bytes::new())
        .timeout(Some(PROBE_TIMEOUT));
    match f.c.send_request(subject.to_string(), req).await {
        Ok(m) => {
            let p = Problem::from_reply(m.headers.as_ref(), &m.payload).unwrap_or_else(|| {
                panic!(
                    "{subject} answered an empty request without a problem: {}",
                    String::from_utf8_lossy(&m.payload)
                )
            });
            Some(p.status)
        }
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => None,
        Err(e) => panic!("probe {subject}: {e}"),
    }
}

/// A fleet under [`PREFIX`] with an orchestrator, a space, and its agent's token (registered
/// through `pfx.agents.register` and `pfx.tokens.issue`).
async fn fleet_and_agent() -> (Fleet, String, String) {
    let f = Fleet::start_under(Some(PREFIX), "p", true, |_| {})
        .await
        .expect("fleet under a prefix");
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    (f, space, t)
}

#[tokio::test]
async fn a_fleet_under_a_prefix_execs_through_the_space_daemon() {
    if skip() {
        return;
    }
    let (f, space, t) = fleet_and_agent().await;

    // Nothing serves the unprefixed service subject.
    let p = call(
        &f.c,
        "containers.create",
        json!({"image": f.image}),
        Some(&t),
    )
    .await
    .expect_err("no orchestrator on the unprefixed subject");
    assert_eq!(p.status, 503, "{p:?}");
    assert!(f.engine_containers().is_empty(), "nothing made");

    // `pfx.containers.create`: the space container, with the daemon as its init.
    let info = f.create_space(&t, json!({})).await;
    assert!(
        info["labels"]["tether.daemon"]
            .as_str()
            .is_some_and(|v| v.starts_with("tether-spaced-")),
        "{info}"
    );
    let id = info["container_id"].as_str().expect("id");
    let env = docker(&["inspect", "-f", "{{json .Config.Env}}", id]);
    assert!(
        env.contains(&format!("\"TETHER_DAEMON_SUBJECT_PREFIX={PREFIX}\"")),
        "{env}"
    );

    // The create answered once the daemon serves: the first `pfx.containers.exec` takes its
    // path, with the command's output.
    let (d0, e0) = counters(&f).await;
    let r = f
        .exec(
            &t,
            json!({"command": "echo $((6 * 7)); echo err >&2; exit 5"}),
        )
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 5, "{r}");
    assert_eq!(r["stdout"], "42\n", "{r}");
    assert_eq!(r["stderr"], "err\n", "{r}");
    assert_eq!(r["container_id"], id, "{r}");
    let (d1, e1) = counters(&f).await;
    assert_eq!((d1 - d0, e1 - e0), (1, 0), "through the daemon: {r}");

    // The daemon serves its prefixed subject (refusing an empty request) and nothing serves
    // the unprefixed one.
    let served = format!("{PREFIX}.spaces.{space}.daemon.exec");
    assert_eq!(probe(&f, &served).await, Some(400), "{served}");
    let bare = format!("spaces.{space}.daemon.exec");
    assert_eq!(probe(&f, &bare).await, None, "{bare} has a responder");
}

#[tokio::test]
async fn an_agent_connected_through_the_callout_calls_under_the_prefix() {
    if skip() {
        return;
    }
    let (f, _, t) = fleet_and_agent().await;
    f.create_space(&t, json!({})).await;
    // The agent's own connection: the callout grants its services under the prefix, and
    // replies come to its (unprefixed) inbox.
    let ac = f
        .connect_as(&t)
        .await
        .expect("the callout admits the agent");
    let (d0, _) = counters(&f).await;
    let r = call(
        &ac,
        &format!("{PREFIX}.containers.exec"),
        json!({"command": ["echo", "from the agent"]}),
        Some(&t),
    )
    .await
    .expect("exec as the agent");
    assert_eq!(r["stdout"], "from the agent\n", "{r}");
    let (d1, _) = counters(&f).await;
    assert_eq!(d1 - d0, 1, "through the daemon: {r}");
}
