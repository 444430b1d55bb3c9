//! An exec request, decoded and checked into a [`Plan`] before anything runs.
//!
//! Pure apart from reading the container's user database and checking the workdir exists,
//! so every bad input is a unit test: a refusal changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_proto::DaemonExecRequest;

use crate::config::Limits;
use crate::reply::Refusal;
use crate::users::{self, Ids};

/// What to run, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// argv[0] and the rest (for a `command`: `sh`, `-c`, the command).
    pub argv: Vec<String>,
    /// `None`: standard input is /dev/null.
    pub stdin: Option<Vec<u8>>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
    pub user: Option<Ids>,
    pub timeout: Duration,
    pub max_output: u32,
}

/// Decodes `body` (strict JSON: unknown fields are refused) and checks it against `limits`;
/// users are looked up under `root`.
pub fn decode(body: &[u8], limits: &Limits, root: &Path) -> Result<Plan, Refusal> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let req: DaemonExecRequest = serde_json::from_slice(body).map_err(|e| {
        Refusal::bad_request(format!("the request is not a DaemonExecRequest: {e}"))
    })?;
    check(req, limits, root)
}

fn check(req: DaemonExecRequest, limits: &Limits, root: &Path) -> Result<Plan, Refusal> {
    let argv = match (req.argv.is_empty(), req.command.is_empty()) {
        (false, false) => {
            return Err(Refusal::bad_request(
                "give either argv or command, not both",
            ));
        }
        (true, true) => {
            return Err(Refusal::bad_request(
                "give argv (a list) or command (a string)",
            ));
        }
        (false, true) => {
            if req.argv[0].is_empty() {
                return Err(Refusal::bad_request("argv[0] is empty"));
            }
            req.argv
        }
        (true, false) => vec!["sh".into(), "-c".into(), req.command],
    };
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Refusal::bad_request("argv holds a NUL byte"));
    }
    let mut env: Vec<(String, String)> = req.env.into_iter().collect();
    env.sort();
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Refusal::bad_request(format!(
                "env name {k:?} is not a variable name (empty, `=` or NUL) or its value holds NUL"
            )));
        }
    }
    let workdir = if req.workdir.is_empty() {
        None
    } else {
        let w = PathBuf::from(&req.workdir);
        if !w.is_absolute() {
            return Err(Refusal::bad_request(format!(
                "workdir {:?} is not an absolute path",
                req.workdir
            )));
        }
        if !w.is_dir() {
            return Err(Refusal::not_found(format!(
                "workdir {:?} is not a directory in the container",
                req.workdir
            )));
        }
        Some(w)
    };
    let user = if req.user.is_empty() {
        None
    } else {
        Some(users::resolve(&req.user, root).map_err(Refusal::bad_request)?)
    };
    let timeout = match req.timeout_ms {
        0 => limits.default_timeout,
        ms => {
            let t = Duration::from_millis(u64::from(ms));
            if t > limits.max_timeout {
                return Err(Refusal::bad_request(format!(
                    "timeout_ms {ms} is over the most allowed, {}",
                    limits.max_timeout.as_millis()
                )));
            }
            t
        }
    };
    let max_output = match req.max_output_bytes {
        0 => limits.default_max_output,
        n if n > limits.max_output => {
            return Err(Refusal::bad_request(format!(
                "max_output_bytes {n} is over the most allowed, {}",
                limits.max_output
            )));
        }
        n => n,
    };
    Ok(Plan {
        argv,
        stdin: (!req.stdin.is_empty()).then(|| req.stdin.into_bytes()),
        env,
        workdir,
        user,
        timeout,
        max_output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str) -> Result<Plan, Refusal> {
        decode(json.as_bytes(), &Limits::default(), Path::new("/"))
    }

    fn refused(json: &str) -> (u16, String) {
        let r = plan(json).expect_err(json);
        (r.status, r.detail)
    }

    #[test]
    fn argv_or_command() {
        let p = plan(r#"{"argv":["ls","-l"]}"#).expect("argv");
        assert_eq!(p.argv, ["ls", "-l"]);
        assert_eq!(p.timeout, Limits::default().default_timeout);
        assert_eq!(p.stdin, None);
        let p = plan(r#"{"command":"echo hi | wc"}"#).expect("command");
        assert_eq!(p.argv, ["sh", "-c", "echo hi | wc"]);
    }

    #[test]
    fn bad_requests_say_why() {
        for (json, status, says) in [
            ("not json", 400, "not a DaemonExecRequest"),
            ("", 400, "give argv"),
            (r#"{"argv":[]}"#, 400, "give argv"),
            (r#"{"argv":[""]}"#, 400, "argv[0] is empty"),
            (r#"{"argv":["a"],"command":"b"}"#, 400, "not both"),
            (r#"{"argv":["a"],"cmd":"b"}"#, 400, "cmd"),
            (r#"{"argv":["a\u0000"]}"#, 400, "NUL"),
            (r#"{"argv":["a"],"env":{"A=B":"c"}}"#, 400, "variable name"),
            (r#"{"argv":["a"],"workdir":"tmp"}"#, 400, "absolute"),
            (
                r#"{"argv":["a"],"workdir":"/no/such/dir"}"#,
                404,
                "not a directory",
            ),
            (
                r#"{"argv":["a"],"user":"no-such-user-x"}"#,
                400,
                "unknown user",
            ),
            (r#"{"argv":["a"],"timeout_ms":90000000}"#, 400, "timeout_ms"),
            (
                r#"{"argv":["a"],"timeout_ms":-1}"#,
                400,
                "DaemonExecRequest",
            ),
            (
                r#"{"argv":["a"],"max_output_bytes":999999999}"#,
                400,
                "max_output_bytes",
            ),
        ] {
            let (s, d) = refused(json);
            assert_eq!(s, status, "{json}: {d}");
            assert!(d.contains(says), "{json}: {d}");
        }
    }

    #[test]
    fn the_rest_is_carried() {
        let p = plan(
            r#"{"argv":["x"],"stdin":"in","env":{"B":"2","A":"1"},"workdir":"/tmp","user":"0:0","timeout_ms":5,"max_output_bytes":10}"#,
        )
        .expect("valid");
        assert_eq!(p.stdin.as_deref(), Some(b"in".as_slice()));
        assert_eq!(p.env, [("A".into(), "1".into()), ("B".into(), "2".into())]);
        assert_eq!(p.workdir, Some(PathBuf::from("/tmp")));
        assert_eq!(p.user, Some(Ids { uid: 0, gid: 0 }));
        assert_eq!(p.timeout, Duration::from_millis(5));
        assert_eq!(p.max_output, 10);
    }
}
