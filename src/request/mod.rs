//! Validation: wire requests → normalized domain requests. Every field is checked here, with the OpenAI error
//! `param` set; nothing here does I/O. Checks that need the model's limits are in [`GenerateImage::check_model`].

pub mod extra;
pub mod video;

use std::fmt;

use crate::api::images::ImagesRequest;
use crate::config::{Defaults, ModelConfig};

/// A request the client got wrong: 400 with `param` naming the field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub message: String,
    pub param: Option<String>,
    /// OpenAI's `code`; `None` → `invalid_request_error`'s default.
    pub code: Option<&'static str>,
}

impl RequestError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), param: None, code: None }
    }
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { message: message.into(), param: Some(param.into()), code: None }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

/// Width × height in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    pub const fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }

    /// `1024x1024` (also `1024X1024`, `1024*1024`).
    pub fn parse(s: &str) -> Option<Self> {
        let (w, h) = s.trim().split_once(['x', 'X', '*', '×'])?;
        let (width, height) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
        (width > 0 && height > 0).then_some(Self { width, height })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    Url,
    B64Json,
}

impl ResponseFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "url" => Some(Self::Url),
            "b64_json" => Some(Self::B64Json),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// A validated image generation request.
#[derive(Debug, Clone)]
pub struct GenerateImage {
    /// `None` = the first image model in the configuration.
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: u32,
    /// `None` = the model's default size (`size: auto` or absent).
    pub size: Option<Size>,
    pub quality: Option<String>,
    pub style: Option<String>,
    pub response_format: ResponseFormat,
    /// `None` = whatever the backend produced (PNG for most).
    pub output_format: Option<ImageFormat>,
    pub output_compression: Option<u8>,
    pub background: Option<String>,
    pub moderation: Option<String>,
    pub user: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// `Some(partial_images)` when the client asked for a streamed answer.
    pub stream: Option<u32>,
}

impl GenerateImage {
    /// Checks everything that does not depend on the model.
    pub fn from_wire(w: ImagesRequest, defaults: &Defaults) -> Result<Self, RequestError> {
        if w.webhook_url.is_some() {
            return Err(RequestError::param(
                "webhook_url",
                "`webhook_url` needs a job: send the request with the header `Prefer: respond-async`",
            ));
        }
        let prompt = match w.prompt {
            Some(p) if !p.trim().is_empty() => p,
            Some(_) => return Err(RequestError::param("prompt", "`prompt` must not be empty")),
            None => return Err(RequestError::param("prompt", "`prompt` is required")),
        };
        let n = w.n.unwrap_or(1);
        if n == 0 {
            return Err(RequestError::param("n", "`n` must be at least 1"));
        }
        let size = match w.size.as_deref() {
            None | Some("auto") => None,
            Some(s) => Some(Size::parse(s).ok_or_else(|| {
                RequestError::param("size", format!("`size` must be `auto` or WIDTHxHEIGHT like 1024x1024, not `{s}`"))
            })?),
        };
        let response_format = match w.response_format.as_deref() {
            None => defaults.response_format,
            Some(s) => ResponseFormat::parse(s).ok_or_else(|| {
                RequestError::param(
                    "response_format",
                    format!("`response_format` must be `url` or `b64_json`, not `{s}`"),
                )
            })?,
        };
        let output_format = match w.output_format.as_deref() {
            None => None,
            Some(s) => Some(ImageFormat::parse(s).ok_or_else(|| {
                RequestError::param("output_format", format!("`output_format` must be png, jpeg or webp, not `{s}`"))
            })?),
        };
        if let Some(c) = w.output_compression
            && c > 100
        {
            return Err(RequestError::param("output_compression", "`output_compression` must be between 0 and 100"));
        }
        one_of("quality", w.quality.as_deref(), &["auto", "low", "medium", "high", "standard", "hd"])?;
        one_of("style", w.style.as_deref(), &["vivid", "natural"])?;
        one_of("background", w.background.as_deref(), &["auto", "transparent", "opaque"])?;
        one_of("moderation", w.moderation.as_deref(), &["auto", "low"])?;
        if w.background.as_deref() == Some("transparent") && output_format == Some(ImageFormat::Jpeg) {
            return Err(RequestError::param("background", "a transparent background needs png or webp, not jpeg"));
        }
        if let Some(p) = w.partial_images
            && p > 3
        {
            return Err(RequestError::param("partial_images", format!("`partial_images` must be 0 to 3, not {p}")));
        }
        let stream = (w.stream == Some(true)).then(|| w.partial_images.unwrap_or(0));
        let response_format = match (stream, w.response_format.as_deref()) {
            (Some(_), Some("url")) => {
                return Err(RequestError::param(
                    "response_format",
                    "a streamed answer always carries `b64_json` images; omit `response_format` or use `b64_json`",
                ));
            }
            (Some(_), _) => ResponseFormat::B64Json,
            (None, _) => response_format,
        };
        if stream.is_some() && n > 1 {
            return Err(RequestError::param(
                "n",
                format!("`n` is {n}; a streamed answer makes one image, so use `n: 1` or omit `stream`"),
            ));
        }
        if let Some(g) = w.guidance_scale
            && (!g.is_finite() || g < 0.0)
        {
            return Err(RequestError::param("guidance_scale", "`guidance_scale` must be a number >= 0"));
        }
        if let Some(e) = &w.extra {
            extra::check(e)?;
        }
        if w.steps == Some(0) {
            return Err(RequestError::param("steps", "`steps` must be at least 1"));
        }
        Ok(Self {
            model: w.model,
            prompt,
            negative_prompt: w.negative_prompt,
            n,
            size,
            quality: w.quality,
            style: w.style,
            response_format,
            output_format,
            output_compression: w.output_compression,
            background: w.background,
            moderation: w.moderation,
            user: w.user,
            seed: w.seed,
            steps: w.steps,
            guidance_scale: w.guidance_scale,
            extra: w.extra,
            stream,
        })
    }

