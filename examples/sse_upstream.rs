//! A minimal OpenAI-compatible streaming chat upstream for the streaming benchmark: `POST /v1/chat/completions`
//! answers an SSE stream of `max_tokens` content chunks (default 16) sent as fast as the connection takes them,
//! then the usage-only chunk when `stream_options.include_usage` is asked, then `data: [DONE]`; `GET /v1/models`
//! answers easel's health probe. Usage: `sse_upstream 127.0.0.1:PORT`.

use std::convert::Infallible;
use std::io::Write;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

const CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"up-llm\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";
const USAGE: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"up-llm\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":16,\"total_tokens\":20}}\n\n";

fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).context("usage: sse_upstream HOST:PORT")?;
    let app = Router::new()
        .route(
            "/v1/models",
            get(|| async {
                ([(header::CONTENT_TYPE, "application/json")], r#"{"object":"list","data":[{"id":"up-llm"}]}"#)
            }),
        )
        .route("/v1/chat/completions", post(|body: Bytes| async move { stream(&body) }));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        writeln!(std::io::stdout(), "listening on {}", listener.local_addr()?)?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

fn stream(body: &[u8]) -> axum::response::Response {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let chunks = req["max_tokens"].as_u64().unwrap_or(16);
    let usage = req["stream_options"]["include_usage"] == true;
    let events = (0..chunks)
        .map(|_| Bytes::from_static(CHUNK.as_bytes()))
        .chain(usage.then(|| Bytes::from_static(USAGE.as_bytes())))
        .chain(std::iter::once(Bytes::from_static(b"data: [DONE]\n\n")))
        .map(Ok::<_, Infallible>);
    let body = Body::from_stream(futures_util::stream::iter(events));
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
