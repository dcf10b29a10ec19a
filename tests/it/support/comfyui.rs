//! A fake ComfyUI (HTTP + WebSocket) on 127.0.0.1:0, faithful to the protocol notes: `/prompt` with validation
//! (`node_errors` 400s), a one-at-a-time queue worker that emits `execution_start`, `executing {node}` for each
//! node in turn, `progress` (unless `no_sampler`), `executed`,
//! `execution_success` and `executing {node: null}` to the submitting client's socket (each `progress` followed by
//! a binary JPEG preview frame, as a server started with a preview method sends), `/history` (`{}` until
//! done), `/view`, `/upload/image`, `/queue` (list and delete), `/interrupt`, `/system_stats`, and 403 when an
//! `Origin` differs from `Host`. Uploads behave like the real server's: stored under `input/<subfolder>/<name>`,
//! replaced with `overwrite=true`, else renamed `name (1).ext` on a clash with different bytes; a `LoadImage` of a
//! missing file fails validation. Edit graphs (`LoadImage`, `ImageInvert`, `ImageCompositeMasked`, `SaveImage`)
//! are really evaluated, so an output shows which input it came from. Knobs: run time, a run-time
//! `execution_error`, dropping or refusing the socket, a `/prompt` status (with `Retry-After`) or stalled body.
//!
//! Video workflows (`CreateVideo` → `SaveVideo`) save a small real H.264 MP4 made by ComfyUI 0.8.0, listed in
//! history as the real server lists it: `{"images": [{filename, subfolder: "video", type: "output"}], "animated":
//! [true]}` under the SaveVideo node. A client-chosen `prompt_id` must be a canonical lowercase UUID (else 400
//! `invalid_prompt_id`). `/queue` lists pending items in heap order (not sorted), `/interrupt {"prompt_id"}` stops
//! only that prompt. More knobs: hold the queue (`paused`), accept a prompt and then stall the answer
//! (`accept_then_stall`), and [`ComfyState::restart`] (queue and history are lost, as in-memory state is).
//! `/object_info` describes the node classes these workflows use (their `input.required` as the real server
//! declares them); `missing_classes` leaves some out, as a server without a custom node would.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

#[derive(Default)]
pub struct Knobs {
    /// Time a job runs, in 5 progress steps.
    pub run_ms: AtomicU32,
    pub fail_exec: AtomicBool,
    /// Close every socket when a job starts.
    pub drop_ws: AtomicBool,
    /// Answer 404 to `/ws`.
    pub refuse_ws: AtomicBool,
    /// Answer `/prompt` with this status and `Retry-After: 17` (0 = accept).
    pub prompt_status: AtomicU32,
    /// Send `/prompt`'s headers, then never the body.
    pub stall_prompt_body: AtomicBool,
    /// Queue the prompt, then never answer `/prompt` (the submit's answer is lost).
    pub accept_then_stall: AtomicBool,
    /// Start no queued prompt while set.
    pub paused: AtomicBool,
    /// Send no `progress` steps (a graph without a sampler: only node events tell how far it is).
    pub no_sampler: AtomicBool,
    /// Node classes `/object_info` leaves out (a custom node that is not installed).
    pub missing_classes: Mutex<Vec<String>>,
}

#[derive(Default)]
pub struct Inner {
    pub pending: VecDeque<(String, String, Value)>,
    pub running: Option<String>,
    pub history: HashMap<String, Value>,
    /// Outputs by file name.
    pub files: HashMap<String, Vec<u8>>,
    /// Inputs by the name `LoadImage` takes (`subfolder/name`, or `name`).
    pub inputs: HashMap<String, Vec<u8>>,
    /// Every workflow received.
    pub prompts: Vec<Value>,
    pub deleted: Vec<String>,
    pub interrupts: u32,
    /// The `prompt_id` of every `/interrupt` that named one.
    pub interrupted_ids: Vec<String>,
    /// Every `/prompt` body's `prompt_id` and `client_id`.
    pub submitted_ids: Vec<(Option<String>, Option<String>)>,
    /// Every upload: (client file name, subfolder, overwrite field, stored name).
    pub uploads: Vec<(String, String, Option<String>, String)>,
    pub origins_refused: u32,
}

