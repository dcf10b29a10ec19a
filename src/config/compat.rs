//! Compatibility modes: when no configuration file is used, the seeds' own environment variables describe the
//! deployment, and easel writes the configuration they mean (shown by `easel config check`, logged at start).
//!
//! - Seed 003: `TEXT2IMAGE_SERVER_URL` (a `POST /generate {"prompt","width","height"}` server answering
//!   `{"images": ["<base64>"]}`), `REQUEST_TIMEOUT` (seconds, default 300), `MAX_CONCURRENT_REQUESTS` (default 10).
//!   easel serves the same `POST /generate` on 127.0.0.1:8000, so the frontend works unchanged.
//! - Seed 004: `IMAGES_BACKEND=http_openai_images` with `IMAGES_HTTP_BASE_URL` (an OpenAI Images server, such as
//!   the InvokeAI shim, whose readiness is `/readyz`), `IMAGES_BACKEND_CLASS` (the backend's name, default
//!   `gpu_heavy`), `IMAGES_OPENAI_MODEL` (the upstream model, optional), and `GATEWAY_BEARER_TOKEN` (one static
//!   key). Served on 127.0.0.1:8800.

use super::{ConfigError, Environment};

/// The configuration text the environment asks for, with its origin; `None` when no mode's variables are set.
pub fn from_env(env: &dyn Environment) -> Result<Option<(String, String)>, ConfigError> {
    let var = |name: &str| env.get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    if let Some(url) = var("TEXT2IMAGE_SERVER_URL") {
        let origin = "seed-003 environment (TEXT2IMAGE_SERVER_URL)";
        let timeout = seconds(origin, "REQUEST_TIMEOUT", var("REQUEST_TIMEOUT"), 300)?;
        let concurrent = seconds(origin, "MAX_CONCURRENT_REQUESTS", var("MAX_CONCURRENT_REQUESTS"), 10)?;
        let yaml = format!(
            r#"# Written by easel from seed 003's environment variables.
server:
  listen: 127.0.0.1:8000
backends:
  text2image:
    kind: template
    url: {url}
    timeout: {timeout}s
    concurrency: {{images: {concurrent}}}
    path: /generate
    body: '{{"prompt": {{{{ prompt | tojson }}}}, "width": {{{{ width }}}}, "height": {{{{ height }}}}}}'
    response: {{images: "$.images[*]"}}
    health: {{path: /health}}
models:
  - id: text2image
    backends: [text2image]
    default_size: 1024x1024
routes:
  - path: /generate
    model: text2image
    response: '{{"images": {{{{ images | tojson }}}}}}'
"#,
            url = quoted(&url),
        );
        return Ok(Some((yaml, origin.to_owned())));
    }
    if let Some(kind) = var("IMAGES_BACKEND") {
        let origin = "seed-004 environment (IMAGES_BACKEND)";
        if kind != "http_openai_images" {
            return Err(ConfigError::one(
                origin,
                "IMAGES_BACKEND",
                format!("`{kind}` is not supported; the one compatible value is `http_openai_images`"),
            ));
        }
        let Some(base) = var("IMAGES_HTTP_BASE_URL") else {
            return Err(ConfigError::one(
                origin,
                "IMAGES_HTTP_BASE_URL",
                "is required with IMAGES_BACKEND=http_openai_images (e.g. http://ada2:7860)",
            ));
        };
        let class = var("IMAGES_BACKEND_CLASS").unwrap_or_else(|| "gpu_heavy".into());
        if !class.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ConfigError::one(origin, "IMAGES_BACKEND_CLASS", format!("`{class}` is not a plain name")));
        }
        let base = base.trim_end_matches('/');
        let url = if base.ends_with("/v1") { base.to_owned() } else { format!("{base}/v1") };
        let model = var("IMAGES_OPENAI_MODEL");
        let auth = match var("GATEWAY_BEARER_TOKEN") {
            Some(t) => format!("auth:\n  mode: static\n  token: {}\n", quoted(&t)),
            None => String::new(),
        };
        let upstream = model.as_deref().map(|m| format!("    upstream_model: {}\n", quoted(m))).unwrap_or_default();
        let yaml = format!(
            "# Written by easel from seed 004's environment variables.\nserver:\n  listen: 127.0.0.1:8800\n{auth}backends:\n  {class}:\n    kind: openai\n    url: {url}\n    concurrency: {{images: 2}}\n    queue: {{depth: 0}}\n    health: {{path: /readyz, expect_status: 200}}\nmodels:\n  - id: {id}\n    backends: [{class}]\n{upstream}    default_size: 1024x1024\n",
            url = quoted(&url),
            id = quoted(model.as_deref().unwrap_or(&class)),
        );
        return Ok(Some((yaml, origin.to_owned())));
    }
    Ok(None)
}

/// A YAML (JSON) string literal, with `${` escaped so interpolation leaves it alone.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string().replace("${", "$${")
}

fn seconds(origin: &str, name: &str, value: Option<String>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match v.parse::<f64>() {
            Ok(n) if n >= 1.0 && n.is_finite() => Ok(n.round() as u64),
            _ => Err(ConfigError::one(origin, name, format!("`{v}` is not a positive whole number"))),
        },
    }
}
