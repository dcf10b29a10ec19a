//! A fake fal.ai queue: submit → status (IN_QUEUE, IN_PROGRESS with logs, COMPLETED) → result → CDN files, and
//! cancel, on 127.0.0.1:0, with knobs for polls before completion, submit errors, flagged images.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const KEY: &str = "fal-test-key";

#[derive(Default)]
pub struct FalState {
    pub base: Mutex<String>,
    /// Bodies received at submit, with their endpoint path.
    pub submitted: Mutex<Vec<(String, Value)>>,
    pub auth_headers: Mutex<Vec<String>>,
    /// Status polls answered IN_PROGRESS before COMPLETED.
    pub polls_before_done: AtomicU32,
    pub polls: AtomicU32,
    /// Answer submit with this status and body instead.
    pub submit_error: Mutex<Option<(u16, Value)>>,
    pub nsfw: AtomicBool,
    pub cancelled: AtomicBool,
    /// Never complete (for cancellation tests).
    pub never_done: AtomicBool,
}

pub struct FakeFal {
    pub url: String,
    pub state: Arc<FalState>,
}

pub async fn start() -> FakeFal {
    let state = Arc::new(FalState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *state.base.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeFal { url, state }
}

fn png(seed: u64) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([(seed % 256) as u8, 100, 200]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn handle(State(s): State<Arc<FalState>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let base = s.base.lock().unwrap().clone();
    if let Some(name) = path.strip_prefix("/files/") {
        let seed: u64 = name.trim_end_matches(".png").parse().unwrap_or(0);
        return ([("content-type", "image/png")], png(seed)).into_response();
    }
    s.auth_headers.lock().unwrap().push(auth.clone());
    if auth != format!("Key {KEY}") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"detail": "Invalid API key"}))).into_response();
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, [owner, alias, "requests", id, "status"]) => {
            let n = s.polls.fetch_add(1, Ordering::SeqCst);
            let done = !s.never_done.load(Ordering::SeqCst) && n >= s.polls_before_done.load(Ordering::SeqCst);
            let status = if done {
                "COMPLETED"
            } else if n == 0 {
                "IN_QUEUE"
            } else {
                "IN_PROGRESS"
            };
            Json(json!({"status": status, "queue_position": 0, "response_url": format!("{base}/{owner}/{alias}/requests/{id}"),
                "logs": [{"message": format!("step {n}"), "level": "INFO", "source": "user", "timestamp": "2026-01-01T00:00:00Z"}]}))
            .into_response()
        }
        (Method::GET, [_owner, _alias, "requests", id]) => {
            let (_, body) = s.submitted.lock().unwrap().last().cloned().unwrap_or_default();
            let n = body["num_images"].as_u64().unwrap_or(1);
            let seed = body["seed"].as_u64().unwrap_or(1);
            let images: Vec<Value> = (0..n).map(|i| json!({"url": format!("{base}/files/{}.png", seed + i), "content_type": "image/png", "width": 8, "height": 8})).collect();
            let nsfw = s.nsfw.load(Ordering::SeqCst);
            Json(json!({"images": images, "seed": seed, "has_nsfw_concepts": vec![nsfw; n as usize], "prompt": body["prompt"], "request_id": id})).into_response()
        }
        (Method::PUT, [_owner, _alias, "requests", _id, "cancel"]) => {
            s.cancelled.store(true, Ordering::SeqCst);
            (StatusCode::ACCEPTED, Json(json!({"status": "CANCELLATION_REQUESTED"}))).into_response()
        }
        (Method::POST, [owner, alias, ..]) => {
            if let Some((status, body)) = s.submit_error.lock().unwrap().clone() {
                return (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
            }
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            s.submitted.lock().unwrap().push((path.clone(), body));
            let id = "req-1";
            let root = format!("{base}/{owner}/{alias}/requests/{id}");
            Json(json!({"request_id": id, "response_url": root, "status_url": format!("{root}/status"), "cancel_url": format!("{root}/cancel"), "queue_position": 0})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
    }
}
