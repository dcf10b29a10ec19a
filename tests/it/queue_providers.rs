//! fal.ai and Replicate end to end against their fakes: submit, poll, download, `n`, size and seed mapping, auth
//! schemes, validation errors, failed jobs, flagged images, edits as data URLs, and cancellation on disconnect.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use crate::support::{self, TEST_TIMEOUT, spawn_gateway};

fn fal_config(url: &str) -> String {
    format!(
        "backends:\n  fal:\n    kind: fal\n    url: {url}\n    api_key: {}\n    poll_interval: 10ms\n    timeout: 10s\nmodels:\n  - id: flux\n    backends: [fal]\n    upstream_model: fal-ai/flux/dev\n",
        support::fal::KEY
    )
}

fn replicate_config(url: &str, model: &str) -> String {
    format!(
        "backends:\n  rep:\n    kind: replicate\n    url: {url}\n    api_key: {}\n    poll_interval: 10ms\n    timeout: 10s\nmodels:\n  - id: sdxl\n    backends: [rep]\n    upstream_model: {model}\n",
        support::replicate::TOKEN
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
async fn fal_queue_round_trip() {
    let fal = support::fal::start().await;
    fal.state.polls_before_done.store(3, Ordering::SeqCst);
    let gw = spawn_gateway(&fal_config(&fal.url)).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "flux", "prompt": "a fox", "n": 2, "size": "512x768", "seed": 40, "steps": 8, "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let first =
        base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(
        image::load_from_memory(&first).unwrap().to_rgb8().get_pixel(0, 0).0[0],
        40,
        "the image fal made for seed 40"
    );
    let (path, sent) = fal.state.submitted.lock().unwrap()[0].clone();
    assert_eq!(path, "/fal-ai/flux/dev", "the endpoint id with its path");
    assert_eq!(sent["image_size"], json!({"width": 512, "height": 768}));
    assert_eq!(
        (sent["num_images"].as_u64(), sent["seed"].as_u64(), sent["num_inference_steps"].as_u64()),
        (Some(2), Some(40), Some(8))
    );
    assert!(fal.state.auth_headers.lock().unwrap().iter().all(|h| h == &format!("Key {}", support::fal::KEY)));
    assert!(fal.state.polls.load(Ordering::SeqCst) >= 4, "polled until COMPLETED");
}

#[tokio::test]
async fn fal_errors_and_flags() {
    let fal = support::fal::start().await;
    let gw = spawn_gateway(&fal_config(&fal.url)).await;
    *fal.state.submit_error.lock().unwrap() = Some((
        422,
        json!({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}),
    ));
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("body.prompt: field required"), "{body}");

    *fal.state.submit_error.lock().unwrap() = None;
    fal.state.nsfw.store(true, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("safety checker"), "{body}");

    let wrong_key = fal_config(&fal.url).replace(support::fal::KEY, "nope");
    let gw = spawn_gateway(&wrong_key).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 503, "the probe saw 401: the backend is unhealthy: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("credentials"), "{body}");
}

#[tokio::test]
async fn fal_edit_sends_data_urls_and_a_disconnect_cancels() {
    let fal = support::fal::start().await;
    let gw = spawn_gateway(&fal_config(&fal.url)).await;
    let png = {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(4, 4))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let (s, _, body) = gw.post_json("/v1/images/edits", json!({"model": "flux", "prompt": "p", "images": [{"image_url": data_url}], "mask": {"image_url": data_url}})).await;
    assert_eq!(s, 200, "{body}");
    let sent = fal.state.submitted.lock().unwrap()[0].1.clone();
    assert_eq!(sent["image_url"], data_url);
    assert_eq!(sent["mask_url"], data_url);

    fal.state.never_done.store(true, Ordering::SeqCst);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let r = impatient
        .post(gw.endpoint("/v1/images/generations"))
        .json(&json!({"model": "flux", "prompt": "p"}))
        .send()
        .await;
    assert!(r.is_err());
    wait_for("the cancel to reach fal", || fal.state.cancelled.load(Ordering::SeqCst)).await;
}

#[tokio::test]
async fn replicate_sync_and_polled_predictions() {
    let rep = support::replicate::start().await;
    rep.state.sync.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&replicate_config(&rep.url, "stability-ai/sdxl")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sdxl", "prompt": "p", "n": 2, "seed": 9, "size": "64x32"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let (path, sent, prefer) = rep.state.created.lock().unwrap()[0].clone();
    assert_eq!(path, "/v1/models/stability-ai/sdxl/predictions");
    assert!(prefer.starts_with("wait="), "{prefer}");
    assert_eq!(
        (sent["input"]["width"].as_u64(), sent["input"]["height"].as_u64(), sent["input"]["num_outputs"].as_u64()),
        (Some(64), Some(32), Some(2))
    );

    // A version id goes to /v1/predictions; a slow model is polled; a single URL output works.
    let rep = support::replicate::start().await;
    rep.state.polls_before_done.store(2, Ordering::SeqCst);
    rep.state.single_output.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&replicate_config(
        &rep.url,
        "\"owner/model:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa\"",
    ))
    .await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sdxl", "prompt": "p", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    let (path, sent, _) = rep.state.created.lock().unwrap()[0].clone();
    assert_eq!(path, "/v1/predictions");
    assert_eq!(sent["version"], "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa");
    assert!(rep.state.polls.load(Ordering::SeqCst) >= 3);
    let (_, _, health) = gw.get("/health").await;
    let h: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert!(h["backends"]["rep"]["detail"].as_str().unwrap().contains("tester"), "{h}");
}

#[tokio::test]
async fn replicate_failures_and_cancellation() {
    let rep = support::replicate::start().await;
    let gw = spawn_gateway(&replicate_config(&rep.url, "o/n")).await;
    *rep.state.fail_with.lock().unwrap() = Some("CUDA error: out of memory".into());
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sdxl", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("CUDA error: out of memory"), "{body}");

    *rep.state.fail_with.lock().unwrap() = Some("NSFW content detected. Try running it again.".into());
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sdxl", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");

    let (s, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "sdxl", "prompt": "p", "size": "13x13"})).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("multiple of 8"), "{body}");

    *rep.state.fail_with.lock().unwrap() = None;
    rep.state.never_done.store(true, Ordering::SeqCst);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    assert!(
        impatient
            .post(gw.endpoint("/v1/images/generations"))
            .json(&json!({"model": "sdxl", "prompt": "p"}))
            .send()
            .await
            .is_err()
    );
    wait_for("the cancel to reach Replicate", || rep.state.cancelled.load(Ordering::SeqCst)).await;
}

#[tokio::test]
async fn slow_queue_jobs_time_out_and_are_cancelled() {
    let fal = support::fal::start().await;
    fal.state.never_done.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&fal_config(&fal.url).replace("timeout: 10s", "timeout: 400ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");

    let rep = support::replicate::start().await;
    rep.state.never_done.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&replicate_config(&rep.url, "o/n").replace("timeout: 10s", "timeout: 400ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sdxl", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
}
