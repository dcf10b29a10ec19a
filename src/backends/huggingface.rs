//! `huggingface`: Hugging Face Inference text-to-image, through the router
//! (`url: https://router.huggingface.co/hf-inference`), the legacy serverless API, or a dedicated Inference
//! Endpoint. Body `{"inputs", "parameters"}`; `Accept: image/png` (or `image/jpeg` when JPEG is asked) so the
//! answer is raw image bytes; one image per call.
//!
//! Where the request goes: when `upstream_model` is a repo id (`owner/name`), `POST {url}/models/{owner}/{name}`
//! (router and serverless); otherwise the url is a dedicated endpoint and easel posts to it as is.
//! A 503 "currently loading" answer carries `estimated_time`, which becomes the `Retry-After` of easel's 503.
//!
//! Edits (`/v1/images/edits`) are the `image-to-image` task on the same URL: `inputs` is the first image as
//! base64 and `parameters` carries `prompt`, `negative_prompt`, `target_size: {width, height}`, steps, guidance
//! and seed; `Accept` is an image type as for generations. A mask (OpenAI's: transparent = change) is converted
//! to white-on-black and sent as `parameters.mask_image` (base64), the diffusers inpainting argument, for
//! inpainting models and endpoint handlers that read it. Only models with `edit_task` take edits here:
//! `image-to-image` refuses a mask, `inpainting` requires one (both before any upstream call).
//!
//! Health: a dedicated endpoint answers `GET {url}/health`; for the router (which has no health route and must
//! not be sent a paid call) the probe is reachability: any HTTP answer but 401/403.

use std::sync::Arc;

use base64::Engine;
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Map, Value, json};

use super::client::Http;
use super::error::upstream_message;
use super::{
    Backend, BackendError, EditInputs, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes,
};
use crate::config::{BackendConfig, EditTask, ModelConfig};
use crate::request::ImageFormat;

pub const KIND: &str = "huggingface";

#[derive(Debug)]
pub struct HuggingFaceBackend {
    http: Http,
}

impl HuggingFaceBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    /// True for the router and the serverless API (models addressed by repo id), false for dedicated endpoints.
    fn routed(model: &str) -> bool {
        model.contains('/')
    }
}

impl Backend for HuggingFaceBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let req = call.request;
        let model = call.model.upstream_model.as_str();
        let body = match call.edit {
            None => generation_body(&call),
            Some(edit) => edit_body(&call, edit).await.map_err(|e| self.http.error("", e))?,
        };
        let accept = if req.output_format == Some(ImageFormat::Jpeg) { "image/jpeg" } else { "image/png" };
        let path = if Self::routed(model) { format!("/models/{}", model.trim_matches('/')) } else { String::new() };
        let (rb, url) = self.http.request(Method::POST, &path);
        let rb = self.http.bearer(rb).header(ACCEPT, accept).json(&body);
        let resp = self.http.send(rb, &url).await?;
        let json_answer =
            resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.contains("json"));
        let bytes = self.http.body(resp, &url).await?;
        let image = if json_answer {
            // A dedicated endpoint may answer a JSON string of base64, or an error object with status 200.
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::String(b64)) => {
                    decode_image_b64(&b64).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?
                }
                _ => {
                    return Err(self.http.error(
                        &url,
                        Failure::InvalidResponse(format!(
                            "expected an image but got JSON: {}",
                            upstream_message(&bytes)
                        )),
                    ));
                }
            }
        } else {
            image_from_bytes(bytes).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?
        };
        Ok(vec![image])
    }

    fn supports_edits(&self) -> bool {
        true
    }

    /// Only models with an `edit_task`: a text-to-image model has no image input on Hugging Face.
    fn supports_edits_for(&self, model: &ModelConfig) -> bool {
        model.edit_task.is_some()
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/health");
        match self.http.send(self.http.bearer(rb), &url).await {
            Ok(_) => Ok(ProbeReport { ready: true, detail: "Hugging Face endpoint healthy".into() }),
            Err(e) => match &e.failure {
                Failure::Status { status: 401 | 403, .. } => Err(e),
                Failure::Status { status: 503, message, .. } => {
                    Ok(ProbeReport { ready: false, detail: format!("Hugging Face endpoint starting: {message}") })
                }
                Failure::Status { status, .. } => Ok(ProbeReport {
                    ready: true,
                    detail: format!("Hugging Face reachable (HTTP {status} on /health)"),
                }),
                _ => Err(e),
            },
        }
    }
}

