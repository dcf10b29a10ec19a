//! A fake InvokeAI on 127.0.0.1:0, shaped after `shared/protocols/invokeai.md` and the 6.14.2 / 5.15.0 servers
//! observed for real: `enqueue_batch` (pydantic-style 422s for unknown node types, node ids that differ from
//! their key and edges to missing nodes; 6.x answers `item_ids` highest first, 5.x none), a one-at-a-time
//! processor taking items pending → in_progress → completed / failed / canceled (a required input left
//! unconnected fails the item with `MissingInputException`, as the real server does), sessions whose results are
//! keyed by prepared ids, every image node saving a PNG whose colour depends on the graph (so on the seed),
//! `GET …/i/{id}`, cancel, the 5.x – 6.6 `list` with its cursor, `status`, image download and upload,
//! `app/version`, and the Socket.IO progress socket (`/ws/socket.io/`, Engine.IO v4) with the queue events.
//! `cancel_by_destination` included. `/openapi.json` carries one invocation schema per node type the fake knows
//! (`missing_types` leaves some out). Knobs: version (5.x vs 6.x shapes), latency per node and per enqueue, failing items with a given error, a 422 on enqueue, a
//! stopped processor, no socket; everything received is captured.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use super::TEST_TIMEOUT;

/// Node types the fake knows: the inputs that need a value or an edge, and whether it outputs an image.
const NODE_TYPES: &[(&str, &[&str], bool)] = &[
    ("blank_image", &[], true),
    ("img_blur", &["image"], true),
    ("img_resize", &["image"], true),
    ("img_paste", &["base_image", "image"], true),
    ("img_chan", &["image"], true),
    ("image", &["image"], true),
    ("main_model_loader", &["model"], false),
    ("compel", &["prompt", "clip"], false),
    ("noise", &[], false),
    ("denoise_latents", &["noise", "positive_conditioning", "negative_conditioning", "unet"], false),
    ("i2l", &["image", "vae"], false),
    ("l2i", &["latents", "vae"], true),
];

/// Behaviour, changeable while the fake runs.
pub struct Knobs {
    /// What `app/version` answers; `5.*` drops `item_ids` from the enqueue answer, `list` exists before 6.7.
    pub version: Mutex<String>,
    /// How long each node runs.
    pub step_ms: AtomicU32,
    /// How long an enqueue takes to answer after creating its items (the real server answers late while its
    /// processor runs `gc.collect()` before an item).
    pub enqueue_ms: AtomicU32,
    /// Fail every item with this `(error_type, error_message)` after its nodes ran.
    pub fail: Mutex<Option<(String, String)>>,
    /// Answer every enqueue with a 422 whose message is this.
    pub reject: Mutex<Option<String>>,
    /// `processor.is_started` in `status`; while false, items stay pending.
    pub processor_started: AtomicBool,
    /// While set, each node runs until [`FakeInvoke::release_nodes`] instead of for `step_ms`.
    pub hold_nodes: AtomicBool,
    /// Answer 404 to the socket.
    pub no_socket: AtomicBool,
    /// Node types `/openapi.json` leaves out (a node pack that is not installed).
    pub missing_types: Mutex<Vec<String>>,
}

/// The OpenAPI document's schemas as the real server shapes them: one `…Invocation` schema per node type
/// (`class: invocation`, `type` a constant) and `…Output` schemas (`class: output`) whose `type` is not a node
/// type; the types in [`Knobs::missing_types`] are left out.
async fn openapi(State(s): State<Arc<InvokeState>>) -> Json<Value> {
    let missing = s.knobs.missing_types.lock().unwrap().clone();
    let camel = |t: &str| t.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect::<String>();
    let mut schemas = serde_json::Map::new();
    for (kind, inputs, _) in NODE_TYPES.iter().filter(|(k, _, _)| !missing.iter().any(|m| m == k)) {
        let mut properties = json!({"id": {"type": "string", "title": "Id"}, "type": {"type": "string", "const": kind, "default": kind, "title": "type", "field_kind": "node_attribute"}});
        for input in *inputs {
            properties[*input] =
                json!({"anyOf": [{"type": "object"}, {"type": "null"}], "field_kind": "input", "input": "any"});
        }
        schemas.insert(
            format!("{}Invocation", camel(kind)),
            json!({"type": "object", "class": "invocation", "properties": properties, "required": ["type", "id"], "version": "1.0.0"}),
        );
    }
    schemas.insert(
        "ImageOutput".into(),
        json!({"type": "object", "class": "output", "properties": {"type": {"type": "string", "const": "image_output", "default": "image_output"}}}),
    );
    Json(
        json!({"openapi": "3.1.0", "info": {"title": "Invoke - Community Edition", "version": "1.0.0"}, "paths": {}, "components": {"schemas": schemas}}),
    )
}

