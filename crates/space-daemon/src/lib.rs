//! `tether-spaced`, the space daemon (issue 18): a space container's init that serves exec
//! for its space on the bus, so a command costs a process spawn and a NATS hop instead of the
//! engine's exec API.
//!
//! Two processes of this one binary (`main.rs` picks the role):
//! - `supervisor`, the init (PID 1 of the container; a child subreaper on a host): runs the
//!   image's command (argv after `--`) as the main workload and exits with its code (128+signal
//!   if killed; without one it runs until SIGTERM/SIGINT and exits 0), forwards SIGTERM and
//!   SIGINT, reaps every orphan, and starts the exec server — restarting it with backoff when
//!   it dies (a root workload can kill it; it cannot kill PID 1), after killing what the dead
//!   server still ran.
//! - `server`, the exec server (`/proc/self/exe` with `TETHER_DAEMON_SERVE_FOR`, named
//!   `spaced-exec`, in a session of its own, a child subreaper): connects and serves.
//!
//! Modules:
//! - `config`: settings from the environment and argv (`tether-spaced [-- cmd args...]`).
//! - `bind`: pool mode's bind file ([`bind::Bind`]) and the inotify wait for it;
//!   [`bind::BindRequest`], the same over the bus.
//! - `busbind`: pool mode's bind over the bus (`TETHER_DAEMON_POOL_SPACE`): the pool
//!   pseudo-space's subject served for bind requests while the bind file is awaited.
//! - `reaper`: the one waiter for every child of a process (SIGCHLD-driven `waitpid(-1)`),
//!   orphans included; each of the two processes runs one.
//! - `conn`: the bus connections' settings (token file re-read at each connect);
//!   `serve`: the exec subject.
//! - `request`: a request decoded and checked into a `Plan` before anything runs.
//! - `exec`: one command — spawn, stream, exit, deadline; `kill`: its process tree's end (and
//!   a dead server's session's).
//! - `users`: `user` → uid/gid from the container's own files; `reply`: the reply messages;
//!   `client`: the reading side of the reply stream.
//!
//! Exec (`spaces.<space>.daemon.exec`, messages in `proto/daemon.proto`): the reply subject
//! gets `started`, then ordered `stdout`/`stderr` chunks as they are read, then `exit` the
//! moment the command's leader exits (SIGCHLD → reaper → task: no polling anywhere); every
//! message is numbered (`Tether-Seq`), and `exit` counts the chunks, so a client knows it has
//! them all. A bad request gets one error message (micro error headers, Problem+JSON) and
//! nothing runs. SIGTERM/SIGINT reach every running command's process group (through the
//! server).
//!
//! Tested on the host (`tests/exec.rs`, the init as a child subreaper) and as PID 1 of the
//! busybox test image under a pids limit with every capability dropped
//! (`tests/container.rs`: PID 1, a timeout's kill, a fork bomb, orphans, `docker stop`, a
//! killed exec server); `benches/exec.rs` measures it against the engine's exec API.
//!
//! Wired in by the orchestrator (`tether-container-orchestrator`'s `daemon` module): it puts
//! the daemon into every new space container as its init, writes its bus token (from the
//! permission node's `tokens.daemon`, which can serve only this space) into the token file,
//! and sends `containers.exec` to it; everything the daemon reports is untrusted data there.
//!
//! Pool mode (a warm container created before its space is known): started with
//! `TETHER_DAEMON_BIND_FILE` (an absolute path, e.g. in the tmpfs `/run/tether`) instead of
//! `TETHER_SPACE_ID`, the init runs as usual and the exec server waits (inotify, no polling,
//! nothing on the bus) until the orchestrator writes the token file and then the bind file
//! `{"space": "<id>", "env": ["NAME=value", ...]}` ([`bind::Bind`], strict). It then serves
//! `spaces.<id>.daemon.exec` as if started with that space, and the bind env is the base
//! environment of every command (a request's `env` overrides it). A bad bind file is logged
//! (what is wrong, never a value) and the wait goes on. A restarted exec server finds the
//! file and serves at once. With both variables set the space wins.
//!
//! Bind over the bus (faster than writing files through the engine): with
//! `TETHER_DAEMON_POOL_SPACE=tether-pool-<hex>` as well, the waiting exec server is on the bus
//! as that pool pseudo-space (its token file holds the pool token) and takes a
//! `Tether-Bind: 1` request carrying the space, env and the space's token (`busbind`); it
//! answers `{}` once the bound space's subject is served. Whichever comes first, that request
//! or the bind file, binds.

pub mod bind;
pub mod busbind;
pub mod client;
pub mod config;
pub mod conn;
pub mod exec;
pub mod kill;
pub mod reaper;
pub mod reply;
pub mod request;
pub mod serve;
pub mod server;
pub mod supervisor;
pub mod users;
