//! `shell.exec` on the bus without Docker: the local fallback (refused unless enabled), the
//! remembering shell, timeouts, caps, streaming, and every refusal — against a real
//! nats-server and the real permission node.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;

const AGENT: &[&str] = &["shell:exec"];

#[tokio::test]
async fn local_fallback_is_refused_unless_enabled() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(shell_config()).await;
    let t = f.agent("a1", "s1", AGENT).await;
    let marker = dir.path().join("ran");
    let cmd = format!("touch {}", marker.display());
    let Problem { status, detail, .. } = f.sh(&t, json!({"command": cmd})).await.unwrap_err();
    assert_eq!(status, 404, "{detail}");
    assert!(
        detail.contains("allow_local_exec = false")
            && detail.contains("space `s1` has no container"),
        "{detail}"
    );
    assert!(!marker.exists(), "nothing ran");
    // An operator token bound to no space is told so.
    let Problem { status, detail, .. } = f.sh(&f.op, json!({"command": "true"})).await.unwrap_err();
    assert_eq!(status, 404);
    assert!(detail.contains("bound to no space"), "{detail}");
    shell.shutdown().await.unwrap();

    // Enabled: the same request runs, locally.
    let shell = f.shell(local_config(dir.path())).await;
    let r = f.sh(&t, json!({"command": cmd})).await.unwrap();
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(marker.exists());
    assert_eq!(r["container_id"], "");
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn cd_persists_and_side_effects_run_exactly_once() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let t = f.agent("a1", "s1", AGENT).await;

    assert_eq!(
        f.sh_ok(&t, "pwd").await.trim(),
        dir.path().to_str().unwrap()
    );
    assert_eq!(f.sh_ok(&t, &format!("cd {}", x.display())).await, "");
    assert_eq!(f.sh_ok(&t, "pwd").await.trim(), x.to_str().unwrap());
    // A command with a side effect after a `cd`: one line, not two.
    let y = dir.path().join("it's y");
    std::fs::create_dir(&y).unwrap();
    let q = format!("'{}'", y.display().to_string().replace('\'', "'\\''"));
    f.sh_ok(&t, &format!("cd {q} && echo x >> f")).await;
    assert_eq!(std::fs::read_to_string(y.join("f")).unwrap(), "x\n");
    assert_eq!(f.sh_ok(&t, "pwd").await.trim(), y.to_str().unwrap());
    f.sh_ok(&t, "echo again >> f").await;
    assert_eq!(
        std::fs::read_to_string(y.join("f")).unwrap(),
        "x\nagain\n",
        "the next command ran in the remembered directory, once"
    );

    // Another agent of the same space has a shell of its own.
    let t2 = f.agent("a2", "s1", AGENT).await;
    assert_eq!(
        f.sh_ok(&t2, "pwd").await.trim(),
        dir.path().to_str().unwrap()
    );

    // An explicit workdir wins for that call, and is where the shell is afterwards.
    let r = f
        .sh(
            &t,
            json!({"command": "pwd", "workdir": x.to_str().unwrap()}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"].as_str().unwrap().trim(), x.to_str().unwrap());
    assert_eq!(f.sh_ok(&t, "pwd").await.trim(), x.to_str().unwrap());

    // A removed directory: the command still runs (once), where the exec starts, with a note.
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    f.sh_ok(&t, &format!("cd {}", gone.display())).await;
    std::fs::remove_dir(&gone).unwrap();
    let r = f.sh(&t, json!({"command": "pwd"})).await.unwrap();
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        dir.path().to_str().unwrap()
    );
    assert!(r["stderr"].as_str().unwrap().contains("is gone"), "{r}");
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn exported_variables_persist_and_reset_forgets() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let t = f.agent("a1", "s1", AGENT).await;
    f.sh_ok(
        &t,
        "export GREETING=\"it's a 'test'\"; cd sub; X=not-exported",
    )
    .await;
    assert_eq!(
        f.sh_ok(&t, "echo \"$GREETING|${X-none}\"; pwd").await,
        format!("it's a 'test'|none\n{}\n", sub.display())
    );
    // Unset is remembered too.
    f.sh_ok(&t, "unset GREETING").await;
    assert_eq!(f.sh_ok(&t, "echo \"${GREETING-unset}\"").await, "unset\n");
    f.sh_ok(&t, "export A=1").await;
    // reset: a fresh shell.
    let r = f
        .sh(
            &t,
            json!({"command": "echo \"${A-none}\"; pwd", "reset": true}),
        )
        .await
        .unwrap();
    assert_eq!(
        r["stdout"].as_str().unwrap(),
        format!("none\n{}\n", dir.path().display())
    );
    // Per-request env applies to that call only.
    let r = f
        .sh(&t, json!({"command": "echo $ONCE", "env": {"ONCE": "yes"}}))
        .await
        .unwrap();
    assert_eq!(r["stdout"], "yes\n");
    assert_eq!(f.sh_ok(&t, "echo \"${ONCE-gone}\"").await, "gone\n");
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn exit_codes_timeouts_and_caps() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let t = f.agent("a1", "s1", AGENT).await;

    let r = f
        .sh(&t, json!({"command": "echo out; echo err >&2; exit 3"}))
        .await
        .unwrap();
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(3), Some("out\n"), Some("err\n"))
    );
    assert_eq!(num(&r["output_bytes"]), 8);

    // The timeout kills the command and what it started in the background.
    let started = Instant::now();
    let r = f
        .sh(
            &t,
            json!({"command": "sleep 60 & echo $! > bg.pid; echo started; sleep 60", "timeout_seconds": 1}),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "killed at the deadline"
    );
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["exit_code"], 137);
    assert_eq!(r["stdout"], "started\n");
    let pid = std::fs::read_to_string(dir.path().join("bg.pid")).unwrap();
    let proc = format!("/proc/{}", pid.trim());
    eventually(Duration::from_secs(5), "background process killed", || {
        let gone = !std::path::Path::new(&proc).exists()
            || std::fs::read_to_string(format!("{proc}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
        async move { gone.then_some(()) }
    })
    .await;

    // A background job ends with its command (the call never outlives itself).
    let started = Instant::now();
    let r = f
        .sh(&t, json!({"command": "sleep 60 & echo bg"}))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(r["stdout"], "bg\n");

    // The cap truncates and says so; the count is of everything the command wrote.
    let r = f
        .sh(
            &t,
            json!({"command": "i=0; while [ $i -lt 2000 ]; do echo 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz; i=$((i+1)); done", "max_output_bytes": 1000}),
        )
        .await
        .unwrap();
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1000);
    assert!(num(&r["output_bytes"]) >= 200_000, "{}", r["output_bytes"]);
    // After an overflow the shell still works.
    assert_eq!(f.sh_ok(&t, "echo fine").await, "fine\n");
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn streamed_chunks_arrive_in_order_without_the_trailer() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let t = f.agent("a1", "s1", AGENT).await;
    let inbox = f.c.new_inbox();
    let mut sub = f.c.subscribe(inbox.clone()).await.unwrap();
    let r = f
        .sh(
            &t,
            json!({"command": "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 4", "stream": true, "stream_subject": inbox}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "one\nthree\n");
    assert_eq!(r["exit_code"], 4);
    let (mut out, mut err, mut seq, mut end) = (String::new(), String::new(), 0u64, None);
    while end.is_none() {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("stream message within 5 s")
            .unwrap();
        let h = m.headers.clone().unwrap();
        let s: u64 = h
            .get("Tether-Stream-Seq")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert_eq!(s, seq + 1, "in order");
        seq = s;
        let text = String::from_utf8(m.payload.to_vec()).unwrap();
        assert!(
            !text.contains("__tether"),
            "the trailer never streams: {text:?}"
        );
        match h.get("Tether-Stream").unwrap().as_str() {
            "stdout" => out.push_str(&text),
            "stderr" => err.push_str(&text),
            "end" => end = Some(h.get("Tether-Exit-Code").unwrap().as_str().to_string()),
            other => panic!("unexpected stream kind {other}"),
        }
    }
    assert_eq!(
        (out.as_str(), err.as_str(), end.as_deref()),
        ("one\nthree\n", "two\n", Some("4"))
    );
    assert!(seq >= 4, "several chunks: {seq}");
    shell.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_and_run_nothing() {
    let f = fleet(false).await;
    let dir = tempfile::tempdir().unwrap();
    let shell = f.shell(local_config(dir.path())).await;
    let t = f.agent("a1", "s1", AGENT).await;
    let no_scope = f.agent("a2", "s1", &["containers:exec"]).await;
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let cases = [
        (json!({"command": touch, "space": "other"}), 400, "space"),
        (
            json!({"command": touch, "container": "other"}),
            400,
            "container",
        ),
        (json!({"command": ""}), 400, "`command` is required"),
        (
            json!({"command": touch, "workdir": "relative"}),
            400,
            "absolute",
        ),
        (
            json!({"command": touch, "timeout_seconds": -1}),
            400,
            "timeout_seconds",
        ),
        (
            json!({"command": touch, "timeout_seconds": 999999}),
            400,
            "at most",
        ),
        (
            json!({"command": touch, "max_output_bytes": -5}),
            400,
            "max_output_bytes",
        ),
        (
            json!({"command": touch, "max_output_bytes": 100_000_000}),
            400,
            "max_output_bytes",
        ),
        (
            json!({"command": touch, "env": {"1BAD": "x"}}),
            400,
            "variable name",
        ),
        (
            json!({"command": touch, "stream": true}),
            400,
            "stream_subject",
        ),
        (
            json!({"command": touch, "stream": true, "stream_subject": "agents.register"}),
            400,
            "_INBOX",
        ),
        (
            json!({"command": touch, "stream_subject": "_INBOX.x"}),
            400,
            "`stream` is not",
        ),
        (json!({"command": 42}), 400, ""),
    ];
    for (body, status, needle) in cases {
        let Problem {
            status: s, detail, ..
        } = f.sh(&t, body.clone()).await.unwrap_err();
        assert_eq!(s, status, "{body}: {detail}");
        assert!(detail.contains(needle), "{body}: {detail}");
    }
    let Problem { status: s, .. } = f
        .call("shell.exec", &json!({"command": touch}).to_string(), None)
        .await
        .unwrap_err();
    assert_eq!(s, 401);
    let Problem { status: s, .. } = f
        .call(
            "shell.exec",
            &json!({"command": touch}).to_string(),
            Some("not-a-jwt"),
        )
        .await
        .unwrap_err();
    assert_eq!(s, 401);
    let Problem {
        status: s, detail, ..
    } = f
        .sh(&no_scope, json!({"command": touch}))
        .await
        .unwrap_err();
    assert_eq!(s, 403, "{detail}");
    let Problem { status: s, .. } = f.call("shell.exec", "{oops", Some(&t)).await.unwrap_err();
    assert_eq!(s, 400);
    assert!(!marker.exists(), "no refused request ran anything");

    // A revoked agent is refused from then on.
    f.call("agents.revoke", json!({"agent_id": "a1"}), Some(&f.op))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "revocation reaches the shell",
        || {
            let f = &f;
            let t = t.clone();
            async move {
                matches!(
                    f.sh(&t, json!({"command": "true"})).await,
                    Err(Problem { status: 401, .. })
                )
                .then_some(())
            }
        },
    )
    .await;
    shell.shutdown().await.unwrap();
}
