//! `openai`: any server that speaks OpenAI's Images API (OpenAI itself, LocalAI, stable-diffusion.cpp's server,
//! InvokeAI shims): `POST {url}/v1/images/generations` (JSON) and `POST {url}/v1/images/edits` (multipart).
//! Answers may carry `b64_json` or `url` items; URLs are downloaded with the backend's timeout and size cap.
//! `response_format` is sent only to servers that take it (not to GPT image models, which always answer base64).
//!
//! Videos pass through the Videos API: `POST /v1/videos` (JSON, `seconds` as a string), `GET /v1/videos/{id}`,
//! `GET /v1/videos/{id}/content` (and `?variant=thumbnail`), `DELETE /v1/videos/{id}` (finished jobs only).
//!
//! Health: `GET {url}/v1/models` with the key (an OpenAI-compatible server answers `{"object": "list"}`).

use std::borrow::Cow;
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::Http;
use super::jobs::{JobErrorCode, OutputKind, sniff_video};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, JobHandle, JobOutput, JobPoll, JobState, ProbeReport,
    Reported, TokenUsage, VideoCall, image_from_b64_in, image_from_bytes,
};
use crate::config::BackendConfig;

pub const KIND: &str = "openai";

#[derive(Debug)]
pub struct OpenAiBackend {
    http: Http,
}

impl OpenAiBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    /// The backend's HTTP client (the text passthrough in `openai_text.rs` sends through it).
    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    /// Turns the upstream's `data[]` into images, downloading URL items. Base64 stays a validated slice of the
    /// response buffer (borrowed, neither copied nor decoded).
    async fn collect(&self, url: &str, raw: bytes::Bytes) -> Result<Vec<ImageOutput>, BackendError> {
        let body: ImagesBody<'_> = serde_json::from_slice(&raw).map_err(|e| {
            self.http.error(url, Failure::InvalidResponse(format!("the JSON body does not match the protocol: {e}")))
        })?;
        let usage = body.usage.as_ref().and_then(usage);
        let told = usage.is_some() || body.quality.is_some() || body.background.is_some();
        let mut images = Vec::with_capacity(body.data.len());
        for (i, item) in body.data.into_iter().enumerate() {
            let mut out = match (item.b64_json, item.url) {
                (Some(b64), _) => {
                    image_from_b64_in(&raw, &b64).map_err(|e| self.http.error(url, Failure::InvalidResponse(e)))?
                }
                (None, Some(u)) if u.starts_with("data:") => {
                    image_from_b64_in(&raw, &u).map_err(|e| self.http.error(url, Failure::InvalidResponse(e)))?
                }
                (None, Some(u)) => {
                    let (bytes, _) = self.http.download(&u).await?;
                    image_from_bytes(bytes).map_err(|e| self.http.error(&u, Failure::InvalidResponse(e)))?
                }
                (None, None) => {
                    return Err(self.http.error(
                        url,
                        Failure::InvalidResponse("a `data` item has neither `b64_json` nor `url`".into()),
                    ));
                }
            };
            out.revised_prompt = item.revised_prompt.map(|t| t.0.into_owned());
            if told {
                out.reported = Some(Box::new(Reported {
                    usage: if i == 0 { usage } else { None },
                    quality: body.quality.clone(),
                    background: body.background.clone(),
                }));
            }
            images.push(out);
        }
        Ok(images)
    }
}

/// Token usage from an upstream's `usage`, when it names input and output tokens (else none: never guessed).
fn usage(v: &Value) -> Option<TokenUsage> {
    let (input, output) = (v.get("input_tokens")?.as_u64()?, v.get("output_tokens")?.as_u64()?);
    let total = v.get("total_tokens").and_then(Value::as_u64).unwrap_or(input + output);
    Some(TokenUsage { input_tokens: input, output_tokens: output, total_tokens: total })
}

/// The Videos API path of a job, refusing an id that is not one (it goes into a URL path).
fn video_path(handle: &JobHandle, tail: &str) -> Result<String, String> {
    let id = handle.upstream_id.as_str();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("`{id}` is not an OpenAI video id"));
    }
    Ok(format!("/v1/videos/{id}{tail}"))
}

/// The part of a Videos API job object easel reads.
#[derive(Debug, Deserialize)]
struct VideoJob {
    id: String,
    status: String,
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    error: Option<VideoError>,
}

