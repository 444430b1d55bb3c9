//! The bus connection: credentials from config, connect with retry, reconnect forever.
//!
//! The first connection is retried with backoff until it succeeds (a node may start before
//! its nats-server, as in `tether up`); after that async-nats reconnects on its own with no
//! attempt limit. Every disconnect and reconnect is logged.
//!
//! The bus authorizes every connection: a node brings its kind's nkey, an agent or worker its
//! tether token (from a file re-read at every reconnect, so the connection survives the token's
//! expiry as long as someone renews the file). Each client listens on its identity's inbox
//! (`tether_auth::inbox`), the only one the bus lets it read. URLs in logs carry no credentials.

use std::path::Path;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use tether_auth::inbox::{agent_inbox_prefix, node_inbox_prefix, peek_subject};
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;

/// Delay before connect attempt `n` (async-nats counts from 1 and waits this long before
/// every attempt, the first included): none for the first, then 100 ms doubling, capped at
/// 2 s, so a restarted server is found again within a couple of seconds and a first connect
/// (or the reconnect after a token's expiry) costs no wait at all.
pub fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempt.min(7)).unwrap_or(7);
    Duration::from_millis(50 * 2u64.pow(exp - 1)).min(Duration::from_secs(2))
}

/// How often a client pings its server (async-nats: 60 s). Three unanswered pings drop the
/// connection, so this is also how long a busy machine may starve a client or its server
/// before a good connection is dropped for nothing: not shorter.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long one connect attempt to one server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connect options every bus client of tether uses: credentials, TLS, inbox, reconnects,
/// and logged connection events (the CLI starts from these too, then shortens the timeouts).
///
/// With `nats_token_file` the token is read again at every (re)connect, so a client whose
/// connection the server closed at the token's expiry comes back with the renewed one.
pub async fn options(cfg: &BusConfig, name: &str) -> anyhow::Result<ConnectOptions> {
    let mut o = match &cfg.nats_token_file {
        Some(path) => {
            let path = path.clone();
            ConnectOptions::with_auth_callback(move |_nonce| {
                let path = path.clone();
                async move {
                    let mut auth = async_nats::Auth::new();
                    auth.token = Some(read_token(&path).map_err(async_nats::AuthError::new)?);
                    Ok(auth)
                }
            })
        }
        None => ConnectOptions::new(),
    };
    o = o
        .name(name)
        .custom_inbox_prefix(inbox_prefix(cfg, name)?)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        // A server lost without a TCP reset (its host gone) is noticed after three unanswered
        // pings; a killed process's connection breaks at once and costs no wait.
        .ping_interval(PING_INTERVAL)
        // A dead address of a cluster's list costs at most this before the next is tried.
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(Duration::from_secs(
            cfg.request_timeout_seconds.max(1),
        )))
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("bus connection (re)established"),
                Event::Disconnected => tracing::warn!("bus connection lost; reconnecting"),
                Event::LameDuckMode => tracing::warn!("bus server entered lame duck mode"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
                other => tracing::info!(event = %other, "bus event"),
            }
        });
    if let (Some(u), Some(p)) = (&cfg.nats_user, &cfg.nats_password) {
        o = o.user_and_password(u.clone(), p.expose().to_string());
    } else if cfg.nats_token.is_none()
        && let Some((user, pass)) = url_credentials(&cfg.nats_url)
    {
        // `nats://user:password@host` (or `nats://token@host`), as nats-py and the nats CLI
        // read it; async-nats itself ignores a URL's credentials.
        o = match pass {
            Some(p) => o.user_and_password(user, p),
            None => o.token(user),
        };
    }
    if let Some(t) = &cfg.nats_token {
        o = o.token(t.expose().to_string());
    }
    if let Some(path) = &cfg.nats_nkey_file {
        o = o.nkey(read_seed(path)?);
    }
    if let Some(path) = &cfg.nats_creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read NATS creds file {}: {e}", path.display()))?;
    }
    if cfg.nats_tls.required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &cfg.nats_tls.ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.nats_tls.cert_file, &cfg.nats_tls.key_file) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    Ok(o)
}

