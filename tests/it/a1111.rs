//! The `a1111` adapter end to end, easel in front of a fake AUTOMATIC1111/Forge: the native request easel sends
//! (one batch for `n`, checkpoint override, size, seed, steps, cfg, `extra`), b64 and URL answers, grids and
//! extras skipped, checkpoint aliases, every error shape (pydantic 422, wrapped 500, Forge's plain 500, no
//! `--api`, auth), timeouts, interrupt on disconnect, and edits through img2img.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::a1111::{CHECKPOINT, CINEMATIC, FakeA1111, SDXL};
use crate::support::{self, TEST_TIMEOUT, spawn_gateway};

const LOADED_TITLE: &str = "v1-5-pruned-emaonly.safetensors [6ce0161689]";

/// A gateway config with one a1111 backend `sd` and one model `sd15` on it.
fn config(url: &str, checkpoint: &str) -> String {
    config_with(url, checkpoint, "10s", "")
}

fn config_with(url: &str, checkpoint: &str, timeout: &str, backend_extra: &str) -> String {
    format!(
        "backends:\n  sd:\n    kind: a1111\n    url: {url}\n    timeout: {timeout}\n{backend_extra}models:\n  - id: sd15\n    backends: [sd]\n    upstream_model: \"{checkpoint}\"\n    default_size: 64x64\n"
    )
}

fn decode(v: &Value) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("b64_json")).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// The red channel of each returned image: the fake paints image `k` with `seed + k`.
fn shades(body: &Value) -> Vec<u8> {
    body["data"].as_array().unwrap().iter().map(|d| decode(&d["b64_json"]).get_pixel(0, 0).0[0]).collect()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}"))
}

#[tokio::test]
async fn n_images_are_one_native_batch_with_every_field() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sd15", "prompt": "a red barn", "negative_prompt": "people", "n": 3, "size": "100x68", "seed": 10, "steps": 12, "guidance_scale": 6.5, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(shades(&body), [10, 11, 12], "three images, in batch order");
    assert_eq!(decode(&body["data"][0]["b64_json"]).dimensions(), (96, 64));
    assert!(body["data"][0].get("revised_prompt").is_none(), "A1111 did not change the prompt: {body}");

    let calls = sd.generations();
    assert_eq!(calls.len(), 1, "n=3 is one txt2img call");
    let (call, sent) = (&calls[0], &calls[0].body);
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/sdapi/v1/txt2img"));
    assert_eq!(sent["prompt"], "a red barn");
    assert_eq!(sent["negative_prompt"], "people");
    assert_eq!((sent["batch_size"].as_u64(), sent["n_iter"].as_u64()), (Some(3), Some(1)));
    assert_eq!((sent["width"].as_u64(), sent["height"].as_u64()), (Some(96), Some(64)), "rounded down to 8");
    assert_eq!(sent["seed"].as_i64(), Some(10));
    assert_eq!(sent["steps"].as_u64(), Some(12));
    assert_eq!(sent["cfg_scale"].as_f64(), Some(6.5));
    assert_eq!(sent["override_settings"], json!({"sd_model_checkpoint": CHECKPOINT}));
    assert_eq!(sent["override_settings_restore_afterwards"], false, "the checkpoint stays loaded");
    assert_eq!((sent["send_images"].as_bool(), sent["save_images"].as_bool()), (Some(true), Some(false)));
    assert_eq!(call.authorization, None, "no api_key, no auth header");
}

#[tokio::test]
async fn url_answers_server_defaults_and_health() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap_or_else(|| panic!("a url answer: {body}"));
    let (s, headers, bytes) = gw.get(url).await;
    assert_eq!(s, 200);
    assert_eq!(headers["content-type"], "image/png");
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64), "the model's default size");

    let sent = &sd.generations()[0].body;
    assert_eq!(sent["seed"].as_i64(), Some(-1), "no seed: A1111 picks");
    assert_eq!(sent["steps"].as_u64(), Some(20), "easel's default, not the server's 50");
    assert!(sent.get("cfg_scale").is_none(), "no guidance: the server's default");
    assert_eq!(sent["negative_prompt"], "");

    let probes: Vec<_> = sd.received().into_iter().filter(|r| r.method == "GET").collect();
    assert_eq!(probes[0].path, "/sdapi/v1/progress");
    assert_eq!(probes[0].query.as_deref(), Some("skip_current_image=true"));
    assert_eq!(probes[1].path, "/sdapi/v1/options");
    let (_, _, health) = gw.get("/health").await;
    let h: Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(h["backends"]["sd"]["detail"], format!("AUTOMATIC1111, checkpoint {LOADED_TITLE}"), "{h}");
    assert_eq!(h["backends"]["sd"]["ready"], true, "{h}");
}

