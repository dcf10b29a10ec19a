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
    /// The video queue (endpoints whose id contains `video`).
    pub video: VideoKnobs,
}

/// How a fake's video jobs behave (shared by the fal, Replicate and OpenAI fakes). A job is queued for
/// `queued_polls` polls (position counting down), runs for `running_polls` polls (progress and log lines), then
/// succeeds, or fails with `fail_with`; `lose` answers 404 for every job, `errors_5xx` answers that many polls 503.
#[derive(Default)]
pub struct VideoKnobs {
    pub queued_polls: AtomicU32,
    pub running_polls: AtomicU32,
    pub polls: AtomicU32,
    pub fail_with: Mutex<Option<String>>,
    pub lose: AtomicBool,
    pub errors_5xx: AtomicU32,
    /// Every status poll waits this long first.
    pub latency_ms: AtomicU32,
    /// The video URL a finished job points to (default: the fake's own `/files/clip.mp4`).
    pub video_url: Mutex<Option<String>>,
    /// Bodies of video submits.
    pub submitted: Mutex<Vec<Value>>,
    /// Paths of video submits.
    pub submit_paths: Mutex<Vec<String>>,
    /// Query strings of status polls.
    pub poll_queries: Mutex<Vec<String>>,
    /// Ids of cancelled (or deleted) jobs.
    pub cancelled: Mutex<Vec<String>>,
    /// Answer polls with this status string instead (one the adapter has never seen).
    pub odd_status: Mutex<Option<String>>,
    /// Authorization headers of every video call.
    pub auth: Mutex<Vec<String>>,
    /// A submit is recorded (the job exists upstream), then answered only after this long: a client with a
    /// shorter timeout never learns the job's id.
    pub submit_stall_ms: AtomicU32,
    /// `X-Request-Id` of every video call (submit, polls, result, cancel).
    pub request_ids: Mutex<Vec<String>>,
    /// (upstream id, webhook URL) of every submit that named a webhook.
    pub webhooks: Mutex<Vec<(String, String)>>,
}

/// Where a fake video job stands at this poll.
#[derive(Debug, Clone, PartialEq)]
pub enum VideoPhase {
    Queued(u32),
    /// Percent done and the number of log lines so far.
    Running(u32, u32),
    Done,
    Failed(String),
    Cancelled,
}

impl VideoKnobs {
    /// Advances the poll counter; `Err(status)` for a 404 (lost) or 503 answer.
    pub async fn poll(&self, id: &str) -> Result<VideoPhase, u16> {
        let latency = self.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(latency))).await;
        }
        if self.lose.load(Ordering::SeqCst) {
            return Err(404);
        }
        if self.errors_5xx.load(Ordering::SeqCst) > 0 {
            self.errors_5xx.fetch_sub(1, Ordering::SeqCst);
            return Err(503);
        }
        Ok(self.phase(id, self.polls.fetch_add(1, Ordering::SeqCst)))
    }

    /// The phase at poll `n` (without counting a poll).
    pub fn phase(&self, id: &str, n: u32) -> VideoPhase {
        if self.cancelled.lock().unwrap().iter().any(|c| c == id) {
            return VideoPhase::Cancelled;
        }
        let (queued, running) = (self.queued_polls.load(Ordering::SeqCst), self.running_polls.load(Ordering::SeqCst));
        if n < queued {
            VideoPhase::Queued(queued - n - 1)
        } else if n < queued + running {
            let step = n - queued + 1;
            VideoPhase::Running(step * 100 / (running + 1), step)
        } else if let Some(e) = self.fail_with.lock().unwrap().clone() {
            VideoPhase::Failed(e)
        } else {
            VideoPhase::Done
        }
    }

    /// Waits `submit_stall_ms` (after a submit was recorded).
    pub async fn stall_submit(&self) {
        let ms = self.submit_stall_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(ms))).await;
        }
    }

    /// Finishes every job (each later poll finds it done) and, as the real service does at a job's end, POSTs
    /// `body(upstream id)` to every webhook URL a submit carried. Returns what each delivery was answered (status,
    /// body).
    pub async fn finish_and_notify(&self, body: impl Fn(&str) -> Value) -> Vec<(u16, Value)> {
        self.queued_polls.store(0, Ordering::SeqCst);
        self.running_polls.store(0, Ordering::SeqCst);
        let hooks = self.webhooks.lock().unwrap().clone();
        let client = reqwest::Client::new();
        let mut answers = Vec::new();
        for (id, url) in hooks {
            let resp = client.post(&url).json(&body(&id)).send().await.unwrap();
            let status = resp.status().as_u16();
            answers.push((status, resp.json().await.unwrap_or(Value::Null)));
        }
        answers
    }

    /// Where a finished job's video is.
    pub fn video_url(&self, base: &str) -> String {
        self.video_url.lock().unwrap().clone().unwrap_or_else(|| format!("{base}/files/clip.mp4"))
    }
}