/// The inbox prefix of a client (see [`BusConfig::nats_inbox_prefix`]): the bus only lets an
/// agent subscribe to its own, so a client that connects with a token must listen there.
fn inbox_prefix(cfg: &BusConfig, name: &str) -> anyhow::Result<String> {
    if let Some(p) = cfg.nats_inbox_prefix.as_ref().filter(|p| !p.is_empty()) {
        return Ok(p.clone());
    }
    let token = match (&cfg.nats_token_file, &cfg.nats_token) {
        (Some(path), _) => Some(read_token(path).map_err(anyhow::Error::msg)?),
        (None, Some(t)) => Some(t.expose().to_string()),
        (None, None) => None,
    };
    Ok(match token.as_deref().and_then(peek_subject) {
        Some(agent) => agent_inbox_prefix(&agent),
        None => node_inbox_prefix(name),
    })
}

/// The token in a token file (surrounding whitespace dropped); the error never quotes it.
pub fn read_token(path: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(t.to_string())
}

/// The nkey seed in a seed file: its first line starting with `S` (comments and blank lines,
/// as in a `.creds` file, are fine). The one reader of seed files, nodes' and the callout's.
pub fn read_seed(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read nkey seed file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{} holds no nkey seed", path.display()))
}

/// Whether `cfg` names any credentials for the connection (a URL's included).
pub fn has_credentials(cfg: &BusConfig) -> bool {
    cfg.nats_user.is_some()
        || cfg.nats_token.is_some()
        || cfg.nats_token_file.is_some()
        || cfg.nats_nkey_file.is_some()
        || cfg.nats_creds_file.is_some()
        || url_credentials(&cfg.nats_url).is_some()
}

/// The `user[:password]@` of the first URL in a comma-separated list that has one.
fn url_credentials(urls: &str) -> Option<(String, Option<String>)> {
    urls.split(',').find_map(|u| {
        let rest = u.trim().split_once("://").map_or(u.trim(), |(_, r)| r);
        let (userinfo, _) = rest.rsplit_once('@')?;
        Some(match userinfo.split_once(':') {
            Some((user, pass)) => (user.to_string(), Some(pass.to_string())),
            None => (userinfo.to_string(), None),
        })
    })
}

/// A bus URL fit for logs: any `user:password@` or `token@` is left out.
pub fn display_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}{}", &u[..s + 3], &u[at + 1..]),
            (None, Some(at)) => u[at + 1..].to_string(),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of a bus URL: one URL or a comma-separated list of them (`nats://a:4222,
/// nats://b:4222`; `nats://` may be left out). The client learns the rest of a cluster from
/// the server it connects to. An empty or malformed entry is an error naming it.
pub fn servers(urls: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let list: Vec<&str> = urls.split(',').map(str::trim).collect();
    if list.iter().all(|u| u.is_empty()) {
        anyhow::bail!("no bus server given (nats_url is empty)");
    }
    list.into_iter()
        .map(|u| {
            if u.is_empty() {
                anyhow::bail!(
                    "the bus server list {:?} has an empty entry",
                    display_url(urls)
                );
            }
            u.parse::<ServerAddr>().map_err(|e| {
                anyhow::anyhow!("bus server {:?} is not a NATS URL: {e}", display_url(u))
            })
        })
        .collect()
}

/// Why [`request`] got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    #[error("nothing serves this subject (no responders)")]
    NoResponders,
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    #[error(
        "the bus connection was lost while the request was out: it may or may not have been served"
    )]
    ConnectionLost,
    #[error("{0}")]
    Other(String),
}

/// How often [`request`] looks at its connection while it waits.
const LOST_CHECK: Duration = Duration::from_millis(50);

