//! Backend adapters: each file owns one upstream protocol end to end. The [`Backend`] trait is what the pipeline
//! calls; [`AnyBackend`] dispatches to the adapter matching the config `kind`. Adapters never touch axum, storage
//! or the ledger: they turn one [`ImageCall`] into images or a classified [`BackendError`].

pub mod a1111;
pub mod client;
pub mod comfyui;
pub mod error;
pub mod fal;
pub mod huggingface;
pub mod invokeai;
pub mod openai;
pub mod outbound;
pub mod replicate;
pub mod simulated;
pub mod template;
pub mod workflow;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use self::error::{BackendError, Failure};
use crate::config::{BackendConfig, BackendKind, ModelConfig};
use crate::request::{GenerateImage, ImageFormat, Size};

/// One upstream call for images: part (or all) of a request's `n`.
#[derive(Debug, Clone, Copy)]
pub struct ImageCall<'a> {
    pub request: &'a GenerateImage,
    pub model: &'a ModelConfig,
    /// Images this call must produce (at most the backend's `max_images_per_call`).
    pub count: u32,
    /// The seed for this call: the request's, offset per call, or `None` to let the backend pick.
    pub seed: Option<u64>,
    pub size: Size,
    /// The input images of an edit; `None` for a generation.
    pub edit: Option<&'a EditInputs>,
    /// Cancelled when the client went away. Adapters whose protocol can cancel upstream work (ComfyUI queue
    /// delete/interrupt, A1111 interrupt, InvokeAI cancel) do so and return; others finish the call, because the
    /// GPU is busy either way and the admission slot must stay held until it is free.
    pub cancel: &'a CancellationToken,
}

/// An image sent to the gateway (edit input or mask).
#[derive(Debug, Clone)]
pub struct InputImage {
    pub bytes: Bytes,
    pub format: ImageFormat,
    /// The client's file name, or a generated one (`image-0.png`).
    pub name: String,
}

/// The inputs of an edit: one or more images and an optional mask (transparent = the area to change, as OpenAI
/// defines it; applies to the first image).
#[derive(Debug, Clone)]
pub struct EditInputs {
    pub images: Vec<InputImage>,
    pub mask: Option<InputImage>,
}

/// One image as the backend produced it.
#[derive(Debug, Clone)]
pub struct ImageOutput {
    pub bytes: Bytes,
    /// Sniffed from the bytes, never trusted from a header.
    pub format: ImageFormat,
    pub revised_prompt: Option<String>,
}

/// What a health probe learned.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The backend can take a generation now (model loaded, API enabled).
    pub ready: bool,
    /// One line for `/health` and `easel doctor`, e.g. "A1111, checkpoint v1-5-pruned".
    pub detail: String,
}

/// An upstream protocol. Optional operations have defaults that say "unsupported".
pub trait Backend {
    /// Produces `call.count` images (or fewer, which the pipeline reports as a partial result).
    fn generate_images(
        &self,
        call: ImageCall<'_>,
    ) -> impl Future<Output = Result<Vec<ImageOutput>, BackendError>> + Send;

    /// A cheap native probe: never a paid generation.
    fn probe(&self) -> impl Future<Output = Result<ProbeReport, BackendError>> + Send;

    /// Whether this backend can take edits (`call.edit` set) at all.
    fn supports_edits(&self) -> bool {
        false
    }
}

/// Every adapter, one variant per config `kind`.
#[derive(Debug)]
pub enum AnyBackend {
    OpenAi(openai::OpenAiBackend),
    A1111(a1111::A1111Backend),
    ComfyUi(comfyui::ComfyUiBackend),
    InvokeAi(invokeai::InvokeAiBackend),
    HuggingFace(huggingface::HuggingFaceBackend),
    Fal(fal::FalBackend),
    Replicate(replicate::ReplicateBackend),
    Template(template::TemplateBackend),
    Simulated(simulated::SimulatedBackend),
}

