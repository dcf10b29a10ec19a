//! `/v1/videos*` and `/v1/jobs/{id}`: thin handlers over `pipeline::videos`; the mapping from a stored job to
//! OpenAI's `video` object is `api::videos::video`.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::error::ApiError;
use super::extract::VideoBody;
use super::images::caller;
use crate::api::videos::{Video, VideoDeleted, VideoList, status, video};
use crate::error::Error;
use crate::ledger::Principal;
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
    let task = tokio::spawn(crate::telemetry::context::propagate(async move {
        videos::create(&state, &caller, body.fields, body.reference).await
    }));
    let job = task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    Ok(Json(video(&job)))
}

/// `GET /v1/videos/{id}`.
pub async fn get_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Video>, ApiError> {
    let (caller, _) = caller(&headers, principal, "/v1/videos", None)?;
    Ok(Json(video(&videos::owned_video(&state, &caller, &id).await?)))
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
            "limit" => limit = super::extract::list_limit(&v)?,
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
    videos::owned_video(&state, &caller, &id).await?;
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
    videos::owned_video(&state, &caller, &id).await?;
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
    let job = videos::owned_video(&state, &caller, &id).await?;
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
    super::files::send(&state, &file, &headers, "private, max-age=86400").await
}
