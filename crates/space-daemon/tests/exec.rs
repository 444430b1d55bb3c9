//! The space daemon on the host against a real nats-server: `tether-spaced` runs as a child
//! process (a child subreaper, not PID 1) and is driven through `tether_space_daemon::client`.
//! How it is run is `host`'s (`TETHER_SPACED_BIN` runs another build of it).

mod host;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use host::{Daemon, TOKEN, WAIT, server};
use tether_proto::DaemonExecRequest;
use tether_space_daemon::client::{self, Failure, Outcome};
use tether_testkit::{NatsServer, eventually, unique};

/// A server, a client of it, and a daemon that serves (a test's usual start).
async fn serving() -> (NatsServer, async_nats::Client, Daemon) {
    let (nats, client) = server().await;
    let d = spawn(&nats, TOKEN, &[]);
    ready(&client, &d).await;
    (nats, client, d)
}

/// Starts a daemon whose token file holds `token`, with `main` after `--` if given.
fn spawn(nats: &NatsServer, token: &str, main: &[&str]) -> Daemon {
    spawn_with(nats, token, main, &[])
}

/// [`spawn`] with more environment variables for the daemon.
fn spawn_with(nats: &NatsServer, token: &str, main: &[&str], env: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).expect("token file");
    let space = unique("sp");
    let mut cmd = host::command(nats);
    cmd.env("TETHER_DAEMON_TOKEN_FILE", &token_file)
        .env("TETHER_SPACE_ID", &space)
        .envs(env.iter().copied());
    if !main.is_empty() {
        cmd.arg("--").args(main);
    }
    let child = cmd.spawn().expect("spawn tether-spaced");
    Daemon {
        child,
        space,
        _dir: dir,
    }
}

fn argv(a: &[&str]) -> DaemonExecRequest {
    DaemonExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(command: &str) -> DaemonExecRequest {
    DaemonExecRequest {
        command: command.into(),
        ..Default::default()
    }
}

async fn run(client: &async_nats::Client, d: &Daemon, req: &DaemonExecRequest) -> Outcome {
    client::exec(client, &d.space, req, WAIT)
        .await
        .unwrap_or_else(|e| panic!("exec {req:?}: {e:?}"))
}

/// Sends `req` without waiting: the subscription gets its reply messages as they come.
async fn send(
    client: &async_nats::Client,
    d: &Daemon,
    req: &DaemonExecRequest,
) -> async_nats::Subscriber {
    let inbox = client.new_inbox();
    let sub = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(
            format!("spaces.{}.daemon.exec", d.space),
            inbox,
            serde_json::to_vec(req).expect("json").into(),
        )
        .await
        .expect("publish");
    sub
}

/// Waits until the daemon answers (it connects in the background).
async fn ready(client: &async_nats::Client, d: &Daemon) {
    host::ready(client, &d.space).await;
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).expect("utf-8 output")
}

/// Whether `pid` still exists (a zombie counts: nobody reaped it).
fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn true_exits_zero_and_a_failure_reports_its_code() {
    let (_nats, client, d) = serving().await;
    let o = run(&client, &d, &argv(&["true"])).await;
    assert_eq!(o.exit.exit_code, 0);
    assert!(!o.exit.timed_out && !o.exit.truncated);
    assert!(o.chunks.is_empty());
    let o = run(&client, &d, &sh("exit 3")).await;
    assert_eq!(o.exit.exit_code, 3);
    let o = run(&client, &d, &sh("kill -TERM $$")).await;
    assert_eq!((o.exit.exit_code, o.exit.signal), (143, 15));
}

#[tokio::test]
async fn output_comes_in_ordered_chunks() {
    let (_nats, client, d) = serving().await;
    let o = run(
        &client,
        &d,
        &sh("i=0; while [ $i -lt 3000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"),
    )
    .await;
    assert_eq!(o.exit.exit_code, 0);
    let want = |p: &str| (0..3000).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(text(o.stream("stdout")), want("out"));
    assert_eq!(text(o.stream("stderr")), want("err"));
    assert_eq!(o.exit.stdout_bytes, want("out").len() as u64);
    assert!(o.chunks.len() > 2, "many chunks: {}", o.chunks.len());
}

