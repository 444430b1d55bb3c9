//! The daemon's bus connections' settings, shared by the exec subject (`serve`) and the pool
//! subject and bound connection of a bind over the bus (`busbind`).
//!
//! Design decisions (see `serve` for why): the token file is re-read at every (re)connect and
//! its content never logged; reconnects go on forever with a short backoff; the first connect
//! of the token-file connection is retried in the background, while a bus bind's connection
//! (`tuned` alone) fails at once so its bind request can be answered.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;

use crate::config::BusSettings;

/// The queue group of every space daemon.
pub const QUEUE: &str = "tether-spaced";

/// Connect options: token file re-read at every connect, reconnect forever.
pub fn options(bus: &BusSettings) -> ConnectOptions {
    let o = match bus.token_file.clone() {
        Some(path) => ConnectOptions::with_auth_callback(move |_nonce| {
            let path = path.clone();
            async move {
                let mut auth = async_nats::Auth::new();
                auth.token = Some(read_token(&path).map_err(async_nats::AuthError::new)?);
                Ok(auth)
            }
        }),
        None => ConnectOptions::new(),
    };
    tuned(o).retry_on_initial_connect()
}

/// Every connection's settings but the first connect's retry: reconnect forever with
/// [`reconnect_delay`], a 5 s ping, bus events logged.
pub fn tuned(o: ConnectOptions) -> ConnectOptions {
    o.name("tether-spaced")
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .ping_interval(Duration::from_secs(5))
        .event_callback(|event| async move {
            tracing::info!(event = %event, "bus event");
        })
}

/// Delay before connect attempt `n` (async-nats counts from 1): none for the first, then
/// 100 ms doubling up to 2 s, as every tether client (`bus::connect`).
pub fn reconnect_delay(n: usize) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(n.min(7)).unwrap_or(7) - 2;
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(2))
}

/// The trimmed token in `path`; the error names the file, never its content.
pub fn read_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("the token file {} is empty", path.display())),
        Err(e) => Err(format!(
            "cannot read the token file {}: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connect_does_not_wait_and_retries_back_off() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(1000), Duration::from_secs(2));
    }

    #[test]
    fn a_token_error_names_the_file_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("t");
        assert!(read_token(&f).expect_err("missing").contains("cannot read"));
        std::fs::write(&f, "  \n").expect("write");
        assert!(read_token(&f).expect_err("empty").contains("empty"));
        std::fs::write(&f, " tok.en \n").expect("write");
        assert_eq!(read_token(&f).as_deref(), Ok("tok.en"));
    }
}