#[tokio::test]
async fn checkpoints_switch_by_any_alias_and_unknown_ones_fail_loudly() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, "sd_xl_base_1.0")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200, "a model name is an alias: {body}");
    assert!(sd.loaded().starts_with(SDXL), "restore_afterwards=false keeps it loaded: {}", sd.loaded());

    // A1111 ignores a checkpoint it does not know and uses the loaded one; easel notices.
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, "sdxl-typo.safetensors")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = message(&body);
    assert!(
        msg.contains("`v1-5-pruned-emaonly` instead of `sdxl-typo.safetensors`") && msg.contains("/sdapi/v1/sd-models"),
        "{msg}"
    );

    // `current`: whatever is loaded, no override at all.
    let gw = spawn_gateway(&config(&sd.url, "current")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    let sent = sd.generations().last().unwrap().body.clone();
    assert!(sent.get("override_settings").is_none() && sent.get("override_settings_restore_afterwards").is_none());
}

#[tokio::test]
async fn extra_is_merged_and_a_rewritten_prompt_comes_back() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let extra = json!({"sampler_name": "DPM++ 2M", "steps": 30, "styles": ["cinematic"], "override_settings": {"CLIP_stop_at_last_layers": 2}});
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sd15", "prompt": "a fox", "steps": 12, "extra": extra, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"][0]["revised_prompt"], format!("a fox{CINEMATIC}"), "{body}");
    let sent = &sd.generations()[0].body;
    assert_eq!(sent["sampler_name"], "DPM++ 2M");
    assert_eq!(sent["steps"], 30, "extra wins over easel's own field");
    assert_eq!(
        sent["override_settings"],
        json!({"sd_model_checkpoint": CHECKPOINT, "CLIP_stop_at_last_layers": 2}),
        "override_settings are merged, the checkpoint kept"
    );
}

#[tokio::test]
async fn grids_and_forge_extras_are_skipped() {
    let sd = FakeA1111::builder().forge().extra_images(2).start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sd15", "prompt": "p", "n": 2, "seed": 3, "extra": {"save_images": true}, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(shades(&body), [3, 4], "neither the grid (255) nor the detect maps (254)");
    assert_eq!(sd.generations()[0].body["save_images"], true, "the grid came from save_images");
    let (_, _, health) = gw.get("/health").await;
    let h: Value = serde_json::from_slice(&health).unwrap();
    assert!(h["backends"]["sd"]["detail"].as_str().unwrap().starts_with("Forge, checkpoint"), "{h}");
}

#[tokio::test]
async fn validation_errors_are_the_clients_with_the_pydantic_location() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p", "extra": {"steps": "many"}}))
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert!(message(&body).contains("body.steps: value is not a valid integer"), "{body}");

    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p", "extra": {"sampler_name": "Nope"}}))
        .await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("backend_rejected_request")), "{body}");
    assert!(message(&body).contains("Sampler not found"), "{body}");

    let forge = FakeA1111::builder().forge().start().await;
    let gw = spawn_gateway(&config(&forge.url, CHECKPOINT)).await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p", "extra": {"cfg_scale": "high"}}))
        .await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("backend_rejected_request")), "{body}");
    assert!(message(&body).contains("body.cfg_scale: Input should be a valid number"), "pydantic v2: {body}");
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p", "extra": {"sampler_name": "Nope"}}))
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(message(&body).contains("Sampler not found"), "Forge's plain detail: {body}");
}

