//! `/v1/videos*` and `/v1/jobs/{id}`: thin handlers over `pipeline::videos`; the mapping from a stored job to
//! OpenAI's `video` object is `api::videos::video`.

use axum::Extension;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::VideoBody;
use super::images::caller;
use crate::api::videos::{Video, VideoDeleted, VideoList, status, video};
use crate::error::Error;
use crate::ledger::{JobRecord, Principal, Store};
use crate::pipeline::videos;
use crate::request::RequestError;
use crate::state::AppState;

/// `POST /v1/videos`.
pub async fn create_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: VideoBody,
) -> Result<Json<Video>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    // The submit runs in its own task: a client that leaves cannot leave a job half made.
    let task = tokio::spawn(async move { videos::create(&state, &caller, body.fields, body.reference).await });
    let job = task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    Ok(Json(video(&job)))
}

/// `GET /v1/videos/{id}` and `GET /v1/jobs/{id}`.
pub async fn get_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Video>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    Ok(Json(video(&videos::owned_job(&state, &caller, &id).await?)))
}

/// `GET /v1/videos?limit&order&after`.
pub async fn list_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<VideoList>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    let (mut limit, mut ascending, mut after) = (20u32, false, None);
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v.parse().ok().filter(|l| (1..=100).contains(l)).ok_or_else(|| {
                    RequestError::param("limit", format!("`limit` must be a whole number from 1 to 100, not `{v}`"))
                })?;
            }
            "order" => {
                ascending = match v.as_ref() {
                    "asc" => true,
                    "desc" => false,
                    other => {
                        return Err(RequestError::param(
                            "order",
                            format!("`order` must be asc or desc, not `{other}`"),
                        )
                        .into());
                    }
                };
            }
            "after" => after = Some(v.into_owned()),
            other => return Err(RequestError::param(other, format!("unknown query parameter `{other}`")).into()),
        }
    }
    let (jobs, has_more) = videos::list_videos(&state, &caller, after.as_deref(), limit, ascending).await?;
    let data: Vec<Video> = jobs.iter().map(video).collect();
    Ok(Json(VideoList {
        object: "list",
        first_id: data.first().map(|v| v.id.clone()),
        last_id: data.last().map(|v| v.id.clone()),
        data,
        has_more,
    }))
}

/// `DELETE /v1/videos/{id}`.
pub async fn delete_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<VideoDeleted>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    videos::delete(&state, &caller, &id).await?;
    Ok(Json(VideoDeleted { id, object: "video.deleted", deleted: true }))
}

/// `POST /v1/videos/{id}/cancel` (an easel extension): cancels upstream and releases the hold.
pub async fn cancel_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Video>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    Ok(Json(video(&videos::cancel(&state, &caller, &id).await?)))
}

/// `GET /v1/videos/{id}/content?variant=video|thumbnail`.
pub async fn content_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    let mut variant = "video".to_owned();
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        if k == "variant" {
            variant = v.into_owned();
        }
    }
    if !matches!(variant.as_str(), "video" | "thumbnail" | "spritesheet") {
        return Err(
            RequestError::param("variant", format!("`variant` must be video or thumbnail, not `{variant}`")).into()
        );
    }
    let job = videos::owned_job(&state, &caller, &id).await?;
    if job.state != "succeeded" {
        return Err(RequestError::param(
            "video_id",
            format!("video `{id}` is {}; its content exists once it is completed", status(&job.state)),
        )
        .with_code("video_not_ready")
        .into());
    }
    let Some(file) = videos::output_file(&job, &variant) else {
        return Err(RequestError::param("variant", format!("the backend made no {variant} for video `{id}`"))
            .with_code("variant_not_available")
            .into());
    };
    let Some((bytes, mime)) = state.files.get_media(&file).await? else {
        return Err(Error::FileNotFound(file).into());
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        bytes,
    )
        .into_response())
}

/// The event a job's current state stands for, with its id: ids only grow through a job's life (`queued` 1,
/// `started` 2, `progress` 100 + percent, `completed`/`failed` 1000), so `Last-Event-ID` resumes after what a
/// client saw without replaying it.
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

/// `GET /v1/jobs/{id}/events` (and `/v1/videos/{id}/events`): Server-Sent Events for one job — `queued`,
/// `started`, `progress`, `completed` (with the job), `failed` (with its error) — each `data` the job object,
/// resumable with `Last-Event-ID`. Watching changes nothing: a job outlives its watchers.
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
    let stream = futures_util::stream::unfold((state, Some(job), last, false), |(state, job, last, done)| async move {
        if done {
            return None;
        }
        let mut job = match job {
            Some(j) => j,
            None => return None,
        };
        loop {
            let (event_id, name) = job_event(&job);
            if event_id > last {
                let data = serde_json::to_string(&video(&job)).unwrap_or_default();
                let frame = format!("id: {event_id}\nevent: {name}\ndata: {data}\n\n");
                let end = job.is_terminal();
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(frame)),
                    (state, Some(job), event_id, end),
                ));
            }
            if job.is_terminal() {
                return None;
            }
            state.jobs.next_change(EVENT_RECHECK).await;
            job = match state.ledger.job(&job.id).await {
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