impl AnyBackend {
    /// Builds the adapter for a validated backend config (no I/O happens here).
    pub fn build(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(match cfg.kind {
            BackendKind::OpenAi => Self::OpenAi(openai::OpenAiBackend::new(cfg)?),
            BackendKind::A1111 => Self::A1111(a1111::A1111Backend::new(cfg)?),
            BackendKind::ComfyUi => Self::ComfyUi(comfyui::ComfyUiBackend::new(cfg)?),
            BackendKind::InvokeAi => Self::InvokeAi(invokeai::InvokeAiBackend::new(cfg)?),
            BackendKind::HuggingFace => Self::HuggingFace(huggingface::HuggingFaceBackend::new(cfg)?),
            BackendKind::Fal => Self::Fal(fal::FalBackend::new(cfg)?),
            BackendKind::Replicate => Self::Replicate(replicate::ReplicateBackend::new(cfg)?),
            BackendKind::Template => Self::Template(template::TemplateBackend::new(cfg)?),
            BackendKind::Simulated => Self::Simulated(simulated::SimulatedBackend::new(cfg)),
        })
    }

    pub async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        match self {
            Self::OpenAi(b) => b.generate_images(call).await,
            Self::A1111(b) => b.generate_images(call).await,
            Self::ComfyUi(b) => b.generate_images(call).await,
            Self::InvokeAi(b) => b.generate_images(call).await,
            Self::HuggingFace(b) => b.generate_images(call).await,
            Self::Fal(b) => b.generate_images(call).await,
            Self::Replicate(b) => b.generate_images(call).await,
            Self::Template(b) => b.generate_images(call).await,
            Self::Simulated(b) => b.generate_images(call).await,
        }
    }

    pub fn supports_edits(&self) -> bool {
        match self {
            Self::OpenAi(b) => b.supports_edits(),
            Self::A1111(b) => b.supports_edits(),
            Self::ComfyUi(b) => b.supports_edits(),
            Self::InvokeAi(b) => b.supports_edits(),
            Self::HuggingFace(b) => b.supports_edits(),
            Self::Fal(b) => b.supports_edits(),
            Self::Replicate(b) => b.supports_edits(),
            Self::Template(b) => b.supports_edits(),
            Self::Simulated(b) => b.supports_edits(),
        }
    }

    pub async fn probe(&self) -> Result<ProbeReport, BackendError> {
        match self {
            Self::OpenAi(b) => b.probe().await,
            Self::A1111(b) => b.probe().await,
            Self::ComfyUi(b) => b.probe().await,
            Self::InvokeAi(b) => b.probe().await,
            Self::HuggingFace(b) => b.probe().await,
            Self::Fal(b) => b.probe().await,
            Self::Replicate(b) => b.probe().await,
            Self::Template(b) => b.probe().await,
            Self::Simulated(b) => b.probe().await,
        }
    }
}

/// Uploads an edit's first image and its mask with the backend's own `upload`, returning their names on the
/// server (for workflow templates); `(None, None)` for a generation.
pub async fn upload_edit_inputs<'a, F, Fut>(
    edit: Option<&'a EditInputs>,
    upload: F,
) -> Result<(Option<String>, Option<String>), BackendError>
where
    F: Fn(&'a InputImage) -> Fut,
    Fut: Future<Output = Result<String, BackendError>>,
{
    let Some(edit) = edit else { return Ok((None, None)) };
    let image = match edit.images.first() {
        Some(i) => Some(upload(i).await?),
        None => None,
    };
    let mask = match &edit.mask {
        Some(m) => Some(upload(m).await?),
        None => None,
    };
    Ok((image, mask))
}

/// Decodes base64 image data from an upstream, with or without a `data:` prefix, and sniffs its format.
pub fn decode_image_b64(data: &str) -> Result<ImageOutput, String> {
    let bytes = crate::media::decode_base64(data)?;
    let format = crate::media::sniff(&bytes).ok_or("the decoded data is not a PNG, JPEG or WebP image")?;
    Ok(ImageOutput { bytes, format, revised_prompt: None })
}

/// Wraps raw bytes as an image output, checking that they are one.
pub fn image_from_bytes(bytes: Bytes) -> Result<ImageOutput, String> {
    // What came back is never echoed: it may be any page of any server.
    let format = crate::media::sniff(&bytes).ok_or_else(|| {
        format!("expected PNG, JPEG or WebP image bytes but got {} bytes of something else", bytes.len())
    })?;
    Ok(ImageOutput { bytes, format, revised_prompt: None })
}
