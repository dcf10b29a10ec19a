//! A fake custom image server, the kind people write in an afternoon: `POST /generate {"prompt","width",
//! "height"}` answering `{"images": ["<base64>"]}`, `POST /dataurl` answering data URLs, `POST /link` answering
//! `{"result": {"url": ...}}` to a file it serves, `POST /raw` answering PNG bytes, and `POST /broken` a 500.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

#[derive(Default)]
pub struct CustomState {
    pub base: Mutex<String>,
    /// (path, content type, body text) of each call.
    pub calls: Mutex<Vec<(String, String, String)>>,
}

pub struct FakeCustom {
    pub url: String,
    pub state: Arc<CustomState>,
}

pub async fn start() -> FakeCustom {
    let state = Arc::new(CustomState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *state.base.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeCustom { url, state }
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w.max(1), h.max(1), image::Rgb([0, 255, 0]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn handle(State(s): State<Arc<CustomState>>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let base = s.base.lock().unwrap().clone();
    if method == Method::GET {
        return match path.as_str() {
            "/out/result.png" => ([("content-type", "image/png")], png(4, 4)).into_response(),
            _ => (StatusCode::NOT_FOUND, "not found").into_response(),
        };
    }
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let text = String::from_utf8(axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    s.calls.lock().unwrap().push((path.clone(), ct, text.clone()));
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let (w, h) = (body["width"].as_u64().unwrap_or(8) as u32, body["height"].as_u64().unwrap_or(8) as u32);
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(w, h));
    match path.as_str() {
        "/generate" => Json(json!({"images": [b64], "took_ms": 3})).into_response(),
        "/dataurl" => Json(json!({"output": [{"image": format!("data:image/png;base64,{b64}")}]})).into_response(),
        "/link" => Json(json!({"result": {"url": format!("{base}/out/result.png")}})).into_response(),
        "/raw" => ([("content-type", "image/png")], png(w, h)).into_response(),
        "/broken" => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"message": "generator crashed: CUDA out of memory"})))
                .into_response()
        }
        _ => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}
