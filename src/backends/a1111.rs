//! `a1111`: AUTOMATIC1111 / Forge / SD.Next `sdapi/v1` (the server must run with `--api`). Generations are
//! `POST /sdapi/v1/txt2img`, edits `POST /sdapi/v1/img2img` (with `mask` for inpainting). The model's
//! `upstream_model` picks the checkpoint through `override_settings.sd_model_checkpoint` (kept loaded afterwards
//! to avoid reload thrash); `upstream_model: current` uses whatever is loaded. Width and height are rounded down
//! to multiples of 8; steps default to 20 when neither request nor model set them. `api_key: user:pass` is sent
//! as HTTP Basic auth (`--api-auth`). When the client goes away, easel sends `POST /sdapi/v1/interrupt`.
//!
//! Health: `GET /sdapi/v1/progress?skip_current_image=true` (answers even mid-generation) for liveness and
//! `GET /sdapi/v1/options` (`sd_model_checkpoint` set) for readiness; `forge_preset` there means Forge.

use std::sync::Arc;

use base64::Engine;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64};
use crate::config::BackendConfig;

pub const KIND: &str = "a1111";

/// Steps sent when neither the request nor the model sets them (the server's own default, 50, is slow).
const DEFAULT_STEPS: u32 = 20;

#[derive(Debug)]
pub struct A1111Backend {
    http: Http,
}

impl A1111Backend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.http.cfg.api_key.as_ref().and_then(|k| k.expose().split_once(':')) {
            Some((user, pass)) => rb.basic_auth(user, Some(pass)),
            None => rb,
        }
    }

    /// Adds the `--api` hint to a 404 on an sdapi path.
    fn explain(&self, mut e: BackendError) -> BackendError {
        if let Failure::Status { status: 404, hint, .. } = &mut e.failure {
            *hint = Some("AUTOMATIC1111/Forge answer 404 on /sdapi/* when started without --api; add --api (or --nowebui) to its command line".into());
        }
        e
    }

    async fn interrupt(&self) {
        let (rb, url) = self.http.request(Method::POST, "/sdapi/v1/interrupt");
        if let Err(e) = self.http.send(self.authed(rb).json(&json!({})), &url).await {
            tracing::warn!(backend = %self.http.cfg.name, error = %e, "Interrupting A1111 failed.");
        }
    }
}

impl Backend for A1111Backend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let req = call.request;
        let mut body = Map::new();
        body.insert("prompt".into(), json!(req.prompt));
        body.insert("negative_prompt".into(), json!(req.negative_prompt.as_deref().unwrap_or("")));
        body.insert("seed".into(), json!(call.seed.map_or(-1, |s| s as i64 & i64::from(u32::MAX))));
        body.insert("width".into(), json!(call.size.width / 8 * 8));
        body.insert("height".into(), json!(call.size.height / 8 * 8));
        body.insert("steps".into(), json!(req.steps.unwrap_or(DEFAULT_STEPS)));
        if let Some(g) = req.guidance_scale {
            body.insert("cfg_scale".into(), json!(g));
        }
        body.insert("batch_size".into(), json!(call.count));
        body.insert("n_iter".into(), json!(1));
        body.insert("send_images".into(), json!(true));
        body.insert("save_images".into(), json!(false));
        let checkpoint = call.model.upstream_model.as_str();
        if !checkpoint.is_empty() && checkpoint != "current" {
            body.insert("override_settings".into(), json!({"sd_model_checkpoint": checkpoint}));
            body.insert("override_settings_restore_afterwards".into(), json!(false));
        }
        let path = match call.edit {
            None => "/sdapi/v1/txt2img",
            Some(edit) => {
                let engine = &base64::engine::general_purpose::STANDARD;
                let images: Vec<String> = edit.images.iter().map(|i| engine.encode(&i.bytes)).collect();
                body.insert("init_images".into(), json!(images));
                if let Some(mask) = &edit.mask {
                    let converted =
                        openai_mask_to_a1111(&mask.bytes).map_err(|e| self.http.error("", Failure::Rejected(e)))?;
                    body.insert("mask".into(), json!(engine.encode(converted)));
                }
                "/sdapi/v1/img2img"
            }
        };
        if let Some(extra) = &req.extra {
            body.extend(extra.clone());
        }
        let (rb, url) = self.http.request(Method::POST, path);
        let rb = self.authed(rb).json(&body);
        let resp = tokio::select! {
            r = self.http.send(rb, &url) => r.map_err(|e| self.explain(e))?,
            () = call.cancel.cancelled() => {
                self.interrupt().await;
                return Err(self.http.error(&url, Failure::JobFailed("cancelled: the client went away (A1111 interrupted)".into())));
            }
        };
        let parsed: Txt2ImgResponse = self.http.json(resp, &url).await?;
        // `info` is a JSON string; grids (save_images) come first and Forge appends extras after the results.
        let first = parsed
            .info
            .as_deref()
            .and_then(|i| serde_json::from_str::<Value>(i).ok())
            .and_then(|v| v.get("index_of_first_image").and_then(Value::as_u64))
            .unwrap_or(0) as usize;
        let images = parsed
            .images
            .iter()
            .skip(first)
            .take(call.count as usize)
            .map(|b64| decode_image_b64(b64).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(images)
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/sdapi/v1/progress?skip_current_image=true");
        self.http.send(self.authed(rb), &url).await.map_err(|e| self.explain(e))?;
        let (rb, url) = self.http.request(Method::GET, "/sdapi/v1/options");
        let resp = self.http.send(self.authed(rb), &url).await.map_err(|e| self.explain(e))?;
        let options: Value = self.http.json(resp, &url).await?;
        let flavour = if options.get("forge_preset").is_some() { "Forge" } else { "AUTOMATIC1111" };
        Ok(match options.get("sd_model_checkpoint").and_then(Value::as_str) {
            Some(ckpt) if !ckpt.is_empty() => {
                ProbeReport { ready: true, detail: format!("{flavour}, checkpoint {ckpt}") }
            }
            _ => ProbeReport { ready: false, detail: format!("{flavour} with no checkpoint loaded") },
        })
    }

    fn supports_edits(&self) -> bool {
        true
    }
}

/// OpenAI masks mark the area to edit with transparency; A1111 wants white = repaint on black.
fn openai_mask_to_a1111(mask: &[u8]) -> Result<Vec<u8>, String> {
    let img = image::load_from_memory(mask).map_err(|e| format!("cannot decode the mask: {e}"))?.to_rgba8();
    let out = image::GrayImage::from_fn(img.width(), img.height(), |x, y| {
        image::Luma([if img.get_pixel(x, y).0[3] == 0 { 255 } else { 0 }])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(out)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the mask: {e}"))?;
    Ok(bytes)
}

#[derive(Debug, Deserialize)]
struct Txt2ImgResponse {
    #[serde(default)]
    images: Vec<String>,
    info: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_recorded_answer_and_converts_masks() {
        let r: Txt2ImgResponse = serde_json::from_value(
            json!({"images": ["aaa", "bbb"], "parameters": {}, "info": "{\"seed\": 1, \"index_of_first_image\": 1}"}),
        )
        .unwrap();
        assert_eq!(r.images.len(), 2);
        let mask = {
            let img = image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }]));
            let mut b = Vec::new();
            image::DynamicImage::ImageRgba8(img)
                .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
                .unwrap();
            b
        };
        let converted = image::load_from_memory(&openai_mask_to_a1111(&mask).unwrap()).unwrap().to_luma8();
        assert_eq!((converted.get_pixel(0, 0).0[0], converted.get_pixel(1, 0).0[0]), (255, 0));
    }
}
