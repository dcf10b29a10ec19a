//! `template`: owns the "custom HTTP image server" protocol, for servers easel has no adapter for: the config
//! describes the request (method, path, headers, a minijinja body template, content type) and where the images
//! are in the answer. One image per call (`n` > 1 makes that many calls).
//!
//! ```yaml
//! backends:
//!   mine:
//!     kind: template
//!     url: http://gpu:9000
//!     method: POST                      # POST (default), PUT or GET
//!     path: /generate
//!     headers: {X-Team: imaging}        # sent on every call; `api_key` is sent as `Authorization: Bearer`
//!     content_type: application/json   # the default
//!     body: '{"prompt": {{ prompt | tojson }}, "width": {{ width }}, "height": {{ height }}, "seed": {{ seed }}}'
//!     response: {images: "$.images[*]"} # absent: the answer body itself is the image
//! ```
//!
//! **Body variables** (the template is compiled with strict undefined: a misspelt name is a config error):
//! `prompt`; `negative_prompt` (empty string when none); `seed` (integer: the call's, else a fresh random one in
//! 0..2^32); `width`, `height`; `n` (images for this call, always 1); `steps` and `guidance_scale` (the request's
//! or the model's, **null when unset**: write `{{ steps | tojson }}` to send `null`, or `{{ steps or 30 }}` for a
//! default); `model` (the model's `upstream_model`); `extra` (the request's `extra` object, empty when none: a
//! missing key is an error when printed bare, `null` through `tojson`; `{{ extra.style | default("photo") |
//! tojson }}` gives a default, `{{ extra | tojson }}` sends all of it).
//!
//! **JSON safety**: inside a JSON body write every string as `{{ prompt | tojson }}` (it adds the quotes and
//! escapes quotes, backslashes and newlines); `"{{ prompt }}"` breaks on the first quote in a prompt. The body is
//! checked at config load by rendering it with sample values (with and without `steps`/`guidance_scale`) and,
//! for a JSON content type, parsing the result; errors name the template line. For a form body use
//! `{{ prompt | urlencode }}`. With `method: GET` no body is sent: the rendered text, if any, becomes the query
//! string (`prompt={{ prompt | urlencode }}&w={{ width }}`; set a non-JSON `content_type` such as
//! `application/x-www-form-urlencoded` so the load-time check does not expect JSON).
//!
//! **Answers**: with `response.images` (a JSON path, RFC 9535), the first `n` matches are used; each must be a
//! string holding base64, a `data:` URL, an http(s) URL (downloaded with the backend's timeout and size cap), or a
//! path on the server (`/files/x.png`). Without it, the answer body must be a PNG, JPEG or WebP image. A body that
//! cannot render for one request (say, `extra` has a value of the wrong type) is refused as a 400 naming the
//! template line.
//!
//! Health: `GET` of the server root. Any HTTP answer, even a 404, proves the server is up (custom servers rarely
//! have a health route); a refused connection or a timeout means down. Readiness cannot be known, so an answering
//! server counts as ready.

use std::sync::Arc;

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use serde_json::{Map, Value};
use serde_json_path::JsonPath;

use super::client::Http;
use super::error::excerpt;
use super::workflow::{check_variables, fresh_seed, render_text};
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport, decode_image_b64, image_from_bytes};
use crate::config::{BackendConfig, TemplateConfig};

pub const KIND: &str = "template";

/// The variables a body template may use.
const VARIABLES: &[&str] =
    &["prompt", "negative_prompt", "seed", "width", "height", "n", "steps", "guidance_scale", "model", "extra"];

/// How much of an unexpected answer is quoted in an error.
const ANSWER_EXCERPT: usize = 300;

#[derive(Debug)]
pub struct TemplateBackend {
    /// The pooled client (it adds the configured `headers`); `cfg.template` is guaranteed by [`Self::new`].
    http: Http,
}

