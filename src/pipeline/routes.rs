//! Legacy routes (`routes:` in config): a legacy JSON body becomes an images request for the route's model, runs
//! through the one images pipeline (admission, fallback, credits), and the images response is rendered back in
//! the legacy shape. Nothing here talks HTTP.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::images::{Caller, Delivered};
use crate::api::images::ImagesRequest;
use crate::config::{RouteConfig, RouteField, RouteResponse};
use crate::error::Error;
use crate::request::RequestError;
use crate::state::AppState;

/// Runs `body` as the images request `route` maps it to; the answer's body is OpenAI's (b64 images), to be
/// rendered by [`render`].
pub async fn run(
    state: &AppState,
    caller: &Caller,
    route: &RouteConfig,
    body: Map<String, Value>,
    base_url: &str,
) -> Result<Delivered, Error> {
    let wire = images_request(route, &Value::Object(body))?;
    super::images::generate_images(state, caller, wire, base_url).await
}

/// The images request a legacy body stands for: each mapped field's first match, numbers given as strings taken
/// as numbers, `width`+`height` joined into `size`.
fn images_request(route: &RouteConfig, body: &Value) -> Result<ImagesRequest, RequestError> {
    let mut out = Map::new();
    let (mut width, mut height) = (None, None);
    for (field, path) in &route.request {
        let Some(found) = path.query(body).first().cloned() else { continue };
        if found.is_null() {
            continue;
        }
        let name = field.name();
        match field {
            RouteField::Prompt | RouteField::NegativePrompt | RouteField::Size => {
                let Some(s) = found.as_str() else {
                    return Err(RequestError::param(name, format!("`{name}` must be a string")));
                };
                out.insert(name.into(), json!(s));
            }
            RouteField::GuidanceScale => {
                let n =
                    number(&found).ok_or_else(|| RequestError::param(name, format!("`{name}` must be a number")))?;
                out.insert(name.into(), json!(n));
            }
            RouteField::N | RouteField::Seed | RouteField::Steps | RouteField::Width | RouteField::Height => {
                let n = whole(&found)
                    .ok_or_else(|| RequestError::param(name, format!("`{name}` must be a whole number ≥ 0")))?;
                match field {
                    RouteField::Width => width = Some(n),
                    RouteField::Height => height = Some(n),
                    _ => {
                        out.insert(name.into(), json!(n));
                    }
                }
            }
        }
    }
    match (width, height) {
        (Some(w), Some(h)) => {
            out.insert("size".into(), json!(format!("{w}x{h}")));
        }
        (None, None) => {}
        _ => return Err(RequestError::param("size", "give both `width` and `height`, or neither")),
    }
    if !out.contains_key("prompt") {
        return Err(RequestError::param("prompt", "`prompt` is required"));
    }
    out.insert("model".into(), json!(route.model));
    out.insert("response_format".into(), json!("b64_json"));
    serde_json::from_value(Value::Object(out)).map_err(|e| RequestError::new(format!("invalid request: {e}")))
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())).filter(|n| n.is_finite())
}

fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The legacy answer for an images response body (OpenAI's JSON with `b64_json` images): `(content type, body)`.
pub fn render(route: &RouteConfig, openai: Bytes, took_ms: u64) -> Result<(&'static str, Bytes), Error> {
    // OpenAI's answer goes out as it is: no parse, no copy.
    if matches!(route.response, RouteResponse::OpenAi) {
        return Ok(("application/json", openai));
    }
    let bad = |what: &str| {
        Error::Internal(format!("the images response could not be read for route `{}`: {what}", route.path))
    };
    let v: Value = serde_json::from_slice(&openai).map_err(|e| bad(&e.to_string()))?;
    let images: Vec<&str> =
        v["data"].as_array().map(|d| d.iter().filter_map(|i| i["b64_json"].as_str()).collect()).unwrap_or_default();
    let format = v["output_format"].as_str().unwrap_or("png");
    match &route.response {
        RouteResponse::OpenAi => Ok(("application/json", openai.clone())),
        RouteResponse::Image => {
            use base64::Engine;
            let first = images.first().ok_or_else(|| bad("no image"))?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(first).map_err(|e| bad(&e.to_string()))?;
            let mime = crate::media::sniff(&bytes).map_or("application/octet-stream", |f| f.mime());
            Ok((mime, Bytes::from(bytes)))
        }
        RouteResponse::Template(source) => {
            let size = v["size"].as_str().unwrap_or_default();
            let (w, h) = size.split_once('x').unwrap_or(("0", "0"));
            let mime = format!("image/{format}");
            let ctx = json!({
                "images": images,
                "image": images.first(),
                "data_urls": images.iter().map(|b| format!("data:{mime};base64,{b}")).collect::<Vec<_>>(),
                "width": w.parse::<u64>().unwrap_or(0),
                "height": h.parse::<u64>().unwrap_or(0),
                "size": size,
                "model": route.model,
                "created": v["created"],
                "took_ms": took_ms,
                "output_format": format,
            });
            let text = crate::backends::workflow::render_text("response", source, ctx).map_err(|e| bad(&e))?;
            Ok(("application/json", Bytes::from(text)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(request: &[(&str, &str)]) -> RouteConfig {
        let mut p = Vec::new();
        let models = vec![std::sync::Arc::new(
            crate::config::load(None, &crate::config::MapEnv::new([])).unwrap().models[0].as_ref().clone(),
        )];
        let map = request.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let raw = crate::config::routes::RawRoute {
            path: Some("/generate".into()),
            model: Some("easel-sim".into()),
            request: if request.is_empty() { None } else { Some(map) },
            response: None,
        };
        let r = crate::config::routes::validate(&mut p, vec![raw], &models);
        assert!(p.is_empty(), "{p:?}");
        r.into_iter().next().unwrap()
    }

    #[test]
    fn maps_legacy_fields_and_says_what_is_wrong() {
        let r = route(&[]);
        let req = images_request(&r, &json!({"prompt": "a cat", "width": "640", "height": 480, "seed": 7})).unwrap();
        assert_eq!((req.prompt.as_deref(), req.size.as_deref(), req.seed), (Some("a cat"), Some("640x480"), Some(7)));
        assert_eq!((req.model.as_deref(), req.response_format.as_deref()), (Some("easel-sim"), Some("b64_json")));
        let e = images_request(&r, &json!({"width": 64, "height": 64})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = images_request(&r, &json!({"prompt": "x", "width": 64})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("size"));
        let e = images_request(&r, &json!({"prompt": "x", "seed": -1})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seed"));
        let nested = route(&[("prompt", "$.input.text"), ("n", "$.count")]);
        let req = images_request(&nested, &json!({"input": {"text": "deep"}, "count": 2})).unwrap();
        assert_eq!((req.prompt.as_deref(), req.n), (Some("deep"), Some(2)));
    }
}