#[tokio::test]
async fn stdin_env_and_workdir_are_passed() {
    let (_nats, client, d) = serving().await;
    let mut req = argv(&["cat"]);
    req.stdin = "line one\nline two\n".into();
    let o = run(&client, &d, &req).await;
    assert_eq!(text(o.stream("stdout")), "line one\nline two\n");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut req = sh("echo \"$GREETING\"; pwd; echo \"${TETHER_DAEMON_TOKEN_FILE:-unset}\"");
    req.env.insert("GREETING".into(), "hello there".into());
    req.workdir = dir.path().display().to_string();
    let o = run(&client, &d, &req).await;
    let canonical = dir.path().canonicalize().expect("canonical");
    assert_eq!(
        text(o.stream("stdout")),
        format!("hello there\n{}\nunset\n", canonical.display()),
        "env, workdir, and no daemon variable"
    );
}

#[tokio::test]
async fn the_user_is_switched() {
    let (_nats, client, d) = serving().await;
    let mut req = sh("id -u; id -g");
    req.user = "65534:65533".into();
    let o = run(&client, &d, &req).await;
    assert_eq!(text(o.stream("stdout")), "65534\n65533\n");
    // A name from the (here: host's) /etc/passwd.
    let nobody = std::fs::read_to_string("/etc/passwd")
        .expect("passwd")
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(|l| l.split(':').nth(2).unwrap_or_default().to_string());
    if let Some(uid) = nobody {
        req.user = "nobody".into();
        let o = run(&client, &d, &req).await;
        assert!(text(o.stream("stdout")).starts_with(&format!("{uid}\n")));
    }
}

