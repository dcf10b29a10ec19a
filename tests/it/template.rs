//! The `template` adapter end to end, easel in front of a fake custom server: the rendered body and headers, JSON
//! paths to base64, data URLs, URLs and server paths, raw image bodies, GET query templates, template mistakes
//! caught at config load (with their key path) or refused per request, upstream failures, timeouts and the probe.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::support::template_server::{FakeCustom, GREEN};
use crate::support::{self, spawn_gateway};

/// Every variable, written the JSON-safe way.
const BODY: &str = r#"{"prompt": {{ prompt | tojson }}, "negative_prompt": {{ negative_prompt | tojson }}, "width": {{ width }}, "height": {{ height }}, "seed": {{ seed }}, "n": {{ n }}, "steps": {{ steps | tojson }}, "guidance": {{ guidance_scale | tojson }}, "model": {{ model | tojson }}, "extra": {{ extra | tojson }}}"#;

/// A gateway config with one template backend `mine` (extra backend lines verbatim) and one model `house`.
fn config(url: &str, path: &str, body: &str, images: Option<&str>, backend_extra: &str) -> String {
    let response = images.map_or(String::new(), |p| format!("    response: {{images: \"{p}\"}}\n"));
    format!(
        "backends:\n  mine:\n    kind: template\n    url: {url}\n    timeout: 10s\n    path: {path}\n    headers: {{X-Team: imaging}}\n    body: '{body}'\n{response}{backend_extra}models:\n  - id: house\n    backends: [mine]\n    upstream_model: house-v2\n"
    )
}

fn load(yaml: &str) -> Result<easel::config::Config, easel::config::ConfigError> {
    easel::config::from_str(yaml, "custom.yaml", Path::new("."), &easel::config::MapEnv::default())
}

fn decode(v: &Value) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("b64_json")).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}"))
}

#[tokio::test]
async fn base64_answers_and_the_rendered_request() {
    let up = FakeCustom::builder().bearer("tok-1").start().await;
    let gw = spawn_gateway(&config(&up.url, "/generate", BODY, Some("$.images[*]"), "    api_key: tok-1\n")).await;
    let prompt = "say \"cheese\"\n\\ twice";
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "house", "prompt": prompt, "size": "24x16", "seed": 77, "n": 2, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "one image per call, n calls");
    let img = decode(&body["data"][0]["b64_json"]);
    assert_eq!((img.dimensions(), img.get_pixel(0, 0).0), ((24, 16), GREEN));

    let calls = up.received_at("/generate");
    assert_eq!(calls.len(), 2);
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    assert_eq!(call.team.as_deref(), Some("imaging"), "configured headers");
    assert_eq!(call.authorization.as_deref(), Some("Bearer tok-1"), "api_key as a bearer token");
    let sent: Value = serde_json::from_str(&call.body).unwrap();
    assert_eq!(sent["prompt"], prompt, "tojson kept quotes, newline and backslash");
    assert_eq!(
        sent,
        json!({"prompt": prompt, "negative_prompt": "", "width": 24, "height": 16, "seed": sent["seed"], "n": 1, "steps": null, "guidance": null, "model": "house-v2", "extra": {}}),
        "unset values are null, `extra` empty"
    );
    let seeds: Vec<u64> =
        calls.iter().map(|c| serde_json::from_str::<Value>(&c.body).unwrap()["seed"].as_u64().unwrap()).collect();
    assert!(seeds.contains(&77), "the request's seed: {seeds:?}");

    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "house", "prompt": "p", "negative_prompt": "blurry", "steps": 30, "guidance_scale": 5.5, "extra": {"style": "noir"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let sent: Value = serde_json::from_str(&up.received_at("/generate")[2].body).unwrap();
    assert_eq!(
        (&sent["negative_prompt"], &sent["steps"], &sent["guidance"], &sent["extra"]),
        (&json!("blurry"), &json!(30), &json!(5.5), &json!({"style": "noir"}))
    );
    assert!(sent["seed"].is_u64(), "a fresh seed when the request has none");
}

