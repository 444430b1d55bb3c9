//! Pool mode on the host against a real nats-server: `tether-spaced` started with
//! `TETHER_DAEMON_BIND_FILE` and no space is not on the bus until the token file and then the
//! bind file are written (renamed into place, or as a symlink `bind` → `bind.a`/`.b` replaced
//! by a rename, as the orchestrator writes its secret files); then it serves the bound space,
//! and its commands get the bind env under the request's. How the daemon is run is `host`'s.
//!
//! Bind over the bus (`TETHER_DAEMON_POOL_SPACE`): `pool/busbind.rs`, on these helpers.

#[path = "pool/busbind.rs"]
mod busbind;
mod host;

use std::path::Path;
use std::time::{Duration, Instant};

use host::{Daemon, TOKEN, WAIT, ready, server};
use tether_proto::DaemonExecRequest;
use tether_space_daemon::bind::Bind;
use tether_space_daemon::client::{self, Failure};
use tether_space_daemon::config::{ENV_BIND_FILE, ENV_POOL_SPACE, ENV_TOKEN_FILE};
use tether_testkit::{NatsServer, eventually, unique};

/// How long a not-yet-bound daemon is checked to serve nothing (a negative check only).
const NOT_SERVED_FOR: Duration = Duration::from_millis(300);

/// A pool daemon: its bind file and token file are `bind` and `token` in its directory,
/// neither written yet. Its `space` is the one a test binds it to. Returns once its exec
/// server runs (and so waits for the bind file).
async fn pool_daemon(nats: &NatsServer) -> Daemon {
    pool_daemon_in(nats, tempfile::tempdir().expect("tempdir"), None).await
}

/// [`pool_daemon`] with its files in `dir`, and `TETHER_DAEMON_POOL_SPACE=pool` if given.
async fn pool_daemon_in(nats: &NatsServer, dir: tempfile::TempDir, pool: Option<&str>) -> Daemon {
    let mut cmd = host::command(nats);
    cmd.env(ENV_BIND_FILE, dir.path().join("bind"))
        .env(ENV_TOKEN_FILE, dir.path().join("token"));
    if let Some(pool) = pool {
        cmd.env(ENV_POOL_SPACE, pool);
    }
    let child = cmd.spawn().expect("spawn tether-spaced");
    let d = Daemon {
        child,
        space: unique("pool"),
        _dir: dir,
    };
    eventually(WAIT, "the pool daemon's exec server runs", || {
        let s = host::exec_server(&d);
        async move { s }
    })
    .await;
    d
}

/// SIGKILLs the daemon's exec server (its init restarts it); its pid.
fn kill_exec_server(d: &Daemon) -> u32 {
    let old = host::exec_server(d).expect("an exec server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the exec server");
    old
}

fn dir(d: &Daemon) -> &Path {
    d._dir.path()
}

fn bind(space: &str, env: &[&str]) -> Vec<u8> {
    let b = Bind {
        space: space.into(),
        env: env.iter().map(|e| e.to_string()).collect(),
    };
    serde_json::to_vec(&b).expect("json")
}

/// Writes `name` in `dir` as the orchestrator does: a temp file renamed into place.
fn write_renamed(dir: &Path, name: &str, content: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).expect("write the temp file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

/// Writes `name` in `dir` as the symlink form: `<name>.<side>` holds `content`, and a new
/// link `<name>` → `<name>.<side>` replaces the old one by a rename.
fn write_linked(dir: &Path, name: &str, side: &str, content: &[u8]) {
    let target = format!("{name}.{side}");
    std::fs::write(dir.join(&target), content).expect("write the target");
    let tmp = dir.join(format!(".{name}.link"));
    std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join(name)).expect("replace the link");
}

fn sh(command: &str) -> DaemonExecRequest {
    DaemonExecRequest {
        command: command.into(),
        ..Default::default()
    }
}

/// Checks for [`NOT_SERVED_FOR`] that no daemon answers on `space`'s subject.
async fn not_served(client: &async_nats::Client, space: &str) {
    let until = Instant::now() + NOT_SERVED_FOR;
    while Instant::now() < until {
        match client::exec(client, space, &sh("true"), NOT_SERVED_FOR).await {
            Err(Failure::NoResponders | Failure::TimedOut) => {}
            other => panic!("{space} is served before it is bound: {other:?}"),
        }
        // Pacing, not synchronisation: the check is the absence of a responder.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stdout(client: &async_nats::Client, space: &str, req: &DaemonExecRequest) -> String {
    let o = client::exec(client, space, req, WAIT)
        .await
        .unwrap_or_else(|e| panic!("exec {req:?}: {e:?}"));
    assert_eq!(o.exit.exit_code, 0, "{req:?}");
    String::from_utf8(o.stream("stdout")).expect("utf-8")
}

#[tokio::test]
async fn a_pool_daemon_serves_once_bound_and_its_commands_get_the_bind_env() {
    let (nats, client) = server().await;
    let d = pool_daemon(&nats).await;
    write_renamed(dir(&d), "token", TOKEN.as_bytes());
    not_served(&client, &d.space).await;

    write_renamed(
        dir(&d),
        "bind",
        &bind(&d.space, &["POOL_GREETING=from the bind", "SHARED=bind"]),
    );
    ready(&client, &d.space).await;
    let mut req = sh("echo \"$POOL_GREETING|$SHARED|${TETHER_DAEMON_BIND_FILE:-unset}\"");
    req.env.insert("SHARED".into(), "request".into());
    assert_eq!(
        stdout(&client, &d.space, &req).await,
        "from the bind|request|unset\n"
    );
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$SHARED\"")).await,
        "bind\n"
    );
}

#[tokio::test]
async fn a_bad_bind_file_is_waited_past_and_a_good_one_binds() {
    let (nats, client) = server().await;
    let d = pool_daemon(&nats).await;
    write_linked(dir(&d), "token", "a", TOKEN.as_bytes());
    // A valid space but a bad env entry: binding to it would serve `wrong`.
    let wrong = unique("wrong");
    write_linked(dir(&d), "bind", "a", &bind(&wrong, &["1BAD=x"]));
    not_served(&client, &wrong).await;
    not_served(&client, &d.space).await;

    write_linked(
        dir(&d),
        "bind",
        "b",
        &bind(&d.space, &["BOUND_BY=the good one"]),
    );
    ready(&client, &d.space).await;
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$BOUND_BY\"")).await,
        "the good one\n"
    );
    let r = client::exec(&client, &wrong, &sh("true"), WAIT).await;
    assert!(matches!(r, Err(Failure::NoResponders)), "{r:?}");
}

#[tokio::test]
async fn a_restarted_exec_server_finds_the_bind_file_and_serves() {
    let (nats, client) = server().await;
    let d = pool_daemon(&nats).await;
    write_renamed(dir(&d), "token", TOKEN.as_bytes());
    write_linked(dir(&d), "bind", "a", &bind(&d.space, &["KEPT=yes"]));
    ready(&client, &d.space).await;
    let old = kill_exec_server(&d);
    eventually(WAIT, "another exec server runs", || {
        let s = host::exec_server(&d).filter(|p| *p != old);
        async move { s }
    })
    .await;
    ready(&client, &d.space).await;
    assert_eq!(
        stdout(&client, &d.space, &sh("echo \"$KEPT\"")).await,
        "yes\n"
    );
}
