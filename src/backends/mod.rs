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
pub mod jobs;
pub mod openai;
pub mod openai_text;
pub mod outbound;
pub mod progress;
pub mod replicate;
pub mod simulated;
pub mod simulated_video;
pub mod template;
pub mod workflow;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use self::error::{BackendError, Failure};
pub use self::jobs::{JobHandle, JobLookup, JobOutput, JobPoll, JobState, VideoCall};
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
    /// Where the adapter reports steps and previews (see [`progress::Progress`]).
    pub progress: &'a progress::Progress,
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
    pub image: ImageBytes,
    /// Sniffed from the bytes, never trusted from a header.
    pub format: ImageFormat,
    pub revised_prompt: Option<String>,
    /// What the backend itself reported about the call (OpenAI's gpt-image fields); `None` when it said nothing.
    pub reported: Option<Box<Reported>>,
}

/// gpt-image response fields an upstream reported. `usage` is set on the first image of a call only, so summing
/// over the images of several calls gives the request's total.
#[derive(Debug, Clone, Default)]
pub struct Reported {
    pub usage: Option<TokenUsage>,
    pub quality: Option<String>,
    pub background: Option<String>,
}

/// Token usage as an OpenAI image model reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
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

    /// Whether this backend can take edits for `model` (a backend may need a per-model setting to edit).
    fn supports_edits_for(&self, model: &ModelConfig) -> bool {
        let _ = model;
        self.supports_edits()
    }

    /// Whether this backend can honour `background: transparent` for `model` (paint an alpha channel). Backends
    /// that cannot refuse such a request instead of ignoring it.
    fn supports_transparency_for(&self, model: &ModelConfig) -> bool {
        let _ = model;
        false
    }

    /// Whether this backend makes videos (the job operations below are implemented).
    fn supports_videos(&self) -> bool {
        false
    }

    /// Submits a video job; returns the handle to poll it by. Never retried by easel on an ambiguous answer.
    fn submit_video(&self, call: VideoCall<'_>) -> impl Future<Output = Result<JobHandle, BackendError>> + Send {
        let _ = call;
        async { Err(unsupported("video generation")) }
    }

    /// Asks where a job stands. Transport errors and 5xx are errors (easel polls again later); a job the
    /// backend does not know is `Ok(JobState::Lost)`.
    fn poll_job(&self, handle: &JobHandle) -> impl Future<Output = Result<JobPoll, BackendError>> + Send {
        let _ = handle;
        async { Err(unsupported("jobs")) }
    }

    /// Downloads what a succeeded job made (the video first; a thumbnail when the backend has one).
    fn fetch_outputs(&self, handle: &JobHandle) -> impl Future<Output = Result<Vec<JobOutput>, BackendError>> + Send {
        let _ = handle;
        async { Err(unsupported("jobs")) }
    }

    /// Cancels a job upstream (best effort: an already finished job stays finished).
    fn cancel_job(&self, handle: &JobHandle) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = handle;
        async { Err(unsupported("jobs")) }
    }

    /// Looks up a job whose submit easel never saw answered, by the [`VideoCall::client_ref`] it was submitted
    /// with. Only backends whose submit carries an id easel chose can tell; the others cannot.
    fn find_job(&self, client_ref: &str) -> impl Future<Output = Result<JobLookup, BackendError>> + Send {
        let _ = client_ref;
        async { Ok(JobLookup::CannotTell) }
    }

    /// The handle of the job an inbound webhook body (this backend's own format) reports, built from this
    /// backend's configuration and the upstream id alone: nothing else in the body is trusted (URLs in it are
    /// ignored, so a forged body cannot point easel's credentials elsewhere). `None` when the body names no job.
    fn job_from_webhook(&self, model: &ModelConfig, body: &[u8]) -> Option<JobHandle> {
        let _ = (model, body);
        None
    }
}

/// The answer of a job operation's default body. The pipeline only calls job operations on backends whose
/// `supports_videos()` is true, so a client never sees this; it names the gap if a new call site forgets.
fn unsupported(what: &'static str) -> BackendError {
    BackendError::new("", BackendKind::Simulated, "", Failure::Unsupported(what))
}