/// An upload as received.
#[derive(Debug, Clone)]
pub struct Upload {
    pub name: String,
    pub content_type: String,
    pub query: HashMap<String, String>,
    pub bytes: Vec<u8>,
}

/// Everything the fake received and holds.
#[derive(Default)]
pub struct Inner {
    /// Every `enqueue_batch` body accepted.
    pub batches: Vec<Value>,
    /// Item ids easel cancelled, in order.
    pub cancels: Vec<i64>,
    /// Destinations easel cancelled with `cancel_by_destination`.
    pub cancelled_destinations: Vec<String>,
    pub uploads: Vec<Upload>,
    /// Images removed with `DELETE /api/v1/images/i/{name}`.
    pub deleted_images: Vec<String>,
    /// Pongs (`3`) received on sockets.
    pub pongs: u32,
    /// Sockets that subscribed to a queue.
    pub subscribed: u32,
    pub items: BTreeMap<i64, Value>,
    /// The item the processor holds: set before its first node, cleared only after its running node stopped (a
    /// cancelled item keeps the processor until then, as the real one does).
    pub running: Option<i64>,
    /// `…/status` reads answered.
    pub status_reads: u32,
    pub images: HashMap<String, Vec<u8>>,
}

pub struct InvokeState {
    pub knobs: Knobs,
    pub inner: Mutex<Inner>,
    events: broadcast::Sender<String>,
    work: Notify,
    node_release: Notify,
    next_id: AtomicI64,
}

pub struct FakeInvoke {
    pub url: String,
    pub state: Arc<InvokeState>,
}

impl FakeInvoke {
    pub fn set_version(&self, v: &str) {
        *self.state.knobs.version.lock().unwrap() = v.to_owned();
    }

    pub fn set_step_ms(&self, ms: u32) {
        self.state.knobs.step_ms.store(ms, Ordering::SeqCst);
    }

    pub fn fail_items(&self, error_type: &str, message: &str) {
        *self.state.knobs.fail.lock().unwrap() = Some((error_type.to_owned(), message.to_owned()));
    }

    pub fn reject_enqueue(&self, message: &str) {
        *self.state.knobs.reject.lock().unwrap() = Some(message.to_owned());
    }

    pub fn batches(&self) -> Vec<Value> {
        self.state.inner.lock().unwrap().batches.clone()
    }

    /// Ends the held node and lets every later node run for `step_ms`.
    pub fn release_nodes(&self) {
        self.state.knobs.hold_nodes.store(false, Ordering::SeqCst);
        self.state.node_release.notify_one();
    }

    pub fn cancels(&self) -> Vec<i64> {
        self.state.inner.lock().unwrap().cancels.clone()
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.state.inner.lock().unwrap().uploads.clone()
    }

    pub fn item(&self, id: i64) -> Value {
        self.state.inner.lock().unwrap().items[&id].clone()
    }

    /// Puts `n` finished items in the queue, as on a server that has been used for a while.
    pub fn add_history(&self, n: usize) {
        let mut inner = self.state.inner.lock().unwrap();
        for _ in 0..n {
            let id = self.state.next_id.fetch_add(1, Ordering::SeqCst) + 1;
            let item = json!({"item_id": id, "status": "completed", "priority": 0, "batch_id": "old-batch",
                              "queue_id": "default", "origin": "web", "destination": null, "session": {}});
            inner.items.insert(id, item);
        }
    }