impl TemplateBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        if cfg.template.is_none() {
            return Err(format!("backend `{}` has no template settings (`path`, `body`, `response`)", cfg.name));
        }
        Ok(Self { http: Http::new(cfg)? })
    }

    fn settings(&self) -> Result<&TemplateConfig, BackendError> {
        self.http
            .cfg
            .template
            .as_ref()
            .ok_or_else(|| self.http.error("", Failure::Unsupported("run without template settings")))
    }

    /// Renders the body for one call. A failure here is easel's configuration meeting this request's values
    /// (the template passed the load-time check), so it is refused with the template's place, not blamed on
    /// the server.
    fn render(&self, t: &TemplateConfig, vars: &Vars<'_>, url: &str) -> Result<String, BackendError> {
        if t.body.is_empty() {
            return Ok(String::new());
        }
        let key = format!("backends.{}.body", self.http.cfg.name);
        let refused = |detail: String| {
            self.http.error(
                url,
                Failure::Config(format!(
                    "easel's body template `{key}` cannot be rendered for this request: {detail}; fix the template \
                     in easel's configuration, or the request's `extra`"
                )),
            )
        };
        let text = render_text(&key, &t.body, vars).map_err(refused)?;
        if is_json(&t.content_type) && t.method != Method::GET && !text.trim().is_empty() {
            json_check(&text).map_err(refused)?;
        }
        Ok(text)
    }

    /// Turns each selected string into an image: base64 and data URLs inline, URLs and server paths downloaded.
    async fn fetch(&self, reference: &str, url: &str) -> Result<ImageOutput, BackendError> {
        if reference.starts_with("http://") || reference.starts_with("https://") {
            let (bytes, _) = self.http.download(reference).await?;
            return image_from_bytes(bytes).map_err(|e| self.invalid(reference, e));
        }
        let inline = decode_image_b64(reference);
        if inline.is_err()
            && reference.starts_with('/')
            && !reference.starts_with("//")
            && let Some(absolute) = url::Url::parse(url).ok().and_then(|u| u.join(reference).ok())
        {
            let (bytes, _) = self.http.download(absolute.as_str()).await?;
            return image_from_bytes(bytes).map_err(|e| self.invalid(absolute.as_str(), e));
        }
        inline.map_err(|e| {
            self.invalid(
                url,
                format!(
                    "a match is neither base64 image data, a data URL nor a URL ({e}): `{}`",
                    excerpt(reference, 80)
                ),
            )
        })
    }

    fn invalid(&self, url: &str, detail: impl Into<String>) -> BackendError {
        self.http.error(url, Failure::InvalidResponse(detail.into()))
    }
}

impl Backend for TemplateBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let t = self.settings()?;
        let req = call.request;
        let no_extra = Map::new();
        let vars = Vars {
            prompt: &req.prompt,
            negative_prompt: req.negative_prompt.as_deref().unwrap_or(""),
            seed: call.seed.unwrap_or_else(fresh_seed),
            width: call.size.width,
            height: call.size.height,
            n: call.count,
            steps: req.steps,
            guidance_scale: req.guidance_scale,
            model: &call.model.upstream_model,
            extra: req.extra.as_ref().unwrap_or(&no_extra),
        };
        // Errors name the configured path, never a query that carries the prompt.
        let url = self.http.cfg.endpoint(&t.path);
        let body = self.render(t, &vars, &url)?;
        let rb = if t.method == Method::GET {
            self.http.request(Method::GET, &with_query(&t.path, &body)).0
        } else {
            self.http.request(t.method.clone(), &t.path).0.header(CONTENT_TYPE, &t.content_type).body(body)
        };
        let resp = self.http.send(self.http.bearer(rb), &url).await?;
        let raw = self.http.body(resp, &url).await?;
        let Some(path) = &t.images else {
            return Ok(vec![image_from_bytes(raw).map_err(|e| {
                self.invalid(&url, format!("{e} (set `response.images` when the server answers JSON)"))
            })?]);
        };
        let doc: Value = serde_json::from_slice(&raw).map_err(|e| {
            let what = if crate::media::sniff(&raw).is_some() {
                "the answer is an image, not JSON: remove `response.images`".to_owned()
            } else {
                format!("the answer is not JSON ({e}): {}", answer_excerpt(&raw))
            };
            self.invalid(&url, what)
        })?;
        let refs = select_images(path, &doc, call.count).map_err(|e| self.invalid(&url, e))?;
        let mut images = Vec::with_capacity(refs.len());
        for reference in refs {
            images.push(self.fetch(reference, &url).await?);
        }
        Ok(images)
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/");
        match self.http.send(rb, &url).await {
            Ok(resp) => Ok(ProbeReport {
                ready: true,
                detail: format!("custom server answers (HTTP {} on /)", resp.status().as_u16()),
            }),
            Err(BackendError { failure: Failure::Status { status, .. }, .. }) => {
                Ok(ProbeReport { ready: true, detail: format!("custom server answers (HTTP {status} on /)") })
            }
            Err(e) => Err(e),
        }
    }
}

