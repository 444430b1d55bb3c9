//! The bus `tether up` uses: which address, whether it may start a server there, and its
//! admin connection to it.

use std::time::Duration;

use crate::{CliError, EXIT_CONFIG};

fn config_err(m: impl Into<String>) -> CliError {
    CliError::new(EXIT_CONFIG, m)
}

/// The bus `tether up` uses: `--server`, else `TETHER_NATS_URL`, else `NATS_URL`, else the
/// launch file's `[bus] url` (an empty value counts as unset).
pub fn bus_url(server: Option<&str>, launch: &str, env: impl Fn(&str) -> Option<String>) -> String {
    let given = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    given(server.map(str::to_string))
        .or_else(|| given(env("TETHER_NATS_URL")))
        .or_else(|| given(env("NATS_URL")))
        .unwrap_or_else(|| launch.to_string())
}

pub fn host_port(url: &str) -> (String, u16) {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest
        .split(',')
        .next()
        .unwrap_or(rest)
        .rsplit('@')
        .next()
        .unwrap_or(rest);
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(4222)),
        None => (hostport.to_string(), 4222),
    }
}

/// Nothing answered `tether up`'s admin connection at `url`. A server of its own is started
/// only for one address where nothing listens: a list names a cluster someone else runs, and
/// a server that listens but refused the connection is not ours to replace.
pub async fn refuse_to_start_a_server(url: &str) -> Result<(), CliError> {
    let shown = tether_bus::connect::display_url(url);
    let servers = tether_bus::connect::servers(url).map_err(|e| config_err(format!("{e:#}")))?;
    for s in &servers {
        let addr = format!("{}:{}", s.host(), s.port());
        let open = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(addr.as_str()),
        )
        .await;
        if matches!(open, Ok(Ok(_))) {
            return Err(CliError::new(
                1,
                format!(
                    "a server listens at {addr} but refused this machine's bus admin (see `tether bus init`); not starting another"
                ),
            ));
        }
    }
    if servers.len() > 1 {
        return Err(CliError::new(
            1,
            format!(
                "none of the bus servers {shown} answers; `tether up` starts a server only for a single address"
            ),
        ));
    }
    Ok(())
}

/// A connection as the bundle's admin user (`admin_url` carries the credentials).
pub async fn admin_connect(admin_url: &str) -> anyhow::Result<async_nats::Client> {
    let cfg = tether_bus::BusConfig {
        nats_url: admin_url.to_string(),
        ..Default::default()
    };
    Ok(tether_bus::connect::options(&cfg, "tether-up")
        .await?
        .connect(tether_bus::connect::servers(admin_url)?)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bus_comes_from_the_flag_then_the_environment_then_the_file() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let file = "nats://127.0.0.1:4222";
        let both = env(&[
            ("TETHER_NATS_URL", "nats://t:1"),
            ("NATS_URL", "nats://n:2"),
        ]);
        assert_eq!(bus_url(Some("nats://s:3"), file, both), "nats://s:3");
        assert_eq!(bus_url(None, file, both), "nats://t:1");
        assert_eq!(
            bus_url(None, file, env(&[("NATS_URL", "nats://n:2")])),
            "nats://n:2"
        );
        assert_eq!(bus_url(None, file, env(&[("TETHER_NATS_URL", " ")])), file);
        assert_eq!(bus_url(Some(""), file, env(&[])), file);
    }

    #[test]
    fn host_and_port() {
        assert_eq!(
            host_port("nats://127.0.0.1:4333"),
            ("127.0.0.1".into(), 4333)
        );
        assert_eq!(host_port("nats://u:p@h:1,nats://x:2"), ("h".into(), 1));
    }
}
