//! A2A's protobuf form on the bus (`Content-Type: application/protobuf`): a request is read
//! into its official message (`tether_proto::a2a`, package `lf.a2a.v1`) and turned into A2A
//! JSON, the one form the operations work on; an answer goes the other way. So protobuf and
//! JSON callers are served by the same code, and a field means the same in both.

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_bus::{Encoding, Problem, Reply};
use tether_proto::a2a as pb;

use crate::error::A2aError;

/// The request message an operation takes.
#[derive(Clone, Copy, Debug)]
pub enum Request {
    SendMessage,
    GetTask,
    ListTasks,
    CancelTask,
    SubscribeToTask,
}

/// The answer message an operation gives (stream chunks are `StreamResponse`).
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    SendMessage,
    Task,
    ListTasks,
    StreamResponse,
}

fn to_json<M: Message + Default + Serialize>(raw: &[u8]) -> Result<Vec<u8>, Problem> {
    let m = M::decode(raw)
        .map_err(|e| A2aError::ParseError.problem(format!("malformed protobuf: {e}")))?;
    serde_json::to_vec(&m).map_err(|e| Problem::internal(format!("cannot read the request: {e}")))
}

/// A request's body as A2A JSON, whatever its encoding.
pub fn request_json(encoding: Encoding, kind: Request, body: &[u8]) -> Result<Bytes, Problem> {
    if encoding == Encoding::Json {
        return Ok(Bytes::copy_from_slice(body));
    }
    let json = match kind {
        Request::SendMessage => to_json::<pb::SendMessageRequest>(body)?,
        Request::GetTask => to_json::<pb::GetTaskRequest>(body)?,
        Request::ListTasks => to_json::<pb::ListTasksRequest>(body)?,
        Request::CancelTask => to_json::<pb::CancelTaskRequest>(body)?,
        Request::SubscribeToTask => to_json::<pb::SubscribeToTaskRequest>(body)?,
    };
    Ok(Bytes::from(json))
}

fn from_json<M: Message + DeserializeOwned>(v: serde_json::Value) -> Result<Vec<u8>, Problem> {
    let m: M = serde_json::from_value(v)
        .map_err(|e| Problem::internal(format!("cannot write the answer as protobuf: {e}")))?;
    Ok(m.encode_to_vec())
}

/// An answer's bytes in `encoding`.
pub fn encode<T: Serialize>(encoding: Encoding, kind: Answer, value: &T) -> Result<Bytes, Problem> {
    let v = serde_json::to_value(value)
        .map_err(|e| Problem::internal(format!("cannot encode the answer: {e}")))?;
    if encoding == Encoding::Json {
        return serde_json::to_vec(&v)
            .map(Bytes::from)
            .map_err(|e| Problem::internal(format!("cannot encode the answer: {e}")));
    }
    let raw = match kind {
        Answer::SendMessage => from_json::<pb::SendMessageResponse>(v)?,
        Answer::Task => from_json::<pb::Task>(v)?,
        Answer::ListTasks => from_json::<pb::ListTasksResponse>(v)?,
        Answer::StreamResponse => from_json::<pb::StreamResponse>(v)?,
    };
    Ok(Bytes::from(raw))
}

/// An answer as a reply in `encoding`.
pub fn reply<T: Serialize>(encoding: Encoding, kind: Answer, value: &T) -> Result<Reply, Problem> {
    Ok(Reply::new(
        encode(encoding, kind, value)?,
        encoding.content_type(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protobuf_request_reads_as_the_same_json() {
        let m = pb::SendMessageRequest {
            message: Some(pb::Message {
                message_id: "m1".into(),
                role: pb::Role::User as i32,
                parts: vec![pb::Part {
                    content: Some(pb::part::Content::Text("hi".into())),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            configuration: Some(pb::SendMessageConfiguration {
                return_immediately: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = request_json(Encoding::Protobuf, Request::SendMessage, &m.encode_to_vec())
            .expect("reads");
        let r: a2a::SendMessageRequest = serde_json::from_slice(&json).expect("A2A JSON");
        assert_eq!(r.message.message_id, "m1");
        assert_eq!(r.message.role, a2a::Role::User);
        assert_eq!(r.message.text(), Some("hi"));
        assert_eq!(
            r.configuration.and_then(|c| c.return_immediately),
            Some(true)
        );
        let bad =
            request_json(Encoding::Protobuf, Request::GetTask, b"\xff\xff\xff").expect_err("junk");
        assert_eq!(bad.status, 400);
    }

    #[test]
    fn an_answer_writes_as_protobuf() {
        let task = a2a::Task {
            id: "t1".into(),
            context_id: "c1".into(),
            status: a2a::TaskStatus {
                state: a2a::TaskState::Completed,
                message: None,
                timestamp: Some(chrono::Utc::now()),
            },
            artifacts: Some(vec![a2a::Artifact {
                artifact_id: "a".into(),
                name: None,
                description: None,
                parts: vec![a2a::Part::text("out")],
                metadata: None,
                extensions: None,
            }]),
            history: None,
            metadata: Some([("k".to_string(), serde_json::json!({"x": 1}))].into()),
        };
        let raw = encode(
            Encoding::Protobuf,
            Answer::SendMessage,
            &a2a::SendMessageResponse::Task(task),
        )
        .expect("encodes");
        let back = pb::SendMessageResponse::decode(raw.as_ref()).expect("decodes");
        let Some(pb::send_message_response::Payload::Task(t)) = back.payload else {
            panic!("a task")
        };
        assert_eq!(
            t.status.expect("status").state,
            pb::TaskState::Completed as i32
        );
        assert_eq!(
            t.artifacts[0].parts[0].content,
            Some(pb::part::Content::Text("out".into()))
        );
    }
}
