//! The `openai` adapter against a fake OpenAI-compatible server: both answer shapes, `n`, what easel sends, edits,
//! and every failure the errors table names.

use std::sync::atomic::Ordering;

use base64::Engine;
use serde_json::json;

use crate::support::{self, spawn_gateway};

fn config(url: &str, model: &str, extra: &str) -> String {
    format!(
        "backends:\n  oa:\n    kind: openai\n    url: {url}/v1\n    api_key: {}\n    timeout: 2s\n{extra}models:\n  - id: m\n    backends: [oa]\n    upstream_model: {model}\n",
        support::openai::KEY
    )
}

#[tokio::test]
async fn generates_in_both_formats_and_sends_the_right_fields() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "sd-turbo", "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat", "n": 3, "size": "512x512", "quality": "high", "response_format": "b64_json", "extra": {"sampler": "euler"}})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    assert_eq!(up.state.calls.load(Ordering::SeqCst), 1, "n=3 in one call");
    let sent = up.state.bodies.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "sd-turbo");
    assert_eq!(sent["n"], 3);
    assert_eq!(sent["size"], "512x512");
    assert_eq!(sent["quality"], "high");
    assert_eq!(sent["response_format"], "b64_json");
    assert_eq!(sent["sampler"], "euler", "`extra` is merged into the native body");
    let png = base64::engine::general_purpose::STANDARD.decode(body["data"][1]["b64_json"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    // URL answers from upstream are downloaded and re-served by easel.
    up.state.url_answers.store(true, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    assert_eq!(s, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&gw.url), "easel serves it: {url}");
    let (s, headers, bytes) = gw.get(url).await;
    assert_eq!((s, headers["content-type"].to_str().unwrap()), (200, "image/png"));
    assert!(bytes.starts_with(b"\x89PNG"));
}

#[tokio::test]
async fn gpt_image_models_get_no_response_format_and_dalle3_is_split() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "gpt-image-1", "")).await;
    let (s, _, _) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "m", "prompt": "p", "output_format": "webp", "background": "transparent"}),
        )
        .await;
    assert_eq!(s, 200);
    let sent = up.state.bodies.lock().unwrap()[0].clone();
    assert!(sent.get("response_format").is_none(), "{sent}");
    assert_eq!((sent["output_format"].as_str(), sent["background"].as_str()), (Some("webp"), Some("transparent")));

    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "dall-e-3", "    max_images_per_call: 1\n")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "m", "prompt": "p", "n": 2, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(up.state.calls.load(Ordering::SeqCst), 2, "dall-e-3 takes n=1: two calls");
    assert_eq!(body["data"][0]["revised_prompt"], "a more detailed prompt");
}

#[tokio::test]
async fn edits_go_multipart_with_every_image_and_the_mask() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "gpt-image-1", "")).await;
    let form = reqwest::multipart::Form::new()
        .text("model", "m")
        .text("prompt", "add a hat")
        .part(
            "image[]",
            reqwest::multipart::Part::bytes(support::openai::png(1)).file_name("a.png").mime_str("image/png").unwrap(),
        )
        .part(
            "image[]",
            reqwest::multipart::Part::bytes(support::openai::png(2)).file_name("b.png").mime_str("image/png").unwrap(),
        )
        .part(
            "mask",
            reqwest::multipart::Part::bytes(support::openai::png(3)).file_name("m.png").mime_str("image/png").unwrap(),
        );
    let resp = gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let fields = up.state.edit_fields.lock().unwrap().clone();
    let files: Vec<(String, Option<String>)> = fields.iter().filter(|(_, f)| f.is_some()).cloned().collect();
    assert_eq!(
        files,
        [
            ("image[]".into(), Some("a.png".into())),
            ("image[]".into(), Some("b.png".into())),
            ("mask".into(), Some("m.png".into()))
        ]
    );
    assert!(fields.iter().any(|(n, _)| n == "prompt"));
}

#[tokio::test]
async fn upstream_failures_are_named() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "dall-e-3", "")).await;
    // The upstream's validation message is the client's to fix: 400 with that message.
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "n": 2})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("You must provide n=1"), "{body}");

    *up.state.fail.lock().unwrap() = Some((
        500,
        json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}),
    ));
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("HTTP 500") && msg.contains(&up.url) && msg.contains("had an error"), "{msg}");

    *up.state.fail.lock().unwrap() = None;
    up.state.latency_ms.store(3000, Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");
    assert!(body["error"]["message"].as_str().unwrap().contains("did not answer within 2s"), "{body}");
}

#[tokio::test]
async fn a_server_without_the_images_path_gets_a_hint() {
    let up = support::openai::start().await;
    up.state.llm_only.store(true, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&up.url, "llama", "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("HTTP 404") && msg.contains("/v1/images/generations"), "{msg}");
    assert!(msg.contains("does not serve this path for kind `openai`"), "{msg}");
}

#[tokio::test]
async fn bad_keys_and_dead_servers() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "m", "").replace(support::openai::KEY, "sk-wrong")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 503, "the probe was refused: the only backend is unhealthy: {body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("HTTP 401") && msg.contains("api_key"), "{msg}");

    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let gw = spawn_gateway(&config(&dead_url, "m", "")).await;
    let (s, headers, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert!(headers.contains_key("retry-after"));
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`oa`") && msg.contains(&dead_url) && msg.contains("unreachable"), "{msg}");
}

/// A PNG large enough that validating its base64 takes several steps (noise does not compress).
fn noisy_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(2_654_435_761).wrapping_add(y.wrapping_mul(40_503)).rotate_left(x % 13);
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_base64_reaches_the_client_byte_identical() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "sd-turbo", "")).await;
    let png = noisy_png(300, 200);
    let text = base64::engine::general_purpose::STANDARD.encode(&png);
    assert!(text.len() > 200_000, "spans several validation steps: {} bytes", text.len());
    *up.state.b64_answer.lock().unwrap() = Some(text.clone());

    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .json(&json!({"model": "m", "prompt": "p", "n": 2, "response_format": "b64_json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let raw = resp.bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&raw).expect("the chained body is one JSON document");
    for i in 0..2 {
        assert_eq!(body["data"][i]["b64_json"].as_str(), Some(text.as_str()), "image {i} is the upstream's text");
    }
    assert_eq!(body["size"], "300x200", "dimensions read while validating");
    assert_eq!(body["output_format"], "png");
    let needle = format!("\"b64_json\":\"{text}\"");
    assert_eq!(raw.windows(needle.len()).filter(|w| *w == needle.as_bytes()).count(), 2, "the bytes as sent");

    // URL mode and a format change still decode it.
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, bytes) = gw.get(body["data"][0]["url"].as_str().unwrap()).await;
    assert_eq!((s, &bytes[..]), (200, &png[..]), "the stored file is the decoded image");
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "m", "prompt": "p", "response_format": "b64_json", "output_format": "jpeg"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let jpeg = base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert!(jpeg.starts_with(&[0xFF, 0xD8, 0xFF]), "transcoded to JPEG");

    // Line-wrapped base64 is still read (the lenient way) and goes out as one line.
    let wrapped: Vec<String> = text.as_bytes().chunks(76).map(|l| String::from_utf8(l.to_vec()).unwrap()).collect();
    *up.state.b64_answer.lock().unwrap() = Some(wrapped.join("\n"));
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"][0]["b64_json"].as_str(), Some(text.as_str()));

    // Invalid base64 is refused as the upstream's fault.
    let mut bad = text.clone();
    bad.replace_range(1000..1001, "*");
    *up.state.b64_answer.lock().unwrap() = Some(bad);
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 502, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("invalid base64"), "{body}");
}