#[tokio::test]
async fn server_errors_are_502s_with_the_upstream_message() {
    // Every second generation runs out of memory (A1111's wrapped error shape).
    let sd = FakeA1111::builder().fail_every(2).start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let generate = || gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"}));
    assert_eq!(generate().await.0, 200);
    let (s, _, body) = generate().await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = message(&body);
    assert!(
        msg.contains("HTTP 500")
            && msg.contains(&format!("{}/sdapi/v1/txt2img", sd.url))
            && msg.contains("OutOfMemoryError: CUDA out of memory"),
        "{msg}"
    );
    assert_eq!(generate().await.0, 200, "one failure does not take the backend out");

    // An extension crashing, in A1111's wrapped shape, on every call.
    let sd = FakeA1111::builder()
        .fail_with(500, json!({"error": "RuntimeError", "detail": "", "body": "", "errors": "Expected all tensors to be on the same device"}))
        .start()
        .await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (502, Some("backend_error")), "{body}");
    assert!(message(&body).contains("RuntimeError: Expected all tensors to be on the same device"), "{body}");

    // Forge leaves unhandled exceptions to FastAPI: plain text.
    let forge = FakeA1111::builder().forge().fail_with_text(500, "Internal Server Error").start().await;
    let gw = spawn_gateway(&config(&forge.url, CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!((s, body["error"]["code"].as_str()), (502, Some("backend_error")), "{body}");
    assert!(message(&body).contains("HTTP 500") && message(&body).contains("Internal Server Error"), "{body}");
}

#[tokio::test]
async fn a_webui_without_api_is_named_with_the_fix() {
    // Restarted without --api after easel found it healthy: the generation itself gets the 404.
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    sd.set_api(false);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = message(&body);
    assert!(
        msg.contains("HTTP 404") && msg.contains(&format!("{}/sdapi/v1/txt2img", sd.url)) && msg.contains("--api"),
        "{msg}"
    );

    // Without --api from the start: the probe already knows, so the backend is out of routing.
    let sd = FakeA1111::builder().without_api().start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    let msg = message(&body);
    assert!(msg.contains("HTTP 404") && msg.contains("/sdapi/v1/progress") && msg.contains("--api"), "{msg}");
    assert!(sd.generations().is_empty());
}

#[tokio::test]
async fn slow_generations_time_out() {
    let sd = FakeA1111::builder().latency(Duration::from_secs(20)).start().await;
    let gw = spawn_gateway(&config_with(&sd.url, CHECKPOINT, "1s", "")).await;
    let started = Instant::now();
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");
    assert!(message(&body).contains("did not answer within 1s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10), "the backend's timeout, not the fake's latency");
}

#[tokio::test]
async fn a_client_that_goes_away_interrupts_the_job_and_frees_the_slot() {
    let sd = FakeA1111::builder().latency(Duration::from_secs(60)).start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let (client, endpoint) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
    let request =
        tokio::spawn(async move { client.post(endpoint).json(&json!({"model": "sd15", "prompt": "p"})).send().await });
    sd.generation_started().await;
    request.abort();
    sd.interrupted().await;
    assert_eq!(sd.interrupts(), 1);

    // concurrency.images is 1: the next request only runs if the interrupted call gave its slot back.
    sd.set_latency(Duration::ZERO);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(sd.generations().len(), 2);
}

#[tokio::test]
async fn api_auth_is_http_basic_from_the_key() {
    let sd = FakeA1111::builder().api_auth("easel", "s3cret").start().await;
    let gw = spawn_gateway(&config_with(&sd.url, CHECKPOINT, "10s", "    api_key: easel:s3cret\n")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 200, "{body}");
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("easel:s3cret"));
    assert!(sd.received().iter().all(|r| r.authorization.as_deref() == Some(expected.as_str())), "probes too");

    let gw = spawn_gateway(&config_with(&sd.url, CHECKPOINT, "10s", "    api_key: easel:wrong-pass\n")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": "p"})).await;
    assert_eq!(s, 503, "the probe was refused: {body}");
    let msg = message(&body);
    assert!(msg.contains("HTTP 401") && msg.contains("api_key"), "{msg}");
    assert!(!msg.contains("wrong-pass"), "never the password: {msg}");

    let yaml = config_with(&sd.url, CHECKPOINT, "10s", "    api_key: just-a-token\n");
    let cfg =
        easel::config::from_str(&yaml, "t.yaml", std::path::Path::new("."), &easel::config::MapEnv::default()).unwrap();
    let err = easel::backends::AnyBackend::build(Arc::clone(&cfg.backends[0])).unwrap_err();
    assert!(err.contains("user:pass") && !err.contains("just-a-token"), "{err}");
}

#[tokio::test]
async fn edits_use_img2img_with_a_converted_mask() {
    let sd = support::a1111::start().await;
    let gw = spawn_gateway(&config(&sd.url, CHECKPOINT)).await;
    let mask = {
        let img = image::RgbaImage::from_fn(8, 8, |x, _| image::Rgba([0, 0, 0, if x < 4 { 0 } else { 255 }]));
        let mut b = Vec::new();
        image::DynamicImage::ImageRgba8(img)
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    };
    let png = |bytes: Vec<u8>, name: &str| {
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()).mime_str("image/png").unwrap()
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "sd15")
        .text("prompt", "p")
        .part("image", png(support::a1111::png(9, 8, 8), "i.png"))
        .part("mask", png(mask, "m.png"));
    let resp =
        tokio::time::timeout(TEST_TIMEOUT, gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let call = sd.generations()[0].clone();
    assert_eq!(call.path, "/sdapi/v1/img2img");
    let sent = call.body;
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
