//! `fal`: fal.ai's queue API (`https://queue.fal.run`): submit to `/{endpoint_id}`, poll the returned
//! `status_url` (with logs) until `COMPLETED`, read `response_url`, download the output images; `PUT cancel_url`
//! when the client goes away. Auth is `Authorization: Key <api_key>`. The model's `upstream_model` is the
//! endpoint id (`fal-ai/flux/dev`). Edits send the inputs as data URLs (`image_url`, `mask_url`).
//!
//! Videos are jobs on the same queue: the handle keeps the submit's `status_url`, `response_url` and `cancel_url`
//! (never the key); a poll reads `status_url?logs=1` (`IN_QUEUE` + `queue_position`, `IN_PROGRESS`, `COMPLETED`,
//! whose result tells a success from a failure) and the result's `video.url` is downloaded under the outbound
//! policy.
//!
//! Health: fal has no health route, so the probe is reachability of the queue host (any HTTP answer but 401/403).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde::Deserialize;
use serde_json::{Map, json};

use super::client::Http;
use super::jobs::{JobErrorCode, OutputKind, sniff_video};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, JobHandle, JobOutput, JobPoll, JobState, ProbeReport,
    VideoCall, decode_image_b64, image_from_bytes,
};
use crate::config::{BackendConfig, ModelConfig};
use crate::request::ImageFormat;
use crate::telemetry::metrics as m;

pub const KIND: &str = "fal";

#[derive(Debug)]
pub struct FalBackend {
    http: Http,
    /// Log lines already reported per video request id (fal sends the whole log on every status poll).
    logs_seen: Mutex<HashMap<String, usize>>,
}

impl FalBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)?, logs_seen: Mutex::default() })
    }

    /// A URL the handle keeps (`status_url`, `response_url`, `cancel_url`), or an error naming it.
    fn handle_url<'h>(&self, handle: &'h JobHandle, field: &str) -> Result<&'h str, BackendError> {
        handle.meta.get(field).and_then(serde_json::Value::as_str).ok_or_else(|| {
            self.http.error(
                "",
                Failure::InvalidResponse(format!(
                    "the job handle of fal request {} has no `{field}`",
                    handle.upstream_id
                )),
            )
        })
    }

    /// The log lines of this poll not reported before; forgets the request once it ended.
    fn new_logs(&self, request_id: &str, logs: Vec<Log>, ended: bool) -> Vec<String> {
        let Ok(mut seen) = self.logs_seen.lock() else { return Vec::new() };
        let before = seen.get(request_id).copied().unwrap_or(0);
        let total = logs.len();
        let fresh = logs.into_iter().skip(before).map(|l| l.message).collect();
        if ended {
            seen.remove(request_id);
        } else {
            seen.insert(request_id.to_owned(), before.max(total));
        }
        fresh
    }

    /// The result of a finished request: the model output, or why it has none.
    async fn video_result(&self, handle: &JobHandle) -> Result<Result<VideoOutput, JobState>, BackendError> {
        let url = self.handle_url(handle, "response_url")?;
        let rb = self.authed(self.http.request_url(Method::GET, url));
        match self.http.send(rb, url).await {
            Ok(resp) => Ok(Ok(self.http.json::<VideoOutput>(resp, url).await?)),
            Err(e) => match &e.failure {
                Failure::Status { status: 404, .. } => Ok(Err(JobState::Lost)),
                Failure::Status { status: 422, message, .. } => {
                    Ok(Err(JobState::Failed { code: JobErrorCode::UpstreamRejected, message: message.clone() }))
                }
                Failure::Status { status: 400 | 403 | 410, message, .. } => {
                    Ok(Err(JobState::Failed { code: JobErrorCode::UpstreamFailed, message: message.clone() }))
                }
                _ => Err(e),
            },
        }
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let rb = rb.header(ACCEPT, "application/json");
        match &self.http.cfg.api_key {
            Some(k) => rb.header(AUTHORIZATION, format!("Key {}", k.expose())),
            None => rb,
        }
    }

    async fn cancel(&self, url: &str) {
        let rb = self.authed(self.http.request_url(Method::PUT, url));
        if let Err(e) = self.http.send(rb, url).await {
            tracing::warn!(backend = %self.http.cfg.name, error = %e, "Cancelling a fal request failed.");
        }
    }
}

