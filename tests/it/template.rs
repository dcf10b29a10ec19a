//! The `template` adapter against a fake custom server: body templates, JSON paths to base64, data URLs and URLs,
//! raw image bodies, config-time template errors, and upstream failures.

use serde_json::json;

use crate::support::{self, spawn_gateway};

fn config(url: &str, path: &str, body: &str, images: Option<&str>) -> String {
    let response = images.map_or(String::new(), |p| format!("    response: {{images: \"{p}\"}}\n"));
    format!(
        "backends:\n  mine:\n    kind: template\n    url: {url}\n    path: {path}\n    headers: {{X-Team: imaging}}\n    body: '{body}'\n{response}models:\n  - id: house\n    backends: [mine]\n    upstream_model: house-v2\n"
    )
}

const BODY: &str = r#"{"prompt": {{ prompt | tojson }}, "width": {{ width }}, "height": {{ height }}, "seed": {{ seed }}, "model": {{ model | tojson }}}"#;

#[tokio::test]
async fn base64_data_url_url_and_raw_answers() {
    let up = support::template_server::start().await;
    for (path, images) in [
        ("/generate", Some("$.images[*]")),
        ("/dataurl", Some("$.output[*].image")),
        ("/link", Some("$.result.url")),
        ("/raw", None),
    ] {
        let gw = spawn_gateway(&config(&up.url, path, BODY, images)).await;
        let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "say \"cheese\"", "size": "24x16", "seed": 77, "n": 2, "response_format": "b64_json"})).await;
        assert_eq!(s, 200, "{path}: {body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 2, "{path}: one image per call, n calls");
    }
    let calls = up.state.calls.lock().unwrap().clone();
    let (path, ct, text) = &calls[0];
    assert_eq!((path.as_str(), ct.as_str()), ("/generate", "application/json"));
    let sent: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(sent["prompt"], "say \"cheese\"", "tojson kept the quotes valid");
    assert_eq!(
        (sent["width"].as_u64(), sent["height"].as_u64(), sent["model"].as_str()),
        (Some(24), Some(16), Some("house-v2"))
    );
    assert!([77, 78].contains(&sent["seed"].as_u64().unwrap()));
}

#[tokio::test]
async fn template_errors_are_config_errors_with_their_place() {
    let yaml = config("http://127.0.0.1:9", "/generate", r#"{"prompt": "{{ prompt }}"}"#, Some("$.images[*]"));
    let err =
        easel::config::from_str(&yaml, "custom.yaml", std::path::Path::new("."), &easel::config::MapEnv::default())
            .unwrap_err();
    let p = &err.problems[0];
    assert_eq!(p.path, "backends.mine.body");
    assert!(p.at.starts_with("custom.yaml:"), "{p}");
    assert!(p.message.contains("invalid JSON"), "{p}");

    let yaml = config("http://127.0.0.1:9", "/generate", r#"{"prompt": {{ promt | tojson }}}"#, None);
    let err =
        easel::config::from_str(&yaml, "custom.yaml", std::path::Path::new("."), &easel::config::MapEnv::default())
            .unwrap_err();
    assert!(err.problems[0].message.contains("unknown variable(s) `promt`"), "{err}");

    let yaml = config("http://127.0.0.1:9", "/generate", BODY, Some("$.images[*"));
    let err =
        easel::config::from_str(&yaml, "custom.yaml", std::path::Path::new("."), &easel::config::MapEnv::default())
            .unwrap_err();
    assert_eq!(err.problems[0].path, "backends.mine.response.images");
}

#[tokio::test]
async fn upstream_failures_and_unexpected_answers() {
    let up = support::template_server::start().await;
    let gw = spawn_gateway(&config(&up.url, "/broken", BODY, Some("$.images[*]"))).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("generator crashed: CUDA out of memory"), "{body}");

    let gw = spawn_gateway(&config(&up.url, "/generate", BODY, Some("$.nothing[*]"))).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "house", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("matched no string"), "{body}");
}
