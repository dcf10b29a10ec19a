//! `replicate`: Replicate's predictions API (`https://api.replicate.com`). `upstream_model` is `owner/name`
//! (`POST /v1/models/{owner}/{name}/predictions`) or `owner/name:version` (`POST /v1/predictions` with
//! `version`). easel asks `Prefer: wait` (up to 60 s), then polls `urls.get`; `POST urls.cancel` when the client
//! goes away. Outputs (a URL, a list of URLs, or data URIs) are downloaded. Edits send data URIs (`image`, `mask`).
//!
//! Health: `GET /v1/account` with the token.

use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes};
use crate::config::BackendConfig;
use crate::request::ImageFormat;

pub const KIND: &str = "replicate";

/// Replicate holds a `Prefer: wait` request at most this long.
const MAX_WAIT_SECS: u64 = 60;

#[derive(Debug)]
pub struct ReplicateBackend {
    http: Http,
}

impl ReplicateBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
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
        let urls = match &prediction.output {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        };
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
}
