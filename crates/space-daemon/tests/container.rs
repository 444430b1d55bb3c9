//! The space daemon as PID 1 of a real container (the busybox test image, real Docker, real
//! nats-server): the static `tether-spaced` (`just spaced`) bind-mounted read-only as the
//! entrypoint, `sleep 100000` as the main workload, a pids limit of 64, every capability
//! dropped and no new privileges, on the bridge network, connected with its own identity from
//! `tokens.daemon` (`support`). Each container carries a test label and is removed when its
//! test ends, whatever happens. Pool mode is tested the orchestrator's way: a container with
//! no space, then the token and bind files written through the engine's archive API.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{BIND_PATH, TOKEN_PATH, fleet_with_daemon_token, run_container};
use tether_proto::DaemonExecRequest;
use tether_space_daemon::client::{self, Failure, Outcome};
use tether_testkit::{Fleet, eventually, unique};

const WAIT: Duration = Duration::from_secs(20);

/// One container with the daemon as PID 1; the fleet removes it (by label) when dropped.
struct Space {
    id: String,
    space: String,
    client: async_nats::Client,
    _fleet: Fleet,
    _dir: tempfile::TempDir,
}

/// A fleet, and a container whose daemon serves a fresh space on it with its own identity.
async fn start() -> Space {
    let (s, _) = container(false).await;
    s.until_served().await;
    s
}

/// A fleet, a fresh space, a daemon token of it in a file of the test's directory (returned
/// too), and a container: one serving the space, or (`pool`) a pool one — no space and no
/// token yet. Returns at once.
async fn container(pool: bool) -> (Space, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let space = unique("box");
    let (mut f, token_file) = fleet_with_daemon_token(&space, dir.path()).await;
    let serving = (!pool).then_some((token_file.as_path(), space.as_str()));
    let id = run_container(&mut f, serving, 64);
    let s = Space {
        id,
        space,
        client: f.c.clone(),
        _fleet: f,
        _dir: dir,
    };
    (s, token_file)
}

fn sh(command: &str) -> DaemonExecRequest {
    DaemonExecRequest {
        command: command.into(),
        ..Default::default()
    }
}

impl Space {
    /// Waits until the daemon in the container serves exec (it connects in the background).
    async fn until_served(&self) {
        eventually(WAIT, "the daemon in the container serves exec", || async {
            match self.try_run(&sh("true")).await {
                Ok(_) => Some(()),
                Err(Failure::NoResponders) => None,
                Err(e) => panic!("first exec: {e:?}\n{}", self.logs()),
            }
        })
        .await;
    }

    async fn try_run(&self, req: &DaemonExecRequest) -> Result<Outcome, Failure> {
        self.try_run_within(req, WAIT).await
    }

    async fn try_run_within(
        &self,
        req: &DaemonExecRequest,
        wait: Duration,
    ) -> Result<Outcome, Failure> {
        client::exec(&self.client, &self.space, req, wait).await
    }

    async fn run(&self, req: &DaemonExecRequest) -> Outcome {
        self.try_run(req)
            .await
            .unwrap_or_else(|e| panic!("exec {req:?}: {e:?}\n{}", self.logs()))
    }

    /// Stdout of `command` run through the daemon (it must exit 0).
    async fn out(&self, command: &str) -> String {
        let o = self.run(&sh(command)).await;
        assert_eq!(o.exit.exit_code, 0, "{command}: {o:?}");
        String::from_utf8(o.stream("stdout")).expect("utf-8")
    }

    /// Publishes `req` without waiting for any answer.
    async fn fire(&self, req: &DaemonExecRequest) {
        let inbox = self.client.new_inbox();
        self.client
            .publish_with_reply(
                format!("spaces.{}.daemon.exec", self.space),
                inbox,
                serde_json::to_vec(req).expect("json").into(),
            )
            .await
            .expect("publish");
        self.client.flush().await.expect("flush");
    }

