//! A fake OpenAI-compatible image server: generations (b64 or URL answers), multipart edits, the model list,
//! OpenAI's error envelope (401 bad key, 400 validation), an LLM-only mode (404 on image paths, as vLLM), and a
//! CDN for URL answers. It records every request, and the most generations it served at once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::fal::{VideoKnobs, VideoPhase, mp4};

pub const KEY: &str = "sk-test";

#[derive(Default)]
pub struct OpenAiState {
    pub base: Mutex<String>,
    /// JSON bodies of generations.
    pub bodies: Mutex<Vec<Value>>,
    /// Field names (and file names) of multipart edits.
    pub edit_fields: Mutex<Vec<(String, Option<String>)>>,
    pub calls: AtomicU32,
    /// Generations being served right now, and the most ever served at once (the high-water mark).
    pub active: AtomicU32,
    pub max_active: AtomicU32,
    /// Answer with `url` items instead of `b64_json`.
    pub url_answers: AtomicBool,
    /// Serve /v1/models but 404 every image path (an LLM-only server).
    pub llm_only: AtomicBool,
    pub latency_ms: AtomicU32,
    /// Answer generations with this status and body.
    pub fail: Mutex<Option<(u16, Value)>>,
    /// Answer generations with `url` items pointing exactly here (instead of the fake's own CDN).
    pub answer_urls: Mutex<Option<Vec<String>>>,
    /// Answer every generation item with exactly this `b64_json` text.
    pub b64_answer: Mutex<Option<String>>,
    /// Where `GET /redirect` sends the client (302).
    pub redirect_to: Mutex<Option<String>>,
    /// The Videos API (`/v1/videos`).
    pub video: VideoKnobs,
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
    if path.starts_with("/v1/videos") {
        s.video.auth.lock().unwrap().push(auth.to_owned());
    }
    if auth != format!("Bearer {KEY}") {
        return error(
            401,
            "Incorrect API key provided: sk-wr***. You can find your API key at https://platform.openai.com/account/api-keys.",
            None,
            Some("invalid_api_key"),
        );
    }
    if path.starts_with("/v1/videos") {
        return videos(&s, method, req).await;
    }
    match (method, path.as_str()) {
        (Method::GET, "/v1/models") => Json(json!({"object": "list", "data": [{"id": "dall-e-3", "object": "model", "created": 1, "owned_by": "system"}]})).into_response(),
        (_, "/v1/images/generations" | "/v1/images/edits") if s.llm_only.load(Ordering::SeqCst) => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
        (Method::POST, "/v1/images/generations") => {
            s.calls.fetch_add(1, Ordering::SeqCst);
            let _serving = Serving::start(&s);
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
            let resp = answer(&s, body["n"].as_u64().unwrap_or(1), body["model"] == "dall-e-3");
            if !body["model"].as_str().unwrap_or("").starts_with("gpt-image") {
                return resp;
            }
            // gpt-image models also report quality, background and token usage (10 input tokens, 100 per image).
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap();
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            let n = body["n"].as_u64().unwrap_or(1);
            v["quality"] = json!("medium");
            v["background"] = json!("opaque");
            v["output_format"] = json!("png");
            v["usage"] = json!({"input_tokens": 10, "output_tokens": 100 * n, "total_tokens": 10 + 100 * n,
                "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}});
            Json(v).into_response()
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

/// One generation counted in [`OpenAiState::active`] while it lives.
struct Serving<'a>(&'a OpenAiState);

impl<'a> Serving<'a> {
    fn start(s: &'a OpenAiState) -> Self {
        let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_active.fetch_max(now, Ordering::SeqCst);
        Serving(s)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn answer(s: &OpenAiState, n: u64, revised: bool) -> Response {
    let base = s.base.lock().unwrap().clone();
    if let Some(urls) = s.answer_urls.lock().unwrap().clone() {
        let data: Vec<Value> = urls.iter().map(|u| json!({"url": u})).collect();
        return Json(json!({"created": 1_700_000_000, "data": data})).into_response();
    }
    let fixed = s.b64_answer.lock().unwrap().clone();
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let mut item = if let Some(text) = &fixed {
                json!({"b64_json": text})
            } else if s.url_answers.load(Ordering::SeqCst) {
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

/// A Videos API job object at `phase`.
fn video_job(id: &str, body: &Value, phase: &VideoPhase) -> Value {
    let (status, progress, error) = match phase {
        VideoPhase::Queued(_) => ("queued", 0, Value::Null),
        VideoPhase::Running(percent, _) => ("in_progress", *percent, Value::Null),
        VideoPhase::Done => ("completed", 100, Value::Null),
        VideoPhase::Failed(e) => ("failed", 0, json!({"code": "video_generation_failed", "message": e})),
        VideoPhase::Cancelled => ("failed", 0, json!({"code": "canceled", "message": "The video was cancelled."})),
    };
    json!({"id": id, "object": "video", "model": body["model"], "status": status, "progress": progress, "created_at": 1_767_225_600,
        "completed_at": null, "expires_at": null, "prompt": body["prompt"], "size": body["size"], "seconds": body["seconds"],
        "remixed_from_video_id": null, "error": error, "quality": "standard"})
}

/// `POST /v1/videos`, `GET /v1/videos/{id}`, `GET /v1/videos/{id}/content[?variant=thumbnail]`, `DELETE /v1/videos/{id}`.
async fn videos(s: &OpenAiState, method: Method, req: Request) -> Response {
    let v = &s.video;
    let path = req.uri().path().to_owned();
    let variant = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let known = |id: &str| {
        let n: usize = id.strip_prefix("video_").and_then(|n| n.parse().ok()).unwrap_or(0);
        let deleted = v.cancelled.lock().unwrap().iter().any(|c| c == id);
        let body = v.submitted.lock().unwrap().get(n.wrapping_sub(1)).cloned();
        body.filter(|_| !deleted && !v.lose.load(Ordering::SeqCst))
    };
    let missing = |id: &str| error(404, &format!("Video with id '{id}' not found."), None, Some("video_not_found"));
    match (method, parts.as_slice()) {
        (Method::POST, ["v1", "videos"]) => {
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            if !body["seconds"].is_string() {
                return error(
                    400,
                    "Invalid type for 'seconds': expected one of '4', '8', '12'.",
                    Some("seconds"),
                    Some("invalid_type"),
                );
            }
            let id = format!("video_{}", v.submitted.lock().unwrap().len() + 1);
            v.submitted.lock().unwrap().push(body.clone());
            Json(video_job(&id, &body, &VideoPhase::Queued(0))).into_response()
        }
        (Method::GET, ["v1", "videos", id]) => {
            let Some(body) = known(id) else { return missing(id) };
            match v.poll(id).await {
                Ok(phase) => {
                    let mut job = video_job(id, &body, &phase);
                    if let Some(odd) = v.odd_status.lock().unwrap().clone() {
                        job["status"] = json!(odd);
                    }
                    Json(job).into_response()
                }
                Err(404) => missing(id),
                Err(code) => error(code, "The server had an error while processing your request.", None, None),
            }
        }
        (Method::GET, ["v1", "videos", id, "content"]) => {
            if known(id).is_none() {
                return missing(id);
            }
            if v.phase(id, v.polls.load(Ordering::SeqCst)) != VideoPhase::Done {
                return error(400, "Video is not ready yet.", None, Some("video_not_ready"));
            }
            if variant.contains("variant=thumbnail") {
                let mut webp = Vec::new();
                image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3])))
                    .write_to(&mut std::io::Cursor::new(&mut webp), image::ImageFormat::WebP)
                    .unwrap();
                return ([("content-type", "image/webp")], webp).into_response();
            }
            ([("content-type", "video/mp4")], mp4()).into_response()
        }
        (Method::DELETE, ["v1", "videos", id]) => {
            if known(id).is_none() {
                return missing(id);
            }
            match v.phase(id, v.polls.load(Ordering::SeqCst)) {
                VideoPhase::Done | VideoPhase::Failed(_) => {
                    v.cancelled.lock().unwrap().push((*id).to_owned());
                    Json(json!({"id": id, "object": "video.deleted", "deleted": true})).into_response()
                }
                _ => error(400, "Only completed or failed videos can be deleted.", None, Some("invalid_video_state")),
            }
        }
        _ => error(404, &format!("Invalid URL ({path})"), None, None),
    }
}
