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

fn png(w: u32, h: u32, px: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(px(x, y)));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn part(bytes: Vec<u8>, name: &str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()).mime_str("image/png").unwrap()
}

async fn edit(gw: &support::Gateway, form: reqwest::multipart::Form) -> (u16, serde_json::Value) {
    let resp = gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn first_image(body: &serde_json::Value) -> image::RgbaImage {
    let b64 = body["data"][0]["b64_json"].as_str().unwrap_or_else(|| panic!("no image: {body}"));
    image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap().to_rgba8()
}

#[tokio::test]
async fn edits_upload_the_input_by_content_hash_under_easel() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-edit.json", "10s")).await;
    let bytes = png(8, 8, |_, _| [0, 0, 0, 255]);
    let hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "free")
        .text("prompt", "invert it")
        .text("response_format", "b64_json")
        .part("image", part(bytes, "photo.png"));
    let (s, body) = edit(&gw, form).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(first_image(&body).get_pixel(0, 0).0, [255, 255, 255, 255], "the fake really inverted the input");
    let inner = comfy.state.inner.lock().unwrap();
    let stored = format!("{hash}.png");
    assert_eq!(inner.uploads, [(stored.clone(), "easel".to_owned(), Some("true".to_owned()), stored.clone())]);
    assert_eq!(inner.prompts[0]["1"]["inputs"]["image"], format!("easel/{stored}"));
}

#[tokio::test]
async fn concurrent_edits_of_same_named_files_each_get_their_own_input() {
    let comfy = support::comfyui::start().await;
    // Both jobs are uploaded before either runs, so a shared server-side name would mix them up.
    comfy.state.knobs.run_ms.store(200, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-edit.json", "10s")).await;
    let form = |v: u8| {
        reqwest::multipart::Form::new()
            .text("model", "free")
            .text("prompt", "invert it")
            .text("response_format", "b64_json")
            .part("image", part(png(8, 8, |_, _| [v, v, v, 255]), "image.png"))
    };
    let ((s1, b1), (s2, b2)) = tokio::join!(edit(&gw, form(10)), edit(&gw, form(200)));
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(first_image(&b1).get_pixel(3, 3).0, [245, 245, 245, 255], "the first edit got another input: {b1}");
    assert_eq!(first_image(&b2).get_pixel(3, 3).0, [55, 55, 55, 255], "the second edit got another input");
    let inner = comfy.state.inner.lock().unwrap();
    assert_eq!(inner.uploads.len(), 2);
    assert_ne!(inner.prompts[0]["1"]["inputs"]["image"], inner.prompts[1]["1"]["inputs"]["image"]);
}

#[tokio::test]
async fn an_image_and_mask_with_the_same_name_each_keep_their_role() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-edit.json", "10s")).await;
    // Opaque red image; the mask's left half is transparent (the area to change).
    let image = png(8, 8, |_, _| [200, 0, 0, 255]);
    let mask = png(8, 8, |x, _| [0, 0, 0, if x < 4 { 0 } else { 255 }]);
    let form = reqwest::multipart::Form::new()
        .text("model", "free")
        .text("prompt", "invert the left half")
        .text("response_format", "b64_json")
        .part("image", part(image, "image.png"))
        .part("mask", part(mask, "image.png"));
    let (s, body) = edit(&gw, form).await;
    assert_eq!(s, 200, "{body}");
    let out = first_image(&body);
    assert_eq!(out.get_pixel(1, 1).0, [55, 255, 255, 255], "masked area: the image, inverted");
    assert_eq!(out.get_pixel(6, 1).0, [200, 0, 0, 255], "unmasked area: the image as it was");
    let inner = comfy.state.inner.lock().unwrap();
    assert_ne!(inner.prompts[0]["1"]["inputs"]["image"], inner.prompts[0]["3"]["inputs"]["image"]);
}

