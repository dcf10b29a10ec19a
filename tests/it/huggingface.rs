//! The `huggingface` adapter against a fake Inference API: router paths, `Accept`, parameters, one call per
//! image, a cold model's 503 with `Retry-After`, and dedicated endpoints.

use base64::Engine;
use serde_json::{Value, json};

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
async fn a_rate_limited_endpoint_is_a_429_retrying_when_its_quota_resets() {
    let hf = support::huggingface::start().await;
    hf.state.rate_limited_calls.store(1, std::sync::atomic::Ordering::SeqCst);
    let gw = spawn_gateway(&config(&hf.url, "o/busy")).await;
    let (s, headers, body) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(headers["retry-after"], "55", "the `t=` of the RateLimit header: {headers:?}");
    let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "flux", "prompt": "p"})).await;
    assert_eq!(s, 200);
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

fn edit_config(url: &str, model: &str, task: &str) -> String {
    format!(
        "{}    edit_task: {task}\n  - id: plain\n    backends: [hf]\n    upstream_model: {model}\n",
        config(url, model)
    )
}

fn png(w: u32, h: u32, alpha_left: u8) -> String {
    let img = image::RgbaImage::from_fn(w, h, |x, _| image::Rgba([9, 9, 9, if x < w / 2 { alpha_left } else { 255 }]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out)
}

fn data_url(b64: &str) -> Value {
    json!({"image_url": format!("data:image/png;base64,{b64}")})
}

fn decode(v: &Value) -> image::DynamicImage {
    image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()).unwrap()
}

#[tokio::test]
async fn image_to_image_on_the_router_sends_the_image_as_base64_inputs() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&edit_config(&hf.url, "stabilityai/sdxl-refiner", "image-to-image")).await;
    let image = png(32, 16, 255);
    let (s, _, body) = gw
        .post_json("/v1/images/edits", json!({"model": "flux", "prompt": "make it dusk", "images": [data_url(&image)], "seed": 3, "steps": 7, "negative_prompt": "fog", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["data"][0]["b64_json"].is_string(), "{body}");
    let calls = hf.state.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let (path, accept, sent) = &calls[0];
    assert_eq!(path, "/models/stabilityai/sdxl-refiner");
    assert_eq!(accept, "image/png");
    assert_eq!(sent["inputs"], image.as_str(), "the input image, base64");
    let p = &sent["parameters"];
    assert_eq!(p["prompt"], "make it dusk");
    assert_eq!(p["negative_prompt"], "fog");
    assert_eq!(p["target_size"], json!({"width": 32, "height": 16}), "the input's size when none is asked");
    assert_eq!((p["seed"].as_u64(), p["num_inference_steps"].as_u64()), (Some(3), Some(7)));
    assert!(p.get("mask_image").is_none());
}

#[tokio::test]
async fn image_to_image_on_a_dedicated_endpoint_posts_to_its_root() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&edit_config(&hf.url, "my-endpoint", "image-to-image")).await;
    let (s, _, body) = gw
        .post_json("/v1/images/edits", json!({"model": "flux", "prompt": "p", "images": [data_url(&png(8, 8, 255))], "size": "64x32", "output_format": "jpeg", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["output_format"], "jpeg");
    let (path, accept, sent) = hf.state.calls.lock().unwrap()[0].clone();
    assert_eq!((path.as_str(), accept.as_str()), ("/", "image/jpeg"));
    assert_eq!(sent["parameters"]["target_size"], json!({"width": 64, "height": 32}));
}

#[tokio::test]
async fn inpainting_sends_the_mask_white_where_the_client_made_it_transparent() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&edit_config(&hf.url, "o/inpaint", "inpainting")).await;
    let edit = json!({"model": "flux", "prompt": "a hat", "images": [data_url(&png(20, 10, 255))], "response_format": "b64_json"});
    // Inpainting without a mask is the client's to fix, before any upstream call.
    let (s, _, body) = gw.post_json("/v1/images/edits", edit.clone()).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["param"], "mask", "{body}");
    assert!(hf.state.calls.lock().unwrap().is_empty());
    let mut with_mask = edit;
    with_mask["mask"] = data_url(&png(20, 10, 0));
    let (s, _, body) = gw.post_json("/v1/images/edits", with_mask).await;
    assert_eq!(s, 200, "{body}");
    let sent = hf.state.calls.lock().unwrap()[0].2.clone();
    let mask = decode(&sent["parameters"]["mask_image"]).to_luma8();
    assert_eq!((mask.get_pixel(2, 5).0[0], mask.get_pixel(17, 5).0[0]), (255, 0), "white = repaint, black = keep");
}

#[tokio::test]
async fn a_model_without_edit_task_is_refused_before_any_upstream_call() {
    let hf = support::huggingface::start().await;
    let gw = spawn_gateway(&edit_config(&hf.url, "o/m", "image-to-image")).await;
    let image = data_url(&png(8, 8, 255));
    let (s, _, body) =
        gw.post_json("/v1/images/edits", json!({"model": "plain", "prompt": "p", "images": [image.clone()]})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("`hf` (huggingface)"), "{body}");
    // An image-to-image model takes no mask.
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "flux", "prompt": "p", "images": [image.clone()], "mask": image}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["param"], "mask", "{body}");
    assert!(hf.state.calls.lock().unwrap().is_empty(), "nothing reached Hugging Face");
}

#[tokio::test]
async fn an_upstream_refusal_of_the_task_names_the_backend() {
    let hf = support::huggingface::start().await;
    hf.state.text_only.lock().unwrap().push("/models/o/text".into());
    let gw = spawn_gateway(&edit_config(&hf.url, "o/text", "image-to-image")).await;
    let (s, _, body) = gw
        .post_json("/v1/images/edits", json!({"model": "flux", "prompt": "p", "images": [data_url(&png(8, 8, 255))]}))
        .await;
    assert_eq!(s, 400, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`hf`") && msg.contains("does not support task image-to-image"), "{body}");
}

#[tokio::test]
async fn a_loading_model_is_a_503_with_retry_after_for_edits_too() {
    let hf = support::huggingface::start().await;
    hf.state.loading_calls.store(1, std::sync::atomic::Ordering::SeqCst);
    let gw = spawn_gateway(&edit_config(&hf.url, "o/cold", "image-to-image")).await;
    let edit = json!({"model": "flux", "prompt": "p", "images": [data_url(&png(8, 8, 255))]});
    let (s, headers, body) = gw.post_json("/v1/images/edits", edit.clone()).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(headers["retry-after"], "13");
    let (s, _, body) = gw.post_json("/v1/images/edits", edit).await;
    assert_eq!(s, 200, "{body}");
}
