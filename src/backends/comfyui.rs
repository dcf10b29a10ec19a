//! `comfyui`: a ComfyUI server running an API-format workflow template per model. One call renders the
//! template (a fresh seed every time unless the request fixed one, so ComfyUI's cache never answers a stale
//! image), opens the progress socket `/ws?clientId=…`, submits `POST /prompt` with that `client_id`, follows the
//! job's events to `executing {node: null}`, then reads `/history/{prompt_id}` and downloads every output with
//! `/view`. If the socket cannot be opened or drops (or the server is behind `https`), `/history` is polled
//! every `poll_interval` instead. Validation failures (`node_errors`) are the request's fault (400, naming the
//! node, class and message); a run-time `execution_error` is the backend's (502, naming node and exception).
//! When the client goes away the queued prompt is deleted, or the running one interrupted. No `Origin` header is
//! ever sent (ComfyUI answers 403 when Origin and Host differ). Edits upload their inputs with `/upload/image` as
//! `easel/<sha256>.<ext>` (never the client's file name), and are refused when the workflow has no `image` (or,
//! with a mask, no `mask`) variable.
//!
//! Binary preview frames on the socket (a server started with a preview method) feed streamed partial images.
//!
//! Health: `GET /system_stats`, with the queue depth from `GET /queue` in the probe's detail.
//!
//! Video models run as jobs (see [`video`]).

mod video;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::client::Http;
use super::error::excerpt;
use super::progress::Progress;
use super::workflow::{WorkflowVars, fresh_seed};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, InputImage, JobHandle, JobLookup, JobOutput, JobPoll,
    ProbeReport, VideoCall, image_from_bytes, upload_edit_inputs,
};
use crate::config::BackendConfig;
use crate::request::ImageFormat;

pub const KIND: &str = "comfyui";

/// The folder under ComfyUI's `input/` that edit inputs are uploaded to.
const UPLOAD_SUBFOLDER: &str = "easel";

/// How long the progress socket may take to open before easel polls instead.
const WS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct ComfyUiBackend {
    http: Http,
}

/// How a job ended, as the socket or the history told.
enum Ended {
    Done,
    Failed(Failure),
}

