//! The fixtures themselves work: start, kill/restart keeping JetStream data, cleanup, image.

use std::time::Duration;

use tether_testkit::NatsServer;

#[tokio::test]
async fn restart_keeps_port_and_jetstream_data() {
    let mut s = NatsServer::start().await.expect("start");
    let port = s.port();
    let js = async_nats::jetstream::new(s.client().await.expect("client"));
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KEEP".into(),
        subjects: vec!["keep.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("stream");
    js.publish("keep.a", "1".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    s.kill().await;
    assert!(
        async_nats::connect(s.url()).await.is_err()
            || tokio::time::timeout(Duration::from_millis(1), async {})
                .await
                .is_ok()
    );
    s.restart().await.expect("restart");
    assert_eq!(s.port(), port);
    let js = async_nats::jetstream::new(s.client().await.expect("client"));
    let mut stream = js.get_stream("KEEP").await.expect("stream survives");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn drop_kills_the_server() {
    let s = NatsServer::start().await.expect("start");
    let url = s.url();
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await;
    assert!(!matches!(r, Ok(Ok(_))), "server still answers after drop");
}

#[test]
fn busybox_image_runs() {
    if !tether_testkit::docker::available() {
        panic!("Docker engine is required for these tests");
    }
    let img = tether_testkit::docker::busybox_image().expect("image");
    let out = std::process::Command::new("docker")
        .args(["run", "--rm", &img, "echo", "hi"])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}
