//! The `tether` operator CLI as a library, so its parts are tested without a shell.
//!
//! - [`call`]: request any subject (`/containers/create` or `containers.create`), JSON or protobuf.
//! - [`ps`]: live nodes and endpoints from the micro protocol.
//! - [`up`]: bring a fleet up from a launch file (`deploy/bringup.toml`), supervise, tear down;
//!   [`up_bus`]: the bus it uses or starts; [`up_workers`]: the file's `[[workers]]`.
//! - [`identity`]: signing keys, offline operator tokens, agents and tokens through the node.
//! - [`workers`]: worker deployments (`tether workers deploy|ls|scale|rm`).
//!
//! Exit codes: 0 ok, 1 the service answered with an error, 2 usage, 3 nothing answered
//! (no responders or timed out), 64 bad launch file or configuration.

pub mod a2a;
pub mod bus_access;
pub mod call;
pub mod identity;
pub mod ping;
pub mod ps;
pub mod up;
pub mod up_bus;
pub mod up_workers;
pub mod workers;

/// Exit code: the service answered with an error.
pub const EXIT_SERVICE_ERROR: i32 = 1;
/// Exit code: nothing answered.
pub const EXIT_NO_ANSWER: i32 = 3;
/// Exit code: bad launch file or configuration (sysexits EX_USAGE/EX_CONFIG tradition).
pub const EXIT_CONFIG: i32 = 64;

/// An error that carries the process exit code it should end with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The CLI's settings: the same layers as a node's (defaults → `tether.toml` or `--config` →
/// `NATS_URL` → `TETHER_*`), so it reaches the bus with the same credentials and TLS and
/// signs operator tokens for the same issuer and audience; `--server` overrides the address.
pub fn load_config(
    path: Option<&std::path::Path>,
    server: Option<&str>,
) -> Result<(tether_bus::BusConfig, tether_bus::Layers), CliError> {
    let layers = tether_bus::Layers::load(path);
    let mut bus = layers
        .bus()
        .map_err(|e| CliError::new(EXIT_CONFIG, e.to_string()))?;
    if let Some(s) = server.filter(|s| !s.is_empty()) {
        bus.nats_url = s.to_string();
    }
    Ok((bus, layers))
}

/// Parses "500ms", "5s", "2m" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 500ms, 5s, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (ms, s, m, h)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Connects to the bus as the nodes do (credentials, TLS), with a short timeout, one attempt
/// and a clear error.
///
/// The bus checks every connection (auth callout). When the configuration names no NATS
/// credentials, the CLI connects with a tether token: `token` (the one the request carries,
/// `--token` / `TETHER_TOKEN`), else an operator token it signs from the signing key when that
/// key is readable here (local development), else none (and the bus refuses, said plainly).
pub async fn connect(
    cfg: &tether_bus::BusConfig,
    token: Option<&str>,
) -> Result<async_nats::Client, CliError> {
    let mut cfg = cfg.clone();
    if !tether_bus::connect::has_credentials(&cfg) {
        let token = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(t.to_string()),
            None => identity::operator_token(&identity::key_path(None, None), 600, &cfg.auth)
                .ok()
                .map(|(t, _)| t),
        };
        cfg.nats_token = token.map(tether_bus::config::Secret::new);
    }
    let cfg = &cfg;
    let url = cfg.nats_url.as_str();
    let servers = tether_bus::connect::servers(url)
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("{e:#}")))?;
    let opts = tether_bus::connect::options(cfg, "tether-cli")
        .await
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("{e:#}")))?
        // Our own timeouts apply (`call --timeout`); the library's 10 s default would cut them.
        .request_timeout(None)
        .connection_timeout(std::time::Duration::from_secs(3));
    opts.connect(servers).await.map_err(|e| {
        let url = tether_bus::connect::display_url(url);
        let hint = if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
            " (the bus refused these credentials: give a token with --token or TETHER_TOKEN, or NATS credentials in the config)"
        } else {
            ""
        };
        CliError::new(
            EXIT_NO_ANSWER,
            format!("cannot reach the bus at {url}: {e}{hint}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(parse_duration("5s"), Ok(std::time::Duration::from_secs(5)));
        assert_eq!(parse_duration("2"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(std::time::Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