pub struct ComfyState {
    pub knobs: Knobs,
    pub inner: Mutex<Inner>,
    events: broadcast::Sender<(String, Frame)>,
    work: Notify,
    interrupt: AtomicBool,
    counter: AtomicU64,
    /// Rung when a `/prompt` arrives (a permit is kept when nobody waits).
    pub received: Notify,
}

impl ComfyState {
    /// Lets held prompts run.
    pub fn resume(&self) {
        self.knobs.paused.store(false, Ordering::SeqCst);
        self.work.notify_one();
    }

    /// What a restarted ComfyUI knows: nothing queued, no history (the running prompt is abandoned).
    pub fn restart(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.pending.clear();
        inner.history.clear();
        inner.running = None;
        self.interrupt.store(true, Ordering::SeqCst);
    }
}

pub struct FakeComfy {
    pub url: String,
    pub state: Arc<ComfyState>,
}

pub async fn start() -> FakeComfy {
    let (events, _) = broadcast::channel(1024);
    let state = Arc::new(ComfyState {
        knobs: Knobs::default(),
        inner: Mutex::default(),
        events,
        work: Notify::new(),
        interrupt: AtomicBool::new(false),
        counter: AtomicU64::new(0),
        received: Notify::new(),
    });
    let app = axum::Router::new()
        .route("/prompt", post(submit))
        .route("/ws", get(ws))
        .route("/history/{id}", get(history))
        .route("/view", get(view))
        .route("/upload/image", post(upload))
        .route("/queue", get(queue).post(queue_delete))
        .route("/interrupt", post(interrupt))
        .route("/object_info", get(object_info))
        .route("/system_stats", get(|| async { Json(json!({"system": {"os": "posix", "comfyui_version": "0.3.64", "python_version": "3.11", "pytorch_version": "2.15.0+cu132", "embedded_python": false, "argv": ["main.py", "--cpu"]}, "devices": [{"name": "cpu", "type": "cpu", "index": null}]})) }))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::spawn(worker(Arc::clone(&state)));
    FakeComfy { url, state }
}

/// The node classes the fake's workflows use, shaped like the real `/object_info` (`input.required` /
/// `input.optional`, `output`, `category`), minus those in [`Knobs::missing_classes`].
async fn object_info(State(s): State<Arc<ComfyState>>) -> Json<Value> {
    let int = |default: i64, min: i64| json!(["INT", {"default": default, "min": min, "max": 16384}]);
    let image = || json!(["IMAGE"]);
    let prefix = || json!(["STRING", {"default": "ComfyUI"}]);
    let classes = [
        (
            "EmptyImage",
            json!({"width": int(512, 1), "height": int(512, 1), "batch_size": int(1, 1), "color": int(0, 0)}),
            json!({}),
            "IMAGE",
            "image",
        ),
        ("ImageInvert", json!({"image": image()}), json!({}), "IMAGE", "image"),
        ("LoadImage", json!({"image": [["example.png"], {"image_upload": true}]}), json!({}), "IMAGE", "image"),
        (
            "ImageCompositeMasked",
            json!({"destination": image(), "source": image(), "x": int(0, 0), "y": int(0, 0), "resize_source": ["BOOLEAN", {"default": false}]}),
            json!({"mask": ["MASK"]}),
            "IMAGE",
            "image",
        ),
        ("SaveImage", json!({"images": image(), "filename_prefix": prefix()}), json!({}), "", "image"),
        (
            "CreateVideo",
            json!({"images": image(), "fps": ["FLOAT", {"default": 30.0}]}),
            json!({"audio": ["AUDIO"]}),
            "VIDEO",
            "image/video",
        ),
        (
            "SaveVideo",
            json!({"video": ["VIDEO"], "filename_prefix": prefix(), "format": [["auto", "mp4"]], "codec": [["auto", "h264"]]}),
            json!({}),
            "",
            "image/video",
        ),
        (
            "CheckpointLoaderSimple",
            json!({"ckpt_name": [["sd_xl_base_1.0.safetensors"]]}),
            json!({}),
            "MODEL",
            "loaders",
        ),
        (
            "CLIPTextEncode",
            json!({"text": ["STRING", {"multiline": true}], "clip": ["CLIP"]}),
            json!({}),
            "CONDITIONING",
            "conditioning",
        ),
        (
            "EmptyLatentImage",
            json!({"width": int(512, 16), "height": int(512, 16), "batch_size": int(1, 1)}),
            json!({}),
            "LATENT",
            "latent",
        ),
        (
            "KSampler",
            json!({"model": ["MODEL"], "seed": int(0, 0), "steps": int(20, 1), "cfg": ["FLOAT", {"default": 8.0}], "sampler_name": [["euler"]], "scheduler": [["normal"]], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0}]}),
            json!({}),
            "LATENT",
            "sampling",
        ),
        ("VAEDecode", json!({"samples": ["LATENT"], "vae": ["VAE"]}), json!({}), "IMAGE", "latent"),
    ];
    let missing = s.knobs.missing_classes.lock().unwrap().clone();
    let mut all = serde_json::Map::new();
    for (name, required, optional, output, category) in classes {
        if missing.iter().any(|m| m == name) {
            continue;
        }
        let outputs: Vec<&str> = if output.is_empty() { vec![] } else { vec![output] };
        all.insert(
            name.to_owned(),
            json!({"input": {"required": required, "optional": optional, "hidden": {"prompt": "PROMPT"}}, "output": outputs,
                   "output_node": outputs.is_empty(), "name": name, "display_name": name, "category": category}),
        );
    }
    Json(Value::Object(all))
}

