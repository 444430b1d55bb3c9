//! The space daemon in space containers (issue 18), on the real Docker engine and a real
//! nats-server: the daemon is the container's init with no token in sight, `containers.exec`
//! goes through it with the engine path's result shape (the path is read from the
//! `$SRV.STATS` counters, so a test passing on the engine's path by accident fails here), its
//! timeout kills everything the command started, streaming keeps its format, a request naming
//! a user and a space whose daemon cannot reach the bus take the engine's path, a daemon the
//! workload kills is restarted while execs keep working, and a daemon token taken from a
//! container serves nothing of another space.
//!
//! Needs the static daemon (`just spaced`); with `TETHER_TEST_SPACE_DAEMON=off` these tests
//! have nothing to test and return at once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Waiting for the daemon's token and connection (a container start, a token request, a
/// connect); bounds a hang, measures nothing.
const WAIT: Duration = Duration::from_secs(60);

/// The exec counters in the orchestrator's `$SRV.STATS` (`containers-exec` data).
async fn counters(f: &Fleet) -> (u64, u64, u64) {
    let d = endpoint_stats(f, "containers-exec").await;
    (
        num(&d["exec_daemon"]),
        num(&d["exec_engine"]),
        num(&d["exec_engine_fallback"]),
    )
}

/// `containers.exec` of `argv` as root (the engine's path: a request naming a user).
async fn as_root(f: &Fleet, t: &str, argv: &[&str]) -> Value {
    f.exec(t, json!({"command": argv, "user": "0"}))
        .await
        .unwrap_or_else(|p| panic!("{argv:?} as root: {p:?}"))
}

/// The daemon's token, read in the container as root.
async fn stolen_token(f: &Fleet, t: &str) -> String {
    let r = as_root(f, t, &["cat", "/run/tether/daemon-token"]).await;
    r["stdout"].as_str().expect("token").trim().to_string()
}

/// A fleet, a space and its agent's token, once the space's daemon serves.
async fn served() -> (Fleet, String, String) {
    let (f, space, t, _) = space_with(json!({})).await;
    daemon_serves(&f, &t).await;
    (f, space, t)
}

/// A fleet, a space, its agent's token and its container (made with `extra`).
async fn space_with(extra: Value) -> (Fleet, String, String, Value) {
    let f = fleet().await;
    let space = unique("s");
    let t = f.agent(&unique("a"), &space, SCOPES).await;
    let info = f.create_space(&t, extra).await;
    (f, space, t, info)
}

/// Waits until the daemon's token is in the container.
async fn token_delivered(f: &Fleet, t: &str) {
    eventually(WAIT, "the daemon's token is delivered", || async {
        let r = as_root(f, t, &["test", "-s", "/run/tether/daemon-token"]).await;
        (r["exit_code"] == 0).then_some(())
    })
    .await;
}

fn skip() -> bool {
    !tether_testkit::orchestrator::space_daemon_on()
}

