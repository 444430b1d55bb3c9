//! `shell-server`: the one node startup path (`tether_bus::startup`), exit 64 on bad
//! configuration.
//!
//! `shell-server` serves `shell.exec` on the bus and MCP over streamable HTTP (`mcp_listen`);
//! `shell-server mcp --stdio` is what an MCP client launches: MCP on stdin/stdout for the
//! agent whose token is in `TETHER_TOKEN` (logs go to stderr).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_shell_server::{NAME, ShellConfig};

#[derive(Parser)]
#[command(
    version,
    about = "tether shell-server: shell commands in the caller's own space (shell.exec, MCP exec_command)"
)]
struct Args {
    #[command(flatten)]
    config: tether_bus::startup::ConfigArg,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Clone, Copy)]
enum Cmd {
    /// Serve MCP to one client instead of serving the bus.
    Mcp {
        /// MCP over stdin/stdout (the token comes from TETHER_TOKEN).
        #[arg(long)]
        stdio: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let command = args.command;
    tether_bus::startup::run_node(
        NAME,
        args.config.config.as_deref(),
        |layers| {
            if let Some(Cmd::Mcp { stdio: false }) = command {
                anyhow::bail!("`mcp` needs a transport: `shell-server mcp --stdio`");
            }
            Ok(ShellConfig::load(layers)?)
        },
        |bus, cfg, shutdown| async move {
            match command {
                None => tether_shell_server::run(bus, cfg, shutdown).await,
                Some(Cmd::Mcp { .. }) => {
                    let token = std::env::var("TETHER_TOKEN")
                        .ok()
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty());
                    tether_shell_server::run_stdio(bus, cfg, token).await
                }
            }
        },
    )
    .await
}
