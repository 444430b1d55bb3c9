//! An exec: make sure the caller's space has a container, then run a command in it. Which
//! container is decided by the space in the token, never by the request.
//!
//! ```sh
//! export TETHER_TOKEN=$(tether token issue --agent agent-1)
//! cargo run -p tether-tests --example exec -- 'echo hello from $(hostname)'
//! ```

mod common;

use std::time::Duration;

use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = std::env::args().nth(1).unwrap_or_else(|| "uname -a".into());
    let image = std::env::var("IMAGE").unwrap_or_else(|_| "tether-test/busybox:latest".into());
    let client = common::connect().await?;

    // One container per space: a second create answers 409 naming the one it has.
    let create = json!({ "image": image, "resource_limits": { "memory_mb": 256 } });
    match common::call(
        &client,
        "containers.create",
        create,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(c) => println!("space container {}", c["container_name"]),
        Err(e) => println!("create: {e}"),
    }

    let exec = json!({ "command": command, "timeout_seconds": 10 });
    let r = common::call(&client, "containers.exec", exec, Duration::from_secs(15)).await?;
    print!("{}", r["stdout"].as_str().unwrap_or(""));
    eprint!("{}", r["stderr"].as_str().unwrap_or(""));
    println!("exit code {}", r["exit_code"]);
    Ok(())
}