    /// Checks the request against the model's limits and fills the model's defaults.
    pub fn check_model(&mut self, model: &ModelConfig) -> Result<(), RequestError> {
        let chars = self.prompt.chars().count();
        if chars > model.max_prompt_chars {
            return Err(RequestError::param(
                "prompt",
                format!(
                    "`prompt` has {chars} characters; model `{}` accepts at most {}",
                    model.id, model.max_prompt_chars
                ),
            ));
        }
        if self.n > model.max_n {
            return Err(RequestError::param(
                "n",
                format!("`n` is {}; model `{}` makes at most {} images per request", self.n, model.id, model.max_n),
            ));
        }
        let size = self.size.unwrap_or(model.default_size);
        if let Some(sizes) = &model.sizes {
            if !sizes.contains(&size) {
                let list = sizes.iter().map(Size::to_string).collect::<Vec<_>>().join(", ");
                return Err(RequestError::param(
                    "size",
                    format!("size {size} is not offered by model `{}`; choose one of: {list}", model.id),
                ));
            }
        } else if size.width > model.max_size.width || size.height > model.max_size.height {
            return Err(RequestError::param(
                "size",
                format!("size {size} is larger than model `{}` allows ({})", model.id, model.max_size),
            ));
        }
        self.size = Some(size);
        if self.steps.is_none() {
            self.steps = model.steps;
        }
        if self.guidance_scale.is_none() {
            self.guidance_scale = model.guidance_scale;
        }
        if self.negative_prompt.is_none() {
            self.negative_prompt.clone_from(&model.negative_prompt);
        }
        Ok(())
    }

    /// The size to generate (after [`check_model`](Self::check_model) it is always set).
    pub fn size_or(&self, fallback: Size) -> Size {
        self.size.unwrap_or(fallback)
    }
}

fn one_of(param: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), RequestError> {
    match value {
        Some(v) if !allowed.contains(&v) => {
            Err(RequestError::param(param, format!("`{param}` must be one of {}, not `{v}`", allowed.join(", "))))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject_nonsense() {
        assert_eq!(Size::parse("1024x768"), Some(Size::new(1024, 768)));
        assert_eq!(Size::parse(" 64X32 "), Some(Size::new(64, 32)));
        assert_eq!(Size::parse("0x10"), None);
        assert_eq!(Size::parse("big"), None);
        assert_eq!(Size::new(3, 4).to_string(), "3x4");
    }
}