impl ComfyUiBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    fn ws_url(&self, client_id: &str) -> Option<String> {
        let base = self.http.cfg.endpoint("/ws");
        base.strip_prefix("http://").map(|rest| format!("ws://{rest}?clientId={client_id}"))
    }

    /// Uploads an edit input as `easel/<sha256 of its bytes>.<ext>`, so two requests share a server-side file only
    /// when their bytes are identical (the client's file name is never used: two edits, or an image and its mask,
    /// may both be called `image.png`). Returns the name `LoadImage` takes. ComfyUI has no API to delete inputs, so
    /// the files stay in `input/easel/` (one per distinct image).
    async fn upload(&self, img: &InputImage) -> Result<String, BackendError> {
        let (rb, url) = self.http.request(Method::POST, "/upload/image");
        let name = upload_name(img);
        let part = reqwest::multipart::Part::stream(reqwest::Body::from(img.bytes.clone()))
            .file_name(name.clone())
            .mime_str(img.format.mime())
            .map_err(|e| self.http.error(&url, Failure::InvalidResponse(e.to_string())))?;
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", UPLOAD_SUBFOLDER)
            .text("overwrite", "true");
        let resp = self.http.send(rb.multipart(form), &url).await?;
        let up: Uploaded = self.http.json(resp, &url).await?;
        // The server's answer names the file it really stored (with `overwrite` it keeps ours).
        Ok(if up.subfolder.is_empty() { up.name } else { format!("{}/{}", up.subfolder, up.name) })
    }

    /// Submits the prompt; a 400 becomes a `Rejected` naming each failing node.
    /// `prompt_id` is the id easel chose (jobs); without one the server picks.
    async fn submit(&self, workflow: &Value, client_id: &str, prompt_id: Option<&str>) -> Result<String, BackendError> {
        let (rb, url) = self.http.request(Method::POST, "/prompt");
        let mut body = json!({"prompt": workflow, "client_id": client_id});
        if let Some(id) = prompt_id {
            body["prompt_id"] = json!(id);
        }
        let resp = rb
            .json(&body)
            .send()
            .await
            .map_err(|e| self.http.error(&url, super::client::transport_failure(&e, self.http.cfg.timeout)))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        // A body that stalls or breaks is that failure (a timeout is a timeout), never "no prompt_id".
        let body = self.http.body(resp, &url).await?;
        if status.as_u16() == 400 {
            return Err(self.http.error(&url, Failure::Rejected(describe_prompt_error(&body))));
        }
        if !status.is_success() {
            let message = super::error::upstream_message(&body);
            return Err(self
                .http
                .error(&url, Failure::Status { status: status.as_u16(), message, hint: None, retry_after }));
        }
        let accepted: Accepted = serde_json::from_slice(&body).map_err(|e| {
            self.http.error(&url, Failure::InvalidResponse(format!("`/prompt` answered without a prompt_id: {e}")))
        })?;
        Ok(accepted.prompt_id)
    }

    /// Follows the job on the socket; `None` when the socket went away and polling must take over.
    /// `nodes` is the size of the graph: progress counts the nodes done, and the sampler's steps inside the node
    /// running, so graphs without a sampler (image filters, video assembly) report progress too.
    async fn follow_socket<S>(
        &self,
        socket: &mut S,
        prompt_id: &str,
        nodes: usize,
        progress: &Progress,
    ) -> Option<Ended>
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        let mut graph = GraphProgress::new(nodes);
        while let Some(msg) = socket.next().await {
            let text = match msg {
                Ok(Message::Text(text)) => text,
                Ok(Message::Binary(frame)) => {
                    // Only sockets of this client get its previews; decode nothing unless someone listens.
                    if progress.wants_preview()
                        && let Some((bytes, format)) = preview_frame(&frame)
                    {
                        progress.preview(bytes, format);
                    }
                    continue;
                }
                Ok(_) => continue, // pings
                Err(_) => return None,
            };
            let Ok(event) = serde_json::from_str::<Event>(&text) else { continue };
            if event.data.get("prompt_id").and_then(Value::as_str).is_some_and(|p| p != prompt_id) {
                continue;
            }
            match event.kind.as_str() {
                "progress" => {
                    let (v, max) =
                        (event.data["value"].as_f64().unwrap_or(0.0), event.data["max"].as_f64().unwrap_or(0.0));
                    progress.step(&self.http.cfg.name, v, max);
                    let (done, total) = graph.inside(v, max);
                    progress.overall(done, total);
                    tracing::debug!(backend = %self.http.cfg.name, prompt_id, step = v, of = max, "ComfyUI progress.");
                }
                "executing"
                    if event.data.get("node").is_some_and(Value::is_null) && event.data.get("prompt_id").is_some() =>
                {
                    return Some(Ended::Done);
                }
                "executing" => {
                    if let Some(node) = event.data.get("node").and_then(Value::as_str) {
                        let (done, total) = graph.started(node);
                        progress.overall(done, total);
                        tracing::debug!(backend = %self.http.cfg.name, prompt_id, node, done, of = total, "ComfyUI node started.");
                    }
                }
                "execution_cached" => {
                    let cached = event.data.get("nodes").and_then(Value::as_array);
                    for node in cached.into_iter().flatten().filter_map(Value::as_str) {
                        graph.cached(node);
                    }
                }
                "execution_error" => return Some(Ended::Failed(execution_error(&event.data))),
                "execution_interrupted" => {
                    return Some(Ended::Failed(Failure::JobFailed("ComfyUI interrupted the prompt".into())));
                }
                _ => {}
            }
        }
        None
    }

    /// Polls `/history/{id}` until the prompt has an entry.
    async fn poll_history(&self, prompt_id: &str) -> Result<HistoryEntry, BackendError> {
        loop {
            if let Some(entry) = self.history(prompt_id).await? {
                return Ok(entry);
            }
            tokio::time::sleep(self.http.cfg.poll_interval).await;
        }
    }

    async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, BackendError> {
        let (rb, url) = self.http.request(Method::GET, &format!("/history/{prompt_id}"));
        let resp = self.http.send(rb, &url).await?;
        let mut all: std::collections::HashMap<String, HistoryEntry> = self.http.json(resp, &url).await?;
        Ok(all.remove(prompt_id))
    }

    /// Deletes the prompt if it is still queued, else interrupts it and waits (within the backend timeout) until
    /// ComfyUI has really stopped: its interrupt is cooperative, and the admission slot must stay held until the
    /// GPU is free.
    async fn cancel(&self, prompt_id: &str) {
        let queued = async {
            let (rb, url) = self.http.request(Method::GET, "/queue");
            let q: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
            Ok::<bool, BackendError>(
                q["queue_pending"]
                    .as_array()
                    .is_some_and(|items| items.iter().any(|i| i.get(1).and_then(Value::as_str) == Some(prompt_id))),
            )
        }
        .await
        .unwrap_or(false);
        let (path, body) = if queued {
            ("/queue", json!({"delete": [prompt_id]}))
        } else {
            ("/interrupt", json!({"prompt_id": prompt_id}))
        };
        let (rb, url) = self.http.request(Method::POST, path);
        if let Err(e) = self.http.send(rb.json(&body), &url).await {
            tracing::warn!(backend = %self.http.cfg.name, prompt_id, error = %e, "Cancelling a ComfyUI prompt failed.");
            return;
        }
        if !queued {
            let _ = tokio::time::timeout(self.http.cfg.timeout, self.poll_history(prompt_id)).await;
        }
    }

    async fn download(&self, image: &OutputImage) -> Result<ImageOutput, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/view");
        let rb = rb.query(&[
            ("filename", image.filename.as_str()),
            ("subfolder", image.subfolder.as_str()),
            ("type", image.kind.as_str()),
        ]);
        let resp = self.http.send(rb, &url).await?;
        let bytes = self.http.body(resp, &url).await?;
        image_from_bytes(bytes).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))
    }
}

