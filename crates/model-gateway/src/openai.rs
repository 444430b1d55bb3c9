//! The upstream wire formats: OpenAI chat completions (JSON and SSE chunks), OpenAI
//! embeddings, and the `/rerank` API — built from and read into the bus's proto types.
//!
//! Reading is lenient where servers differ in harmless ways (a missing `usage`, `arguments` as
//! an object instead of a string, `score` instead of `relevance_score`), strict where a wrong
//! answer would be passed on (an index out of range, a vector count that does not match the
//! input): that is a [`Failure::Protocol`] and the next provider is tried.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use tether_proto::pbjson_types;
use tether_proto::{
    ChatChoice, ChatDelta, ChatFunctionCall, ChatMessage, ChatRequest, ChatToolCall,
    ChatToolCallDelta, EmbedVector, ModelUsage, RankResult, from_pb_value, to_pb_value,
};

use crate::provider::Failure;

fn struct_json(s: &pbjson_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_pb_value(v)))
            .collect(),
    )
}

fn message_json(m: &ChatMessage) -> Value {
    let mut o = Map::new();
    o.insert("role".into(), json!(m.role));
    let content = m.content.as_ref().map(from_pb_value).unwrap_or(Value::Null);
    let content = match content {
        // OpenAI wants a string for every role but an assistant turn that only calls tools.
        Value::Null if m.tool_calls.is_empty() => json!(""),
        c => c,
    };
    o.insert("content".into(), content);
    if !m.name.is_empty() {
        o.insert("name".into(), json!(m.name));
    }
    if !m.tool_call_id.is_empty() {
        o.insert("tool_call_id".into(), json!(m.tool_call_id));
    }
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let f = c.function.clone().unwrap_or_default();
                json!({
                    "id": c.id,
                    "type": if c.r#type.is_empty() { "function" } else { c.r#type.as_str() },
                    "function": {"name": f.name, "arguments": f.arguments},
                })
            })
            .collect();
        o.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(o)
}

/// The body of `POST {base}/chat/completions`.
pub fn chat_body(r: &ChatRequest, upstream_model: &str, stream: bool) -> Value {
    let mut o = Map::new();
    o.insert("model".into(), json!(upstream_model));
    o.insert(
        "messages".into(),
        Value::Array(r.messages.iter().map(message_json).collect()),
    );
    if let Some(t) = r.temperature {
        o.insert("temperature".into(), json!(t));
    }
    if let Some(t) = r.max_tokens {
        o.insert("max_tokens".into(), json!(t));
    }
    if let Some(t) = r.top_p {
        o.insert("top_p".into(), json!(t));
    }
    if !r.stop.is_empty() {
        o.insert("stop".into(), json!(r.stop));
    }
    if !r.tools.is_empty() {
        o.insert(
            "tools".into(),
            Value::Array(r.tools.iter().map(struct_json).collect()),
        );
    }
    if let Some(tc) = &r.tool_choice {
        let v = from_pb_value(tc);
        if !v.is_null() {
            o.insert("tool_choice".into(), v);
        }
    }
    if let Some(rf) = &r.response_format {
        o.insert("response_format".into(), struct_json(rf));
    }
    o.insert("stream".into(), json!(stream));
    if stream {
        o.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Value::Object(o)
}

fn u32_of(v: Option<&Value>) -> u32 {
    v.and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn usage_of(v: Option<&Value>) -> Option<ModelUsage> {
    let u = v.filter(|u| u.is_object())?;
    let prompt = u32_of(u.get("prompt_tokens"));
    let completion = u32_of(u.get("completion_tokens"));
    let total = match u32_of(u.get("total_tokens")) {
        0 => prompt.saturating_add(completion),
        t => t,
    };
    Some(ModelUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
    })
}

fn arguments_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    }
}

fn str_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or_default().to_string()
}

/// A parsed non-streamed completion.
pub struct Completion {
    pub id: String,
    pub created: u32,
    pub choices: Vec<ChatChoice>,
    pub usage: ModelUsage,
}

