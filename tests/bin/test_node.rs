//! A small node on the runtime, for process-level tests (SIGTERM drain, `tether up`).
//!
//! Subjects (name from `TETHER_NODE_NAME`, default `test-node`):
//! - `test.echo` (public): echoes `message` after `delay_ms`; `message == "panic"` panics.
//! - `test.whoami` (token with `shell:exec`): echoes the verified caller.
//!
//! It verifies tokens with the KV verifier like every real node.

use tether_bus::{CallerKind, Endpoint, Node, Problem, Request, Scope};
use tether_proto::{EchoReply, EchoRequest};

async fn echo<C: CallerKind>(req: Request<EchoRequest, C>) -> Result<EchoReply, Problem> {
    if req.body.message == "panic" {
        panic!("asked to panic");
    }
    if req.body.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(
            req.body.delay_ms,
        )))
        .await;
    }
    let (agent_id, space, scopes) = match req.caller.as_caller() {
        Some(c) => (c.agent_id.clone(), c.space.clone(), c.scopes.to_strings()),
        None => Default::default(),
    };
    Ok(EchoReply {
        message: req.body.message,
        agent_id,
        space,
        scopes,
        node: req.ctx.node.to_string(),
        instance_id: req.ctx.instance_id.to_string(),
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let name = std::env::var("TETHER_NODE_NAME").unwrap_or_else(|_| "test-node".into());
    tether_bus::startup::run_node(
        &name.clone(),
        None,
        |_| Ok(()),
        |bus, (), shutdown| {
            Node::new(name, env!("CARGO_PKG_VERSION"))
                .description("test node: echo and whoami")
                .endpoint(Endpoint::public("test.echo", echo))
                .endpoint(Endpoint::new("test.whoami", echo).scope(Scope::ShellExec))
                .run(bus, shutdown)
        },
    )
    .await
}
