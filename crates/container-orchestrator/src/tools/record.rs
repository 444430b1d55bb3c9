//! What a run's record says: a new record, the result parsed from the tool's stdout, a
//! finished record fitted to one reply, and the `events.tools.*` event of a change.

use prost::Message as _;
use tether_bus::Ctx;
use tether_proto::{ToolEventData, ToolExecution};

use super::prepare::Prepared;
use crate::state::{Shared, Status};

pub(super) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The last line of stdout that is a JSON object or array.
pub fn parse_result(stdout: &str) -> Option<serde_json::Value> {
    stdout.lines().rev().find_map(|l| {
        let l = l.trim();
        if !(l.starts_with('{') || l.starts_with('[')) {
            return None;
        }
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v.is_object() || v.is_array())
    })
}

/// A record's two encodings' sizes: (protobuf, as KV keeps it; JSON, as a caller may get it).
pub(super) fn record_sizes(r: &ToolExecution) -> (usize, usize) {
    let json = serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
    (r.encoded_len(), json)
}

pub(super) fn record_size(r: &ToolExecution) -> usize {
    let (pb, json) = record_sizes(r);
    pb.max(json)
}

/// Makes a finished record fit in `budget` bytes, so it can be stored in KV and sent as one
/// reply (a record that does not fit would fail its write on every attempt, and a job would
/// run again each time): the oldest output goes first, then, when the result alone is too
/// big, the parsed result (still the last JSON line of `stdout`, as far as that was kept).
/// Says so in `truncated` and `result_note`.
pub fn fit_record(r: &mut ToolExecution, budget: usize) {
    // Neither encoding grows text more than six-fold (JSON's \u00XX), nor a parsed result
    // more than that (protobuf's doubles): small outputs need no measuring.
    const SLACK: usize = 4096;
    if 6 * (r.stdout.len() + r.stderr.len()) + SLACK <= budget {
        return;
    }
    let note = |budget: usize| {
        format!(
            "the result is too large to return (the reply of a run holds at most {budget} bytes); it was the last JSON line of stdout"
        )
    };
    // A result too big on its own goes first: stdout still holds it as the tool printed it.
    let result_size = r.result.as_ref().map_or(0, |v| {
        v.encoded_len()
            .max(serde_json::to_vec(v).map_or(usize::MAX, |j| j.len()))
    });
    if result_size + SLACK > budget {
        r.result = None;
        r.result_note = note(budget);
    }
    let mut size = record_sizes(r);
    for stderr in [false, true] {
        if size.0.max(size.1) <= budget {
            return;
        }
        let text = if stderr { &mut r.stderr } else { &mut r.stdout };
        cut_front(
            text,
            size.0.saturating_sub(budget),
            size.1.saturating_sub(budget),
        );
        r.truncated = true;
        size = record_sizes(r);
    }
    let mut size = size.0.max(size.1);
    if size > budget && r.result.is_some() {
        r.result = None;
        r.result_note = note(budget);
        size = record_size(r);
    }
    if size > budget {
        // Only the small fields are left; nothing in them grows with the tool's output.
        tracing::warn!(execution = %r.execution_id, size, budget, "tool record still over budget");
    }
}

/// Drops the fewest characters from the front of `s` that take at least `raw` bytes off
/// its protobuf form and `json` bytes off its JSON form.
pub(super) fn cut_front(s: &mut String, raw: usize, json: usize) {
    let (mut r, mut j) = (0, 0);
    let mut at = s.len();
    for (i, c) in s.char_indices() {
        if r >= raw && j >= json {
            at = i;
            break;
        }
        r += c.len_utf8();
        j += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
    }
    s.drain(..at);
}

pub(super) async fn publish_event(t: &Shared, ctx: &Ctx, r: &ToolExecution) {
    let data = ToolEventData {
        execution_id: r.execution_id.clone(),
        status: r.status.clone(),
        tool_name: r.tool_name.clone(),
        session_id: r.session_id.clone(),
        space: r.space.clone(),
        host_id: t.o.host_id.clone(),
        exit_code: r.exit_code,
        duration_ms: r.duration_ms,
        attempt: r.attempt,
    };
    let data = serde_json::to_value(&data).unwrap_or_default();
    let event = tether_bus::events::cloud_event(
        &format!("tether.tool.{}", r.status),
        &format!("tether/{}/{}", crate::NAME, t.o.host_id),
        &r.execution_id,
        data,
        tether_bus::telemetry::current_traceparent(),
    );
    let session = if r.session_id.is_empty() {
        "_"
    } else {
        &r.session_id
    };
    let subject = ctx.subject(&format!("events.tools.{session}"));
    if let Err(e) = tether_bus::events::publish(&ctx.client, subject, &event).await {
        tracing::warn!(execution = %r.execution_id, error = %e, "cannot publish tool event");
    }
}

pub(super) fn new_record(p: &Prepared, status: Status) -> ToolExecution {
    ToolExecution {
        execution_id: p.execution_id.clone(),
        status: status.into(),
        tool_name: p.tool_name.clone(),
        session_id: p.session_id.clone(),
        space: p.space.clone(),
        image: p.image.clone(),
        r#async: p.is_async,
        created_at: now_rfc3339(),
        submitted_by: p.agent_id.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::to_pb_value;

    #[test]
    fn result_is_the_last_json_line() {
        assert_eq!(
            parse_result("working\n{\"p\": 1}\n{\"sum\": 3}\ndone\n"),
            Some(serde_json::json!({"sum": 3}))
        );
        assert_eq!(parse_result("[1,2]"), Some(serde_json::json!([1, 2])));
        assert_eq!(parse_result("3\n\"x\"\n{broken\n"), None);
        assert_eq!(parse_result(""), None);
    }

    #[test]
    fn a_record_is_fitted_to_the_reply_budget() {
        let budget = 64 * 1024;
        // A small record is left alone.
        let mut r = ToolExecution {
            stdout: "ok\n".into(),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert_eq!(r.stdout, "ok\n");
        assert!(!r.truncated);
        // Output that escapes to six times its size: the oldest goes, the newest stays.
        let noise = "\u{1}".repeat(40 * 1024);
        let mut r = ToolExecution {
            stdout: format!("{noise}\n{{\"done\": true}}\n"),
            stderr: "warn\n".into(),
            result: Some(to_pb_value(serde_json::json!({"done": true}))),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert!(record_size(&r) <= budget, "{}", record_size(&r));
        assert!(r.truncated);
        assert!(r.stdout.ends_with("{\"done\": true}\n"));
        assert!(r.result.is_some());
        // A result that is too big in protobuf (a double per number) is dropped, with a note.
        let big: Vec<u8> = vec![1; 20 * 1024];
        let line = serde_json::to_string(&big).expect("json");
        let mut r = ToolExecution {
            stdout: line.clone(),
            result: Some(to_pb_value(serde_json::json!(big))),
            ..Default::default()
        };
        fit_record(&mut r, budget);
        assert!(record_size(&r) <= budget, "{}", record_size(&r));
        assert_eq!(r.stdout, line, "stdout still holds it");
        assert!(r.result.is_none());
        assert!(r.result_note.contains("too large"), "{}", r.result_note);
        // Multi-byte characters are cut at a boundary.
        let mut s = "é".repeat(10);
        cut_front(&mut s, 3, 0);
        assert_eq!(s, "é".repeat(8));
        let mut s = "\u{1}\u{1}abc".to_string();
        cut_front(&mut s, 0, 12);
        assert_eq!(s, "abc");
    }
}
