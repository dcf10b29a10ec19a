//! Handler of the configured legacy routes (`routes:`): reads the legacy JSON body, runs it through the
//! pipeline, writes the legacy answer. The hold settles when the body is delivered, as on `/v1/images/*`.

use axum::Extension;
use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::extract::ImageBody;
use super::images::{SettledBody, caller};
use crate::error::Error;
use crate::ledger::Principal;
use crate::pipeline::images::Delivered;
use crate::state::AppState;

/// `POST <route.path>` for each configured route.
pub async fn handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    matched: MatchedPath,
    headers: HeaderMap,
    ImageBody(body): ImageBody<Map<String, Value>>,
) -> Result<Response, ApiError> {
    let Some(route) = state.config.routes.iter().find(|r| r.path == matched.as_str()).cloned() else {
        return Err(Error::RouteNotFound { method: "POST".into(), path: matched.as_str().to_owned() }.into());
    };
    let base = super::base_url(&state, &headers);
    let (caller, _) = caller(&headers, principal, "/v1/images/generations", None)?;
    let gone_on_drop = caller.gone.clone().drop_guard();
    let started = std::time::Instant::now();
    let task = {
        let (state, route) = (state.clone(), route.clone());
        tokio::spawn(crate::telemetry::context::propagate(async move {
            crate::pipeline::routes::run(&state, &caller, &route, body, &base).await
        }))
    };
    let delivered = task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    drop(gone_on_drop.disarm());
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (openai, settlement) = match delivered {
        Delivered::Fresh(answer) => (answer.body.into_bytes(), answer.settlement),
        Delivered::Replayed(stored) => (stored.body.into(), None),
    };
    // A body that cannot be rendered is never delivered: the settlement drops with it and releases the hold.
    let (content_type, body) = crate::pipeline::routes::render(&route, openai, took_ms)?;
    let mut resp = Response::new(Body::new(SettledBody::new(body.into(), settlement)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}