/// The text-to-image body: the prompt as `inputs`, flat `width`/`height`.
fn generation_body(call: &ImageCall<'_>) -> Value {
    let req = call.request;
    let mut parameters = common_parameters(call);
    parameters.insert("width".into(), json!(call.size.width));
    parameters.insert("height".into(), json!(call.size.height));
    crate::request::extra::merge(&mut parameters, req.extra.as_ref());
    json!({"inputs": req.prompt, "parameters": parameters})
}

/// The image-to-image body: the first image as base64 `inputs`, the prompt and `target_size` in `parameters`,
/// and the mask (converted to white = repaint) as `parameters.mask_image`.
async fn edit_body(call: &ImageCall<'_>, edit: &EditInputs) -> Result<Value, Failure> {
    let req = call.request;
    let engine = crate::media::base64_encoder();
    let Some(first) = edit.images.first() else {
        return Err(Failure::UnusableField { param: "image", message: "an edit needs an image".into() });
    };
    let task = call.model.edit_task.unwrap_or(EditTask::ImageToImage);
    match (task, &edit.mask) {
        (EditTask::ImageToImage, Some(_)) => {
            return Err(Failure::UnusableField {
                param: "mask",
                message: format!(
                    "model `{}` edits as image-to-image, which takes no mask: set `edit_task: inpainting` on a model that inpaints",
                    call.model.id
                ),
            });
        }
        (EditTask::Inpainting, None) => {
            return Err(Failure::UnusableField {
                param: "mask",
                message: format!(
                    "model `{}` inpaints: send a `mask` (transparent = the area to change)",
                    call.model.id
                ),
            });
        }
        _ => {}
    }
    let mut parameters = common_parameters(call);
    parameters.insert("prompt".into(), json!(req.prompt));
    parameters.insert("target_size".into(), json!({"width": call.size.width, "height": call.size.height}));
    if let Some(mask) = &edit.mask {
        let bytes = mask.bytes.clone();
        let converted = crate::media::run_decoding(&[&mask.bytes], move || {
            crate::media::mask_to_white_repaint(&bytes).map_err(crate::media::DecodeError::Invalid)
        })
        .await
        .map_err(|e| Failure::UnusableField { param: "mask", message: format!("`mask`: {e}") })?;
        parameters.insert("mask_image".into(), json!(engine.encode(converted)));
    }
    crate::request::extra::merge(&mut parameters, req.extra.as_ref());
    Ok(json!({"inputs": engine.encode(&first.bytes), "parameters": parameters}))
}

/// Parameters both tasks share.
fn common_parameters(call: &ImageCall<'_>) -> Map<String, Value> {
    let req = call.request;
    let mut parameters = Map::new();
    if let Some(n) = &req.negative_prompt {
        parameters.insert("negative_prompt".into(), json!(n));
    }
    if let Some(s) = req.steps {
        parameters.insert("num_inference_steps".into(), json!(s));
    }
    if let Some(g) = req.guidance_scale {
        parameters.insert("guidance_scale".into(), json!(g));
    }
    if let Some(seed) = call.seed {
        parameters.insert("seed".into(), json!(seed));
    }
    parameters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_repo_ids_to_models_paths() {
        assert!(HuggingFaceBackend::routed("black-forest-labs/FLUX.1-schnell"));
        assert!(!HuggingFaceBackend::routed("my-endpoint"));
    }
}