#[tokio::test]
async fn a_timeout_kills_the_whole_tree() {
    let (_nats, client, d) = serving().await;
    // Two sleeps in the group, one that left it for its own session.
    let mut req = sh("sleep 100 & echo $!; sleep 100 & echo $!; setsid sleep 100 & echo $!; wait");
    req.timeout_ms = 1000;
    let t = Instant::now();
    let o = run(&client, &d, &req).await;
    assert!(o.exit.timed_out, "{:?}", o.exit);
    assert_eq!((o.exit.exit_code, o.exit.signal), (137, 9));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered at the deadline"
    );
    let mut pids: Vec<u32> = text(o.stream("stdout"))
        .lines()
        .map(|l| l.parse().expect("a pid"))
        .collect();
    pids.push(o.pid);
    assert_eq!(pids.len(), 4);
    eventually(
        Duration::from_secs(5),
        "no process of the command remains",
        || {
            let left: Vec<u32> = pids.iter().copied().filter(|p| exists(*p)).collect();
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn a_flood_of_output_does_not_hold_off_the_deadline() {
    let (_nats, client, d) = serving().await;
    let mut req = argv(&["yes"]);
    req.timeout_ms = 500;
    req.max_output_bytes = 1000;
    let o = run(&client, &d, &req).await;
    assert!(o.exit.timed_out && o.exit.truncated, "{:?}", o.exit);
    assert_eq!(o.stream("stdout").len(), 1000);
    assert!(o.exit.stdout_bytes > 1000, "kept reading past the cap");
}

#[tokio::test]
async fn orphans_are_reaped() {
    let (_nats, client, d) = serving().await;
    // The shell exits at once; its child lives on briefly, re-parented to the daemon.
    let o = run(&client, &d, &sh("sleep 0.3 >/dev/null 2>&1 & echo $!")).await;
    assert_eq!(o.exit.exit_code, 0);
    let pid: u32 = text(o.stream("stdout")).trim().parse().expect("pid");
    eventually(
        Duration::from_secs(5),
        "the orphan is reaped, not a zombie",
        || {
            let gone = !exists(pid);
            async move { gone.then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn an_output_cap_truncates_and_says_so() {
    let (_nats, client, d) = serving().await;
    let mut req = sh("head -c 200000 /dev/zero; echo tail >&2");
    req.max_output_bytes = 1000;
    let o = run(&client, &d, &req).await;
    assert!(o.exit.truncated);
    assert_eq!(o.exit.exit_code, 0);
    assert_eq!(o.stream("stdout").len() + o.stream("stderr").len(), 1000);
    assert_eq!(o.exit.stdout_bytes, 200_000);
    assert_eq!(o.exit.stderr_bytes, 5);
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_runs() {
    let (_nats, client, d) = serving().await;
    let marker = tempfile::tempdir().expect("tempdir");
    let touched = marker.path().join("ran");
    let touch = format!("touch {}", touched.display());
    let cases: Vec<(DaemonExecRequest, u16, &str)> = vec![
        (argv(&[]), 400, "give argv"),
        (
            DaemonExecRequest {
                argv: vec!["sh".into()],
                command: touch.clone(),
                ..Default::default()
            },
            400,
            "not both",
        ),
        (
            DaemonExecRequest {
                user: "no-such-user-here".into(),
                ..sh(&touch)
            },
            400,
            "unknown user",
        ),
        (
            DaemonExecRequest {
                timeout_ms: 100_000_000,
                ..sh(&touch)
            },
            400,
            "timeout_ms",
        ),
        (
            DaemonExecRequest {
                workdir: "/no/such/dir".into(),
                ..sh(&touch)
            },
            404,
            "not a directory",
        ),
        (argv(&["/no/such/program"]), 404, "cannot run"),
    ];
    for (req, status, says) in cases {
        match client::exec(&client, &d.space, &req, WAIT).await {
            Err(Failure::Refused(s, detail)) => {
                assert_eq!(s, status, "{req:?}: {detail}");
                assert!(detail.contains(says), "{req:?}: {detail}");
            }
            other => panic!("{req:?} was not refused: {other:?}"),
        }
    }
    // Not JSON, and an unknown field: raw requests.
    for (body, says) in [
        ("{not json", "DaemonExecRequest"),
        (r#"{"argv":["true"],"cmd":"x"}"#, "cmd"),
    ] {
        let m = client
            .request(format!("spaces.{}.daemon.exec", d.space), body.into())
            .await
            .expect("an answer");
        let h = m.headers.expect("error headers");
        assert_eq!(
            h.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400")
        );
        assert!(String::from_utf8_lossy(&m.payload).contains(says), "{body}");
    }
    assert!(!touched.exists(), "a refused request ran");
    // And the daemon still serves.
    assert_eq!(run(&client, &d, &argv(&["true"])).await.exit.exit_code, 0);
}

#[tokio::test]
async fn beyond_the_running_limit_a_request_is_answered_429() {
    let (nats, client) = server().await;
    let d = spawn_with(&nats, TOKEN, &[], &[("TETHER_DAEMON_MAX_RUNNING", "1")]);
    ready(&client, &d).await;
    // One long command, seen started, holds the only slot.
    let mut long = sh("sleep 30");
    long.timeout_ms = 30_000;
    let mut sub = send(&client, &d, &long).await;
    let started = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sub))
        .await
        .expect("started in time")
        .expect("a message");
    let stream = started
        .headers
        .as_ref()
        .and_then(|h| h.get("Tether-Stream"));
    assert_eq!(stream.map(|v| v.as_str()), Some("started"));
    match client::exec(&client, &d.space, &argv(&["true"]), WAIT).await {
        Err(Failure::Refused(429, detail)) => assert!(detail.contains("running"), "{detail}"),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test]
async fn the_token_file_is_read_again_at_each_connect() {
    let (nats, client) = server().await;
    let d = spawn(&nats, "wrong-token", &[]);
    // Refused by the server: nothing serves the space, and the daemon keeps trying.
    assert_eq!(
        client::exec(&client, &d.space, &argv(&["true"]), WAIT)
            .await
            .map(|_| ()),
        Err(Failure::NoResponders)
    );
    let file = d._dir.path().join("token");
    std::fs::write(&file, TOKEN).expect("renew the token file");
    ready(&client, &d).await;
}

#[tokio::test]
async fn as_an_init_it_runs_the_main_command_and_forwards_signals() {
    let (nats, _client) = server().await;
    let mut d = spawn(&nats, TOKEN, &["sh", "-c", "exit 7"]);
    let status = wait_exit(&mut d.child);
    assert_eq!(status.code(), Some(7), "the main command's code");
    let mut d = spawn(&nats, TOKEN, &["/no/such/program"]);
    assert_eq!(
        wait_exit(&mut d.child).code(),
        Some(127),
        "a missing main command"
    );

    let mut d = spawn(&nats, TOKEN, &["sleep", "100"]);
    // Let the daemon install its handlers: wait until it has spawned its main command.
    let daemon_pid = d.child.id();
    eventually(WAIT, "the main command runs", || {
        let has_child =
            std::fs::read_to_string(format!("/proc/{daemon_pid}/task/{daemon_pid}/children"))
                .map(|c| !c.trim().is_empty())
                .unwrap_or(false);
        async move { has_child.then_some(()) }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the daemon");
    let status = wait_exit(&mut d.child);
    assert_eq!(status.code(), Some(143), "sleep got the SIGTERM: 128+15");
}

#[tokio::test]
async fn a_killed_exec_server_is_restarted_and_its_commands_killed() {
    let (_nats, client, d) = serving().await;
    let old = host::exec_server(&d).expect("an exec server");
    // A long command: its pid comes back as its first output, then it sleeps.
    let mut long = sh("echo $$; exec sleep 600");
    long.timeout_ms = 600_000;
    let mut sub = send(&client, &d, &long).await;
    // `started`, then the chunk with the pid.
    let pid: u32 = tokio::time::timeout(WAIT, async {
        loop {
            let m = futures::StreamExt::next(&mut sub).await.expect("a message");
            if let Ok(pid) = String::from_utf8_lossy(&m.payload).trim().parse() {
                return pid;
            }
        }
    })
    .await
    .expect("the long command prints its pid in time");
    assert!(exists(pid));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the exec server");
    let new = eventually(WAIT, "another exec server runs", || {
        let s = host::exec_server(&d).filter(|p| *p != old);
        async move { s }
    })
    .await;
    assert_ne!(new, old);
    ready(&client, &d).await;
    eventually(WAIT, "the dead server's command is killed", || {
        let gone = !exists(pid);
        async move { gone.then_some(()) }
    })
    .await;
}

/// Waits (up to [`WAIT`]) for a child process to exit.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let until = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(Instant::now() < until, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn latency_of_true() {
    let (_nats, client, d) = serving().await;
    let mut times = Vec::with_capacity(200);
    let mut inside = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let o = run(&client, &d, &argv(&["true"])).await;
        times.push(t.elapsed());
        inside.push(o.exit.duration_ms);
        assert_eq!(o.exit.exit_code, 0);
    }
    times.sort();
    inside.sort_unstable();
    // 8 callers at once, 50 commands each.
    let t = Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (client, space) = (client.clone(), d.space.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    let o = client::exec(&client, &space, &argv(&["true"]), WAIT)
                        .await
                        .expect("exec");
                    assert_eq!(o.exit.exit_code, 0);
                }
            })
        })
        .collect();
    for c in callers {
        c.await.expect("caller");
    }
    println!(
        "8 callers at once: {:.0} execs/s",
        400.0 / t.elapsed().as_secs_f64()
    );
    println!(
        "exec of `true` through tether-spaced (host, {}): p50 {:?}, p99 {:?}, max {:?}; \
         spawn to exit inside the daemon: p50 {} ms, p99 {} ms",
        if std::env::var_os("TETHER_SPACED_BIN").is_some() {
            "TETHER_SPACED_BIN"
        } else {
            "the build next to the tests"
        },
        times[100],
        times[197],
        times[199],
        inside[100],
        inside[197]
    );
}

#[tokio::test]
async fn a_request_nobody_answers_is_silent_not_a_wait_for_its_timeout() {
    // What a daemon killed as the request arrived looks like: the server delivers it to a
    // subscriber that never answers.
    let (_nats, client) = server().await;
    let space = unique("s");
    let _mute = client
        .subscribe(format!("spaces.{space}.daemon.exec"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let mut req = argv(&["true"]);
    req.timeout_ms = 600_000;
    let start = Instant::now();
    let r = client::exec(&client, &space, &req, Duration::from_secs(630)).await;
    assert_eq!(r.map(|_| ()), Err(Failure::Silent));
    let took = start.elapsed();
    assert!(
        took >= client::FIRST_REPLY && took < client::FIRST_REPLY + Duration::from_secs(20),
        "{took:?}"
    );
}
