//! `generate_images`: the story of `POST /v1/images/generations`.
//!
//! 1. Validate the request (`request`), resolve the model (`routing`), check it against the model's limits.
//! 2. Split `n` into upstream calls of at most the backends' per-call maximum; run them concurrently.
//! 3. Each call: order the candidates, take a slot (`admission`), call the adapter under its timeout, fall back
//!    to the next candidate on a backend fault (never on the client's), feed the circuit breaker.
//! 4. Transcode only where the format differs, then store (`url`) or inline (`b64_json`) each image.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::dispatch::dispatch;
use crate::api::images::{ImageData, ImageItem, ImagesRequest, ImagesResponse, Partial, StreamMeta};
use crate::backends::progress::Progress;
use crate::backends::{
    BackendError, EditInputs, Failure, ImageBytes, ImageCall, ImageOutput, InputImage, Reported, TokenUsage,
};
use crate::config::{Capability, ModelConfig, ModelType};
use crate::error::Error;
use crate::ledger::{HoldOutcome, IdemClaim, Made, MadeOutput, Principal, SettlingGuard, Store, StoredResponse};
use crate::request::{GenerateImage, ImageFormat, RequestError, ResponseFormat, Size};
use crate::routing::BackendHandle;
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// Who is asking, as the HTTP layer saw it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` when `auth.mode` is `none`.
    pub principal: Option<Principal>,
    /// The `Idempotency-Key` header, already checked for shape.
    pub idempotency_key: Option<String>,
    pub path: &'static str,
    /// Fires when the client disconnects: queued work is abandoned, cancellable upstream work is cancelled, and
    /// the hold is released instead of captured.
    pub gone: CancellationToken,
    /// Where the upstream calls report steps and previews (a listening sink when the answer is streamed).
    pub progress: Arc<Progress>,
}

/// A response body: made now, or replayed for a repeated Idempotency-Key.
#[derive(Debug)]
pub enum Delivered {
    Fresh(Box<Answer>),
    Replayed(StoredResponse),
}

/// An answer made now.
#[derive(Debug)]
pub struct Answer {
    pub body: crate::api::images::BodyChunks,
    /// Set when fewer images were made than asked for (also in the body's `partial` field).
    pub partial: Option<Partial>,
    /// The hold to settle once the body is delivered; `None` when nothing was held.
    pub settlement: Option<Settlement>,
}

/// The last step of [`charged`] for an answer, run exactly once. An answer counts as delivered when the HTTP layer
/// hands its whole body to the client's connection: then [`Settlement::delivered`] captures what was produced (and
/// stores the Idempotency-Key's response). Dropped before that (the client left, the connection broke, the response
/// was never written) it releases the hold instead. Either runs as tracked background work, so a disconnect cannot
/// interrupt it; a process that dies first leaves the hold to the lease reaper and startup recovery.
#[derive(Debug)]
pub struct Settlement {
    state: AppState,
    hold_id: String,
    produced: i64,
    /// The Idempotency-Key's record: who, which key, and the response to replay.
    record: Option<(Principal, String, StoredResponse)>,
    /// The outputs stored for this answer: the hold's key becomes their owner, the gallery lists them.
    made: Made,
    settled: bool,
    /// Balance reads of this account wait until this settlement is done.
    guard: Option<SettlingGuard>,
}

impl Settlement {
    /// The whole body was handed to the client's connection: capture.
    pub fn delivered(mut self) {
        self.settled = true;
        let state = self.state.clone();
        let hold_id = std::mem::take(&mut self.hold_id);
        let (produced, record, guard) = (self.produced, self.record.take(), self.guard.take());
        let made = std::mem::take(&mut self.made);
        spawn_settlement(&self.state, async move {
            let _guard = guard;
            let record = record.as_ref().map(|(who, key, resp)| (who, key.as_str(), resp));
            if let Err(e) = state.ledger.capture(&hold_id, produced, record, &made).await {
                // The hold stays open until the reaper (or the next start) releases it: the customer is not charged.
                tracing::error!(hold = %hold_id, error = %e, "Capturing a hold failed.");
            }
        });
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let state = self.state.clone();
        let hold_id = std::mem::take(&mut self.hold_id);
        let guard = self.guard.take();
        spawn_settlement(&self.state, async move {
            let _guard = guard;
            release(&state, &hold_id, "client went away before the answer was delivered").await;
        });
    }
}

