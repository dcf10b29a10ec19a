//! A fake OpenAI-compatible image server: generations (b64 or URL answers), multipart edits, the model list,
//! OpenAI's error envelope (401 bad key, 400 validation), an LLM-only mode (404 on image paths, as vLLM), and a
//! CDN for URL answers. It records every request.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

pub const KEY: &str = "sk-test";

#[derive(Default)]
pub struct OpenAiState {
    pub base: Mutex<String>,
    /// JSON bodies of generations.
    pub bodies: Mutex<Vec<Value>>,
    /// Field names (and file names) of multipart edits.
    pub edit_fields: Mutex<Vec<(String, Option<String>)>>,
    pub calls: AtomicU32,
    /// Answer with `url` items instead of `b64_json`.
    pub url_answers: AtomicBool,
    /// Serve /v1/models but 404 every image path (an LLM-only server).
    pub llm_only: AtomicBool,
    pub latency_ms: AtomicU32,
    /// Answer generations with this status and body.
    pub fail: Mutex<Option<(u16, Value)>>,
    /// Answer generations with `url` items pointing exactly here (instead of the fake's own CDN).
    pub answer_urls: Mutex<Option<Vec<String>>>,
    /// Where `GET /redirect` sends the client (302).
    pub redirect_to: Mutex<Option<String>>,
}

pub struct FakeOpenAi {
    pub url: String,
    pub state: Arc<OpenAiState>,
}

pub async fn start() -> FakeOpenAi {
    let state = Arc::new(OpenAiState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *state.base.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeOpenAi { url, state }
}

pub fn png(shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([shade, shade, 255]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn error(status: u16, message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}});
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

async fn handle(State(s): State<Arc<OpenAiState>>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    if path == "/redirect"
        && let Some(to) = s.redirect_to.lock().unwrap().clone()
    {
        return (StatusCode::FOUND, [("location", to)]).into_response();
    }
    if path == "/page" {
        return ([("content-type", "text/html")], "<html>private page SECRET-PAGE-BODY</html>").into_response();
    }
    if let Some(name) = path.strip_prefix("/files/") {
        return ([("content-type", "image/png")], png(name.len() as u8)).into_response();
    }
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != format!("Bearer {KEY}") {
        return error(
            401,
            "Incorrect API key provided: sk-wr***. You can find your API key at https://platform.openai.com/account/api-keys.",
            None,
            Some("invalid_api_key"),
        );
    }
    match (method, path.as_str()) {
        (Method::GET, "/v1/models") => Json(json!({"object": "list", "data": [{"id": "dall-e-3", "object": "model", "created": 1, "owned_by": "system"}]})).into_response(),
        (_, "/v1/images/generations" | "/v1/images/edits") if s.llm_only.load(Ordering::SeqCst) => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
        (Method::POST, "/v1/images/generations") => {
            s.calls.fetch_add(1, Ordering::SeqCst);
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            s.bodies.lock().unwrap().push(body.clone());
            let latency = s.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(latency))).await;
            }
            if let Some((status, body)) = s.fail.lock().unwrap().clone() {
                return (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
            }
            if body["model"] == "dall-e-3" && body["n"].as_u64().unwrap_or(1) > 1 {
                return error(400, "You must provide n=1 for this model.", Some("n"), None);
            }
            answer(&s, body["n"].as_u64().unwrap_or(1), body["model"] == "dall-e-3")
        }
        (Method::POST, "/v1/images/edits") => {
            s.calls.fetch_add(1, Ordering::SeqCst);
            let mut multipart = axum::extract::Multipart::from_request_unchecked(req).await;
            let mut n = 1;
            while let Some(field) = multipart.next_field().await.unwrap() {
                let (name, file) = (field.name().unwrap_or("").to_owned(), field.file_name().map(str::to_owned));
                let data = field.bytes().await.unwrap();
                if name == "n" {
                    n = String::from_utf8_lossy(&data).parse().unwrap_or(1);
                }
                s.edit_fields.lock().unwrap().push((name, file));
            }
            answer(&s, n, false)
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({"error": {"message": format!("Invalid URL ({path})"), "type": "invalid_request_error", "param": null, "code": null}}))).into_response(),
    }
}

fn answer(s: &OpenAiState, n: u64, revised: bool) -> Response {
    let base = s.base.lock().unwrap().clone();
    if let Some(urls) = s.answer_urls.lock().unwrap().clone() {
        let data: Vec<Value> = urls.iter().map(|u| json!({"url": u})).collect();
        return Json(json!({"created": 1_700_000_000, "data": data})).into_response();
    }
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let mut item = if s.url_answers.load(Ordering::SeqCst) {
                json!({"url": format!("{base}/files/img{i}.png")})
            } else {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png(i as u8 * 40))})
            };
            if revised {
                item["revised_prompt"] = json!("a more detailed prompt");
            }
            item
        })
        .collect();
    Json(json!({"created": 1_700_000_000, "data": data})).into_response()
}

/// `Multipart::from_request` without state plumbing.
trait FromRequestUnchecked {
    async fn from_request_unchecked(req: Request) -> Self;
}

impl FromRequestUnchecked for axum::extract::Multipart {
    async fn from_request_unchecked(req: Request) -> Self {
        <axum::extract::Multipart as axum::extract::FromRequest<()>>::from_request(req, &()).await.unwrap()
    }
}
