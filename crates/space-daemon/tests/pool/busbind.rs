//! Bind over the bus on the host against a real nats-server (one token, [`TOKEN`]): a pool
//! daemon with `TETHER_DAEMON_POOL_SPACE` answers only bind requests on the pool subject,
//! replies `{}` once the bound space is served, refuses a bad bind (400) or one whose token
//! the server refuses (503: the bind's token is the one used while the token file holds no
//! token for the bound space), and drops the pool subject when bound by either path.
//!
//! The server takes one token, so the pool token and the space token are the same here; the
//! choice between the file's and the bind's token is unit-tested (`busbind::pick_token`).

use async_nats::{HeaderMap, Message, StatusCode};
use tether_space_daemon::bind::{BIND_HEADER, BindRequest};
use tether_space_daemon::config::exec_subject;
use tether_space_daemon::reply;

use super::*;

/// A pool daemon on the pool pseudo-space it returns, its token file (the pool token) written
/// before it starts, as the orchestrator does; returns once the pool subject answers.
async fn bus_pool_daemon(nats: &NatsServer, client: &async_nats::Client) -> (Daemon, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_renamed(dir.path(), "token", TOKEN.as_bytes());
    let pool = format!("tether-pool-{}", &unique("x")[2..]);
    let d = pool_daemon_in(nats, dir, Some(&pool)).await;
    on_the_bus(client, &pool).await;
    (d, pool)
}

/// Waits until the pool subject answers anything (as the orchestrator's readiness probe).
async fn on_the_bus(client: &async_nats::Client, pool: &str) -> Message {
    eventually(
        WAIT,
        "the pool daemon answers on the pool subject",
        || async { probe(client, pool).await },
    )
    .await
}

/// An empty-body request on `pool`'s subject: `None` when nobody answers.
async fn probe(client: &async_nats::Client, pool: &str) -> Option<Message> {
    answer(client, pool, HeaderMap::new(), Vec::new()).await
}