#[tokio::test]
async fn edits_a_workflow_cannot_use_are_refused() {
    let comfy = support::comfyui::start().await;
    let wf_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        wf_dir.path().join("unmasked.json"),
        r#"{"1": {"class_type": "LoadImage", "inputs": {"image": {{ image | tojson }}}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}}"#,
    )
    .unwrap();
    let yaml = format!(
        "{}  - id: nomask\n    backends: [comfy]\n    workflow: {}\n",
        config(&comfy.url, "comfyui-model-free.json", "10s"),
        wf_dir.path().join("unmasked.json").display()
    );
    let gw = spawn_gateway(&yaml).await;
    let img = || part(png(8, 8, |_, _| [9, 9, 9, 255]), "image.png");
    let form = reqwest::multipart::Form::new().text("model", "free").text("prompt", "p").part("image", img());
    let (s, body) = edit(&gw, form).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    assert_eq!(body["error"]["param"], "image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("model `free`") && msg.contains("no `image` input"), "{msg}");

    let form = reqwest::multipart::Form::new()
        .text("model", "nomask")
        .text("prompt", "p")
        .part("image", img())
        .part("mask", part(png(8, 8, |_, _| [0, 0, 0, 0]), "mask.png"));
    let (s, body) = edit(&gw, form).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    assert_eq!(body["error"]["param"], "mask");
    assert!(body["error"]["message"].as_str().unwrap().contains("model `nomask`"), "{body}");
    let inner = comfy.state.inner.lock().unwrap();
    assert!(inner.uploads.is_empty() && inner.prompts.is_empty(), "refused before anything reached ComfyUI");
}

#[tokio::test]
async fn a_stalled_prompt_body_is_a_timeout() {
    let comfy = support::comfyui::start().await;
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "500ms")).await;
    comfy.state.knobs.stall_prompt_body.store(true, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p"})).await;
    assert_eq!(s, 504, "a stalled /prompt body is a timeout: {body}");
    assert_eq!(body["error"]["code"], "backend_timeout");
}

#[tokio::test]
async fn prompt_busy_answers_pass_on_retry_after() {
    let comfy = support::comfyui::start().await;
    for (status, code) in [(429u16, "rate_limited"), (503, "backend_unavailable")] {
        comfy.state.knobs.prompt_status.store(u32::from(status), Ordering::SeqCst);
        // A fresh gateway each time, so no earlier failure has marked the backend unhealthy.
        let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "10s")).await;
        let resp = gw
            .client
            .post(gw.endpoint("/v1/images/generations"))
            .json(&json!({"model": "free", "prompt": "p"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["retry-after"], "17", "ComfyUI's Retry-After is passed on");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
}

#[tokio::test]
async fn a_graph_without_a_sampler_reports_progress_by_nodes_on_the_job_stream() {
    let comfy = support::comfyui::start().await;
    comfy.state.knobs.no_sampler.store(true, Ordering::SeqCst);
    comfy.state.knobs.run_ms.store(1_500, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&comfy.url, "comfyui-model-free.json", "10s")).await;
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("Prefer", "respond-async")
        .json(&json!({"model": "free", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let job: serde_json::Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let seen = support::job_events(&gw, "none", &format!("/v1/jobs/{id}/events"), None).await;
    let names: Vec<&str> = seen.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    // Three nodes; the run is spent in the second, one node done: a third of the way.
    let partial: Vec<i64> =
        seen.iter().filter(|e| e.1 == "progress").filter_map(|e| e.2["progress"].as_i64()).collect();
    assert!(partial.contains(&33), "node progress reaches the stream before the end: {seen:?}");
    assert!(partial.windows(2).all(|w| w[0] <= w[1]), "{partial:?}");
}

#[tokio::test]
async fn one_workflow_serves_several_models_through_model_and_extra() {
    let comfy = support::comfyui::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("shared.json");
    std::fs::write(&wf, r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": {{ width }}, "height": {{ height }}, "batch_size": {{ batch_size }}, "color": 0}},
 "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": {{ model | tojson }}, "lora": {{ extra.lora | default("none") | tojson }}}}}"#).unwrap();
    let wf = wf.to_str().unwrap();
    let yaml = format!(
        "backends:\n  comfy: {{kind: comfyui, url: '{}', poll_interval: 20ms}}\nmodels:\n  - {{id: a, backends: [comfy], workflow: {wf}, upstream_model: sd15.safetensors, default_size: 16x16}}\n  - {{id: b, backends: [comfy], workflow: {wf}, upstream_model: sdxl.safetensors, default_size: 16x16}}\n",
        comfy.url
    );
    let gw = spawn_gateway(&yaml).await;
    for (model, extra) in [("a", json!(null)), ("b", json!({"lora": "ink"}))] {
        let (s, _, body) =
            gw.post_json("/v1/images/generations", json!({"model": model, "prompt": "p", "extra": extra})).await;
        assert_eq!(s, 200, "{body}");
    }
    let prompts = comfy.state.inner.lock().unwrap().prompts.clone();
    assert_eq!(prompts[0]["9"]["inputs"]["filename_prefix"], "sd15.safetensors");
    assert_eq!(prompts[0]["9"]["inputs"]["lora"], "none");
    assert_eq!(prompts[1]["9"]["inputs"]["filename_prefix"], "sdxl.safetensors");
    assert_eq!(prompts[1]["9"]["inputs"]["lora"], "ink");
}
