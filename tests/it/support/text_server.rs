//! A fake OpenAI-compatible text server, shaped like llama.cpp's and vLLM's: `/v1/chat/completions` (whole JSON or
//! SSE `data: {...}\n\n` chunks ending in `data: [DONE]`, with a usage-only chunk when `stream_options.include_usage`
//! is asked, tool-call deltas and a vendor `timings` field), `/v1/completions`, `/v1/embeddings`, `/v1/models`,
//! OpenAI's error body on demand, and a stream that pauses after its first chunk until released. It records every
//! request body, every byte of every stream it sent, and streams whose reader went away before the end.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const PROMPT_TOKENS: u64 = 12;
pub const COMPLETION_TOKENS: u64 = 7;

#[derive(Default)]
pub struct TextState {
    /// Bodies of the POSTs, as received.
    pub bodies: Mutex<Vec<Value>>,
    /// Every byte of the last stream sent.
    pub sent: Mutex<Vec<u8>>,
    /// The usage-only event of the last stream, when one was sent.
    pub usage_event: Mutex<Option<String>>,
    /// Answer POSTs with this status and OpenAI error body.
    pub fail: Mutex<Option<(u16, &'static str)>>,
    /// Pause each stream after its first chunk until [`TextState::release`] is notified.
    pub pause: AtomicBool,
    pub release: Notify,
    /// Streams whose reader went away before the last chunk.
    pub cut: AtomicU32,
    pub cut_seen: Notify,
    /// Break each stream's connection after its third chunk.
    pub break_off: AtomicBool,
    /// Streams that reached their first chunk.
    pub started: Notify,
}

pub struct FakeText {
    pub url: String,
    pub state: Arc<TextState>,
}

pub async fn start() -> FakeText {
    let state = Arc::new(TextState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeText { url, state }
}

impl TextState {
    pub fn last_body(&self) -> Value {
        self.bodies.lock().unwrap().last().cloned().unwrap_or(Value::Null)
    }
}

fn error(status: u16, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

async fn handle(State(s): State<Arc<TextState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/v1/models" {
        return Json(json!({"object": "list", "data": [{"id": "up-llm", "object": "model"}]})).into_response();
    }
    let bytes = axum::body::to_bytes(req.into_body(), 16 << 20).await.unwrap();
    let Ok(body) = serde_json::from_slice::<Value>(&bytes) else { return error(400, "invalid JSON") };
    s.bodies.lock().unwrap().push(body.clone());
    if let Some((status, message)) = *s.fail.lock().unwrap() {
        return error(status, message);
    }
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let usage = json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS});
    match path.as_str() {
        "/v1/embeddings" => Json(json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
            "model": model,
            "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
        }))
        .into_response(),
        "/v1/completions" => Json(json!({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"index": 0, "text": "Hello", "finish_reason": "stop", "logprobs": null}],
            "usage": usage,
        }))
        .into_response(),
        "/v1/chat/completions" if body["stream"] == true => stream(s, &model, body["stream_options"]["include_usage"] == true),
        "/v1/chat/completions" => (
            StatusCode::OK,
            [("x-ratelimit-remaining-tokens", "9990"), ("openai-processing-ms", "42"), ("x-internal-secret", "no")],
            Json(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                "usage": usage,
            })),
        )
            .into_response(),
        _ => error(404, "no such route"),
    }
}

/// The chunks of one streamed answer, as llama.cpp/vLLM write them.
fn chunks(model: &str, include_usage: bool) -> Vec<String> {
    let u = if include_usage { ",\"usage\":null" } else { "" };
    let head = format!(r#""id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000000,"model":"{model}""#);
    let mut out = vec![
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":"Hel"}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":"lo \u00e9"}},"logprobs":null,"finish_reason":null}}]{u},"obfuscation":"x9"}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"id":"call_1","type":"function","function":{{"name":"get_weather","arguments":""}}}}]}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":"{{\"city\":\"Paris\"}}"}}}}]}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"tool_calls"}}]{u},"timings":{{"predicted_n":7}}}}"#
        ),
    ];
    if include_usage {
        out.push(format!(
            r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{COMPLETION_TOKENS},"total_tokens":{}}}}}"#,
            PROMPT_TOKENS + COMPLETION_TOKENS
        ));
    }
    out.push("data: [DONE]".into());
    out.into_iter().map(|c| format!("{c}\n\n")).collect()
}

/// Counts a stream as cut when it is dropped before its last chunk.
struct Watch {
    /// Taken when the stream reaches its end.
    state: Option<Arc<TextState>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(s) = self.state.take() {
            s.cut.fetch_add(1, Ordering::SeqCst);
            s.cut_seen.notify_one();
        }
    }
}

fn stream(s: Arc<TextState>, model: &str, include_usage: bool) -> Response {
    let chunks = chunks(model, include_usage);
    *s.sent.lock().unwrap() = chunks.concat().into_bytes();
    *s.usage_event.lock().unwrap() = include_usage.then(|| chunks[chunks.len() - 2].clone());
    let body = async_stream(s, chunks);
    ([("content-type", "text/event-stream")], Body::from_stream(body)).into_response()
}

fn async_stream(
    s: Arc<TextState>,
    chunks: Vec<String>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let watch = Watch { state: Some(Arc::clone(&s)) };
    futures_util::stream::unfold((0usize, chunks, watch), move |(i, chunks, mut watch)| {
        let s = Arc::clone(&s);
        async move {
            if i >= chunks.len() {
                watch.state.take();
                return None;
            }
            if i == 1 {
                s.started.notify_one();
                if s.pause.load(Ordering::SeqCst) {
                    s.release.notified().await;
                }
            }
            if i == 3 && s.break_off.load(Ordering::SeqCst) {
                watch.state.take();
                return Some((Err(std::io::Error::other("GPU fell off the bus")), (usize::MAX, chunks, watch)));
            }
            // One chunk per frame, each on its own write (a slow generator).
            tokio::task::yield_now().await;
            Some((Ok(Bytes::from(chunks[i].clone())), (i + 1, chunks, watch)))
        }
    })
}
