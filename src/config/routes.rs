//! `routes:`: extra inbound routes that serve a legacy image API unchanged (seed 003's `POST /generate
//! {"prompt","width","height"}`). Each maps fields of the legacy JSON body onto an images request for one model
//! (JSON paths), and the images response back (a minijinja template, the first image's bytes, or OpenAI's
//! response as is). Checked here, at load, like the rest of the configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json_path::JsonPath;

use super::ModelConfig;

/// One route as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: Option<String>,
    pub model: Option<String>,
    /// images request field → JSON path into the legacy body (default: the field of the same name at the top).
    pub request: Option<BTreeMap<String, String>>,
    /// `openai` (default), `image` (the first image's bytes) or a minijinja template rendering JSON.
    pub response: Option<String>,
}

/// A field of the images request a legacy body can fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteField {
    Prompt,
    NegativePrompt,
    N,
    Seed,
    Steps,
    GuidanceScale,
    Width,
    Height,
    Size,
}

impl RouteField {
    pub const ALL: [(&'static str, RouteField); 9] = [
        ("prompt", Self::Prompt),
        ("negative_prompt", Self::NegativePrompt),
        ("n", Self::N),
        ("seed", Self::Seed),
        ("steps", Self::Steps),
        ("guidance_scale", Self::GuidanceScale),
        ("width", Self::Width),
        ("height", Self::Height),
        ("size", Self::Size),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, f)| *f == self).map_or("?", |(n, _)| n)
    }
}

/// What the route answers.
#[derive(Debug, Clone)]
pub enum RouteResponse {
    /// OpenAI's images response, unchanged (with `b64_json` images).
    OpenAi,
    /// The first image's bytes, with its `Content-Type`.
    Image,
    /// A minijinja template rendering the JSON body; see [`TEMPLATE_VARIABLES`].
    Template(String),
}

/// The variables a response template may use.
pub const TEMPLATE_VARIABLES: &[&str] =
    &["images", "image", "data_urls", "width", "height", "size", "model", "created", "took_ms", "output_format"];

/// A checked route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    pub model: String,
    pub request: Vec<(RouteField, JsonPath)>,
    pub response: RouteResponse,
}

/// Paths easel serves itself; a route may not shadow them.
const RESERVED: &[&str] = &["/v1/", "/health", "/healthz", "/readyz", "/metrics", "/hooks/"];

pub(crate) fn validate(
    p: &mut Vec<(String, String)>,
    raw: Vec<RawRoute>,
    models: &[std::sync::Arc<ModelConfig>],
) -> Vec<RouteConfig> {
    let mut out: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let Some(path) = r.path.filter(|s| !s.is_empty()) else {
            p.push((format!("{at}.path"), "is required (e.g. /generate)".into()));
            continue;
        };
        let path_ok = path.starts_with('/')
            && path.len() > 1
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
            && !path.contains("//");
        if !path_ok {
            p.push((
                format!("{at}.path"),
                format!("`{path}` is not a plain path like /generate (letters, digits, - _ . /)"),
            ));
        } else if RESERVED.iter().any(|r| path == r.trim_end_matches('/') || path.starts_with(r)) {
            p.push((format!("{at}.path"), format!("`{path}` is one of easel's own routes")));
        } else if out.iter().any(|o| o.path == path) {
            p.push((format!("{at}.path"), format!("`{path}` is declared twice")));
        }
        let model = match r.model.as_deref() {
            None => {
                p.push((format!("{at}.model"), "is required: the image model the route runs".into()));
                String::new()
            }
            Some(m) => match models.iter().find(|x| x.id == m) {
                Some(x) if x.kind == super::ModelType::Image => m.to_owned(),
                Some(x) => {
                    p.push((
                        format!("{at}.model"),
                        format!("`{m}` is a {} model; routes run image models", x.kind.as_str()),
                    ));
                    String::new()
                }
                None => {
                    p.push((format!("{at}.model"), format!("no model `{m}` is defined under `models:`")));
                    String::new()
                }
            },
        };
        let mapping: Vec<(String, String)> = match r.request {
            Some(m) => m.into_iter().collect(),
            None => ["prompt", "negative_prompt", "n", "seed", "steps", "guidance_scale", "width", "height", "size"]
                .iter()
                .map(|f| ((*f).to_owned(), format!("$.{f}")))
                .collect(),
        };
        let mut request = Vec::new();
        for (field, expr) in mapping {
            let Some(f) = RouteField::ALL.iter().find(|(n, _)| *n == field).map(|(_, f)| *f) else {
                let names: Vec<&str> = RouteField::ALL.iter().map(|(n, _)| *n).collect();
                p.push((
                    format!("{at}.request.{field}"),
                    format!("is not a field routes can set (one of: {})", names.join(", ")),
                ));
                continue;
            };
            match JsonPath::parse(&expr) {
                Ok(path) => request.push((f, path)),
                Err(e) => p.push((format!("{at}.request.{field}"), format!("`{expr}` is not a JSON path: {e}"))),
            }
        }
        if !request.iter().any(|(f, _)| *f == RouteField::Prompt) {
            p.push((format!("{at}.request"), "must map `prompt`".into()));
        }
        let response = match r.response.as_deref().map(str::trim) {
            None | Some("openai") => RouteResponse::OpenAi,
            Some("image") => RouteResponse::Image,
            Some(t) => match check_template(t) {
                Ok(()) => RouteResponse::Template(t.to_owned()),
                Err(e) => {
                    p.push((format!("{at}.response"), e));
                    RouteResponse::OpenAi
                }
            },
        };
        out.push(RouteConfig { path, model, request, response });
    }
    out
}

/// The template uses only known variables and renders valid JSON for a sample answer.
fn check_template(source: &str) -> Result<(), String> {
    crate::backends::workflow::check_variables("response", source, TEMPLATE_VARIABLES)?;
    let sample = serde_json::json!({
        "images": ["aGVsbG8="], "image": "aGVsbG8=", "data_urls": ["data:image/png;base64,aGVsbG8="],
        "width": 512, "height": 512, "size": "512x512", "model": "m", "created": 1, "took_ms": 3, "output_format": "png",
    });
    let text = crate::backends::workflow::render_text("response", source, sample)?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map(|_| ())
        .map_err(|e| format!("the template does not render JSON ({e}); write strings with `| tojson`"))
}