#[tokio::test]
async fn data_urls_urls_server_paths_and_raw_bodies() {
    let up = support::template_server::start().await;
    for (path, images) in [
        ("/dataurl", Some("$.output[*].image")),
        ("/link", Some("$.result.url")),
        ("/relative", Some("$.result.path")),
        ("/raw", None),
    ] {
        let gw = spawn_gateway(&config(&up.url, path, BODY, images, "")).await;
        let (s, _, body) = gw
            .post_json(
                "/v1/images/generations",
                json!({"model": "house", "prompt": "p", "size": "12x12", "response_format": "b64_json"}),
            )
            .await;
        assert_eq!(s, 200, "{path}: {body}");
        assert_eq!(decode(&body["data"][0]["b64_json"]).get_pixel(0, 0).0, GREEN, "{path}");
    }
    let downloads = up.received_at("/files/x.png");
    assert_eq!(downloads.len(), 2, "the URL and the server path were downloaded");
    assert!(downloads.iter().all(|d| d.method == "GET"));

    // A raw answer handed out as a URL by easel.
    let gw = spawn_gateway(&config(&up.url, "/raw", BODY, None, "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    let (s, headers, bytes) = gw.get(body["data"][0]["url"].as_str().unwrap()).await;
    assert_eq!((s, headers["content-type"].to_str().unwrap()), (200, "image/png"));
    assert!(bytes.starts_with(b"\x89PNG"));
}

#[tokio::test]
async fn get_templates_render_the_query_string() {
    let up = support::template_server::start().await;
    let body = "prompt={{ prompt | urlencode }}&width={{ width }}&height={{ height }}";
    let extra = "    method: GET\n    content_type: application/x-www-form-urlencoded\n";
    let gw = spawn_gateway(&config(&up.url, "/generate", body, None, extra)).await;
    let (s, _, answer) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "house", "prompt": "a cat & a dog?", "size": "20x10", "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(decode(&answer["data"][0]["b64_json"]).dimensions(), (20, 10));
    let call = &up.received_at("/generate")[0];
    assert_eq!((call.method.as_str(), call.body.as_str()), ("GET", ""), "no body on GET");
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(call.query.as_deref().unwrap().as_bytes()).into_owned().collect();
    assert_eq!(query[0], ("prompt".to_owned(), "a cat & a dog?".to_owned()), "{query:?}");
}

#[tokio::test]
async fn template_mistakes_are_config_errors_naming_the_key() {
    let bad = |body: &str| load(&config("http://127.0.0.1:9", "/generate", body, Some("$.images[*]"), "")).unwrap_err();

    let err = bad(r#"{"prompt": {{ prompt | tojson }, "w": 1}"#);
    let p = &err.problems[0];
    assert_eq!(p.path, "backends.mine.body", "{err}");
    assert!(p.at.starts_with("custom.yaml:8:"), "the body's line in the file: {p}");
    assert!(p.message.contains("line 1: unexpected `}`"), "{p}");

    let err = bad(r#"{"prompt": "{{ prompt }}"}"#);
    assert!(err.problems[0].message.contains("invalid JSON") && err.problems[0].message.contains("tojson"), "{err}");

    let err = bad(r#"{"prompt": {{ promt | tojson }}}"#);
    assert!(err.problems[0].message.contains("unknown variable(s) `promt`"), "{err}");

    let err = bad(r#"{"prompt": {{ prompt | tojson }}, "cfg": {{ guidance_scale }}}"#);
    assert!(err.problems[0].message.contains("unset") && err.problems[0].message.contains("| tojson"), "{err}");

    let err = load(&config("http://127.0.0.1:9", "/generate", BODY, Some("$.images[*"), "")).unwrap_err();
    assert_eq!(err.problems[0].path, "backends.mine.response.images", "{err}");

    load(&config("http://127.0.0.1:9", "/generate", BODY, Some("$.images[*]"), "")).expect("the good template loads");
}

#[tokio::test]
async fn a_body_that_cannot_render_for_one_request_is_a_config_error_with_its_place() {
    let up = support::template_server::start().await;
    let body = r#"{"prompt": {{ prompt | tojson }}, "boost": {{ (extra.boost | default(0)) + 1 }}}"#;
    let gw = spawn_gateway(&config(&up.url, "/generate", body, Some("$.images[*]"), "")).await;
    let (s, _, answer) =
        gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p", "extra": {"boost": 2}})).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&up.received_at("/generate")[0].body).unwrap()["boost"], 3);

    let (s, _, answer) = gw
        .post_json("/v1/images/generations", json!({"model": "house", "prompt": "p", "extra": {"boost": "lots"}}))
        .await;
    assert_eq!(s, 500, "easel's template, not the client's request nor the backend: {answer}");
    assert_eq!(answer["error"]["code"], "config_error");
    let msg = message(&answer);
    assert!(msg.contains("backends.mine.body line 1") && msg.contains("`extra`"), "{msg}");
    assert_eq!(up.received_at("/generate").len(), 1, "nothing was sent");
}

#[tokio::test]
async fn upstream_failures_and_unusable_answers_are_502s() {
    let up = FakeCustom::builder().fail_every(2).start().await;
    let gw = spawn_gateway(&config(&up.url, "/generate", BODY, Some("$.images[*]"), "")).await;
    let generate = || gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"}));
    assert_eq!(generate().await.0, 200);
    let (s, _, body) = generate().await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = message(&body);
    assert!(
        msg.contains("HTTP 500")
            && msg.contains(&format!("{}/generate", up.url))
            && msg.contains("generator crashed: CUDA out of memory"),
        "{msg}"
    );
    assert_eq!(generate().await.0, 200);

    let picky = FakeCustom::builder().fail_with(400, json!({"error": "prompt too long"})).start().await;
    let gw = spawn_gateway(&config(&picky.url, "/generate", BODY, Some("$.images[*]"), "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("backend_rejected_request")), "{body}");
    assert!(message(&body).contains("prompt too long"), "{body}");

    let up = support::template_server::start().await;
    let gw = spawn_gateway(&config(&up.url, "/generate", BODY, Some("$.data[*].b64"), "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (502, Some("backend_error")), "{body}");
    assert!(message(&body).contains("`$.data[*].b64`") && message(&body).contains("took_ms"), "{body}");

    let gw = spawn_gateway(&config(&up.url, "/raw", BODY, Some("$.images[*]"), "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert!(message(&body).contains("remove `response.images`"), "{body}");
}

#[tokio::test]
async fn slow_servers_time_out() {
    let up = FakeCustom::builder().latency(Duration::from_secs(20)).start().await;
    let yaml = config(&up.url, "/generate", BODY, Some("$.images[*]"), "").replace("timeout: 10s", "timeout: 1s");
    let gw = spawn_gateway(&yaml).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (504, Some("backend_timeout")), "{body}");
}

#[tokio::test]
async fn any_answer_on_the_root_is_up_and_a_closed_port_is_down() {
    let up = support::template_server::start().await;
    let gw = spawn_gateway(&config(&up.url, "/generate", BODY, Some("$.images[*]"), "")).await;
    let (_, _, health) = gw.get("/health").await;
    let h: Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(h["backends"]["mine"]["healthy"], true, "{h}");
    assert_eq!(h["backends"]["mine"]["detail"], "custom server answers (HTTP 404 on /)", "{h}");
    assert_eq!(up.received_at("/")[0].method, "GET");

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let gw = spawn_gateway(&config(&closed, "/generate", BODY, Some("$.images[*]"), "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (503, Some("backend_unavailable")), "{body}");
    assert!(message(&body).contains("unreachable"), "{body}");
}
