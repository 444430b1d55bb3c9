//! The Rust library a tether A2A worker is written with: implement [`Executor`], call [`run`]
//! (or [`env::serve`] in a binary), and the agent serves its A2A work from the bus
//! (wire contract §3–§5, §8).
//!
//! # Layout
//! - [`executor`]: the [`Executor`] trait and the [`TaskContext`] of one run.
//! - [`events`]: [`Events`], the executor's way to report (each event a `work.event` request).
//! - [`worker`]: [`run`] — bind `work_<agent>`, pull for free slots, cancel signals, the card,
//!   drain.
//! - [`run`](mod@run): one work message from delivery to ack (progress notes, closing state).
//! - [`wire`]: subjects and bodies of the contract; reply classification.
//! - [`token`]: [`TokenSource`], a fixed token or a file re-read when it changes.
//! - [`env`]: a worker process's settings from `TETHER_*` and its start.
//! - [`secret_env`]: [`SecretEnv`], a replica's `TETHER_ENV_FILE`, given to the processes an
//!   executor spawns.
//! - [`echo`]: the example agent (binary `a2a-echo-worker`).
//!
//! The one design decision to know: the gateway's answer to each event is the truth about the
//! task, and a work message is acked only after the run's final event was answered — so a
//! worker that dies mid-run loses nothing (the message is delivered again, as attempt n+1),
//! and an executor's error or panic becomes FAILED, never a retry.

pub mod echo;
pub mod env;
pub mod events;
pub mod executor;
pub mod run;
pub mod secret_env;
pub mod token;
pub mod wire;
pub mod worker;

pub use events::{EventError, Events};
pub use executor::{Executor, TaskContext};
pub use run::WorkerStats;
pub use secret_env::SecretEnv;
pub use token::TokenSource;
pub use wire::EventReply;
pub use worker::{WorkerConfig, minimal_card, run};
