//! The task store across two gateway replicas: each remembers the record it last wrote and
//! starts its next change from it, so these pin that a replica whose memory is behind never
//! loses another's change nor refuses an event on stale grounds — it decides again on the
//! stored record.

use std::sync::Arc;

use a2a::{
    Message, Part, Role, StreamResponse, TaskArtifactUpdateEvent, TaskState, TaskStatus,
    TaskStatusUpdateEvent,
};
use tether_a2a_gateway::A2aConfig;
use tether_a2a_gateway::record::{self, Asker};
use tether_a2a_gateway::store::Tasks;
use tether_testkit::NatsServer;

fn status(state: TaskState) -> StreamResponse {
    StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
        task_id: String::new(),
        context_id: String::new(),
        status: TaskStatus {
            state,
            message: None,
            timestamp: None,
        },
        metadata: None,
    })
}

fn artifact(text: &str) -> StreamResponse {
    StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
        task_id: String::new(),
        context_id: String::new(),
        artifact: a2a::Artifact {
            artifact_id: "a".into(),
            name: None,
            description: None,
            parts: vec![Part::text(text)],
            metadata: None,
            extensions: None,
        },
        append: Some(true),
        last_chunk: None,
        metadata: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_decides_again_on_the_stored_record() {
    let nats = NatsServer::start().await.expect("nats");
    let js = async_nats::jetstream::new(nats.client().await.expect("client"));
    let cfg = A2aConfig::default();
    let a = Arc::new(Tasks::open(&js, &cfg).await.expect("replica a"));
    let b = Arc::new(Tasks::open(&js, &cfg).await.expect("replica b"));
    let who = Asker {
        agent: "echo",
        space: "s1",
        caller: "alice",
    };
    let rec = record::new_task(&who, Message::new(Role::User, vec![Part::text("hi")]), None);
    let id = rec.task.id.clone();
    a.create(rec).await.expect("create on a");

    // B writes WORKING; A, remembering only its create, writes an artifact: B's change stays.
    b.change("s1", &id, |t| {
        t.apply_worker(1, status(TaskState::Working)).map(|_| true)
    })
    .await
    .expect("b: working");
    let after = a
        .change("s1", &id, |t| {
            t.apply_worker(1, artifact("one")).map(|_| true)
        })
        .await
        .expect("a: artifact on the stored record");
    assert_eq!(after.state(), &TaskState::Working, "B's change is kept");
    assert_eq!(after.seq, 3);

    // A's memory says attempt 2 …
    a.change("s1", &id, |t| {
        t.apply_worker(2, status(TaskState::InputRequired))
            .map(|_| true)
    })
    .await
    .expect("a: attempt 2 asks for input");
    // … B takes the follow-up (a new work item: attempts count from 1 again) …
    b.change("s1", &id, |t| {
        t.follow_up(Message::new(Role::User, vec![Part::text("more")]))
            .map(|_| true)
    })
    .await
    .expect("b: follow-up");
    // … and attempt 1 of the new item reaches A: not refused as stale.
    let done = a
        .change("s1", &id, |t| {
            t.apply_worker(1, status(TaskState::Completed))
                .map(|_| true)
        })
        .await
        .expect("a: the new item's attempt 1 is not stale");
    assert_eq!(done.state(), &TaskState::Completed);
    let stored = b.get("s1", &id).await.expect("get").expect("task");
    assert_eq!(stored, done, "both replicas see one record");
    // A terminal task refuses, whoever remembers what.
    let p = b
        .change("s1", &id, |t| {
            t.apply_worker(1, status(TaskState::Failed)).map(|_| true)
        })
        .await
        .expect_err("terminal");
    assert_eq!(p.status, 409);
}
