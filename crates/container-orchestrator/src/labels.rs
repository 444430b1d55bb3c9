//! Every label the node puts on engine objects, and the names it reserves. The labels are the
//! truth about a managed container (whose space, which host, what kind): only this node sets
//! them, a request never can (`tether.*` labels in a request are refused).

// Every managed object.
pub const LABEL_MANAGED: &str = "tether.managed";
pub const LABEL_SPACE: &str = "tether.space";
pub const LABEL_SESSION: &str = "tether.session";
pub const LABEL_KIND: &str = "tether.kind";
pub const LABEL_EXPIRES: &str = "tether.expires";
pub const LABEL_HOST: &str = "tether.host";
pub const LABEL_CREATED_BY: &str = "tether.created_by";

// Tool containers.
pub const LABEL_TOOL: &str = "tether.tool";
pub const LABEL_EXECUTION: &str = "tether.execution";
pub const LABEL_RUNNER: &str = "tether.runner";
pub const LABEL_ATTEMPT: &str = "tether.attempt";
pub const LABEL_CLEANUP: &str = "tether.cleanup";
pub const LABEL_DEADLINE: &str = "tether.deadline";

// Relics.
pub const LABEL_RELIC: &str = "tether.relic";
pub const LABEL_RELIC_ID: &str = "tether.relic_id";
pub const LABEL_HEALTH_PORT: &str = "tether.health_port";
pub const LABEL_HEALTH_ENDPOINT: &str = "tether.health_endpoint";

// Worker replicas (`tether.kind=worker`).
pub const LABEL_WORKER: &str = "tether.worker";
pub const LABEL_REPLICA: &str = "tether.replica";
pub const LABEL_GENERATION: &str = "tether.generation";
pub const LABEL_DEPLOYMENT: &str = "tether.deployment";

/// `tether.kind` of a session's network.
pub const KIND_SESSION_NETWORK: &str = "session-network";

/// Names of session networks start with this; requests may not name such a network.
pub const SESSION_NETWORK_PREFIX: &str = "tether-session.";
