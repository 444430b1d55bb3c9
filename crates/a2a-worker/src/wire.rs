//! The worker's side of the wire contract (/work/notes/a2a-wire.md §3–§5): subjects, the work
//! item, the work.event body and reply, the cancel signal, and how a reply is classified.
//!
//! Design decision: these are plain serde structs of this crate, in A2A's camelCase JSON like
//! the A2A payloads they carry (not tether's snake_case proto types), and every decision about
//! a reply ([`Verdict`]) is a pure function here, so it is tested without a bus.

use a2a::{Message, StreamResponse, Task, TaskState};
use serde::{Deserialize, Serialize};
use tether_bus::Problem;

/// The JetStream stream the gateway publishes work to.
pub const WORK_STREAM: &str = "A2A_WORK";

/// Header naming the caller's token on every work.* request.
pub const AUTHORIZATION: &str = "Authorization";

/// `work_<agent>`: the agent's durable pull consumer (created by the gateway).
pub fn consumer_name(agent: &str) -> String {
    format!("work_{agent}")
}

/// `a2a_work.<agent>`: the subject the agent's work items are published on.
pub fn work_subject(agent: &str) -> String {
    format!("a2a_work.{agent}")
}

/// `a2a.<agent>.work.event`
pub fn event_subject(agent: &str) -> String {
    format!("a2a.{agent}.work.event")
}

/// `a2a.<agent>.work.card`
pub fn card_subject(agent: &str) -> String {
    format!("a2a.{agent}.work.card")
}

/// `a2a.<agent>.signal.cancel`
pub fn cancel_subject(agent: &str) -> String {
    format!("a2a.{agent}.signal.cancel")
}

/// `subject` under the deployment's subject prefix (`prod` → `prod.a2a.x.work.event`), as
/// the gateway serves it; the JetStream subjects (`a2a_work.*`, `$JS.*`) are never prefixed.
pub fn prefixed(prefix: Option<&str>, subject: String) -> String {
    match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{p}.{subject}"),
        None => subject,
    }
}

/// Whether `agent` can stand in a subject token and a consumer name: not empty, no dots,
/// wildcards or whitespace (the gateway's agent ids are of this kind).
pub fn valid_agent_id(agent: &str) -> bool {
    !agent.is_empty()
        && agent.len() <= 200
        && agent
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// One work item (the body of a message on `a2a_work.<agent>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkItem {
    pub space: String,
    /// The task as it stands; its history includes `message`.
    pub task: Task,
    /// The message this work item is for (the first one, or a follow-up).
    pub message: Message,
}

impl WorkItem {
    /// `task.metadata.tether.callerAgentId`, set by the gateway from the verified token.
    pub fn caller_agent_id(&self) -> String {
        self.task
            .metadata
            .as_ref()
            .and_then(|m| m.get("tether"))
            .and_then(|t| t.get("callerAgentId"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }
}

/// The body of a `work.event` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventBody {
    pub space: String,
    pub task_id: String,
    /// JetStream `num_delivered` of the work message this run is for.
    pub attempt: u64,
    /// One event, or else `events`: a batch the gateway writes as one change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<StreamResponse>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<StreamResponse>,
}

/// The gateway's answer to an accepted event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EventReply {
    pub state: TaskState,
    pub cancel_requested: bool,
    pub seq: u64,
}

impl EventReply {
    /// The task is terminal or interrupted: this run is over.
    pub fn settles(&self) -> bool {
        settles(&self.state)
    }
}

/// Terminal (COMPLETED, FAILED, CANCELED, REJECTED) or interrupted (INPUT_REQUIRED,
/// AUTH_REQUIRED): a state after which a run has nothing more to do.
pub fn settles(state: &TaskState) -> bool {
    state.is_terminal() || matches!(state, TaskState::InputRequired | TaskState::AuthRequired)
}

/// The body of a cancel signal on `a2a.<agent>.signal.cancel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelSignal {
    pub space: String,
    pub task_id: String,
}

/// What a `work.event` reply means for the run that sent the event.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Recorded.
    Accepted(EventReply),
    /// Refused for good: the task is terminal, the attempt stale (409), or the task is not
    /// this agent's / gone (404). The run stops and its work message is acked.
    Stop(Problem),
    /// Refused as invalid (another 4xx, e.g. SUBMITTED as a new state): this event is lost,
    /// the run may go on.
    Invalid(Problem),
    /// Not answered usefully (no gateway, timeout, 5xx, 401/403, unreadable reply): the
    /// event may be sent again.
    Unavailable(String),
}

