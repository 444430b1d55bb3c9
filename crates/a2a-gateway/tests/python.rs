//! The acceptance test with independent clients: the official `a2a-sdk` 1.3.0 client through
//! the HTTP bridge, against an unmodified `a2a-sdk` AgentExecutor run by `tether_a2a.worker`
//! (python/tether-a2a) as the agent's worker on its own bus identity; then the same task read
//! over NATS by `nats-py` — the bus and the bridge are one system.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn python_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../python/tether-a2a"
    ))
}

/// Runs a Python script to the end (within `within`); its last stdout line as JSON.
async fn run_python(args: &[&str], within: Duration) -> Value {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(args)
        .env("PYTHONPATH", python_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("python {args:?} did not finish within {within:?}"))
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "python {args:?} printed no JSON ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_a2a_client_through_the_bridge_to_a_python_a2a_sdk_worker() {
    let fleet = A2aFleet::start().await;
    let url = fleet
        .gw
        .as_ref()
        .and_then(|g| g.agent_url(AGENT))
        .expect("the bridge runs");
    let mut worker = tokio::process::Command::new("python3")
        .args([
            "-m",
            "tether_a2a.worker",
            "--agent",
            AGENT,
            "--executor",
            "tether_a2a.examples.sleepy:SleepyExecutor",
        ])
        .env("PYTHONPATH", python_dir())
        .env("TETHER_NATS_URL", fleet.f.nats.plain_url())
        .env("TETHER_TOKEN", &fleet.worker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the python worker");
    // The worker is up once its card is published.
    tether_testkit::eventually(
        Duration::from_secs(60),
        "the python worker publishes its card",
        || async {
            fleet
                .a2a(AGENT, "card", serde_json::json!({}), &fleet.alice)
                .await
                .ok()
        },
    )
    .await;

    let script = python_dir().join("tests/e2e_client.py");
    let summary = run_python(
        &[
            script.to_str().expect("path"),
            "--url",
            &url,
            "--token",
            &fleet.alice,
            "--other-token",
            &fleet.mallory,
        ],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(summary["ok"], true, "{summary:#}");
    assert_eq!(
        summary["blocking"]["state"], "TASK_STATE_COMPLETED",
        "{summary:#}"
    );
    assert_eq!(
        summary["cancel"]["state"], "TASK_STATE_CANCELED",
        "{summary:#}"
    );
    assert_eq!(summary["other_space"], "TaskNotFound", "{summary:#}");

    // The same task over NATS, by nats-py as alice: what the bridge client saw.
    let id = summary["blocking"]["taskId"]
        .as_str()
        .expect("task id")
        .to_string();
    let read = format!(
        r#"
import asyncio, json, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1], token=sys.argv[2], inbox_prefix=b"_INBOX.alice")
    m = await nc.request("a2a.{AGENT}.get", json.dumps({{"id": sys.argv[3]}}).encode(),
                         timeout=10, headers={{"A2A-Version": "1.0", "Authorization": "Bearer " + sys.argv[2]}})
    print(json.dumps({{"headers": m.headers or {{}}, "task": json.loads(m.data)}}))
    await nc.close()
asyncio.run(main())
"#
    );
    let got = run_python(
        &["-c", &read, &fleet.f.nats.plain_url(), &fleet.alice, &id],
        Duration::from_secs(60),
    )
    .await;
    let task = &got["task"];
    assert_eq!(task["id"], id.as_str(), "{got:#}");
    assert_eq!(state(task), "TASK_STATE_COMPLETED", "{got:#}");
    let texts: Vec<&str> = task["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["parts"].as_array().into_iter().flatten())
        .filter_map(|p| p["text"].as_str())
        .collect();
    let bridge_texts: Vec<&str> = summary["blocking"]["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(
        texts.concat(),
        bridge_texts.concat(),
        "{got:#} vs {summary:#}"
    );
    let _ = worker.kill().await;
}

/// The Python worker package's own tests (event translation, and the worker process against a
/// real nats-server with a stand-in for the gateway), run by `python3 -m unittest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_package_tests() {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-m", "unittest", "discover", "-s", "tests", "-t", "."])
        .current_dir(python_dir())
        .env("PYTHONPATH", python_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("python unittest within 300 s")
        .expect("run python3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python unittest failed:\n{err}");
    assert!(
        !err.contains("skipped"),
        "a Python test was skipped:\n{err}"
    );
}

/// A2A's protobuf form on the bus, with the official SDK's own messages (`a2a_pb2`) over
/// nats-py: send, get and a streamed send, each answered in protobuf — so the gateway's
/// messages are the official wire format, field for field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_a2a_protobuf_messages_over_nats_py() {
    let fleet = A2aFleet::start().await;
    fleet.publish_card().await;
    let _worker = fleet.worker_process("w1", 2);
    let script = r#"
import asyncio, json, sys, uuid
import nats
from a2a.types import a2a_pb2 as pb

async def main(url, token, agent):
    nc = await nats.connect(url, token=token, inbox_prefix=b"_INBOX.alice")
    h = {"A2A-Version": "1.0", "Authorization": "Bearer " + token, "Content-Type": "application/protobuf"}
    def msg(text):
        return pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER, parts=[pb.Part(text=text)])
    out = {}
    m = await nc.request(f"a2a.{agent}.send", pb.SendMessageRequest(message=msg("proto hi")).SerializeToString(), timeout=30, headers=h)
    assert not (m.headers or {}).get("Nats-Service-Error-Code"), m.data
    resp = pb.SendMessageResponse()
    resp.ParseFromString(m.data)
    t = resp.task
    out.update(id=t.id, state=pb.TaskState.Name(t.status.state), artifact=t.artifacts[0].parts[0].text,
               content_type=(m.headers or {}).get("Content-Type"), asker=t.metadata["tether"]["callerAgentId"])
    g = await nc.request(f"a2a.{agent}.get", pb.GetTaskRequest(id=t.id).SerializeToString(), timeout=10, headers=h)
    task = pb.Task()
    task.ParseFromString(g.data)
    out["get_state"] = pb.TaskState.Name(task.status.state)
    inbox = "_INBOX.alice.pbstream"
    sub = await nc.subscribe(inbox)
    hs = dict(h, **{"Tether-Stream-Subject": inbox})
    await nc.request(f"a2a.{agent}.stream", pb.SendMessageRequest(message=msg("stream me")).SerializeToString(), timeout=10, headers=hs)
    kinds = []
    while True:
        c = await sub.next_msg(timeout=30)
        if c.headers.get("Tether-Stream") != "event":
            break
        sr = pb.StreamResponse()
        sr.ParseFromString(c.data)
        k = sr.WhichOneof("payload")
        if k == "status_update":
            k += ":" + pb.TaskState.Name(sr.status_update.status.state)
        kinds.append(k)
    out["stream"] = kinds
    await nc.close()
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:4]))
"#;
    let out = run_python(
        &["-c", script, &fleet.f.nats.plain_url(), &fleet.alice, AGENT],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(out["state"], "TASK_STATE_COMPLETED", "{out:#}");
    assert_eq!(out["get_state"], "TASK_STATE_COMPLETED", "{out:#}");
    assert_eq!(out["content_type"], "application/protobuf", "{out:#}");
    assert_eq!(out["asker"], "alice", "{out:#}");
    assert!(
        out["artifact"]
            .as_str()
            .unwrap_or_default()
            .contains("proto hi"),
        "{out:#}"
    );
    assert_eq!(
        out["stream"],
        serde_json::json!([
            "task",
            "status_update:TASK_STATE_WORKING",
            "artifact_update",
            "status_update:TASK_STATE_COMPLETED"
        ]),
        "{out:#}"
    );
}
