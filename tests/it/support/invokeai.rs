//! A fake InvokeAI (6.x, or 5.x without `item_ids`) on 127.0.0.1:0: `enqueue_batch` with pydantic 422s for
//! unknown node types, a worker that takes items pending → in_progress → completed/failed with session results
//! keyed by prepared ids, item polling, the 5.x list, cancel, image download and upload, version and status.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

const KNOWN: &[&str] = &[
    "blank_image",
    "img_blur",
    "img_resize",
    "image",
    "main_model_loader",
    "compel",
    "noise",
    "denoise_latents",
    "l2i",
];

#[derive(Default)]
pub struct InvokeState {
    pub v5: AtomicBool,
    pub fail: AtomicBool,
    pub run_ms: AtomicU32,
    pub items: Mutex<HashMap<i64, Value>>,
    pub batches: Mutex<Vec<Value>>,
    pub cancelled: Mutex<Vec<i64>>,
    pub uploads: Mutex<Vec<String>>,
    pub images: Mutex<HashMap<String, Vec<u8>>>,
    next: AtomicI64,
}

pub struct FakeInvoke {
    pub url: String,
    pub state: Arc<InvokeState>,
}

pub async fn start() -> FakeInvoke {
    let state = Arc::new(InvokeState::default());
    let app = axum::Router::new()
        .route("/api/v1/app/version", get(|State(s): State<Arc<InvokeState>>| async move { Json(json!({"version": if s.v5.load(Ordering::SeqCst) { "5.6.0" } else { "6.14.2" }})) }))
        .route("/api/v1/queue/{q}/status", get(|| async { Json(json!({"queue": {"queue_id": "default", "pending": 0, "in_progress": 0}, "processor": {"is_started": true, "is_processing": false}})) }))
        .route("/api/v1/queue/{q}/enqueue_batch", post(enqueue))
        .route("/api/v1/queue/{q}/i/{id}", get(item))
        .route("/api/v1/queue/{q}/i/{id}/cancel", put(cancel))
        .route("/api/v1/queue/{q}/list", get(list))
        .route("/api/v1/images/i/{name}/full", get(full))
        .route("/api/v1/images/upload", post(upload))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeInvoke { url, state }
}

fn png(r: u8, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w.clamp(1, 256), h.clamp(1, 256), image::Rgb([r, 40, 90]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn enqueue(State(s): State<Arc<InvokeState>>, Path(_q): Path<String>, Json(body): Json<Value>) -> Response {
    let graph = &body["batch"]["graph"];
    for (key, node) in graph["nodes"].as_object().cloned().unwrap_or_default() {
        let kind = node["type"].as_str().unwrap_or("");
        if !KNOWN.contains(&kind) {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"detail": [{"type": "union_tag_invalid", "loc": ["body", "batch", "graph", "nodes", key], "msg": format!("Input tag '{kind}' found using 'type' does not match any of the expected tags"), "input": node}]})),
            )
                .into_response();
        }
    }
    s.batches.lock().unwrap().push(body.clone());
    let id = s.next.fetch_add(1, Ordering::SeqCst) + 1;
    let batch_id = format!("batch-{id}");
    let item = json!({"item_id": id, "status": "pending", "batch_id": batch_id, "queue_id": "default", "destination": body["batch"]["destination"], "session": {}});
    s.items.lock().unwrap().insert(id, item);
    tokio::spawn(run(Arc::clone(&s), id, graph.clone()));
    let mut answer = json!({"queue_id": "default", "enqueued": 1, "requested": 1, "priority": 0, "batch": {"batch_id": batch_id, "origin": "easel", "runs": 1, "graph": graph}});
    if !s.v5.load(Ordering::SeqCst) {
        answer["item_ids"] = json!([id]);
    }
    Json(answer).into_response()
}

