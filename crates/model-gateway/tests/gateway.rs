//! The model gateway against a real nats-server, a real permission node, and stand-in model
//! servers speaking the OpenAI and rerank wire formats over real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tether_model_gateway::GatewayConfig;

const KEY: &str = "sk-test-0123456789abcdef-secret";

fn key_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let p = dir.path().join("key");
    std::fs::write(&p, format!("{KEY}\n")).unwrap();
    p
}

#[tokio::test]
async fn chat_embed_rank_round_trip() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let llm = StandIn::start("llm").await;
    let rr = StandIn::start("reranker").await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = provider("llm", &llm.base_url(), true);
    p.api_key_file = Some(key_file(&dir));
    let cfg = config(
        vec![p, rerank_provider("rr", &rr.base_url(), true)],
        vec![
            route("chat-small", &[("llm", "qwen2.5:7b")]),
            route("llama*", &[("llm", "")]),
            route("embed-small", &[("llm", "nomic-embed-text")]),
            route("rank-small", &[("rr", "bge-reranker")]),
        ],
    );
    let gw = f.gateway(cfg).await;

    // Chat: OpenAI shape, who served it, the upstream model name from the route, the key sent.
    let r = f.call("model.chat", json!({
        "model": "chat-small",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        "temperature": 0.2, "max_tokens": 64,
    }), Some(&token)).await.unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "chat-small");
    assert_eq!(content(&r), answer_of("llm", "hello there"));
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["provider"], "llm");
    assert_eq!(r["upstream_model"], "qwen2.5:7b");
    assert_eq!(r["local"], true);
    assert_eq!(r["attempts"], 1);
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        r["usage"]["total_tokens"].as_u64().unwrap(),
        r["usage"]["prompt_tokens"].as_u64().unwrap()
            + r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let sent = llm.last_body().unwrap();
    assert_eq!(sent["model"], "qwen2.5:7b");
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["stream"], false);
    assert_eq!(
        llm.last_auth().as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );

    // A glob route passes the caller's model name through.
    let r = f
        .call("model.chat", chat_body("llama3.1:8b", "hi"), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["upstream_model"], "llama3.1:8b");
    assert_eq!(llm.last_body().unwrap()["model"], "llama3.1:8b");

    // Tools pass through and tool calls come back.
    let r = f.call("model.chat", json!({
        "model": "chat-small",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto",
    }), Some(&token)).await.unwrap();
    assert_eq!(
        llm.last_body().unwrap()["tools"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(llm.last_body().unwrap()["tool_choice"], "auto");
    let call0 = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call0["function"]["name"], "get_weather");
    assert_eq!(call0["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
    // …and the tool's answer goes back up in OpenAI shape.
    f.call("model.chat", json!({
        "model": "chat-small",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }), Some(&token)).await.unwrap();
    let msgs = llm.last_body().unwrap()["messages"].clone();
    assert_eq!(msgs[1]["content"], Value::Null);
    assert_eq!(msgs[1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "content": "sunny", "tool_call_id": "call_1"})
    );

    // Embeddings: one vector per input, in order.
    let inputs = ["the quick brown fox", "hello", "a b c d e f"];
    let r = f
        .call(
            "model.embed",
            json!({"model": "embed-small", "input": inputs}),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(r["object"], "list");
    assert_eq!(r["provider"], "llm");
    assert_eq!(llm.last_body().unwrap()["model"], "nomic-embed-text");
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let v: Vec<f32> = serde_json::from_value(d["embedding"].clone()).unwrap();
        assert_eq!(v, embedding_of(inputs[i]));
    }
    assert_eq!(r["usage"]["prompt_tokens"], 11);

    // Rerank: scored indices, best first, top_n honoured.
    let docs = [
        "cats sleep",
        "the rust compiler is fast",
        "rust and cats",
        "nothing here",
    ];
    let r = f
        .call(
            "model.rank",
            json!({"model": "rank-small", "query": "rust cats", "documents": docs, "top_n": 3}),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(r["provider"], "rr");
    assert_eq!(
        rr.last_body().unwrap(),
        json!({"model": "bge-reranker", "query": "rust cats", "documents": docs, "top_n": 3})
    );
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    assert_eq!(res[0]["index"], 2);
    assert_eq!(res[0]["relevance_score"], 1.0);
    let scores: Vec<f64> = res
        .iter()
        .map(|x| x["relevance_score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));

    // A rerank-only provider never gets chat traffic.
    let e = f
        .call("model.chat", chat_body("rank-small", "hi"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 422, "{e:?}");
    assert_eq!(rr.state.chat_calls.load(Ordering::SeqCst), 0);

    // What is routable, and provider health.
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    let names: Vec<&str> = m["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chat-small", "llama*", "embed-small", "rank-small"]);
    assert_eq!(m["models"][0]["providers"], json!(["llm"]));
    let p0 = &m["providers"][0];
    assert_eq!(
        (
            p0["name"].as_str(),
            p0["healthy"].as_bool(),
            p0["circuit"].as_str()
        ),
        (Some("llm"), Some(true), Some("closed"))
    );
    assert_eq!(m["providers"][1]["kind"], "rerank");
    assert!(
        !m.to_string().contains(&llm.addr.to_string()),
        "base URLs are not published"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn streaming_chunks_arrive_in_order_and_concatenate() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let llm = StandIn::start("llm").await;
    llm.state.stream_words.store(40, Ordering::SeqCst);
    let gw = f
        .gateway(config(
            vec![provider("llm", &llm.base_url(), true)],
            vec![route("m", &[("llm", "")])],
        ))
        .await;

    let subject = f.c.new_inbox();
    let mut sub = f.c.subscribe(subject.clone()).await.unwrap();
    let r = f
        .call(
            "model.chat",
            json!({
                "model": "m", "messages": [{"role": "user", "content": "tell me a long story"}],
                "stream": true, "stream_subject": subject,
            }),
            Some(&token),
        )
        .await
        .unwrap();
    let mut chunks = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("chunk in time")
            .unwrap();
        let c: Value = serde_json::from_slice(&m.payload).unwrap();
        let done = c["done"] == true;
        chunks.push(c);
        if done {
            break;
        }
    }
    assert!(chunks.len() > 40, "one chunk per delta: {}", chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["seq"], i as u64, "in order, no gaps");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["provider"], "llm");
    }
    let text: String = chunks
        .iter()
        .map(|c| c["delta"]["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        text,
        content(&r),
        "the chunks concatenate to the final message"
    );
    assert!(text.starts_with(&answer_of("llm", "tell me a long story")));
    let last = chunks.last().unwrap();
    assert_eq!(last["finish_reason"], "stop");
    assert_eq!(last["usage"], r["usage"]);
    assert!(
        r["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "usage asked with stream_options"
    );
    assert_eq!(llm.last_body().unwrap()["stream"], true);

    // A streamed tool call is assembled into the final message.
    let subject = format!("model.stream.{}", uuid_like());
    let mut sub = f.c.subscribe(subject.clone()).await.unwrap();
    let r = f
        .call(
            "model.chat",
            json!({
                "model": "m", "messages": [{"role": "user", "content": "weather?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather"}}],
                "stream": true, "stream_subject": subject,
            }),
            Some(&token),
        )
        .await
        .unwrap();
    let tc = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(
        (tc["id"].as_str(), tc["function"]["name"].as_str()),
        (Some("call_1"), Some("get_weather"))
    );
    assert_eq!(tc["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
    let mut args = String::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        let c: Value = serde_json::from_slice(&m.payload).unwrap();
        for d in c["delta"]["tool_calls"].as_array().unwrap() {
            args.push_str(d["function"]["arguments"].as_str().unwrap());
        }
        if c["done"] == true {
            break;
        }
    }
    assert_eq!(args, "{\"city\":\"Paris\"}");

    // Bad stream requests are 400 and reach no provider.
    let before = llm.calls();
    for body in [
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_subject": "agents.register"}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_subject": "_INBOX.>"}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_subject": "_INBOX.x"}),
        // Another agent's inbox: no spoofed chunks into someone else's replies.
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_subject": "_INBOX.someone-else.x"}),
    ] {
        let e = f
            .call("model.chat", body.clone(), Some(&token))
            .await
            .unwrap_err();
        assert_eq!(e.status, 400, "{body}: {e:?}");
    }
    assert_eq!(llm.calls(), before);
    gw.shutdown().await.unwrap();
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
    )
}

async fn two_provider_gateway(
    f: &Fleet,
    first: &str,
    second: &StandIn,
    first_timeout_ms: u64,
) -> tether_bus::NodeHandle {
    let mut p1 = provider("first", first, false);
    p1.timeout_ms = first_timeout_ms;
    let cfg = config(
        vec![p1, provider("second", &second.base_url(), false)],
        vec![
            route("m", &[("first", ""), ("second", "")]),
            route("e", &[("first", ""), ("second", "")]),
        ],
    );
    f.gateway(cfg).await
}

#[tokio::test]
async fn fallback_when_the_first_provider_fails_500_times_out_or_refuses() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let second = StandIn::start("second").await;

    // 500: retried (2 retries by default), then the second provider answers.
    let first = StandIn::start("first").await;
    first.set_mode(Mode::Fail500);
    let gw = two_provider_gateway(&f, &first.base_url(), &second, 10_000).await;
    let t = Instant::now();
    let r = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "timeout_ms": 5000}),
        Some(&token),
    )
    .await
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "within the caller's deadline"
    );
    assert_eq!(r["provider"], "second");
    assert_eq!(content(&r), answer_of("second", "q"));
    assert_eq!(first.calls(), 3, "one call and two retries on 5xx");
    assert_eq!(r["attempts"], 4);
    // Embeddings fall back the same way.
    let r = f
        .call(
            "model.embed",
            json!({"model": "e", "input": ["x"]}),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(r["provider"], "second");
    gw.shutdown().await.unwrap();

    // Hangs past its timeout: not retried (the time is gone), the second answers in time.
    let first = StandIn::start("first").await;
    first.set_mode(Mode::Hang);
    let gw = two_provider_gateway(&f, &first.base_url(), &second, 300).await;
    let t = Instant::now();
    let r = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "timeout_ms": 3000}),
        Some(&token),
    )
    .await
    .unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(r["provider"], "second");
    assert_eq!(first.calls(), 1);
    eventually(
        SOON,
        "the hung request's connection was dropped",
        || async { (first.disconnected() == 1).then_some(()) },
    )
    .await;
    gw.shutdown().await.unwrap();

    // Refuses connections (nothing listens): retried, then the second answers.
    let gw = two_provider_gateway(&f, &refused_base_url(), &second, 10_000).await;
    let t = Instant::now();
    let r = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "timeout_ms": 3000}),
        Some(&token),
    )
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(r["provider"], "second");
    assert_eq!(r["attempts"], 4);
    gw.shutdown().await.unwrap();

    // Garbage (200 with HTML): not retried, next provider.
    let first = StandIn::start("first").await;
    first.set_mode(Mode::Garbage);
    let gw = two_provider_gateway(&f, &first.base_url(), &second, 10_000).await;
    let r = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap();
    assert_eq!((r["provider"].as_str(), first.calls()), (Some("second"), 1));

    // Everything down: 503 naming each provider's failure.
    second.set_mode(Mode::Fail500);
    first.set_mode(Mode::Fail500);
    let e = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 503, "{e:?}");
    assert!(
        e.detail.contains("first: HTTP 500") && e.detail.contains("second: HTTP 500"),
        "{}",
        e.detail
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn transient_errors_are_retried_on_the_same_provider() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let b = StandIn::start("b").await;
    let gw = f
        .gateway(config(
            vec![
                provider("a", &a.base_url(), false),
                provider("b", &b.base_url(), false),
            ],
            vec![route("m", &[("a", ""), ("b", "")])],
        ))
        .await;
    a.state.fail_first.store(2, Ordering::SeqCst);
    let r = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        (r["provider"].as_str(), r["attempts"].as_u64()),
        (Some("a"), Some(3))
    );
    assert_eq!(b.calls(), 0);

    // 429 is retried too (Retry-After: 0), then falls back.
    a.set_mode(Mode::Throttle429);
    let before = a.calls();
    let r = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["provider"], "b");
    assert_eq!(a.calls() - before, 3);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_provider_is_skipped_then_probed_after_its_cool_down() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let b = StandIn::start("b").await;
    a.set_mode(Mode::Fail500);
    let cfg = GatewayConfig {
        retries: 0,
        breaker_failures: 2,
        breaker_cooldown_ms: 1000,
        ..config(
            vec![
                provider("a", &a.base_url(), false),
                provider("b", &b.base_url(), false),
            ],
            vec![route("m", &[("a", ""), ("b", "")])],
        )
    };
    let gw = f.gateway(cfg).await;
    for _ in 0..2 {
        let r = f
            .call("model.chat", chat_body("m", "q"), Some(&token))
            .await
            .unwrap();
        assert_eq!(r["provider"], "b");
    }
    assert_eq!(a.calls(), 2);
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        (
            m["providers"][0]["circuit"].as_str(),
            m["providers"][0]["healthy"].as_bool()
        ),
        (Some("open"), Some(false))
    );
    assert_eq!(m["providers"][0]["consecutive_failures"], 2);

    // Open: skipped — the stand-in sees no call.
    let t = Instant::now();
    for _ in 0..5 {
        let r = f
            .call("model.chat", chat_body("m", "q"), Some(&token))
            .await
            .unwrap();
        assert_eq!(
            (r["provider"].as_str(), r["attempts"].as_u64()),
            (Some("b"), Some(1))
        );
    }
    if t.elapsed() < Duration::from_millis(1000) {
        assert_eq!(a.calls(), 2, "skipped while open");
    }

    // After the cool-down one probe goes through; still failing → open again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.calls() < 3 {
        assert!(Instant::now() < deadline, "no probe after the cool-down");
        f.call("model.chat", chat_body("m", "q"), Some(&token))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.calls(), 3);
    // Healthy again: the next probe closes the circuit and traffic returns to `a`.
    a.set_mode(Mode::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = f
            .call("model.chat", chat_body("m", "q"), Some(&token))
            .await
            .unwrap();
        if r["provider"] == "a" {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    assert_eq!(m["providers"][0]["circuit"], "closed");
    assert_eq!(m["providers"][0]["consecutive_failures"], 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_provider_400_is_returned_with_its_reason_and_not_retried() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let b = StandIn::start("b").await;
    a.set_mode(Mode::Reject400(
        "This model's maximum context length is 8192 tokens".into(),
    ));
    let gw = f
        .gateway(config(
            vec![
                provider("a", &a.base_url(), false),
                provider("b", &b.base_url(), false),
            ],
            vec![route("m", &[("a", ""), ("b", "")])],
        ))
        .await;
    let e = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(
        e.detail.contains("maximum context length is 8192 tokens"),
        "{}",
        e.detail
    );
    assert_eq!(a.calls(), 1, "not retried");
    assert_eq!(b.calls(), 0, "no fallback for a bad request");
    // The provider is fine: its circuit stays closed.
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    assert_eq!(m["providers"][0]["consecutive_failures"], 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_model_malformed_request_and_missing_scope() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let shell_only = f.agent("agent-x", "space-x", &["shell:exec"]).await;
    let a = StandIn::start("a").await;
    let gw = f
        .gateway(config(
            vec![provider("a", &a.base_url(), false)],
            vec![route("gpt-4o", &[("a", "")]), route("llama*", &[("a", "")])],
        ))
        .await;

    let e = f
        .call("model.chat", chat_body("nope", "q"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 404);
    assert!(
        e.detail.contains("gpt-4o") && e.detail.contains("llama*"),
        "lists routable models: {}",
        e.detail
    );
    for (s, body) in [
        ("model.embed", json!({"model": "nope", "input": ["x"]})),
        (
            "model.rank",
            json!({"model": "nope", "query": "q", "documents": ["d"]}),
        ),
    ] {
        assert_eq!(f.call(s, body, Some(&token)).await.unwrap_err().status, 404);
    }

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("model.chat", b"{not json".to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[],"bogus":1}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":"hi"}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[]}"#.to_vec()),
        ("model.chat", br#"{"model":"","messages":[{"role":"user","content":"x"}]}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[{"role":"wizard","content":"x"}]}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"temperature":7}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#.to_vec()),
        ("model.chat", br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"request_id":"has space"}"#.to_vec()),
        ("model.embed", br#"{"model":"gpt-4o","input":[]}"#.to_vec()),
        ("model.embed", br#"{"model":"gpt-4o","input":"not a list"}"#.to_vec()),
        ("model.rank", br#"{"model":"gpt-4o","query":"","documents":["d"]}"#.to_vec()),
        ("model.rank", br#"{"model":"gpt-4o","query":"q","documents":[]}"#.to_vec()),
        ("model.cancel", br#"{"request_id":""}"#.to_vec()),
    ];
    for (s, body) in bad {
        let e = request(
            &f.c,
            s,
            body.clone(),
            Some(&token),
            async_nats::HeaderMap::new(),
            CALL_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.status,
            400,
            "{s} {}: {e:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut h = async_nats::HeaderMap::new();
    h.insert("Tether-Timeout-Ms", "soon");
    let e = request(
        &f.c,
        "model.chat",
        chat_body("gpt-4o", "q").to_string().into_bytes(),
        Some(&token),
        h,
        CALL_TIMEOUT,
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 400);

    for s in [
        "model.chat",
        "model.embed",
        "model.rank",
        "model.models",
        "model.cancel",
    ] {
        assert_eq!(
            f.call(s, json!({}), None).await.unwrap_err().status,
            401,
            "{s} without a token"
        );
        assert_eq!(
            f.call(s, json!({}), Some(&shell_only))
                .await
                .unwrap_err()
                .status,
            403,
            "{s} without model:call"
        );
    }
    assert_eq!(a.calls(), 0, "no bad request reached a provider");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn privacy_never_sends_anything_to_a_remote_provider() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let private_agent = f.agent("agent-p", "space-p", &["model:call"]).await;
    let remote = StandIn::start("remote").await;
    let local = StandIn::start("local").await;
    let rr_remote = StandIn::start("rr-remote").await;
    let providers = vec![
        provider("remote", &remote.base_url(), false),
        provider("local", &local.base_url(), true),
        rerank_provider("rr-remote", &rr_remote.base_url(), false),
    ];
    let routes = vec![
        // The remote one is first: without privacy it would be used.
        route("m", &[("remote", ""), ("local", "")]),
        route("remote-only", &[("remote", "")]),
        route("rank", &[("rr-remote", "")]),
    ];
    let cfg = GatewayConfig {
        privacy_agents: vec!["agent-p".into()],
        ..config(providers.clone(), routes.clone())
    };
    let gw = f.gateway(cfg).await;

    let r = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        r["provider"], "remote",
        "without privacy the route order holds"
    );
    let remote_calls = remote.calls();

    // Asked per request: the local provider serves, and the answer says so.
    let r = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "secret"}], "privacy": true}),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(
        (r["provider"].as_str(), r["local"].as_bool()),
        (Some("local"), Some(true))
    );
    let r = f
        .call(
            "model.embed",
            json!({"model": "m", "input": ["secret"], "privacy": true}),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(r["provider"], "local");
    // Required for the agent by config: no flag needed.
    let r = f
        .call("model.chat", chat_body("m", "secret"), Some(&private_agent))
        .await
        .unwrap();
    assert_eq!(r["provider"], "local");
    // Streaming too.
    let subject = f.c.new_inbox();
    let _sub = f.c.subscribe(subject.clone()).await.unwrap();
    let r = f.call("model.chat", json!({"model": "m", "messages": [{"role": "user", "content": "secret"}], "privacy": true, "stream": true, "stream_subject": subject}), Some(&token)).await.unwrap();
    assert_eq!(r["provider"], "local");

    // The local provider fails: refused, not sent out.
    local.set_mode(Mode::Fail500);
    let e = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "secret"}], "privacy": true}),
        Some(&token),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 503);
    assert!(e.detail.contains("privacy"), "{}", e.detail);
    local.set_mode(Mode::Hang);
    let e = f.call("model.chat", json!({"model": "m", "messages": [{"role": "user", "content": "secret"}], "timeout_ms": 500}), Some(&private_agent)).await.unwrap_err();
    assert_eq!(e.status, 504);
    // No local provider at all: refused before any call.
    let e = f.call("model.chat", json!({"model": "remote-only", "messages": [{"role": "user", "content": "secret"}], "privacy": true}), Some(&token)).await.unwrap_err();
    assert_eq!(e.status, 422);
    assert!(e.detail.contains("no local provider"), "{}", e.detail);
    let e = f
        .call(
            "model.rank",
            json!({"model": "rank", "query": "q", "documents": ["d"]}),
            Some(&private_agent),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, 422);
    assert_eq!(
        remote.calls(),
        remote_calls,
        "the remote stand-in received nothing under privacy"
    );
    assert_eq!(rr_remote.calls(), 0);
    gw.shutdown().await.unwrap();

    // Privacy on for everyone in config.
    local.set_mode(Mode::Ok);
    let cfg = GatewayConfig {
        privacy: true,
        ..config(providers, routes)
    };
    let gw = f.gateway(cfg).await;
    let r = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["provider"], "local");
    local.set_mode(Mode::Fail500);
    assert_eq!(
        f.call("model.chat", chat_body("m", "q"), Some(&token))
            .await
            .unwrap_err()
            .status,
        503
    );
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    assert_eq!(m["privacy"], true);
    assert_eq!(remote.calls(), remote_calls, "still nothing sent out");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_callers_deadline_bounds_the_whole_call() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let b = StandIn::start("b").await;
    a.set_mode(Mode::Hang);
    b.set_mode(Mode::Hang);
    // Provider timeouts far beyond the caller's deadline.
    let mut pa = provider("a", &a.base_url(), false);
    pa.timeout_ms = 60_000;
    let mut pb = provider("b", &b.base_url(), false);
    pb.timeout_ms = 60_000;
    let gw = f
        .gateway(config(
            vec![pa, pb],
            vec![route("m", &[("a", ""), ("b", "")])],
        ))
        .await;

    let t = Instant::now();
    let e = f.call(
        "model.chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "timeout_ms": 400}),
        Some(&token),
    )
    .await
    .unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.status, 504, "{e:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    eventually(SOON, "the upstream request was abandoned", || async {
        (a.disconnected() == 1).then_some(())
    })
    .await;

    // Through the header, the smaller of header and field wins.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Tether-Timeout-Ms", "300");
    let t = Instant::now();
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "timeout_ms": 20000});
    let e = request(
        &f.c,
        "model.chat",
        body.to_string().into_bytes(),
        Some(&token),
        h,
        CALL_TIMEOUT,
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, 504);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(b.calls(), 0, "no time was left for the fallback");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_caller_that_goes_away_or_cancels_stops_the_upstream_call() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let other = f.agent("agent-b", "space-b", &["model:call"]).await;
    let a = StandIn::start("a").await;
    a.state.stream_words.store(200, Ordering::SeqCst);
    a.state.delay_ms.store(30, Ordering::SeqCst);
    let gw = f
        .gateway(config(
            vec![provider("a", &a.base_url(), false)],
            vec![route("m", &[("a", "")])],
        ))
        .await;

    // The stream's listener leaves after two chunks: the generation is stopped.
    let subject = f.c.new_inbox();
    let mut sub = f.c.subscribe(subject.clone()).await.unwrap();
    let c2 = f.c.clone();
    let t2 = token.clone();
    let s2 = subject.clone();
    let pending = tokio::spawn(async move {
        call(&c2, "model.chat", json!({"model": "m", "messages": [{"role": "user", "content": "long"}], "stream": true, "stream_subject": s2}), Some(&t2)).await
    });
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
    }
    sub.unsubscribe().await.unwrap();
    drop(sub);
    eventually(SOON, "the upstream stream was dropped", || async {
        (a.disconnected() == 1).then_some(())
    })
    .await;
    let e = pending.await.unwrap().unwrap_err();
    assert_eq!(e.status, 499, "{e:?}");

    // model.cancel stops a running call of the same agent; another agent cannot.
    a.state.delay_ms.store(0, Ordering::SeqCst);
    a.set_mode(Mode::Hang);
    let c2 = f.c.clone();
    let t2 = token.clone();
    let pending = tokio::spawn(async move {
        call(&c2, "model.chat", json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "request_id": "job-1"}), Some(&t2)).await
    });
    eventually(SOON, "the call reached the provider", || async {
        (a.state.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let r = f
        .call("model.cancel", json!({"request_id": "job-1"}), Some(&other))
        .await
        .unwrap();
    assert_eq!(r["cancelled"], false, "another agent's call");
    let r = f
        .call("model.cancel", json!({"request_id": "job-1"}), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["cancelled"], true);
    let e = pending.await.unwrap().unwrap_err();
    assert_eq!(e.status, 499);
    eventually(SOON, "the cancelled upstream call was dropped", || async {
        (a.disconnected() == 2).then_some(())
    })
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn usage_is_accounted_per_agent_and_model_and_rate_limited() {
    let f = fleet().await;
    let t1 = f.agent("agent-a", "space-a", &["model:call"]).await;
    let t2 = f.agent("agent-b", "space-b", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let cfg = GatewayConfig {
        rate_limit_per_minute: 4,
        ..config(
            vec![provider("a", &a.base_url(), true)],
            vec![route("m", &[("a", "")]), route("e", &[("a", "")])],
        )
    };
    let gw = f.gateway(cfg).await;
    let r1 = f
        .call("model.chat", chat_body("m", "one two three"), Some(&t1))
        .await
        .unwrap();
    let r2 = f
        .call("model.chat", chat_body("m", "four"), Some(&t1))
        .await
        .unwrap();
    f.call(
        "model.embed",
        json!({"model": "e", "input": ["a b", "c"]}),
        Some(&t1),
    )
    .await
    .unwrap();
    assert_eq!(
        f.call("model.chat", chat_body("nope", "x"), Some(&t1))
            .await
            .unwrap_err()
            .status,
        404
    );
    // Fifth request in the minute: 429. Another agent has its own budget.
    let e = f
        .call("model.chat", chat_body("m", "x"), Some(&t1))
        .await
        .unwrap_err();
    assert_eq!(e.status, 429);
    assert!(e.detail.contains("agent-a"), "{}", e.detail);
    f.call("model.chat", chat_body("m", "hi"), Some(&t2))
        .await
        .unwrap();

    let stats =
        f.c.request("$SRV.STATS.model-gateway", "".into())
            .await
            .unwrap();
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    let ep = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    let chat = ep("model-chat");
    let u = &chat["data"]["agents"]["agent-a"]["m"];
    assert_eq!(u["requests"], 3, "{chat}");
    assert_eq!(u["errors"], 1, "the 429");
    let prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap()
        + r2["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion = r1["usage"]["completion_tokens"].as_u64().unwrap()
        + r2["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()),
        (Some(prompt), Some(completion))
    );
    assert!(u["latency_ms_max"].as_u64().is_some());
    assert_eq!(
        chat["data"]["agents"]["agent-a"]["(unroutable)"]["errors"],
        1
    );
    assert_eq!(chat["data"]["agents"]["agent-b"]["m"]["requests"], 1);
    let embed = ep("model-embed");
    assert_eq!(embed["data"]["agents"]["agent-a"]["e"]["prompt_tokens"], 3);
    let models = ep("model-models");
    assert_eq!(models["data"]["providers"][0]["name"], "a");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_configured_base_urls_are_contacted() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let elsewhere = StandIn::start("elsewhere").await;
    let a = StandIn::start("a").await;
    a.set_mode(Mode::Redirect(format!(
        "{}/chat/completions",
        elsewhere.base_url()
    )));
    let gw = f
        .gateway(config(
            vec![provider("a", &a.base_url(), false)],
            vec![route("m", &[("a", "")])],
        ))
        .await;
    let e = f
        .call("model.chat", chat_body("m", "q"), Some(&token))
        .await
        .unwrap_err();
    assert_eq!(e.status, 503);
    assert!(
        e.detail.contains("redirects are not followed"),
        "{}",
        e.detail
    );
    assert_eq!(a.calls(), 1);
    assert_eq!(
        elsewhere.calls(),
        0,
        "the redirect target was never contacted"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_provider_spills_over_to_the_next() {
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let b = StandIn::start("b").await;
    a.state.delay_ms.store(1500, Ordering::SeqCst);
    let mut pa = provider("a", &a.base_url(), false);
    pa.max_concurrency = 1;
    let gw = f
        .gateway(config(
            vec![pa, provider("b", &b.base_url(), false)],
            vec![route("m", &[("a", ""), ("b", "")])],
        ))
        .await;
    let c2 = f.c.clone();
    let t2 = token.clone();
    let first =
        tokio::spawn(async move { call(&c2, "model.chat", chat_body("m", "1"), Some(&t2)).await });
    eventually(SOON, "a holds one call", || async {
        (a.state.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let m = f
        .call("model.models", json!({}), Some(&token))
        .await
        .unwrap();
    assert_eq!(m["providers"][0]["in_flight"], 1);
    let r = f
        .call("model.chat", chat_body("m", "2"), Some(&token))
        .await
        .unwrap();
    assert_eq!(r["provider"], "b");
    assert_eq!(first.await.unwrap().unwrap()["provider"], "a");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn protobuf_requests_get_protobuf_replies_and_chunks() {
    use prost::Message;
    use tether_proto::{ChatChunk, ChatCompletion, ChatMessage, ChatRequest};
    let f = fleet().await;
    let token = f.agent("agent-a", "space-a", &["model:call"]).await;
    let a = StandIn::start("a").await;
    let gw = f
        .gateway(config(
            vec![provider("a", &a.base_url(), false)],
            vec![route("m", &[("a", "")])],
        ))
        .await;
    let subject = f.c.new_inbox();
    let mut sub = f.c.subscribe(subject.clone()).await.unwrap();
    let req = ChatRequest {
        model: "m".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: Some(tether_proto::to_pb_value(json!("proto"))),
            ..Default::default()
        }],
        stream: true,
        stream_subject: subject,
        ..Default::default()
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/protobuf");
    h.insert("Authorization", format!("Bearer {token}").as_str());
    let m =
        f.c.request_with_headers("model.chat", h, req.encode_to_vec().into())
            .await
            .unwrap();
    let reply = ChatCompletion::decode(m.payload.as_ref()).unwrap();
    assert_eq!(reply.provider, "a");
    let mut text = String::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
            Some("application/protobuf")
        );
        let c = ChatChunk::decode(m.payload.as_ref()).unwrap();
        text.push_str(&c.delta.unwrap_or_default().content);
        if c.done {
            break;
        }
    }
    let final_text = tether_proto::from_pb_value(
        reply.choices[0]
            .message
            .as_ref()
            .unwrap()
            .content
            .as_ref()
            .unwrap(),
    );
    assert_eq!(json!(text), final_text);
    gw.shutdown().await.unwrap();
}
