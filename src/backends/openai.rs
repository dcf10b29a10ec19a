//! `openai`: any server that speaks OpenAI's Images API (OpenAI itself, LocalAI, stable-diffusion.cpp's server,
//! InvokeAI shims): `POST {url}/v1/images/generations` (JSON) and `POST {url}/v1/images/edits` (multipart).
//! Answers may carry `b64_json` or `url` items; URLs are downloaded with the backend's timeout and size cap.
//! `response_format` is sent only to servers that take it (not to GPT image models, which always answer base64).
//!
//! Health: `GET {url}/v1/models` with the key (an OpenAI-compatible server answers `{"object": "list"}`).

use std::borrow::Cow;
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes};
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

    /// Turns the upstream's `data[]` into images, downloading URL items. Base64 is decoded straight from the
    /// response buffer (borrowed, not copied into a `String`).
    async fn collect(&self, url: &str, raw: bytes::Bytes) -> Result<Vec<ImageOutput>, BackendError> {
        let body: ImagesBody<'_> = serde_json::from_slice(&raw).map_err(|e| {
            self.http.error(url, Failure::InvalidResponse(format!("the JSON body does not match the protocol: {e}")))
        })?;
        let mut images = Vec::with_capacity(body.data.len());
        for item in body.data {
            let mut out = match (item.b64_json, item.url) {
                (Some(b64), _) => {
                    decode_image_b64(&b64).map_err(|e| self.http.error(url, Failure::InvalidResponse(e)))?
                }
                (None, Some(u)) if u.starts_with("data:") => {
                    decode_image_b64(&u).map_err(|e| self.http.error(url, Failure::InvalidResponse(e)))?
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
            images.push(out);
        }
        Ok(images)
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
}

/// The part of `ImagesResponse` easel reads, borrowing from the response buffer (owned only when the JSON
/// string has escapes).
#[derive(Debug, Deserialize)]
struct ImagesBody<'a> {
    #[serde(default, borrow)]
    data: Vec<ImageItem<'a>>,
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
    }
}
