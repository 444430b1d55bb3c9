//! Who may publish and subscribe to what on the bus: the one table behind both the per-user
//! permissions the auth callout hands out (agents, workers, operators) and the static users of
//! the nodes in the server configuration ([`crate::server_conf`]).
//!
//! The rules (ARCHITECTURE.md, "Bus authorization"):
//! - an **agent** publishes only the request subjects of the scopes it holds (plus the few
//!   every agent may call: its own record, its own token refresh, the public keys, `$SRV`
//!   discovery) and subscribes only to its own inbox `_INBOX.<agent_id>.>` and, with
//!   `events:read`, to its own space's container events. No JetStream API, no `$SRV`
//!   subscription, no queue group of a node: it can neither read nor steal another's requests;
//! - a **worker** of agent X (a token of X with `a2a:serve`) has X's rights plus: pulling and
//!   acknowledging the items of X's own durable work consumer (`work_X` on `A2A_WORK`: the
//!   JetStream API of that one consumer, nothing else of any stream), the requests of the A2A
//!   gateway's work endpoints for X (`a2a.X.work.>`: events and card), and X's cancel signals
//!   (`a2a.X.signal.>`). A worker never writes a task or a stream, nor sees another agent's work;
//! - an **operator** may do everything (it is audited: every operator connection is logged);
//! - a **node kind** serves its own subject families (in queue groups), answers into any inbox,
//!   publishes events, makes the requests its work needs, and reaches only its own KV buckets
//!   and streams, plus read access to the key and revocation buckets every verifier follows
//!   (and, for the shell server, the orchestrator's space bindings it routes by; for the
//!   orchestrator, the info of the A2A work consumers it scales worker deployments on).
//!
//! Bucket and stream names here are the defaults of the nodes' configs; a deployment that
//! renames a bucket renders its server configuration with the new name.

use serde::Serialize;
use tether_auth::inbox::{AGENT_INBOX_ROOT, NODE_INBOX_ROOT, agent_inbox_prefix};
use tether_auth::{Claims, Scope};

/// Allow and deny lists of subjects (NATS wildcards).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// What one bus identity may publish and subscribe to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    pub publish: Rule,
    pub subscribe: Rule,
    /// May answer the reply subject of any request it received (once), whatever that subject
    /// is: nodes answer clients with inboxes of their own choosing (the `nats` CLI's).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_responses: bool,
    /// For a user of the auth callout: may answer the reply subject of each request it
    /// received, any number of times, within this window after receiving it (the user JWT's
    /// `resp`). A space daemon streams several messages to one reply subject.
    #[serde(skip)]
    pub stream_responses: Option<std::time::Duration>,
}

impl Permissions {
    /// Everything (operators, the break-glass admin).
    pub fn everything() -> Self {
        Permissions {
            publish: Rule {
                allow: vec![">".into()],
                deny: vec![],
            },
            subscribe: Rule {
                allow: vec![">".into()],
                deny: vec![],
            },
            allow_responses: false,
            stream_responses: None,
        }
    }
}

/// The node kinds that connect with their own credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Permission,
    Orchestrator,
    Shell,
    Model,
    A2a,
}

