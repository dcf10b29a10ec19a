//! `template`: any custom HTTP image server, described in config: a method, a path, headers, a minijinja body
//! template, and where the images are in the answer: a JSON path (RFC 9535) whose matches are base64, data URLs
//! or http(s) URLs (downloaded), or — with no path — the raw body when it is an image. One image per call.
//!
//! Body variables: `prompt`, `negative_prompt` (empty when none), `seed` (the call's, else a fresh random one),
//! `width`, `height`, `n` (1), `steps` and `guidance_scale` (null when unset), `model` (the upstream model) and
//! `extra` (an object, empty when none). Inside JSON write strings as `{{ prompt | tojson }}`.
//!
//! Health: `GET` of the server root; any HTTP answer (even 404) proves it is up, a refused connection that it is
//! down.

use std::sync::Arc;

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use serde_json::{Map, Value};

use super::client::Http;
use super::workflow::{check_variables, render_text};
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes};
use crate::config::{BackendConfig, TemplateConfig};

pub const KIND: &str = "template";

#[derive(Debug)]
pub struct TemplateBackend {
    http: Http,
}

/// What a body template sees.
#[derive(Debug, Serialize)]
struct Vars<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    seed: u64,
    width: u32,
    height: u32,
    n: u32,
    steps: Option<u32>,
    guidance_scale: Option<f64>,
    model: &'a str,
    extra: &'a Map<String, Value>,
}

impl TemplateBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        if cfg.template.is_none() {
            return Err(format!("backend `{}` has no template settings", cfg.name));
        }
        Ok(Self { http: Http::new(cfg)? })
    }

    fn tmpl(&self) -> Result<&TemplateConfig, BackendError> {
        self.http
            .cfg
            .template
            .as_ref()
            .ok_or_else(|| self.http.error("", Failure::Unsupported("run without template settings")))
    }
}

impl Backend for TemplateBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let t = self.tmpl()?;
        let req = call.request;
        let empty = Map::new();
        let vars = Vars {
            prompt: &req.prompt,
            negative_prompt: req.negative_prompt.as_deref().unwrap_or(""),
            seed: call.seed.unwrap_or_else(|| u64::from(rand::random::<u32>())),
            width: call.size.width,
            height: call.size.height,
            n: 1,
            steps: req.steps,
            guidance_scale: req.guidance_scale,
            model: &call.model.upstream_model,
            extra: req.extra.as_ref().unwrap_or(&empty),
        };
        let (rb, url) = self.http.request(t.method.clone(), &t.path);
        let rb = if t.method == Method::GET {
            rb
        } else {
            let body = render_text(&format!("backends.{}.body", self.http.cfg.name), &t.body, &vars).map_err(|e| {
                self.http.error(&url, Failure::InvalidResponse(format!("the body template failed: {e}")))
            })?;
            rb.header(CONTENT_TYPE, &t.content_type).body(body)
        };
        let rb = self.http.bearer(rb);
        let resp = self.http.send(rb, &url).await?;
        let bytes = self.http.body(resp, &url).await?;
        let Some(path) = &t.images else {
            return Ok(vec![image_from_bytes(bytes).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?]);
        };
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.http.error(&url, Failure::InvalidResponse(format!("the answer is not JSON: {e}"))))?;
        let found: Vec<String> =
            path.query(&doc).all().into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
        if found.is_empty() {
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse(format!("the JSON path `{path}` matched no string in the answer")),
            ));
        }
        let mut images = Vec::with_capacity(found.len());
        for s in found {
            let img = if s.starts_with("http://") || s.starts_with("https://") {
                let (bytes, _) = self.http.download(&s).await?;
                image_from_bytes(bytes).map_err(|e| self.http.error(&s, Failure::InvalidResponse(e)))?
            } else {
                decode_image_b64(&s).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))?
            };
            images.push(img);
        }
        Ok(images)
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/");
        match self.http.send(rb, &url).await {
            Ok(_) => Ok(ProbeReport { ready: true, detail: "custom server answers".into() }),
            Err(e) => match &e.failure {
                Failure::Status { status, .. } => {
                    Ok(ProbeReport { ready: true, detail: format!("custom server answers (HTTP {status} on /)") })
                }
                _ => Err(e),
            },
        }
    }
}

/// Checks a body template at config load: it must compile and render with sample values (and be JSON when the
/// content type is JSON).
pub fn check_body(body: &str, json: bool) -> Result<(), String> {
    check_variables(
        "body",
        body,
        &["prompt", "negative_prompt", "seed", "width", "height", "n", "steps", "guidance_scale", "model", "extra"],
    )?;
    let extra = Map::new();
    let sample = Vars {
        prompt: "a \"quoted\"\nprompt",
        negative_prompt: "blurry",
        seed: 1234,
        width: 512,
        height: 512,
        n: 1,
        steps: Some(20),
        guidance_scale: Some(7.0),
        model: "model",
        extra: &extra,
    };
    let text = render_text("body", body, &sample)?;
    if json && !text.trim().is_empty() {
        serde_json::from_str::<Value>(&text).map_err(|e| {
            format!(
                "the body renders invalid JSON at line {} column {}: {e} (write strings as {{{{ prompt | tojson }}}})",
                e.line(),
                e.column()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_templates_at_load() {
        check_body(r#"{"prompt": {{ prompt | tojson }}, "w": {{ width }}, "seed": {{ seed }}}"#, true).unwrap();
        assert!(check_body(r#"{"prompt": "{{ prompt }}"}"#, true).unwrap_err().contains("invalid JSON"));
        assert!(check_body("{\"a\":\n {{ prompt_typo }}}", true).unwrap_err().contains("line 2"));
        check_body("prompt={{ prompt | urlencode }}", false).unwrap();
    }
}
