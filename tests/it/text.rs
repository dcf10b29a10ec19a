//! Text passthrough end to end: chat completions, completions and embeddings through easel to a fake
//! OpenAI-compatible text server — bodies forwarded with only `model` rewritten, streams relayed byte for byte
//! (less the usage chunk easel asked for itself), disconnects closing the upstream stream, the admission slot
//! living exactly as long as the stream, failover before the first byte, model-type errors, and credits.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::support::text_server::{COMPLETION_TOKENS, FakeText, PROMPT_TOKENS};
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway_env, text_server};

const ADMIN: &str = "admin-secret";

fn config(mode: &str, backends: &[&FakeText], credits: &str) -> String {
    let mut yaml = format!("auth: {{mode: {mode}}}\nbackends:\n  img: {{kind: simulated}}\n");
    let mut names = Vec::new();
    for (i, up) in backends.iter().enumerate() {
        yaml.push_str(&format!("  llm{i}: {{kind: openai, url: '{}/v1', timeout: 20s}}\n", up.url));
        names.push(format!("llm{i}"));
    }
    yaml.push_str(&format!(
        "models:\n  - id: chat\n    type: text\n    backends: [{}]\n    upstream_model: up-llm\n{credits}  - id: sim\n    backends: [img]\n    default_size: 16x16\n",
        names.join(", ")
    ));
    yaml
}