impl NodeKind {
    pub const ALL: &'static [NodeKind] = &[
        NodeKind::Permission,
        NodeKind::Orchestrator,
        NodeKind::Shell,
        NodeKind::Model,
        NodeKind::A2a,
    ];

    /// The node's name: its binary, its `$SRV` name and its inbox (`_INBOX_NODES.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            NodeKind::Permission => "permission-node",
            NodeKind::Orchestrator => "container-orchestrator",
            NodeKind::Shell => "shell-server",
            NodeKind::Model => "model-gateway",
            NodeKind::A2a => "a2a-gateway",
        }
    }

    /// The subject families it serves (`<family>.>`).
    fn serves(self) -> &'static [&'static str] {
        match self {
            NodeKind::Permission => &["agents", "tokens", "auth"],
            NodeKind::Orchestrator => &[
                "containers",
                "tools",
                "relics",
                "sessions",
                "hosts",
                "workers",
                "jobs",
            ],
            NodeKind::Shell => &["shell"],
            NodeKind::Model => &["model"],
            NodeKind::A2a => &["a2a"],
        }
    }

    /// Subjects it sends requests to besides its own families: the shell server asks the
    /// orchestrator (on the host that holds the space, when it knows it) to exec; the
    /// orchestrator asks the permission node for its worker replicas' tokens (`tokens.worker`),
    /// its space daemons' tokens (`tokens.daemon`) and, at `workers.deploy`, whether the agent
    /// may be hosted (`agents.hostable`): no other identity but an operator may publish these.
    /// It also sends exec to the space daemons (`spaces.<space>.daemon.exec`).
    fn calls(self) -> &'static [&'static str] {
        match self {
            NodeKind::Shell => &["containers.>", "hosts.*.containers.>"],
            NodeKind::Orchestrator => &[
                "tokens.worker",
                "agents.hostable",
                "tokens.daemon",
                "spaces.*.daemon.exec",
            ],
            _ => &[],
        }
    }

    /// KV buckets (`KV_<name>` streams) it owns: reads and writes.
    fn owns_buckets(self) -> &'static [&'static str] {
        match self {
            NodeKind::Permission => &["tether_agents", "tether_keys", "tether_revoked"],
            NodeKind::Orchestrator => &[
                "tether_spaces",
                "tether_hosts",
                "tether_tool_results",
                "tether_tool_results_done",
                "tether_sessions",
                "tether_workers",
            ],
            NodeKind::Shell => &["tether_shell_sessions"],
            NodeKind::Model => &[],
            NodeKind::A2a => &["a2a_tasks", "a2a_cards"],
        }
    }

    /// KV buckets it only reads: every verifier follows the keys and revocations; the shell
    /// server routes by the orchestrator's space bindings; the permission node checks the
    /// orchestrator's worker deployments before it issues a replica's token.
    fn reads_buckets(self) -> &'static [&'static str] {
        match self {
            // The worker deployments that `tokens.worker` checks.
            NodeKind::Permission => &["tether_workers"],
            NodeKind::Shell => &["tether_keys", "tether_revoked", "tether_spaces"],
            _ => &["tether_keys", "tether_revoked"],
        }
    }

    /// Plain streams it owns.
    fn owns_streams(self) -> &'static [&'static str] {
        match self {
            NodeKind::Orchestrator => &["TETHER_TOOL_JOBS"],
            NodeKind::A2a => &["A2A_WORK", "A2A_EVENTS"],
            _ => &[],
        }
    }

    /// Streams whose consumers' info it reads, nothing else of them: the orchestrator scales
    /// worker deployments on their agents' work consumers (`work_<agent>` on the A2A
    /// gateway's stream; every consumer of that stream is one).
    fn reads_consumers(self) -> &'static [&'static str] {
        match self {
            NodeKind::Orchestrator => &[A2A_WORK_STREAM],
            _ => &[],
        }
    }

    /// What it follows besides its families and inbox: JetStream advisories about its own
    /// streams, and (the A2A gateway) its own task events as they are published.
    fn follows(self) -> &'static [&'static str] {
        match self {
            NodeKind::A2a => &[
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.A2A_WORK.*",
                "a2a_events.>",
            ],
            _ => &[],
        }
    }

    /// Subjects of its own streams that are not in its subject families (never prefixed:
    /// streams are the deployment's, not a service path).
    fn stream_subjects(self) -> &'static [&'static str] {
        match self {
            NodeKind::A2a => &["a2a_work.>", "a2a_events.>"],
            _ => &[],
        }
    }

    /// The permissions of this node kind, under the deployment's subject `prefix` (if any).
    pub fn permissions(self, prefix: Option<&str>) -> Permissions {
        let p = |s: &str| prefixed(prefix, s);
        let mut publish = vec![
            format!("{AGENT_INBOX_ROOT}.>"),
            format!("{NODE_INBOX_ROOT}.>"),
            "$SRV.>".to_string(),
            p("events.>"),
            "$JS.API.INFO".to_string(),
            "$JS.FC.>".to_string(),
        ];
        let mut subscribe = vec![
            format!("{NODE_INBOX_ROOT}.{}.>", self.name()),
            "$SRV.>".to_string(),
        ];
        for f in self.serves() {
            publish.push(p(&format!("{f}.>")));
            subscribe.push(p(&format!("{f}.>")));
        }
        subscribe.extend(self.follows().iter().map(|s| s.to_string()));
        for s in self.calls() {
            publish.push(p(s));
        }
        for b in self.owns_buckets() {
            publish.extend(stream_admin(&format!("KV_{b}")));
            publish.push(format!("$KV.{b}.>"));
        }
        for s in self.owns_streams() {
            publish.extend(stream_admin(s));
        }
        publish.extend(self.stream_subjects().iter().map(|s| s.to_string()));
        for s in self.reads_consumers() {
            publish.push(format!("$JS.API.CONSUMER.INFO.{s}.*"));
        }
        for b in self.reads_buckets() {
            publish.extend(stream_read(&format!("KV_{b}")));
        }
        Permissions {
            publish: Rule {
                allow: publish,
                deny: vec![],
            },
            subscribe: Rule {
                allow: subscribe,
                deny: vec![],
            },
            allow_responses: true,
            stream_responses: None,
        }
    }
}