// === wire types ===

/// What a body template sees for one call.
#[derive(Debug, Serialize)]
struct Vars<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    seed: u64,
    width: u32,
    height: u32,
    n: u32,
    steps: Option<u32>,
    guidance_scale: Option<f64>,
    model: &'a str,
    extra: &'a Map<String, Value>,
}

/// `path?query`, or `path&query` when the path already has one.
fn with_query(path: &str, query: &str) -> String {
    let query = query.trim().trim_start_matches(['?', '&']);
    match (query.is_empty(), path.contains('?')) {
        (true, _) => path.to_owned(),
        (false, true) => format!("{path}&{query}"),
        (false, false) => format!("{path}?{query}"),
    }
}

fn is_json(content_type: &str) -> bool {
    content_type.to_ascii_lowercase().contains("json")
}

// === response parsing ===

/// The first `count` matches of `path`, each a string (base64, data URL, URL or server path).
fn select_images<'d>(path: &JsonPath, doc: &'d Value, count: u32) -> Result<Vec<&'d str>, String> {
    let nodes = path.query(doc).all();
    if nodes.is_empty() {
        return Err(format!(
            "the JSON path `{path}` (`response.images`) matched nothing in the answer: {}",
            excerpt(&outline(doc).to_string(), ANSWER_EXCERPT)
        ));
    }
    nodes
        .into_iter()
        .take(count as usize)
        .map(|node| {
            node.as_str().ok_or_else(|| {
                let kind = match node {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Array(_) => "a list",
                    Value::Object(_) => "an object",
                };
                format!(
                    "the JSON path `{path}` (`response.images`) matched {kind}, not a string: point it at the \
                     base64, data URL or URL itself (e.g. `$.images[*].b64`): {}",
                    excerpt(&outline(node).to_string(), 120)
                )
            })
        })
        .collect()
}

/// The answer's shape for an error message: long strings (base64) are cut to their start and length.
fn outline(v: &Value) -> Value {
    const KEEP: usize = 16;
    match v {
        Value::String(s) if s.chars().count() > KEEP * 2 => {
            let head: String = s.chars().take(KEEP).collect();
            Value::String(format!("{head}…({} chars)", s.len()))
        }
        Value::Array(items) => Value::Array(items.iter().map(outline).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), outline(v))).collect()),
        other => other.clone(),
    }
}

/// The start of an answer for an error message.
fn answer_excerpt(raw: &[u8]) -> String {
    let head = String::from_utf8_lossy(&raw[..raw.len().min(ANSWER_EXCERPT * 4)]).into_owned();
    excerpt(&head, ANSWER_EXCERPT)
}

// === config check ===

/// Checks a body template at config load: only known variables, it compiles and renders under strict undefined
/// with sample values (once with every optional value set, once with `steps` and `guidance_scale` null), and
/// when `json` each rendering parses as JSON. Errors name the template line (or the rendered line for JSON).
pub fn check_body(body: &str, json: bool) -> Result<(), String> {
    check_variables("body", body, VARIABLES)?;
    let extra = Map::new();
    let full = Vars {
        prompt: "a \"quoted\" prompt\\ with\nlines",
        negative_prompt: "blurry",
        seed: 3_141_592_653,
        width: 512,
        height: 768,
        n: 1,
        steps: Some(20),
        guidance_scale: Some(7.5),
        model: "model",
        extra: &extra,
    };
    let unset = Vars { negative_prompt: "", steps: None, guidance_scale: None, ..full };
    for (sample, when) in [(&full, ""), (&unset, "when `steps`/`guidance_scale` are unset (null): ")] {
        let text = render_text("body", body, sample).map_err(|e| format!("{when}{e}"))?;
        if json && !text.trim().is_empty() {
            json_check(&text).map_err(|e| {
                let fix = if when.is_empty() {
                    "write strings as {{ prompt | tojson }}"
                } else {
                    "write {{ guidance_scale | tojson }} to send null, or {{ guidance_scale or 7 }} for a default"
                };
                format!("{when}{e} ({fix})")
            })?;
        }
    }
    Ok(())
}

