//! `replicate`: Replicate's predictions API (`https://api.replicate.com`). `upstream_model` is `owner/name`
//! (`POST /v1/models/{owner}/{name}/predictions`) or `owner/name:version` (`POST /v1/predictions` with
//! `version`). easel asks `Prefer: wait` (up to 60 s), then polls `urls.get`; `POST urls.cancel` when the client
//! goes away. Outputs (a URL, a list of URLs, or data URIs) are downloaded. Edits send data URIs (`image`, `mask`).
//!
//! Videos are predictions created without `Prefer: wait`; the handle keeps the id and `urls.get`/`urls.cancel`,
//! progress comes from the progress bar in the prediction's `logs`, and the output URL is downloaded.
//!
//! Health: `GET /v1/account` with the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::Http;
use super::jobs::{JobErrorCode, OutputKind, sniff_video};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, JobHandle, JobOutput, JobPoll, JobState, ProbeReport,
    VideoCall, decode_image_b64, image_from_bytes,
};
use crate::config::{BackendConfig, ModelConfig};
use crate::request::ImageFormat;

pub const KIND: &str = "replicate";

/// Replicate holds a `Prefer: wait` request at most this long.
const MAX_WAIT_SECS: u64 = 60;

#[derive(Debug)]
pub struct ReplicateBackend {
    http: Http,
    /// Bytes of each video prediction's `logs` already reported (Replicate sends the whole log every time).
    logs_seen: Mutex<HashMap<String, usize>>,
}