/// What the socket sends next: a JSON event, a binary frame, or a close.
#[derive(Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Close,
}

fn emit(s: &ComfyState, client: &str, kind: &str, data: Value) {
    let _ = s.events.send((client.to_owned(), Frame::Text(json!({"type": kind, "data": data}).to_string())));
}

/// A preview as ComfyUI sends it to a client that did not negotiate preview metadata: a binary frame of
/// u32 BE event type 1 (PREVIEW_IMAGE), u32 BE image format 1 (JPEG), then the JPEG. The picture is a quarter of
/// the output's size, in a colour whose green channel is `step * 40`, so a test can tell which step it shows.
pub fn preview_frame(seed: u64, step: u64, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(
        (w / 4).clamp(1, 64),
        (h / 4).clamp(1, 64),
        image::Rgb([(seed % 256) as u8, (step * 40) as u8, 64]),
    );
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let mut frame = vec![0, 0, 0, 1, 0, 0, 0, 1];
    frame.extend(jpeg);
    frame
}

fn origin_refused(s: &ComfyState, headers: &HeaderMap) -> bool {
    let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("");
    match headers.get("origin").and_then(|v| v.to_str().ok()) {
        Some(origin) if !origin.ends_with(host) => {
            s.inner.lock().unwrap().origins_refused += 1;
            true
        }
        _ => false,
    }
}