/// Runs a settlement on the runtime, tracked so shutdown waits for it. Outside a runtime (only while the process
/// is being torn down) it cannot run; startup recovery releases that hold.
fn spawn_settlement(state: &AppState, work: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            state.tasks.spawn_on(work, &rt);
        }
        Err(_) => tracing::warn!("No runtime to settle a hold on; the next start releases it."),
    }
}

/// Generates images; `base_url` is where stored outputs are served (`{base_url}/v1/files/{id}`).
pub async fn generate_images(
    state: &AppState,
    caller: &Caller,
    wire: ImagesRequest,
    base_url: &str,
) -> Result<Delivered, Error> {
    let fingerprint = fingerprint(caller, &wire, &[]);
    let req = GenerateImage::from_wire(wire, &state.config.defaults)?;
    charged(state, caller, req, None, fingerprint, base_url).await
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
    caller: &Caller,
    wire: ImagesRequest,
    images: Vec<ImageSource>,
    mask: Option<ImageSource>,
    base_url: &str,
) -> Result<Delivered, Error> {
    let sources: Vec<&ImageSource> = images.iter().chain(mask.as_ref()).collect();
    let fingerprint = fingerprint(caller, &wire, &sources);
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
        resolved.push(resolve_input(state, caller, src, i).await?);
    }
    let mask = match mask {
        Some(m) => Some(resolve_input(state, caller, m, 0).await?),
        None => None,
    };
    infer_edit_size(&mut req, &resolved);
    charged(state, caller, req, Some(Arc::new(EditInputs { images: resolved, mask })), fingerprint, base_url).await
}

/// `size` absent or `auto` on an edit: keep the (first) input's size.
pub(crate) fn infer_edit_size(req: &mut GenerateImage, inputs: &[InputImage]) {
    if req.size.is_none()
        && let Some((w, h)) = inputs.first().and_then(|i| crate::media::dimensions(&i.bytes))
    {
        req.size = Some(Size::new(w, h));
    }
}

/// A model can edit when one of its backends can; otherwise 400 `unsupported_operation` naming them.
pub(crate) fn check_can_edit(state: &AppState, model: &ModelConfig) -> Result<(), Error> {
    check_backends(
        state,
        model,
        "model",
        |h| h.adapter.supports_edits_for(model),
        |kinds| format!("model `{}` cannot edit images: its backends {kinds} do not support edits", model.id),
    )
}

/// `background: transparent` needs a backend that paints an alpha channel; otherwise 400 `unsupported_operation`
/// (never a silently opaque image).
fn check_can_be_transparent(state: &AppState, model: &ModelConfig, req: &GenerateImage) -> Result<(), Error> {
    if req.background.as_deref() != Some("transparent") {
        return Ok(());
    }
    check_backends(
        state,
        model,
        "background",
        |h| h.adapter.supports_transparency_for(model),
        |kinds| {
            format!(
                "model `{}` cannot make a transparent background: its backends {kinds} cannot paint one (for \
             comfyui/invokeai, the workflow must use {{{{ background }}}}); leave `background` out or set it to `opaque`",
                model.id
            )
        },
    )
}

/// Ok when one of the model's backends passes `can`; else 400 `unsupported_operation` on `param`, with
/// `message` given the list of backends.
fn check_backends(
    state: &AppState,
    model: &ModelConfig,
    param: &str,
    can: impl Fn(&BackendHandle) -> bool,
    message: impl FnOnce(String) -> String,
) -> Result<(), Error> {
    let handles: Vec<&Arc<BackendHandle>> = model.backends.iter().filter_map(|b| state.backends.get(&b.name)).collect();
    if handles.iter().any(|h| can(h)) {
        return Ok(());
    }
    let kinds: Vec<String> = handles.iter().map(|h| format!("`{}` ({})", h.cfg.name, h.cfg.kind)).collect();
    Err(RequestError::param(param, message(kinds.join(", "))).with_code("unsupported_operation").into())
}