    /// Polls the fake's state until `done` holds; panics after [`TEST_TIMEOUT`].
    pub async fn wait_for(&self, what: &str, done: impl Fn(&Inner) -> bool) {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        while !done(&self.state.inner.lock().unwrap()) {
            assert!(tokio::time::Instant::now() < deadline, "the fake InvokeAI never saw: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub async fn start() -> FakeInvoke {
    let (events, _) = broadcast::channel(1024);
    let state = Arc::new(InvokeState {
        knobs: Knobs {
            version: Mutex::new("6.14.2".into()),
            step_ms: AtomicU32::new(5),
            enqueue_ms: AtomicU32::new(0),
            fail: Mutex::new(None),
            reject: Mutex::new(None),
            processor_started: AtomicBool::new(true),
            no_socket: AtomicBool::new(false),
            hold_nodes: AtomicBool::new(false),
            missing_types: Mutex::new(Vec::new()),
        },
        inner: Mutex::default(),
        events,
        work: Notify::new(),
        node_release: Notify::new(),
        next_id: AtomicI64::new(0),
    });
    let app = axum::Router::new()
        .route("/openapi.json", get(openapi))
        .route("/api/v1/app/version", get(version))
        .route("/api/v1/queue/{q}/enqueue_batch", post(enqueue))
        .route("/api/v1/queue/{q}/i/{id}", get(item))
        .route("/api/v1/queue/{q}/i/{id}/cancel", put(cancel))
        .route("/api/v1/queue/{q}/cancel_by_destination", put(cancel_by_destination))
        .route("/api/v1/queue/{q}/list", get(list))
        .route("/api/v1/queue/{q}/status", get(status))
        .route("/api/v1/images/i/{name}/full", get(full))
        .route("/api/v1/images/i/{name}", axum::routing::delete(delete_image))
        .route("/api/v1/images/upload", post(upload))
        .route("/ws/socket.io/", get(socket))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::spawn(processor(Arc::clone(&state)));
    FakeInvoke { url, state }
}

/// `DELETE /api/v1/images/i/{name}`: 6.x answers `DeleteImagesResult`.
async fn delete_image(State(s): State<Arc<InvokeState>>, Path(name): Path<String>) -> Response {
    let mut inner = s.inner.lock().unwrap();
    if inner.images.remove(&name).is_none() {
        return detail(StatusCode::NOT_FOUND, "Image not found");
    }
    inner.deleted_images.push(name.clone());
    Json(json!({"deleted_images": [name], "affected_boards": ["none"]})).into_response()
}

fn detail(status: StatusCode, detail: &str) -> Response {
    (status, Json(json!({"detail": detail}))).into_response()
}

fn unprocessable(kind: &str, loc: Value, msg: String) -> Response {
    let body = json!({"detail": [{"type": kind, "loc": loc, "msg": msg, "input": null}]});
    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
}

/// `(major, minor)` of the version knob.
fn version_of(s: &InvokeState) -> (u32, u32) {
    let v = s.knobs.version.lock().unwrap().clone();
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(6), parts.next().unwrap_or(0))
}

/// A timestamp in InvokeAI's style (`2026-11-22 10:19:26.264`, no zone).
fn now() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("2026-11-22 10:{:02}:{:02}.{:03}", t.as_secs() / 60 % 60, t.as_secs() % 60, t.subsec_millis())
}

async fn version(State(s): State<Arc<InvokeState>>) -> Json<Value> {
    Json(json!({"version": *s.knobs.version.lock().unwrap()}))
}

async fn enqueue(State(s): State<Arc<InvokeState>>, Path(q): Path<String>, Json(body): Json<Value>) -> Response {
    if let Some(msg) = s.knobs.reject.lock().unwrap().clone() {
        return unprocessable("value_error", json!(["body", "batch", "graph"]), format!("Value error, {msg}"));
    }
    let batch = &body["batch"];
    let graph = &batch["graph"];
    let Some(nodes) = graph["nodes"].as_object() else {
        return unprocessable("missing", json!(["body", "batch", "graph", "nodes"]), "Field required".into());
    };
    for (key, node) in nodes {
        let kind = node["type"].as_str().unwrap_or("");
        if !NODE_TYPES.iter().any(|(t, _, _)| *t == kind) {
            return unprocessable(
                "union_tag_invalid",
                json!(["body", "batch", "graph", "nodes", key]),
                format!("Input tag '{kind}' found using 'type' does not match any of the expected tags"),
            );
        }
        if node["id"].as_str() != Some(key.as_str()) {
            return unprocessable(
                "value_error",
                json!(["body", "batch", "graph"]),
                format!("Value error, Node ids must be the same as their keys: {key} != {}", node["id"]),
            );
        }
    }
    for edge in graph["edges"].as_array().into_iter().flatten() {
        for end in ["source", "destination"] {
            let id = edge[end]["node_id"].as_str().unwrap_or("");
            if !nodes.contains_key(id) {
                return unprocessable(
                    "value_error",
                    json!(["body", "batch", "graph"]),
                    format!("Value error, Edge {end} node {id} does not exist in the graph"),
                );
            }
        }
    }
    let runs = batch["runs"].as_u64().unwrap_or(1).max(1);
    let batch_id = uuid::Uuid::now_v7().to_string();
    let mut ids = Vec::new();
    {
        let mut inner = s.inner.lock().unwrap();
        inner.batches.push(body.clone());
        for _ in 0..runs {
            let id = s.next_id.fetch_add(1, Ordering::SeqCst) + 1;
            let item = json!({
                "item_id": id, "status": "pending", "status_sequence": 0, "priority": 0, "batch_id": batch_id,
                "queue_id": q, "origin": batch["origin"], "destination": batch["destination"],
                "session_id": format!("session-{id}"), "error_type": null, "error_message": null,
                "error_traceback": null, "created_at": now(), "updated_at": now(), "started_at": null,
                "completed_at": null, "field_values": null, "user_id": "system", "device": null, "workflow": null,
                "session": {"id": format!("session-{id}"), "graph": graph, "execution_graph": {"nodes": {}, "edges": []},
                            "executed": [], "executed_history": [], "results": {}, "errors": {},
                            "prepared_source_mapping": {}, "source_prepared_mapping": {}},
            });
            inner.items.insert(id, item);
            ids.push(id);
        }
    }
    s.work.notify_one();
    tokio::time::sleep(Duration::from_millis(u64::from(s.knobs.enqueue_ms.load(Ordering::SeqCst)))).await;
    // The real server lists the new ids highest first.
    ids.reverse();
    let mut answer = json!({
        "queue_id": q, "enqueued": runs, "requested": runs, "priority": 0,
        "batch": {"batch_id": batch_id, "origin": batch["origin"], "destination": batch["destination"],
                  "data": null, "runs": runs, "graph": graph, "workflow": null},
    });
    if version_of(&s).0 >= 6 {
        answer["item_ids"] = json!(ids);
    }
    Json(answer).into_response()
}

/// Sends a Socket.IO event to every subscribed socket.
fn emit(s: &InvokeState, name: &str, item: &Value, extra: Value) {
    let mut payload = json!({
        "timestamp": 0, "queue_id": item["queue_id"], "item_id": item["item_id"], "batch_id": item["batch_id"],
        "origin": item["origin"], "destination": item["destination"], "session_id": item["session_id"],
        "user_id": "system",
    });
    if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), extra) {
        p.extend(extra);
    }
    let _ = s.events.send(format!("42{}", json!([name, payload])));
}

