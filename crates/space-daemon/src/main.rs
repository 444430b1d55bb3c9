//! `tether-spaced`: see the library doc. Exit 64 on a bad setting. With
//! `TETHER_DAEMON_SERVE_FOR` set it is the exec server its init started, else the init.

use std::process::ExitCode;

use tether_space_daemon::config::Config;
use tether_space_daemon::{server, supervisor};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_DAEMON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .init();
    let cfg = match Config::from_parts(|k| std::env::var(k).ok(), std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-spaced: {e}");
            return ExitCode::from(64);
        }
    };
    let serve_for = match std::env::var(server::ENV_SERVE_FOR) {
        Err(_) => None,
        Ok(v) => match v.parse::<i32>() {
            Ok(pid) if pid > 0 => Some(pid),
            _ => {
                eprintln!(
                    "tether-spaced: {}={v:?} is not a pid",
                    server::ENV_SERVE_FOR
                );
                return ExitCode::from(64);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether-spaced: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = rt.block_on(async {
        match serve_for {
            Some(init) => server::run(cfg, init).await,
            None => supervisor::run(cfg).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            eprintln!("tether-spaced: {e:#}");
            ExitCode::from(70)
        }
    }
}