/// How far a prompt is, from the socket's node events: nodes finished (cached, or run and followed by another),
/// plus the fraction of the running node that its sampler steps tell. Never goes backwards.
#[derive(Debug)]
struct GraphProgress {
    total: usize,
    done: std::collections::HashSet<String>,
    running: Option<String>,
    /// The highest fraction reported so far (0–1).
    shown: f64,
}

impl GraphProgress {
    fn new(total: usize) -> Self {
        Self { total, done: std::collections::HashSet::new(), running: None, shown: 0.0 }
    }

    fn cached(&mut self, node: &str) {
        self.done.insert(node.to_owned());
    }

    /// `node` starts: the one running before it is done. `(done, total)` for [`Progress::overall`].
    fn started(&mut self, node: &str) -> (f64, f64) {
        if let Some(before) = self.running.replace(node.to_owned()) {
            self.done.insert(before);
        }
        self.report(0.0)
    }

    /// A sampler step inside the running node: `value` of `max`.
    fn inside(&mut self, value: f64, max: f64) -> (f64, f64) {
        let inner = if max > 0.0 { (value / max).clamp(0.0, 1.0) } else { 0.0 };
        self.report(inner)
    }

    fn report(&mut self, inner: f64) -> (f64, f64) {
        // A graph easel could not count (or events naming nodes it did not send) still ends below 1.
        let total = self.total.max(self.done.len() + usize::from(self.running.is_some())).max(1) as f64;
        let fraction = ((self.done.len() as f64 + inner) / total).min(1.0);
        self.shown = self.shown.max(fraction);
        (self.shown * total, total)
    }
}

/// A binary socket frame that carries a preview: a big-endian u32 event type (1 = preview image), a big-endian
/// u32 image format (1 = JPEG, 2 = PNG), then the image bytes. Other frames (and broken ones) are `None`.
fn preview_frame(frame: &[u8]) -> Option<(bytes::Bytes, ImageFormat)> {
    let word = |at: usize| frame.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if word(0)? != 1 {
        return None;
    }
    let said = match word(4)? {
        1 => ImageFormat::Jpeg,
        2 => ImageFormat::Png,
        _ => return None,
    };
    let image = frame.get(8..)?;
    // The bytes decide; a frame whose bytes are not the image it announced is skipped.
    let format = crate::media::sniff(image).filter(|f| *f == said)?;
    Some((bytes::Bytes::copy_from_slice(image), format))
}