/// Classifies a reply from its headers and body.
pub fn verdict(headers: Option<&async_nats::HeaderMap>, body: &[u8]) -> Verdict {
    if let Some(p) = Problem::from_reply(headers, body) {
        return match p.status {
            404 | 409 => Verdict::Stop(p),
            401 | 403 | 408 | 429 => Verdict::Unavailable(p.to_string()),
            s if (400..500).contains(&s) => Verdict::Invalid(p),
            _ => Verdict::Unavailable(p.to_string()),
        };
    }
    match serde_json::from_slice::<EventReply>(body) {
        Ok(r) => Verdict::Accepted(r),
        Err(e) => Verdict::Unavailable(format!("unreadable work.event reply: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a::{Part, Role, TaskStatus, TaskStatusUpdateEvent};
    use serde_json::json;
    use tether_bus::problem::{SERVICE_ERROR, SERVICE_ERROR_CODE};

    fn error_headers(code: u16) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR, "x");
        h.insert(SERVICE_ERROR_CODE, code.to_string().as_str());
        h
    }

    #[test]
    fn event_body_is_the_contract_shape() {
        let body = EventBody {
            space: "s1".into(),
            task_id: "t1".into(),
            attempt: 2,
            event: Some(StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
                task_id: "t1".into(),
                context_id: "c1".into(),
                status: TaskStatus {
                    state: TaskState::Working,
                    message: None,
                    timestamp: None,
                },
                metadata: None,
            })),
            events: vec![],
        };
        let working = json!({"statusUpdate": {
            "taskId": "t1", "contextId": "c1", "status": {"state": "TASK_STATE_WORKING"}}});
        let v = serde_json::to_value(&body).expect("json");
        assert_eq!(
            v,
            json!({"space": "s1", "taskId": "t1", "attempt": 2, "event": working})
        );
        let batch = EventBody {
            events: vec![body.event.clone().expect("event"); 2],
            event: None,
            ..body
        };
        assert_eq!(
            serde_json::to_value(&batch).expect("json"),
            json!({"space": "s1", "taskId": "t1", "attempt": 2, "events": [working, working]})
        );
    }

    #[test]
    fn work_item_reads_with_unknown_fields_and_names_the_caller() {
        let v = json!({
            "space": "s1",
            "extra": true,
            "task": {"id": "t1", "contextId": "c1", "status": {"state": "TASK_STATE_SUBMITTED"},
                     "metadata": {"tether": {"callerAgentId": "alice", "space": "s1", "agentId": "echo"}}},
            "message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}
        });
        let w: WorkItem = serde_json::from_value(v).expect("work item");
        assert_eq!(w.caller_agent_id(), "alice");
        assert_eq!(w.message.role, Role::User);
        assert_eq!(w.message.parts, vec![Part::text("hi")]);
    }

    #[test]
    fn replies_are_classified() {
        let ok = br#"{"state":"TASK_STATE_WORKING","cancelRequested":true,"seq":3}"#;
        assert_eq!(
            verdict(None, ok),
            Verdict::Accepted(EventReply {
                state: TaskState::Working,
                cancel_requested: true,
                seq: 3
            })
        );
        let problem = |code: u16| {
            verdict(
                Some(&error_headers(code)),
                Problem::new(code, "d").to_body("s").as_ref(),
            )
        };
        assert!(matches!(problem(409), Verdict::Stop(p) if p.status == 409));
        assert!(matches!(problem(404), Verdict::Stop(_)));
        assert!(matches!(problem(400), Verdict::Invalid(_)));
        assert!(matches!(problem(503), Verdict::Unavailable(_)));
        assert!(matches!(problem(401), Verdict::Unavailable(_)));
        assert!(matches!(verdict(None, b"nope"), Verdict::Unavailable(_)));
    }

    #[test]
    fn settled_states() {
        for s in [
            TaskState::Completed,
            TaskState::Failed,
            TaskState::Canceled,
            TaskState::Rejected,
            TaskState::InputRequired,
            TaskState::AuthRequired,
        ] {
            assert!(settles(&s), "{s:?}");
        }
        for s in [TaskState::Working, TaskState::Submitted] {
            assert!(!settles(&s), "{s:?}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(consumer_name("echo"), "work_echo");
        assert_eq!(event_subject("echo"), "a2a.echo.work.event");
        assert_eq!(cancel_subject("echo"), "a2a.echo.signal.cancel");
        assert_eq!(
            prefixed(Some("prod"), card_subject("echo")),
            "prod.a2a.echo.work.card"
        );
        assert_eq!(prefixed(None, card_subject("echo")), "a2a.echo.work.card");
        assert!(valid_agent_id("echo-1_a"));
        assert!(!valid_agent_id("a.b") && !valid_agent_id("") && !valid_agent_id("a*"));
    }
}
