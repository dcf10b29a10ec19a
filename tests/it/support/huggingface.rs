//! A fake Hugging Face Inference server: `POST /models/{owner}/{name}` (router / serverless) and `POST /`
//! (dedicated endpoint) answering raw image bytes for an image `Accept`, a base64 JSON string for
//! `application/json` or none (as the inference toolkit does), 400 for other Accept values, 503 "loading" with
//! `estimated_time` for the first N calls, and `GET /health`. Image-to-image calls carry the image as base64
//! `inputs` and the prompt in `parameters.prompt` (a mask as base64 `parameters.mask_image`); a model listed in
//! `text_only` answers them 400 as a pipeline without image input does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

pub const TOKEN: &str = "hf_test";

#[derive(Default)]
pub struct HfState {
    /// (path, Accept, body) of each call.
    pub calls: Mutex<Vec<(String, String, Value)>>,
    /// Answer 503 loading this many times first.
    pub loading_calls: AtomicU32,
    /// Answer this many calls with 429 and Hugging Face's `RateLimit` headers (reset in 55 s).
    pub rate_limited_calls: AtomicU32,
    /// Model paths (`/models/o/n`, or `/` for the endpoint) that only do text-to-image.
    pub text_only: Mutex<Vec<String>>,
}

pub struct FakeHf {
    pub url: String,
    pub state: Arc<HfState>,
}

pub async fn start() -> FakeHf {
    let state = Arc::new(HfState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeHf { url, state }
}

fn image(seed: u64, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([(seed % 256) as u8, 50, 50]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
    out
}

async fn handle(State(s): State<Arc<HfState>>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    if method == Method::GET && path == "/health" {
        return "Ok".into_response();
    }
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if auth != format!("Bearer {TOKEN}") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "Invalid credentials in Authorization header"})))
            .into_response();
    }
    if method != Method::POST || !(path == "/" || path.starts_with("/models/")) {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "Not Found"}))).into_response();
    }
    let accept = req.headers().get("accept").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    s.calls.lock().unwrap().push((path.clone(), accept.clone(), body.clone()));
    if s.loading_calls.load(Ordering::SeqCst) > 0 {
        s.loading_calls.fetch_sub(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": format!("Model {} is currently loading", path.trim_start_matches("/models/")), "estimated_time": 12.3}))).into_response();
    }
    if s.rate_limited_calls.load(Ordering::SeqCst) > 0 {
        s.rate_limited_calls.fetch_sub(1, Ordering::SeqCst);
        let headers = [("ratelimit", "\"api\";r=0;t=55"), ("ratelimit-policy", "\"fixed window\";\"api\";q=500;w=300")];
        return (StatusCode::TOO_MANY_REQUESTS, headers, Json(json!({"error": "You have exceeded your rate limit"})))
            .into_response();
    }
    if body["inputs"].as_str().is_none_or(str::is_empty) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "str type expected: `__root__` in `parameters`"})))
            .into_response();
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let input_image =
        body["inputs"].as_str().and_then(|i| b64.decode(i).ok()).filter(|b| image::load_from_memory(b).is_ok());
    if input_image.is_some() {
        if s.text_only.lock().unwrap().contains(&path) {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": format!("Model {} does not support task image-to-image", path.trim_start_matches("/models/"))}))).into_response();
        }
        if body["parameters"]["prompt"].as_str().is_none_or(str::is_empty) {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": "image-to-image needs `parameters.prompt`"})))
                .into_response();
        }
        if let Some(m) = body["parameters"].get("mask_image") {
            let ok = m.as_str().and_then(|m| b64.decode(m).ok()).is_some_and(|b| image::load_from_memory(&b).is_ok());
            if !ok {
                return (StatusCode::BAD_REQUEST, Json(json!({"error": "`mask_image` is not a base64 image"})))
                    .into_response();
            }
        }
    }
    let seed = body["parameters"]["seed"].as_u64().unwrap_or(0);
    let first = accept.split(',').next().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match first.as_str() {
        "image/png" => ([("content-type", "image/png")], image(seed, image::ImageFormat::Png)).into_response(),
        "image/jpeg" | "image/jpg" => ([("content-type", "image/jpeg")], image(seed, image::ImageFormat::Jpeg)).into_response(),
        "" | "*/*" | "application/json" => Json(json!(base64::engine::general_purpose::STANDARD.encode(image(seed, image::ImageFormat::Png)))).into_response(),
        other => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("Accept type \"{other}\" not supported. Supported accept types are: image/png, image/jpeg, image/jpg, image/tiff, image/bmp, image/gif, image/webp, image/x-image, application/json")})),
        )
            .into_response(),
    }
}
