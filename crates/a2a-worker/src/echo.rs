//! The echo agent: the example executor (binary `a2a-echo-worker`), also used by tests and
//! benchmarks.
//!
//! Behaviour by the message's text: WORKING, one artifact `echo` with the message's text
//! parts, COMPLETED. `sleep <ms> …` first sleeps that long (a cancel ends it early: the
//! library records CANCELED). `ask` goes INPUT_REQUIRED; the follow-up message completes the
//! task with an artifact naming both messages. `fail` returns an error (FAILED), `panic`
//! panics (FAILED too). With a worker name set (`TETHER_WORKER_NAME` in the binary), each
//! artifact's metadata says which worker made it and on which attempt: `{"worker", "attempt"}`.

use std::time::Duration;

use a2a::{AgentCapabilities, AgentCard, AgentSkill, Artifact, Part, Role, TaskState};

use crate::events::Events;
use crate::executor::{Executor, TaskContext};

/// The echo executor.
#[derive(Clone, Debug, Default)]
pub struct Echo {
    /// Names this worker in the artifacts' metadata (tests tell workers apart by it).
    pub worker: Option<String>,
}

/// The echo agent's card.
pub fn card(agent_id: &str) -> AgentCard {
    let mut c = crate::worker::minimal_card(agent_id);
    c.description = "Echoes the text it is sent (example tether A2A worker).".into();
    c.version = env!("CARGO_PKG_VERSION").into();
    c.capabilities = AgentCapabilities {
        streaming: Some(true),
        push_notifications: Some(false),
        extensions: None,
        extended_agent_card: Some(false),
    };
    c.skills = vec![AgentSkill {
        id: "echo".into(),
        name: "echo".into(),
        description: "Answers with an artifact holding the text it was sent; `sleep <ms>` \
                      waits first, `ask` asks for more input."
            .into(),
        tags: vec!["example".into(), "echo".into()],
        examples: Some(vec!["hello".into(), "sleep 500 hello".into(), "ask".into()]),
        input_modes: None,
        output_modes: None,
        security_requirements: None,
    }];
    c
}

/// The text of the user message that came before the current one in the task's history.
fn previous_user_text(ctx: &TaskContext) -> Option<String> {
    let history = ctx.task.history.as_deref().unwrap_or_default();
    history
        .iter()
        .rfind(|m| m.role == Role::User && m.message_id != ctx.message.message_id)
        .map(|m| {
            m.parts
                .iter()
                .filter_map(|p| p.as_text())
                .collect::<Vec<_>>()
                .join("\n")
        })
}

impl Echo {
    fn artifact(&self, ctx: &TaskContext, name: &str, parts: Vec<Part>) -> Artifact {
        let metadata = self.worker.as_ref().map(|w| {
            [
                ("worker".to_string(), serde_json::json!(w)),
                ("attempt".to_string(), serde_json::json!(ctx.attempt)),
            ]
            .into_iter()
            .collect()
        });
        Artifact {
            artifact_id: a2a::new_artifact_id(),
            name: Some(name.into()),
            description: None,
            parts,
            metadata,
            extensions: None,
        }
    }
}

impl Executor for Echo {
    async fn execute(&self, ctx: TaskContext, events: Events) -> anyhow::Result<()> {
        let text = ctx.text();
        events.working().await?;
        if let Some(prev) = previous_user_text(&ctx).filter(|p| p.trim() == "ask") {
            let a = self.artifact(
                &ctx,
                "answer",
                vec![Part::text(format!("asked: {prev}; answered: {text}"))],
            );
            events.artifact(a, false, true).await?;
            events.complete(None).await?;
            return Ok(());
        }
        match text.trim() {
            "ask" => {
                let q = events.agent_text("what should I echo?");
                events.input_required(q).await?;
                return Ok(());
            }
            "fail" => anyhow::bail!("asked to fail"),
            "panic" => panic!("asked to panic"),
            _ => {}
        }
        if let Some(ms) = text
            .strip_prefix("sleep ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            }
        }
        let parts: Vec<Part> = ctx
            .message
            .parts
            .iter()
            .filter(|p| p.as_text().is_some())
            .cloned()
            .collect();
        events
            .artifact(self.artifact(&ctx, "echo", parts), false, true)
            .await?;
        events.status(TaskState::Completed, None).await?;
        Ok(())
    }
}