fn set_status(s: &InvokeState, item: &mut Value, status: &str) {
    item["status"] = json!(status);
    item["updated_at"] = json!(now());
    if status == "in_progress" {
        item["started_at"] = json!(now());
    }
    if matches!(status, "completed" | "failed" | "canceled") {
        item["completed_at"] = json!(now());
    }
    let extra = json!({"status": status, "error_type": item["error_type"], "error_message": item["error_message"]});
    emit(s, "queue_item_status_changed", item, extra);
}

/// The queue processor: one item at a time, lowest id first, each node taking `step_ms`.
async fn processor(s: Arc<InvokeState>) {
    loop {
        let notified = s.work.notified();
        let next = if s.knobs.processor_started.load(Ordering::SeqCst) {
            let mut inner = s.inner.lock().unwrap();
            let id = inner.items.iter().find(|(_, i)| i["status"] == "pending").map(|(id, _)| *id);
            id.map(|id| {
                inner.running = Some(id);
                let item = inner.items.get_mut(&id).unwrap();
                set_status(&s, item, "in_progress");
                (id, item["session"]["graph"].clone())
            })
        } else {
            None
        };
        match next {
            Some((id, graph)) => {
                run_item(&s, id, &graph).await;
                s.inner.lock().unwrap().running = None;
            }
            None => {
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            }
        }
    }
}

