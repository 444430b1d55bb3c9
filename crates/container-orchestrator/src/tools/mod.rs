//! Tool runs: one-shot containers that take parameters, run to completion or their deadline,
//! print a JSON result and are removed — synchronously in the request, or as durable
//! JetStream jobs any replica runs.
//!
//! Every run has a record in KV (`exec.<id>` in `tether_tool_results`), so `tools.get`,
//! `tools.logs` and `tools.cancel` work from any replica. Records change only by
//! compare-and-set on their revision, and each attempt owns the record by its
//! (`attempt`, `runner`) pair: an attempt that was superseded (its job redelivered to another
//! worker) cannot overwrite the outcome, so a run completes once in the record and in the
//! `events.tools.*` stream.
//!
//! The one design decision to know: a redelivered job first looks for the containers of its
//! execution (label `tether.execution`) on its engine, whatever node made them. A container
//! that is running or has exited is *adopted* — waited for, its output read from the engine —
//! instead of running the tool a second time; one that never started is removed. So a worker
//! killed mid-run costs neither a second run nor an orphan, as long as the next attempt lands
//! on the same engine (elsewhere the run is repeated: at-least-once, and the dead node's own
//! janitor removes its leftovers when it returns).
//!
//! Status comes from what the orchestrator did: `timed_out` only when our deadline killed
//! the container, `cancelled` only when a cancel did; otherwise the exit code decides
//! (`completed` for 0, `failed` for anything else, 124 included).
//!
//! # Layout
//! - `record`: what a record says — a new one, the result parsed from stdout, fitting it
//!   to a reply, the `events.tools.*` event.
//! - `prepare`: a request checked into a [`Prepared`] run (parameters, limits, network).
//! - `runner`: one attempt — claim the record, adopt or create the container, watch it,
//!   record the outcome.
//! - `jobs`: async runs as durable JetStream jobs, their workers and cancel signals.
//! - `usage`: what a run used (peak memory, CPU time), sampled while it runs.
//! - `janitor`: tool containers no run owns, sync runs whose node died (adopted by this
//!   node when it is the same host's next instance).
//! - `endpoints`: `tools.execute`, `tools.get`, `tools.cancel`, `tools.logs`.
//!
//! The records, their [`Status`](crate::state::Status) and the table of runs in progress are
//! in [`crate::state`], shared with sessions and relics.

mod endpoints;
mod janitor;
mod jobs;
mod prepare;
mod record;
mod runner;
mod usage;

pub use endpoints::endpoints;
pub use janitor::{janitor, janitor_pass};
pub use jobs::{CANCEL_SUBJECT, cancel_listener, workers};
pub use prepare::{Prepared, ToolNetwork, parameter_env, parse_parameters, prepare};
pub use record::{fit_record, parse_result};

use std::sync::Arc;

type T = Arc<crate::state::Shared>;