/// `POST /v1/images/variations` is an edit of its one image without a mask, prompted by the model's
/// `variation_prompt`: this checks the request is a variation and fills the prompt, so the edit's story (one
/// dispatch, one charge, one error map) runs it unchanged. A model none of whose backends edits is refused with
/// 400 `unsupported_operation`.
pub fn prepare_variation(
    state: &AppState,
    wire: &mut ImagesRequest,
    images: &[ImageSource],
    has_mask: bool,
) -> Result<(), Error> {
    for (field, given) in [
        ("prompt", wire.prompt.is_some()),
        ("mask", has_mask),
        ("stream", wire.stream.is_some()),
        ("partial_images", wire.partial_images.is_some()),
    ] {
        if given {
            return Err(RequestError::param(
                field,
                format!("a variation takes no `{field}`; to change an image by a prompt, use /v1/images/edits"),
            )
            .with_code("unknown_parameter")
            .into());
        }
    }
    match images.len() {
        1 => {}
        0 => return Err(RequestError::param("image", "a variation needs one `image` (a multipart file)").into()),
        n => {
            return Err(RequestError::param("image", format!("a variation takes exactly one `image`, not {n}")).into());
        }
    }
    let model = state.registry.resolve(wire.model.as_deref(), ModelType::Image, "image variations")?;
    check_backends(
        state,
        &model,
        "model",
        |h| h.adapter.supports_edits_for(&model),
        |kinds| {
            format!(
                "model `{}` cannot make variations: variations run as image edits, and its backends {kinds} do not \
             support edits",
                model.id
            )
        },
    )?;
    wire.prompt = Some(model.variation_prompt.clone());
    Ok(())
}

/// For an Idempotency-Key: SHA-256 over the path and the normalized request (the parsed fields, so JSON, multipart and form bodies hash
/// the same; each input image by its own SHA-256).
pub(crate) fn fingerprint(caller: &Caller, wire: &impl serde::Serialize, inputs: &[&ImageSource]) -> [u8; 32] {
    // Only an Idempotency-Key compares fingerprints: without one, hashing (megabytes of edit inputs) is wasted.
    if caller.idempotency_key.is_none() {
        return [0; 32];
    }
    let mut h = Sha256::new();
    h.update(b"POST ");
    h.update(caller.path.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(wire).unwrap_or_default());
    for src in inputs {
        match src {
            ImageSource::Inline(img) => h.update(Sha256::digest(&img.bytes)),
            ImageSource::Stored { id, .. } => h.update(id.as_bytes()),
        }
        h.update(b"\n");
    }
    h.finalize().into()
}

