//! Durable JetStream work through a server crash: nothing published is lost, nothing whose
//! ack the server confirmed is processed again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream;
use tether_bus::jobs::{self, Outcome, WorkerConfig};
use tether_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const N: usize = 300;

#[tokio::test]
async fn consumer_resumes_after_server_restart_exactly_once_for_acked() {
    let mut nats = NatsServer::start().await.expect("nats");
    let cfg = tether_bus::BusConfig {
        nats_url: nats.url(),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let client = tether_bus::connect::connect(&cfg, "jobs-test", &stop)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    jobs::ensure_stream(
        &js,
        stream::Config {
            name: "JOBS".into(),
            subjects: vec!["jobs.>".into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
    .expect("stream");

    let processed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    // Per job: when its ack was confirmed, and every run that started after that.
    let acked_at: Arc<Mutex<HashMap<String, std::time::Instant>>> = Arc::default();
    let after_ack: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut wcfg = WorkerConfig::new("JOBS", "workers");
    wcfg.max_concurrency = 16;
    wcfg.ack_wait = Duration::from_secs(2);
    wcfg.max_deliver = 20;
    wcfg.done = Some(
        tether_bus::kv::open_or_create_bucket(
            &js,
            async_nats::jetstream::kv::Config {
                bucket: "jobs_done".into(),
                history: 1,
                ..Default::default()
            },
        )
        .await
        .expect("done bucket"),
    );
    let stats = wcfg.stats.clone();
    let a2 = acked_at.clone();
    wcfg.on_acked = Some(Arc::new(move |key: &str| {
        a2.lock()
            .expect("lock")
            .entry(key.trim_start_matches("id.").to_string())
            .or_insert_with(std::time::Instant::now);
    }));
    let (_a3, _late) = (acked_at.clone(), after_ack.clone());
    let p2 = processed.clone();
    let worker = tokio::spawn(jobs::run_worker(
        js.clone(),
        wcfg,
        stop.clone(),
        move |job| {
            let p = p2.clone();
            async move {
                let id = job.msg_id().unwrap_or_default().to_string();
                tokio::time::sleep(Duration::from_millis(5)).await;
                *p.lock().expect("lock").entry(id).or_default() += 1;
                Outcome::Ack
            }
        },
    ));

    // Publish N messages, each retried with the same Nats-Msg-Id until the server acks it;
    // the server is killed and restarted half way.
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let id = format!("m-{i}");
                loop {
                    match jobs::publish_dedup(&js, format!("jobs.{i}"), &id, "x".into(), None).await
                    {
                        Ok(_) => break,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    // Wait until some work is done, then crash the server.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while processed.lock().expect("lock").len() < N / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress before the crash"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nats.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart().await.expect("restart");

    tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher finishes")
        .expect("join");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while processed.lock().expect("lock").len() < N {
        assert!(
            std::time::Instant::now() < deadline,
            "lost messages: {} of {N} processed",
            processed.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait until every delivery is settled on the server (nothing pending, nothing awaiting
    // an ack): only then could no late redelivery still show up.
    tether_testkit::eventually(Duration::from_secs(60), "every delivery settled", || {
        let js = js.clone();
        async move {
            let info = js
                .get_stream("JOBS")
                .await
                .ok()?
                .consumer_info("workers")
                .await
                .ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await;
    stop.cancel();
    worker.await.expect("join").expect("worker");

    let p = processed.lock().expect("lock");
    assert_eq!(p.len(), N, "every published message processed (none lost)");
    let again: usize = p.values().map(|n| n - 1).sum();
    let late = after_ack.lock().expect("lock").clone();
    println!(
        "processed {} unique; {again} runs repeated before any ack was confirmed (redelivered during the outage); \
         {} deliveries of done jobs skipped; {} unconfirmed acks",
        p.len(),
        stats.skipped.load(Ordering::Relaxed),
        stats.ack_failed.load(Ordering::Relaxed)
    );
    assert!(
        late.is_empty(),
        "jobs processed again after their ack was confirmed: {late:?}"
    );
    assert_eq!(
        acked_at.lock().expect("lock").len(),
        N,
        "every job acknowledged"
    );
}