pub fn parse_completion(v: &Value) -> Result<Completion, Failure> {
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Protocol("no `choices` in the completion".into()))?;
    let mut out = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        let m = c
            .get("message")
            .ok_or_else(|| Failure::Protocol(format!("choice {i} has no `message`")))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => None,
            Some(c) => Some(to_pb_value(c.clone())),
        };
        let tool_calls = m
            .get("tool_calls")
            .and_then(Value::as_array)
            .map(|calls| {
                calls
                    .iter()
                    .map(|c| ChatToolCall {
                        id: str_of(c.get("id")),
                        r#type: match str_of(c.get("type")) {
                            t if t.is_empty() => "function".into(),
                            t => t,
                        },
                        function: Some(ChatFunctionCall {
                            name: str_of(c.pointer("/function/name")),
                            arguments: arguments_text(c.pointer("/function/arguments")),
                        }),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(ChatChoice {
            index: c
                .get("index")
                .and_then(Value::as_u64)
                .map_or(u32::try_from(i).unwrap_or(u32::MAX), |n| {
                    u32::try_from(n).unwrap_or(u32::MAX)
                }),
            message: Some(ChatMessage {
                role: match str_of(m.get("role")) {
                    r if r.is_empty() => "assistant".into(),
                    r => r,
                },
                content,
                name: String::new(),
                tool_call_id: String::new(),
                tool_calls,
            }),
            finish_reason: str_of(c.get("finish_reason")),
        });
    }
    if out.is_empty() {
        return Err(Failure::Protocol("the completion has no choices".into()));
    }
    Ok(Completion {
        id: str_of(v.get("id")),
        created: u32_of(v.get("created")),
        choices: out,
        usage: usage_of(v.get("usage")).unwrap_or_default(),
    })
}

/// Everything a stream said so far, for the final message.
#[derive(Default)]
pub struct StreamAccum {
    pub id: String,
    pub created: u32,
    pub role: String,
    pub content: String,
    pub tool_calls: BTreeMap<u32, ChatToolCall>,
    pub finish_reason: String,
    pub usage: Option<ModelUsage>,
}

impl StreamAccum {
    /// Takes one `data:` chunk; returns the delta worth publishing (choice 0), if any.
    pub fn absorb(&mut self, data: &str) -> Result<Option<ChatDelta>, Failure> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Failure::Protocol(format!("stream chunk is not JSON: {e}")))?;
        if let Some(e) = v.get("error") {
            let reason = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Err(Failure::Server {
                status: 500,
                reason,
            });
        }
        if self.id.is_empty() {
            self.id = str_of(v.get("id"));
        }
        if self.created == 0 {
            self.created = u32_of(v.get("created"));
        }
        if let Some(u) = usage_of(v.get("usage")) {
            self.usage = Some(u);
        }
        let Some(choice) = v.get("choices").and_then(Value::as_array).and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        }) else {
            return Ok(None);
        };
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = f.to_string();
        }
        let Some(d) = choice.get("delta") else {
            return Ok(None);
        };
        let mut delta = ChatDelta::default();
        if let Some(r) = d.get("role").and_then(Value::as_str) {
            self.role = r.to_string();
            delta.role = r.to_string();
        }
        if let Some(c) = d.get("content").and_then(Value::as_str) {
            self.content.push_str(c);
            delta.content = c.to_string();
        }
        if let Some(calls) = d.get("tool_calls").and_then(Value::as_array) {
            for (i, c) in calls.iter().enumerate() {
                let index = c
                    .get("index")
                    .and_then(Value::as_u64)
                    .map_or(u32::try_from(i).unwrap_or(0), |n| {
                        u32::try_from(n).unwrap_or(u32::MAX)
                    });
                let part = ChatToolCallDelta {
                    index,
                    id: str_of(c.get("id")),
                    r#type: str_of(c.get("type")),
                    function: Some(ChatFunctionCall {
                        name: str_of(c.pointer("/function/name")),
                        arguments: arguments_text(c.pointer("/function/arguments")),
                    }),
                };
                let acc = self
                    .tool_calls
                    .entry(index)
                    .or_insert_with(|| ChatToolCall {
                        id: String::new(),
                        r#type: "function".into(),
                        function: Some(ChatFunctionCall::default()),
                    });
                if !part.id.is_empty() {
                    acc.id = part.id.clone();
                }
                if !part.r#type.is_empty() {
                    acc.r#type = part.r#type.clone();
                }
                if let (Some(f), Some(p)) = (acc.function.as_mut(), part.function.as_ref()) {
                    f.name.push_str(&p.name);
                    f.arguments.push_str(&p.arguments);
                }
                delta.tool_calls.push(part);
            }
        }
        let empty =
            delta.role.is_empty() && delta.content.is_empty() && delta.tool_calls.is_empty();
        Ok((!empty).then_some(delta))
    }

    /// The whole message, as a non-streamed completion would have it.
    pub fn message(&self) -> ChatMessage {
        let tool_calls: Vec<ChatToolCall> = self.tool_calls.values().cloned().collect();
        ChatMessage {
            role: if self.role.is_empty() {
                "assistant".into()
            } else {
                self.role.clone()
            },
            content: if self.content.is_empty() && !tool_calls.is_empty() {
                None
            } else {
                Some(to_pb_value(Value::String(self.content.clone())))
            },
            name: String::new(),
            tool_call_id: String::new(),
            tool_calls,
        }
    }
}