#[derive(Debug, Deserialize)]
struct VideoError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl OpenAiBackend {
    /// A Videos API call on a job, with the key; `Ok(None)` when the server does not know the job (404).
    async fn video_call(
        &self,
        method: Method,
        handle: &JobHandle,
        tail: &str,
    ) -> Result<Option<(reqwest::Response, String)>, BackendError> {
        let path = video_path(handle, tail).map_err(|e| self.http.error("", Failure::InvalidResponse(e)))?;
        let (rb, url) = self.http.request(method, &path);
        match self.http.send(self.http.bearer(rb), &url).await {
            Ok(resp) => Ok(Some((resp, url))),
            Err(e) if matches!(e.failure, Failure::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// GPT image models always answer base64 and reject `response_format`; dall-e and other servers take it.
fn takes_response_format(model: &str) -> bool {
    !(model.starts_with("gpt-image") || model.starts_with("chatgpt-image"))
}

/// The OpenAI fields a request set, as the upstream body (easel's own extensions are not OpenAI's).
fn common_fields(call: &ImageCall<'_>) -> Map<String, Value> {
    let req = call.request;
    let model = call.model.upstream_model.as_str();
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("prompt".into(), json!(req.prompt));
    body.insert("n".into(), json!(call.count));
    body.insert("size".into(), json!(call.size.to_string()));
    if takes_response_format(model) {
        body.insert("response_format".into(), json!("b64_json"));
    }
    for (key, value) in [
        ("quality", req.quality.as_deref()),
        ("style", req.style.as_deref()),
        ("background", req.background.as_deref()),
        ("moderation", req.moderation.as_deref()),
        ("user", req.user.as_deref()),
        ("output_format", req.output_format.map(|f| f.as_str())),
    ] {
        if let Some(v) = value {
            body.insert(key.into(), json!(v));
        }
    }
    if let Some(c) = req.output_compression {
        body.insert("output_compression".into(), json!(c));
    }
    crate::request::extra::merge(&mut body, req.extra.as_ref());
    body
}

impl Backend for OpenAiBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let body = common_fields(&call);
        let (path, rb) = match call.edit {
            None => {
                let (rb, url) = self.http.request(Method::POST, "/v1/images/generations");
                (url, rb.json(&body))
            }
            Some(edit) => {
                let (rb, url) = self.http.request(Method::POST, "/v1/images/edits");
                let mut form = reqwest::multipart::Form::new();
                for (k, v) in &body {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    form = form.text(k.clone(), text);
                }
                let field = if edit.images.len() > 1 { "image[]" } else { "image" };
                for img in &edit.images {
                    let part = reqwest::multipart::Part::stream(reqwest::Body::from(img.bytes.clone()))
                        .file_name(img.name.clone())
                        .mime_str(img.format.mime())
                        .map_err(|e| self.http.error(&url, Failure::InvalidResponse(e.to_string())))?;
                    form = form.part(field, part);
                }
                if let Some(mask) = &edit.mask {
                    let part = reqwest::multipart::Part::stream(reqwest::Body::from(mask.bytes.clone()))
                        .file_name(mask.name.clone())
                        .mime_str(mask.format.mime())
                        .map_err(|e| self.http.error(&url, Failure::InvalidResponse(e.to_string())))?;
                    form = form.part("mask", part);
                }
                (url, rb.multipart(form))
            }
        };
        let resp = self.http.send(self.http.bearer(rb), &path).await?;
        let raw = self.http.body(resp, &path).await?;
        self.collect(&path, raw).await
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/v1/models");
        let resp = match self.http.send(self.http.bearer(rb), &url).await {
            // Image-only shims serve no model list: the server answered, so it is up.
            Err(e) if matches!(e.failure, Failure::Status { status: 404, .. }) => {
                return Ok(ProbeReport {
                    ready: true,
                    detail: "OpenAI-compatible server, reachable (no model list at /v1/models)".into(),
                });
            }
            r => r?,
        };
        let list: Value = self.http.json(resp, &url).await?;
        if list.get("object").and_then(Value::as_str) != Some("list") {
            return Err(self
                .http
                .error(&url, Failure::InvalidResponse("`/v1/models` did not answer an OpenAI model list".into())));
        }
        let n = list.get("data").and_then(Value::as_array).map_or(0, Vec::len);
        Ok(ProbeReport { ready: true, detail: format!("OpenAI-compatible server, {n} models listed") })
    }

    fn supports_edits(&self) -> bool {
        true
    }

    /// `background` is passed on; the upstream model decides (and refuses it itself when it cannot).
    fn supports_transparency_for(&self, _model: &crate::config::ModelConfig) -> bool {
        true
    }

    fn supports_videos(&self) -> bool {
        true
    }

    async fn submit_video(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        let req = call.request;
        let mut body = Map::new();
        body.insert("model".into(), json!(call.model.upstream_model));
        body.insert("prompt".into(), json!(req.prompt));
        // The Videos API takes `seconds` as a string ("4", "8", "12").
        body.insert("seconds".into(), json!(req.seconds.to_string()));
        if let Some(size) = req.size {
            body.insert("size".into(), json!(size.to_string()));
        }
        if let Some(r) = &req.reference {
            body.insert("input_reference".into(), json!({"image_url": crate::media::data_url(&r.bytes, r.format)}));
        }
        crate::request::extra::merge(&mut body, req.extra.as_ref());
        let (rb, url) = self.http.request(Method::POST, "/v1/videos");
        let resp = self.http.send(self.http.bearer(rb).json(&body), &url).await?;
        let job: VideoJob = self.http.json(resp, &url).await?;
        tracing::debug!(backend = %self.http.cfg.name, video = %job.id, status = %job.status, "Submitted a video.");
        let handle = JobHandle { upstream_id: job.id, meta: json!({}) };
        video_path(&handle, "").map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?;
        Ok(handle)
    }

    async fn poll_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        let Some((resp, url)) = self.video_call(Method::GET, handle, "").await? else {
            return Ok(JobPoll { state: JobState::Lost, logs: Vec::new() });
        };
        let job: VideoJob = self.http.json(resp, &url).await?;
        let progress = job.progress.filter(|p| p.is_finite()).map(|p| (p / 100.0).clamp(0.0, 1.0));
        let state = match job.status.as_str() {
            "queued" => JobState::Queued { position: None },
            "in_progress" => JobState::Running { progress },
            "completed" => JobState::Succeeded,
            "failed" => {
                let (code, message) = match job.error {
                    Some(e) => (e.code, e.message),
                    None => (None, None),
                };
                let rejected = code.as_deref().is_some_and(|c| c.contains("moderation") || c.contains("policy"));
                let message = match (code, message) {
                    (Some(c), Some(m)) => format!("{m} ({c})"),
                    (None, Some(m)) => m,
                    (Some(c), None) => c,
                    (None, None) => format!("video {} failed with no error text", job.id),
                };
                let code = if rejected { JobErrorCode::UpstreamRejected } else { JobErrorCode::UpstreamFailed };
                JobState::Failed { code, message }
            }
            other => {
                tracing::info!(backend = %self.http.cfg.name, status = %other, "Unknown video status; taken as still running.");
                JobState::Running { progress }
            }
        };
        Ok(JobPoll { state, logs: Vec::new() })
    }

    async fn fetch_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        let lost = |url: &str| {
            self.http
                .error(url, Failure::JobFailed(format!("video {} is no longer known upstream", handle.upstream_id)))
        };
        let Some((resp, url)) = self.video_call(Method::GET, handle, "/content").await? else {
            return Err(lost(&self.http.cfg.endpoint("/v1/videos")));
        };
        let bytes = self.http.body(resp, &url).await?;
        let mime = sniff_video(&bytes).ok_or_else(|| {
            self.http.error(
                &url,
                Failure::InvalidResponse(format!("the content is not an MP4 or WebM video ({} bytes)", bytes.len())),
            )
        })?;
        let mut outputs = vec![JobOutput { kind: OutputKind::Video, bytes, mime }];
        // The thumbnail is a nicety: a server without one still delivered the video.
        match self.video_call(Method::GET, handle, "/content?variant=thumbnail").await {
            Ok(Some((resp, url))) => {
                let thumb = self.http.body(resp, &url).await?;
                match crate::media::sniff(&thumb) {
                    Some(format) => {
                        outputs.push(JobOutput { kind: OutputKind::Thumbnail, bytes: thumb, mime: format.mime() })
                    }
                    None => {
                        tracing::info!(backend = %self.http.cfg.name, "The video thumbnail is not an image; skipped.")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::info!(backend = %self.http.cfg.name, error = %e, "No video thumbnail."),
        }
        Ok(outputs)
    }

    /// The Videos API deletes only completed or failed jobs; a running one cannot be stopped and the refusal is
    /// returned as the error. A job the server no longer knows is already gone.
    async fn cancel_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        self.video_call(Method::DELETE, handle, "").await.map(|_| ())
    }
}

/// The part of `ImagesResponse` easel reads, borrowing from the response buffer (owned only when the JSON
/// string has escapes).
#[derive(Debug, Deserialize)]
struct ImagesBody<'a> {
    #[serde(default, borrow)]
    data: Vec<ImageItem<'a>>,
    /// gpt-image models report these; other servers leave them out.
    /// Read leniently (any shape): a server's odd `usage` must not fail the images it sent.
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    quality: Option<String>,
    #[serde(default)]
    background: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImageItem<'a> {
    #[serde(borrow)]
    b64_json: Option<Text<'a>>,
    #[serde(borrow)]
    url: Option<Text<'a>>,
    #[serde(borrow)]
    revised_prompt: Option<Text<'a>>,
}

/// A JSON string borrowed from the buffer when it has no escapes (serde borrows a `Cow` only when it is a field
/// of its own, not inside an `Option`).
#[derive(Debug, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_answer_shapes() {
        let raw = r#"{"created": 1, "data": [{"b64_json": "iVBORw0KGgo=", "revised_prompt": "r"}, {"url": "https:\/\/x/y.png"}], "usage": {"total_tokens": 3}}"#;
        let b: ImagesBody<'_> = serde_json::from_str(raw).unwrap();
        assert!(matches!(b.data[0].b64_json, Some(Text(Cow::Borrowed(_)))), "base64 is borrowed, not copied");
        assert_eq!(b.data.len(), 2);
        assert_eq!(b.data[1].url.as_deref(), Some("https://x/y.png"), "escapes still work (owned)");
        assert!(takes_response_format("dall-e-3"));
        assert!(takes_response_format("sd-turbo"));
        assert!(!takes_response_format("gpt-image-1"));
        assert_eq!(b.usage.as_ref().and_then(usage), None, "usage without token counts is not guessed");
        let full = json!({"input_tokens": 2, "output_tokens": 5});
        assert_eq!(usage(&full), Some(TokenUsage { input_tokens: 2, output_tokens: 5, total_tokens: 7 }));
    }
}
