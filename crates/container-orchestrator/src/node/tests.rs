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
        // Another agent's inbox (the caller is `a1`): no writing into someone else's replies.
        (
            json!({"command": "true", "stream": true, "stream_subject": "_INBOX.a2.x"}),
            "stream_subject",
        ),
        (
            json!({"command": "true", "stream": true, "stream_subject": "_INBOX.x"}),
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
    // Its own inbox, or a node's (the shell server streams on an agent's behalf).
    for s in ["_INBOX.a1.x1", "_INBOX_NODES.shell-server.x2"] {
        let own: ExecRequest =
            decode(&json!({"command": "true", "stream": true, "stream_subject": s}))
                .expect("decodes");
        assert!(ExecCall::validate(&own, &caller, &limits).is_ok(), "{s}");
    }
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

/// `containers.start`, `.remove`, `.inspect` and `.stats`: a bad target or another agent's
/// space is refused before the engine is asked.
#[test]
fn bad_container_refs_are_refused() {
    use crate::testing::{agent, decode, operator, refused};
    use serde_json::json;
    let caller = agent("s1");
    for (body, status, word) in [
        (json!({"container": "../x"}), 400, "container"),
        (json!({"space": "a.b"}), 400, "space"),
        (json!({"space": "other"}), 403, "other"),
    ] {
        let case = body.to_string();
        let r: ContainerRef = decode(&body).expect("decodes");
        refused(StartCall::validate(&r, &caller), status, word, &case);
        refused(InspectCall::validate(&r, &caller), status, word, &case);
        refused(StatsCall::validate(&r, &caller), status, word, &case);
        let r: RemoveContainerRequest = decode(&body).expect("decodes");
        refused(RemoveCall::validate(&r, &caller), status, word, &case);
    }
    let own: ContainerRef = decode(&json!({"space": "s1"})).expect("decodes");
    assert!(StartCall::validate(&own, &caller).is_ok());
    let any: ContainerRef = decode(&json!({"space": "other"})).expect("decodes");
    assert!(InspectCall::validate(&any, &operator()).is_ok());
}

/// `containers.create`: the caller's space decides, then the spec checks of `validate_create`
/// (tested one by one in `spec::tests`).
#[test]
fn bad_create_requests_are_refused() {
    use crate::spec::Policy;
    use crate::testing::{agent, decode, operator, refused};
    use serde_json::json;
    let (caller, policy, now) = (agent("s1"), Policy::for_tests(), chrono::Utc::now());
    let image = "tether-test/busybox:latest";
    for (body, status, word) in [
        (json!({"image": image, "space": "other"}), 403, "other"),
        (json!({}), 400, "image"),
        (json!({"image": "Bad Image"}), 400, "image"),
        (json!({"image": image, "kind": "daemon"}), 400, "kind"),
        (
            json!({"image": image, "network_mode": "host"}),
            403,
            "network_mode",
        ),
    ] {
        let b: tether_proto::CreateContainerRequest = decode(&body).expect("decodes");
        refused(
            CreateCall::validate(&b, &caller, &policy, now),
            status,
            word,
            &body.to_string(),
        );
    }
    let none: tether_proto::CreateContainerRequest =
        decode(&json!({"image": image})).expect("decodes");
    refused(
        CreateCall::validate(&none, &operator(), &policy, now),
        400,
        "space",
        "an operator naming no space",
    );
    let c = CreateCall::validate(&none, &caller, &policy, now).expect("valid");
    assert_eq!(c.space, "s1");
    assert_eq!(c.spec.labels[crate::labels::LABEL_SPACE], "s1");
}
