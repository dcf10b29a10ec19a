//! The `invokeai` adapter against a fake InvokeAI: graphs per image with their own seeds, 6.x item ids and the
//! 5.x list, failed items, invalid graphs, timeouts, cancellation on disconnect, and edits through uploads.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use crate::support::{self, TEST_TIMEOUT, spawn_gateway};

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");

fn config(url: &str, workflow: &str, timeout: &str) -> String {
    format!(
        "backends:\n  invoke:\n    kind: invokeai\n    url: {url}\n    timeout: {timeout}\n    poll_interval: 10ms\nmodels:\n  - id: free\n    backends: [invoke]\n    workflow: {WORKFLOWS}/{workflow}\n    default_size: 32x16\n"
    )
}

#[tokio::test]
async fn generates_through_the_queue_on_6x_and_5x() {
    for v5 in [false, true] {
        let inv = support::invokeai::start().await;
        inv.state.v5.store(v5, Ordering::SeqCst);
        let gw = spawn_gateway(&config(&inv.url, "invokeai-model-free.json", "10s")).await;
        let (s, _, body) = gw
            .post_json(
                "/v1/images/generations",
                json!({"model": "free", "prompt": "p", "n": 2, "seed": 10, "response_format": "b64_json"}),
            )
            .await;
        assert_eq!(s, 200, "v5={v5}: {body}");
        let reds: Vec<u8> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                image::load_from_memory(
                    &base64::engine::general_purpose::STANDARD.decode(d["b64_json"].as_str().unwrap()).unwrap(),
                )
                .unwrap()
                .to_rgb8()
                .get_pixel(0, 0)
                .0[0]
            })
            .collect();
        assert_eq!(reds, [10, 11], "one graph per image, each with its own seed");
        let batches = inv.state.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0]["batch"]["graph"]["nodes"]["blank"]["width"], 32);
        assert_eq!(batches[0]["batch"]["origin"], "easel");
        assert_eq!(batches[0]["prepend"], false);
        let (_, _, health) = gw.get("/health").await;
        let h: serde_json::Value = serde_json::from_slice(&health).unwrap();
        assert!(h["backends"]["invoke"]["detail"].as_str().unwrap().starts_with("InvokeAI "), "{h}");
    }
}

#[tokio::test]
async fn failed_items_and_invalid_graphs() {
    let inv = support::invokeai::start().await;
    inv.state.fail.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&inv.url, "invokeai-model-free.json", "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("MissingInputException: Node img_blur missing value"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"nodes": {"x": {"id": "x", "type": "no_such_node", "width": {{ width }}}}, "edges": []}"#,
    )
    .unwrap();
    let yaml =
        config(&inv.url, "x", "10s").replace(&format!("{WORKFLOWS}/x"), dir.path().join("bad.json").to_str().unwrap());
    let gw = spawn_gateway(&yaml).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("body.batch.graph.nodes.x"), "{body}");
}

#[tokio::test]
async fn timeouts_and_disconnects_cancel_the_item() {
    let inv = support::invokeai::start().await;
    inv.state.run_ms.store(5000, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&inv.url, "invokeai-model-free.json", "400ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");

    let gw = spawn_gateway(&config(&inv.url, "invokeai-model-free.json", "30s")).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    assert!(
        impatient
            .post(gw.endpoint("/v1/images/generations"))
            .json(&json!({"model": "free", "prompt": "p"}))
            .send()
            .await
            .is_err()
    );
    let deadline = Instant::now() + TEST_TIMEOUT;
    while inv.state.cancelled.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the item was never cancelled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn edits_upload_the_input_and_feed_its_name_to_the_graph() {
    let inv = support::invokeai::start().await;
    let gw = spawn_gateway(&config(&inv.url, "invokeai-edit.json", "10s")).await;
    let png = {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "free", "prompt": "blur it", "images": [{"image_url": data_url}]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(inv.state.uploads.lock().unwrap().clone(), ["upload-0.png"]);
    let batch = inv.state.batches.lock().unwrap()[0].clone();
    assert_eq!(batch["batch"]["graph"]["nodes"]["input"]["image"]["image_name"], "upload-0.png");
}
