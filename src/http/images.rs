//! `/v1/images/*` handlers: extract, call the pipeline, write the body. Nothing else.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::{EditBody, ImageBody};
use crate::api::images::ImagesRequest;
use crate::pipeline;
use crate::state::AppState;

/// `POST /v1/images/generations`.
pub async fn generations_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    ImageBody(body): ImageBody<ImagesRequest>,
) -> Result<Response, ApiError> {
    let base = super::base_url(&state, &headers);
    let resp = pipeline::images::generate_images(&state, body, &base).await?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], resp.to_json()).into_response())
}

/// `POST /v1/images/edits`.
pub async fn edits_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: EditBody,
) -> Result<Response, ApiError> {
    let base = super::base_url(&state, &headers);
    let resp = pipeline::images::edit_images(&state, body.fields, body.images, body.mask, &base).await?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], resp.to_json()).into_response())
}
