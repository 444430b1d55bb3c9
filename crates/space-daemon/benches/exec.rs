//! Exec of `true` in one busybox container whose PID 1 is the release static `tether-spaced`
//! (`just spaced --release`), three ways in the same run, interleaved so drift hits all
//! alike: through the daemon (publish → exit received, `client::exec`), through the engine's
//! exec API directly (bollard create + start, output read to its end, exit code inspected),
//! and through the `docker exec` CLI. Then throughput with 1, 8 and 32 concurrent callers,
//! through the daemon and through the engine.
//!
//! `just bench -p tether-space-daemon`, or `cargo bench -p tether-space-daemon --bench exec`
//! after `just spaced --release` (env `BENCH_N`, default 200; `BENCH_SECS` per throughput run,
//! default 3). The container is on the bridge network, its daemon connected with its own
//! identity from `tokens.daemon` (`tests/support`), as in the Docker tests.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bollard::Docker;
use hdrhistogram::Histogram;
use support::{fleet_with_daemon_token, run_container};
use tether_proto::DaemonExecRequest;
use tether_space_daemon::client;
use tether_testkit::docker::{cli_exec_true, engine_exec_true};
use tether_testkit::{eventually, unique};

const WAIT: Duration = Duration::from_secs(30);

async fn daemon_exec(c: &async_nats::Client, space: &str) {
    let req = DaemonExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let o = client::exec(c, space, &req, WAIT)
        .await
        .expect("exec through the daemon");
    assert_eq!(o.exit.exit_code, 0);
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `k` callers exec'ing `true` back to back for `secs`: (execs, execs/s, merged latencies).
async fn throughput<F, Fut>(k: usize, secs: Duration, one: F) -> (u64, f64, Histogram<u64>)
where
    F: Fn() -> Fut + Clone,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let results = futures::future::join_all((0..k).map(|_| {
        let one = one.clone();
        async move {
            let mut h = hist();
            while start.elapsed() < secs {
                let s = Instant::now();
                one().await;
                h.record(s.elapsed().as_micros() as u64)
                    .expect("a sample within the histogram");
            }
            h
        }
    }))
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = hist();
    for h in &results {
        all.add(h).expect("histograms of one shape");
    }
    (all.len(), all.len() as f64 / elapsed, all)
}

#[tokio::main]
async fn main() {
    let n = env_num("BENCH_N", 200) as usize;
    let secs = Duration::from_secs(env_num("BENCH_SECS", 3));
    let dir = tempfile::tempdir().expect("tempdir");
    let space = unique("bench");
    let (mut f, token_file) = fleet_with_daemon_token(&space, dir.path()).await;
    let id = run_container(&mut f, Some((&token_file, &space)), 512);
    let c = f.c.clone();
    let docker = Docker::connect_with_local_defaults()
        .expect("the Docker engine's address")
        .negotiate_version()
        .await
        .expect("the Docker engine answers");
    let probe = DaemonExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    eventually(WAIT, "the daemon serves", || async {
        client::exec(&c, &space, &probe, WAIT)
            .await
            .ok()
            .map(|_| ())
    })
    .await;

    // Warm up every path.
    for _ in 0..20 {
        daemon_exec(&c, &space).await;
        engine_exec_true(&docker, &id).await;
    }
    cli_exec_true(&id);

    let (mut h_daemon, mut h_engine, mut h_cli) = (hist(), hist(), hist());
    let cli_every = 4;
    for i in 0..n {
        let t = Instant::now();
        daemon_exec(&c, &space).await;
        h_daemon
            .record(t.elapsed().as_micros() as u64)
            .expect("a sample within the histogram");
        let t = Instant::now();
        engine_exec_true(&docker, &id).await;
        h_engine
            .record(t.elapsed().as_micros() as u64)
            .expect("a sample within the histogram");
        if i % cli_every == 0 {
            let t = Instant::now();
            cli_exec_true(&id);
            h_cli
                .record(t.elapsed().as_micros() as u64)
                .expect("a sample within the histogram");
        }
    }
    println!(
        "\nexec of `true` in one container (daemon as PID 1), {n} runs each ({} for the CLI), interleaved",
        n.div_ceil(cli_every)
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "path", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, h) in [
        ("daemon (publish -> exit)", &h_daemon),
        ("engine exec API (bollard)", &h_engine),
        ("docker exec CLI", &h_cli),
    ] {
        println!(
            "{:<34} {:>9.2} {:>9.2} {:>9.2}",
            name,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            h.mean() / 1000.0
        );
    }
    let (p50, p99) = (
        ms(h_daemon.value_at_quantile(0.5)),
        ms(h_daemon.value_at_quantile(0.99)),
    );
    println!(
        "daemon targets: p50 <= 5 ms: {} ({p50:.2}), p99 <= 25 ms: {} ({p99:.2})",
        met(p50 <= 5.0),
        met(p99 <= 25.0)
    );

    println!("\nconcurrent exec of `true` in the one container, {secs:?} per run");
    println!(
        "{:<8} {:<8} {:>8} {:>10} {:>9} {:>9}",
        "path", "callers", "execs", "execs/s", "p50 ms", "p99 ms"
    );
    let mut at8 = (0.0, 0.0);
    for k in [1usize, 8, 32] {
        let (cc, sp) = (c.clone(), space.clone());
        let d = throughput(k, secs, move || {
            let (cc, sp) = (cc.clone(), sp.clone());
            async move { daemon_exec(&cc, &sp).await }
        })
        .await;
        let (dk, idk) = (docker.clone(), id.clone());
        let e = throughput(k, secs, move || {
            let (dk, idk) = (dk.clone(), idk.clone());
            async move { engine_exec_true(&dk, &idk).await }
        })
        .await;
        for (name, (execs, rate, h)) in [("daemon", &d), ("engine", &e)] {
            println!(
                "{:<8} {:<8} {:>8} {:>10.1} {:>9.2} {:>9.2}",
                name,
                k,
                execs,
                rate,
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99))
            );
        }
        if k == 8 {
            at8 = (d.1, e.1);
        }
    }
    println!(
        "8 callers: daemon/engine {:.1}x; target >= 320 execs/s through the daemon: {} ({:.0})",
        at8.0 / at8.1,
        met(at8.0 >= 320.0),
        at8.0
    );
    drop(f);
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