async fn submit(State(s): State<Arc<ComfyState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if origin_refused(&s, &headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(prompt) = body.get("prompt").and_then(Value::as_object) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}, "node_errors": {}}))).into_response();
    };
    {
        let mut inner = s.inner.lock().unwrap();
        inner.prompts.push(body["prompt"].clone());
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        inner.submitted_ids.push((field("prompt_id"), field("client_id")));
    }
    let status = s.knobs.prompt_status.load(Ordering::SeqCst);
    if status != 0 {
        let status = StatusCode::from_u16(status as u16).unwrap();
        return (status, [("retry-after", "17")], Json(json!({"error": "busy"}))).into_response();
    }
    if s.knobs.stall_prompt_body.load(Ordering::SeqCst) {
        s.received.notify_one();
        let stalled = futures_util::stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
        return Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(stalled))
            .unwrap();
    }
    for (id, node) in prompt {
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("");
        if class == "NoSuchNode" || class.is_empty() {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"type": "invalid_prompt", "message": format!("Cannot execute because node {class} does not exist."), "details": format!("Node ID '#{id}'"), "extra_info": {}}, "node_errors": {}}))).into_response();
        }
        if class == "LoadImage" {
            let name = node["inputs"]["image"].as_str().unwrap_or("");
            if !s.inner.lock().unwrap().inputs.contains_key(name) {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                        "node_errors": {id: {"errors": [{"type": "custom_validation_failed", "message": "Failed to validate prompt for output 9", "details": format!("image - Invalid image file: {name}"), "extra_info": {}}], "dependent_outputs": ["9"], "class_type": class}}})),
                )
                    .into_response();
            }
        }
        if node["inputs"].get("width").and_then(Value::as_u64) == Some(0) {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                    "node_errors": {id: {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 16", "details": "width", "extra_info": {"input_name": "width"}}], "dependent_outputs": ["9"], "class_type": class}}})),
            )
                .into_response();
        }
    }
    let id = match body.get("prompt_id") {
        None | Some(Value::Null) => uuid::Uuid::now_v7().to_string(),
        Some(v) => match v.as_str().filter(|p| uuid::Uuid::parse_str(p).is_ok_and(|u| u.to_string() == *p)) {
            Some(p) => p.to_owned(),
            None => {
                return (StatusCode::BAD_REQUEST, Json(json!({"error": {"type": "invalid_prompt_id", "message": "Invalid prompt_id format", "details": "prompt_id must be a valid UUID", "extra_info": {}}, "node_errors": {}}))).into_response();
            }
        },
    };
    let client = body.get("client_id").and_then(Value::as_str).unwrap_or("").to_owned();
    let number = s.counter.fetch_add(1, Ordering::SeqCst);
    s.inner.lock().unwrap().pending.push_back((id.clone(), client, body["prompt"].clone()));
    s.work.notify_one();
    s.received.notify_one();
    if s.knobs.accept_then_stall.load(Ordering::SeqCst) {
        futures_util::future::pending::<()>().await;
    }
    Json(json!({"prompt_id": id, "number": number, "node_errors": {}})).into_response()
}

