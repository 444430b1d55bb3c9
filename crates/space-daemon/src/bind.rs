//! Pool mode's bind file: what binds a daemon started without a space to one, and the wait for
//! it.
//!
//! A pool container's daemon starts with [`ENV_BIND_FILE`](crate::config::ENV_BIND_FILE)
//! instead of `TETHER_SPACE_ID`. Its exec server waits (before touching the bus) until the
//! orchestrator writes the token file and then the bind file, a [`Bind`] as JSON:
//!
//! ```json
//! {"space": "<space id>", "env": ["KEY=value", "..."]}
//! ```
//!
//! Then it serves `[prefix.]spaces.<space>.daemon.exec` exactly as a daemon started with
//! `TETHER_SPACE_ID=<space>`, and every command it runs gets `env` as its base environment.
//!
//! Design decisions:
//! - Strict, which is its versioning: unknown fields are refused, both fields are required,
//!   the space is a space id (as `TETHER_SPACE_ID`), each `env` entry is `NAME=value` with
//!   `NAME` a variable name (letters, digits, `_`, not first a digit) not starting with
//!   `TETHER_DAEMON_`, no name twice, no NUL; at most [`MAX_ENV`] entries and [`MAX_BYTES`].
//! - The wait is inotify on the file's directory (create, close-after-write, moved-in,
//!   attribute change), set up before the first look at the file, so a file written in
//!   between still wakes it; after each event the file is read again. No timed polling. The
//!   file may be written in place, renamed into place, or be a symlink `<name>` →
//!   `<name>.a`/`.b` replaced by a rename (the target in the same directory: only it is
//!   watched): a missing file, a dangling link or a file cut off mid-JSON is "not yet"
//!   (debug log); a complete but bad file is logged as an error that says what is wrong, and
//!   the wait goes on for a good one.
//! - Env values may be secrets: no error or log here holds one (JSON errors are reduced to
//!   their position; an env entry is named by its index and variable name, never its value).
//! - A restarted exec server finds the file already there and serves at once.
//!
//! The same binding can come over the bus instead (`busbind`): a [`BindRequest`] is a
//! [`Bind`] plus the bus token of the bound space, sent with the header [`BIND_HEADER`]`: 1`,
//! checked by the same rules (and the token: non-empty, no whitespace, no NUL) and never
//! shown (its `Debug` holds no env value and no token).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::config::{DAEMON_ENV_PREFIX, check_space_id};

/// Most `env` entries a bind file may hold.
pub const MAX_ENV: usize = 256;
/// Largest bind file, bytes.
pub const MAX_BYTES: u64 = 64 * 1024;

/// The bind file's content: the space a pool daemon serves, and its commands' base
/// environment (`NAME=value` entries; a request's own `env` overrides a same-named one).
/// The orchestrator writes it with this type (`serde_json`), after [`Bind::check`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    pub space: String,
    pub env: Vec<String>,
}

/// Not `derive`d: the values may be secrets, so only the names are shown.
impl std::fmt::Debug for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = env_names(&self.env);
        f.debug_struct("Bind")
            .field("space", &self.space)
            .field("env_names", &names)
            .finish()
    }
}

/// The variable names of `env` entries, for a `Debug` that shows no value.
fn env_names(env: &[String]) -> Vec<&str> {
    env.iter()
        .map(|e| e.split_once('=').map_or("?", |(k, _)| k))
        .collect()
}