impl ReplicateBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)?, logs_seen: Mutex::default() })
    }

    /// The prediction's URL the handle keeps (`get`, `cancel`), or the API's own path for it.
    fn handle_url(&self, handle: &JobHandle, field: &str) -> String {
        match handle.meta.get(field).and_then(Value::as_str) {
            Some(u) => u.to_owned(),
            None => {
                let id = &handle.upstream_id;
                let path = if field == "cancel" {
                    format!("/v1/predictions/{id}/cancel")
                } else {
                    format!("/v1/predictions/{id}")
                };
                self.http.cfg.endpoint(&path)
            }
        }
    }

    /// Reads the prediction a handle names; `None` when Replicate does not know it (404).
    async fn get_prediction(&self, handle: &JobHandle) -> Result<Option<Prediction>, BackendError> {
        let url = self.handle_url(handle, "get");
        let rb = self.http.bearer(self.http.request_url(Method::GET, &url));
        match self.http.send(rb, &url).await {
            Ok(resp) => Ok(Some(self.http.json(resp, &url).await?)),
            Err(e) if matches!(e.failure, Failure::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The lines of `logs` not reported before; forgets the prediction once it ended.
    fn new_logs(&self, id: &str, logs: &str, ended: bool) -> Vec<String> {
        let Ok(mut seen) = self.logs_seen.lock() else { return Vec::new() };
        let before = seen.get(id).copied().unwrap_or(0);
        // A log that shrank (should not happen) is read again from the start.
        let fresh = logs.get(before..).unwrap_or(logs);
        let lines = fresh.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
        if ended {
            seen.remove(id);
        } else {
            seen.insert(id.to_owned(), logs.len());
        }
        lines
    }

    async fn cancel(&self, p: &Prediction) {
        let Some(url) = p.urls.cancel.as_deref() else { return };
        let rb = self.http.bearer(self.http.request_url(Method::POST, url));
        if let Err(e) = self.http.send(rb, url).await {
            tracing::warn!(backend = %self.http.cfg.name, error = %e, "Cancelling a Replicate prediction failed.");
        }
    }

    fn cancelled(&self, url: &str) -> BackendError {
        self.http.error(url, Failure::JobFailed("cancelled: the client went away".into()))
    }
}

impl Backend for ReplicateBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let req = call.request;
        let mut input = Map::new();
        input.insert("prompt".into(), json!(req.prompt));
        input.insert("width".into(), json!(call.size.width));
        input.insert("height".into(), json!(call.size.height));
        input.insert("num_outputs".into(), json!(call.count));
        if let Some(seed) = call.seed {
            input.insert("seed".into(), json!(seed));
        }
        if let Some(steps) = req.steps {
            input.insert("num_inference_steps".into(), json!(steps));
        }
        if let Some(g) = req.guidance_scale {
            input.insert("guidance_scale".into(), json!(g));
        }
        if let Some(n) = &req.negative_prompt {
            input.insert("negative_prompt".into(), json!(n));
        }
        if let Some(f) = req.output_format {
            input.insert("output_format".into(), json!(if f == ImageFormat::Jpeg { "jpg" } else { f.as_str() }));
        }
        if let Some(edit) = call.edit {
            if let Some(first) = edit.images.first() {
                input.insert("image".into(), json!(crate::media::data_url(&first.bytes, first.format)));
            }
            if let Some(mask) = &edit.mask {
                input.insert("mask".into(), json!(crate::media::data_url(&mask.bytes, mask.format)));
            }
        }
        crate::request::extra::merge(&mut input, req.extra.as_ref());

        let model = call.model.upstream_model.as_str();
        let (path, body) = match model.split_once(':') {
            Some((_, version)) => ("/v1/predictions".to_owned(), json!({"version": version, "input": input})),
            None => (format!("/v1/models/{}/predictions", model.trim_matches('/')), json!({"input": input})),
        };
        let wait = self.http.cfg.timeout.as_secs().clamp(1, MAX_WAIT_SECS);
        let (rb, url) = self.http.request(Method::POST, &path);
        let rb = self.http.bearer(rb).header("Prefer", format!("wait={wait}")).json(&body);
        let resp = tokio::select! {
            r = self.http.send(rb, &url) => r?,
            () = call.cancel.cancelled() => return Err(self.cancelled(&url)),
        };
        let mut prediction: Prediction = self.http.json(resp, &url).await?;

        while !prediction.done() {
            let Some(get) = prediction.urls.get.clone() else {
                return Err(self
                    .http
                    .error(&url, Failure::InvalidResponse("the prediction has no `urls.get` to poll".into())));
            };
            tokio::select! {
                () = tokio::time::sleep(self.http.cfg.poll_interval) => {}
                () = call.cancel.cancelled() => {
                    self.cancel(&prediction).await;
                    return Err(self.cancelled(&get));
                }
            }
            let rb = self.http.bearer(self.http.request_url(Method::GET, &get));
            let resp = self.http.send(rb, &get).await?;
            prediction = self.http.json(resp, &get).await?;
        }

        match prediction.status.as_str() {
            "failed" => {
                let error = prediction.error.clone().unwrap_or_else(|| "no error text".into());
                let failure = if error.to_ascii_lowercase().contains("nsfw") {
                    Failure::Rejected(format!("prediction {} failed: {error}", prediction.id))
                } else {
                    Failure::JobFailed(format!("prediction {} failed: {error}", prediction.id))
                };
                return Err(self.http.error(&url, failure));
            }
            "canceled" | "aborted" => {
                return Err(self.http.error(
                    &url,
                    Failure::JobFailed(format!("prediction {} was {}", prediction.id, prediction.status)),
                ));
            }
            _ => {}
        }
        let urls = output_urls(prediction.output.as_ref());
        if urls.is_empty() {
            return Err(self
                .http
                .error(&url, Failure::InvalidResponse(format!("prediction {} has no image output", prediction.id))));
        }
        let mut images = Vec::with_capacity(urls.len());
        for u in urls {
            let out = if u.starts_with("data:") {
                decode_image_b64(&u).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?
            } else {
                let (bytes, _) = self.http.download(&u).await?;
                image_from_bytes(bytes).map_err(|e| self.http.error(&u, Failure::InvalidResponse(e)))?
            };
            images.push(out);
        }
        Ok(images)
    }

    fn supports_videos(&self) -> bool {
        true
    }

    async fn submit_video(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        let req = call.request;
        let input = super::jobs::video_input(req, json!(req.seconds), "start_image");

        let model = call.model.upstream_model.as_str();
        let (path, mut body) = match model.split_once(':') {
            Some((_, version)) => ("/v1/predictions".to_owned(), json!({"version": version, "input": input})),
            None => (format!("/v1/models/{}/predictions", model.trim_matches('/')), json!({"input": input})),
        };
        if let Some(hook) = call.webhook {
            body["webhook"] = json!(hook);
            body["webhook_events_filter"] = json!(["completed"]);
        }
        // No `Prefer: wait`: a video takes minutes; the job is polled.
        let (rb, url) = self.http.request(Method::POST, &path);
        let resp = self.http.send(self.http.bearer(rb).json(&body), &url).await?;
        let p: Prediction = self.http.json(resp, &url).await?;
        if p.id.is_empty() {
            return Err(self.http.error(&url, Failure::InvalidResponse("the prediction has no `id`".into())));
        }
        tracing::debug!(backend = %self.http.cfg.name, prediction = %p.id, "Submitted a video to Replicate.");
        Ok(JobHandle { upstream_id: p.id.clone(), meta: json!({"get": p.urls.get, "cancel": p.urls.cancel}) })
    }

    fn job_from_webhook(&self, _model: &ModelConfig, body: &[u8]) -> Option<JobHandle> {
        #[derive(Deserialize)]
        struct Hook {
            id: String,
        }
        let hook: Hook = serde_json::from_slice(body).ok()?;
        // Its URLs are built from the configured `url` (an empty meta), never taken from the body.
        super::jobs::plausible_upstream_id(&hook.id)
            .then(|| JobHandle { upstream_id: hook.id, meta: Value::Object(Map::new()) })
    }

    async fn poll_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        let Some(p) = self.get_prediction(handle).await? else {
            self.new_logs(&handle.upstream_id, "", true);
            return Ok(JobPoll { state: JobState::Lost, logs: Vec::new() });
        };
        let log_text = p.logs.clone().unwrap_or_default();
        let state = match p.status.as_str() {
            "starting" => JobState::Queued { position: None },
            "processing" if p.done() => JobState::Succeeded,
            "processing" => JobState::Running { progress: progress(&log_text) },
            "succeeded" => JobState::Succeeded,
            "failed" => {
                let message = p.error.clone().unwrap_or_else(|| "no error text".into());
                let code = if message.to_ascii_lowercase().contains("nsfw") {
                    JobErrorCode::UpstreamRejected
                } else {
                    JobErrorCode::UpstreamFailed
                };
                JobState::Failed { code, message }
            }
            "canceled" | "aborted" => JobState::Failed {
                code: JobErrorCode::Canceled,
                message: format!("prediction {} was {}", p.id, p.status),
            },
            other => {
                tracing::info!(backend = %self.http.cfg.name, status = %other, "Unknown Replicate status; taken as still running.");
                JobState::Running { progress: progress(&log_text) }
            }
        };
        let ended = matches!(state, JobState::Succeeded | JobState::Failed { .. });
        let logs = self.new_logs(&handle.upstream_id, &log_text, ended);
        Ok(JobPoll { state, logs })
    }

    async fn fetch_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        let url = self.handle_url(handle, "get");
        let Some(p) = self.get_prediction(handle).await? else {
            return Err(self.http.error(
                &url,
                Failure::JobFailed(format!("prediction {} is no longer known to Replicate", handle.upstream_id)),
            ));
        };
        let urls = output_urls(p.output.as_ref());
        if urls.is_empty() {
            return Err(self
                .http
                .error(&url, Failure::InvalidResponse(format!("prediction {} has no video output", p.id))));
        }
        let mut outputs = Vec::with_capacity(urls.len());
        for u in urls {
            let (bytes, mime) = if u.starts_with("data:") {
                let bytes =
                    crate::media::decode_base64(&u).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?;
                let mime = sniff_video(&bytes).ok_or_else(|| {
                    self.http.error(&url, Failure::InvalidResponse("the output data URL is not a video".into()))
                })?;
                (bytes, mime)
            } else {
                self.http.download_as(&u, sniff_video, "an MP4, WebM or GIF video").await?
            };
            outputs.push(JobOutput { kind: OutputKind::Video, bytes, mime });
        }
        Ok(outputs)
    }

    async fn cancel_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        let url = self.handle_url(handle, "cancel");
        let rb = self.http.bearer(self.http.request_url(Method::POST, &url));
        match self.http.send(rb, &url).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.failure, Failure::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/v1/account");
        let resp = self.http.send(self.http.bearer(rb), &url).await?;
        let account: Value = self.http.json(resp, &url).await?;
        let who = account.get("username").and_then(Value::as_str).unwrap_or("unknown");
        Ok(ProbeReport { ready: true, detail: format!("Replicate account {who}") })
    }

    fn supports_edits(&self) -> bool {
        true
    }
}