impl Backend for ComfyUiBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let Some(workflow) = call.model.workflow.as_ref() else {
            return Err(self.http.error("", Failure::Unsupported("run a model without a `workflow`")));
        };
        if let Some((param, message)) = call.edit.and_then(|e| workflow.edit_refusal(&call.model.id, e)) {
            return Err(self.http.error("", Failure::UnusableField { param, message }));
        }
        let (image, mask) = upload_edit_inputs(call.edit, |img| self.upload(img)).await?;
        let seed = call.seed.unwrap_or_else(fresh_seed);
        let vars = WorkflowVars::for_call(&call, seed, call.count, image.as_deref(), mask.as_deref());
        let graph = workflow
            .render(&vars)
            .map_err(|e| self.http.error("", Failure::Config(format!("rendering the workflow: {e}"))))?;

        let client_id = uuid::Uuid::now_v7().to_string();
        // Open the socket before submitting so no event is missed.
        let mut socket = match self.ws_url(&client_id) {
            Some(ws) => {
                match tokio::time::timeout(WS_CONNECT_TIMEOUT, tokio_tungstenite::connect_async(ws.as_str())).await {
                    Ok(Ok((stream, _))) => Some(stream),
                    Ok(Err(e)) => {
                        tracing::info!(backend = %self.http.cfg.name, error = %e, "ComfyUI progress socket refused; polling history.");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let prompt_id = self.submit(&graph, &client_id, None).await?;

        let followed = async {
            let ended = match socket.as_mut() {
                Some(s) => {
                    let nodes = graph.as_object().map_or(0, serde_json::Map::len);
                    self.follow_socket(s, &prompt_id, nodes, call.progress).await
                }
                None => None,
            };
            match ended {
                Some(Ended::Failed(f)) => Err(f),
                Some(Ended::Done) => Ok(()),
                None => {
                    if socket.is_some() {
                        tracing::info!(backend = %self.http.cfg.name, prompt_id = %prompt_id, "ComfyUI progress socket dropped; polling history.");
                    }
                    Ok(())
                }
            }
        };
        let url = self.http.cfg.endpoint("/prompt");
        tokio::select! {
            r = followed => r.map_err(|f| self.http.error(&url, f))?,
            () = call.cancel.cancelled() => {
                self.cancel(&prompt_id).await;
                return Err(self.http.error(&url, Failure::JobFailed(format!("cancelled: the client went away (prompt {prompt_id} deleted or interrupted)"))));
            }
        }
        drop(socket);
        let entry = tokio::select! {
            r = self.poll_history(&prompt_id) => r?,
            () = call.cancel.cancelled() => {
                self.cancel(&prompt_id).await;
                return Err(self.http.error(&url, Failure::JobFailed("cancelled: the client went away".into())));
            }
        };
        if entry.status.as_ref().is_some_and(|s| s.status_str == "error") {
            let failure = entry
                .status
                .as_ref()
                .and_then(|s| s.messages.iter().find(|(k, _)| k == "execution_error").map(|(_, d)| execution_error(d)))
                .unwrap_or_else(|| Failure::JobFailed("the prompt ended in error (interrupted?)".into()));
            return Err(self.http.error(&url, failure));
        }
        let mut nodes: Vec<(&String, &NodeOutput)> = entry.outputs.iter().collect();
        nodes.sort_by_key(|(id, _)| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
        let mut images = Vec::new();
        for (_, out) in nodes {
            for img in &out.images {
                images.push(self.download(img).await?);
            }
        }
        if images.is_empty() {
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse("the workflow produced no images (does it end in SaveImage?)".into()),
            ));
        }
        Ok(images)
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/system_stats");
        let stats: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
        let Some(system) = stats.get("system") else {
            return Err(self
                .http
                .error(&url, Failure::InvalidResponse("`/system_stats` has no `system`: is this ComfyUI?".into())));
        };
        let version = system.get("comfyui_version").and_then(Value::as_str).unwrap_or("unknown version");
        let (rb, url) = self.http.request(Method::GET, "/queue");
        let queue = match self.http.send(rb, &url).await {
            Ok(resp) => self.http.json::<Value>(resp, &url).await.ok(),
            Err(_) => None,
        };
        let count = |k: &str| queue.as_ref().and_then(|q| q[k].as_array().map(Vec::len)).unwrap_or(0);
        Ok(ProbeReport {
            ready: true,
            detail: format!(
                "ComfyUI {version}, queue {} running / {} pending",
                count("queue_running"),
                count("queue_pending")
            ),
        })
    }

    fn supports_edits(&self) -> bool {
        true
    }

    /// Only a workflow that reads `{{ background }}` can paint a transparent background.
    fn supports_transparency_for(&self, model: &crate::config::ModelConfig) -> bool {
        model.workflow.as_ref().is_some_and(|w| w.uses("background"))
    }

    fn supports_videos(&self) -> bool {
        true
    }

    async fn submit_video(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        self.submit_video_job(call).await
    }

    async fn poll_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        self.poll_video_job(handle).await
    }

    async fn fetch_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        self.fetch_video_outputs(handle).await
    }

    async fn cancel_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        self.cancel_video_job(handle).await
    }

    async fn find_job(&self, client_ref: &str) -> Result<JobLookup, BackendError> {
        self.find_video_job(client_ref).await
    }
}

/// `<sha256 hex of the bytes>.<format>`: equal only for identical inputs.
fn upload_name(img: &InputImage) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&img.bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.{}", img.format.as_str())
}