async fn run(s: Arc<InvokeState>, id: i64, graph: Value) {
    tokio::time::sleep(Duration::from_millis(10)).await;
    if let Some(item) = s.items.lock().unwrap().get_mut(&id) {
        if item["status"] != "pending" {
            return;
        }
        item["status"] = json!("in_progress");
    }
    tokio::time::sleep(Duration::from_millis(u64::from(s.run_ms.load(Ordering::SeqCst)))).await;
    let mut items = s.items.lock().unwrap();
    let Some(item) = items.get_mut(&id) else { return };
    if item["status"] != "in_progress" {
        return;
    }
    if s.fail.load(Ordering::SeqCst) {
        item["status"] = json!("failed");
        item["error_type"] = json!("MissingInputException");
        item["error_message"] = json!("Node img_blur missing value or connection for field image");
        return;
    }
    let mut results = serde_json::Map::new();
    let mut mapping = serde_json::Map::new();
    for (key, node) in graph["nodes"].as_object().cloned().unwrap_or_default() {
        let pid = format!("{key}-{id}-prepared");
        let name = format!("{pid}.png");
        let r =
            node["color"]["r"].as_u64().or_else(|| graph["nodes"]["blank"]["color"]["r"].as_u64()).unwrap_or(7) as u8;
        let (w, h) = (
            graph["nodes"]["blank"]["width"].as_u64().unwrap_or(32) as u32,
            graph["nodes"]["blank"]["height"].as_u64().unwrap_or(32) as u32,
        );
        s.images.lock().unwrap().insert(name.clone(), png(r, w, h));
        results.insert(
            pid.clone(),
            json!({"type": "image_output", "image": {"image_name": name}, "width": w, "height": h}),
        );
        mapping.insert(key, json!([pid]));
    }
    item["status"] = json!("completed");
    item["session"] =
        json!({"id": format!("session-{id}"), "results": results, "source_prepared_mapping": mapping, "errors": {}});
}

async fn item(State(s): State<Arc<InvokeState>>, Path((_q, id)): Path<(String, i64)>) -> Response {
    match s.items.lock().unwrap().get(&id) {
        Some(item) => Json(item.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"detail": format!("Queue item with id {id} not found in queue default")})),
        )
            .into_response(),
    }
}

async fn cancel(State(s): State<Arc<InvokeState>>, Path((_q, id)): Path<(String, i64)>) -> Response {
    s.cancelled.lock().unwrap().push(id);
    let mut items = s.items.lock().unwrap();
    match items.get_mut(&id) {
        Some(item) => {
            item["status"] = json!("canceled");
            Json(item.clone()).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn list(State(s): State<Arc<InvokeState>>) -> Response {
    if !s.v5.load(Ordering::SeqCst) {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response();
    }
    let items: Vec<Value> = s
        .items
        .lock()
        .unwrap()
        .values()
        .map(|i| json!({"item_id": i["item_id"], "batch_id": i["batch_id"], "status": i["status"]}))
        .collect();
    Json(json!({"limit": 500, "has_more": false, "items": items})).into_response()
}

async fn full(State(s): State<Arc<InvokeState>>, Path(name): Path<String>) -> Response {
    match s.images.lock().unwrap().get(&name) {
        Some(b) => ([("content-type", "image/png")], b.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
    }
}

async fn upload(State(s): State<Arc<InvokeState>>, mut form: Multipart) -> Response {
    while let Some(field) = form.next_field().await.unwrap() {
        if field.name() == Some("file") {
            if !field.content_type().unwrap_or("").starts_with("image") {
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Json(json!({"detail": "Not an image"}))).into_response();
            }
            let bytes = field.bytes().await.unwrap();
            let name = format!("upload-{}.png", s.uploads.lock().unwrap().len());
            s.uploads.lock().unwrap().push(name.clone());
            s.images.lock().unwrap().insert(name.clone(), bytes.to_vec());
            return (StatusCode::CREATED, Json(json!({"image_name": name, "image_url": format!("api/v1/images/i/{name}/full"), "image_category": "user", "width": 8, "height": 8}))).into_response();
        }
    }
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"loc": ["body", "file"], "msg": "Field required", "type": "missing"}]})),
    )
        .into_response()
}