async fn gateway(yaml: &str) -> Gateway {
    spawn_gateway_env(yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await
}

fn chat_body(stream: bool, usage: bool) -> Value {
    let mut b = json!({
        "model": "chat",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0.25,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "vendor_extra": {"top_k": 40},
    });
    if stream {
        b["stream"] = json!(true);
    }
    if usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

async fn post(gw: &Gateway, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = gw.client.post(gw.endpoint(path)).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap()
}

async fn read_all(resp: reqwest::Response) -> Vec<u8> {
    tokio::time::timeout(TEST_TIMEOUT, resp.bytes()).await.unwrap().unwrap().to_vec()
}

async fn inflight(gw: &Gateway, backend: &str) -> u64 {
    let resp = gw.client.get(gw.endpoint("/v1/gateway/status")).bearer_auth(ADMIN).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    v["backends"][backend]["admission"]["text"]["inflight"].as_u64().unwrap_or_else(|| panic!("no text gate: {v}"))
}

async fn key(gw: &Gateway, credits: f64) -> String {
    let resp = gw
        .client
        .post(gw.endpoint("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "k", "credits": credits}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_owned()
}

async fn balance(gw: &Gateway, secret: &str) -> (i64, i64) {
    let v: Value = gw.client.get(gw.endpoint("/v1/me")).bearer_auth(secret).send().await.unwrap().json().await.unwrap();
    (v["credits"]["available_mc"].as_i64().unwrap(), v["credits"]["held_mc"].as_i64().unwrap())
}

#[tokio::test]
async fn a_whole_answer_comes_back_as_sent_and_only_model_is_rewritten() {
    let up = text_server::start().await;
    let gw = gateway(&config("none", &[&up], "")).await;
    let resp = post(&gw, "/v1/chat/completions", None, &chat_body(false, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ratelimit-remaining-tokens"], "9990", "rate-limit headers pass on");
    assert_eq!(resp.headers()["openai-processing-ms"], "42");
    assert!(resp.headers().get("x-internal-secret").is_none(), "other upstream headers do not");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["usage"]["completion_tokens"], COMPLETION_TOKENS);
    assert_eq!(v["model"], "chat", "the answer names the model as the client did, not the upstream's name");
    let mut expected = chat_body(false, false);
    expected["model"] = json!("up-llm");
    assert_eq!(up.state.last_body(), expected, "every field but `model` as the client sent it");

    let resp = post(&gw, "/v1/embeddings", None, &json!({"model": "chat", "input": "hi"})).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["data"][0]["embedding"], json!([0.25, -0.5, 0.125]));
    assert_eq!(v["model"], "chat");
    assert_eq!(up.state.last_body(), json!({"model": "up-llm", "input": "hi"}));

    let resp = post(&gw, "/v1/completions", None, &json!({"model": "chat", "prompt": "Say hi", "max_tokens": 3})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["choices"][0]["text"], "Hello");
}

#[tokio::test]
async fn a_stream_the_client_asked_usage_for_is_relayed_byte_for_byte_but_the_model_name() {
    let up = text_server::start().await;
    let gw = gateway(&config("none", &[&up], "")).await;
    let resp = post(&gw, "/v1/chat/completions", None, &chat_body(true, true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let got = read_all(resp).await;
    let sent = up.state.sent.lock().unwrap().clone();
    assert!(up.state.usage_event.lock().unwrap().is_some(), "the upstream sent a usage chunk");
    let sent = String::from_utf8(sent).unwrap();
    assert!(sent.contains(UPSTREAM_NAME));
    assert_eq!(String::from_utf8(got).unwrap(), sent.replace(UPSTREAM_NAME, r#""model":"chat""#));
}

#[tokio::test]
async fn usage_is_asked_upstream_and_only_that_chunk_is_left_out() {
    let up = text_server::start().await;
    let gw = gateway(&config("none", &[&up], "")).await;
    let resp = post(&gw, "/v1/chat/completions", None, &chat_body(true, false)).await;
    assert_eq!(resp.status(), 200);
    let got = String::from_utf8(read_all(resp).await).unwrap();
    assert_eq!(up.state.last_body()["stream_options"], json!({"include_usage": true}), "asked upstream");
    let sent = String::from_utf8(up.state.sent.lock().unwrap().clone()).unwrap();
    let usage = up.state.usage_event.lock().unwrap().clone().unwrap();
    assert!(sent.contains(&usage));
    assert_eq!(
        got,
        sent.replace(&usage, "").replace(UPSTREAM_NAME, r#""model":"chat""#),
        "everything else, byte for byte, but the model's name"
    );
    assert!(got.ends_with("data: [DONE]\n\n"));
    assert!(got.contains(r#""arguments":"{\"city\":\"Paris\"}""#), "tool-call deltas pass unchanged");
}

/// How the fake upstream names its model in every answer and chunk.
const UPSTREAM_NAME: &str = r#""model":"up-llm""#;

#[tokio::test]
async fn an_alias_the_client_sent_names_the_model_in_every_chunk_and_answer() {
    let up = text_server::start().await;
    let yaml = config("none", &[&up], "")
        .replace("upstream_model: up-llm\n", "upstream_model: up-llm\n    aliases: [gpt-4o]\n");
    assert!(yaml.contains("aliases: [gpt-4o]"));
    let gw = gateway(&yaml).await;
    let mut body = chat_body(true, false);
    body["model"] = json!("gpt-4o");
    let resp = post(&gw, "/v1/chat/completions", None, &body).await;
    assert_eq!(resp.status(), 200);
    let got = String::from_utf8(read_all(resp).await).unwrap();
    assert_eq!(up.state.last_body()["model"], "up-llm", "the upstream is asked by its own name");
    let events: Vec<&str> = got.split("\n\n").filter(|e| e.starts_with("data: {")).collect();
    assert!(events.len() > 2, "{got}");
    for e in &events {
        assert!(e.contains(r#""model":"gpt-4o""#), "every chunk names the alias: {e}");
    }
    assert!(!got.contains("up-llm"));

    body["stream"] = json!(false);
    let v: Value = post(&gw, "/v1/chat/completions", None, &body).await.json().await.unwrap();
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello", "the rest of the answer as it came");
}

#[tokio::test]
async fn the_slot_lives_as_long_as_the_stream() {
    let up = text_server::start().await;
    up.state.pause.store(true, Ordering::SeqCst);
    let gw = gateway(&config("none", &[&up], "")).await;
    let mut resp = post(&gw, "/v1/chat/completions", None, &chat_body(true, true)).await;
    let first = tokio::time::timeout(TEST_TIMEOUT, resp.chunk()).await.unwrap().unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "the first chunk arrives before the upstream finishes");
    assert_eq!(inflight(&gw, "llm0").await, 1, "held while the stream runs");
    up.state.release.notify_one();
    let mut rest = first.to_vec();
    while let Some(c) = tokio::time::timeout(TEST_TIMEOUT, resp.chunk()).await.unwrap().unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(inflight(&gw, "llm0").await, 0, "freed when the stream ended");
}

#[tokio::test]
async fn a_client_that_leaves_closes_the_upstream_stream_and_frees_the_slot() {
    let up = text_server::start().await;
    up.state.pause.store(true, Ordering::SeqCst);
    let gw = gateway(&config("none", &[&up], "")).await;
    let mut resp = post(&gw, "/v1/chat/completions", None, &chat_body(true, false)).await;
    tokio::time::timeout(TEST_TIMEOUT, resp.chunk()).await.unwrap().unwrap().unwrap();
    assert_eq!(inflight(&gw, "llm0").await, 1);
    drop(resp);
    tokio::time::timeout(TEST_TIMEOUT, up.state.cut_seen.notified()).await.expect("the upstream stream was not closed");
    assert_eq!(up.state.cut.load(Ordering::SeqCst), 1);
    // The relay (and its slot) went with the connection that carried it.
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while inflight(&gw, "llm0").await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the slot was never freed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_backend_fault_before_the_first_byte_fails_over() {
    let (bad, good) = (text_server::start().await, text_server::start().await);
    *bad.state.fail.lock().unwrap() = Some((503, "loading model"));
    let gw = gateway(&config("none", &[&bad, &good], "")).await;
    let resp = post(&gw, "/v1/chat/completions", None, &chat_body(true, true)).await;
    assert_eq!(resp.status(), 200);
    let got = String::from_utf8(read_all(resp).await).unwrap();
    let sent = String::from_utf8(good.state.sent.lock().unwrap().clone()).unwrap();
    assert_eq!(got, sent.replace(UPSTREAM_NAME, r#""model":"chat""#));
    assert_eq!(bad.state.bodies.lock().unwrap().len(), 1, "the first backend was tried");

    // The client's own mistake is not retried elsewhere; its message comes back in OpenAI's shape.
    *bad.state.fail.lock().unwrap() = Some((400, "messages must not be empty"));
    *good.state.fail.lock().unwrap() = Some((400, "messages must not be empty"));
    let before = good.state.bodies.lock().unwrap().len() + bad.state.bodies.lock().unwrap().len();
    let resp = post(&gw, "/v1/chat/completions", None, &chat_body(false, false)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("messages must not be empty"), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let after = good.state.bodies.lock().unwrap().len() + bad.state.bodies.lock().unwrap().len();
    assert_eq!(after - before, 1, "one attempt only");
}

#[tokio::test]
async fn a_chat_request_for_an_image_model_is_told_what_it_is_and_where_it_goes() {
    let up = text_server::start().await;
    let gw = gateway(&config("none", &[&up], "")).await;
    let mut body = chat_body(false, false);
    body["model"] = json!("sim");
    let resp = post(&gw, "/v1/chat/completions", None, &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "wrong_model_type");
    assert_eq!(v["error"]["param"], "model");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`sim` is an image model") && msg.contains("/v1/images/generations"), "{msg}");

    body["model"] = json!("nope");
    let resp = post(&gw, "/v1/chat/completions", None, &body).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "model_not_found");
    let resp = gw.client.post(gw.endpoint("/v1/chat/completions")).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("JSON"));
    assert!(up.state.bodies.lock().unwrap().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn credits_per_request_are_charged_once_per_answer_and_refused_when_short() {
    let up = text_server::start().await;
    let gw = gateway(&config("keys", &[&up], "    credits: 2\n")).await;
    let secret = key(&gw, 5.0).await;
    let resp = post(&gw, "/v1/chat/completions", Some(&secret), &chat_body(false, false)).await;
    assert_eq!(resp.status(), 200);
    read_all(resp).await;
    assert_eq!(balance(&gw, &secret).await, (3000, 0));
    let resp = post(&gw, "/v1/chat/completions", Some(&secret), &chat_body(true, false)).await;
    read_all(resp).await;
    assert_eq!(balance(&gw, &secret).await, (1000, 0));
    let calls = up.state.bodies.lock().unwrap().len();
    let resp = post(&gw, "/v1/chat/completions", Some(&secret), &chat_body(false, false)).await;
    assert_eq!(resp.status(), 402);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "insufficient_credits");
    assert_eq!(up.state.bodies.lock().unwrap().len(), calls, "no upstream call when the balance is short");
}

#[tokio::test]
async fn credits_per_token_capture_exactly_what_usage_says() {
    let up = text_server::start().await;
    let gw = gateway(&config("keys", &[&up], "    credits: {input_per_1k: 0.5, output_per_1k: 1.5}\n")).await;
    let secret = key(&gw, 1.0).await;
    // 12 prompt tokens × 0.5 + 7 completion tokens × 1.5 = 16.5 millicredits, rounded up.
    let per_answer = ((PROMPT_TOKENS as f64 * 0.5 + COMPLETION_TOKENS as f64 * 1.5).ceil()) as i64;
    assert_eq!(per_answer, 17);
    let mut body = chat_body(false, false);
    body["max_tokens"] = json!(100);
    let resp = post(&gw, "/v1/chat/completions", Some(&secret), &body).await;
    assert_eq!(resp.status(), 200);
    read_all(resp).await;
    assert_eq!(balance(&gw, &secret).await, (1000 - per_answer, 0));
    // A stream whose usage easel asked for itself: charged from the chunk it kept from the client.
    body["stream"] = json!(true);
    let got = read_all(post(&gw, "/v1/chat/completions", Some(&secret), &body).await).await;
    assert!(!String::from_utf8(got).unwrap().contains("\"choices\":[]"));
    assert_eq!(balance(&gw, &secret).await, (1000 - 2 * per_answer, 0));
    // The hold (prompt bytes / 4 + max_tokens × 1.5) is more than the balance: refused before any upstream call.
    let calls = up.state.bodies.lock().unwrap().len();
    body["max_tokens"] = json!(10_000);
    let resp = post(&gw, "/v1/chat/completions", Some(&secret), &body).await;
    assert_eq!(resp.status(), 402);
    assert_eq!(up.state.bodies.lock().unwrap().len(), calls);
    let resp = gw.client.get(gw.endpoint("/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the books balance");
}

#[test]
fn a_text_model_needs_openai_backends() {
    let yaml = "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: chat, type: text, backends: [sim]}\n";
    let env = easel::config::MapEnv::new([]);
    let err = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &env).unwrap_err().to_string();
    assert!(err.contains("a text model needs `openai`-kind backends"), "{err}");
    let yaml = "backends:\n  sim: {kind: simulated, concurrency: {text: 2}}\nmodels:\n  - {id: m, backends: [sim]}\n";
    let err = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &env).unwrap_err().to_string();
    assert!(err.contains("does not serve text"), "{err}");
    let yaml = "backends:\n  up: {kind: openai, url: 'http://127.0.0.1:9', concurrency: {images: 0}}\nmodels:\n  - {id: chat, type: text, backends: [up], credits: {input_per_1k: 1}}\n";
    let cfg = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &env).unwrap();
    assert_eq!(cfg.backends[0].limit(easel::config::Capability::Text), 8, "a default text limit");
    let t = cfg.models[0].token_credits.unwrap();
    assert_eq!((t.input_per_1k, t.output_per_1k), (1.0, 0.0));
    let yaml = "backends:\n  up: {kind: openai, url: 'http://127.0.0.1:9'}\nmodels:\n  - {id: chat, type: text, backends: [up], credits: {per_request: 2}}\n  - {id: img, backends: [up], credits: {per_request: 2}}\n";
    let err = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &env).unwrap_err().to_string();
    assert!(err.contains("models[1].credits") && !err.contains("models[0]"), "{err}");
    let yaml = "backends:\n  up: {kind: openai, url: 'http://127.0.0.1:9'}\nmodels:\n  - {id: chat, type: text, backends: [up], credits: {per_request: 2}}\n";
    let cfg = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &env).unwrap();
    assert_eq!(cfg.models[0].credits, Some(2.0));
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_is_released_and_a_broken_upstream_is_told_in_the_stream() {
    let up = text_server::start().await;
    up.state.pause.store(true, Ordering::SeqCst);
    let gw = gateway(&config("keys", &[&up], "    credits: {input_per_1k: 0.5, output_per_1k: 1.5}\n")).await;
    let secret = key(&gw, 1.0).await;
    let mut body = chat_body(true, false);
    body["max_tokens"] = json!(100);
    let mut resp = post(&gw, "/v1/chat/completions", Some(&secret), &body).await;
    tokio::time::timeout(TEST_TIMEOUT, resp.chunk()).await.unwrap().unwrap().unwrap();
    let (available, held) = balance(&gw, &secret).await;
    assert!(held > 0 && available == 1000 - held, "the estimate is held while the stream runs");
    drop(resp);
    tokio::time::timeout(TEST_TIMEOUT, up.state.cut_seen.notified()).await.unwrap();
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while balance(&gw, &secret).await != (1000, 0) {
        assert!(tokio::time::Instant::now() < deadline, "the hold of a cut stream was not released");
        tokio::task::yield_now().await;
    }

    // The upstream breaks off between events: the client gets an OpenAI error event, not a silent end.
    up.state.pause.store(false, Ordering::SeqCst);
    up.state.break_off.store(true, Ordering::SeqCst);
    let got = String::from_utf8(read_all(post(&gw, "/v1/chat/completions", Some(&secret), &body).await).await).unwrap();
    let last = got.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["type"], "server_error", "{got}");
    assert!(!got.contains("[DONE]"));
    assert_eq!(balance(&gw, &secret).await, (1000, 0), "no usage arrived: nothing charged");
    let resp = gw.client.get(gw.endpoint("/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

async fn post_idem(gw: &Gateway, path: &str, key: Option<&str>, idem: &str, body: &Value) -> reqwest::Response {
    let mut req = gw.client.post(gw.endpoint(path)).header("Idempotency-Key", idem).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap()
}

#[tokio::test]
async fn an_idempotency_key_replays_a_whole_answer_charged_once_and_refuses_another_body() {
    let up = text_server::start().await;
    let gw = gateway(&config("keys", &[&up], "    credits: 2\n")).await;
    let secret = key(&gw, 10.0).await;
    for (path, body, idem) in [
        ("/v1/chat/completions", chat_body(false, false), "chat-1"),
        ("/v1/embeddings", json!({"model": "chat", "input": ["a", "b"]}), "emb-1"),
    ] {
        let calls = up.state.bodies.lock().unwrap().len();
        let first = post_idem(&gw, path, Some(&secret), idem, &body).await;
        assert_eq!(first.status(), 200);
        assert!(first.headers().get("idempotent-replayed").is_none());
        let first = read_all(first).await;
        let before = balance(&gw, &secret).await;
        let again = post_idem(&gw, path, Some(&secret), idem, &body).await;
        assert_eq!(again.status(), 200, "{path}");
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["content-type"], "application/json");
        assert_eq!(read_all(again).await, first, "{path}: the stored answer, byte for byte");
        assert_eq!(balance(&gw, &secret).await, before, "{path}: a replay is not charged");
        assert_eq!(up.state.bodies.lock().unwrap().len(), calls + 1, "{path}: one upstream call");
        let mut other = body.clone();
        other["user"] = json!("someone-else");
        let resp = post_idem(&gw, path, Some(&secret), idem, &other).await;
        assert_eq!(resp.status(), 422);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "idempotency_key_mismatch", "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("different request"));
    }
    assert_eq!(balance(&gw, &secret).await, (6000, 0), "two answers at 2 credits each");
}

#[tokio::test]
async fn an_idempotency_key_without_keys_replays_too() {
    let up = text_server::start().await;
    let gw = gateway(&config("none", &[&up], "")).await;
    let body = json!({"model": "chat", "prompt": "Once upon a time"});
    let first = read_all(post_idem(&gw, "/v1/completions", None, "c-1", &body).await).await;
    let again = post_idem(&gw, "/v1/completions", None, "c-1", &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(read_all(again).await, first);
    assert_eq!(up.state.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_stream_with_an_idempotency_key_is_refused_before_any_upstream_call() {
    let up = text_server::start().await;
    let gw = gateway(&config("keys", &[&up], "    credits: 2\n")).await;
    let secret = key(&gw, 10.0).await;
    let resp = post_idem(&gw, "/v1/chat/completions", Some(&secret), "s-1", &chat_body(true, true)).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "idempotency_key_with_stream", "{err}");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("stream: false"));
    assert!(up.state.bodies.lock().unwrap().is_empty());
    assert_eq!(balance(&gw, &secret).await, (10_000, 0));
    // A malformed key is refused as on the image routes.
    let resp = post_idem(&gw, "/v1/chat/completions", Some(&secret), "", &chat_body(false, false)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "invalid_idempotency_key");
}

#[tokio::test]
async fn models_show_text_prices_per_1k_tokens_and_per_request() {
    let up = text_server::start().await;
    let mut yaml = config("none", &[&up], "    credits: {input_per_1k: 0.5, output_per_1k: 1.5}\n");
    yaml.push_str("  - id: flat\n    type: text\n    backends: [llm0]\n    credits: 2\n");
    let gw = gateway(&yaml).await;
    let v: Value = gw.client.get(gw.endpoint("/v1/models")).send().await.unwrap().json().await.unwrap();
    let meta = |id: &str| {
        v["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id}: {v}"))["meta"]
            .clone()
    };
    assert_eq!(meta("chat")["pricing"], json!({"unit": "1k_tokens", "input_per_1k": 0.5, "output_per_1k": 1.5}));
    assert_eq!(meta("flat")["pricing"], json!({"unit": "request", "credits": 2.0}));
    assert_eq!(meta("flat")["credits"], json!(2.0));
    assert_eq!(meta("sim")["pricing"], Value::Null, "a free model has no price");
}