/// `node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: 'x' not in []` for each node error.
fn describe_prompt_error(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return excerpt(&String::from_utf8_lossy(body), 300);
    };
    let mut parts = Vec::new();
    if let Some(nodes) = v.get("node_errors").and_then(Value::as_object) {
        for (id, node) in nodes {
            let class = node.get("class_type").and_then(Value::as_str).unwrap_or("?");
            let errors: Vec<String> = node
                .get("errors")
                .and_then(Value::as_array)
                .map(|errs| {
                    errs.iter()
                        .map(|e| {
                            let msg = e.get("message").and_then(Value::as_str).unwrap_or("invalid");
                            match e.get("details").and_then(Value::as_str) {
                                Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                                _ => msg.to_owned(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            parts.push(format!("node {id} ({class}): {}", errors.join("; ")));
        }
    }
    if parts.is_empty() {
        let e = &v["error"];
        let msg = e.get("message").and_then(Value::as_str).unwrap_or("the workflow was rejected");
        match e.get("details").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => parts.push(format!("{msg} ({d})")),
            _ => parts.push(msg.to_owned()),
        }
    }
    format!("ComfyUI rejected the workflow: {}", parts.join("; "))
}

fn execution_error(d: &Value) -> Failure {
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    Failure::JobFailed(format!(
        "ComfyUI failed at node {} ({}): {}: {}",
        s("node_id"),
        s("node_type"),
        s("exception_type"),
        excerpt(&s("exception_message"), 300)
    ))
}

#[derive(Debug, Deserialize)]
struct Uploaded {
    name: String,
    #[serde(default)]
    subfolder: String,
}

#[derive(Debug, Deserialize)]
struct Accepted {
    prompt_id: String,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

#[derive(Debug, Deserialize)]
struct HistoryEntry {
    #[serde(default)]
    outputs: std::collections::HashMap<String, NodeOutput>,
    status: Option<HistoryStatus>,
}

#[derive(Debug, Deserialize)]
struct HistoryStatus {
    #[serde(default)]
    status_str: String,
    #[serde(default)]
    messages: Vec<(String, Value)>,
}

#[derive(Debug, Deserialize)]
struct NodeOutput {
    #[serde(default)]
    images: Vec<OutputImage>,
    /// `[true]` when `images` are animations or videos (SaveVideo, SaveWEBM, SaveAnimatedWEBP).
    #[serde(default)]
    animated: Vec<bool>,
    /// Video lists of custom nodes (VideoHelperSuite writes `gifs`).
    #[serde(default)]
    gifs: Vec<OutputImage>,
    #[serde(default)]
    videos: Vec<OutputImage>,
}

#[derive(Debug, Deserialize)]
struct OutputImage {
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type", default = "output_type")]
    kind: String,
}

fn output_type() -> String {
    "output".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_events_make_progress_that_never_goes_back() {
        let mut g = GraphProgress::new(4);
        g.cached("1");
        assert_eq!(g.started("2"), (1.0, 4.0));
        assert_eq!(g.inside(5.0, 10.0), (1.5, 4.0));
        assert_eq!(g.started("3"), (2.0, 4.0));
        // A sampler restarting its count inside the same node cannot move progress back.
        assert_eq!(g.inside(0.0, 10.0), (2.0, 4.0));
        assert_eq!(g.started("4"), (3.0, 4.0));
        // Nodes easel did not count (a graph of unknown size) stretch the total instead of passing 1.
        let mut g = GraphProgress::new(0);
        assert_eq!(g.started("a"), (0.0, 1.0));
        let (done, total) = g.started("b");
        assert!(done < total, "{done} of {total}");
    }

    #[test]
    fn describes_validation_and_runtime_failures() {
        let body = br#"{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width", "extra_info": {}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}}"#;
        assert_eq!(
            describe_prompt_error(body),
            "ComfyUI rejected the workflow: node 1 (EmptyImage): Value 0 smaller than min of 1: width"
        );
        let body = br#"{"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#2'", "extra_info": {}}, "node_errors": {}}"#;
        assert!(describe_prompt_error(body).contains("NoSuchNode does not exist. (Node ID '#2')"));
        let f = execution_error(
            &json!({"node_id": "2", "node_type": "ImageToMask", "exception_type": "IndexError", "exception_message": "index 3 is out of bounds"}),
        );
        let Failure::JobFailed(m) = f else { panic!() };
        assert_eq!(m, "ComfyUI failed at node 2 (ImageToMask): IndexError: index 3 is out of bounds");
        let h: HistoryEntry = serde_json::from_value(json!({"prompt": [0, "p", {}, {}, ["3"]], "outputs": {"3": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": true, "messages": [["execution_start", {"prompt_id": "p"}]]}})).unwrap();
        assert_eq!(h.outputs["3"].images[0].filename, "a.png");
    }
}
