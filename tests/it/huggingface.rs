//! The `huggingface` adapter against a fake Inference API: router paths, `Accept`, parameters, one call per
//! image, a cold model's 503 with `Retry-After`, and dedicated endpoints.

use serde_json::json;

use crate::support::{self, spawn_gateway};

fn config(url: &str, model: &str) -> String {
    format!(
        "backends:\n  hf:\n    kind: huggingface\n    url: {url}\n    api_key: {}\nmodels:\n  - id: flux\n    backends: [hf]\n    upstream_model: {model}\n",
        support::huggingface::TOKEN
    )
}

#[tokio::test]
async fn router_calls_send_accept_and_parameters_once_per_image() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&config(&hf.url, "black-forest-labs/FLUX.1-schnell")).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "flux", "prompt": "a lighthouse", "n": 3, "size": "256x128", "seed": 5, "steps": 4, "guidance_scale": 0.0, "negative_prompt": "fog", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    let calls = hf.state.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "one image per call");
    let mut seeds: Vec<u64> = calls.iter().map(|c| c.2["parameters"]["seed"].as_u64().unwrap()).collect();
    seeds.sort_unstable();
    assert_eq!(seeds, [5, 6, 7], "each call gets its own seed");
    let (path, accept, sent) = &calls[0];
    assert_eq!(path, "/models/black-forest-labs/FLUX.1-schnell");
    assert_eq!(accept, "image/png", "the Accept Hugging Face needs for raw bytes");
    assert_eq!(sent["inputs"], "a lighthouse");
    let p = &sent["parameters"];
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64(), p["num_inference_steps"].as_u64()),
        (Some(256), Some(128), Some(4))
    );
    assert_eq!(p["negative_prompt"], "fog");
}

#[tokio::test]
async fn jpeg_is_asked_with_the_matching_accept() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&config(&hf.url, "o/m")).await;
    let (s, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p", "output_format": "jpeg"})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["output_format"], "jpeg");
    assert_eq!(hf.state.calls.lock().unwrap()[0].1, "image/jpeg");
}

#[tokio::test]
async fn a_loading_model_is_a_503_with_retry_after() {
    let hf = support::huggingface::start().await;
    hf.state.loading_calls.store(1, std::sync::atomic::Ordering::SeqCst);
    let gw = spawn_gateway(&config(&hf.url, "o/cold")).await;
    let (s, headers, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert_eq!(headers["retry-after"], "13", "estimated_time 12.3 s, rounded up");
    assert!(body["error"]["message"].as_str().unwrap().contains("currently loading"), "{body}");
    let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 200, "loaded now");
}

#[tokio::test]
async fn dedicated_endpoints_take_the_url_as_is() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&config(&hf.url, "my-endpoint")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(hf.state.calls.lock().unwrap()[0].0, "/");
    let (_, _, health) = gw.get("/health").await;
    let h: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(h["backends"]["hf"]["ready"], true, "{h}");
}

#[tokio::test]
async fn the_fake_refuses_a_wrong_accept_as_hugging_face_does() {
    // Proves the Accept assertion above can fail: a client that sends text/plain gets Hugging Face's 400.
    let hf = support::huggingface::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/models/o/m", hf.url))
        .bearer_auth(support::huggingface::TOKEN)
        .header("accept", "text/plain")
        .json(&json!({"inputs": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("Accept type \\\"text/plain\\\" not supported"));
}
