//! `generate_images`: the story of `POST /v1/images/generations`.
//!
//! 1. Validate the request (`request`), resolve the model (`routing`), check it against the model's limits.
//! 2. Split `n` into upstream calls of at most the backends' per-call maximum; run them concurrently.
//! 3. Each call: order the candidates, take a slot (`admission`), call the adapter under its timeout, fall back
//!    to the next candidate on a backend fault (never on the client's), feed the circuit breaker.
//! 4. Transcode only where the format differs, then store (`url`) or inline (`b64_json`) each image.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::api::images::{ImageData, ImageItem, ImagesRequest, ImagesResponse};
use crate::backends::{BackendError, EditInputs, Failure, ImageCall, ImageOutput, InputImage};
use crate::config::{Capability, ModelConfig, ModelType};
use crate::error::Error;
use crate::request::{GenerateImage, ImageFormat, RequestError, ResponseFormat, Size};
use crate::routing::{self, Candidate};
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// Most upstream attempts for one call (first choice plus fallbacks).
const MAX_ATTEMPTS: usize = 3;
/// Slack over the backend's own timeout before easel gives up on an adapter call (adapters time out first).
const TIMEOUT_SLACK: Duration = Duration::from_secs(1);

/// Generates images; `base_url` is where stored outputs are served (`{base_url}/v1/files/{id}`).
pub async fn generate_images(state: &AppState, wire: ImagesRequest, base_url: &str) -> Result<ImagesResponse, Error> {
    let req = GenerateImage::from_wire(wire, &state.config.defaults)?;
    produce(state, req, None, base_url).await
}

