//! ProtoJSON leaves out empty fields (an empty `parts`, an empty `contextId`), and A2A readers
//! must take what other SDKs write; the `a2a` crate's types want some of those fields present.
//! These fill them in on the JSON before it is read, so a peer that leaves them out is served
//! like one that writes them. Nothing here makes an invalid request valid: a missing
//! `messageId` or an empty `parts` is still refused by the task rules.

use serde_json::{Map, Value, json};

fn obj(v: &mut Value) -> Option<&mut Map<String, Value>> {
    v.as_object_mut()
}

fn default(o: &mut Map<String, Value>, key: &str, v: Value) {
    if o.get(key).is_none_or(Value::is_null) {
        o.insert(key.to_string(), v);
    }
}

/// A Message: `parts` and `messageId` may be left out; `role` defaults to `role`.
pub fn message(v: &mut Value, role: &str) {
    if let Some(o) = obj(v) {
        default(o, "parts", json!([]));
        default(o, "messageId", json!(""));
        default(o, "role", json!(role));
    }
}

fn artifact(v: &mut Value) {
    if let Some(o) = obj(v) {
        default(o, "parts", json!([]));
    }
}

fn status(v: &mut Value) {
    if let Some(o) = obj(v) {
        default(o, "state", json!("TASK_STATE_UNSPECIFIED"));
        if let Some(m) = o.get_mut("message") {
            message(m, "ROLE_AGENT");
        }
    }
}

/// A StreamResponse a worker reports.
pub fn stream_response(v: &mut Value) {
    let Some(o) = obj(v) else { return };
    if let Some(s) = o.get_mut("statusUpdate").and_then(obj) {
        default(s, "taskId", json!(""));
        default(s, "contextId", json!(""));
        default(s, "status", json!({}));
        if let Some(st) = s.get_mut("status") {
            status(st);
        }
    }
    if let Some(a) = o.get_mut("artifactUpdate").and_then(obj) {
        default(a, "taskId", json!(""));
        default(a, "contextId", json!(""));
        if let Some(x) = a.get_mut("artifact") {
            artifact(x);
        }
    }
    if let Some(m) = o.get_mut("message") {
        message(m, "ROLE_AGENT");
    }
    if let Some(t) = o.get_mut("task").and_then(obj) {
        default(t, "id", json!(""));
        default(t, "contextId", json!(""));
        default(t, "status", json!({}));
        if let Some(st) = t.get_mut("status") {
            status(st);
        }
        for key in ["artifacts", "history"] {
            if let Some(items) = t.get_mut(key).and_then(Value::as_array_mut) {
                for i in items {
                    if key == "history" {
                        message(i, "ROLE_AGENT");
                    } else {
                        artifact(i);
                    }
                }
            }
        }
    }
}

/// A caller's SendMessageRequest.
pub fn send_request(v: &mut Value) {
    if let Some(m) = obj(v).and_then(|o| o.get_mut("message")) {
        message(m, "ROLE_USER");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_what_protojson_leaves_out() {
        let mut e = json!({"statusUpdate": {"taskId": "t", "status": {"state": "TASK_STATE_WORKING",
            "message": {"messageId": "m", "role": "ROLE_AGENT"}}}});
        stream_response(&mut e);
        let r: a2a::StreamResponse = serde_json::from_value(e).expect("reads");
        let a2a::StreamResponse::StatusUpdate(s) = r else {
            panic!("status update")
        };
        assert_eq!(s.context_id, "");
        assert!(s.status.message.expect("message").parts.is_empty());

        let mut e = json!({"artifactUpdate": {"taskId": "t", "artifact": {"artifactId": "a"}}});
        stream_response(&mut e);
        serde_json::from_value::<a2a::StreamResponse>(e).expect("reads");

        let mut req = json!({"message": {"messageId": "m", "parts": [{"text": "x"}]}});
        send_request(&mut req);
        let r: a2a::SendMessageRequest = serde_json::from_value(req).expect("reads");
        assert_eq!(r.message.role, a2a::Role::User);
        // Not a JSON object: left alone, refused by the reader.
        let mut junk = json!(3);
        stream_response(&mut junk);
        assert_eq!(junk, json!(3));
    }
}
