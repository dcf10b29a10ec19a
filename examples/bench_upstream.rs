//! A minimal OpenAI-compatible image upstream for benchmarks: answers `POST /v1/images/generations` with a
//! precomputed body — model `small`: one ~100-byte PNG; model `large`: ~1.1 MB (≈1.5 MB of base64) — and
//! `GET /v1/models` for easel's health probe; model `slow` answers the small body after `SLOW_MS` (default 1000)
//! milliseconds, for admission-queue runs; `POST /v1/images/edits` reads the whole multipart upload and answers the
//! small body. Usage: `bench_upstream 127.0.0.1:PORT`.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use base64::Engine;

fn body_for(payload: &[u8]) -> Bytes {
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
    Bytes::from(format!("{{\"created\":1700000000,\"data\":[{{\"b64_json\":\"{b64}\"}}]}}"))
}

fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).context("usage: bench_upstream HOST:PORT")?;
    let mut tiny = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::new(4, 4))
        .write_to(&mut std::io::Cursor::new(&mut tiny), image::ImageFormat::Png)?;
    // A PNG signature then pseudo-random bytes: easel sniffs the format and passes the bytes through untouched.
    let mut large = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while large.len() < 1_100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        large.extend_from_slice(&x.to_le_bytes());
    }
    let small_body = body_for(&tiny);
    let large_body = body_for(&large);
    let bodies = Arc::new((small_body, large_body));
    let edit_body = bodies.0.clone();
    let slow =
        std::time::Duration::from_millis(std::env::var("SLOW_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000));
    let app = Router::new()
        .route(
            "/v1/models",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], r#"{"object":"list","data":[]}"#) }),
        )
        .route(
            "/v1/images/generations",
            post(move |body: Bytes| {
                let bodies = Arc::clone(&bodies);
                async move {
                    if has(&body, b"\"slow\"") {
                        tokio::time::sleep(slow).await;
                    }
                    let large = has(&body, b"\"large\"");
                    let out = if large { bodies.1.clone() } else { bodies.0.clone() };
                    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
                }
            }),
        )
        .route(
            "/v1/images/edits",
            post(move |body: Bytes| {
                let out = edit_body.clone();
                async move {
                    // The upload arrived whole (axum buffered it); its size is all this upstream looks at.
                    let status = if body.len() > 1024 {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::BAD_REQUEST
                    };
                    (status, [(header::CONTENT_TYPE, "application/json")], out).into_response()
                }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        writeln!(std::io::stdout(), "listening on {}", listener.local_addr()?)?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

/// True when the request contains `needle`, e.g. the model `"large"` (a byte search: the upstream does no JSON
/// parsing on the hot path).
fn has(body: &[u8], needle: &[u8]) -> bool {
    body.windows(needle.len()).any(|w| w == needle)
}
