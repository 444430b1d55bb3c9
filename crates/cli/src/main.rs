//! `tether`: the operator's CLI. Thin: parse → dispatch into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tether_cli::{CliError, call, identity, ps, up};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Operate a tether fleet: call nodes, bring the fleet up, manage agents and tokens"
)]
struct Cli {
    /// Bus address (default: the configured `nats_url`: TETHER_NATS_URL, NATS_URL,
    /// tether.toml, nats://127.0.0.1:4222).
    #[arg(long, global = true)]
    server: Option<String>,
    /// The same configuration layers as the nodes (credentials, TLS, auth issuer and audience).
    #[command(flatten)]
    config: tether_bus::startup::ConfigArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one request: `tether call /agents/list '{}'`. `-` reads the body from stdin.
    Call(CallCmd),
    /// List live nodes, their endpoints and request counts.
    Ps {
        /// How long to collect answers.
        #[arg(long, default_value = "500ms", value_parser = tether_cli::parse_duration)]
        wait: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Health check: exit 0 when an instance of NODE on this host answers `$SRV.PING.<NODE>`
    /// (a container probe, run with the node's own credentials), else 3.
    Ping {
        node: String,
        /// How long to wait for an answer.
        #[arg(long, default_value = "2s", value_parser = tether_cli::parse_duration)]
        timeout: std::time::Duration,
        /// Accept an instance on any host.
        #[arg(long)]
        any: bool,
    },
    /// Bring the fleet up from a launch file and keep it up until Ctrl-C.
    Up {
        #[arg(long, default_value = "deploy/bringup.toml")]
        launch: PathBuf,
    },
    /// The bus's own keys: `tether bus init` writes the key bundle (node nkeys, auth-callout
    /// keys, admin password) and the server configuration that enforces it.
    Bus {
        #[command(subcommand)]
        cmd: BusCmd,
    },
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Agents, through the permission node (operator token from --token or TETHER_TOKEN).
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// A2A agents, through the A2A gateway (a token with a2a:call from --token or TETHER_TOKEN).
    A2a {
        #[command(subcommand)]
        cmd: A2aCmd,
    },
    /// Worker deployments, through the orchestrators (operator token from --token or
    /// TETHER_TOKEN, else one signed here from the signing key).
    Workers {
        #[command(subcommand)]
        cmd: WorkersCmd,
    },
}

#[derive(Args)]
struct DeployArgs {
    #[command(flatten)]
    spec: tether_cli::workers::Deploy,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: TokenArg,
}

#[derive(Subcommand)]
enum WorkersCmd {
    /// Create a deployment, or change it (the same spec again changes nothing; a changed one
    /// rolls the replicas one at a time).
    Deploy(Box<DeployArgs>),
    /// Every deployment, with its running replicas on the hosts that answered.
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: TokenArg,
    },
    /// Set a deployment's replicas (within its min and max).
    Scale {
        name: String,
        replicas: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: TokenArg,
    },
    /// Remove a deployment: every host removes its replicas.
    Rm {
        name: String,
        #[command(flatten)]
        auth: TokenArg,
    },
}

#[derive(Subcommand)]
enum A2aCmd {
    /// The agents whose workers are alive (`--all`: every agent with a card).
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: TokenArg,
    },
}

#[derive(Args)]
struct CallCmd {
    /// `/containers/create` or `containers.create`.
    subject: String,
    /// JSON body (`-` for stdin; default `{}`).
    body: Option<String>,
    /// Extra header `Key:Value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    #[command(flatten)]
    auth: TokenArg,
    #[arg(long, default_value = "10s", value_parser = tether_cli::parse_duration)]
    timeout: std::time::Duration,
    /// Deployment subject prefix.
    #[arg(long)]
    prefix: Option<String>,
    /// Send protobuf: encode the JSON body as this message type (e.g. RegisterAgentRequest).
    #[arg(long)]
    proto: Option<String>,
    /// Decode a protobuf reply as this message type.
    #[arg(long)]
    reply_type: Option<String>,
}