    /// The container's processes: (pid, ppid, state, args), from `ps` run through the daemon.
    async fn ps(&self) -> Vec<(i32, i32, String, String)> {
        self.out("ps -o pid,ppid,stat,args")
            .await
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let pid = f.next()?.parse().ok()?;
                let ppid = f.next()?.parse().ok()?;
                let stat = f.next()?.to_string();
                Some((pid, ppid, stat, f.collect::<Vec<_>>().join(" ")))
            })
            .collect()
    }

    /// The exec server's pid: the one child of PID 1 named `spaced-exec` (asked through it,
    /// waiting at most `wait`).
    async fn server_pid(&self, wait: Duration) -> Result<i32, String> {
        let o = self
            .try_run_within(
                &sh(
                "for p in $(cat /proc/1/task/1/children); do echo \"$p $(cat /proc/$p/comm)\"; done",
                ),
                wait,
            )
            .await
            .map_err(|e| format!("{e:?}"))?;
        let out = String::from_utf8_lossy(&o.stream("stdout")).into_owned();
        let found: Vec<i32> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, comm)| *comm == tether_space_daemon::server::NAME)
            .filter_map(|(pid, _)| pid.parse().ok())
            .collect();
        match found[..] {
            [pid] => Ok(pid),
            _ => Err(format!("not one exec server among PID 1's children: {out}")),
        }
    }

    fn inspect(&self, format: &str) -> String {
        tether_testkit::docker::run(&["inspect", "-f", format, &self.id])
    }

    fn logs(&self) -> String {
        let out = std::process::Command::new("docker")
            .args(["logs", "--tail", "40", &self.id])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        format!("container log (tail):\n{out}")
    }
}

/// Whether `ps` lists a process whose arguments are exactly `args`.
fn listed(ps: &[(i32, i32, String, String)], args: &str) -> bool {
    ps.iter().any(|(_, _, _, a)| a == args)
}

#[tokio::test]
async fn the_daemon_is_pid_1_and_serves_exec() {
    let s = start().await;
    let ps = s.ps().await;
    let init = ps.iter().find(|p| p.0 == 1).expect("a PID 1");
    assert_eq!(init.3, "/tether-spaced -- sleep 100000", "{ps:?}");
    assert!(
        listed(&ps, "sleep 100000"),
        "the main workload runs: {ps:?}"
    );
    let server = s.server_pid(WAIT).await.expect("the exec server");
    assert_ne!(server, 1);
    let o = s.run(&sh("echo hello; id -u")).await;
    assert_eq!(
        String::from_utf8(o.stream("stdout")).expect("utf-8"),
        "hello\n0\n"
    );
    assert_eq!(o.exit.exit_code, 0);
}