/// Waits until an exec of `true` in the caller's space takes the daemon's path.
async fn daemon_serves(f: &Fleet, t: &str) {
    eventually(WAIT, "an exec through the daemon", || async {
        let (before, _, _) = counters(f).await;
        f.exec(t, json!({"command": ["true"]})).await.ok()?;
        let (after, _, _) = counters(f).await;
        (after > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn exec_goes_through_the_daemon_with_the_engines_result_shape() {
    if skip() {
        return;
    }
    let (f, _, t, info) = space_with(json!({})).await;
    let id = info["container_id"].as_str().expect("id").to_string();
    assert!(
        info["labels"]["tether.daemon"]
            .as_str()
            .is_some_and(|v| v.starts_with("tether-spaced-")),
        "{info}"
    );
    let entry = docker(&[
        "inspect",
        "-f",
        "{{json .Config.Entrypoint}} {{.HostConfig.Init}}",
        &id,
    ]);
    assert!(
        entry.starts_with(r#"["/.tether-spaced/tether-spaced","--","sh","-c""#),
        "{entry}"
    );
    assert!(entry.ends_with(" false"), "the daemon is the init: {entry}");
    // The create answered once the daemon serves: the very first exec takes its path, with
    // the result the engine's path gives.
    let (d0, e0, _) = counters(&f).await;
    let r = f
        .exec(&t, json!({"command": "echo hi; echo err >&2; exit 3"}))
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["stdout"], "hi\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["container_id"], id.as_str());
    assert_eq!(num(&r["output_bytes"]), 7);
    for k in ["truncated", "timed_out", "oom_killed"] {
        assert!(r[k] == false || r[k].is_null(), "{k}: {r}");
    }
    let env = f
        .exec(
            &t,
            json!({"command": ["sh", "-c", "echo $A; pwd"], "env": {"A": "b"}, "workdir": "/tmp"}),
        )
        .await
        .expect("exec");
    assert_eq!(env["stdout"], "b\n/tmp\n", "{env}");
    let (d1, e1, _) = counters(&f).await;
    assert_eq!((d1 - d0, e1 - e0), (2, 0), "both through the daemon");

    // The token is a file, root's alone, and never in the engine's view of the container.
    let token = stolen_token(&f, &t).await;
    assert!(token.len() > 20, "no token: {token:?}");
    let inspect = docker(&["inspect", &id]);
    assert!(!inspect.contains(&token), "the token is in docker inspect");
    assert!(inspect.contains("TETHER_DAEMON_TOKEN_FILE=/run/tether/daemon-token"));
    let (d2, e2, _) = counters(&f).await;
    assert_eq!(
        (d2 - d1, e2 - e1),
        (0, 1),
        "a request naming a user takes the engine"
    );
    let mode = as_root(
        &f,
        &t,
        &["stat", "-L", "-c", "%a %u", "/run/tether/daemon-token"],
    )
    .await;
    assert_eq!(mode["stdout"], "400 0\n", "{mode}");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_tree_and_streams_keep_their_format() {
    if skip() {
        return;
    }
    let (f, _, t) = served().await;
    let (d0, e0, _) = counters(&f).await;

    let r = f
        .exec(
            &t,
            json!({"command": ["sh", "-c", "sleep 100 & sleep 100 & wait"], "timeout_seconds": 1}),
        )
        .await
        .expect("exec");
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["exit_code"], 137, "{r}");
    let ps = f
        .exec(&t, json!({"command": ["ps", "-o", "pid,args"]}))
        .await
        .expect("ps");
    let out = ps["stdout"].as_str().expect("ps output");
    assert!(out.contains("tether-spaced"), "ps works: {out}");
    // (The idle command's own `sleep 3600` is the container's main workload.)
    assert!(!out.contains("sleep 100"), "a sleep survived: {out}");

    let inbox = f.c.new_inbox();
    let mut sub = f.c.subscribe(inbox.clone()).await.expect("sub");
    let r = f
        .exec(
            &t,
            json!({"command": "for i in 1 2 3; do echo line$i; sleep 0.1; done; echo err >&2; exit 4",
                   "stream": true, "stream_subject": inbox}),
        )
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "line1\nline2\nline3\n");
    let s = read_stream(&mut sub).await;
    assert_eq!(s.exit_code, "4");
    assert_eq!(
        (s.stdout.as_str(), s.stderr.as_str()),
        ("line1\nline2\nline3\n", "err\n")
    );
    assert!(
        s.seqs.windows(2).all(|w| w[1] == w[0] + 1) && s.seqs[0] == 1,
        "{:?}",
        s.seqs
    );
    let (d1, e1, _) = counters(&f).await;
    assert_eq!((d1 - d0, e1 - e0), (3, 0), "all three through the daemon");
}

#[tokio::test]
async fn a_daemon_off_the_bus_falls_back_to_the_engine() {
    if skip() {
        return;
    }
    // No network: the daemon runs as the init but never reaches the bus.
    let (f, _, t, _) = space_with(json!({"network_mode": "none"})).await;
    // Once its token is there, the exec asks the daemon first.
    token_delivered(&f, &t).await;
    let (d0, e0, fb0) = counters(&f).await;
    let r = f
        .exec(&t, json!({"command": "echo via engine"}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "via engine\n", "{r}");
    assert_eq!(r["exit_code"], 0);
    let (d1, e1, fb1) = counters(&f).await;
    assert_eq!(
        (d1 - d0, e1 - e0, fb1 - fb0),
        (0, 1, 1),
        "an engine fallback"
    );
}

/// The pid of the daemon's exec server (`spaced-exec`, a child of the init), asked as root
/// through the engine's path; `None` while there is none.
async fn exec_server(f: &Fleet, t: &str) -> Option<String> {
    let r = as_root(
        f,
        t,
        &[
            "sh",
            "-c",
            "for p in $(cat /proc/1/task/1/children); do [ \"$(cat /proc/$p/comm)\" = spaced-exec ] && echo $p; done; true",
        ],
    )
    .await;
    let pid = r["stdout"].as_str().unwrap_or_default().trim().to_string();
    (!pid.is_empty()).then_some(pid)
}

#[tokio::test]
async fn a_killed_daemon_is_restarted_and_exec_never_fails_meanwhile() {
    if skip() {
        return;
    }
    // What a workload can do to its daemon: the init (PID 1) ignores a SIGKILL from inside its
    // namespace, the exec server does not.
    let (f, _, t) = served().await;
    let old = exec_server(&f, &t).await.expect("an exec server");
    let killed = as_root(&f, &t, &["kill", "-9", &old]).await;
    assert_eq!(killed["exit_code"], 0, "{killed}");
    // Whichever path takes them (the engine's while no daemon answers), execs keep working.
    for i in 0..5 {
        let r = f
            .exec(&t, json!({"command": format!("echo after-{i}")}))
            .await
            .expect("an exec right after the kill");
        assert_eq!(r["stdout"], format!("after-{i}\n"), "{r}");
    }
    let new = eventually(WAIT, "a new exec server", || async {
        exec_server(&f, &t).await.filter(|p| *p != old)
    })
    .await;
    assert_ne!(new, old);
    // And the daemon's path serves again.
    daemon_serves(&f, &t).await;
}

#[tokio::test]
async fn a_stolen_daemon_token_serves_nothing_of_another_space() {
    if skip() {
        return;
    }
    let (f, space, t) = served().await;
    let token = stolen_token(&f, &t).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = async_nats::ConnectOptions::with_token(token)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(f.nats.plain_url())
        .await
        .expect("the token connects");
    // Reads the next permissions violation the server reports (none within 10 s: `None`).
    let mut violation = async || loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(async_nats::Event::ServerError(e)))
                if e.to_string()
                    .to_lowercase()
                    .contains("permissions violation") =>
            {
                return Some(e.to_string());
            }
            Ok(Some(_)) => {}
            _ => return None,
        }
    };

    // Its own exec subject: allowed (the control: the checks below can tell).
    let _own = c
        .subscribe(format!("spaces.{space}.daemon.exec"))
        .await
        .expect("subscribe");
    c.flush().await.expect("flush");

    let other = unique("other");
    let _sub = c
        .subscribe(format!("spaces.{other}.daemon.exec"))
        .await
        .expect("subscribe call");
    let v = violation()
        .await
        .expect("subscribing to another space is refused");
    assert!(v.contains(&other), "{v}");
    assert!(!v.contains(&space), "its own subject was refused: {v}");

    for subject in [
        format!("spaces.{other}.daemon.exec"),
        format!("spaces.{space}.daemon.exec"),
        "containers.exec".to_string(),
    ] {
        c.publish(subject.clone(), "{}".into())
            .await
            .expect("publish call");
        let v = violation()
            .await
            .unwrap_or_else(|| panic!("publishing on {subject} is allowed"));
        assert!(v.contains(&subject), "{v}");
    }

    let js = async_nats::jetstream::new(c.clone());
    let kv = tokio::time::timeout(Duration::from_secs(10), js.get_key_value("tether_spaces")).await;
    assert!(
        !matches!(kv, Ok(Ok(_))),
        "the daemon's token opened a KV bucket"
    );
}

#[tokio::test]
async fn a_restarted_orchestrator_renews_its_daemons_tokens_from_the_labels() {
    if skip() {
        return;
    }
    let (mut f, space, t) = served().await;
    let before = stolen_token(&f, &t).await;
    stop_orchestrator(&mut f).await;
    let bus = f.node_bus(tether_testkit::NodeKind::Orchestrator);
    f.orch = Some(start_orchestrator(&bus, orch_config(&f.host_id)).await);
    // The new node knows the container only from its labels: it gives the daemon a fresh
    // token (a new `jti`), and exec takes the daemon's path again.
    eventually(WAIT, "a fresh token after the restart", || async {
        let now = stolen_token(&f, &t).await;
        let jti = |tok: &str| tether_testkit::unverified_claims(tok)["jti"].clone();
        (jti(&now) != jti(&before)).then_some(())
    })
    .await;
    daemon_serves(&f, &t).await;
    let r = f
        .exec(&t, json!({"command": ["echo", &space]}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], format!("{space}\n"));
}

/// The busybox test image with `USER nobody` (the engine's cache makes a rebuild cheap).
fn nobody_image(base: &str) -> String {
    use std::io::Write;
    let tag = "tether-test/busybox-nobody:latest";
    let mut child = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker build");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("FROM {base}\nUSER nobody\n").as_bytes())
        .expect("write the Dockerfile");
    assert!(
        child.wait().expect("docker build").success(),
        "docker build {tag}"
    );
    tag.to_string()
}

#[tokio::test]
async fn an_image_with_a_named_user_runs_its_daemon_and_commands_as_that_user() {
    if skip() {
        return;
    }
    let f = fleet().await;
    let t = f.agent(&unique("a"), &unique("s"), SCOPES).await;
    let image = nobody_image(&f.image);
    f.create_space(&t, json!({"image": image})).await;
    let (d0, _, _) = counters(&f).await;
    let r = f
        .exec(&t, json!({"command": ["id", "-u"]}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"], "65534\n", "{r}");
    let (d1, _, _) = counters(&f).await;
    assert_eq!(
        d1 - d0,
        1,
        "through the daemon, which reads its token as `nobody`"
    );
    let st = as_root(
        &f,
        &t,
        &["stat", "-L", "-c", "%a %u", "/run/tether/daemon-token"],
    )
    .await;
    assert_eq!(st["stdout"], "400 65534\n", "{st}");
}

/// How a stand-in daemon answers (a container's daemon is untrusted: it may say anything).
#[derive(Clone, Copy)]
enum Lie {
    /// `started`, then a message out of sequence.
    BreakAfterStart,
    /// An error instead of `started`: nothing ran.
    RefuseFirst,
    /// `started`, 64 KiB of stdout in one chunk, a consistent `exit` claiming little output.
    Flood,
}

/// Answers every exec request of `space` as `lie` says, on the test's own connection.
async fn stand_in(f: &Fleet, space: &str, lie: Lie) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    use tether_space_daemon::reply::{EXIT, SEQ, STARTED, STDOUT, STREAM};
    let mut sub =
        f.c.subscribe(format!("spaces.{space}.daemon.exec"))
            .await
            .expect("subscribe");
    f.c.flush().await.expect("flush");
    let c = f.c.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let send = |seq: u32, kind: &str, body: Vec<u8>| {
                let mut h = async_nats::HeaderMap::new();
                h.insert(SEQ, seq.to_string().as_str());
                h.insert(STREAM, kind);
                let (c, reply) = (c.clone(), reply.clone());
                async move {
                    c.publish_with_headers(reply, h, body.into())
                        .await
                        .expect("publish");
                }
            };
            let exit = |chunks: u32| {
                serde_json::to_vec(&tether_proto::DaemonExecExit {
                    exit_code: 0,
                    chunks,
                    stdout_bytes: 3,
                    ..Default::default()
                })
                .expect("json")
            };
            match lie {
                Lie::BreakAfterStart => {
                    send(0, STARTED, br#"{"pid":7}"#.to_vec()).await;
                    send(5, STDOUT, b"x".to_vec()).await;
                }
                Lie::RefuseFirst => {
                    let r = tether_space_daemon::reply::Refusal::new(429, "busy");
                    let (h, body) = r.message();
                    c.publish_with_headers(reply, h, body)
                        .await
                        .expect("publish");
                }
                Lie::Flood => {
                    send(0, STARTED, br#"{"pid":7}"#.to_vec()).await;
                    send(1, STDOUT, vec![b'a'; 64 * 1024]).await;
                    send(2, EXIT, exit(1)).await;
                }
            }
        }
    })
}

#[tokio::test]
async fn what_a_daemon_says_is_untrusted_and_nothing_runs_twice() {
    if skip() {
        return;
    }
    // The real daemon never reaches the bus (no network); a stand-in answers for it.
    let (f, space, t, _) = space_with(json!({"network_mode": "none"})).await;
    token_delivered(&f, &t).await;
    let ran = |name: &str| {
        let (f, t, name) = (&f, &t, name.to_string());
        async move {
            let r = as_root(f, t, &["test", "-e", &format!("/tmp/{name}")]).await;
            r["exit_code"] == 0
        }
    };

    // A stream that breaks after `started`: 502, and the engine does not run it again.
    let liar = stand_in(&f, &space, Lie::BreakAfterStart).await;
    let p = f
        .exec(&t, json!({"command": ["touch", "/tmp/broken"]}))
        .await
        .expect_err("a broken stream is an error");
    assert_eq!(p.status, 502, "{p:?}");
    assert!(p.detail.contains("stream broke"), "{p:?}");
    assert!(!ran("broken").await, "the command ran on the engine too");
    liar.abort();

    // A refusal before `started`: nothing ran there, so the engine runs it (a fallback).
    let liar = stand_in(&f, &space, Lie::RefuseFirst).await;
    let (_, _, fb0) = counters(&f).await;
    let r = f
        .exec(&t, json!({"command": ["touch", "/tmp/refused"]}))
        .await
        .expect("exec");
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(ran("refused").await);
    let (_, _, fb1) = counters(&f).await;
    assert_eq!(fb1 - fb0, 1);
    liar.abort();

    // More output than the request's cap: kept within it, and said so.
    let liar = stand_in(&f, &space, Lie::Flood).await;
    let r = f
        .exec(&t, json!({"command": ["true"], "max_output_bytes": 1000}))
        .await
        .expect("exec");
    assert_eq!(r["stdout"].as_str().map(str::len), Some(1000), "{r}");
    assert_eq!(r["truncated"], true);
    assert_eq!(
        num(&r["output_bytes"]),
        64 * 1024,
        "the bytes seen, not the claim"
    );
    liar.abort();
}