/// One request/reply that fails fast when the connection it went out on is lost: a request
/// in flight when the client's server dies gets [`RequestFailure::ConnectionLost`] within
/// [`LOST_CHECK`], instead of waiting out `timeout` for a reply that may never come. The
/// caller decides whether to send it again (only it knows whether that is safe).
pub async fn request(
    client: &Client,
    subject: String,
    req: async_nats::Request,
    timeout: Duration,
) -> Result<async_nats::Message, RequestFailure> {
    let stats = client.statistics();
    let connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
    let lost = async {
        loop {
            tokio::time::sleep(LOST_CHECK).await;
            let now = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
            if client.connection_state() != async_nats::connection::State::Connected
                || now != connects
            {
                return;
            }
        }
    };
    tokio::select! {
        r = client.send_request(subject, req.timeout(Some(timeout))) => r.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => RequestFailure::NoResponders,
            async_nats::RequestErrorKind::TimedOut => RequestFailure::TimedOut(timeout),
            _ => RequestFailure::Other(e.to_string()),
        }),
        () = lost => Err(RequestFailure::ConnectionLost),
    }
}

/// Connects, retrying with backoff until connected or `cancel` fires.
pub async fn connect(
    cfg: &BusConfig,
    name: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<Client> {
    let servers = servers(&cfg.nats_url)?;
    let mut attempt = 0usize;
    loop {
        let opts = options(cfg, name).await?;
        match opts.connect(servers.clone()).await {
            Ok(c) => {
                tracing::info!(url = %display_url(&cfg.nats_url), "connected to bus");
                return Ok(c);
            }
            Err(e) => {
                attempt += 1;
                let d = reconnect_delay(attempt).max(Duration::from_millis(250));
                tracing::warn!(url = %display_url(&cfg.nats_url), error = %e, attempt, "cannot reach bus; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => anyhow::bail!("stopped before the bus could be reached"),
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_carry_no_credentials() {
        assert_eq!(
            display_url("nats://admin:pw@127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            display_url("nats://tok@a:1,nats://b:2"),
            "nats://a:1,nats://b:2"
        );
        assert_eq!(display_url("u:p@host:4222"), "host:4222");
        assert_eq!(
            display_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
    }

    #[test]
    fn a_server_list_is_read_entry_by_entry() {
        let one = servers("nats://127.0.0.1:4222").expect("one");
        assert_eq!(one.len(), 1);
        let three = servers("nats://a:4222, nats://b:4223,c:4224").expect("list");
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].host(), "b");
        assert_eq!(three[2].port(), 4224);
        for (bad, says) in [
            ("", "no bus server"),
            ("nats://a:4222,,nats://b:4222", "empty entry"),
            ("nats://a:4222,nats://b:notaport", "nats://b:notaport"),
            ("nats://user:secret@a:4222,nats://b:x", "nats://b:x"),
        ] {
            let e = servers(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "credentials never in an error: {e}");
        }
    }

    #[test]
    fn the_first_attempt_does_not_wait() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }

    #[test]
    fn credentials_come_from_the_url() {
        assert_eq!(
            url_credentials("nats://a:1,nats://admin:pw@h:2"),
            Some(("admin".into(), Some("pw".into())))
        );
        assert_eq!(url_credentials("tok@h:2"), Some(("tok".into(), None)));
        assert_eq!(url_credentials("nats://h:2"), None);
    }

    #[test]
    fn the_inbox_follows_the_token_else_the_node() {
        let mut cfg = BusConfig::default();
        assert_eq!(
            inbox_prefix(&cfg, "shell-server").expect("test value"),
            "_INBOX_NODES.shell-server"
        );
        let claims = tether_auth::Claims::new("i", "a", "alice", "s", Default::default(), 0, 9);
        let payload = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&claims).expect("test value"),
        );
        cfg.nats_token = Some(crate::config::Secret::new(format!("h.{payload}.s")));
        assert_eq!(inbox_prefix(&cfg, "x").expect("test value"), "_INBOX.alice");
        cfg.nats_inbox_prefix = Some("_INBOX.custom".into());
        assert_eq!(
            inbox_prefix(&cfg, "x").expect("test value"),
            "_INBOX.custom"
        );
    }
}
