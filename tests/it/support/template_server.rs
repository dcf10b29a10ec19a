//! A fake custom image server, the kind people write in an afternoon with FastAPI or Flask, on 127.0.0.1:0:
//!
//! | route | answer |
//! |---|---|
//! | `POST /generate {"prompt","width","height"}` | `{"images": ["<base64 PNG>"], "took_ms": 3}` |
//! | `POST /dataurl` (same body) | `{"output": [{"image": "data:image/png;base64,…"}]}` |
//! | `POST /link` | `{"result": {"url": "http://127.0.0.1:PORT/files/x.png"}}` |
//! | `POST /relative` | `{"result": {"path": "/files/x.png"}}` |
//! | `POST /raw` | the PNG bytes, `Content-Type: image/png` |
//! | `GET /generate?prompt=…&width=…&height=…` | the PNG bytes |
//! | `GET /files/{name}` | a PNG |
//! | `GET /health` | `{"status": "healthy", "model_loaded": true, …}` (seed 003's server) |
//! | `GET /` | 404 `not found` |
//!
//! A body that is not a JSON object with a string `prompt` gets 400 `{"error": "…"}`. Knobs (builder): latency,
//! failing with a status and body (every call or every Nth), a required bearer token. Every request is captured.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

/// The green of every image this server makes.
pub const GREEN: [u8; 3] = [0, 255, 0];

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// The `X-Team` header (what configured `headers` are tested with).
    pub team: Option<String>,
    /// `X-Request-Id` and `traceparent`, as forwarded by the gateway.
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    pub body: String,
}

/// Builds a [`FakeCustom`].
#[derive(Debug, Default)]
pub struct Builder {
    latency: Duration,
    fail: Option<(u16, Value)>,
    fail_every: u32,
    bearer: Option<String>,
}

impl Builder {
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Generations answer `status` with this JSON body (every call, or every Nth with [`Self::fail_every`]).
    pub fn fail_with(mut self, status: u16, body: Value) -> Self {
        self.fail = Some((status, body));
        self
    }

    /// Only every `n`th generation fails (with [`Self::fail_with`]'s answer, else a 500 `{"message": …}`).
    pub fn fail_every(mut self, n: u32) -> Self {
        self.fail_every = n;
        self
    }

    /// Generations need `Authorization: Bearer <token>` (else 401).
    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    pub async fn start(self) -> FakeCustom {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(CustomState {
            knobs: self,
            base: url.clone(),
            received: Mutex::default(),
            generations: AtomicU32::new(0),
        });
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeCustom { url, state }
    }
}

pub struct CustomState {
    knobs: Builder,
    base: String,
    received: Mutex<Vec<Received>>,
    generations: AtomicU32,
}

pub struct FakeCustom {
    pub url: String,
    pub state: Arc<CustomState>,
}

/// A default server: answers at once, never fails.
pub async fn start() -> FakeCustom {
    FakeCustom::builder().start().await
}

impl FakeCustom {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests to `path`.
    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == path).collect()
    }
}

/// A solid green PNG.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w.clamp(1, 512), h.clamp(1, 512), image::Rgb(GREEN));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn png_response(w: u32, h: u32) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], png(w, h)).into_response()
}

fn dimension(v: Option<&str>) -> u32 {
    v.and_then(|s| s.parse().ok()).unwrap_or(8)
}

async fn handle(State(s): State<Arc<CustomState>>, req: Request) -> Response {
    let (method, path, query) =
        (req.method().clone(), req.uri().path().to_owned(), req.uri().query().map(str::to_owned));
    let headers = req.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (content_type, authorization, team) = (header("content-type"), header("authorization"), header("x-team"));
    let bytes = axum::body::to_bytes(req.into_body(), 16 << 20).await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    s.received.lock().unwrap().push(Received {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type,
        authorization: authorization.clone(),
        team,
        request_id: header("x-request-id"),
        traceparent: header("traceparent"),
        body: text.clone(),
    });

    // Seed 003's text2image_server answers its own health route.
    if method == Method::GET && path == "/health" {
        return Json(json!({"status": "healthy", "model_loaded": true, "cuda_available": false})).into_response();
    }
    if method == Method::GET && path.starts_with("/files/") {
        return png_response(4, 4);
    }
    let generation = matches!(
        (&method, path.as_str()),
        (&Method::POST, "/generate" | "/dataurl" | "/link" | "/relative" | "/raw") | (&Method::GET, "/generate")
    );
    if !generation {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    if let Some(token) = &s.knobs.bearer
        && authorization.as_deref() != Some(format!("Bearer {token}").as_str())
    {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "missing or wrong token"}))).into_response();
    }

    let (prompt, w, h) = if method == Method::GET {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
        let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        (get("prompt"), dimension(get("width").as_deref()), dimension(get("height").as_deref()))
    } else {
        let body: Value = match serde_json::from_str(&text) {
            Ok(b) => b,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, Json(json!({"error": format!("invalid JSON: {e}")}))).into_response();
            }
        };
        let dim = |k: &str| body[k].as_u64().map_or(8, |v| v as u32);
        (body["prompt"].as_str().map(str::to_owned), dim("width"), dim("height"))
    };
    if prompt.is_none() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "prompt is required"}))).into_response();
    }

    let call = s.generations.fetch_add(1, Ordering::SeqCst) + 1;
    if !s.knobs.latency.is_zero() {
        tokio::time::sleep(s.knobs.latency).await;
    }
    let every = s.knobs.fail_every;
    if (every == 0 && s.knobs.fail.is_some()) || (every > 0 && call.is_multiple_of(every)) {
        let (status, body) =
            s.knobs.fail.clone().unwrap_or((500, json!({"message": "generator crashed: CUDA out of memory"})));
        return (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
    }

    let b64 = base64::engine::general_purpose::STANDARD.encode(png(w, h));
    let base = &s.base;
    match path.as_str() {
        "/generate" if method == Method::GET => png_response(w, h),
        "/generate" => Json(json!({"images": [b64], "took_ms": 3})).into_response(),
        "/dataurl" => Json(json!({"output": [{"image": format!("data:image/png;base64,{b64}")}]})).into_response(),
        "/link" => Json(json!({"result": {"url": format!("{base}/files/x.png")}})).into_response(),
        "/relative" => Json(json!({"result": {"path": "/files/x.png"}})).into_response(),
        _ => png_response(w, h),
    }
}
