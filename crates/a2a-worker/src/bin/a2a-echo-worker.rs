//! `a2a-echo-worker`: the example tether A2A worker (see `tether_a2a_worker::echo`).
//!
//! Env: `TETHER_NATS_URL`, `TETHER_TOKEN` or `TETHER_TOKEN_FILE` (a token with scope
//! `a2a:serve`), `TETHER_AGENT_ID` (default: the token's `sub`), `TETHER_WORKER_CONCURRENCY`,
//! `TETHER_WORKER_NAME` (put in each artifact's metadata, with the attempt), `TETHER_ENV_FILE`
//! (a replica's secrets, loaded at start; the echo agent spawns nothing to give them to).

use std::process::ExitCode;
use std::sync::Arc;

use tether_a2a_worker::echo;
use tether_a2a_worker::env::{WorkerSettings, serve};
use tokio_util::sync::CancellationToken;

const NAME: &str = "a2a-echo-worker";

#[tokio::main]
async fn main() -> ExitCode {
    tether_bus::startup::run_node(
        NAME,
        None,
        WorkerSettings::load,
        |bus, (settings, token, agent), shutdown| async move {
            let cfg = settings.worker_config(&bus, &agent);
            let executor = echo::Echo {
                worker: settings.worker_name.clone().filter(|n| !n.is_empty()),
            };
            let stop = CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                shutdown.await;
                s.cancel();
            });
            serve(
                bus,
                token,
                cfg,
                Some(echo::card(&agent)),
                Arc::new(executor),
                stop,
            )
            .await
        },
    )
    .await
}