impl Bind {
    /// Checks the content (see the module doc); the error says what is wrong and holds no
    /// env value.
    pub fn check(&self) -> Result<(), String> {
        check_space_id(&self.space).map_err(|e| format!("space: {e}"))?;
        if self.env.len() > MAX_ENV {
            return Err(format!(
                "env has {} entries: at most {MAX_ENV}",
                self.env.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.env.iter().enumerate() {
            let Some((name, value)) = entry.split_once('=') else {
                return Err(format!("env[{i}] is not NAME=value (no `=`)"));
            };
            if !is_env_name(name) {
                return Err(format!(
                    "env[{i}]: {name:?} is not a variable name (letters, digits, `_`; not first a digit)"
                ));
            }
            if name.starts_with(DAEMON_ENV_PREFIX) {
                return Err(format!(
                    "env[{i}]: {name} is a {DAEMON_ENV_PREFIX}* variable, the daemon's own"
                ));
            }
            if value.contains('\0') {
                return Err(format!("env[{i}]: the value of {name} holds a NUL byte"));
            }
            if !seen.insert(name) {
                return Err(format!("env[{i}]: {name} is given twice"));
            }
        }
        Ok(())
    }

    /// The env entries as (name, value), in order (checked entries all have a `=`).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Parses and checks a bind file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Bind, Problem> {
        if bytes.len() as u64 > MAX_BYTES {
            return Err(Problem::Bad(format!(
                "it is over {MAX_BYTES} bytes ({})",
                bytes.len()
            )));
        }
        let bind: Bind = serde_json::from_slice(bytes).map_err(|e| {
            let at = format!("line {} column {}", e.line(), e.column());
            match e.classify() {
                serde_json::error::Category::Eof => {
                    Problem::NotYet(format!("it ends early ({at}): still being written?"))
                }
                serde_json::error::Category::Data => Problem::Bad(format!(
                    "it is not {{\"space\": string, \"env\": [string]}} with no other field ({at})"
                )),
                _ => Problem::Bad(format!("it is not JSON ({at})")),
            }
        })?;
        bind.check().map_err(Problem::Bad)?;
        Ok(bind)
    }
}

/// Header marking a request on the pool subject as a [`BindRequest`]; its one value is `1`
/// (the request format's version).
pub const BIND_HEADER: &str = "Tether-Bind";
/// The one [`BIND_HEADER`] value understood.
pub const BIND_VERSION: &str = "1";

/// A bind over the bus (`busbind`): the bind file's content and the bus token of `space`
/// (as the permission node's `tokens.daemon` makes it), JSON, at most [`MAX_BYTES`]:
///
/// ```json
/// {"space": "<space id>", "env": ["KEY=value"], "token": "<bus token>"}
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    pub space: String,
    pub env: Vec<String>,
    pub token: String,
}

/// Not `derive`d: env values and the token are secrets; only env names are shown.
impl std::fmt::Debug for BindRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = env_names(&self.env);
        f.debug_struct("BindRequest")
            .field("space", &self.space)
            .field("env_names", &names)
            .field("token", &"<hidden>")
            .finish()
    }
}

impl BindRequest {
    /// Parses and checks a bind request's body; the error says what is wrong and holds no
    /// env value and no token.
    pub fn parse(bytes: &[u8]) -> Result<BindRequest, String> {
        if bytes.len() as u64 > MAX_BYTES {
            return Err(format!("it is over {MAX_BYTES} bytes ({})", bytes.len()));
        }
        let req: BindRequest = serde_json::from_slice(bytes).map_err(|e| {
            let at = format!("line {} column {}", e.line(), e.column());
            match e.classify() {
                serde_json::error::Category::Data | serde_json::error::Category::Eof => format!(
                    "it is not {{\"space\": string, \"env\": [string], \"token\": string}} with no other field ({at})"
                ),
                _ => format!("it is not JSON ({at})"),
            }
        })?;
        req.check()?;
        Ok(req)
    }

    /// Checks the bind ([`Bind::check`]) and the token.
    pub fn check(&self) -> Result<(), String> {
        Bind {
            space: self.space.clone(),
            env: self.env.clone(),
        }
        .check()?;
        if self.token.is_empty() {
            return Err("token is empty".into());
        }
        if self.token.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err("token holds whitespace or a NUL byte".into());
        }
        Ok(())
    }

    /// The binding and the token, apart.
    pub fn into_parts(self) -> (Bind, String) {
        let BindRequest { space, env, token } = self;
        (Bind { space, env }, token)
    }
}