/// Parses a rendered JSON body; the error quotes the rendered line it failed on.
fn json_check(text: &str) -> Result<(), String> {
    let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) else { return Ok(()) };
    let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
    Err(format!(
        "the body renders invalid JSON at line {} column {}: {e}; the rendered line: `{}`",
        e.line(),
        e.column(),
        excerpt(line, 120)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_templates_at_load() {
        check_body(r#"{"prompt": {{ prompt | tojson }}, "w": {{ width }}, "seed": {{ seed }}}"#, true).unwrap();
        check_body(
            r#"{"p": {{ prompt | tojson }}, "steps": {{ steps | tojson }}, "cfg": {{ guidance_scale or 7 }}, "style": {{ extra.style | default("photo") | tojson }}, "all": {{ extra | tojson }}}"#,
            true,
        )
        .unwrap();
        check_body("prompt={{ prompt | urlencode }}&w={{ width }}", false).unwrap();
        check_body("", true).unwrap();

        let err = check_body(r#"{"prompt": "{{ prompt }}"}"#, true).unwrap_err();
        assert!(err.contains("invalid JSON at line 1") && err.contains("tojson"), "{err}");
        let err = check_body("{\"a\":\n {{ prompt_typo }}}", true).unwrap_err();
        assert!(err.contains("line 2") && err.contains("prompt_typo"), "{err}");
        let err = check_body("{\"a\": 1,\n \"b\": {{ width }\n}", true).unwrap_err();
        assert!(err.contains("line 2"), "a syntax error names its line: {err}");
        let err = check_body(r#"{"cfg": {{ guidance_scale }}}"#, true).unwrap_err();
        assert!(err.contains("unset") && err.contains("guidance_scale | tojson"), "{err}");
        let err = check_body(r#"{"style": "{{ extra.style }}"}"#, true).unwrap_err();
        assert!(err.contains("line 1") && err.contains("`extra.style` is undefined"), "strict undefined: {err}");
        check_body(r#"{"style": {{ extra.style | tojson }}}"#, true).expect("a missing key is null through tojson");
    }

    /// Recorded-style answers of hand-written servers.
    #[test]
    fn selects_strings_and_explains_misses() {
        let doc: Value = serde_json::from_str(
            r#"{"images": ["iVBORw0KGgo=", "second"], "meta": {"took_ms": 812}, "output": [{"image": {"b64": "x"}}]}"#,
        )
        .unwrap();
        let path = |p: &str| JsonPath::parse(p).unwrap();
        assert_eq!(select_images(&path("$.images[*]"), &doc, 1).unwrap(), ["iVBORw0KGgo="], "the first `n` matches");
        let err = select_images(&path("$.data[*]"), &doc, 1).unwrap_err();
        assert!(err.contains("matched nothing") && err.contains("took_ms"), "{err}");
        let err = select_images(&path("$.output[*].image"), &doc, 1).unwrap_err();
        assert!(err.contains("matched an object, not a string"), "{err}");
        assert!(err.contains("b64"), "{err}");
        let big = serde_json::json!({"images": ["A".repeat(5000)], "took_ms": 3});
        let err = select_images(&path("$.data[*]"), &big, 1).unwrap_err();
        assert!(err.contains(r#"{"images":["AAAAAAAAAAAAAAAA…(5000 chars)"],"took_ms":3}"#), "{err}");
    }

    #[test]
    fn get_bodies_become_the_query() {
        assert_eq!(with_query("/gen", "prompt=a%20b&w=8"), "/gen?prompt=a%20b&w=8");
        assert_eq!(with_query("/gen?v=2", "?prompt=x"), "/gen?v=2&prompt=x");
        assert_eq!(with_query("/gen", "  "), "/gen");
        assert!(is_json("application/vnd.api+JSON"));
    }
}
