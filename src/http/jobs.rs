//! `/v1/jobs/{id}` for every job (image jobs and videos alike): the one mapping from a stored job to what clients
//! see (OpenAI's `video` object for videos, easel's `job` object otherwise, with `result` the normal images
//! response once completed), reads, cancel, delete, and the Server-Sent Events stream of a job's life.

use axum::Extension;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::error::ApiError;
use super::images::caller;
use crate::api::images::{ImageData, ImageItem, ImagesResponse, Partial};
use crate::api::videos::video;
use crate::ledger::{JobRecord, Principal, Store};
use crate::pipeline::videos;
use crate::request::ResponseFormat;
use crate::state::AppState;

/// A stored job as its clients see it; `base` is where stored outputs are served.
pub async fn public(state: &AppState, job: &JobRecord, base: &str) -> Value {
    if job.object == "video" {
        return serde_json::to_value(video(job)).unwrap_or(Value::Null);
    }
    let result = match (&job.outputs, job.state.as_str()) {
        (Some(outputs), "succeeded") => images_result(state, job, outputs, base).await,
        _ => Value::Null,
    };
    crate::api::jobs::job_object(job, result)
}

/// The images response of a completed image job, in the `response_format` its request asked for.
async fn images_result(state: &AppState, job: &JobRecord, outputs: &Value, base: &str) -> Value {
    let format = match job.request["wire"]["response_format"].as_str() {
        Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        _ => state.config.defaults.response_format,
    };
    let mut data = Vec::new();
    for image in outputs["images"].as_array().into_iter().flatten() {
        let Some(file) = image["file"].as_str() else { continue };
        let revised_prompt = image["revised_prompt"].as_str().map(str::to_owned);
        let item = match format {
            ResponseFormat::Url => {
                ImageData::Url(format!("{}/v1/files/{file}?{}", base.trim_end_matches('/'), state.signer.query(file)))
            }
            ResponseFormat::B64Json => match state.files.get(file).await {
                Ok(Some((bytes, _))) => ImageData::B64(bytes),
                // Deleted since (or the store failed): say so rather than pretend.
                _ => {
                    tracing::warn!(job = %job.id, file, "A completed job's image is no longer stored.");
                    continue;
                }
            },
        };
        data.push(ImageItem { data: item, revised_prompt });
    }
    let partial = outputs["partial"].as_object().map(|p| Partial {
        requested: p.get("requested").and_then(Value::as_u64).unwrap_or(0) as u32,
        produced: p.get("produced").and_then(Value::as_u64).unwrap_or(0) as u32,
        error: p.get("error").and_then(Value::as_str).unwrap_or_default().to_owned(),
    });
    let resp = ImagesResponse {
        created: outputs["created"].as_u64().unwrap_or(0),
        data,
        output_format: match outputs["output_format"].as_str() {
            Some("jpeg") => "jpeg",
            Some("webp") => "webp",
            _ => "png",
        },
        size: outputs["size"].as_str().map(str::to_owned),
        quality: outputs["quality"].as_str().map(str::to_owned),
        background: outputs["background"].as_str().map(str::to_owned),
        usage: outputs["usage"].as_object().map(|u| {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            crate::backends::TokenUsage {
                input_tokens: n("input_tokens"),
                output_tokens: n("output_tokens"),
                total_tokens: n("total_tokens"),
            }
        }),
        partial,
    };
    serde_json::from_slice(&resp.to_json().into_bytes()).unwrap_or(Value::Null)
}

/// `GET /v1/jobs/{id}`.
pub async fn get_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/jobs", None)?;
    let job = videos::owned_job(&state, &caller, &id).await?;
    Ok(Json(public(&state, &job, &super::base_url(&state, &headers)).await))
}

/// `POST /v1/jobs/{id}/cancel`: stops the job (upstream too) and releases its hold.
pub async fn cancel_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/jobs", None)?;
    let job = videos::cancel(&state, &caller, &id).await?;
    Ok(Json(public(&state, &job, &super::base_url(&state, &headers)).await))
}

/// `DELETE /v1/jobs/{id}`: forgets a finished job and deletes its outputs.
pub async fn delete_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/jobs", None)?;
    let job = videos::owned_job(&state, &caller, &id).await?;
    videos::delete(&state, &caller, &id).await?;
    Ok(Json(json!({"id": id, "object": format!("{}.deleted", job.object), "deleted": true})))
}

/// The event a job's current state stands for, with its id: ids only grow through a job's life (`queued` 1,
/// `started` 2, `progress` 100 + percent, `completed`/`failed` 1000), so `Last-Event-ID` resumes after what a
/// client saw without replaying it. A `preview` carries the id of the progress it came with.
fn job_event(job: &JobRecord) -> (u32, &'static str) {
    match job.state.as_str() {
        "pending" | "submitting" | "queued" => (1, "queued"),
        "succeeded" => (1000, "completed"),
        "failed" | "canceled" => (1000, "failed"),
        _ if job.progress > 0 => (100 + job.progress.clamp(0, 99) as u32, "progress"),
        _ => (2, "started"),
    }
}

/// How long an event stream waits for a change before it looks again (changes made by another instance).
const EVENT_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// What an event stream has sent so far.
struct Watch {
    state: AppState,
    base: String,
    job: Option<JobRecord>,
    /// The id of the last event sent (or the client's `Last-Event-ID`).
    last: u32,
    /// The sequence number of the last preview sent.
    preview: u64,
    done: bool,
}

/// `GET /v1/jobs/{id}/events` (and `/v1/videos/{id}/events`): Server-Sent Events for one job — `queued`,
/// `started`, `progress`, `preview` (a small image as a data URL, where the backend sends previews), `completed`
/// (with the job), `failed` (with its error) — each `data` the job object, resumable with `Last-Event-ID`.
/// Watching changes nothing: a job outlives its watchers.
pub async fn events_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/jobs", None)?;
    let job = videos::owned_job(&state, &caller, &id).await?;
    let last: u32 =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let base = super::base_url(&state, &headers);
    let watch = Watch { state, base, job: Some(job), last, preview: 0, done: false };
    let stream = futures_util::stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        let mut job = w.job.take()?;
        loop {
            let (event_id, name) = job_event(&job);
            if event_id > w.last {
                let data = public(&w.state, &job, &w.base).await;
                let frame = format!("id: {event_id}\nevent: {name}\ndata: {data}\n\n");
                w.done = job.is_terminal();
                w.last = event_id;
                w.job = Some(job);
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), w));
            }
            if job.is_terminal() {
                return None;
            }
            if let Some((seq, p)) = w.state.jobs.preview_after(&job.id, w.preview) {
                w.preview = seq;
                let url = format!(
                    "data:image/{};base64,{}",
                    p.format.as_str(),
                    base64::Engine::encode(crate::media::base64_encoder(), &p.bytes)
                );
                let data = json!({"id": job.id, "object": job.object, "progress": job.progress, "image": url});
                let frame = format!("id: {}\nevent: preview\ndata: {data}\n\n", w.last);
                w.job = Some(job);
                return Some((Ok(Bytes::from(frame)), w));
            }
            w.state.jobs.next_change(EVENT_RECHECK).await;
            job = match w.state.ledger.job(&job.id).await {
                Ok(Some(j)) => j,
                _ => return None,
            };
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
