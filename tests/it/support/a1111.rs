//! A fake AUTOMATIC1111 / Forge webui on 127.0.0.1:0, faithful to `shared/protocols/a1111.md`: `txt2img` and
//! `img2img` answering bare base64 PNGs with `info` as a JSON string (a grid first when `save_images` makes one,
//! Forge extras after the results, styles rewriting `all_prompts`), checkpoints switched through
//! `override_settings` (unknown names silently ignored, as A1111 does), pydantic 422s for mistyped fields (v1
//! shape for A1111, v2 for Forge), "Sampler not found", A1111's wrapped error shape and Forge's `{"detail"}`,
//! `--api` off (404 `{"detail": "Not Found"}` on every `/sdapi/*`), `--api-auth` (HTTP Basic, 401), progress,
//! options, sd-models and interrupt (which ends a running generation early, as the real one does).
//!
//! Knobs (builder): latency, failing with a given status and body (every call or every Nth), Forge flavour,
//! extras, auth, `--api` off. Every request is captured for assertions.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::TEST_TIMEOUT;

/// The checkpoint loaded at start (file name, short hash).
pub const CHECKPOINT: &str = "v1-5-pruned-emaonly.safetensors";
/// The other checkpoint on the server.
pub const SDXL: &str = "sd_xl_base_1.0.safetensors";
const CHECKPOINTS: [(&str, &str); 2] = [(CHECKPOINT, "6ce0161689"), (SDXL, "31e35c80fc")];
pub const SAMPLERS: [&str; 3] = ["Euler", "Euler a", "DPM++ 2M"];
/// What the `cinematic` style appends to a prompt.
pub const CINEMATIC: &str = ", cinematic still, film grain";

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    /// The JSON body (`Null` when there was none).
    pub body: Value,
}

/// An answer the fake gives instead of generating.
#[derive(Debug, Clone)]
struct Canned {
    status: u16,
    content_type: &'static str,
    body: String,
}

/// Builds a [`FakeA1111`].
#[derive(Debug, Default)]
pub struct Builder {
    latency: Duration,
    fail: Option<Canned>,
    fail_every: u32,
    no_api: bool,
    forge: bool,
    extras: u32,
    auth: Option<(String, String)>,
}

impl Builder {
    /// Each generation takes this long (an interrupt ends it early).
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Generations answer `status` with this JSON body (every call, or every Nth with [`Self::fail_every`]).
    pub fn fail_with(mut self, status: u16, body: Value) -> Self {
        self.fail = Some(Canned { status, content_type: "application/json", body: body.to_string() });
        self
    }

    /// Generations answer `status` with a plain-text body (Forge's unhandled exceptions).
    pub fn fail_with_text(mut self, status: u16, text: &str) -> Self {
        self.fail = Some(Canned { status, content_type: "text/plain; charset=utf-8", body: text.to_owned() });
        self
    }

    /// Only every `n`th generation fails (with [`Self::fail_with`]'s answer, else a wrapped CUDA OOM 500).
    pub fn fail_every(mut self, n: u32) -> Self {
        self.fail_every = n;
        self
    }

    /// Started without `--api`: every `/sdapi/*` is a 404 (the UI still answers).
    pub fn without_api(mut self) -> Self {
        self.no_api = true;
        self
    }

    /// Forge: `forge_preset` in options, FastAPI's plain `{"detail"}` errors, pydantic v2 422s.
    pub fn forge(mut self) -> Self {
        self.forge = true;
        self
    }

    /// Appends `n` extra images (detect maps) after the results, as Forge's ControlNet does.
    pub fn extra_images(mut self, n: u32) -> Self {
        self.extras = n;
        self
    }

    /// `--api-auth user:pass`.
    pub fn api_auth(mut self, user: &str, pass: &str) -> Self {
        self.auth = Some((user.to_owned(), pass.to_owned()));
        self
    }

    pub async fn start(self) -> FakeA1111 {
        let state = Arc::new(A1111State {
            no_api: AtomicBool::new(self.no_api),
            latency_ms: AtomicU64::new(self.latency.as_millis() as u64),
            knobs: self,
            received: Mutex::default(),
            generations: AtomicU32::new(0),
            loaded: Mutex::new(title(CHECKPOINT, CHECKPOINTS[0].1)),
            busy: AtomicBool::new(false),
            interrupts: AtomicU32::new(0),
            started: Notify::new(),
            stop: Notify::new(),
            interrupted: Notify::new(),
        });
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeA1111 { url, state }
    }
}