/// A tiny MP4: an `ftyp` box and an empty `mdat` box.
pub fn mp4() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0, 0, 0, 0x18]);
    out.extend_from_slice(b"ftypisom");
    out.extend_from_slice(&[0, 0, 2, 0]);
    out.extend_from_slice(b"isomiso2");
    out.extend_from_slice(&[0, 0, 0, 8]);
    out.extend_from_slice(b"mdat");
    out
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
    if path == "/files/clip.mp4" {
        return ([("content-type", "video/mp4")], mp4()).into_response();
    }
    if let Some(name) = path.strip_prefix("/files/") {
        let seed: u64 = name.trim_end_matches(".png").parse().unwrap_or(0);
        return ([("content-type", "image/png")], png(seed)).into_response();
    }
    s.auth_headers.lock().unwrap().push(auth.clone());
    if auth != format!("Key {KEY}") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"detail": "Invalid API key"}))).into_response();
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if path.contains("video") || parts.get(3).is_some_and(|id| id.starts_with("vid-")) {
        s.video.auth.lock().unwrap().push(auth);
        let rid = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        s.video.request_ids.lock().unwrap().push(rid);
        let query = req.uri().query().unwrap_or("").to_owned();
        return video(&s, &base, method, &parts, &query, req).await;
    }
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

/// fal's queue for video endpoints: submit, status (queue position, logs with `?logs=1`), result, cancel.
async fn video(s: &FalState, base: &str, method: Method, parts: &[&str], query: &str, req: Request) -> Response {
    let v = &s.video;
    match (method, parts) {
        (Method::GET, [owner, alias, "requests", id, "status"]) => {
            v.poll_queries.lock().unwrap().push(query.to_owned());
            let phase = match v.poll(id).await {
                Ok(p) => p,
                Err(404) => return (StatusCode::NOT_FOUND, Json(json!({"detail": "Request not found"}))).into_response(),
                Err(code) => return (StatusCode::from_u16(code).unwrap(), Json(json!({"detail": "Service unavailable"}))).into_response(),
            };
            let root = format!("{base}/{owner}/{alias}/requests/{id}");
            let steps = match phase {
                VideoPhase::Running(_, n) => n,
                VideoPhase::Queued(_) => 0,
                _ => v.running_polls.load(Ordering::SeqCst),
            };
            let logs: Vec<Value> = if query.contains("logs=1") {
                (1..=steps).map(|i| json!({"message": format!("frame batch {i}"), "level": "INFO", "source": "user", "timestamp": "2026-01-01T00:00:00Z"})).collect()
            } else {
                Vec::new()
            };
            let mut body = json!({"response_url": root, "status_url": format!("{root}/status"), "cancel_url": format!("{root}/cancel"), "logs": logs});
            match phase {
                VideoPhase::Queued(position) => {
                    body["status"] = json!("IN_QUEUE");
                    body["queue_position"] = json!(position);
                }
                VideoPhase::Running(..) => body["status"] = json!("IN_PROGRESS"),
                VideoPhase::Done => body["status"] = json!("COMPLETED"),
                VideoPhase::Failed(e) => {
                    body["status"] = json!("COMPLETED");
                    body["error"] = json!(e);
                    body["error_type"] = json!("runner_error");
                }
                VideoPhase::Cancelled => {
                    body["status"] = json!("COMPLETED");
                    body["error"] = json!("Request was cancelled");
                }
            }
            if let Some(odd) = v.odd_status.lock().unwrap().clone() {
                body["status"] = json!(odd);
            }
            Json(body).into_response()
        }
        (Method::GET, [_owner, _alias, "requests", id]) => match v.phase(id, v.polls.load(Ordering::SeqCst)) {
            VideoPhase::Done => Json(json!({"video": {"url": v.video_url(base), "content_type": "video/mp4", "file_name": "clip.mp4", "file_size": mp4().len()}, "seed": 7})).into_response(),
            VideoPhase::Failed(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": e}))).into_response(),
            _ => (StatusCode::BAD_REQUEST, Json(json!({"detail": "Request is still in progress"}))).into_response(),
        },
        (Method::PUT, [_owner, _alias, "requests", id, "cancel"]) => {
            v.cancelled.lock().unwrap().push((*id).to_owned());
            (StatusCode::ACCEPTED, Json(json!({"status": "CANCELLATION_REQUESTED"}))).into_response()
        }
        (Method::POST, [owner, alias, ..]) => {
            let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let id = format!("vid-{}", v.submitted.lock().unwrap().len() + 1);
            v.submitted.lock().unwrap().push(body);
            v.submit_paths.lock().unwrap().push(format!("/{}", parts.join("/")));
            if let Some((_, hook)) = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "fal_webhook") {
                v.webhooks.lock().unwrap().push((id.clone(), hook.into_owned()));
            }
            v.stall_submit().await;
            let root = format!("{base}/{owner}/{alias}/requests/{id}");
            Json(json!({"request_id": id, "response_url": root, "status_url": format!("{root}/status"), "cancel_url": format!("{root}/cancel"), "queue_position": v.queued_polls.load(Ordering::SeqCst)})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
    }
}
