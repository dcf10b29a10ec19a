//! The `a1111` adapter against a fake AUTOMATIC1111: what easel sends, batches, grid skipping, both error shapes,
//! `--api` off, timeouts, edits through img2img and interrupt on disconnect.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use crate::support::{self, TEST_TIMEOUT, spawn_gateway};

fn config(url: &str, checkpoint: &str) -> String {
    format!(
        "backends:\n  sd:\n    kind: a1111\n    url: {url}\n    timeout: 2s\nmodels:\n  - id: sd15\n    backends: [sd]\n    upstream_model: {checkpoint}\n    default_size: 64x64\n"
    )
}

fn decode(v: &serde_json::Value) -> image::RgbImage {
    image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap())
        .unwrap()
        .to_rgb8()
}

#[tokio::test]
async fn txt2img_with_checkpoint_batch_and_fields() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, support::a1111::CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "a barn", "negative_prompt": "people", "n": 3, "size": "100x68", "seed": 10, "steps": 12, "guidance_scale": 6.5, "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    let calls = sd.state.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "n=3 is one batch");
    let (path, sent) = &calls[0];
    assert_eq!(path, "/sdapi/v1/txt2img");
    assert_eq!(sent["batch_size"], 3);
    assert_eq!((sent["width"].as_u64(), sent["height"].as_u64()), (Some(96), Some(64)), "multiples of 8");
    assert_eq!(
        (sent["seed"].as_i64(), sent["steps"].as_u64(), sent["cfg_scale"].as_f64()),
        (Some(10), Some(12), Some(6.5))
    );
    assert_eq!(sent["negative_prompt"], "people");
    assert_eq!(sent["override_settings"]["sd_model_checkpoint"], support::a1111::CHECKPOINT);
    assert_eq!(sent["override_settings_restore_afterwards"], false);
    assert_eq!(decode(&body["data"][0]["b64_json"]).get_pixel(0, 0).0[0], 10, "the image for seed 10");

    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200);
    let (_, _, bytes) = gw.get(body["data"][0]["url"].as_str().unwrap()).await;
    assert!(bytes.starts_with(b"\x89PNG"));
    let (_, _, health) = gw.get("/health").await;
    let h: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert!(h["backends"]["sd"]["detail"].as_str().unwrap().contains("AUTOMATIC1111, checkpoint v1-5"), "{h}");
}

#[tokio::test]
async fn grids_and_extras_are_skipped() {
    let sd = support::a1111::start().await;
    sd.state.grid.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&sd.url, "current")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sd15", "prompt": "p", "n": 2, "seed": 3, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let shades: Vec<u8> =
        body["data"].as_array().unwrap().iter().map(|d| decode(&d["b64_json"]).get_pixel(0, 0).0[0]).collect();
    assert_eq!(shades, [3, 4], "the grid (shade 255) is not an output");
    assert!(
        sd.state.calls.lock().unwrap()[0].1.get("override_settings").is_none(),
        "`current` keeps the loaded checkpoint"
    );
}

#[tokio::test]
async fn both_error_shapes_and_a_missing_api_flag() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, "sdxl.safetensors")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("RuntimeError: model 'sdxl.safetensors' not found"),
        "{body}"
    );

    let gw = spawn_gateway(&config(&sd.url, support::a1111::CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p", "extra": {"steps": "many"}}))
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("body.steps: value is not a valid integer"), "{body}");

    sd.state.no_api.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&sd.url, support::a1111::CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 503, "the probe found no API, so the backend is out of routing: {body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("HTTP 404") && msg.contains("/sdapi/v1/progress") && msg.contains("--api"), "{msg}");
}

#[tokio::test]
async fn slow_generations_time_out_and_a_disconnect_interrupts() {
    let sd = support::a1111::start().await;
    sd.state.latency_ms.store(3000, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&sd.url, support::a1111::CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");

    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    assert!(
        impatient
            .post(gw.endpoint("/v1/images/generations"))
            .json(&json!({"model": "sd15", "prompt": "p"}))
            .send()
            .await
            .is_err()
    );
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !sd.state.interrupted.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no interrupt reached A1111");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn edits_use_img2img_with_a_converted_mask() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, support::a1111::CHECKPOINT)).await;
    let mask = {
        let img = image::RgbaImage::from_fn(8, 8, |x, _| image::Rgba([0, 0, 0, if x < 4 { 0 } else { 255 }]));
        let mut b = Vec::new();
        image::DynamicImage::ImageRgba8(img)
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "sd15")
        .text("prompt", "p")
        .part(
            "image",
            reqwest::multipart::Part::bytes(support::a1111::png(9, 8, 8))
                .file_name("i.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .part("mask", reqwest::multipart::Part::bytes(mask).file_name("m.png").mime_str("image/png").unwrap());
    let resp = gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let (path, sent) = sd.state.calls.lock().unwrap()[0].clone();
    assert_eq!(path, "/sdapi/v1/img2img");
    assert_eq!(sent["init_images"].as_array().unwrap().len(), 1);
    let converted = image::load_from_memory(
        &base64::engine::general_purpose::STANDARD.decode(sent["mask"].as_str().unwrap()).unwrap(),
    )
    .unwrap()
    .to_luma8();
    assert_eq!(
        (converted.get_pixel(0, 0).0[0], converted.get_pixel(7, 0).0[0]),
        (255, 0),
        "transparent → white (repaint)"
    );
    assert_eq!((sent["width"].as_u64(), sent["height"].as_u64()), (Some(8), Some(8)), "the input's size");
}