/// Where an edit input comes from: sent inline, or an output easel stored earlier (`file_id`).
#[derive(Debug)]
pub enum ImageSource {
    Inline(InputImage),
    Stored { id: String, param: &'static str },
}

/// Edits images (image-to-image, inpainting) on a backend that can; the same story with inputs.
pub async fn edit_images(
    state: &AppState,
    wire: ImagesRequest,
    images: Vec<ImageSource>,
    mask: Option<ImageSource>,
    base_url: &str,
) -> Result<ImagesResponse, Error> {
    let mut req = GenerateImage::from_wire(wire, &state.config.defaults)?;
    if images.is_empty() {
        return Err(RequestError::param(
            "image",
            "an edit needs at least one `image` (multipart `image` or `image[]`, or JSON `images`)",
        )
        .into());
    }
    let mut resolved = Vec::with_capacity(images.len());
    for (i, src) in images.into_iter().enumerate() {
        resolved.push(resolve_input(state, src, i).await?);
    }
    let mask = match mask {
        Some(m) => Some(resolve_input(state, m, 0).await?),
        None => None,
    };
    // `size` absent or `auto` on an edit: keep the input's size.
    if req.size.is_none()
        && let Some((w, h)) = resolved.first().and_then(|i| crate::media::dimensions(&i.bytes))
    {
        req.size = Some(Size::new(w, h));
    }
    produce(state, req, Some(Arc::new(EditInputs { images: resolved, mask })), base_url).await
}

async fn resolve_input(state: &AppState, src: ImageSource, index: usize) -> Result<InputImage, Error> {
    match src {
        ImageSource::Inline(img) => Ok(img),
        ImageSource::Stored { id, param } => match state.files.get(&id).await? {
            Some((bytes, format)) => {
                Ok(InputImage { bytes, format, name: format!("input-{index}.{}", format.as_str()) })
            }
            None => {
                Err(RequestError::param(param, format!("file `{id}` was not issued by this gateway (or was deleted)"))
                    .into())
            }
        },
    }
}

async fn produce(
    state: &AppState,
    mut req: GenerateImage,
    edit: Option<Arc<EditInputs>>,
    base_url: &str,
) -> Result<ImagesResponse, Error> {
    // 1. Validate and resolve.
    let operation = if edit.is_some() { "image edits" } else { "image generation" };
    let model = state.registry.resolve(req.model.as_deref(), ModelType::Image, operation)?;
    req.check_model(&model)?;
    if edit.is_some() {
        let can = model.backends.iter().filter_map(|b| state.backends.get(&b.name)).any(|h| h.adapter.supports_edits());
        if !can {
            let kinds: Vec<String> = model
                .backends
                .iter()
                .filter_map(|b| state.backends.get(&b.name))
                .map(|h| format!("`{}` ({})", h.cfg.name, h.cfg.kind))
                .collect();
            return Err(RequestError::param(
                "model",
                format!(
                    "model `{}` cannot edit images: its backends {} do not support edits",
                    model.id,
                    kinds.join(", ")
                ),
            )
            .with_code("unsupported_operation")
            .into());
        }
    }
    let size = req.size_or(model.default_size);

    // 2. Plan the upstream calls.
    let per_call = model
        .backends
        .iter()
        .filter_map(|b| state.backends.get(&b.name))
        .map(|h| h.cfg.max_images_per_call)
        .min()
        .unwrap_or(1)
        .max(1);
    let mut calls = Vec::new();
    let mut offset = 0u32;
    while offset < req.n {
        let count = per_call.min(req.n - offset);
        let seed = req.seed.map(|s| s.wrapping_add(u64::from(offset)));
        calls.push(CallPlan { count, seed, size });
        offset += count;
    }

    // 3. Run them.
    let req = Arc::new(req);
    let results = futures_util::future::join_all(
        calls.into_iter().map(|plan| run_call(state, &model, &req, edit.as_ref(), plan)),
    )
    .await;
    let mut outputs = Vec::with_capacity(req.n as usize);
    let mut first_error = None;
    for r in results {
        match r {
            Ok(mut images) => outputs.append(&mut images),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    outputs.truncate(req.n as usize);
    if outputs.is_empty() {
        m::generation(&model.id, "error", 0);
        return Err(first_error.unwrap_or_else(|| Error::Internal("the backend returned no images".into())));
    }
    if let Some(e) = &first_error {
        tracing::warn!(model = %model.id, produced = outputs.len(), asked = req.n, error = %e, "Returning a partial result.");
    }

    // 4. Format and deliver.
    let target = req.output_format.unwrap_or_else(|| common_format(&outputs));
    let mut data = Vec::with_capacity(outputs.len());
    for out in outputs {
        let bytes = if out.format == target {
            out.bytes
        } else {
            crate::media::transcode(out.bytes, target, req.output_compression)
                .await
                .map_err(|e| Error::Internal(format!("transcoding to {}: {e}", target.as_str())))?
        };
        let item = match req.response_format {
            ResponseFormat::B64Json => ImageData::B64(bytes),
            ResponseFormat::Url => {
                let id = state.files.put(&bytes, target).await?;
                ImageData::Url(format!("{}/v1/files/{id}", base_url.trim_end_matches('/')))
            }
        };
        data.push(ImageItem { data: item, revised_prompt: out.revised_prompt });
    }
    m::generation(&model.id, if first_error.is_some() { "partial" } else { "ok" }, data.len() as u64);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(ImagesResponse { created, data, output_format: target.as_str(), size: Some(size.to_string()) })
}

/// One planned upstream call.
#[derive(Debug, Clone, Copy)]
struct CallPlan {
    count: u32,
    seed: Option<u64>,
    size: Size,
}

/// The format all outputs share, or PNG when they differ.
fn common_format(outputs: &[ImageOutput]) -> ImageFormat {
    match outputs.first() {
        Some(first) if outputs.iter().all(|o| o.format == first.format) => first.format,
        _ => ImageFormat::Png,
    }
}

/// One upstream call with admission, timeout, fallback and circuit-breaker bookkeeping.
async fn run_call(
    state: &AppState,
    model: &Arc<ModelConfig>,
    req: &Arc<GenerateImage>,
    edit: Option<&Arc<EditInputs>>,
    plan: CallPlan,
) -> Result<Vec<ImageOutput>, Error> {
    let candidates = routing::candidates(model, &state.backends, Capability::Images)?;
    // Fires when this future is dropped, i.e. when the client went away before the call ended.
    let client_gone = CancellationToken::new();
    let _cancel_on_drop = client_gone.clone().drop_guard();
    let mut last: Option<Error> = None;
    for (attempt, Candidate { handle, trial }) in candidates.into_iter().take(MAX_ATTEMPTS).enumerate() {
        if attempt > 0 {
            tracing::info!(model = %model.id, backend = %handle.cfg.name, attempt, "Falling back to the next backend.");
        }
        let Some(gate) = handle.gate(Capability::Images) else { continue };
        if edit.is_some() && !handle.adapter.supports_edits() {
            continue;
        }
        let permit = match gate.admit().await {
            Ok(p) => p,
            Err(e) => {
                if trial {
                    handle.health.release_trial();
                }
                m::fallback(&handle.cfg.name, "busy");
                // A busier answer never hides a more useful one.
                if !matches!(last, Some(Error::Backend(_))) {
                    last = Some(e.into());
                }
                continue;
            }
        };
        // The upstream call runs in its own task that owns the permit: if the client goes away, the call still
        // runs to its end (the GPU is busy either way) and only then is the slot released.
        let started = Instant::now();
        let task = {
            let handle = Arc::clone(&handle);
            let (req, model, edit) = (Arc::clone(req), Arc::clone(model), edit.cloned());
            let cancel = client_gone.clone();
            tokio::spawn(async move {
                let call = ImageCall {
                    request: &req,
                    model: &model,
                    count: plan.count,
                    seed: plan.seed,
                    size: plan.size,
                    edit: edit.as_deref(),
                    cancel: &cancel,
                };
                let limit = handle.cfg.timeout + TIMEOUT_SLACK;
                let result = match tokio::time::timeout(limit, handle.adapter.generate_images(call)).await {
                    Ok(r) => r,
                    Err(_) => Err(BackendError::new(
                        &handle.cfg.name,
                        handle.cfg.kind,
                        handle.cfg.endpoint(""),
                        Failure::Timeout(handle.cfg.timeout),
                    )),
                };
                drop(permit);
                result
            })
        };
        let result = match task.await {
            Ok(r) => r,
            Err(e) => return Err(Error::Internal(format!("the upstream call task failed: {e}"))),
        };
        let took = started.elapsed();
        match result {
            Ok(images) if !images.is_empty() => {
                handle.health.record_call(false);
                m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), "ok", took);
                return Ok(images);
            }
            Ok(_) => {
                let e = BackendError::new(
                    &handle.cfg.name,
                    handle.cfg.kind,
                    handle.cfg.endpoint(""),
                    Failure::InvalidResponse("the response held no images".into()),
                );
                handle.health.record_call(true);
                m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), e.outcome(), took);
                last = Some(e.into());
            }
            Err(e) => {
                handle.health.record_call(e.is_backend_fault());
                m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), e.outcome(), took);
                tracing::warn!(model = %model.id, backend = %handle.cfg.name, error = %e, "Backend call failed.");
                let retryable = e.retryable();
                last = Some(e.into());
                if !retryable {
                    break;
                }
                m::fallback(&handle.cfg.name, "error");
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Internal("no backend attempt was made".into())))
}