#[derive(Args)]
struct TokenArg {
    /// Bearer token (default: TETHER_TOKEN).
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum BusCmd {
    /// Make the bundle in `--dir` (default: $TETHER_BUS_KEYS_DIR, else bus-keys/ beside the
    /// signing key) unless it is there, and write `authorization.conf` and `nats-server.conf`
    /// (which includes `--server-config` when given) into it.
    Init {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Write a new Ed25519 signing key for the permission node (0600).
    Init {
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token: `--operator` offline from the signing key, or `--agent ID` through the node.
    Issue {
        #[arg(long, conflicts_with = "agent")]
        operator: bool,
        #[arg(long)]
        agent: Option<String>,
        /// Lifetime in seconds (operator default 3600; agent default: the node's).
        #[arg(long)]
        ttl: Option<u32>,
        /// Narrow an agent token to these scopes.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        auth: TokenArg,
        /// Print the whole answer as JSON instead of the token alone.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// What an agent process needs to connect to the bus: the URL, a fresh token (the
    /// connection's credential and the requests' bearer), its inbox prefix; as environment
    /// lines (default) or JSON. For a container, write the token to a file and give the path
    /// in TETHER_NATS_TOKEN_FILE: never put it in the container's environment.
    Creds {
        agent_id: String,
        /// Token lifetime in seconds (default: the permission node's).
        #[arg(long)]
        ttl: Option<u32>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: TokenArg,
    },
    Register {
        agent_id: String,
        #[arg(long)]
        space: String,
        /// A scope to give (repeat for more). Without any: the default agent scopes
        /// (containers:read/write/exec, tools:run, relics:write, shell:exec, model:call,
        /// events:read, a2a:call).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[command(flatten)]
        auth: TokenArg,
    },
    List {
        #[arg(long)]
        space: Option<String>,
        #[command(flatten)]
        auth: TokenArg,
    },
    Get {
        agent_id: String,
        #[command(flatten)]
        auth: TokenArg,
    },
    Revoke {
        agent_id: Option<String>,
        #[arg(long, conflicts_with = "agent_id")]
        jti: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        auth: TokenArg,
    },
}

async fn request(
    bus: &tether_bus::BusConfig,
    subject: &str,
    body: serde_json::Value,
    token: Option<String>,
) -> Result<String, CliError> {
    let client = tether_cli::connect(bus, token.as_deref()).await?;
    let args = call::CallArgs {
        subject: subject.into(),
        body: body.to_string(),
        headers: vec![],
        token,
        timeout: std::time::Duration::from_secs(10),
        prefix: None,
        proto: None,
        reply_type: None,
    };
    Ok(call::call(&client, &args).await?.stdout)
}

/// The request's token, else an operator token signed here from the signing key (local
/// development), else none.
fn token_or_operator(token: Option<String>, bus: &tether_bus::BusConfig) -> Option<String> {
    token.filter(|t| !t.is_empty()).or_else(|| {
        tether_cli::identity::operator_token(
            &tether_cli::identity::key_path(None, None),
            600,
            &bus.auth,
        )
        .ok()
        .map(|(t, _)| t)
    })
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let (bus, layers) =
        tether_cli::load_config(cli.config.config.as_deref(), cli.server.as_deref())?;
    let server = &bus;
    match cli.cmd {
        Cmd::Call(c) => {
            let body = match c.body.as_deref() {
                Some("-") => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| CliError::new(2, e.to_string()))?;
                    s
                }
                Some(b) => b.to_string(),
                None => "{}".into(),
            };
            let headers = c
                .headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| CliError::new(2, "headers are Key:Value"))?;
            let client = tether_cli::connect(server, c.auth.token.as_deref()).await?;
            let args = call::CallArgs {
                subject: c.subject,
                body,
                headers,
                token: c.auth.token,
                timeout: c.timeout,
                prefix: c.prefix,
                proto: c.proto,
                reply_type: c.reply_type,
            };
            println!("{}", call::call(&client, &args).await?.stdout);
        }
        Cmd::Ping { node, timeout, any } => {
            let cfg = tether_cli::ping::config_for(server, &node);
            let client = tether_cli::connect(&cfg, None).await?;
            let here = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .map_err(|e| CliError::new(1, format!("cannot read the hostname: {e}")))?;
            let host = (!any).then_some(here.as_str());
            let p = tether_cli::ping::ping(&client, &node, host, timeout).await?;
            println!("{} {} {}", p.name, p.id, p.version);
        }
        Cmd::Ps { wait, json } => {
            let client = tether_cli::connect(server, None).await?;
            let list = ps::instances(&client, wait)
                .await
                .map_err(|e| CliError::new(1, e.to_string()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                print!("{}", ps::render(&list));
            }
        }
        Cmd::A2a {
            cmd: A2aCmd::Ls { all, json, auth },
        } => {
            let token = token_or_operator(auth.token, server);
            let answer = request(server, "a2a.agents", serde_json::json!({}), token).await?;
            let agents = tether_cli::a2a::parse(&answer, all).map_err(|e| CliError::new(1, e))?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", tether_cli::a2a::render(&agents));
            }
        }
        Cmd::Workers { cmd } => workers(server, cmd).await?,
        Cmd::Up { launch } => {
            up::up(
                up::UpArgs {
                    launch,
                    server: cli.server,
                },
                tether_bus::shutdown_signal(),
            )
            .await?;
        }
        Cmd::Bus {
            cmd: BusCmd::Init { dir, server_config },
        } => {
            let bus = match dir {
                Some(d) => tether_cli::bus_access::LocalBus::load_or_create_in(d)?,
                None => tether_cli::bus_access::LocalBus::load_or_create()?,
            };
            let conf = bus.write_server_conf(server_config.as_deref())?;
            eprintln!(
                "bus keys in {}; start nats-server with -c {} (or include authorization.conf there)",
                bus.dir.display(),
                conf.display()
            );
        }
        Cmd::Keys {
            cmd: KeysCmd::Init { path, force },
        } => {
            let path = identity::key_path(path.as_deref(), Some(&layers));
            let kid = identity::keys_init(&path, force)?;
            eprintln!("wrote signing key {kid} to {}", path.display());
        }
        Cmd::Token {
            cmd:
                TokenCmd::Issue {
                    operator,
                    agent,
                    ttl,
                    scopes,
                    key_file,
                    auth,
                    json,
                },
        } => {
            if operator {
                let path = identity::key_path(key_file.as_deref(), Some(&layers));
                // Signed for the configured issuer and audience, as the fleet verifies them.
                let (token, claims) =
                    identity::operator_token(&path, u64::from(ttl.unwrap_or(3600)), &bus.auth)?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"token": token, "agent_id": claims.sub, "scopes": claims.scopes, "jti": claims.jti, "expires_at": claims.exp})
                    );
                } else {
                    println!("{token}");
                }
            } else if let Some(agent) = agent {
                let body = serde_json::json!({"agent_id": agent, "ttl_seconds": ttl.unwrap_or(0), "scopes": scopes});
                let out = request(server, "tokens.issue", body, auth.token).await?;
                if json {
                    println!("{out}");
                } else {
                    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                    println!("{}", v["token"].as_str().unwrap_or_default());
                }
            } else {
                return Err(CliError::new(2, "say --operator or --agent <agent_id>"));
            }
        }
        Cmd::Agent {
            cmd:
                AgentCmd::Creds {
                    agent_id,
                    ttl,
                    json,
                    auth,
                },
        } => {
            let body = serde_json::json!({"agent_id": agent_id, "ttl_seconds": ttl.unwrap_or(0)});
            let out = request(server, "tokens.issue", body, auth.token).await?;
            let issued: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let creds = identity::agent_creds(&bus.nats_url, &agent_id, &issued)?;
            println!("{}", if json { creds.json() } else { creds.env() });
        }
        Cmd::Agent { cmd } => {
            let out = match cmd {
                AgentCmd::Creds { .. } => unreachable!("handled above"),
                AgentCmd::Register {
                    agent_id,
                    space,
                    scopes,
                    auth,
                } => {
                    let scopes = if scopes.is_empty() {
                        tether_auth::Scope::AGENT_DEFAULTS
                            .iter()
                            .map(|s| s.as_str().to_string())
                            .collect()
                    } else {
                        scopes
                    };
                    request(
                        server,
                        "agents.register",
                        serde_json::json!({"agent_id": agent_id, "space": space, "scopes": scopes}),
                        auth.token,
                    )
                    .await?
                }
                AgentCmd::List { space, auth } => {
                    request(
                        server,
                        "agents.list",
                        serde_json::json!({"space": space.unwrap_or_default()}),
                        auth.token,
                    )
                    .await?
                }
                AgentCmd::Get { agent_id, auth } => {
                    request(
                        server,
                        "agents.get",
                        serde_json::json!({"agent_id": agent_id}),
                        auth.token,
                    )
                    .await?
                }
                AgentCmd::Revoke {
                    agent_id,
                    jti,
                    reason,
                    auth,
                } => {
                    if agent_id.is_none() && jti.is_none() {
                        return Err(CliError::new(2, "name an agent id or --jti"));
                    }
                    let body = serde_json::json!({"agent_id": agent_id.unwrap_or_default(), "jti": jti.unwrap_or_default(), "reason": reason.unwrap_or_default()});
                    request(server, "agents.revoke", body, auth.token).await?
                }
            };
            println!("{out}");
        }
    }
    Ok(())
}