fn prefixed(prefix: Option<&str>, s: &str) -> String {
    match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}.{s}"),
        None => s.to_string(),
    }
}

/// Every JetStream API call on stream `s` (its own stream: create, update, consumers,
/// messages, acks), and nothing of another stream.
fn stream_admin(s: &str) -> Vec<String> {
    vec![
        format!("$JS.API.*.*.{s}"),
        format!("$JS.API.*.*.{s}.>"),
        format!("$JS.API.*.*.*.{s}"),
        format!("$JS.API.*.*.*.{s}.>"),
        format!("$JS.ACK.{s}.>"),
    ]
}

/// Reading stream `s`: its info, creating it with the canonical config when missing (a
/// verifier may start before the permission node), getting messages, and watching it through
/// an ordered consumer of its own. Writes (`$KV.<bucket>.>`) are not included.
fn stream_read(s: &str) -> Vec<String> {
    vec![
        format!("$JS.API.STREAM.INFO.{s}"),
        format!("$JS.API.STREAM.CREATE.{s}"),
        format!("$JS.API.STREAM.MSG.GET.{s}"),
        format!("$JS.API.DIRECT.GET.{s}"),
        format!("$JS.API.DIRECT.GET.{s}.>"),
        format!("$JS.API.CONSUMER.CREATE.{s}"),
        format!("$JS.API.CONSUMER.CREATE.{s}.>"),
        format!("$JS.API.CONSUMER.DELETE.{s}.>"),
        format!("$JS.API.CONSUMER.INFO.{s}.>"),
    ]
}

/// The request subjects the scope `s` lets an agent publish.
fn scope_subjects(s: Scope) -> &'static [&'static str] {
    match s {
        Scope::Operator => &[">"],
        Scope::AgentsAdmin => &["agents.register", "agents.revoke"],
        Scope::AgentsRead => &["agents.list"],
        Scope::TokensIssue => &[],
        Scope::ContainersRead => &[
            "containers.list",
            "containers.inspect",
            "containers.logs",
            "containers.stats",
        ],
        Scope::ContainersWrite => &[
            "containers.create",
            "containers.start",
            "containers.stop",
            "containers.remove",
        ],
        Scope::ContainersExec => &["containers.exec"],
        Scope::ToolsRun => &["tools.execute", "tools.get", "tools.logs", "tools.cancel"],
        Scope::RelicsWrite => &[
            "relics.start",
            "relics.get",
            "relics.list",
            "relics.stop",
            "relics.delete",
            "sessions.cleanup",
        ],
        Scope::ShellExec => &["shell.exec"],
        Scope::ModelCall => &[
            "model.chat",
            "model.embed",
            "model.rank",
            "model.models",
            "model.cancel",
        ],
        Scope::EventsRead => &[],
        Scope::A2aCall => &[
            "a2a.*.send",
            "a2a.*.stream",
            "a2a.*.get",
            "a2a.*.list",
            "a2a.*.cancel",
            "a2a.*.subscribe",
            "a2a.*.card",
            "a2a.agents",
        ],
        // Its own agent's work only: see `for_claims`.
        Scope::A2aServe => &[],
        // A mark on the agent's record for `tokens.worker`, no subject.
        Scope::WorkersHosted => &[],
        // Its own space's exec requests only: see `for_claims`.
        Scope::DaemonServe => &[],
    }
}