fn png(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w.clamp(1, 256), h.clamp(1, 256), image::Rgb([(seed % 256) as u8, 128, 64]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// Finds an input anywhere in the workflow.
fn input(wf: &Value, name: &str) -> Option<u64> {
    wf.as_object()?.values().find_map(|n| n["inputs"].get(name).and_then(Value::as_u64))
}

async fn worker(s: Arc<ComfyState>) {
    loop {
        let next =
            if s.knobs.paused.load(Ordering::SeqCst) { None } else { s.inner.lock().unwrap().pending.pop_front() };
        let Some((id, client, wf)) = next else {
            s.work.notified().await;
            continue;
        };
        s.inner.lock().unwrap().running = Some(id.clone());
        s.interrupt.store(false, Ordering::SeqCst);
        emit(&s, &client, "execution_start", json!({"prompt_id": id, "timestamp": 1}));
        emit(&s, &client, "execution_cached", json!({"nodes": [], "prompt_id": id, "timestamp": 1}));
        if s.knobs.drop_ws.load(Ordering::SeqCst) {
            let _ = s.events.send((client.clone(), Frame::Close));
        }
        // Node events as ComfyUI sends them: `executing` for each node in turn; the run's time is spent in the
        // sampler (node 3 when there is one, else the second node).
        let mut order: Vec<String> = wf.as_object().unwrap().keys().cloned().collect();
        order.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), k.clone()));
        let runner = order.iter().position(|k| k == "3").unwrap_or(1.min(order.len().saturating_sub(1)));
        for node in &order[..=runner] {
            emit(&s, &client, "executing", json!({"node": node, "display_node": node, "prompt_id": id}));
        }
        let run = u64::from(s.knobs.run_ms.load(Ordering::SeqCst));
        let mut interrupted = false;
        'steps: for step in 1..=5u64 {
            // In slices, so an interrupt of a long run is seen at once.
            let until = tokio::time::Instant::now() + Duration::from_millis(run / 5);
            loop {
                if s.interrupt.load(Ordering::SeqCst) {
                    interrupted = true;
                    break 'steps;
                }
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                tokio::time::sleep((until - now).min(Duration::from_millis(10))).await;
            }
            if !s.knobs.no_sampler.load(Ordering::SeqCst) {
                let node = &order[runner];
                emit(&s, &client, "progress", json!({"value": step, "max": 5, "prompt_id": id, "node": node}));
            }
            let (w, h) = (input(&wf, "width").unwrap_or(64) as u32, input(&wf, "height").unwrap_or(64) as u32);
            let frame = preview_frame(input(&wf, "seed").unwrap_or(0), step, w, h);
            let _ = s.events.send((client.clone(), Frame::Binary(frame)));
        }
        if s.inner.lock().unwrap().running.as_deref() != Some(id.as_str()) {
            continue; // restarted meanwhile: this prompt is forgotten
        }
        if !interrupted {
            for node in &order[runner + 1..] {
                emit(&s, &client, "executing", json!({"node": node, "display_node": node, "prompt_id": id}));
            }
        }
        let mut messages = vec![json!(["execution_start", {"prompt_id": id}])];
        let video_node =
            wf.as_object().unwrap().iter().find(|(_, n)| n["class_type"] == "SaveVideo").map(|(k, _)| k.clone());
        let entry = if interrupted {
            let d = json!({"prompt_id": id, "node_id": "9", "node_type": "SaveImage", "executed": []});
            emit(&s, &client, "execution_interrupted", d.clone());
            messages.push(json!(["execution_interrupted", d]));
            json!({"prompt": [0, id, wf, {"client_id": client}, ["9"]], "outputs": {}, "status": {"status_str": "error", "completed": false, "messages": messages}})
        } else if s.knobs.fail_exec.load(Ordering::SeqCst) {
            let d = json!({"prompt_id": id, "node_id": "3", "node_type": "KSampler", "executed": ["1"], "exception_message": "Allocation on device 0 would exceed allowed memory. (out of memory)", "exception_type": "torch.OutOfMemoryError", "traceback": ["..."], "current_inputs": {}, "current_outputs": []});
            emit(&s, &client, "execution_error", d.clone());
            messages.push(json!(["execution_error", d]));
            json!({"prompt": [0, id, wf, {"client_id": client}, ["9"]], "outputs": {}, "status": {"status_str": "error", "completed": false, "messages": messages}})
        } else if let Some(node) = video_node {
            let name = format!("easel_{:05}_.mp4", s.counter.fetch_add(1, Ordering::SeqCst));
            s.inner.lock().unwrap().files.insert(format!("video/{name}"), MP4.to_vec());
            let output =
                json!({"images": [{"filename": name, "subfolder": "video", "type": "output"}], "animated": [true]});
            emit(
                &s,
                &client,
                "executed",
                json!({"node": node, "display_node": node, "output": output, "prompt_id": id}),
            );
            emit(&s, &client, "execution_success", json!({"prompt_id": id, "timestamp": 2}));
            messages.push(json!(["execution_success", {"prompt_id": id}]));
            json!({"prompt": [0, id, wf, {"client_id": client}, [node]], "outputs": {node.clone(): output}, "status": {"status_str": "success", "completed": true, "messages": messages},
                "meta": {node.clone(): {"node_id": node, "display_node": node, "parent_node": null, "real_node_id": node}}})
        } else {
            let seed = input(&wf, "seed").unwrap_or(0);
            let (w, h) = (input(&wf, "width").unwrap_or(64) as u32, input(&wf, "height").unwrap_or(64) as u32);
            let batch = input(&wf, "batch_size").unwrap_or(1);
            let edited = {
                let inner = s.inner.lock().unwrap();
                let save = wf.as_object().unwrap().values().find(|n| n["class_type"] == "SaveImage").cloned();
                save.and_then(|n| eval(&wf, &inner.inputs, &n["inputs"]["images"]))
            };
            let mut images = Vec::new();
            for i in 0..batch {
                let name = format!("easel_{:05}_.png", s.counter.fetch_add(1, Ordering::SeqCst));
                let bytes = match &edited {
                    Some(Out::Image(img)) => encode(img),
                    _ => png(seed + i, w, h),
                };
                s.inner.lock().unwrap().files.insert(name.clone(), bytes);
                images.push(json!({"filename": name, "subfolder": "", "type": "output"}));
            }
            emit(
                &s,
                &client,
                "executed",
                json!({"node": "9", "display_node": "9", "output": {"images": images}, "prompt_id": id}),
            );
            emit(&s, &client, "execution_success", json!({"prompt_id": id, "timestamp": 2}));
            messages.push(json!(["execution_success", {"prompt_id": id}]));
            json!({"prompt": [0, id, wf, {"client_id": client}, ["9"]], "outputs": {"9": {"images": images}}, "status": {"status_str": "success", "completed": true, "messages": messages}})
        };
        {
            let mut inner = s.inner.lock().unwrap();
            inner.history.insert(id.clone(), entry);
            inner.running = None;
        }
        emit(&s, &client, "executing", json!({"node": null, "display_node": null, "prompt_id": id}));
    }
}