pub struct A1111State {
    knobs: Builder,
    /// Runtime switch: the webui restarted without `--api`.
    no_api: AtomicBool,
    latency_ms: AtomicU64,
    received: Mutex<Vec<Received>>,
    generations: AtomicU32,
    /// The title of the loaded checkpoint.
    loaded: Mutex<String>,
    busy: AtomicBool,
    interrupts: AtomicU32,
    /// One permit per generation that started (for tests).
    started: Notify,
    /// Wakes running generations on interrupt.
    stop: Notify,
    /// One permit per interrupt (for tests).
    interrupted: Notify,
}

pub struct FakeA1111 {
    /// `http://127.0.0.1:PORT`, the webui root.
    pub url: String,
    pub state: Arc<A1111State>,
}

/// A default fake: A1111 1.10 with `--api`, answering at once.
pub async fn start() -> FakeA1111 {
    FakeA1111::builder().start().await
}

impl FakeA1111 {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The txt2img/img2img requests received.
    pub fn generations(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path.ends_with("2img")).collect()
    }

    /// Turns `--api` off (or on) from now on.
    pub fn set_api(&self, on: bool) {
        self.state.no_api.store(!on, Ordering::SeqCst);
    }

    pub fn set_latency(&self, d: Duration) {
        self.state.latency_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The title of the loaded checkpoint.
    pub fn loaded(&self) -> String {
        self.state.loaded.lock().unwrap().clone()
    }

    pub fn interrupts(&self) -> u32 {
        self.state.interrupts.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until a generation has started.
    pub async fn generation_started(&self) {
        tokio::time::timeout(TEST_TIMEOUT, self.state.started.notified()).await.expect("no generation started");
    }

    /// Waits (bounded) until an interrupt arrived.
    pub async fn interrupted(&self) {
        tokio::time::timeout(TEST_TIMEOUT, self.state.interrupted.notified()).await.expect("no interrupt arrived");
    }
}

/// A solid-colour PNG.
pub fn png(shade: u8, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w.clamp(1, 2048), h.clamp(1, 2048), image::Rgb([shade, 0, 0]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn title(file: &str, hash: &str) -> String {
    format!("{file} [{hash}]")
}

fn stem(file: &str) -> &str {
    file.rsplit_once('.').map_or(file, |(s, _)| s)
}

/// A1111's `checkpoint_aliases`: title, file name, model name and short hash.
fn resolve_checkpoint(name: &str) -> Option<(&'static str, &'static str)> {
    CHECKPOINTS.into_iter().find(|(file, hash)| [title(file, hash).as_str(), file, stem(file), hash].contains(&name))
}

fn json_answer(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn not_found() -> Response {
    json_answer(404, json!({"detail": "Not Found"}))
}

/// An HTTPException as each flavour renders it: A1111's middleware wraps it, Forge leaves FastAPI's default.
fn http_exception(s: &A1111State, status: u16, detail: &str) -> Response {
    if s.knobs.forge {
        json_answer(status, json!({"detail": detail}))
    } else {
        json_answer(status, json!({"error": "HTTPException", "detail": detail, "body": "", "errors": ""}))
    }
}

async fn handle(State(s): State<Arc<A1111State>>, req: Request) -> Response {
    let (method, path, query) =
        (req.method().clone(), req.uri().path().to_owned(), req.uri().query().map(str::to_owned));
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = axum::body::to_bytes(req.into_body(), 256 << 20).await.unwrap();
    let parsed: Result<Value, _> = if bytes.is_empty() { Ok(Value::Null) } else { serde_json::from_slice(&bytes) };
    s.received.lock().unwrap().push(Received {
        method: method.to_string(),
        path: path.clone(),
        query,
        authorization: authorization.clone(),
        body: parsed.as_ref().cloned().unwrap_or(Value::Null),
    });

    // The UI is up either way.
    match (&method, path.as_str()) {
        (&Method::GET, "/") => {
            return ([(header::CONTENT_TYPE, "text/html")], "<!DOCTYPE html><title>Stable Diffusion</title>")
                .into_response();
        }
        (&Method::GET, "/internal/ping") => return Json(json!({})).into_response(),
        _ => {}
    }
    if !path.starts_with("/sdapi/") || s.no_api.load(Ordering::SeqCst) {
        return not_found();
    }
    if let Some((user, pass)) = &s.knobs.auth {
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
        if authorization.as_deref() != Some(expected.as_str()) {
            let mut resp = json_answer(401, json!({"detail": "Incorrect username or password"}));
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
            return resp;
        }
    }
    let body = match parsed {
        Ok(b) => b,
        Err(e) => {
            return json_answer(
                422,
                json!({"detail": [{"loc": ["body", e.column()], "msg": "Expecting value", "type": "value_error.jsondecode"}]}),
            );
        }
    };
    match (method, path.as_str()) {
        (Method::GET, "/sdapi/v1/progress") => {
            let busy = s.busy.load(Ordering::SeqCst);
            Json(json!({
                "progress": if busy { 0.5 } else { 0.0 },
                "eta_relative": if busy { 1.5 } else { 0.0 },
                "state": {"skipped": false, "interrupted": false, "stopping_generation": false, "job": if busy { "txt2img" } else { "" }, "job_count": u32::from(busy), "job_timestamp": "20260101000000", "job_no": 0, "sampling_step": if busy { 10 } else { 0 }, "sampling_steps": if busy { 20 } else { 0 }},
                "current_image": null,
                "textinfo": null
            }))
            .into_response()
        }
        (Method::GET, "/sdapi/v1/options") => {
            let loaded = s.loaded.lock().unwrap().clone();
            let mut o = json!({"sd_model_checkpoint": loaded, "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1});
            if s.knobs.forge {
                o["forge_preset"] = json!("sd");
            }
            Json(o).into_response()
        }
        (Method::GET, "/sdapi/v1/sd-models") => Json(
            CHECKPOINTS
                .iter()
                .map(|(file, hash)| json!({"title": title(file, hash), "model_name": stem(file), "hash": hash, "sha256": format!("{hash}{}", "0".repeat(54)), "filename": format!("/models/Stable-diffusion/{file}"), "config": null}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        (Method::POST, "/sdapi/v1/interrupt") => {
            s.interrupts.fetch_add(1, Ordering::SeqCst);
            s.stop.notify_waiters();
            s.interrupted.notify_one();
            Json(json!({})).into_response()
        }
        (Method::POST, "/sdapi/v1/txt2img" | "/sdapi/v1/img2img") => generate(&s, &path, &body).await,
        _ => not_found(),
    }
}

/// pydantic's complaint about the first mistyped field, in the flavour's pydantic version.
fn validate(s: &A1111State, body: &Value) -> Option<Response> {
    const INTS: [&str; 6] = ["steps", "batch_size", "n_iter", "width", "height", "seed"];
    const FLOATS: [&str; 2] = ["cfg_scale", "denoising_strength"];
    const STRINGS: [&str; 3] = ["prompt", "negative_prompt", "sampler_name"];
    let Some(obj) = body.as_object() else {
        return Some(json_answer(
            422,
            json!({"detail": [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]}),
        ));
    };
    for (field, v) in obj {
        let (ok, v1, v2) = if INTS.contains(&field.as_str()) {
            (
                v.is_i64() || v.is_u64(),
                ("value is not a valid integer", "type_error.integer"),
                ("Input should be a valid integer, unable to parse string as an integer", "int_parsing"),
            )
        } else if FLOATS.contains(&field.as_str()) {
            (
                v.is_number(),
                ("value is not a valid float", "type_error.float"),
                ("Input should be a valid number, unable to parse string as a number", "float_parsing"),
            )
        } else if STRINGS.contains(&field.as_str()) {
            (v.is_string(), ("str type expected", "type_error.str"), ("Input should be a valid string", "string_type"))
        } else {
            continue;
        };
        if ok {
            continue;
        }
        let item = if s.knobs.forge {
            json!({"type": v2.1, "loc": ["body", field], "msg": v2.0, "input": v, "url": format!("https://errors.pydantic.dev/2.9/v/{}", v2.1)})
        } else {
            json!({"loc": ["body", field], "msg": v1.0, "type": v1.1})
        };
        return Some(json_answer(422, json!({"detail": [item]})));
    }
    None
}

async fn generate(s: &A1111State, path: &str, body: &Value) -> Response {
    if let Some(resp) = validate(s, body) {
        return resp;
    }
    if let Some(sampler) = body["sampler_name"].as_str()
        && !SAMPLERS.contains(&sampler)
    {
        return http_exception(s, 400, "Sampler not found");
    }
    if path.ends_with("img2img") && body["init_images"].as_array().is_none_or(Vec::is_empty) {
        return http_exception(s, 404, "Init image not found");
    }
    let call = s.generations.fetch_add(1, Ordering::SeqCst) + 1;
    let every = s.knobs.fail_every;
    if (every == 0 && s.knobs.fail.is_some()) || (every > 0 && call.is_multiple_of(every)) {
        let canned = s.knobs.fail.clone().unwrap_or_else(|| Canned {
            status: 500,
            content_type: "application/json",
            body: json!({"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"}).to_string(),
        });
        return (
            StatusCode::from_u16(canned.status).unwrap(),
            [(header::CONTENT_TYPE, canned.content_type)],
            canned.body,
        )
            .into_response();
    }

    // Checkpoint: A1111 drops an override it cannot resolve and keeps the loaded model.
    let mut used = s.loaded.lock().unwrap().clone();
    if let Some(wanted) = body["override_settings"]["sd_model_checkpoint"].as_str()
        && let Some((file, hash)) = resolve_checkpoint(wanted)
    {
        used = title(file, hash);
        if body["override_settings_restore_afterwards"] == json!(false) {
            *s.loaded.lock().unwrap() = used.clone();
        }
    }
    let used_file = used.split(" [").next().unwrap_or(&used).to_owned();
    let used_hash = CHECKPOINTS.iter().find(|(f, _)| *f == used_file).map_or("", |(_, h)| h);

    // Run, unless interrupted.
    let stop = s.stop.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    s.busy.store(true, Ordering::SeqCst);
    s.started.notify_one();
    let latency = Duration::from_millis(s.latency_ms.load(Ordering::SeqCst));
    if !latency.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(latency) => {}
            () = &mut stop => {}
        }
    }
    s.busy.store(false, Ordering::SeqCst);

    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
    let n = body["batch_size"].as_u64().unwrap_or(1) * body["n_iter"].as_u64().unwrap_or(1);
    let (w, h) = (body["width"].as_u64().unwrap_or(512) as u32, body["height"].as_u64().unwrap_or(512) as u32);
    let seed = match body["seed"].as_i64().unwrap_or(-1) {
        -1 => 1000,
        s => s,
    };
    let seeds: Vec<i64> = (0..n as i64).map(|i| seed + i).collect();
    let mut images: Vec<String> = seeds.iter().map(|sd| b64(png((*sd % 256) as u8, w, h))).collect();
    // `save_images` with more than one image writes a grid, and the API returns it first.
    let grid = body["save_images"] == json!(true) && n > 1;
    if grid {
        images.insert(0, b64(png(255, w * 2, h)));
    }
    for _ in 0..s.knobs.extras {
        images.push(b64(png(254, w, h)));
    }
    let prompt = body["prompt"].as_str().unwrap_or("");
    let styled = body["styles"].as_array().is_some_and(|st| st.iter().any(|x| x == "cinematic"));
    let full_prompt = if styled { format!("{prompt}{CINEMATIC}") } else { prompt.to_owned() };
    let info = json!({
        "prompt": full_prompt,
        "all_prompts": vec![full_prompt.clone(); n as usize],
        "negative_prompt": body["negative_prompt"],
        "all_negative_prompts": vec![body["negative_prompt"].clone(); n as usize],
        "seed": seed,
        "all_seeds": seeds,
        "subseed": 12345,
        "all_subseeds": vec![12345; n as usize],
        "subseed_strength": 0,
        "width": w,
        "height": h,
        "sampler_name": body["sampler_name"].as_str().unwrap_or("Euler"),
        "cfg_scale": body["cfg_scale"].as_f64().unwrap_or(7.0),
        "steps": body["steps"].as_u64().unwrap_or(50),
        "batch_size": body["batch_size"].as_u64().unwrap_or(1),
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": stem(&used_file),
        "sd_model_hash": used_hash,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": body.get("denoising_strength").cloned().unwrap_or(Value::Null),
        "extra_generation_params": {},
        "index_of_first_image": u32::from(grid),
        "infotexts": vec![format!("{full_prompt}\nSteps: 20, Seed: {seed}"); n as usize],
        "styles": body.get("styles").cloned().unwrap_or(json!([])),
        "job_timestamp": "20260101000000",
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": if s.knobs.forge { "f2.0.1v1.10.1-previous-669-gdfdcbab6" } else { "v1.10.1" }
    });
    Json(json!({"images": images, "parameters": body, "info": info.to_string()})).into_response()
}
