//! `fal`: fal.ai's queue API (`https://queue.fal.run`): submit to `/{endpoint_id}`, poll the returned
//! `status_url` (with logs) until `COMPLETED`, read `response_url`, download the output images; `PUT cancel_url`
//! when the client goes away. Auth is `Authorization: Key <api_key>`. The model's `upstream_model` is the
//! endpoint id (`fal-ai/flux/dev`). Edits send the inputs as data URLs (`image_url`, `mask_url`).
//!
//! Health: fal has no health route, so the probe is reachability of the queue host (any HTTP answer but 401/403).

use std::sync::Arc;

use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde::Deserialize;
use serde_json::{Map, json};

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes};
use crate::config::BackendConfig;
use crate::request::ImageFormat;
use crate::telemetry::metrics as m;

pub const KIND: &str = "fal";

#[derive(Debug)]
pub struct FalBackend {
    http: Http,
}

impl FalBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
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
