//! A fake AUTOMATIC1111/Forge `sdapi/v1`: txt2img and img2img with base64 images and an `info` JSON string,
//! pydantic 422s for mistyped fields, A1111's wrapped 500 for an unknown checkpoint, an optional grid before the
//! results, `--api` off (404 everywhere), progress/options/sd-models, and interrupt.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

pub const CHECKPOINT: &str = "v1-5-pruned-emaonly.safetensors";

#[derive(Default)]
pub struct A1111State {
    /// (path, body) of each generation.
    pub calls: Mutex<Vec<(String, Value)>>,
    pub no_api: AtomicBool,
    pub grid: AtomicBool,
    pub latency_ms: AtomicU32,
    pub interrupted: AtomicBool,
    pub forge: AtomicBool,
}

pub struct FakeA1111 {
    pub url: String,
    pub state: Arc<A1111State>,
}

pub async fn start() -> FakeA1111 {
    let state = Arc::new(A1111State::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeA1111 { url, state }
}

pub fn png(shade: u8, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([shade, 0, 0]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn handle(State(s): State<Arc<A1111State>>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    if s.no_api.load(Ordering::SeqCst) || !path.starts_with("/sdapi/v1/") {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response();
    }
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
    match (method, path.as_str()) {
        (Method::GET, "/sdapi/v1/progress") => Json(json!({"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}, "current_image": null, "textinfo": null})).into_response(),
        (Method::GET, "/sdapi/v1/options") => {
            let mut o = json!({"sd_model_checkpoint": format!("{CHECKPOINT} [6ce0161689]"), "samples_format": "png"});
            if s.forge.load(Ordering::SeqCst) {
                o["forge_preset"] = json!("sd");
            }
            Json(o).into_response()
        }
        (Method::GET, "/sdapi/v1/sd-models") => Json(json!([{"title": format!("{CHECKPOINT} [6ce0161689]"), "model_name": "v1-5-pruned-emaonly", "hash": "6ce0161689"}])).into_response(),
        (Method::POST, "/sdapi/v1/interrupt") => {
            s.interrupted.store(true, Ordering::SeqCst);
            Json(json!({})).into_response()
        }
        (Method::POST, "/sdapi/v1/txt2img" | "/sdapi/v1/img2img") => {
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            s.calls.lock().unwrap().push((path.clone(), body.clone()));
            for (field, v) in [("steps", &body["steps"]), ("batch_size", &body["batch_size"]), ("width", &body["width"])] {
                if !v.is_null() && !v.is_u64() {
                    return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": [{"loc": ["body", field], "msg": "value is not a valid integer", "type": "type_error.integer"}]}))).into_response();
                }
            }
            if let Some(ckpt) = body["override_settings"]["sd_model_checkpoint"].as_str()
                && ckpt != CHECKPOINT
            {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "RuntimeError", "detail": "", "body": "", "errors": format!("model '{ckpt}' not found")}))).into_response();
            }
            let latency = s.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(latency))).await;
            }
            let n = body["batch_size"].as_u64().unwrap_or(1) * body["n_iter"].as_u64().unwrap_or(1);
            let (w, h) = (body["width"].as_u64().unwrap_or(512) as u32, body["height"].as_u64().unwrap_or(512) as u32);
            let seed = body["seed"].as_i64().unwrap_or(-1);
            let seed = if seed < 0 { 1000 } else { seed };
            let mut images: Vec<String> = (0..n).map(|i| b64(png(((seed as u64 + i) % 256) as u8, w, h))).collect();
            let grid = s.grid.load(Ordering::SeqCst);
            if grid {
                images.insert(0, b64(png(255, w * 2, h)));
            }
            let info = json!({"prompt": body["prompt"], "seed": seed, "all_seeds": (0..n).map(|i| seed as u64 + i).collect::<Vec<_>>(), "index_of_first_image": u64::from(grid), "sd_model_name": "v1-5-pruned-emaonly"});
            Json(json!({"images": images, "parameters": body, "info": info.to_string()})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
    }
}
