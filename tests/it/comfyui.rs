//! The `comfyui` adapter against a fake ComfyUI (HTTP + WebSocket): rendered workflows, batches, fresh seeds,
//! validation and run-time errors, socket loss and refusal (history polling), timeouts, cancellation, edits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use crate::support::{self, TEST_TIMEOUT, spawn_gateway};

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");

fn config(url: &str, workflow: &str, timeout: &str) -> String {
    format!(
        "backends:\n  comfy:\n    kind: comfyui\n    url: {url}\n    timeout: {timeout}\n    poll_interval: 20ms\nmodels:\n  - id: free\n    backends: [comfy]\n    workflow: {WORKFLOWS}/{workflow}\n    default_size: 32x24\n"
    )
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn runs_the_workflow_and_fetches_outputs() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "10s")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "free", "prompt": "p", "n": 2, "seed": 42, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let first = image::load_from_memory(
        &base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!((first.width(), first.height()), (32, 24));
    let prompts = comfy.state.inner.lock().unwrap().prompts.clone();
    assert_eq!(prompts.len(), 1, "n=2 is one prompt with batch_size 2");
    assert_eq!(prompts[0]["1"]["inputs"]["batch_size"], 2);
    assert_eq!(prompts[0]["1"]["inputs"]["color"], 42);
    assert_eq!(prompts[0]["1"]["inputs"]["width"], 32);

    // Without a seed every call gets a fresh one, so ComfyUI's cache never answers a stale image.
    for _ in 0..2 {
        let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
        assert_eq!(s, 200);
    }
    let prompts = comfy.state.inner.lock().unwrap().prompts.clone();
    assert_ne!(prompts[1]["1"]["inputs"]["color"], prompts[2]["1"]["inputs"]["color"]);
    assert_eq!(comfy.state.inner.lock().unwrap().origins_refused, 0, "easel never sends an Origin header");
    let (_, _, health) = gw.get("/health").await;
    let h: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert!(
        h["backends"]["comfy"]["detail"].as_str().unwrap().contains("ComfyUI 0.3.64, queue 0 running / 0 pending"),
        "{h}"
    );
}

#[tokio::test]
async fn validation_errors_name_the_node_and_runtime_errors_the_exception() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "10s")).await;
    let (s, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p", "size": "0x24"})).await;
    // easel itself refuses a zero size before ComfyUI sees it.
    assert_eq!(s, 400, "{body}");

    let wf_dir = tempfile::tempdir().unwrap();
    std::fs::write(wf_dir.path().join("bad.json"), r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": {{ height }}, "batch_size": 1, "color": 0}}, "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}"#).unwrap();
    let yaml = config(&comfy.url, "x", "10s")
        .replace(&format!("{WORKFLOWS}/x"), wf_dir.path().join("bad.json").to_str().unwrap());
    let gw2 = spawn_gateway(&yaml).await;
    let (s, _, body) = gw2.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("node 1 (EmptyImage): Value 0 smaller than min of 16: width"), "{msg}");

    comfy.state.knobs.fail_exec.store(true, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("node 3 (KSampler): torch.OutOfMemoryError"), "{msg}");
}

#[tokio::test]
async fn a_lost_or_refused_socket_falls_back_to_history_polling() {
    let comfy = support::comfyui::start().await;
    comfy.state.knobs.run_ms.store(100, Ordering::SeqCst);
    comfy.state.knobs.drop_ws.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 200, "socket dropped mid-job: {body}");

    comfy.state.knobs.drop_ws.store(false, Ordering::SeqCst);
    comfy.state.knobs.refuse_ws.store(true, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 200, "socket refused: {body}");
}

#[tokio::test]
async fn timeouts_and_disconnects_cancel_upstream() {
    let comfy = support::comfyui::start().await;
    comfy.state.knobs.run_ms.store(5000, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "500ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");

    // A running prompt is interrupted; a queued one (behind it) is deleted.
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "30s")).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let before = comfy.state.inner.lock().unwrap().interrupts;
    assert!(
        impatient
            .post(gw.endpoint("/v1/images/generations"))
            .json(&json!({"model": "free", "prompt": "p"}))
            .send()
            .await
            .is_err()
    );
    wait_for("an interrupt or a queue delete", || {
        let inner = comfy.state.inner.lock().unwrap();
        inner.interrupts > before || !inner.deleted.is_empty()
    })
    .await;
}

#[tokio::test]
async fn edits_upload_the_input_and_name_it_in_the_workflow() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-edit.json", "10s")).await;
    let png = {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "free")
        .text("prompt", "invert it")
        .part("image", reqwest::multipart::Part::bytes(png).file_name("photo.png").mime_str("image/png").unwrap());
    let resp = gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let inner = comfy.state.inner.lock().unwrap();
    assert_eq!(inner.uploads, ["photo.png"]);
    assert_eq!(inner.prompts[0]["1"]["inputs"]["image"], "photo.png");
}
