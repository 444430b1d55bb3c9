//! Unit tests of the request checks of `relics.*`.

use super::*;
use crate::testing::agent;

#[test]
fn names_and_endpoints() {
    for ok in ["web", "cache-1", "a"] {
        assert!(is_valid_relic_name(ok), "{ok}");
    }
    for no in ["", "-x", "x-", "Web", "a_b", &"x".repeat(64)] {
        assert!(!is_valid_relic_name(no), "{no}");
    }
    assert!(is_valid_endpoint("/health?x=1"));
    assert!(!is_valid_endpoint("health"));
    assert!(!is_valid_endpoint("/a b"));
    assert_eq!(internal_url("web", 8080, "/h"), "http://web:8080/h");
    assert_eq!(internal_url("web", 0, ""), "");
}

#[test]
fn bad_starts_are_refused() {
    let ok = RelicStartRequest {
        relic_name: "web".into(),
        session_id: "s1".into(),
        image: "img".into(),
        ..Default::default()
    };
    let (caller, policy) = (agent("s1"), Policy::for_tests());
    let validate =
        |r: &RelicStartRequest| StartCall::validate(r, &caller, &policy, chrono::Utc::now());
    assert!(validate(&ok).is_ok());
    type Edit = Box<dyn Fn(&mut RelicStartRequest)>;
    let cases: Vec<Edit> = vec![
        Box::new(|r| r.relic_name.clear()),
        Box::new(|r| r.session_id.clear()),
        Box::new(|r| r.session_id = "a.b".into()),
        Box::new(|r| r.image.clear()),
        Box::new(|r| r.health_check_port = -1),
        Box::new(|r| r.health_check_port = 70000),
        Box::new(|r| r.health_check_timeout_seconds = -5),
        Box::new(|r| r.health_check_endpoint = "/x".into()),
    ];
    for f in cases {
        let mut r = ok.clone();
        f(&mut r);
        assert_eq!(validate(&r).err().map(|e| e.status), Some(400), "{r:?}");
    }
}

/// The `relics.start` cases of what was the end-to-end bad-input test.
#[test]
fn bad_start_requests_name_what_is_wrong() {
    use crate::testing::{decode, refused};
    use serde_json::json;
    for (body, word) in [
        (json!({"relic_name": "web", "session_id": "s1"}), "image"),
        (
            json!({"relic_name": "web", "session_id": "s1", "image": "tether-test/busybox:latest", "health_check_timeout_seconds": -3}),
            "health_check_timeout_seconds",
        ),
        (json!({"session_id": "s1", "image": "x"}), "relic_name"),
        (json!({"relic_name": "web", "image": "x"}), "session_id"),
    ] {
        let b: RelicStartRequest = decode(&body).expect("decodes");
        refused(
            StartCall::validate(&b, &agent("s1"), &Policy::for_tests(), chrono::Utc::now()),
            400,
            word,
            &body.to_string(),
        );
    }
}

#[test]
fn bad_relic_refs_are_refused() {
    use crate::testing::{agent, decode, refused};
    use serde_json::json;
    for (body, status, word) in [
        (json!({"relic_id": "../x"}), 400, "relic_id"),
        (json!({"relic_name": "web"}), 400, "session_id"),
        (json!({"session_id": "s1"}), 400, "relic_name"),
        (
            json!({"session_id": "s1", "relic_name": "Web"}),
            400,
            "relic_name",
        ),
        (
            json!({"session_id": "s1", "relic_name": "web", "space": "other"}),
            403,
            "other",
        ),
    ] {
        let r: RelicRef = decode(&body).expect("decodes");
        refused(
            RefCall::validate(&r, &agent("s1")),
            status,
            word,
            &body.to_string(),
        );
    }
    let ok: RelicRef = decode(&json!({"session_id": "x", "relic_name": "web"})).expect("decodes");
    assert_eq!(
        RefCall::validate(&ok, &agent("s1")).expect("valid").space,
        "s1"
    );
}

/// `relics.start` refuses another agent's space before anything else; `relics.list` a bad
/// session or another agent's space.
#[test]
fn bad_spaces_and_lists_are_refused() {
    use crate::testing::{decode, refused};
    use serde_json::json;
    let start: RelicStartRequest = decode(
        &json!({"relic_name": "web", "session_id": "s1", "image": "tether-test/busybox:latest", "space": "other"}),
    )
    .expect("decodes");
    refused(
        StartCall::validate(
            &start,
            &agent("s1"),
            &Policy::for_tests(),
            chrono::Utc::now(),
        ),
        403,
        "other",
        "relics.start in another space",
    );
    for (body, status, word) in [
        (json!({"session_id": "a.b"}), 400, "session_id"),
        (json!({"space": "other"}), 403, "other"),
    ] {
        let b: RelicListRequest = decode(&body).expect("decodes");
        refused(
            ListCall::validate(&b, &agent("s1")),
            status,
            word,
            &body.to_string(),
        );
    }
    let all: RelicListRequest = decode(&json!({})).expect("decodes");
    assert_eq!(
        ListCall::validate(&all, &agent("s1")).expect("valid").space,
        "s1"
    );
}
