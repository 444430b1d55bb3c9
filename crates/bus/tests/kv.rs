//! `kv::Bucket` against a real nats-server: compare-and-set changes lose no update under
//! concurrent writers, create a missing record, and write nothing when the change refuses.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_bus::kv::{Bucket, Change};
use tether_bus::{Encoding, Problem};
use tether_proto::EchoRequest;
use tether_testkit::NatsServer;

async fn bucket(nats: &NatsServer, name: &str, encoding: Encoding) -> Bucket<EchoRequest> {
    let js = jetstream::new(nats.client().await.expect("client"));
    Bucket::open(
        &js,
        kv::Config {
            bucket: name.into(),
            history: 1,
            ..Default::default()
        },
        encoding,
    )
    .await
    .expect("bucket")
    .named("test records")
}

fn counter(n: u32) -> EchoRequest {
    EchoRequest {
        message: "counter".into(),
        delay_ms: n,
    }
}

#[tokio::test]
async fn concurrent_modifies_lose_no_update() {
    let nats = NatsServer::start().await.expect("nats");
    for (name, encoding) in [("cas_json", Encoding::Json), ("cas_pb", Encoding::Protobuf)] {
        let b = bucket(&nats, name, encoding).await;
        let (writers, each) = (6u32, 10u32);
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    for _ in 0..each {
                        b.modify("n", |cur| {
                            let n = cur.map_or(0, |c| c.delay_ms);
                            Ok(Change::Write(counter(n + 1)))
                        })
                        .await
                        .expect("modify")
                        .expect("stored");
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("writers finish")
                .expect("join");
        }
        let (v, rev) = b.get("n").await.expect("get").expect("record");
        assert_eq!(
            v.delay_ms,
            writers * each,
            "{name}: every increment counted"
        );
        assert_eq!(
            rev,
            u64::from(writers * each),
            "{name}: one write per increment"
        );
    }
}

#[tokio::test]
async fn modify_creates_a_missing_record_and_keep_writes_nothing() {
    let nats = NatsServer::start().await.expect("nats");
    let b = bucket(&nats, "cas_create", Encoding::Json).await;
    // Absent, and kept absent.
    assert_eq!(
        b.modify("k", |_| Ok(Change::Keep)).await.expect("keep"),
        None
    );
    assert_eq!(b.get("k").await.expect("get"), None);
    // Created.
    let s = b
        .modify("k", |cur| {
            assert!(cur.is_none());
            Ok(Change::Write(counter(7)))
        })
        .await
        .expect("create")
        .expect("stored");
    assert!(s.written);
    assert_eq!(s.value, counter(7));
    assert_eq!(
        b.get("k").await.expect("get"),
        Some((counter(7), s.revision))
    );
    // Kept: the stored value comes back, unwritten.
    let k = b
        .modify("k", |_| Ok(Change::Keep))
        .await
        .expect("keep")
        .expect("stored");
    assert_eq!(
        (k.value, k.revision, k.written),
        (counter(7), s.revision, false)
    );
    // After a delete, created again.
    b.delete("k").await.expect("delete");
    assert_eq!(b.get("k").await.expect("get"), None);
    let again = b
        .modify("k", |cur| {
            Ok(Change::Write(counter(cur.map_or(1, |c| c.delay_ms + 100))))
        })
        .await
        .expect("recreate")
        .expect("stored");
    assert_eq!(again.value, counter(1));
    // `create` refuses an existing key; `update` a stale revision.
    assert_eq!(b.create("k", &counter(2)).await.expect("create"), None);
    assert_eq!(
        b.update("k", &counter(2), s.revision)
            .await
            .expect("update"),
        None
    );
    assert!(
        b.update("k", &counter(2), again.revision)
            .await
            .expect("update")
            .is_some()
    );
    assert_eq!(b.keys().await.expect("keys"), vec!["k".to_string()]);
}

#[tokio::test]
async fn a_refusing_change_writes_nothing() {
    let nats = NatsServer::start().await.expect("nats");
    let b = bucket(&nats, "cas_refuse", Encoding::Protobuf).await;
    let err = b
        .modify("k", |_| {
            Err::<Change<EchoRequest>, _>(Problem::conflict("no"))
        })
        .await
        .expect_err("refused");
    assert_eq!(err, Problem::conflict("no"));
    assert_eq!(b.get("k").await.expect("get"), None, "nothing created");
    let rev = b.put("k", &counter(1)).await.expect("put");
    let err = b
        .modify("k", |_| Err(Problem::forbidden("not yours")))
        .await
        .expect_err("refused");
    assert_eq!(err.status, 403);
    assert_eq!(
        b.get("k").await.expect("get"),
        Some((counter(1), rev)),
        "unchanged"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_a_503_naming_the_bucket() {
    let mut nats = NatsServer::start().await.expect("nats");
    let b = bucket(&nats, "cas_down", Encoding::Json)
        .await
        .timeout(Duration::from_millis(500));
    nats.stop().await;
    let err = b.get("k").await.expect_err("down");
    assert_eq!(err.status, 503, "{err}");
    assert!(err.detail.starts_with("test records unavailable"), "{err}");
}

#[tokio::test]
async fn an_unreadable_record_is_a_500() {
    let nats = NatsServer::start().await.expect("nats");
    let b = bucket(&nats, "cas_corrupt", Encoding::Json).await;
    b.store()
        .put("k", "not json".into())
        .await
        .expect("raw put");
    let err = b.get("k").await.expect_err("unreadable");
    assert_eq!(err.status, 500, "{err}");
}
