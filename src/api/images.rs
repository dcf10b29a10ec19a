//! Wire types of `/v1/images/*`: the request body as clients send it, and the hand-written response writer
//! (base64 goes straight into the output buffer, never through a second multi-megabyte `String`; an upstream's
//! validated base64 is not even copied: the body is a chain of buffers around it).

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// `POST /v1/images/generations`, whatever the content type: JSON is read as is; multipart and form fields are
/// first turned into the same JSON object (see `http::extract`), so all three mean exactly the same.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub style: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<u8>,
    pub background: Option<String>,
    pub moderation: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<u32>,
    pub user: Option<String>,
    // easel's extensions
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where to POST the job's terminal event (only with `Prefer: respond-async`).
    pub webhook_url: Option<String>,
}

/// How each field of [`ImagesRequest`] is typed, for turning form text into JSON values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Text,
    Integer,
    Number,
    Boolean,
    Object,
}

/// The type of a known field; `None` for a field the API does not have.
pub fn field_type(name: &str) -> Option<FieldType> {
    Some(match name {
        "model" | "prompt" | "size" | "quality" | "style" | "response_format" | "output_format" | "background"
        | "moderation" | "user" | "negative_prompt" | "webhook_url" => FieldType::Text,
        "n" | "output_compression" | "partial_images" | "seed" | "steps" => FieldType::Integer,
        "guidance_scale" => FieldType::Number,
        "stream" => FieldType::Boolean,
        "extra" => FieldType::Object,
        _ => return None,
    })
}

/// One produced image, ready to write.
#[derive(Debug, Clone)]
pub enum ImageData {
    Url(String),
    /// Raw image bytes, base64-encoded as they are written.
    B64(Bytes),
    /// Base64 text an upstream sent, already validated: written as it is, never decoded.
    Encoded(crate::media::Base64Image),
}

/// A whole response body as a chain of buffers (JSON text around base64 slices of upstream bodies), written to
/// the connection one after the other without joining them.
#[derive(Debug, Clone, Default)]
pub struct BodyChunks(Vec<Bytes>);

impl BodyChunks {
    /// Bytes over all the chunks.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Bytes::is_empty)
    }

    /// The body in one buffer (no copy when it is one chunk).
    pub fn into_bytes(self) -> Bytes {
        match <[Bytes; 1]>::try_from(self.0) {
            Ok([one]) => one,
            Err(many) => Bytes::from(many.concat()),
        }
    }

    /// A copy of the body (what an Idempotency-Key stores).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.concat()
    }

    pub fn into_chunks(self) -> Vec<Bytes> {
        self.0
    }
}

impl From<Bytes> for BodyChunks {
    fn from(b: Bytes) -> Self {
        Self(vec![b])
    }
}

#[derive(Debug, Clone)]
pub struct ImageItem {
    pub data: ImageData,
    pub revised_prompt: Option<String>,
}

/// Everything in an `ImagesResponse` that easel fills.
#[derive(Debug, Clone)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageItem>,
    pub output_format: &'static str,
    pub size: Option<String>,
    /// gpt-image's `quality` and `background`: what the backend reported, else what was asked for.
    pub quality: Option<String>,
    pub background: Option<String>,
    /// Token usage, only when the backend reported it (never estimated).
    pub usage: Option<crate::backends::TokenUsage>,
    /// Set when fewer images were made than asked for (an easel extension field, `partial`).
    pub partial: Option<Partial>,
}

/// What a partial answer lacks, and why.
#[derive(Debug, Clone)]
pub struct Partial {
    pub requested: u32,
    pub produced: u32,
    /// The first failure's message (what went wrong with the missing images).
    pub error: String,
}

impl ImagesResponse {
    /// Writes the JSON body. Image bytes are base64-encoded directly into the output buffer; an upstream's
    /// validated base64 becomes a chunk of its own between the JSON around it.
    pub fn to_json(&self) -> BodyChunks {
        let engine = crate::media::base64_encoder();
        let estimate: usize = self
            .data
            .iter()
            .map(|i| match &i.data {
                ImageData::Url(u) => u.len() + 32,
                ImageData::B64(b) => base64::encoded_len(b.len(), true).unwrap_or(0) + 32,
                ImageData::Encoded(_) => 32,
            })
            .sum();
        let mut chunks = Vec::new();
        let mut out = BytesMut::with_capacity(estimate + 128);
        out.put_slice(b"{\"created\":");
        out.put_slice(self.created.to_string().as_bytes());
        out.put_slice(b",\"data\":[");
        for (i, item) in self.data.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            match &item.data {
                ImageData::Url(u) => {
                    out.put_slice(b"{\"url\":");
                    put_json_string(&mut out, u);
                }
                ImageData::B64(bytes) => {
                    out.put_slice(b"{\"b64_json\":\"");
                    let start = out.len();
                    let len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
                    out.resize(start + len, 0);
                    // The buffer was sized exactly above, so this cannot fail; stay defensive anyway.
                    let written = engine.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
                    out.truncate(start + written);
                    out.put_u8(b'"');
                }
                ImageData::Encoded(b64) => {
                    out.put_slice(b"{\"b64_json\":\"");
                    chunks.push(out.split().freeze());
                    chunks.push(b64.text().clone());
                    out.put_u8(b'"');
                }
            }
            if let Some(rp) = &item.revised_prompt {
                out.put_slice(b",\"revised_prompt\":");
                put_json_string(&mut out, rp);
            }
            out.put_u8(b'}');
        }
        out.put_slice(b"],\"output_format\":\"");
        out.put_slice(self.output_format.as_bytes());
        out.put_u8(b'"');
        if let Some(size) = &self.size {
            out.put_slice(b",\"size\":");
            put_json_string(&mut out, size);
        }
        if let Some(q) = &self.quality {
            out.put_slice(b",\"quality\":");
            put_json_string(&mut out, q);
        }
        if let Some(b) = &self.background {
            out.put_slice(b",\"background\":");
            put_json_string(&mut out, b);
        }
        if let Some(u) = &self.usage {
            out.put_slice(b",\"usage\":");
            out.put_slice(usage_json(u).to_string().as_bytes());
        }
        if let Some(p) = &self.partial {
            out.put_slice(b",\"partial\":{\"requested\":");
            out.put_slice(p.requested.to_string().as_bytes());
            out.put_slice(b",\"produced\":");
            out.put_slice(p.produced.to_string().as_bytes());
            out.put_slice(b",\"error\":");
            put_json_string(&mut out, &p.error);
            out.put_u8(b'}');
        }
        out.put_u8(b'}');
        chunks.push(out.freeze());
        BodyChunks(chunks)
    }
}