/// Why a bind file is not (yet) a binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Missing, a dangling link, or cut off: wait for the next event.
    NotYet(String),
    /// Complete but wrong: logged as an error; wait for a good one.
    Bad(String),
}

/// Whether `name` is a variable name: letters, digits, `_`, not starting with a digit.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads and parses the bind file at `path` (following a symlink).
pub fn read(path: &Path) -> Result<Bind, Problem> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Problem::NotYet("it is not there".into()));
        }
        Err(e) => return Err(Problem::Bad(format!("cannot open it: {e}"))),
    };
    let mut bytes = Vec::new();
    // One byte past the limit is enough to refuse it.
    if let Err(e) = file.take(MAX_BYTES + 1).read_to_end(&mut bytes) {
        return Err(Problem::Bad(format!("cannot read it: {e}")));
    }
    Bind::parse(&bytes)
}

/// The inotify instance (which owns its descriptor) as one tokio can wait on.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Waits until `path` holds a good bind file and returns it (see the module doc). Fails only
/// when its directory cannot be watched (the exec server then exits and is restarted).
pub async fn wait(path: &Path) -> anyhow::Result<Bind> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => anyhow::bail!("the bind file {} has no directory", path.display()),
    };
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| anyhow::anyhow!("inotify: {e}"))?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_ATTRIB,
        )
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    // `AsyncFd::new` is deprecated for its unchecked I/O-safety contract (its replacement,
    // `register`, is `unsafe`, forbidden here). The contract holds: `Watch` owns the inotify
    // descriptor, which stays open and the same until the `AsyncFd` drops it.
    #[allow(deprecated)]
    let watch = AsyncFd::new(Watch(inotify))?;
    tracing::info!(file = %path.display(), "pool mode: waiting for the bind file");
    let mut last_bad: Option<String> = None;
    loop {
        // The watch exists before this look: a file written after it wakes the wait below.
        match read(path) {
            Ok(bind) => {
                tracing::info!(space = %bind.space, env = bind.env.len(), "bound");
                return Ok(bind);
            }
            Err(Problem::NotYet(why)) => {
                tracing::debug!(file = %path.display(), %why, "no bind yet");
            }
            Err(Problem::Bad(why)) => {
                // Once per distinct problem: an unrelated event in the directory does not
                // repeat it.
                if last_bad.as_deref() != Some(why.as_str()) {
                    tracing::error!(file = %path.display(), problem = %why, "a bad bind file: waiting for a good one");
                    last_bad = Some(why);
                }
            }
        }
        let mut ready = watch.readable().await?;
        match ready.try_io(|w| w.get_ref().0.read_events().map_err(std::io::Error::from)) {
            // Which file changed does not matter: reading it again is cheap.
            Ok(Ok(_events)) => {}
            Ok(Err(e)) => anyhow::bail!("reading inotify events: {e}"),
            // Nothing to read after all (readiness cleared): wait again without a re-read.
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(json: &str) -> String {
        match Bind::parse(json.as_bytes()) {
            Err(Problem::Bad(why)) => why,
            other => panic!("{json}: not refused as bad: {other:?}"),
        }
    }

    #[test]
    fn a_good_file_binds_with_its_env() {
        let b = Bind::parse(br#"{"space":"s-1","env":["A=1","B_2=x=y","_C="]}"#).expect("good");
        assert_eq!(b.space, "s-1");
        assert_eq!(
            b.env_pairs(),
            [
                ("A".into(), "1".into()),
                ("B_2".into(), "x=y".into()),
                ("_C".into(), String::new())
            ]
        );
        let written = serde_json::to_vec(&b).expect("serialize");
        assert_eq!(Bind::parse(&written).expect("round trip"), b);
        assert!(Bind::parse(br#"{"space":"s","env":[]}"#).is_ok());
    }

    #[test]
    fn each_bad_file_says_what_is_wrong_and_never_an_env_value() {
        let many: Vec<String> = (0..=MAX_ENV).map(|i| format!("V{i}=1")).collect();
        let many = serde_json::json!({"space": "s", "env": many}).to_string();
        let huge = format!(
            r#"{{"space":"s","env":["A={}"]}}"#,
            "x".repeat(MAX_BYTES as usize)
        );
        for (json, says) in [
            ("not json", "not JSON"),
            (r#"{"space":"s"}"#, "no other field"),
            (r#"{"env":[]}"#, "no other field"),
            (r#"{"space":"s","env":[],"x":1}"#, "no other field"),
            (r#"{"space":"s","env":"SECRET=hush"}"#, "no other field"),
            (r#"{"space":"s","env":[5]}"#, "no other field"),
            (r#"{"space":"","env":[]}"#, "space"),
            (r#"{"space":"a.b","env":[]}"#, "space"),
            (r#"{"space":"*","env":[]}"#, "space"),
            (
                r#"{"space":"s","env":["hush"]}"#,
                "env[0] is not NAME=value",
            ),
            (r#"{"space":"s","env":["=hush"]}"#, "not a variable name"),
            (r#"{"space":"s","env":["1A=hush"]}"#, "not a variable name"),
            (r#"{"space":"s","env":["A-B=hush"]}"#, "not a variable name"),
            (
                r#"{"space":"s","env":["A=1","A=hush"]}"#,
                "env[1]: A is given twice",
            ),
            (
                r#"{"space":"s","env":["TETHER_DAEMON_TOKEN_FILE=/x"]}"#,
                "the daemon's own",
            ),
            (r#"{"space":"s","env":["A=hu\u0000sh"]}"#, "NUL"),
            (many.as_str(), "at most 256"),
            (huge.as_str(), "over 65536 bytes"),
        ] {
            let why = bad(json);
            assert!(why.contains(says), "{json}: {why}");
            assert!(!why.contains("hush"), "{json}: a value in {why}");
        }
    }

    #[test]
    fn a_cut_off_or_missing_file_is_not_yet() {
        for json in ["", r#"{"space":"s","env":["A=1""#, "{"] {
            assert!(
                matches!(Bind::parse(json.as_bytes()), Err(Problem::NotYet(_))),
                "{json:?}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("bind");
        assert!(matches!(read(&f), Err(Problem::NotYet(_))));
        std::os::unix::fs::symlink(dir.path().join("bind.a"), &f).expect("dangling link");
        assert!(matches!(read(&f), Err(Problem::NotYet(_))));
        std::fs::write(dir.path().join("bind.a"), r#"{"space":"s","env":[]}"#).expect("write");
        assert_eq!(read(&f).expect("through the link").space, "s");
    }

    #[test]
    fn the_debug_form_shows_names_only() {
        let b = Bind {
            space: "s".into(),
            env: vec!["KEY=hush".into()],
        };
        let shown = format!("{b:?}");
        assert!(shown.contains("KEY") && !shown.contains("hush"), "{shown}");
    }

    #[test]
    fn a_good_bind_request_parses_into_its_bind_and_token() {
        let req = BindRequest {
            space: "s-1".into(),
            env: vec!["A=1".into()],
            token: "tok.en-1".into(),
        };
        let body = serde_json::to_vec(&req).expect("serialize");
        let parsed = BindRequest::parse(&body).expect("good");
        assert_eq!(parsed, req);
        let (bind, token) = parsed.into_parts();
        assert_eq!(bind.space, "s-1");
        assert_eq!(bind.env_pairs(), [("A".into(), "1".into())]);
        assert_eq!(token, "tok.en-1");
    }

    #[test]
    fn each_bad_bind_request_says_what_is_wrong_and_never_a_secret() {
        let huge = format!(
            r#"{{"space":"s","env":[],"token":"{}"}}"#,
            "x".repeat(MAX_BYTES as usize)
        );
        for (json, says) in [
            ("", "with no other field"),
            ("nope", "not JSON"),
            (r#"{"space":"s","env":[]}"#, "with no other field"),
            (
                r#"{"space":"s","env":[],"token":"hush","x":1}"#,
                "with no other field",
            ),
            (r#"{"space":"s","env":[],"token":5}"#, "with no other field"),
            (r#"{"space":"a.b","env":[],"token":"hush"}"#, "space"),
            (
                r#"{"space":"s","env":["1A=hush"],"token":"t"}"#,
                "not a variable name",
            ),
            (
                r#"{"space":"s","env":["TETHER_DAEMON_X=hush"],"token":"t"}"#,
                "the daemon's own",
            ),
            (r#"{"space":"s","env":[],"token":""}"#, "token is empty"),
            (r#"{"space":"s","env":[],"token":"hu sh"}"#, "whitespace"),
            (r#"{"space":"s","env":[],"token":"hush\n"}"#, "whitespace"),
            (r#"{"space":"s","env":[],"token":"hu\u0000sh"}"#, "NUL"),
            (huge.as_str(), "over 65536 bytes"),
        ] {
            let why = BindRequest::parse(json.as_bytes()).expect_err(json);
            assert!(why.contains(says), "{json}: {why}");
            assert!(!why.contains("hush"), "{json}: a secret in {why}");
        }
    }

    #[test]
    fn a_bind_request_debug_shows_neither_env_values_nor_the_token() {
        let req = BindRequest {
            space: "s".into(),
            env: vec!["KEY=hush".into()],
            token: "sekrit".into(),
        };
        let shown = format!("{req:?}");
        assert!(shown.contains("KEY") && shown.contains("\"s\""), "{shown}");
        assert!(
            !shown.contains("hush") && !shown.contains("sekrit"),
            "{shown}"
        );
    }

    /// Runs [`wait`] on `file` in the background.
    fn waiting(file: &Path) -> tokio::task::JoinHandle<anyhow::Result<Bind>> {
        let file = file.to_path_buf();
        tokio::spawn(async move { wait(&file).await })
    }

    async fn bound(w: tokio::task::JoinHandle<anyhow::Result<Bind>>) -> Bind {
        tokio::time::timeout(std::time::Duration::from_secs(10), w)
            .await
            .expect("bound in time")
            .expect("the task")
            .expect("a bind")
    }

    #[tokio::test]
    async fn the_wait_ends_when_a_good_file_is_renamed_into_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bind");
        let w = waiting(&file);
        // On this one-thread runtime the wait runs to its first await here: the file comes
        // after the watch is set.
        tokio::task::yield_now().await;
        std::fs::write(dir.path().join(".tmp"), r#"{"space":"s-2","env":["A=1"]}"#).expect("write");
        std::fs::rename(dir.path().join(".tmp"), &file).expect("rename");
        assert_eq!(bound(w).await.space, "s-2");
    }

    #[tokio::test]
    async fn the_wait_goes_past_a_bad_file_to_a_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bind");
        std::fs::write(&file, r#"{"space":"bad","env":["1A=x"]}"#).expect("bad file");
        let w = waiting(&file);
        tokio::task::yield_now().await;
        assert!(!w.is_finished(), "a bad file does not bind");
        std::fs::write(&file, r#"{"space":"good","env":[]}"#).expect("good file");
        assert_eq!(bound(w).await.space, "good");
    }

    #[tokio::test]
    async fn a_file_already_there_binds_at_once_and_no_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bind");
        std::fs::write(&file, r#"{"space":"s","env":[]}"#).expect("write");
        assert_eq!(bound(waiting(&file)).await.space, "s");
        let e = wait(&dir.path().join("no-dir/bind"))
            .await
            .expect_err("no directory");
        assert!(e.to_string().contains("cannot watch"), "{e}");
    }
}