#[tokio::test]
async fn a_timeout_leaves_no_process_of_the_command() {
    let s = start().await;
    let mut req = sh("sleep 100 & sleep 100 & wait");
    req.timeout_ms = 1000;
    let o = s.run(&req).await;
    assert!(o.exit.timed_out, "{:?}", o.exit);
    let ps = s.ps().await;
    assert!(
        !listed(&ps, "sleep 100"),
        "a sleep of the command is left: {ps:?}"
    );
    assert!(
        listed(&ps, "sleep 100000"),
        "the main workload still runs: {ps:?}"
    );
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_the_daemon_answers_afterwards() {
    let s = start().await;
    // Each `f` forks two more until the pids limit refuses (that one fails, the rest go on).
    // The leader forks only before the bomb starts (`sleep 100`, then one `f` in the
    // background) and then waits, so no failed fork ends it before its deadline.
    let mut req = sh("sleep 100 & f() { f | f & }; f & wait");
    req.timeout_ms = 2000;
    let t = Instant::now();
    let o = s.run(&req).await;
    assert!(o.exit.timed_out, "{:?}", o.exit);
    assert!(
        o.exit.stderr_bytes > 0,
        "the bomb hit the pids limit (fork errors): {:?}",
        o.exit
    );
    println!("the bomb's result came after {:?}", t.elapsed());
    eventually(
        WAIT,
        "the daemon answers `echo ok` after the bomb",
        || async {
            match s.try_run(&sh("echo ok")).await {
                Ok(o) if o.stream("stdout") == b"ok\n" => Some(()),
                // Refused (no process to spawn yet) or timed out: ask again.
                _ => None,
            }
        },
    )
    .await;
    let ps = s.ps().await;
    assert!(!listed(&ps, "sleep 100"), "the bomb is gone: {ps:?}");
    assert!(
        ps.len() < 10,
        "only the daemon, the workload and ps: {ps:?}"
    );
}

#[tokio::test]
async fn an_orphan_is_reaped() {
    let s = start().await;
    let out = s.out("(sleep 0.2 & echo $!) ; exit 0").await;
    let orphan: i32 = out.trim().parse().expect("the orphan's pid");
    eventually(WAIT, "the orphan exited and no zombie is left", || async {
        let stat = s.out("cat /proc/[0-9]*/stat 2>/dev/null; true").await;
        let zombies: Vec<&str> = stat
            .lines()
            .filter(|l| {
                l.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next())
                    == Some("Z")
            })
            .collect();
        let alive = stat
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&orphan.to_string()));
        (!alive && zombies.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn docker_stop_ends_the_container_with_the_workloads_code() {
    let s = start().await;
    let t = Instant::now();
    let out = std::process::Command::new("docker")
        .args(["stop", "-t", "10", &s.id])
        .output()
        .expect("docker stop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("docker stop took {:?}", t.elapsed());
    // 143 = the workload's SIGTERM, forwarded by PID 1; had it not been, the engine would have
    // SIGKILLed PID 1 after the 10 s (137).
    assert_eq!(s.inspect("{{.State.ExitCode}}"), "143", "{}", s.logs());
}

#[tokio::test]
async fn a_killed_exec_server_is_restarted_and_its_commands_killed() {
    let s = start().await;
    let old = s.server_pid(WAIT).await.expect("the exec server");
    // A command running under the server that will be killed.
    let mut long = sh("sleep 4242");
    long.timeout_ms = 600_000;
    s.fire(&long).await;
    eventually(WAIT, "the long command runs", || async {
        listed(&s.ps().await, "sleep 4242").then_some(())
    })
    .await;
    // The workload (root in the container) kills the server; no answer comes to this one.
    s.fire(&sh(&format!("kill -9 {old}"))).await;
    // Polled with a deadline (as `eventually`), with the container's log if it fails. A
    // request the dying server took gets no answer (its command is killed with it): each
    // attempt waits 2 s at most.
    let until = Instant::now() + WAIT;
    let new = loop {
        let found = s.server_pid(Duration::from_secs(2)).await;
        if let Some(pid) = found.as_ref().ok().filter(|pid| **pid != old) {
            break *pid;
        }
        assert!(
            Instant::now() < until,
            "no fresh exec server ({found:?}): {}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(new, 1);
    assert_eq!(s.out("echo ok").await, "ok\n");
    let ps = s.ps().await;
    assert!(
        !listed(&ps, "sleep 4242"),
        "the dead server's command was killed: {ps:?}"
    );
    assert!(
        listed(&ps, "sleep 100000"),
        "the main workload runs on: {ps:?}"
    );
    assert_eq!(s.inspect("{{.State.Running}}"), "true");
}

/// The names of PID 1's children in container `id`, seen with `docker exec` (not through the
/// daemon, which may not serve yet).
fn init_children(id: &str) -> String {
    tether_testkit::docker::run(&[
        "exec",
        id,
        "sh",
        "-c",
        "for p in $(cat /proc/1/task/1/children); do cat /proc/$p/comm; done",
    ])
}

#[tokio::test]
async fn a_pool_container_is_bound_through_the_archive_api() {
    let (s, token_file) = container(true).await;
    let bind_file = s._dir.path().join("bind");
    eventually(WAIT, "the pool daemon's exec server runs", || {
        let up = init_children(&s.id).contains(tether_space_daemon::server::NAME);
        async move { up.then_some(()) }
    })
    .await;
    // Negative check, bounded: the token would let it serve, but it has no bind yet.
    tether_testkit::docker::run(&[
        "cp",
        &token_file.display().to_string(),
        &format!("{}:{TOKEN_PATH}", s.id),
    ]);
    let r = s
        .try_run_within(&sh("true"), Duration::from_millis(300))
        .await;
    assert!(
        matches!(r, Err(Failure::NoResponders)),
        "{r:?}\n{}",
        s.logs()
    );

    let bind = tether_space_daemon::bind::Bind {
        space: s.space.clone(),
        env: vec!["POOL_VAR=from the bind".into()],
    };
    std::fs::write(&bind_file, serde_json::to_vec(&bind).expect("json")).expect("bind file");
    tether_testkit::docker::run(&[
        "cp",
        &bind_file.display().to_string(),
        &format!("{}:{BIND_PATH}", s.id),
    ]);
    s.until_served().await;
    assert_eq!(s.out("echo \"$POOL_VAR\"").await, "from the bind\n");
}
