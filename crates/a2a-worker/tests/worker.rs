//! The worker library against a real nats-server, with the TEST STANDING IN FOR THE GATEWAY:
//! each test creates the `A2A_WORK` stream and the durable `work_<agent>` consumer as the
//! gateway would, publishes work items itself, and answers `a2a.<agent>.work.event` /
//! `.work.card` requests by hand (recording them). Nothing here checks the real gateway;
//! end-to-end tests (gateway + worker + callout permissions) come with the gateway.
//!
//! The worker connects as the server's admin user (no callout), so bus permissions are not
//! exercised here either; the Bearer token is checked as the stand-in receives it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tether_a2a_worker::echo::Echo;
use tether_a2a_worker::{Executor, TokenSource, WorkerConfig, run};
use tether_bus::Problem;
use tether_bus::problem::{SERVICE_ERROR, SERVICE_ERROR_CODE};
use tether_testkit::{NatsServer, eventually, unique};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "worker-token-1";

/// Stops a worker started by [`Bench::worker`] and checks it ends well within [`WAIT`].
async fn stop_worker(
    stop: CancellationToken,
    h: tokio::task::JoinHandle<anyhow::Result<()>>,
    what: &str,
) {
    stop.cancel();
    tokio::time::timeout(WAIT, h)
        .await
        .expect(what)
        .expect("join")
        .expect("the worker ran");
}

/// The bus, the stream and consumer the gateway would have made, and the stand-in.
struct Bench {
    _server: NatsServer,
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    agent: String,
    events: async_nats::Subscriber,
}

/// One work.event request the stand-in received.
struct Req {
    auth: String,
    body: Value,
    reply: async_nats::Subject,
}

impl Req {
    fn kind(&self) -> &str {
        let e = &self.body["event"];
        ["statusUpdate", "artifactUpdate", "message", "task"]
            .into_iter()
            .find(|k| e.get(*k).is_some())
            .unwrap_or("?")
    }
    fn state(&self) -> Option<&str> {
        self.body["event"]["statusUpdate"]["status"]["state"].as_str()
    }
    fn task(&self) -> &str {
        self.body["taskId"].as_str().unwrap_or_default()
    }
    fn attempt(&self) -> u64 {
        self.body["attempt"].as_u64().unwrap_or(0)
    }
}