async fn ws(
    State(s): State<Arc<ComfyState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if s.knobs.refuse_ws.load(Ordering::SeqCst) || origin_refused(&s, &headers) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let client = q.get("clientId").cloned().unwrap_or_default();
    let rx = s.events.subscribe();
    upgrade.on_upgrade(move |socket| serve_socket(socket, client, rx))
}

async fn serve_socket(mut socket: WebSocket, client: String, mut rx: broadcast::Receiver<(String, Frame)>) {
    let hello =
        json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client}}).to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    while let Ok((to, frame)) = rx.recv().await {
        if to != client {
            continue;
        }
        let msg = match frame {
            Frame::Close => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(bytes) => Message::Binary(bytes.into()),
        };
        if socket.send(msg).await.is_err() {
            return;
        }
    }
}

async fn history(State(s): State<Arc<ComfyState>>, Path(id): Path<String>) -> Json<Value> {
    let inner = s.inner.lock().unwrap();
    Json(match inner.history.get(&id) {
        Some(entry) => json!({ id: entry }),
        None => json!({}),
    })
}

async fn view(State(s): State<Arc<ComfyState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let name = q.get("filename").cloned().unwrap_or_default();
    let key = match q.get("subfolder").map(String::as_str) {
        None | Some("") => name.clone(),
        Some(sub) => format!("{sub}/{name}"),
    };
    let mime = if name.ends_with(".mp4") { "video/mp4" } else { "image/png" };
    match s.inner.lock().unwrap().files.get(&key) {
        Some(bytes) if q.get("type").map(String::as_str) == Some("output") => {
            ([("content-type", mime)], bytes.clone()).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn upload(State(s): State<Arc<ComfyState>>, mut form: Multipart) -> Response {
    let (mut file, mut subfolder, mut overwrite) = (None, String::new(), None);
    while let Some(field) = form.next_field().await.unwrap() {
        match field.name().unwrap_or("") {
            "image" => {
                let name = field.file_name().map(str::to_owned);
                file = Some((name, field.bytes().await.unwrap().to_vec()));
            }
            "subfolder" => subfolder = field.text().await.unwrap(),
            "overwrite" => overwrite = Some(field.text().await.unwrap()),
            _ => {}
        }
    }
    let Some((Some(name), bytes)) = file.filter(|(n, _)| n.as_deref().is_some_and(|n| !n.is_empty())) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if subfolder.contains("..") || subfolder.starts_with('/') {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let key = |n: &str| if subfolder.is_empty() { n.to_owned() } else { format!("{subfolder}/{n}") };
    let mut inner = s.inner.lock().unwrap();
    let mut stored = name.clone();
    if !matches!(overwrite.as_deref(), Some("true" | "1")) {
        let (stem, ext) =
            name.rsplit_once('.').map_or((name.clone(), String::new()), |(a, e)| (a.to_owned(), format!(".{e}")));
        let mut i = 1;
        while let Some(existing) = inner.inputs.get(&key(&stored)) {
            if *existing == bytes {
                break;
            }
            stored = format!("{stem} ({i}){ext}");
            i += 1;
        }
    }
    inner.inputs.insert(key(&stored), bytes);
    inner.uploads.push((name, subfolder.clone(), overwrite, stored.clone()));
    Json(json!({"name": stored, "subfolder": subfolder, "type": "input"})).into_response()
}

/// A node output in the fake's edit evaluator.
enum Out {
    Image(image::RgbaImage),
    /// 1.0 = the area to change.
    Mask(image::GrayImage),
}

/// Evaluates `["node", slot]` of an edit graph: `LoadImage` (slot 0 the RGB image, slot 1 the mask `1 - alpha`),
/// `ImageInvert`, `ImageCompositeMasked` (source where the mask is set, else destination).
fn eval(wf: &Value, inputs: &HashMap<String, Vec<u8>>, link: &Value) -> Option<Out> {
    let node = &wf[link[0].as_str()?];
    let slot = link[1].as_u64()?;
    let arg = |k: &str| eval(wf, inputs, &node["inputs"][k]);
    match node["class_type"].as_str()? {
        "LoadImage" => {
            let img = image::load_from_memory(inputs.get(node["inputs"]["image"].as_str()?)?).ok()?.to_rgba8();
            if slot == 1 {
                return Some(Out::Mask(image::GrayImage::from_fn(img.width(), img.height(), |x, y| {
                    image::Luma([255 - img.get_pixel(x, y)[3]])
                })));
            }
            Some(Out::Image(image::RgbaImage::from_fn(img.width(), img.height(), |x, y| {
                let p = img.get_pixel(x, y);
                image::Rgba([p[0], p[1], p[2], 255])
            })))
        }
        "ImageInvert" => {
            let Out::Image(mut img) = arg("image")? else { return None };
            for p in img.pixels_mut() {
                *p = image::Rgba([255 - p[0], 255 - p[1], 255 - p[2], 255]);
            }
            Some(Out::Image(img))
        }
        "ImageCompositeMasked" => {
            let (Out::Image(mut dst), Out::Image(src), Out::Mask(mask)) =
                (arg("destination")?, arg("source")?, arg("mask")?)
            else {
                return None;
            };
            for (x, y, p) in dst.enumerate_pixels_mut() {
                if mask.get_pixel_checked(x, y).is_some_and(|m| m[0] >= 128)
                    && let Some(q) = src.get_pixel_checked(x, y)
                {
                    *p = *q;
                }
            }
            Some(Out::Image(dst))
        }
        _ => None,
    }
}

fn encode(img: &image::RgbaImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

async fn queue(State(s): State<Arc<ComfyState>>) -> Json<Value> {
    let inner = s.inner.lock().unwrap();
    let running: Vec<Value> = inner.running.iter().map(|id| json!([0, id, {}, {}, ["9"]])).collect();
    // Heap order, as the real server lists it: not sorted by `number`.
    let pending: Vec<Value> =
        inner.pending.iter().enumerate().rev().map(|(i, (id, _, _))| json!([i + 1, id, {}, {}, ["9"]])).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

async fn queue_delete(State(s): State<Arc<ComfyState>>, Json(body): Json<Value>) -> StatusCode {
    let ids: Vec<String> = body["delete"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut inner = s.inner.lock().unwrap();
    inner.pending.retain(|(id, _, _)| !ids.contains(id));
    inner.deleted.extend(ids);
    StatusCode::OK
}

/// No body (or no `prompt_id`): interrupt whatever runs; `{"prompt_id"}`: only if that prompt is running.
async fn interrupt(State(s): State<Arc<ComfyState>>, body: axum::body::Bytes) -> StatusCode {
    let named = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("prompt_id").and_then(Value::as_str).map(str::to_owned));
    let mut inner = s.inner.lock().unwrap();
    inner.interrupts += 1;
    let runs = match &named {
        Some(id) => {
            inner.interrupted_ids.push(id.clone());
            inner.running.as_deref() == Some(id.as_str())
        }
        None => true,
    };
    if runs {
        s.interrupt.store(true, Ordering::SeqCst);
    }
    StatusCode::OK
}

/// A 16x16, 2-frame H.264 MP4 at 8 fps, as ComfyUI 0.8.0's `CreateVideo` → `SaveVideo` (format mp4, codec h264)
/// wrote it for a model-free workflow.
const MP4: &[u8] = include_bytes!("comfyui-video.mp4");