impl Backend for FalBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let req = call.request;
        let mut input = Map::new();
        input.insert("prompt".into(), json!(req.prompt));
        input.insert("image_size".into(), json!({"width": call.size.width, "height": call.size.height}));
        input.insert("num_images".into(), json!(call.count));
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
        // fal models take jpeg or png; webp is transcoded by easel from png.
        let format = if req.output_format == Some(ImageFormat::Jpeg) { "jpeg" } else { "png" };
        input.insert("output_format".into(), json!(format));
        if let Some(edit) = call.edit {
            if let Some(first) = edit.images.first() {
                input.insert("image_url".into(), json!(crate::media::data_url(&first.bytes, first.format)));
            }
            if let Some(mask) = &edit.mask {
                input.insert("mask_url".into(), json!(crate::media::data_url(&mask.bytes, mask.format)));
            }
        }
        crate::request::extra::merge(&mut input, req.extra.as_ref());

        let endpoint = call.model.upstream_model.trim_matches('/');
        let (rb, url) = self.http.request(Method::POST, &format!("/{endpoint}"));
        let resp = self.http.send(self.authed(rb).json(&input), &url).await?;
        let submitted: Submitted = self.http.json(resp, &url).await?;
        tracing::debug!(backend = %self.http.cfg.name, request_id = %submitted.request_id, "Submitted to fal.");

        // Poll until done; cancel upstream if the client goes away.
        let status_url = if submitted.status_url.contains('?') {
            format!("{}&logs=1", submitted.status_url)
        } else {
            format!("{}?logs=1", submitted.status_url)
        };
        let mut seen_logs = 0usize;
        loop {
            let rb = self.authed(self.http.request_url(Method::GET, &status_url));
            let status: Status = tokio::select! {
                r = async { let resp = self.http.send(rb, &status_url).await?; self.http.json::<Status>(resp, &status_url).await } => r?,
                () = call.cancel.cancelled() => {
                    self.cancel(&submitted.cancel_url).await;
                    return Err(self.http.error(&url, Failure::JobFailed("cancelled: the client went away".into())));
                }
            };
            for log in status.logs.iter().skip(seen_logs) {
                tracing::debug!(backend = %self.http.cfg.name, message = %log.message, "fal log.");
                m::job_progress(&self.http.cfg.name, 0.0, 0.0);
            }
            seen_logs = seen_logs.max(status.logs.len());
            match status.status.as_str() {
                "COMPLETED" => break,
                "IN_QUEUE" | "IN_PROGRESS" => {}
                "FAILED" | "CANCELED" | "CANCELLED" | "ERROR" => {
                    return Err(self
                        .http
                        .error(&status_url, Failure::JobFailed(format!("the fal request ended {}", status.status))));
                }
                other => {
                    tracing::debug!(backend = %self.http.cfg.name, status = %other, "Unknown fal status; still waiting.")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.http.cfg.poll_interval) => {}
                () = call.cancel.cancelled() => {
                    self.cancel(&submitted.cancel_url).await;
                    return Err(self.http.error(&url, Failure::JobFailed("cancelled: the client went away".into())));
                }
            }
        }

        let rb = self.authed(self.http.request_url(Method::GET, &submitted.response_url));
        let resp = self.http.send(rb, &submitted.response_url).await?;
        let output: Output = self.http.json(resp, &submitted.response_url).await?;
        let mut images = Vec::with_capacity(output.images.len());
        for (i, img) in output.images.iter().enumerate() {
            if output.has_nsfw_concepts.get(i).copied().unwrap_or(false) {
                tracing::warn!(backend = %self.http.cfg.name, index = i, "fal's safety checker flagged an image; dropped.");
                continue;
            }
            let out = if img.url.starts_with("data:") {
                decode_image_b64(&img.url)
                    .map_err(|e| self.http.error(&submitted.response_url, Failure::InvalidResponse(e)))?
            } else {
                let (bytes, _) = self.http.download(&img.url).await?;
                image_from_bytes(bytes).map_err(|e| self.http.error(&img.url, Failure::InvalidResponse(e)))?
            };
            images.push(out);
        }
        if images.is_empty() && !output.images.is_empty() {
            return Err(self
                .http
                .error(&submitted.response_url, Failure::Rejected("fal's safety checker flagged every image".into())));
        }
        Ok(images)
    }

    fn supports_videos(&self) -> bool {
        true
    }

    async fn submit_video(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        let req = call.request;
        // Video models on fal (Kling, Wan, Veo) take the clip length as a string of seconds.
        let input = super::jobs::video_input(req, json!(req.seconds.to_string()), "image_url");

        let endpoint = call.model.upstream_model.trim_matches('/');
        let (mut rb, url) = self.http.request(Method::POST, &format!("/{endpoint}"));
        if let Some(hook) = call.webhook {
            rb = rb.query(&[("fal_webhook", hook)]);
        }
        let resp = self.http.send(self.authed(rb).json(&input), &url).await?;
        let s: Submitted = self.http.json(resp, &url).await?;
        tracing::debug!(backend = %self.http.cfg.name, request_id = %s.request_id, "Submitted a video to fal.");
        Ok(JobHandle {
            upstream_id: s.request_id.clone(),
            meta: json!({
                "endpoint_id": endpoint,
                "request_id": s.request_id,
                "status_url": s.status_url,
                "response_url": s.response_url,
                "cancel_url": s.cancel_url,
            }),
        })
    }

    fn job_from_webhook(&self, model: &ModelConfig, body: &[u8]) -> Option<JobHandle> {
        #[derive(Deserialize)]
        struct Hook {
            request_id: String,
        }
        let hook: Hook = serde_json::from_slice(body).ok()?;
        if !super::jobs::plausible_upstream_id(&hook.request_id) {
            return None;
        }
        // Status, result and cancel live under the endpoint's `owner/alias` only (fal's queue drops the sub-path).
        let endpoint = model.upstream_model.trim_matches('/');
        let app: Vec<&str> = endpoint.split('/').take(2).collect();
        let root = self.http.cfg.endpoint(&format!("/{}/requests/{}", app.join("/"), hook.request_id));
        Some(JobHandle {
            upstream_id: hook.request_id.clone(),
            meta: json!({
                "endpoint_id": endpoint,
                "request_id": hook.request_id,
                "status_url": format!("{root}/status"),
                "response_url": root,
                "cancel_url": format!("{root}/cancel"),
            }),
        })
    }

    async fn poll_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        let status_url = self.handle_url(handle, "status_url")?;
        let url =
            if status_url.contains('?') { format!("{status_url}&logs=1") } else { format!("{status_url}?logs=1") };
        let rb = self.authed(self.http.request_url(Method::GET, &url));
        let resp = match self.http.send(rb, &url).await {
            Ok(r) => r,
            Err(e) if matches!(e.failure, Failure::Status { status: 404, .. }) => {
                self.new_logs(&handle.upstream_id, Vec::new(), true);
                return Ok(JobPoll { state: JobState::Lost, logs: Vec::new() });
            }
            Err(e) => return Err(e),
        };
        let status: Status = self.http.json(resp, &url).await?;
        let state = match status.status.as_str() {
            "IN_QUEUE" => JobState::Queued { position: status.queue_position },
            "IN_PROGRESS" => JobState::Running { progress: None },
            "COMPLETED" => match status.error {
                Some(message) => JobState::Failed { code: JobErrorCode::UpstreamFailed, message },
                // A request that failed is COMPLETED too; its result says so.
                None => match self.video_result(handle).await? {
                    Ok(out) if out.video.is_some() => JobState::Succeeded,
                    Ok(_) => JobState::Failed {
                        code: JobErrorCode::UpstreamFailed,
                        message: "the fal result has no `video`".into(),
                    },
                    Err(state) => state,
                },
            },
            "FAILED" | "ERROR" => JobState::Failed {
                code: JobErrorCode::UpstreamFailed,
                message: status.error.unwrap_or_else(|| format!("the fal request ended {}", status.status)),
            },
            "CANCELED" | "CANCELLED" => JobState::Failed {
                code: JobErrorCode::Canceled,
                message: format!("fal request {} was cancelled", handle.upstream_id),
            },
            other => {
                tracing::info!(backend = %self.http.cfg.name, status = %other, "Unknown fal status; taken as still running.");
                JobState::Running { progress: None }
            }
        };
        let ended = matches!(state, JobState::Succeeded | JobState::Failed { .. } | JobState::Lost);
        let logs = self.new_logs(&handle.upstream_id, status.logs, ended);
        Ok(JobPoll { state, logs })
    }

    async fn fetch_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        let response_url = self.handle_url(handle, "response_url")?.to_owned();
        let out = match self.video_result(handle).await? {
            Ok(out) => out,
            Err(state) => {
                return Err(self.http.error(
                    &response_url,
                    Failure::JobFailed(format!("fal request {} has no result: {state:?}", handle.upstream_id)),
                ));
            }
        };
        let Some(video) = out.video else {
            return Err(self
                .http
                .error(&response_url, Failure::InvalidResponse("the fal result has no `video`".into())));
        };
        let (bytes, mime) = if video.url.starts_with("data:") {
            let bytes = crate::media::decode_base64(&video.url)
                .map_err(|e| self.http.error(&response_url, Failure::InvalidResponse(e)))?;
            let mime = sniff_video(&bytes).ok_or_else(|| {
                self.http.error(&response_url, Failure::InvalidResponse("the video data URL is not a video".into()))
            })?;
            (bytes, mime)
        } else {
            self.http.download_as(&video.url, sniff_video, "an MP4, WebM or GIF video").await?
        };
        Ok(vec![JobOutput { kind: OutputKind::Video, bytes, mime }])
    }

    async fn cancel_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        let url = self.handle_url(handle, "cancel_url")?;
        let rb = self.authed(self.http.request_url(Method::PUT, url));
        match self.http.send(rb, url).await {
            Ok(_) => Ok(()),
            // Already finished or gone: nothing left to cancel.
            Err(e) if matches!(e.failure, Failure::Status { status: 400 | 404 | 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/");
        match self.http.send(self.authed(rb), &url).await {
            Ok(_) => Ok(ProbeReport { ready: true, detail: "fal queue reachable".into() }),
            Err(e) => match &e.failure {
                Failure::Status { status: 401 | 403, .. } => Err(e),
                Failure::Status { status, .. } => {
                    Ok(ProbeReport { ready: true, detail: format!("fal queue reachable (HTTP {status} on the root)") })
                }
                _ => Err(e),
            },
        }
    }

    fn supports_edits(&self) -> bool {
        true
    }
}

#[derive(Debug, Deserialize)]
struct Submitted {
    request_id: String,
    status_url: String,
    response_url: String,
    cancel_url: String,
}

#[derive(Debug, Deserialize)]
struct Status {
    status: String,
    #[serde(default)]
    logs: Vec<Log>,
    #[serde(default)]
    queue_position: Option<u32>,
    /// Set (newer API) when a request ended in an error.
    #[serde(default)]
    error: Option<String>,
}

/// A video model's result: `{"video": {"url", "content_type", ...}, "seed"?}`.
#[derive(Debug, Deserialize)]
struct VideoOutput {
    #[serde(default)]
    video: Option<OutputImage>,
}

#[derive(Debug, Deserialize)]
struct Log {
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct Output {
    #[serde(default)]
    images: Vec<OutputImage>,
    #[serde(default)]
    has_nsfw_concepts: Vec<bool>,
}

#[derive(Debug, Deserialize)]
struct OutputImage {
    url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recorded_fal_bodies() {
        let s: Submitted = serde_json::from_value(json!({"request_id": "r1", "response_url": "https://q/fal-ai/flux/requests/r1", "status_url": "https://q/fal-ai/flux/requests/r1/status", "cancel_url": "https://q/fal-ai/flux/requests/r1/cancel", "queue_position": 0})).unwrap();
        assert_eq!(s.request_id, "r1");
        let st: Status = serde_json::from_value(
            json!({"status": "IN_PROGRESS", "logs": [{"message": "step 1", "level": "INFO", "timestamp": "t"}]}),
        )
        .unwrap();
        assert_eq!(st.logs.len(), 1);
        let o: Output = serde_json::from_value(json!({"images": [{"url": "https://v3.fal.media/x.png", "content_type": "image/png", "width": 8, "height": 8}], "seed": 5, "has_nsfw_concepts": [false], "prompt": "p"})).unwrap();
        assert_eq!(o.images[0].url, "https://v3.fal.media/x.png");
    }
}