/// What every streamed event of one answer repeats (`stream: true`).
#[derive(Debug, Clone)]
pub struct StreamMeta {
    /// `image_generation` or `image_edit`.
    pub prefix: &'static str,
    pub size: String,
    pub quality: &'static str,
    pub background: &'static str,
}

impl StreamMeta {
    /// The event names' prefix for an edit or a generation.
    pub fn prefix(edit: bool) -> &'static str {
        if edit { "image_edit" } else { "image_generation" }
    }

    /// `quality` as the events report it.
    pub fn quality(q: Option<&str>) -> &'static str {
        match q {
            Some("low") => "low",
            Some("medium") => "medium",
            Some("high" | "hd") => "high",
            _ => "auto",
        }
    }

    /// `background` as the events report it: the backends paint opaque images unless asked otherwise.
    pub fn background(b: Option<&str>) -> &'static str {
        match b {
            Some("transparent") => "transparent",
            _ => "opaque",
        }
    }

    /// One `…partial_image` event.
    pub fn partial(&self, image: &[u8], output_format: &str, index: u32, created_at: u64) -> Bytes {
        let kind = format!("{}.partial_image", self.prefix);
        let data = serde_json::json!({
            "type": kind,
            "b64_json": crate::media::base64_encoder().encode(image),
            "created_at": created_at,
            "size": self.size,
            "quality": self.quality,
            "background": self.background,
            "output_format": output_format,
            "partial_image_index": index,
        });
        sse_event(&kind, &data)
    }
}

/// One Server-Sent Event: an `event:` line, one `data:` line, a blank line.
pub fn sse_event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

impl ImagesResponse {
    /// The `…completed` event of a streamed answer: the first (only) image, with the size that was made.
    pub fn to_sse_completed(&self, meta: &StreamMeta) -> Bytes {
        let kind = format!("{}.completed", meta.prefix);
        let engine = crate::media::base64_encoder();
        let b64 = match self.data.first().map(|i| &i.data) {
            Some(ImageData::B64(b)) => engine.encode(b),
            Some(ImageData::Encoded(b64)) => String::from_utf8_lossy(b64.text()).into_owned(),
            Some(ImageData::Url(_)) | None => String::new(),
        };
        let mut data = serde_json::json!({
            "type": kind,
            "b64_json": b64,
            "created_at": self.created,
            "size": self.size.as_deref().unwrap_or(&meta.size),
            "quality": self.quality.as_deref().unwrap_or(meta.quality),
            "background": self.background.as_deref().unwrap_or(meta.background),
            "output_format": self.output_format,
        });
        // Usage only when the backend reported it: an invented zero would read as "free" to a client.
        if let (Some(u), Some(obj)) = (&self.usage, data.as_object_mut()) {
            obj.insert("usage".into(), usage_json(u));
        }
        sse_event(&kind, &data)
    }
}

/// `usage` as OpenAI writes it.
fn usage_json(u: &crate::backends::TokenUsage) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
    })
}

fn put_json_string(out: &mut BytesMut, s: &str) {
    // serde_json escapes exactly as JSON requires; strings here are short (URLs, prompts).
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    out.put_slice(quoted.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_json_with_base64_and_urls() {
        let r = ImagesResponse {
            created: 7,
            data: vec![
                ImageItem {
                    data: ImageData::B64(Bytes::from_static(b"\x89PNG")),
                    revised_prompt: Some("a \"q\"".into()),
                },
                ImageItem { data: ImageData::Url("http://h/v1/files/x.png".into()), revised_prompt: None },
            ],
            output_format: "png",
            size: Some("8x8".into()),
            quality: Some("high".into()),
            background: None,
            usage: Some(crate::backends::TokenUsage { input_tokens: 3, output_tokens: 5, total_tokens: 8 }),
            partial: Some(Partial { requested: 4, produced: 2, error: "backend `a` timed out".into() }),
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_json().into_bytes()).unwrap();
        assert_eq!(v["created"], 7);
        assert_eq!(v["data"][0]["b64_json"], "iVBORw==");
        assert_eq!(v["data"][0]["revised_prompt"], "a \"q\"");
        assert_eq!(v["data"][1]["url"], "http://h/v1/files/x.png");
        assert_eq!(v["output_format"], "png");
        assert_eq!(v["size"], "8x8");
        assert_eq!(v["quality"], "high");
        assert!(v.get("background").is_none());
        assert_eq!(v["usage"], serde_json::json!({"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}));
        assert_eq!(v["partial"], serde_json::json!({"requested": 4, "produced": 2, "error": "backend `a` timed out"}));
    }
}