/// A request on `pool`'s subject; `None` for no responders.
async fn answer(
    client: &async_nats::Client,
    pool: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Option<Message> {
    let req = client.request_with_headers(exec_subject(pool), headers, body.into());
    match tokio::time::timeout(WAIT, req)
        .await
        .expect("an answer in time")
    {
        Ok(m) => Some(m),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => None,
        Err(e) => panic!("request on {pool}: {e}"),
    }
}

/// Sends a bind request with `Tether-Bind: version` and `body`; the answer.
async fn bind_with(
    client: &async_nats::Client,
    pool: &str,
    version: &str,
    body: Vec<u8>,
) -> Message {
    let mut h = HeaderMap::new();
    h.insert(BIND_HEADER, version);
    answer(client, pool, h, body)
        .await
        .expect("the pool daemon answers")
}

/// A good bind of `space` with `env` (the server's token) and its answer.
async fn bind_to(client: &async_nats::Client, pool: &str, space: &str, env: &[&str]) -> Message {
    bind_with(client, pool, "1", bind_request(space, env, TOKEN)).await
}

fn bind_request(space: &str, env: &[&str], token: &str) -> Vec<u8> {
    let req = BindRequest {
        space: space.into(),
        env: env.iter().map(|e| e.to_string()).collect(),
        token: token.into(),
    };
    serde_json::to_vec(&req).expect("json")
}

/// The error reply's status and detail; panics on anything else.
fn refused(m: &Message) -> (u16, String) {
    let h = m.headers.as_ref().expect("error headers");
    assert_eq!(h.get(reply::STREAM).map(|v| v.as_str()), Some(reply::ERROR));
    let status = h
        .get(reply::SERVICE_ERROR_CODE)
        .and_then(|v| v.as_str().parse().ok())
        .expect("a status");
    let problem: tether_proto::Problem = serde_json::from_slice(&m.payload).expect("a problem");
    (status, problem.detail)
}

/// The success reply: `{}`, no headers.
fn bound(m: &Message) {
    assert!(
        m.headers.as_ref().is_none_or(|h| h.is_empty()),
        "headers: {:?}",
        m.headers
    );
    assert_eq!(m.status, None::<StatusCode>);
    assert_eq!(&m.payload[..], b"{}");
}

#[tokio::test]
async fn a_pool_daemon_refuses_a_probe_and_an_exec_and_serves_no_space() {
    let (nats, client) = server().await;
    let (d, pool) = bus_pool_daemon(&nats, &client).await;
    let (status, detail) = refused(&probe(&client, &pool).await.expect("an answer"));
    assert_eq!(status, 409);
    assert!(detail.contains("not bound to a space yet"), "{detail}");

    // An exec request on the pool subject is refused the same; nothing runs.
    let marker = dir(&d).join("ran");
    let exec = sh(&format!("touch {}", marker.display()));
    let m = answer(
        &client,
        &pool,
        HeaderMap::new(),
        serde_json::to_vec(&exec).expect("json"),
    )
    .await
    .expect("an answer");
    assert_eq!(refused(&m).0, 409);
    let r = client::exec(&client, &pool, &exec, WAIT).await;
    assert!(matches!(r, Err(Failure::Refused(409, _))), "{r:?}");
    assert!(!marker.exists(), "a command ran on the pool subject");
    not_served(&client, &d.space).await;
}

#[tokio::test]
async fn a_bind_over_the_bus_is_answered_once_the_space_is_served() {
    let (nats, client) = server().await;
    let (d, pool) = bus_pool_daemon(&nats, &client).await;
    let m = bind_with(
        &client,
        &pool,
        "1",
        bind_request(&d.space, &["POOL_GREETING=over the bus"], TOKEN),
    )
    .await;
    bound(&m);
    // No `ready` wait: the reply comes only once the space's subject is served.
    let o = client::exec(&client, &d.space, &sh("echo \"$POOL_GREETING\""), WAIT)
        .await
        .expect("served right after the bind reply");
    assert_eq!(o.stream("stdout"), b"over the bus\n");
    // The pool subject was dropped before the reply.
    assert!(
        probe(&client, &pool).await.is_none(),
        "the pool subject still answers"
    );
}

#[tokio::test]
async fn a_bad_bind_request_is_refused_and_a_good_one_then_binds() {
    let (nats, client) = server().await;
    let (d, pool) = bus_pool_daemon(&nats, &client).await;
    let unknown = serde_json::json!({"space": d.space, "env": [], "token": TOKEN, "extra": 1});
    for (version, body, status, says) in [
        ("1", bind_request("a.b", &[], TOKEN), 400, "space"),
        ("1", bind_request(&pool, &[], TOKEN), 400, "pool space"),
        ("1", unknown.to_string().into_bytes(), 400, "no other field"),
        ("1", bind_request(&d.space, &[], ""), 400, "token is empty"),
        (
            "1",
            bind_request(&d.space, &["1A=x"], TOKEN),
            400,
            "variable name",
        ),
        ("1", Vec::new(), 400, "no other field"),
        (
            "2",
            bind_request(&d.space, &[], TOKEN),
            400,
            "not a known version",
        ),
        // Well formed, but the server refuses its token: the bind's token is the one used.
        (
            "1",
            bind_request(&d.space, &[], "not-the-token"),
            503,
            "cannot connect",
        ),
    ] {
        let (got, detail) = refused(&bind_with(&client, &pool, version, body).await);
        assert_eq!(got, status, "{detail}");
        assert!(detail.contains(says), "{says}: {detail}");
        assert!(!detail.contains("not-the-token"), "the token in {detail}");
    }
    not_served(&client, &d.space).await;
    assert_eq!(
        refused(&probe(&client, &pool).await.expect("still waiting")).0,
        409
    );

    bound(&bind_to(&client, &pool, &d.space, &["B=good"]).await);
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$B\"")).await,
        "good\n"
    );
}

#[tokio::test]
async fn a_bind_file_first_binds_and_drops_the_pool_subject() {
    let (nats, client) = server().await;
    let (d, pool) = bus_pool_daemon(&nats, &client).await;
    write_renamed(dir(&d), "bind", &bind(&d.space, &["FROM=file"]));
    ready(&client, &d.space).await;
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$FROM\"")).await,
        "file\n"
    );
    eventually(WAIT, "the pool subject is dropped", || async {
        probe(&client, &pool).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_exec_server_without_a_bind_file_is_back_in_pool_mode() {
    let (nats, client) = server().await;
    let (d, pool) = bus_pool_daemon(&nats, &client).await;
    bound(&bind_to(&client, &pool, &d.space, &[]).await);
    stdout(&client, &d.space, &sh("true")).await;
    kill_exec_server(&d);
    assert_eq!(refused(&on_the_bus(&client, &pool).await).0, 409);
    not_served(&client, &d.space).await;
    bound(&bind_to(&client, &pool, &d.space, &["AGAIN=yes"]).await);
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$AGAIN\"")).await,
        "yes\n"
    );
}

#[tokio::test]
async fn a_bad_pool_space_in_pool_mode_is_exit_64() {
    let (nats, _client) = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = host::command(&nats)
        .env(ENV_BIND_FILE, dir.path().join("bind"))
        .env(ENV_POOL_SPACE, "tether-pool.bad")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tether-spaced");
    let status = eventually(WAIT, "the daemon exits", || {
        let s = child.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(64));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert!(err.contains(ENV_POOL_SPACE), "{err}");
}