async fn run_item(s: &InvokeState, id: i64, graph: &Value) {
    let nodes = graph["nodes"].as_object().cloned().unwrap_or_default();
    let edges: Vec<Value> = graph["edges"].as_array().cloned().unwrap_or_default();
    let fed = |node: &str, field: &str| {
        edges.iter().any(|e| e["destination"]["node_id"] == node && e["destination"]["field"] == field)
    };
    // A digest of the whole graph: the seed, the prompt and the size all change the pixels.
    let digest = graph
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut results = serde_json::Map::new();
    let mut source_prepared = serde_json::Map::new();
    let mut prepared_source = serde_json::Map::new();
    let mut executed = Vec::new();
    let mut failure: Option<(String, String)> = None;
    for (key, node) in &nodes {
        let kind = node["type"].as_str().unwrap_or("");
        let (_, required, makes_image) = NODE_TYPES.iter().find(|(t, _, _)| *t == kind).copied().unwrap();
        if let Some(missing) = required.iter().find(|f| node.get(**f).is_none_or(Value::is_null) && !fed(key, f)) {
            failure = Some((
                "MissingInputException".into(),
                format!("Node {kind} missing value or connection for field {missing}"),
            ));
            break;
        }
        let item = s.inner.lock().unwrap().items[&id].clone();
        emit(s, "invocation_started", &item, json!({"invocation_source_id": key, "invocation": node}));
        let step = Duration::from_millis(u64::from(s.knobs.step_ms.load(Ordering::SeqCst)));
        if kind == "denoise_latents" {
            let steps = node["steps"].as_u64().unwrap_or(10).clamp(1, 4) as u32;
            for k in 1..=steps {
                tokio::time::sleep(step / steps).await;
                let progress = json!({"invocation_source_id": key, "message": format!("Step {k}/{steps}"),
                                      "percentage": f64::from(k) / f64::from(steps), "image": null});
                emit(s, "invocation_progress", &item, progress);
            }
        } else if s.knobs.hold_nodes.load(Ordering::SeqCst) {
            s.node_release.notified().await;
        } else {
            tokio::time::sleep(step).await;
        }
        if s.inner.lock().unwrap().items[&id]["status"] != "in_progress" {
            return; // canceled meanwhile
        }
        if kind == "image" {
            let name = node["image"]["image_name"].as_str().unwrap_or("");
            if !s.inner.lock().unwrap().images.contains_key(name) {
                failure = Some(("ImageRecordNotFoundException".into(), format!("Image record not found: {name}")));
                break;
            }
        }
        let prepared = uuid::Uuid::now_v7().to_string();
        let result = if kind == "image" {
            // The image primitive passes its image on; nothing new is saved.
            let (w, h) = output_size(s, &nodes, key, &edges);
            json!({"type": "image_output", "image": node["image"], "width": w, "height": h})
        } else if makes_image {
            let (w, h) = output_size(s, &nodes, key, &edges);
            let name = format!("{}.png", uuid::Uuid::now_v7());
            s.inner.lock().unwrap().images.insert(name.clone(), png(digest, w, h));
            let saving =
                json!({"invocation_source_id": key, "message": "Saving image", "percentage": null, "image": null});
            emit(s, "invocation_progress", &item, saving);
            json!({"type": "image_output", "image": {"image_name": name}, "width": w, "height": h})
        } else {
            json!({"type": format!("{kind}_output")})
        };
        emit(s, "invocation_complete", &item, json!({"invocation_source_id": key, "result": result}));
        results.insert(prepared.clone(), result);
        source_prepared.insert(key.clone(), json!([prepared]));
        prepared_source.insert(prepared.clone(), json!(key));
        executed.push(json!(prepared));
    }
    let failure = failure.or_else(|| s.knobs.fail.lock().unwrap().clone());
    let mut inner = s.inner.lock().unwrap();
    let item = inner.items.get_mut(&id).unwrap();
    if item["status"] != "in_progress" {
        return;
    }
    let session = &mut item["session"];
    session["results"] = Value::Object(results);
    session["source_prepared_mapping"] = Value::Object(source_prepared);
    session["prepared_source_mapping"] = Value::Object(prepared_source);
    session["executed"] = json!(executed);
    match failure {
        Some((kind, message)) => {
            item["error_type"] = json!(kind);
            item["error_message"] = json!(message);
            item["error_traceback"] = json!(format!("Traceback (most recent call last):\n{kind}: {message}"));
            set_status(s, item, "failed");
        }
        None => set_status(s, item, "completed"),
    }
}