/// The body of `POST {base}/embeddings`.
pub fn embed_body(input: &[String], upstream_model: &str) -> Value {
    json!({"model": upstream_model, "input": input, "encoding_format": "float"})
}

pub fn parse_embeddings(v: &Value, n: usize) -> Result<(Vec<EmbedVector>, ModelUsage), Failure> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Protocol("no `data` in the embeddings answer".into()))?;
    if data.len() != n {
        return Err(Failure::Protocol(format!(
            "{} vectors for {n} inputs",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (i, d) in data.iter().enumerate() {
        let index = d.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
        if index >= n as u64 {
            return Err(Failure::Protocol(format!(
                "vector index {index} out of range"
            )));
        }
        let emb = d
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or_else(|| Failure::Protocol(format!("vector {i} is not a list of numbers")))?;
        let mut vec = Vec::with_capacity(emb.len());
        for x in emb {
            let f = x
                .as_f64()
                .ok_or_else(|| Failure::Protocol(format!("vector {i} holds a non-number")))?;
            // Embeddings are f32 on every server; the narrowing is the wire type's.
            #[allow(clippy::cast_possible_truncation)]
            vec.push(f as f32);
        }
        out.push(EmbedVector {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            embedding: vec,
        });
    }
    out.sort_by_key(|e| e.index);
    if out.windows(2).any(|w| w[0].index == w[1].index) {
        return Err(Failure::Protocol("duplicate vector index".into()));
    }
    let usage = usage_of(v.get("usage")).unwrap_or_default();
    Ok((out, usage))
}

/// The body of `POST {base}/rerank`.
pub fn rank_body(
    query: &str,
    documents: &[String],
    top_n: Option<u32>,
    upstream_model: &str,
) -> Value {
    let mut v = json!({"model": upstream_model, "query": query, "documents": documents});
    if let Some(n) = top_n.filter(|n| *n > 0) {
        v["top_n"] = json!(n);
    }
    v
}

/// Results, highest score first, at most `top_n`.
pub fn parse_rank(
    v: &Value,
    n_docs: usize,
    top_n: Option<u32>,
) -> Result<Vec<RankResult>, Failure> {
    // `{results:[...]}` (Cohere, vLLM, Jina) or a bare list (text-embeddings-inference).
    let list = v
        .get("results")
        .and_then(Value::as_array)
        .or_else(|| v.as_array())
        .ok_or_else(|| Failure::Protocol("no `results` in the rerank answer".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        let index = r
            .get("index")
            .and_then(Value::as_u64)
            .ok_or_else(|| Failure::Protocol("a rerank result has no index".into()))?;
        if index >= n_docs as u64 {
            return Err(Failure::Protocol(format!(
                "rerank index {index} out of range ({n_docs} documents)"
            )));
        }
        let score = r
            .get("relevance_score")
            .or_else(|| r.get("score"))
            .and_then(Value::as_f64)
            .ok_or_else(|| Failure::Protocol("a rerank result has no score".into()))?;
        out.push(RankResult {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            relevance_score: score,
        });
    }
    out.sort_by(|a, b| {
        b.relevance_score
            .partial_cmp(&a.relevance_score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.index.cmp(&b.index))
    });
    if let Some(n) = top_n.filter(|n| *n > 0) {
        out.truncate(n as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_has_only_what_was_asked() {
        let r = ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: Some(to_pb_value(json!("hi"))),
                ..Default::default()
            }],
            temperature: Some(0.5),
            ..Default::default()
        };
        let b = chat_body(&r, "up", false);
        assert_eq!(
            b,
            json!({"model":"up","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"stream":false})
        );
        let s = chat_body(&r, "up", true);
        assert_eq!(s["stream_options"]["include_usage"], true);
    }

    #[test]
    fn stream_accumulates_text_and_tool_calls() {
        let mut a = StreamAccum::default();
        let d = a
            .absorb(
                r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            )
            .expect("ok")
            .expect("role delta");
        assert_eq!(d.role, "assistant");
        a.absorb(r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#)
            .expect("ok");
        a.absorb(r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#)
            .expect("ok");
        a.absorb(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"get","arguments":"{\"a\""}}]}}]}"#).expect("ok");
        a.absorb(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#).expect("ok");
        assert!(
            a.absorb(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#)
                .expect("ok")
                .is_none()
        );
        a.absorb(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#)
            .expect("ok");
        assert_eq!(a.content, "Hello");
        assert_eq!(a.finish_reason, "tool_calls");
        assert_eq!(a.usage.as_ref().map(|u| u.total_tokens), Some(7));
        let m = a.message();
        let f = m.tool_calls[0].function.clone().expect("f");
        assert_eq!(
            (f.name.as_str(), f.arguments.as_str()),
            ("get", "{\"a\":1}")
        );
        assert!(a.absorb("not json").is_err());
        assert!(matches!(
            a.absorb(r#"{"error":{"message":"overloaded"}}"#),
            Err(Failure::Server { .. })
        ));
    }

    #[test]
    fn embeddings_and_rank_are_checked() {
        let v = json!({"data":[{"index":1,"embedding":[0.5]},{"index":0,"embedding":[1.0,2.0]}],"usage":{"prompt_tokens":2,"total_tokens":2}});
        let (e, u) = parse_embeddings(&v, 2).expect("ok");
        assert_eq!(e[0].embedding, vec![1.0, 2.0]);
        assert_eq!(u.prompt_tokens, 2);
        assert!(parse_embeddings(&v, 3).is_err());
        assert!(parse_embeddings(&json!({"data":[{"index":5,"embedding":[]}]}), 1).is_err());

        let r = json!({"results":[{"index":0,"relevance_score":0.1},{"index":2,"relevance_score":0.9},{"index":1,"relevance_score":0.5}]});
        let out = parse_rank(&r, 3, Some(2)).expect("ok");
        assert_eq!(out.iter().map(|r| r.index).collect::<Vec<_>>(), vec![2, 1]);
        assert!(parse_rank(&r, 2, None).is_err(), "index out of range");
        let tei = json!([{"index":0,"score":0.3}]);
        assert_eq!(
            parse_rank(&tei, 1, None).expect("ok")[0].relevance_score,
            0.3
        );
    }
}
