//! On a 3-node cluster, the token verifier's shared buckets (signing keys, revocations) get
//! the replicas of `kv_replicas` whichever node makes them first, and a bucket an earlier
//! start made with fewer is raised to them, never lowered. (An R1 keys bucket on one server
//! stopped every node that started while that server was down: found by the compose test.)
//! A replicated bucket answers gets from its leader only, so a write is read back at once
//! from any server (a follower's direct get once read a just-registered agent as absent).

use async_nats::jetstream;
use tether_bus::BusConfig;
use tether_bus::auth::{KvVerifier, keys_bucket_config};
use tether_bus::kv::open_or_create_bucket;
use tether_testkit::NatsCluster;
use tokio_util::sync::CancellationToken;

async fn replicas(js: &jetstream::Context, stream: &str) -> usize {
    config(js, stream).await.num_replicas
}

async fn config(js: &jetstream::Context, stream: &str) -> jetstream::stream::Config {
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("info").config.clone()
}

#[tokio::test]
async fn the_verifier_s_buckets_get_kv_replicas_and_are_raised_never_lowered() {
    let cluster = NatsCluster::start().await.expect("cluster");
    let bus = BusConfig {
        nats_url: cluster.url(),
        kv_replicas: 3,
        ..Default::default()
    };
    let client = tether_bus::connect::options(&bus, "replicas-test")
        .await
        .expect("options")
        .connect(tether_bus::connect::servers(&bus.nats_url).expect("urls"))
        .await
        .expect("connect");
    let js = jetstream::new(client);

    // An earlier start made the keys bucket with one replica; revocations do not exist yet.
    open_or_create_bucket(&js, keys_bucket_config(&bus.auth, 1))
        .await
        .expect("R1 keys bucket");
    assert_eq!(replicas(&js, "KV_tether_keys").await, 1);
    assert!(
        config(&js, "KV_tether_keys").await.allow_direct,
        "R1 reads directly"
    );

    let stop = CancellationToken::new();
    KvVerifier::start(&js, &bus, stop.clone())
        .await
        .expect("verifier");
    assert_eq!(replicas(&js, "KV_tether_keys").await, 3, "raised");
    assert_eq!(replicas(&js, "KV_tether_revoked").await, 3, "made R3");
    for stream in ["KV_tether_keys", "KV_tether_revoked"] {
        assert!(
            !config(&js, stream).await.allow_direct,
            "{stream}: a replicated bucket reads from its leader"
        );
    }

    // A node configured with fewer does not lower them.
    let one = BusConfig {
        kv_replicas: 1,
        ..bus.clone()
    };
    KvVerifier::start(&js, &one, stop.clone())
        .await
        .expect("verifier with kv_replicas 1");
    assert_eq!(replicas(&js, "KV_tether_keys").await, 3, "never lowered");
    stop.cancel();

    // A replicated bucket an earlier version made with direct gets is changed to leader reads.
    js.create_stream(jetstream::stream::Config {
        name: "KV_made_earlier".into(),
        subjects: vec!["$KV.made_earlier.>".into()],
        num_replicas: 3,
        allow_direct: true,
        allow_rollup: true,
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .expect("an R3 stream with direct gets");
    open_or_create_bucket(
        &js,
        jetstream::kv::Config {
            bucket: "made_earlier".into(),
            ..Default::default()
        },
    )
    .await
    .expect("open it");
    let settled = config(&js, "KV_made_earlier").await;
    assert_eq!((settled.num_replicas, settled.allow_direct), (3, false));
}

#[tokio::test]
async fn a_write_to_a_replicated_bucket_reads_back_at_once_from_every_server() {
    let cluster = NatsCluster::start().await.expect("cluster");
    let mut stores = Vec::new();
    for member in &cluster.members {
        let js = jetstream::new(member.client().await.expect("connect"));
        let store = open_or_create_bucket(
            &js,
            jetstream::kv::Config {
                bucket: "read_after_write".into(),
                num_replicas: 3,
                ..Default::default()
            },
        )
        .await
        .expect("bucket");
        stores.push(store);
    }
    // Eight writers at once, each reading its write back through all three servers at once:
    // the load widens the moment in which a follower has not applied a write yet.
    let stores = std::sync::Arc::new(stores);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let stores = stores.clone();
        writers.spawn(async move {
            for i in 0..100 {
                let key = format!("w{w}.k{i}");
                let value = format!("{w}-{i}");
                let through = (w + i) % stores.len();
                stores[through]
                    .put(&key, value.clone().into())
                    .await
                    .expect("put");
                let reads = futures::future::join_all(stores.iter().map(|s| s.get(&key))).await;
                for (n, got) in reads.into_iter().enumerate() {
                    assert_eq!(
                        got.expect("get").as_deref(),
                        Some(value.as_bytes()),
                        "{key} written through server {through} read through server {n}"
                    );
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("a writer failed");
    }
}
