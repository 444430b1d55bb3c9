//! On a 3-node cluster, the token verifier's shared buckets (signing keys, revocations) get
//! the replicas of `kv_replicas` whichever node makes them first, and a bucket an earlier
//! start made with fewer is raised to them, never lowered. (An R1 keys bucket on one server
//! stopped every node that started while that server was down: found by the compose test.)

use async_nats::jetstream;
use tether_bus::BusConfig;
use tether_bus::auth::{KvVerifier, keys_bucket_config};
use tether_bus::kv::open_or_create_bucket;
use tether_testkit::NatsCluster;
use tokio_util::sync::CancellationToken;

async fn replicas(js: &jetstream::Context, stream: &str) -> usize {
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("info").config.num_replicas
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

    let stop = CancellationToken::new();
    KvVerifier::start(&js, &bus, stop.clone())
        .await
        .expect("verifier");
    assert_eq!(replicas(&js, "KV_tether_keys").await, 3, "raised");
    assert_eq!(replicas(&js, "KV_tether_revoked").await, 3, "made R3");

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
}