/// The A2A gateway's work stream (its default name).
const A2A_WORK_STREAM: &str = "A2A_WORK";

/// What every agent may call whatever its scopes: its own record, its own token refresh,
/// the public keys.
const ANY_AGENT: &[&str] = &["agents.get", "tokens.issue", "auth.keys"];

/// `$SRV` discovery (`nats micro ls`); the replies come to the caller's own inbox.
const DISCOVERY: &[&str] = &[
    "$SRV.PING",
    "$SRV.PING.>",
    "$SRV.INFO",
    "$SRV.INFO.>",
    "$SRV.STATS",
    "$SRV.STATS.>",
];

/// How long a space daemon may go on answering one exec request: the longest command the
/// orchestrator sends to a daemon (3600 s; longer ones take the engine's path) and a minute.
pub const DAEMON_REPLY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3660);

/// The subject a space's daemon serves exec on (what `tether-spaced` subscribes to).
pub fn daemon_exec_subject(space: &str) -> String {
    format!("spaces.{space}.daemon.exec")
}

/// A space daemon's permissions: subscribe to its own space's exec subject (in any queue
/// group; under the deployment's `prefix`, like every service subject) and answer what it
/// receives there — no other publish, no JetStream, no inbox of its own. A stolen daemon
/// credential can only answer its own space's requests.
fn daemon(space: &str, prefix: Option<&str>) -> Permissions {
    Permissions {
        publish: Rule::default(),
        subscribe: Rule {
            allow: vec![prefixed(prefix, &daemon_exec_subject(space))],
            deny: vec![],
        },
        allow_responses: false,
        stream_responses: Some(DAEMON_REPLY_WINDOW),
    }
}