/// The size a node's image has: its own `width`/`height`, else the noise's (l2i), else the uploaded image's (the
/// image primitive), else its first input's.
fn output_size(s: &InvokeState, nodes: &serde_json::Map<String, Value>, key: &str, edges: &[Value]) -> (u32, u32) {
    let node = &nodes[key];
    let own = |n: &Value| Some((n["width"].as_u64()? as u32, n["height"].as_u64()? as u32));
    if let Some(size) = own(node) {
        return size;
    }
    if node["type"] == "l2i"
        && let Some(size) = nodes.values().find(|n| n["type"] == "noise").and_then(own)
    {
        return size;
    }
    if let Some(name) = node["image"]["image_name"].as_str()
        && let Some(bytes) = s.inner.lock().unwrap().images.get(name)
        && let Ok(img) = image::load_from_memory(bytes)
    {
        return (img.width(), img.height());
    }
    edges
        .iter()
        .find(|e| e["destination"]["node_id"] == key)
        .and_then(|e| e["source"]["node_id"].as_str())
        .filter(|src| *src != key)
        .map_or((64, 64), |src| output_size(s, nodes, src, edges))
}

/// A PNG whose colour comes from the graph digest (capped at 256 px a side, which is enough for tests).
fn png(digest: u64, w: u32, h: u32) -> Vec<u8> {
    let [r, g, b, ..] = digest.to_le_bytes();
    let img = image::RgbImage::from_pixel(w.clamp(1, 256), h.clamp(1, 256), image::Rgb([r, g, b]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn item(State(s): State<Arc<InvokeState>>, Path((q, id)): Path<(String, i64)>) -> Response {
    match s.inner.lock().unwrap().items.get(&id) {
        Some(item) => Json(item.clone()).into_response(),
        None => detail(StatusCode::NOT_FOUND, &format!("Queue item with id {id} not found in queue {q}")),
    }
}

async fn cancel(State(s): State<Arc<InvokeState>>, Path((q, id)): Path<(String, i64)>) -> Response {
    let mut inner = s.inner.lock().unwrap();
    inner.cancels.push(id);
    let Some(item) = inner.items.get_mut(&id) else {
        return detail(StatusCode::NOT_FOUND, &format!("Queue item with id {id} not found in queue {q}"));
    };
    if !matches!(item["status"].as_str(), Some("completed" | "failed" | "canceled")) {
        set_status(&s, item, "canceled");
    }
    Json(item.clone()).into_response()
}

#[derive(serde::Deserialize)]
struct DestinationQuery {
    destination: String,
}

async fn cancel_by_destination(
    State(s): State<Arc<InvokeState>>,
    Path(q): Path<String>,
    Query(d): Query<DestinationQuery>,
) -> Json<Value> {
    let mut inner = s.inner.lock().unwrap();
    inner.cancelled_destinations.push(d.destination.clone());
    let mut canceled = 0;
    for item in inner.items.values_mut() {
        if item["destination"] == d.destination.as_str()
            && !matches!(item["status"].as_str(), Some("completed" | "failed" | "canceled"))
        {
            set_status(&s, item, "canceled");
            canceled += 1;
        }
    }
    Json(json!({"queue_id": q, "canceled": canceled}))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    #[serde(default = "fifty")]
    limit: usize,
    cursor: Option<i64>,
    #[serde(default)]
    priority: i64,
}

fn fifty() -> usize {
    50
}

/// 5.x – 6.6: items without sessions, ordered by priority then id, after the cursor.
async fn list(State(s): State<Arc<InvokeState>>, Query(q): Query<ListQuery>) -> Response {
    if version_of(&s) >= (6, 7) {
        return detail(StatusCode::NOT_FOUND, "Not Found");
    }
    let inner = s.inner.lock().unwrap();
    let after_cursor = |i: &Value| {
        q.cursor.is_none_or(|c| i["priority"].as_i64() < Some(q.priority) || i["item_id"].as_i64() > Some(c))
    };
    let mut items: Vec<Value> = inner
        .items
        .values()
        .filter(|i| after_cursor(i))
        .map(|i| {
            let mut dto = i.clone();
            dto.as_object_mut().unwrap().remove("session");
            dto
        })
        .collect();
    let has_more = items.len() > q.limit;
    items.truncate(q.limit);
    Json(json!({"limit": q.limit, "has_more": has_more, "items": items})).into_response()
}

async fn status(State(s): State<Arc<InvokeState>>, Path(q): Path<String>) -> Json<Value> {
    let mut inner = s.inner.lock().unwrap();
    inner.status_reads += 1;
    let count = |st: &str| inner.items.values().filter(|i| i["status"] == st).count();
    let current = inner.items.values().find(|i| i["status"] == "in_progress");
    let field = |f: &str| current.map(|i| i[f].clone());
    Json(json!({
        "queue": {"queue_id": q, "item_id": field("item_id"), "batch_id": field("batch_id"),
                  "session_id": field("session_id"), "pending": count("pending"),
                  "in_progress": count("in_progress"), "completed": count("completed"), "failed": count("failed"),
                  "canceled": count("canceled"), "total": inner.items.len()},
        "processor": {"is_started": s.knobs.processor_started.load(Ordering::SeqCst), "is_processing": inner.running.is_some()},
    }))
}

async fn full(State(s): State<Arc<InvokeState>>, Path(name): Path<String>) -> Response {
    match s.inner.lock().unwrap().images.get(&name) {
        Some(bytes) => (
            [("content-type", "image/png".to_owned()), ("content-disposition", format!("inline; filename=\"{name}\""))],
            bytes.clone(),
        )
            .into_response(),
        None => detail(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn upload(
    State(s): State<Arc<InvokeState>>,
    Query(query): Query<HashMap<String, String>>,
    mut form: Multipart,
) -> Response {
    while let Ok(Some(field)) = form.next_field().await {
        if field.name() != Some("file") {
            continue;
        }
        let content_type = field.content_type().unwrap_or("").to_owned();
        if !content_type.starts_with("image") {
            return detail(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Not an image");
        }
        let bytes = field.bytes().await.unwrap().to_vec();
        let Ok(img) = image::load_from_memory(&bytes) else {
            return detail(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Failed to read image");
        };
        let name = format!("{}.png", uuid::Uuid::now_v7());
        let mut inner = s.inner.lock().unwrap();
        inner.images.insert(name.clone(), bytes.clone());
        inner.uploads.push(Upload { name: name.clone(), content_type, query: query.clone(), bytes });
        let dto = json!({
            "image_name": name, "image_url": format!("api/v1/images/i/{name}/full"),
            "thumbnail_url": format!("api/v1/images/i/{name}/thumbnail"), "image_origin": "internal",
            "image_category": query.get("image_category").cloned().unwrap_or_else(|| "general".into()),
            "width": img.width(), "height": img.height(),
            "is_intermediate": query.get("is_intermediate").is_some_and(|v| v == "true"),
            "session_id": null, "node_id": null, "starred": false, "has_workflow": false, "board_id": null,
        });
        return (StatusCode::CREATED, Json(dto)).into_response();
    }
    unprocessable("missing", json!(["body", "file"]), "Field required".into())
}

/// Engine.IO v4 + Socket.IO over a WebSocket: open packet, namespace connect, `subscribe_queue`, then the queue
/// events; one ping right after the subscription, to check that the client answers.
async fn socket(State(s): State<Arc<InvokeState>>, upgrade: WebSocketUpgrade) -> Response {
    if s.knobs.no_socket.load(Ordering::SeqCst) {
        return detail(StatusCode::NOT_FOUND, "Not Found");
    }
    upgrade.on_upgrade(move |ws| serve_socket(s, ws))
}

async fn serve_socket(s: Arc<InvokeState>, mut ws: WebSocket) {
    let open = r#"0{"sid":"fake-sid","upgrades":[],"pingTimeout":20000,"pingInterval":25000,"maxPayload":1000000}"#;
    if ws.send(Message::text(open)).await.is_err() {
        return;
    }
    let mut events = s.events.subscribe();
    let mut subscribed = false;
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let Some(Ok(Message::Text(text))) = msg else { return };
                let text = text.as_str();
                if text.starts_with("40") {
                    if ws.send(Message::text(r#"40{"sid":"fake-ns-sid"}"#)).await.is_err() {
                        return;
                    }
                } else if text == "3" {
                    s.inner.lock().unwrap().pongs += 1;
                } else if text.starts_with("42") && text.contains("\"subscribe_queue\"") {
                    subscribed = true;
                    s.inner.lock().unwrap().subscribed += 1;
                    if ws.send(Message::text("2")).await.is_err() {
                        return;
                    }
                }
            }
            ev = events.recv() => {
                let Ok(ev) = ev else { continue };
                if subscribed && ws.send(Message::text(ev)).await.is_err() {
                    return;
                }
            }
        }
    }
}