impl Bench {
    async fn start(ack_wait: Duration) -> Bench {
        let server = NatsServer::start().await.expect("nats-server");
        let url = server.url();
        let client = tether_testkit::connect(&url).await.expect("connect");
        let js = jetstream::new(client.clone());
        let agent = unique("agent");
        let s = js
            .create_stream(stream::Config {
                name: "A2A_WORK".into(),
                subjects: vec!["a2a_work.>".into()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("stream");
        s.create_consumer(pull::Config {
            durable_name: Some(format!("work_{agent}")),
            filter_subject: format!("a2a_work.{agent}"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: 5,
            ..Default::default()
        })
        .await
        .expect("consumer");
        let events = client
            .subscribe(format!("a2a.{agent}.work.event"))
            .await
            .expect("subscribe");
        Bench {
            _server: server,
            url,
            client,
            js,
            agent,
            events,
        }
    }

    /// Starts a worker on this test's runtime; returns its shutdown token and join handle.
    async fn worker<E: Executor>(
        &self,
        executor: E,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let client = tether_testkit::connect(&self.url).await.expect("connect");
        let mut cfg = WorkerConfig::new(&self.agent);
        cfg.request_timeout = Duration::from_secs(2);
        cfg.event_retry_for = Duration::from_secs(5);
        tweak(&mut cfg);
        let stop = CancellationToken::new();
        let h = tokio::spawn(run(
            client,
            TokenSource::fixed(TOKEN),
            cfg,
            Arc::new(executor),
            stop.clone(),
        ));
        (stop, h)
    }

    /// Publishes a work item for a new task; returns its id.
    async fn send(&self, space: &str, text: &str) -> String {
        let task_id = unique("task");
        self.send_item(space, &task_id, text, Vec::new()).await;
        task_id
    }

    async fn send_item(&self, space: &str, task_id: &str, text: &str, earlier: Vec<Value>) {
        let message = json!({"messageId": unique("m"), "contextId": "ctx-1", "taskId": task_id,
                             "role": "ROLE_USER", "parts": [{"text": text}]});
        let mut history = earlier;
        history.push(message.clone());
        let item = json!({
            "space": space,
            "task": {"id": task_id, "contextId": "ctx-1", "status": {"state": "TASK_STATE_SUBMITTED"},
                     "history": history,
                     "metadata": {"tether": {"callerAgentId": "alice", "space": space, "agentId": self.agent}}},
            "message": message,
        });
        self.js
            .publish(format!("a2a_work.{}", self.agent), item.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    async fn next(&mut self) -> Req {
        let m = tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("a work.event within the deadline")
            .expect("subscription open");
        Req {
            auth: m
                .headers
                .as_ref()
                .and_then(|h| h.get("Authorization"))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
            body: serde_json::from_slice(&m.payload).expect("event body is JSON"),
            reply: m.reply.expect("a request"),
        }
    }

    /// Answers as the gateway would when it accepts the event.
    async fn accept(&self, r: &Req, cancel_requested: bool) {
        let state = match r.kind() {
            "message" => "TASK_STATE_COMPLETED",
            _ => r.state().unwrap_or("TASK_STATE_WORKING"),
        };
        let body = json!({"state": state, "cancelRequested": cancel_requested, "seq": 1});
        self.client
            .publish(r.reply.clone(), body.to_string().into())
            .await
            .expect("reply");
    }

    async fn refuse(&self, r: &Req, status: u16, detail: &str) {
        let p = Problem::new(status, detail);
        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR, p.title.as_str());
        h.insert(SERVICE_ERROR_CODE, status.to_string().as_str());
        self.client
            .publish_with_headers(r.reply.clone(), h, p.to_body("work.event"))
            .await
            .expect("reply");
    }

    /// Accepts events until `task` settles; returns them all.
    async fn accept_until_settled(&mut self, task: &str) -> Vec<Req> {
        let mut seen = Vec::new();
        loop {
            let r = self.next().await;
            self.accept(&r, false).await;
            let done = r.task() == task
                && (r.kind() == "message"
                    || matches!(
                        r.state(),
                        Some(
                            "TASK_STATE_COMPLETED"
                                | "TASK_STATE_FAILED"
                                | "TASK_STATE_CANCELED"
                                | "TASK_STATE_INPUT_REQUIRED"
                        )
                    ));
            seen.push(r);
            if done {
                return seen;
            }
        }
    }

    async fn consumer_info(&self) -> jetstream::consumer::Info {
        let mut c: jetstream::consumer::Consumer<pull::Config> = self
            .js
            .get_consumer_from_stream(format!("work_{}", self.agent), "A2A_WORK")
            .await
            .expect("consumer");
        c.info().await.expect("consumer info").clone()
    }

    /// Waits until every work message was acked.
    async fn all_acked(&self) {
        eventually(WAIT, "all work acked", || async {
            let i = self.consumer_info().await;
            (i.num_ack_pending == 0 && i.num_pending == 0).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn events_arrive_in_order_with_body_and_token_and_the_ack_follows_the_last() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let mut cards = b
        .client
        .subscribe(format!("a2a.{}.work.card", b.agent))
        .await
        .expect("subscribe");
    let (stop, h) = b
        .worker(Echo::default(), |c| {
            c.card = Some(tether_a2a_worker::echo::card("echo"))
        })
        .await;

    // The card comes at start, with the token.
    let card = tokio::time::timeout(WAIT, cards.next())
        .await
        .expect("card within the deadline")
        .expect("open");
    let auth = card.headers.as_ref().and_then(|h| h.get("Authorization"));
    assert_eq!(auth.map(|v| v.as_str()), Some("Bearer worker-token-1"));
    let v: Value = serde_json::from_slice(&card.payload).expect("card JSON");
    assert_eq!(v["skills"][0]["id"], "echo");
    if let Some(reply) = card.reply {
        b.client.publish(reply, "{}".into()).await.expect("reply");
    }

    let task = b.send("space-1", "hello there").await;
    let w = b.next().await;
    assert_eq!(w.auth, "Bearer worker-token-1");
    assert_eq!(w.body["space"], "space-1");
    assert_eq!(w.task(), task);
    assert_eq!(w.attempt(), 1);
    assert_eq!(w.state(), Some("TASK_STATE_WORKING"));
    assert_eq!(w.body["event"]["statusUpdate"]["contextId"], "ctx-1");
    b.accept(&w, false).await;

    let a = b.next().await;
    assert_eq!(a.kind(), "artifactUpdate");
    assert_eq!(
        a.body["event"]["artifactUpdate"]["artifact"]["parts"],
        json!([{"text": "hello there"}])
    );
    assert_eq!(a.body["event"]["artifactUpdate"]["lastChunk"], true);
    b.accept(&a, false).await;

    let c = b.next().await;
    assert_eq!(c.state(), Some("TASK_STATE_COMPLETED"));
    // The final event is not answered yet: the work message must still be unacked.
    assert_eq!(b.consumer_info().await.num_ack_pending, 1);
    b.accept(&c, false).await;
    b.all_acked().await;

    stop_worker(stop, h, "worker stops").await;
}

/// Reports its result and its end as one batch ([`tether_a2a_worker::Events::complete_with`]).
struct Batch;

impl Executor for Batch {
    async fn execute(
        &self,
        ctx: tether_a2a_worker::TaskContext,
        events: tether_a2a_worker::Events,
    ) -> anyhow::Result<()> {
        let artifact = a2a::Artifact {
            artifact_id: "result".into(),
            name: None,
            description: None,
            parts: vec![a2a::Part::text(ctx.text())],
            metadata: None,
            extensions: None,
        };
        let done = events.agent_text("done");
        events.complete_with(vec![artifact], Some(done)).await?;
        Ok(())
    }
}

#[tokio::test]
async fn complete_with_reports_the_artifacts_and_the_end_in_one_request() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (stop, h) = b.worker(Batch, |_| {}).await;
    let task = b.send("space-1", "the answer").await;
    let r = b.next().await;
    assert_eq!(r.task(), task);
    assert!(r.body.get("event").is_none(), "{}", r.body);
    let events = r.body["events"].as_array().expect("a batch").clone();
    assert_eq!(events.len(), 2, "{}", r.body);
    assert_eq!(
        events[0]["artifactUpdate"]["artifact"]["parts"],
        json!([{"text": "the answer"}])
    );
    assert_eq!(events[0]["artifactUpdate"]["taskId"], task.as_str());
    assert_eq!(
        events[1]["statusUpdate"]["status"]["state"],
        "TASK_STATE_COMPLETED"
    );
    assert_eq!(
        events[1]["statusUpdate"]["status"]["message"]["parts"][0]["text"],
        "done"
    );
    // The answer names the batch's last state: the run settled, nothing more is sent.
    let body = json!({"state": "TASK_STATE_COMPLETED", "cancelRequested": false, "seq": 3});
    b.client
        .publish(r.reply.clone(), body.to_string().into())
        .await
        .expect("reply");
    b.all_acked().await;
    assert!(
        b.events.next().now_or_never().is_none(),
        "no event after a settling batch"
    );

    stop_worker(stop, h, "worker stops").await;
}

#[tokio::test]
async fn progress_notes_keep_a_long_task_from_redelivery() {
    let mut b = Bench::start(Duration::from_secs(1)).await;
    let stats = Arc::new(tether_a2a_worker::WorkerStats::default());
    let st = stats.clone();
    let (_stop, _h) = b.worker(Echo::default(), move |c| c.stats = st).await;
    let task = b.send("s", "sleep 3500 long").await;
    let seen = b.accept_until_settled(&task).await;
    assert!(seen.iter().all(|r| r.attempt() == 1 && r.task() == task));
    assert_eq!(
        seen.last().and_then(Req::state),
        Some("TASK_STATE_COMPLETED")
    );
    b.all_acked().await;
    assert_eq!(b.consumer_info().await.num_redelivered, 0);
    assert_eq!(stats.received.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_worker_dropped_mid_task_leaves_it_to_the_next_as_attempt_2() {
    let mut b = Bench::start(Duration::from_secs(1)).await;
    // The first worker lives on its own runtime, dropped whole (connection included) mid-task:
    // as near to a killed process as one test process gets.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let url = b.url.clone();
    let agent = b.agent.clone();
    rt.spawn(async move {
        let client = tether_testkit::connect(&url).await.expect("connect");
        let _ = run(
            client,
            TokenSource::fixed(TOKEN),
            WorkerConfig::new(agent),
            Arc::new(Echo::default()),
            CancellationToken::new(),
        )
        .await;
    });
    let task = b.send("s", "sleep 2000 survive").await;
    let w = b.next().await;
    assert_eq!((w.task(), w.attempt()), (task.as_str(), 1));
    b.accept(&w, false).await;
    rt.shutdown_background();

    let (_stop, _h) = b.worker(Echo::default(), |_| {}).await;
    let seen = b.accept_until_settled(&task).await;
    assert!(seen.iter().all(|r| r.attempt() == 2), "second delivery");
    assert_eq!(seen[0].state(), Some("TASK_STATE_WORKING"));
    assert_eq!(
        seen.last().and_then(Req::state),
        Some("TASK_STATE_COMPLETED")
    );
    b.all_acked().await;
}

#[tokio::test]
async fn a_cancel_signal_cancels_the_right_task() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (_stop, _h) = b.worker(Echo::default(), |c| c.max_concurrency = 2).await;
    let t1 = b.send("s1", "sleep 60000 one").await;
    let t2 = b.send("s1", "sleep 60000 two").await;
    for _ in 0..2 {
        let w = b.next().await;
        assert_eq!(w.state(), Some("TASK_STATE_WORKING"));
        b.accept(&w, false).await;
    }
    let signal = |space: &str, task: &str| json!({"space": space, "taskId": task}).to_string();
    let subject = format!("a2a.{}.signal.cancel", b.agent);
    // t2's id in another space: not this run (had it cancelled t2, t2's CANCELED would
    // come before t1's, since signals are handled in order).
    b.client
        .publish(subject.clone(), signal("s2", &t2).into())
        .await
        .expect("publish");
    b.client
        .publish(subject.clone(), signal("s1", &t1).into())
        .await
        .expect("publish");
    let c = b.next().await;
    assert_eq!(
        (c.task(), c.state()),
        (t1.as_str(), Some("TASK_STATE_CANCELED"))
    );
    b.accept(&c, false).await;
    // t2 still runs until its own signal.
    b.client
        .publish(subject, signal("s1", &t2).into())
        .await
        .expect("publish");
    let c = b.next().await;
    assert_eq!(
        (c.task(), c.state()),
        (t2.as_str(), Some("TASK_STATE_CANCELED"))
    );
    b.accept(&c, false).await;
    b.all_acked().await;
}

#[tokio::test]
async fn a_reply_asking_for_cancel_or_refusing_the_attempt_ends_the_run() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (_stop, _h) = b.worker(Echo::default(), |_| {}).await;
    // cancelRequested in the reply to WORKING: the run records CANCELED.
    let t1 = b.send("s", "sleep 60000 x").await;
    let w = b.next().await;
    b.accept(&w, true).await;
    let c = b.next().await;
    assert_eq!(
        (c.task(), c.state()),
        (t1.as_str(), Some("TASK_STATE_CANCELED"))
    );
    b.accept(&c, false).await;
    b.all_acked().await;

    // 409 (stale attempt): the run stops at once, sends nothing more, and acks.
    let t2 = b.send("s", "sleep 60000 y").await;
    let w = b.next().await;
    assert_eq!(w.task(), t2);
    b.refuse(&w, 409, "stale attempt").await;
    b.all_acked().await;
    // The next task's first event is the next one seen: nothing came from t2 after the 409.
    let t3 = b.send("s", "z").await;
    let seen = b.accept_until_settled(&t3).await;
    assert!(seen.iter().all(|r| r.task() == t3));
}

#[tokio::test]
async fn executor_errors_and_panics_become_failed_and_the_worker_lives_on() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (_stop, h) = b.worker(Echo::default(), |_| {}).await;
    for (text, needle) in [("fail", "asked to fail"), ("panic", "asked to panic")] {
        let t = b.send("s", text).await;
        let seen = b.accept_until_settled(&t).await;
        let last = seen.last().expect("events");
        assert_eq!(last.state(), Some("TASK_STATE_FAILED"));
        let msg = &last.body["event"]["statusUpdate"]["status"]["message"];
        assert_eq!(msg["role"], "ROLE_AGENT");
        let text = msg["parts"][0]["text"].as_str().unwrap_or_default();
        assert!(text.contains(needle), "{text}");
    }
    b.all_acked().await;
    assert!(!h.is_finished());
}

#[tokio::test]
async fn input_required_then_the_follow_up_completes() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (_stop, _h) = b.worker(Echo::default(), |_| {}).await;
    let t = b.send("s", "ask").await;
    let seen = b.accept_until_settled(&t).await;
    let last = seen.last().expect("events");
    assert_eq!(last.state(), Some("TASK_STATE_INPUT_REQUIRED"));
    let first = json!({"messageId": "m-ask", "role": "ROLE_USER", "parts": [{"text": "ask"}]});
    b.send_item("s", &t, "blue", vec![first]).await;
    let seen = b.accept_until_settled(&t).await;
    let art = seen
        .iter()
        .find(|r| r.kind() == "artifactUpdate")
        .expect("an artifact");
    assert_eq!(
        art.body["event"]["artifactUpdate"]["artifact"]["parts"][0]["text"],
        "asked: ask; answered: blue"
    );
    assert_eq!(
        seen.last().and_then(Req::state),
        Some("TASK_STATE_COMPLETED")
    );
    b.all_acked().await;
}

#[tokio::test]
async fn no_more_runs_at_once_than_max_concurrency() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (_stop, _h) = b.worker(Echo::default(), |c| c.max_concurrency = 2).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(b.send("s", &format!("sleep 300 n{i}")).await);
    }
    let mut running = std::collections::HashSet::new();
    let mut done = 0;
    let mut peak = 0;
    while done < tasks.len() {
        let r = b.next().await;
        let pending = b.consumer_info().await.num_ack_pending;
        assert!(pending <= 2, "{pending} work messages held at once");
        match r.state() {
            Some("TASK_STATE_WORKING") => {
                running.insert(r.task().to_string());
            }
            Some("TASK_STATE_COMPLETED") => {
                running.remove(r.task());
                done += 1;
            }
            _ => {}
        }
        peak = peak.max(running.len());
        assert!(running.len() <= 2, "{} runs at once", running.len());
        b.accept(&r, false).await;
    }
    assert_eq!(peak, 2, "both slots were used");
    b.all_acked().await;
}

#[tokio::test]
async fn shutdown_drains_and_gives_back_what_did_not_finish() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (stop, h) = b
        .worker(Echo::default(), |c| {
            c.drain_timeout = Duration::from_millis(500)
        })
        .await;
    let t = b.send("s", "sleep 60000 never").await;
    let w = b.next().await;
    b.accept(&w, false).await;
    stop_worker(stop, h, "worker stops after the drain deadline").await;
    // Given back (nak), not acked: the next worker gets it at once as attempt 2.
    let (_stop, _h) = b.worker(Echo::default(), |_| {}).await;
    let w = b.next().await;
    assert_eq!((w.task(), w.attempt()), (t.as_str(), 2));
    b.accept(&w, false).await;
}

#[tokio::test]
async fn a_worker_waits_for_its_consumer() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = tether_testkit::connect(&server.url())
        .await
        .expect("connect");
    // Watch the worker ask for the consumer that is not there (no responder is given: the
    // server's JetStream answers these requests itself, and keeps answering "not found").
    let mut asks = client
        .subscribe("$JS.API.CONSUMER.INFO.A2A_WORK.work_nobody")
        .await
        .expect("subscribe");
    let stop = CancellationToken::new();
    let h = tokio::spawn(run(
        client,
        TokenSource::fixed(TOKEN),
        WorkerConfig::new("nobody"),
        Arc::new(Echo::default()),
        stop.clone(),
    ));
    for _ in 0..3 {
        tokio::time::timeout(WAIT, asks.next())
            .await
            .expect("the worker asks again")
            .expect("open");
    }
    assert!(!h.is_finished(), "still waiting for work_nobody");
    stop_worker(stop, h, "stops on shutdown").await;
}

#[tokio::test]
async fn a_stopped_idle_worker_leaves_no_pull_to_swallow_work() {
    let mut b = Bench::start(Duration::from_secs(30)).await;
    let (stop, h) = b.worker(Echo::default(), |_| {}).await;
    // It sits in a pull at the server.
    eventually(WAIT, "the worker pulls", || async {
        (b.consumer_info().await.num_waiting > 0).then_some(())
    })
    .await;
    stop_worker(stop, h, "stops").await;
    // Work queued right after the stop reaches the next worker long before ack_wait (30 s).
    let t = b.send("s", "after the stop").await;
    let (_stop, _h) = b.worker(Echo::default(), |_| {}).await;
    let w = tokio::time::timeout(Duration::from_secs(10), b.next())
        .await
        .expect("served well before the item's ack_wait");
    assert_eq!(w.task(), t.as_str());
    b.accept(&w, false).await;
}