/// The permissions of a verified token's holder under the deployment's subject `prefix`.
pub fn for_claims(c: &Claims, prefix: Option<&str>) -> Permissions {
    if c.scopes.is_operator() {
        return Permissions::everything();
    }
    if c.scopes.allows(Scope::DaemonServe) {
        // Whatever else the token lists: `tokens.daemon` issues this scope alone.
        return daemon(&c.space, prefix);
    }
    let p = |s: &str| prefixed(prefix, s);
    let mut publish: Vec<String> = ANY_AGENT.iter().map(|s| p(s)).collect();
    publish.extend(DISCOVERY.iter().map(|s| s.to_string()));
    for s in c.scopes.iter() {
        publish.extend(scope_subjects(*s).iter().map(|s| p(s)));
    }
    let mut subscribe = vec![format!("{}.>", agent_inbox_prefix(&c.sub))];
    if c.scopes.allows(Scope::A2aServe) {
        // A worker pulls and settles the items of its agent's own work consumer (that
        // consumer's API alone), reports to the gateway's work endpoints, hears cancels.
        let consumer = format!("{A2A_WORK_STREAM}.work_{}", c.sub);
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{consumer}"));
        publish.push(format!("$JS.API.CONSUMER.INFO.{consumer}"));
        publish.push(format!("$JS.ACK.{consumer}.>"));
        publish.push(p(&format!("a2a.{}.work.>", c.sub)));
        subscribe.push(p(&format!("a2a.{}.signal.>", c.sub)));
    }
    if c.scopes.allows(Scope::EventsRead) && !c.space.is_empty() {
        subscribe.push(p(&format!("events.containers.{}", c.space)));
    }
    publish.sort();
    publish.dedup();
    Permissions {
        publish: Rule {
            allow: publish,
            deny: vec![],
        },
        subscribe: Rule {
            allow: subscribe,
            deny: vec![],
        },
        allow_responses: false,
        stream_responses: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_auth::ScopeSet;

    fn claims(scopes: &[Scope]) -> Claims {
        Claims::new(
            "tether",
            "tether",
            "alice",
            "s1",
            scopes.iter().copied().collect::<ScopeSet>(),
            0,
            60,
        )
    }

    #[test]
    fn a_space_daemon_serves_its_own_space_and_publishes_nothing_else() {
        // Even listed with other scopes (`tokens.daemon` never does), `daemon:serve` wins.
        let p = for_claims(&claims(&[Scope::DaemonServe, Scope::ShellExec]), None);
        assert_eq!(p.subscribe.allow, vec!["spaces.s1.daemon.exec".to_string()]);
        assert!(p.publish.allow.is_empty() && p.publish.deny.is_empty());
        assert!(!p.allow_responses);
        assert_eq!(p.stream_responses, Some(DAEMON_REPLY_WINDOW));
        let prefixed = for_claims(&claims(&[Scope::DaemonServe]), Some("prod"));
        assert_eq!(
            prefixed.subscribe.allow,
            vec!["prod.spaces.s1.daemon.exec".to_string()]
        );
        // An operator stays an operator; the orchestrator may send daemons their requests.
        assert_eq!(
            for_claims(&claims(&[Scope::Operator]), None),
            Permissions::everything()
        );
        assert!(
            NodeKind::Orchestrator
                .permissions(None)
                .publish
                .allow
                .contains(&"spaces.*.daemon.exec".to_string())
        );
    }

    #[test]
    fn an_agent_publishes_only_its_scopes_and_reads_only_its_inbox() {
        let p = for_claims(&claims(&[Scope::ShellExec, Scope::EventsRead]), None);
        assert!(p.publish.allow.contains(&"shell.exec".to_string()));
        assert!(!p.publish.allow.iter().any(|s| s.starts_with("containers")));
        assert!(!p.publish.allow.iter().any(|s| s.starts_with("$JS")));
        assert_eq!(
            p.subscribe.allow,
            vec!["_INBOX.alice.>".to_string(), "events.containers.s1".into()]
        );
    }

    #[test]
    fn the_prefix_applies_to_services_not_to_inboxes() {
        let p = for_claims(&claims(&[Scope::ContainersExec]), Some("prod"));
        assert!(
            p.publish
                .allow
                .contains(&"prod.containers.exec".to_string())
        );
        assert!(p.publish.allow.contains(&"$SRV.PING".to_string()));
        assert_eq!(p.subscribe.allow, vec!["_INBOX.alice.>".to_string()]);
    }

    #[test]
    fn a_worker_requests_only_its_own_agents_work() {
        let p = for_claims(&claims(&[Scope::A2aServe]), None);
        assert!(p.publish.allow.contains(&"a2a.alice.work.>".to_string()));
        assert!(!p.publish.allow.iter().any(|s| s.starts_with("a2a.*")));
        // Its own consumer's API and acks, nothing else of JetStream.
        let js: Vec<&String> = p
            .publish
            .allow
            .iter()
            .filter(|s| s.starts_with('$'))
            .collect();
        assert!(!js.is_empty());
        for s in js {
            let own = s.starts_with("$SRV.")
                || s.ends_with(".A2A_WORK.work_alice")
                || s == "$JS.ACK.A2A_WORK.work_alice.>";
            assert!(own, "{s}");
        }
        assert_eq!(
            p.subscribe.allow,
            vec![
                "_INBOX.alice.>".to_string(),
                "a2a.alice.signal.>".to_string()
            ]
        );
    }

    #[test]
    fn an_operator_may_do_everything() {
        assert_eq!(
            for_claims(&claims(&[Scope::Operator]), None),
            Permissions::everything()
        );
    }

    #[test]
    fn a_node_reads_its_inbox_and_writes_only_its_own_buckets() {
        let shell = NodeKind::Shell.permissions(None);
        assert!(
            shell
                .subscribe
                .allow
                .contains(&"_INBOX_NODES.shell-server.>".to_string())
        );
        assert!(
            !shell
                .subscribe
                .allow
                .iter()
                .any(|s| s.starts_with("_INBOX."))
        );
        assert!(
            shell
                .publish
                .allow
                .contains(&"$KV.tether_shell_sessions.>".to_string())
        );
        assert!(
            !shell
                .publish
                .allow
                .iter()
                .any(|s| s == "$KV.tether_spaces.>")
        );
        assert!(
            !shell
                .publish
                .allow
                .iter()
                .any(|s| s.contains("tether_agents"))
        );
        // Every orchestrator writes its own host record and reads the others'.
        let orch = NodeKind::Orchestrator.permissions(None);
        for s in [
            "$KV.tether_hosts.>",
            "$JS.API.*.*.KV_tether_hosts.>",
            "$KV.tether_workers.>",
            "$JS.API.*.*.KV_tether_workers.>",
        ] {
            assert!(orch.publish.allow.contains(&s.to_string()), "{s}");
        }
        assert!(
            !shell
                .publish
                .allow
                .iter()
                .any(|s| s.contains("tether_hosts"))
        );
    }

    #[test]
    fn the_orchestrator_reads_only_the_info_of_work_consumers() {
        let orch = NodeKind::Orchestrator.permissions(None);
        let work: Vec<&String> = orch
            .publish
            .allow
            .iter()
            .filter(|s| s.contains("A2A_WORK") || s.starts_with("a2a_work"))
            .collect();
        assert_eq!(work, vec!["$JS.API.CONSUMER.INFO.A2A_WORK.*"]);
        for kind in [NodeKind::Shell, NodeKind::Model, NodeKind::Permission] {
            let p = kind.permissions(None);
            assert!(
                !p.publish.allow.iter().any(|s| s.contains("A2A_WORK")),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn only_the_orchestrator_asks_for_worker_tokens() {
        let orch = NodeKind::Orchestrator.permissions(None);
        assert!(orch.publish.allow.contains(&"tokens.worker".to_string()));
        assert!(orch.publish.allow.contains(&"agents.hostable".to_string()));
        assert!(!orch.publish.allow.iter().any(|s| s == "agents.>"));
        for kind in [NodeKind::Shell, NodeKind::Model, NodeKind::A2a] {
            let p = kind.permissions(None);
            assert!(
                !p.publish
                    .allow
                    .iter()
                    .any(|s| s.starts_with("tokens.") || s.starts_with("agents.")),
                "{kind:?}"
            );
        }
        // No agent scope reaches it, whatever it holds short of operator (`daemon:serve` is
        // no agent's, and publishes nothing).
        let all: Vec<Scope> = Scope::ALL
            .iter()
            .copied()
            .filter(|s| ![Scope::Operator, Scope::DaemonServe].contains(s))
            .collect();
        let p = for_claims(&claims(&all), None);
        assert!(
            !p.publish
                .allow
                .iter()
                .any(|s| s == "tokens.worker" || s == "tokens.>" || s == ">")
        );
        assert!(
            !p.publish
                .allow
                .iter()
                .any(|s| s == "agents.hostable" || s == "agents.>")
        );
        // The permission node reads the deployments, never writes them.
        let perm = NodeKind::Permission.permissions(None);
        assert!(
            perm.publish
                .allow
                .contains(&"$JS.API.DIRECT.GET.KV_tether_workers.>".to_string())
        );
        assert!(
            !perm
                .publish
                .allow
                .iter()
                .any(|s| s == "$KV.tether_workers.>")
        );
    }
}