/// The ledger around [`produce`]: hold the price before any backend is called, capture what was produced, release
/// on every failure (and when the client went away), replay a completed Idempotency-Key.
///
/// The ledger's, storage's and transcoding's futures are boxed where they are awaited: a request waiting for
/// admission then holds a future of a few KB rather than one sized for all of them (tens of KB per waiter).
async fn charged(
    state: &AppState,
    caller: &Caller,
    mut req: GenerateImage,
    edit: Option<Arc<EditInputs>>,
    fingerprint: [u8; 32],
    base_url: &str,
) -> Result<Delivered, Error> {
    let operation = if edit.is_some() { "image edits" } else { "image generation" };
    let model = state.registry.resolve(req.model.as_deref(), ModelType::Image, operation)?;
    req.check_model(&model)?;
    // Shared with `produce` from here on; read again for the gallery's record once outputs are stored.
    let (is_edit, req) = (edit.is_some(), Arc::new(req));
    // A streamed answer's body is its `completed` event (the partial events go out before it, as they come).
    let stream = req.stream.map(|_| StreamMeta {
        prefix: StreamMeta::prefix(is_edit),
        size: req.size_or(model.default_size).to_string(),
        quality: StreamMeta::quality(req.quality.as_deref()),
        background: StreamMeta::background(req.background.as_deref()),
    });
    let render = |resp: &ImagesResponse| match &stream {
        Some(meta) => resp.to_sse_completed(meta).into(),
        None => resp.to_json(),
    };
    let content_type = if stream.is_some() { "text/event-stream" } else { "application/json" };
    // Without keys (`auth.mode: none`) nothing is charged; an Idempotency-Key still means the same, through the
    // ledger's anonymous principal and a free hold.
    let who = match &caller.principal {
        Some(p) => p.clone(),
        None if caller.idempotency_key.is_some() => Box::pin(state.ledger.anonymous()).await?,
        None => {
            let (resp, _, outputs) = produce(state, Arc::clone(&req), &model, edit, base_url, caller).await?;
            // Nothing to charge: the gallery's record is written before the answer goes out.
            let made = Made { model: model.id.clone(), request: shown_request(&req, is_edit, &outputs), outputs };
            Box::pin(state.ledger.record_outputs(&made)).await?;
            let partial = resp.partial.clone();
            return Ok(Delivered::Fresh(Box::new(Answer { body: render(&resp), partial, settlement: None })));
        }
    };
    if !who.may_use(&model.id) {
        let allowed = who.allowed_models.as_ref().map(|m| m.join(", ")).unwrap_or_default();
        return Err(Error::ModelNotAllowed { key: who.name.clone(), model: model.id.clone(), allowed });
    }
    let (price_id, unit_mc) = state.prices.get(&model.id).copied().unwrap_or((0, 0));
    let unit_mc = if caller.principal.is_some() { unit_mc } else { 0 };
    let claim = caller.idempotency_key.as_ref().map(|key| IdemClaim {
        key: key.clone(),
        method: "POST".into(),
        path: caller.path.into(),
        fingerprint,
    });
    let hold = state.ledger.hold(&who, price_id, i64::from(req.n), unit_mc, hold_lease(state, &model), claim.as_ref());
    let hold_id = match Box::pin(hold).await? {
        HoldOutcome::Replay { status, content_type, body } => {
            return Ok(Delivered::Replayed(StoredResponse { status, content_type, body }));
        }
        HoldOutcome::Held { hold_id } => hold_id,
    };
    match produce(state, Arc::clone(&req), &model, edit, base_url, caller).await {
        Ok((resp, produced, outputs)) => {
            let request = shown_request(&req, is_edit, &outputs);
            let body = render(&resp);
            if caller.gone.is_cancelled() {
                release(state, &hold_id, "client went away").await;
                return Err(Error::ClientGone);
            }
            // Only an Idempotency-Key needs the body stored (a copy); without one nothing is copied.
            let record = claim.map(|c| {
                let stored = StoredResponse { status: 200, content_type: content_type.into(), body: body.to_vec() };
                (who.clone(), c.key, stored)
            });
            let guard = Some(state.settling.begin(who.account_id));
            let settlement = Settlement {
                state: state.clone(),
                hold_id,
                produced: produced as i64,
                record,
                made: Made { model: model.id.clone(), request, outputs },
                settled: false,
                guard,
            };
            Ok(Delivered::Fresh(Box::new(Answer { body, partial: resp.partial.clone(), settlement: Some(settlement) })))
        }
        Err(e) => {
            let reason = match &e {
                Error::Backend(b) => b.outcome(),
                Error::Admission(_) => "busy",
                Error::ClientGone => "client went away",
                _ => "failed",
            };
            release(state, &hold_id, reason).await;
            Err(e)
        }
    }
}

async fn release(state: &AppState, hold_id: &str, reason: &str) {
    if let Err(e) = Box::pin(state.ledger.release(hold_id, reason)).await {
        tracing::error!(hold = %hold_id, error = %e, "Releasing a hold failed; the reaper releases it when its lease ends.");
    }
}

/// How long a hold may stay open: the longest the request could take, plus a minute.
fn hold_lease(state: &AppState, model: &ModelConfig) -> Duration {
    super::dispatch::longest(state, model) + Duration::from_secs(60)
}

