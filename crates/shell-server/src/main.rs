//! `shell-server`: config → telemetry → run. Exit 64 on bad configuration.
//!
//! `shell-server` serves `shell.exec` on the bus and MCP over streamable HTTP (`mcp_listen`);
//! `shell-server mcp --stdio` is what an MCP client launches: MCP on stdin/stdout for the
//! agent whose token is in `TETHER_TOKEN` (logs go to stderr).

use clap::{Parser, Subcommand};
use tether_bus::Layers;
use tether_shell_server::ShellConfig;

#[derive(Parser)]
#[command(
    version,
    about = "tether shell-server: shell commands in the caller's own space (shell.exec, MCP exec_command)"
)]
struct Args {
    /// Configuration file (default: ./tether.toml when present).
    #[arg(long, short, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve MCP to one client instead of serving the bus.
    Mcp {
        /// MCP over stdin/stdout (the token comes from TETHER_TOKEN).
        #[arg(long)]
        stdio: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let layers = Layers::load(args.config.as_deref());
    let (bus, cfg) = match (layers.bus(), ShellConfig::load(&layers)) {
        (Ok(b), Ok(c)) => (b, c),
        (Err(e), _) => {
            eprintln!("shell-server: {e}");
            std::process::exit(64);
        }
        (_, Err(e)) => {
            eprintln!("shell-server: {e}");
            std::process::exit(64);
        }
    };
    let _telemetry = tether_bus::telemetry::init(&bus, tether_shell_server::NAME)?;
    match args.command {
        None => tether_shell_server::run(bus, cfg, tether_bus::shutdown_signal()).await,
        Some(Cmd::Mcp { stdio: true }) => {
            let token = std::env::var("TETHER_TOKEN")
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty());
            tether_shell_server::run_stdio(bus, cfg, token).await
        }
        Some(Cmd::Mcp { stdio: false }) => {
            eprintln!("shell-server: `mcp` needs a transport: `shell-server mcp --stdio`");
            std::process::exit(64);
        }
    }
}
