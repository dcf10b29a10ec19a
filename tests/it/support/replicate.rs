//! A fake Replicate: predictions by model or version, `Prefer: wait`, polling, failure and cancel, account, and
//! the delivery CDN, on 127.0.0.1:0.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::fal::{VideoKnobs, VideoPhase, mp4};

pub const TOKEN: &str = "r8_test";

#[derive(Default)]
pub struct ReplicateState {
    pub base: Mutex<String>,
    /// (path, body, Prefer header) of each create.
    pub created: Mutex<Vec<(String, Value, String)>>,
    /// Answer the create already `succeeded` (as `Prefer: wait` does for fast models).
    pub sync: AtomicBool,
    pub polls_before_done: AtomicU32,
    pub polls: AtomicU32,
    /// Fail the prediction with this error text.
    pub fail_with: Mutex<Option<String>>,
    pub cancelled: AtomicBool,
    pub never_done: AtomicBool,
    /// Output a single URL string instead of a list.
    pub single_output: AtomicBool,
    /// Video predictions (models whose name contains `video`, ids `vp-N`).
    pub video: VideoKnobs,
}

pub struct FakeReplicate {
    pub url: String,
    pub state: Arc<ReplicateState>,
}

pub async fn start() -> FakeReplicate {
    let state = Arc::new(ReplicateState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *state.base.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeReplicate { url, state }
}

fn png(seed: u64) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([(seed % 256) as u8, 7, 7]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn prediction(s: &ReplicateState, status: &str) -> Value {
    let base = s.base.lock().unwrap().clone();
    let (_, body, _) = s.created.lock().unwrap().last().cloned().unwrap_or_default();
    let n = body["input"]["num_outputs"].as_u64().unwrap_or(1);
    let seed = body["input"]["seed"].as_u64().unwrap_or(3);
    let urls: Vec<String> = (0..n).map(|i| format!("{base}/files/{}.png", seed + i)).collect();
    let output = match status {
        "succeeded" if s.single_output.load(Ordering::SeqCst) => json!(urls[0]),
        "succeeded" => json!(urls),
        _ => Value::Null,
    };
    let error = if status == "failed" { json!(s.fail_with.lock().unwrap().clone()) } else { Value::Null };
    json!({"id": "p1", "model": "o/n", "version": "v", "status": status, "input": body["input"], "output": output, "error": error, "logs": "",
        "urls": {"get": format!("{base}/v1/predictions/p1"), "cancel": format!("{base}/v1/predictions/p1/cancel")}, "created_at": "2026-01-01T00:00:00Z"})
}

fn settled(s: &ReplicateState) -> &'static str {
    if s.fail_with.lock().unwrap().is_some() { "failed" } else { "succeeded" }
}

async fn handle(State(s): State<Arc<ReplicateState>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if path == "/files/clip.mp4" {
        return ([("content-type", "video/mp4")], mp4()).into_response();
    }
    if let Some(name) = path.strip_prefix("/files/") {
        let seed: u64 = name.trim_end_matches(".png").parse().unwrap_or(0);
        return ([("content-type", "image/png")], png(seed)).into_response();
    }
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if auth != format!("Bearer {TOKEN}") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}))).into_response();
    }
    let prefer = req.headers().get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if path.contains("video") || parts.get(2).is_some_and(|id| id.starts_with("vp-")) {
        s.video.auth.lock().unwrap().push(auth);
        return video(&s, method, &parts, req).await;
    }
    match (method, parts.as_slice()) {
        (Method::GET, ["v1", "account"]) => {
            Json(json!({"type": "user", "username": "tester", "name": "Tester", "github_url": null})).into_response()
        }
        (Method::POST, ["v1", "models", _, _, "predictions"]) | (Method::POST, ["v1", "predictions"]) => {
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            if body["input"]["width"].as_u64() == Some(13) {
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"title": "Input validation failed", "detail": "- input.width: Must be a multiple of 8", "status": 422}))).into_response();
            }
            s.created.lock().unwrap().push((path.clone(), body, prefer));
            let status = if s.sync.load(Ordering::SeqCst) { settled(&s) } else { "starting" };
            (StatusCode::CREATED, Json(prediction(&s, status))).into_response()
        }
        (Method::GET, ["v1", "predictions", _id]) => {
            let n = s.polls.fetch_add(1, Ordering::SeqCst);
            let done = !s.never_done.load(Ordering::SeqCst) && n >= s.polls_before_done.load(Ordering::SeqCst);
            Json(prediction(&s, if done { settled(&s) } else { "processing" })).into_response()
        }
        (Method::POST, ["v1", "predictions", _id, "cancel"]) => {
            s.cancelled.store(true, Ordering::SeqCst);
            Json(prediction(&s, "canceled")).into_response()
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response(),
    }
}

/// A video prediction object at `phase`.
pub fn video_prediction(s: &ReplicateState, id: &str, phase: &VideoPhase) -> Value {
    let base = s.base.lock().unwrap().clone();
    let v = &s.video;
    let (status, output, error, logs) = match phase {
        VideoPhase::Queued(_) => ("starting", Value::Null, Value::Null, String::new()),
        VideoPhase::Running(percent, _) => (
            "processing",
            Value::Null,
            Value::Null,
            format!("Generating...\n{percent:>3}%|#####     | {percent}/100 [00:01<00:01]\n"),
        ),
        VideoPhase::Done => (
            "succeeded",
            json!(v.video_url(&base)),
            Value::Null,
            "Generating...\n100%|##########| 100/100\n".to_owned(),
        ),
        VideoPhase::Failed(e) => ("failed", Value::Null, json!(e), "Generating...\n".to_owned()),
        VideoPhase::Cancelled => ("canceled", Value::Null, Value::Null, String::new()),
    };
    json!({"id": id, "model": "minimax/video-01", "version": "hidden", "status": status, "output": output, "error": error, "logs": logs,
        "urls": {"get": format!("{base}/v1/predictions/{id}"), "cancel": format!("{base}/v1/predictions/{id}/cancel")}, "created_at": "2026-01-01T00:00:00Z"})
}

async fn video(s: &ReplicateState, method: Method, parts: &[&str], req: Request) -> Response {
    let v = &s.video;
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"title": "Not found", "detail": "The requested resource could not be found.", "status": 404})),
        )
            .into_response()
    };
    match (method, parts) {
        (Method::POST, ["v1", "models", _, _, "predictions"]) => {
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let id = format!("vp-{}", v.submitted.lock().unwrap().len() + 1);
            if let Some(hook) = body["webhook"].as_str() {
                v.webhooks.lock().unwrap().push((id.clone(), hook.to_owned()));
            }
            v.submitted.lock().unwrap().push(body);
            v.submit_paths.lock().unwrap().push(format!("/{}", parts.join("/")));
            v.stall_submit().await;
            (StatusCode::CREATED, Json(video_prediction(s, &id, &VideoPhase::Queued(0)))).into_response()
        }
        (Method::GET, ["v1", "predictions", id]) => match v.poll(id).await {
            Ok(phase) => Json(video_prediction(s, id, &phase)).into_response(),
            Err(404) => not_found(),
            Err(code) => {
                (StatusCode::from_u16(code).unwrap(), Json(json!({"title": "Service Unavailable", "status": code})))
                    .into_response()
            }
        },
        (Method::POST, ["v1", "predictions", id, "cancel"]) => {
            if v.lose.load(Ordering::SeqCst) {
                return not_found();
            }
            v.cancelled.lock().unwrap().push((*id).to_owned());
            Json(video_prediction(s, id, &VideoPhase::Cancelled)).into_response()
        }
        _ => not_found(),
    }
}