pub(crate) async fn resolve_input(
    state: &AppState,
    caller: &Caller,
    src: ImageSource,
    index: usize,
) -> Result<InputImage, Error> {
    match src {
        ImageSource::Inline(img) => Ok(img),
        ImageSource::Stored { id, param } => {
            let missing =
                || RequestError::param(param, format!("file `{id}` was not issued by this gateway (or was deleted)"));
            // With keys, only the key that made an output may use it; another key is told it does not exist.
            if let Some(who) = &caller.principal {
                state.settling.wait(Some(who.account_id), crate::ledger::SETTLE_WAIT).await;
                if Box::pin(state.ledger.output_owner(&id)).await? != Some(who.key_id) {
                    return Err(missing().into());
                }
            }
            match Box::pin(state.files.get(&id)).await? {
                Some((bytes, format)) => {
                    Ok(InputImage { bytes, format, name: format!("input-{index}.{}", format.as_str()) })
                }
                None => Err(missing().into()),
            }
        }
    }
}

/// Runs the upstream calls and delivers the images; returns the response, how many images it holds and those it
/// stored.
pub(crate) async fn produce(
    state: &AppState,
    req: Arc<GenerateImage>,
    model: &Arc<ModelConfig>,
    edit: Option<Arc<EditInputs>>,
    base_url: &str,
    caller: &Caller,
) -> Result<(ImagesResponse, usize, Vec<MadeOutput>), Error> {
    let gone = &caller.gone;
    // 1. The model must be able to do it.
    if edit.is_some() {
        check_can_edit(state, model)?;
    }
    check_can_be_transparent(state, model, &req)?;
    let size = req.size_or(model.default_size);

    // 2. Plan the upstream calls.
    let per_call = model
        .backends
        .iter()
        .filter_map(|b| state.backends.get(&b.name).map(|h| (b, h)))
        .map(|(b, h)| b.max_images_per_call.map_or(h.cfg.max_images_per_call, |m| m.min(h.cfg.max_images_per_call)))
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
    let results = futures_util::future::join_all(
        calls.into_iter().map(|plan| run_call(state, model, &req, edit.as_ref(), plan, gone, &caller.progress)),
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
    if gone.is_cancelled() {
        // Nobody is waiting for the answer: store nothing.
        return Err(Error::ClientGone);
    }
    let partial = first_error.as_ref().map(|e| {
        tracing::warn!(model = %model.id, produced = outputs.len(), asked = req.n, error = %e, "Returning a partial result.");
        m::images_missing(&model.id, u64::from(req.n) - outputs.len() as u64);
        Partial { requested: req.n, produced: outputs.len() as u32, error: e.to_string() }
    });
    // Report the size that was made, not the one asked for (backends round, clamp or ignore sizes).
    let made = outputs.first().and_then(|o| o.image.dimensions()).map(|(w, h)| Size::new(w, h));
    let reported = Reported::of(&outputs);

    // 4. Format and deliver.
    let target = req.output_format.unwrap_or_else(|| common_format(&outputs));
    let mut data = Vec::with_capacity(outputs.len());
    let mut stored = Vec::new();
    for out in outputs {
        // The upstream's base64, in the format asked for, goes out as it came: no decode, no encode, no copy.
        if let (ResponseFormat::B64Json, ImageBytes::Base64(b64)) = (req.response_format, &out.image)
            && out.format == target
        {
            data.push(ImageItem { data: ImageData::Encoded(b64.clone()), revised_prompt: out.revised_prompt });
            continue;
        }
        let raw = out.image.into_bytes().map_err(Error::Internal)?;
        let bytes = if out.format == target {
            raw
        } else {
            Box::pin(crate::media::transcode(raw, target, req.output_compression)).await.map_err(|e| match e {
                crate::media::DecodeError::TooLarge(m) => Error::UpstreamImageTooLarge(m),
                e => Error::Internal(format!("transcoding to {}: {e}", target.as_str())),
            })?
        };
        let item = match req.response_format {
            ResponseFormat::B64Json => ImageData::B64(bytes),
            ResponseFormat::Url => {
                let id = Box::pin(state.files.put(&bytes, target)).await?;
                let url = format!("{}/v1/files/{id}?{}", base_url.trim_end_matches('/'), state.signer.query(&id));
                stored.push(MadeOutput {
                    id,
                    kind: "image".into(),
                    mime: target.mime().into(),
                    bytes: bytes.len() as i64,
                    poster: None,
                });
                ImageData::Url(url)
            }
        };
        data.push(ImageItem { data: item, revised_prompt: out.revised_prompt });
    }
    m::generation(&model.id, if partial.is_some() { "partial" } else { "ok" }, data.len() as u64);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let produced = data.len();
    let size = made.unwrap_or(size).to_string();
    let quality = reported.quality.unwrap_or_else(|| StreamMeta::quality(req.quality.as_deref()).to_owned());
    let background =
        reported.background.unwrap_or_else(|| StreamMeta::background(req.background.as_deref()).to_owned());
    let resp = ImagesResponse {
        created,
        data,
        output_format: target.as_str(),
        size: Some(size),
        quality: Some(quality),
        background: Some(background),
        usage: reported.usage,
        partial,
    };
    Ok((resp, produced, stored))
}

impl Reported {
    /// What the backends reported over all of a request's images: usage summed (absent when none reported it),
    /// `quality` and `background` from the first image that carries them.
    fn of(outputs: &[ImageOutput]) -> Self {
        let told: Vec<&Reported> = outputs.iter().filter_map(|o| o.reported.as_deref()).collect();
        let usage = told.iter().filter_map(|r| r.usage).reduce(|a, b| TokenUsage {
            input_tokens: a.input_tokens + b.input_tokens,
            output_tokens: a.output_tokens + b.output_tokens,
            total_tokens: a.total_tokens + b.total_tokens,
        });
        Self {
            usage,
            quality: told.iter().find_map(|r| r.quality.clone()),
            background: told.iter().find_map(|r| r.background.clone()),
        }
    }
}

/// The request as the gallery shows it (JSON text): what was asked, without the input images themselves. Only
/// stored outputs are shown there, so with none (base64 answers) nothing is built.
fn shown_request(req: &GenerateImage, edit: bool, outputs: &[MadeOutput]) -> String {
    if outputs.is_empty() {
        return String::new();
    }
    let mut shown = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        if !v.is_null() {
            shown.insert(k.to_owned(), v);
        }
    };
    put("operation", (if edit { "edits" } else { "generations" }).into());
    put("model", req.model.clone().into());
    put("prompt", req.prompt.clone().into());
    put("negative_prompt", req.negative_prompt.clone().into());
    put("n", req.n.into());
    put("size", req.size.map(|s| s.to_string()).into());
    put("quality", req.quality.clone().into());
    put("output_format", req.output_format.map(|f| f.as_str()).into());
    put("background", req.background.clone().into());
    put("seed", req.seed.into());
    put("steps", req.steps.into());
    put("guidance_scale", req.guidance_scale.into());
    serde_json::Value::Object(shown).to_string()
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

/// One upstream call for part of `n`, through the shared dispatch (admission, timeout, fallback, circuit).
async fn run_call(
    state: &AppState,
    model: &Arc<ModelConfig>,
    req: &Arc<GenerateImage>,
    edit: Option<&Arc<EditInputs>>,
    plan: CallPlan,
    gone: &CancellationToken,
    progress: &Progress,
) -> Result<Vec<ImageOutput>, Error> {
    let transparent = req.background.as_deref() == Some("transparent");
    let usable = |h: &BackendHandle| {
        (edit.is_none() || h.adapter.supports_edits_for(model))
            && (!transparent || h.adapter.supports_transparency_for(model))
    };
    dispatch(state, model, Capability::Images, gone, usable, |handle, permit| async move {
        let call = ImageCall {
            request: req,
            model,
            count: plan.count,
            seed: plan.seed,
            size: plan.size,
            edit: edit.map(|e| e.as_ref()),
            cancel: gone,
            progress,
        };
        // The slot is held until the upstream call ends. If the client goes away meanwhile, adapters that can
        // cancel upstream work do so; the others finish, because the GPU is busy either way.
        let result = handle.adapter.generate_images(call).await;
        drop(permit);
        match result {
            Ok(images) if images.is_empty() => Err(BackendError::new(
                &handle.cfg.name,
                handle.cfg.kind,
                handle.cfg.endpoint(""),
                Failure::InvalidResponse("the response held no images".into()),
            )),
            other => other,
        }
    })
    .await
}