#[derive(Debug, Deserialize)]
struct Prediction {
    #[serde(default)]
    id: String,
    status: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    urls: Urls,
    #[serde(default)]
    logs: Option<String>,
}

/// A prediction's `output`: one URL, or a list of them (other shapes hold none).
fn output_urls(output: Option<&Value>) -> Vec<String> {
    match output {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// Progress from the last progress bar in a prediction's logs (`" 45%|████▌     | 9/20 [...]"`), 0.0–1.0.
fn progress(logs: &str) -> Option<f64> {
    logs.lines().rev().find_map(|line| {
        let (head, _) = line.split_once("%|")?;
        let digits: String = head.chars().rev().take_while(char::is_ascii_digit).collect();
        let percent: f64 = digits.chars().rev().collect::<String>().parse().ok()?;
        (percent <= 100.0).then_some(percent / 100.0)
    })
}

impl Prediction {
    /// Terminal, or (files models) output present with no error while still `processing`.
    fn done(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "canceled" | "aborted")
            || (self.status == "processing"
                && self.error.is_none()
                && self.output.as_ref().is_some_and(|o| !o.is_null() && o.as_array().is_none_or(|a| !a.is_empty())))
    }
}

#[derive(Debug, Default, Deserialize)]
struct Urls {
    get: Option<String>,
    cancel: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_when_a_prediction_is_done() {
        let p = |v: Value| serde_json::from_value::<Prediction>(v).unwrap();
        assert!(!p(json!({"id": "a", "status": "starting", "output": null, "urls": {"get": "g"}})).done());
        assert!(p(json!({"id": "a", "status": "succeeded", "output": "https://x/y.png"})).done());
        assert!(p(json!({"id": "a", "status": "processing", "output": ["https://x/y.png"], "error": null})).done());
        assert!(!p(json!({"id": "a", "status": "processing", "output": []})).done());
        assert!(p(json!({"id": "a", "status": "failed", "error": "NSFW content detected"})).done());
    }

    #[test]
    fn reads_progress_bars_from_logs() {
        assert_eq!(progress("loading\n 10%|#         | 2/20\n 45%|####5     | 9/20 [00:04<00:05]\n"), Some(0.45));
        assert_eq!(progress("no bar here"), None);
    }
}