/// How a `tether workers` answer is printed (unless `--json`).
enum Show {
    Status,
    Table,
    Removed(String),
}

async fn workers(server: &tether_bus::BusConfig, cmd: WorkersCmd) -> Result<(), CliError> {
    use serde_json::json;
    use tether_cli::workers as w;
    let (subject, body, auth, json, show) = match cmd {
        WorkersCmd::Deploy(d) => {
            let body = d.spec.body().map_err(|e| CliError::new(2, e))?;
            ("workers.deploy", body, d.auth, d.json, Show::Status)
        }
        WorkersCmd::Ls { json, auth } => ("workers.list", json!({}), auth, json, Show::Table),
        WorkersCmd::Scale {
            name,
            replicas,
            json,
            auth,
        } => {
            let body = json!({"name": name, "replicas": replicas});
            ("workers.scale", body, auth, json, Show::Status)
        }
        WorkersCmd::Rm { name, auth } => {
            let body = json!({"name": name});
            ("workers.remove", body, auth, false, Show::Removed(name))
        }
    };
    let token = token_or_operator(auth.token, server);
    let out = request(server, subject, body, token).await?;
    let bad_answer = |e: String| CliError::new(1, e);
    match show {
        _ if json => println!("{out}"),
        Show::Status => println!("{}", w::summary(&out).map_err(bad_answer)?),
        Show::Table => print!("{}", w::render(&out).map_err(bad_answer)?),
        Show::Removed(name) => println!("{name} removed"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {}", e.message);
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}
