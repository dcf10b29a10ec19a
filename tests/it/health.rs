//! Health probes against servers shaped like real deployments: an image-only shim with no model list, a
//! configured `health: {path, expect_status}` override, and an override whose status does not match.

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::support::{TEST_TIMEOUT, shim, spawn_gateway};

fn config(url: &str, backend_extra: &str) -> String {
    format!(
        "backends:\n  shim:\n    kind: openai\n    url: {url}\n{backend_extra}  down:\n    kind: openai\n    url: http://127.0.0.1:9\nmodels:\n  - id: img\n    backends: [shim]\n  - id: gone\n    backends: [down]\n"
    )
}

async fn generate(gw: &crate::support::Gateway, model: &str) -> (u16, serde_json::Value) {
    let (status, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": model, "prompt": "a lighthouse"})).await;
    (status, body)
}

async fn health(gw: &crate::support::Gateway) -> serde_json::Value {
    let (_, _, body) = gw.get("/health").await;
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn an_image_only_shim_is_reachable_without_a_model_list() {
    let s = shim::start().await;
    let gw = spawn_gateway(&config(&s.url, "")).await;
    let (status, body) = generate(&gw, "img").await;
    assert_eq!(status, 200, "a 404 on /v1/models from a live server is not down: {body}");
    let h = health(&gw).await;
    assert_eq!(h["backends"]["shim"]["healthy"], true, "{h}");
    assert!(h["backends"]["shim"]["detail"].as_str().unwrap().contains("no model list"), "{h}");
    // A refused connection is still down.
    assert_eq!(h["backends"]["down"]["healthy"], false, "{h}");
    let (status, body) = generate(&gw, "gone").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable", "{body}");
}

#[tokio::test]
async fn a_configured_health_path_replaces_the_kinds_probe() {
    let s = shim::start().await;
    let gw = spawn_gateway(&config(&s.url, "    health: {path: /readyz, expect_status: 200}\n")).await;
    let (status, body) = generate(&gw, "img").await;
    assert_eq!(status, 200, "{body}");
    assert!(s.state.readyz_hits.load(Ordering::Relaxed) >= 1, "the probe asked /readyz");
    assert_eq!(s.state.models_hits.load(Ordering::Relaxed), 0, "the kind's own probe was not used");
    let h = health(&gw).await;
    let detail = h["backends"]["shim"]["detail"].as_str().unwrap();
    assert!(detail.contains("/readyz") && detail.contains("200"), "{h}");
}

#[tokio::test]
async fn a_health_path_answering_another_status_is_unhealthy() {
    let s = shim::start().await;
    s.state.readyz_status.store(503, Ordering::Relaxed);
    let gw = spawn_gateway(&config(&s.url, "    health: {path: /readyz, expect_status: 200}\n")).await;
    let h = health(&gw).await;
    assert_eq!(h["backends"]["shim"]["healthy"], false, "{h}");
    let error = h["backends"]["shim"]["error"].as_str().unwrap();
    assert!(error.contains("/readyz") && error.contains("503"), "{h}");
    let (status, body) = tokio::time::timeout(TEST_TIMEOUT, generate(&gw, "img")).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable", "{body}");
}
