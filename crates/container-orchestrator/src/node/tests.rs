//! Unit tests of the request checks of `containers.*`.

use super::*;

#[test]
fn json_budget_is_kept() {
    let mut a = "\0".repeat(1000);
    let mut b = "x".repeat(10);
    assert!(fit_json(&mut a, &mut b, 600));
    assert!(json_len(&a) + json_len(&b) <= 600);
    assert_eq!(b.len(), 10, "the short one is kept whole");
    let mut a = "hello\n".to_string();
    let mut b = String::new();
    assert!(!fit_json(&mut a, &mut b, 100));
    assert_eq!(a, "hello\n");
}

#[test]
fn users_and_refs() {
    assert!(validate_user("1000:1000").is_ok());
    assert!(validate_user("nobody").is_ok());
    assert!(validate_user("a b").is_err());
    assert!(validate_user("a:").is_err());
    assert!(is_valid_container_ref("abc123"));
    assert!(is_valid_container_ref("/tether-space-s1"));
    assert!(!is_valid_container_ref("../x"));
    assert!(!is_valid_container_ref(""));
}

/// The exec and stop cases of what was the end-to-end bad-input test: each refused before
/// anything runs.
#[test]
fn bad_exec_and_stop_requests_are_refused() {
    use crate::testing::{agent, decode, limits, refused};
    use serde_json::json;
    let (caller, limits) = (agent("s1"), limits());
    for (body, word) in [
        (
            json!({"command": "true", "timeout_seconds": -1}),
            "timeout_seconds",
        ),
        (
            json!({"command": "true", "timeout_seconds": 100000}),
            "timeout_seconds",
        ),
        (
            json!({"command": "true", "max_output_bytes": -1}),
            "max_output_bytes",
        ),
        (
            json!({"command": "true", "max_output_bytes": 2000000000}),
            "max_output_bytes",
        ),
        (json!({}), "command"),
        (json!({"command": []}), "command"),
        (json!({"command": "true", "user": "a b"}), "user"),
        (json!({"command": "true", "workdir": "../x"}), "workdir"),
        (json!({"command": "true", "container": "../x"}), "container"),
        (json!({"command": "true", "space": "a.b"}), "space"),
        (json!({"command": "true", "stream": true}), "stream_subject"),
        (
            json!({"command": "true", "stream_subject": "_INBOX.x"}),
            "stream",
        ),
        (
            json!({"command": "true", "stream": true, "stream_subject": "$KV.tether_spaces.x"}),
            "stream_subject",
        ),
        (
            json!({"command": "true", "stream": true, "stream_subject": "events.x"}),
            "stream_subject",
        ),
    ] {
        let b: ExecRequest = decode(&body).expect("decodes");
        refused(
            ExecCall::validate(&b, &caller, &limits),
            400,
            word,
            &body.to_string(),
        );
    }
    let ok: ExecRequest = decode(&json!({"command": "true"})).expect("decodes");
    let c = ExecCall::validate(&ok, &caller, &limits).expect("valid");
    assert_eq!(c.max_output, limits.default_output);
    // An operator may stream to any subject it can publish to.
    let op: ExecRequest =
        decode(&json!({"command": "true", "stream": true, "stream_subject": "events.x"}))
            .expect("decodes");
    assert!(ExecCall::validate(&op, &crate::testing::operator(), &limits).is_ok());
    for g in [-3, 301] {
        let b = StopContainerRequest {
            grace_seconds: g,
            ..Default::default()
        };
        refused(
            StopCall::validate(&b, &limits),
            400,
            "grace_seconds",
            &g.to_string(),
        );
    }
    for (body, word) in [
        (json!({"tail": -1}), "tail"),
        (json!({"since": -1}), "since"),
        (json!({"max_bytes": 2000000000}), "max_bytes"),
        (json!({"container": "../x"}), "container"),
    ] {
        let b: LogsRequest = decode(&body).expect("decodes");
        refused(
            LogsCall::validate(&b, &limits),
            400,
            word,
            &body.to_string(),
        );
    }
}

#[test]
fn bad_list_requests_are_refused() {
    use crate::testing::{agent, decode, operator, refused};
    use serde_json::json;
    for (body, status, word) in [
        (json!({"space": "a.b"}), 400, "space"),
        (json!({"session_id": "a b"}), 400, "session_id"),
        (json!({"kind": "daemon"}), 400, "kind"),
        (json!({"space": "other"}), 403, "other"),
    ] {
        let b: ListContainersRequest = decode(&body).expect("decodes");
        refused(
            ListCall::validate(&b, &agent("s1")),
            status,
            word,
            &body.to_string(),
        );
    }
    let all: ListContainersRequest = decode(&json!({})).expect("decodes");
    assert_eq!(
        ListCall::validate(&all, &operator()).expect("valid").space,
        ""
    );
    assert_eq!(
        ListCall::validate(&all, &agent("s1")).expect("valid").space,
        "s1"
    );
}