/// Runs `$body` with `$b` bound to whichever adapter `$any` holds: the one place the variants are listed for
/// dispatch, so a new operation is one line.
macro_rules! each_backend {
    ($any:expr, $b:ident => $body:expr) => {
        match $any {
            AnyBackend::OpenAi($b) => $body,
            AnyBackend::A1111($b) => $body,
            AnyBackend::ComfyUi($b) => $body,
            AnyBackend::InvokeAi($b) => $body,
            AnyBackend::HuggingFace($b) => $body,
            AnyBackend::Fal($b) => $body,
            AnyBackend::Replicate($b) => $body,
            AnyBackend::Template($b) => $body,
            AnyBackend::Simulated($b) => $body,
        }
    };
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
        each_backend!(self, b => b.generate_images(call).await)
    }

    pub fn supports_videos(&self) -> bool {
        each_backend!(self, b => b.supports_videos())
    }

    pub async fn submit_video(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        each_backend!(self, b => b.submit_video(call).await)
    }

    pub async fn poll_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        each_backend!(self, b => b.poll_job(handle).await)
    }

    pub async fn fetch_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        each_backend!(self, b => b.fetch_outputs(handle).await)
    }

    pub async fn cancel_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        each_backend!(self, b => b.cancel_job(handle).await)
    }

    pub async fn find_job(&self, client_ref: &str) -> Result<JobLookup, BackendError> {
        each_backend!(self, b => b.find_job(client_ref).await)
    }

    pub fn job_from_webhook(&self, model: &ModelConfig, body: &[u8]) -> Option<JobHandle> {
        each_backend!(self, b => b.job_from_webhook(model, body))
    }

    pub fn supports_edits(&self) -> bool {
        each_backend!(self, b => b.supports_edits())
    }

    pub fn supports_edits_for(&self, model: &ModelConfig) -> bool {
        each_backend!(self, b => b.supports_edits_for(model))
    }

    pub fn supports_transparency_for(&self, model: &ModelConfig) -> bool {
        each_backend!(self, b => b.supports_transparency_for(model))
    }

    pub async fn probe(&self) -> Result<ProbeReport, BackendError> {
        each_backend!(self, b => b.probe().await)
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

/// An image's bytes as the adapter got them: raw bytes, or base64 text kept as the upstream sent it (already
/// validated), so a `b64_json` answer writes it out without decoding and encoding it again.
#[derive(Debug, Clone)]
pub enum ImageBytes {
    Raw(Bytes),
    Base64(crate::media::Base64Image),
}

impl ImageBytes {
    /// Width and height from the image header (for base64, as read when it was validated).
    pub fn dimensions(&self) -> Option<(u32, u32)> {
        match self {
            Self::Raw(bytes) => crate::media::dimensions(bytes),
            Self::Base64(b64) => b64.dimensions(),
        }
    }

    /// The image bytes; base64 text is decoded (once, here).
    pub fn into_bytes(self) -> Result<Bytes, String> {
        match self {
            Self::Raw(bytes) => Ok(bytes),
            Self::Base64(b64) => b64.decode(),
        }
    }
}

/// Decodes base64 image data from an upstream, with or without a `data:` prefix, and sniffs its format.
pub fn decode_image_b64(data: &str) -> Result<ImageOutput, String> {
    let bytes = crate::media::decode_base64(data)?;
    let format = crate::media::sniff(&bytes).ok_or("the decoded data is not a PNG, JPEG or WebP image")?;
    Ok(ImageOutput { image: ImageBytes::Raw(bytes), format, revised_prompt: None, reported: None })
}

/// Like [`decode_image_b64`] for base64 read out of the upstream's `body`: canonical base64 (standard alphabet,
/// padded, no whitespace) is validated in one streaming pass and kept as a slice of `body`, not decoded; any
/// other spelling is decoded the lenient way.
pub fn image_from_b64_in(body: &Bytes, data: &str) -> Result<ImageOutput, String> {
    let payload = crate::media::base64_payload(data)?;
    match crate::media::Base64Image::validate(slice_of(body, payload)) {
        Ok(b64) => Ok(ImageOutput {
            format: b64.format(),
            image: ImageBytes::Base64(b64),
            revised_prompt: None,
            reported: None,
        }),
        Err(crate::media::Base64Refusal::Image(e)) => Err(e.to_string()),
        Err(crate::media::Base64Refusal::NotCanonical) => decode_image_b64(payload),
    }
}

/// `part` as a slice of `body` when it lies inside it (no copy); a copy when it does not (a JSON string with
/// escapes is unescaped into its own buffer).
fn slice_of(body: &Bytes, part: &str) -> Bytes {
    let start = body.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    if !part.is_empty() && at >= start && at + part.len() <= start + body.len() {
        body.slice_ref(part.as_bytes())
    } else {
        Bytes::copy_from_slice(part.as_bytes())
    }
}

/// Wraps raw bytes as an image output, checking that they are one.
pub fn image_from_bytes(bytes: Bytes) -> Result<ImageOutput, String> {
    // What came back is never echoed: it may be any page of any server.
    let format = crate::media::sniff(&bytes).ok_or_else(|| {
        format!("expected PNG, JPEG or WebP image bytes but got {} bytes of something else", bytes.len())
    })?;
    Ok(ImageOutput { image: ImageBytes::Raw(bytes), format, revised_prompt: None, reported: None })
}
