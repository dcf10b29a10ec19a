//! Looking like OpenAI to existing apps: `/v1/images/variations` (an edit with the model's `variation_prompt`),
//! gpt-image response fields (`quality`, `background`, `usage` only when reported), `background: transparent`
//! honoured or refused, and aliases kept in the `model` of job and video objects.

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{self, Gateway, TEST_TIMEOUT, spawn_gateway};

const CONFIG: &str = r#"
backends:
  sim:
    kind: simulated
  hf:
    kind: huggingface
    url: http://127.0.0.1:9
models:
  - id: sim
    aliases: [dall-e-2]
    backends: [sim]
    variation_prompt: the same scene, another take
  - id: plain
    backends: [sim]
  - id: no-edits
    backends: [hf]
  - id: clip
    type: video
    aliases: [sora-2]
    backends: [sim]
    default_size: 32x32
"#;

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x * 7) as u8, (y * 5) as u8, 90, 255]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn image_part() -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(png(24, 16)).file_name("in.png").mime_str("image/png").unwrap()
}

async fn multipart(gw: &Gateway, path: &str, form: reqwest::multipart::Form) -> (u16, Value) {
    let req = gw.client.post(gw.endpoint(path)).multipart(form);
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn decode(v: &Value) -> image::RgbaImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgba8()
}

#[tokio::test]
async fn a_variation_is_an_edit_with_the_models_variation_prompt() {
    let gw = spawn_gateway(CONFIG).await;
    let form = reqwest::multipart::Form::new()
        .part("image", image_part())
        .text("model", "dall-e-2")
        .text("n", "2")
        .text("size", "32x32")
        .text("response_format", "b64_json")
        .text("user", "u-1")
        .text("seed", "5");
    let (s, body) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["size"], "32x32");
    let variation = decode(&body["data"][0]["b64_json"]);
    assert_eq!(variation.dimensions(), (32, 32));

    // The same edit with the configured prompt makes the same picture; another prompt does not.
    let edit = |prompt: &str| {
        reqwest::multipart::Form::new()
            .part("image", image_part())
            .text("model", "sim")
            .text("prompt", prompt.to_owned())
            .text("size", "32x32")
            .text("response_format", "b64_json")
            .text("seed", "5")
    };
    let (s, same) = multipart(&gw, "/v1/images/edits", edit("the same scene, another take")).await;
    assert_eq!(s, 200, "{same}");
    assert_eq!(decode(&same["data"][0]["b64_json"]), variation);
    let (_, other) = multipart(&gw, "/v1/images/edits", edit("something else")).await;
    assert_ne!(decode(&other["data"][0]["b64_json"]), variation);

    // A model without `variation_prompt` uses the documented neutral default.
    let form = reqwest::multipart::Form::new()
        .part("image", image_part())
        .text("model", "plain")
        .text("response_format", "b64_json")
        .text("seed", "1");
    let (s, plain) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!(s, 200, "{plain}");
    let (_, default) = multipart(
        &gw,
        "/v1/images/edits",
        reqwest::multipart::Form::new()
            .part("image", image_part())
            .text("model", "plain")
            .text("prompt", "a variation of this image")
            .text("response_format", "b64_json")
            .text("seed", "1"),
    )
    .await;
    assert_eq!(decode(&plain["data"][0]["b64_json"]), decode(&default["data"][0]["b64_json"]));
}

#[tokio::test]
async fn variations_refuse_what_openai_refuses_and_models_that_cannot_edit() {
    let gw = spawn_gateway(CONFIG).await;
    let form = reqwest::multipart::Form::new().part("image", image_part()).text("model", "no-edits");
    let (s, body) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`no-edits`") && message.contains("variations"), "{message}");

    let form = reqwest::multipart::Form::new().part("image", image_part()).text("prompt", "a cat");
    let (s, body) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!((s, body["error"]["param"].as_str()), (400, Some("prompt")), "{body}");

    let form = reqwest::multipart::Form::new().part("image", image_part()).part("image", image_part());
    let (s, body) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!((s, body["error"]["param"].as_str()), (400, Some("image")), "{body}");

    let form = reqwest::multipart::Form::new().text("model", "sim");
    let (s, body) = multipart(&gw, "/v1/images/variations", form).await;
    assert_eq!((s, body["error"]["param"].as_str()), (400, Some("image")), "{body}");

    // The route is served (not `unsupported_endpoint`), and the 404 of unknown routes names it.
    let (s, _, body) = gw.post_json("/v1/audio/speech", json!({})).await;
    assert_eq!(s, 404);
    assert!(body["error"]["message"].as_str().unwrap().contains("/v1/images/variations"), "{body}");
}

#[tokio::test]
async fn transparent_backgrounds_are_painted_or_refused_and_fields_say_what_was_made() {
    let gw = spawn_gateway(CONFIG).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sim", "prompt": "discs", "size": "48x48", "background": "transparent", "response_format": "b64_json", "quality": "high"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["background"], "transparent");
    assert_eq!(body["quality"], "high");
    assert_eq!(body["output_format"], "png");
    assert_eq!(body["size"], "48x48");
    assert!(body.get("usage").is_none(), "the simulated backend reports no tokens: {body}");
    let img = decode(&body["data"][0]["b64_json"]);
    assert!(img.pixels().any(|p| p.0[3] == 0), "some pixels are transparent");
    assert!(img.pixels().any(|p| p.0[3] == 255), "the subject is opaque");

    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "sim", "prompt": "discs", "size": "48x48", "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!((body["background"].as_str(), body["quality"].as_str()), (Some("opaque"), Some("auto")));
    assert!(decode(&body["data"][0]["b64_json"]).pixels().all(|p| p.0[3] == 255));

    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "no-edits", "prompt": "x", "background": "transparent"}))
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    assert_eq!(body["error"]["param"], "background");
    assert!(body["error"]["message"].as_str().unwrap().contains("`no-edits`"), "{body}");
}

#[tokio::test]
async fn gpt_image_fields_and_usage_come_from_the_upstream_only() {
    let up = support::openai::start().await;
    let config = format!(
        "backends:\n  oa:\n    kind: openai\n    url: {}/v1\n    api_key: {}\n    timeout: 2s\nmodels:\n  - id: gi\n    aliases: [gpt-image-1]\n    backends: [oa]\n    upstream_model: gpt-image-1\n  - id: sd\n    backends: [oa]\n    upstream_model: sd-turbo\n",
        up.url,
        support::openai::KEY
    );
    let gw = spawn_gateway(&config).await;
    let (s, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "gpt-image-1", "prompt": "a cat", "n": 2})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["quality"], "medium");
    assert_eq!(body["background"], "opaque");
    assert_eq!(body["usage"], json!({"input_tokens": 10, "output_tokens": 200, "total_tokens": 210}));
    assert_eq!(up.state.bodies.lock().unwrap()[0]["model"], "gpt-image-1");

    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "sd", "prompt": "a cat"})).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.get("usage").is_none(), "no usage invented: {body}");
    assert_eq!(body["quality"], "auto");
}

#[tokio::test]
async fn jobs_and_videos_keep_the_alias_the_client_sent() {
    let gw = spawn_gateway(CONFIG).await;
    let (s, _, video) = gw.post_json("/v1/videos", json!({"model": "sora-2", "prompt": "waves", "seconds": "1"})).await;
    assert!(s == 200 || s == 202, "{s} {video}");
    assert_eq!(video["model"], "sora-2");
    let (s, _, bytes) = gw.get(&format!("/v1/videos/{}", video["id"].as_str().unwrap())).await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap()["model"], "sora-2");

    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("Prefer", "respond-async")
        .json(&json!({"model": "dall-e-2", "prompt": "a job"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["model"], "dall-e-2");

    // Without a model, the default model's own id.
    let (_, _, video) = gw.post_json("/v1/videos", json!({"prompt": "waves", "seconds": "1"})).await;
    assert_eq!(video["model"], "clip");
}

#[tokio::test]
async fn max_images_per_call_is_set_per_model_and_per_backend_entry() {
    let up = support::openai::start().await;
    let config = format!(
        "backends:\n  oa:\n    kind: openai\n    url: {}/v1\n    api_key: {}\n    timeout: 2s\nmodels:\n  - id: d3\n    backends: [{{name: oa, max_images_per_call: 1}}]\n    upstream_model: dall-e-3\n  - id: two\n    max_images_per_call: 2\n    backends: [oa]\n    upstream_model: sd-turbo\n  - id: free\n    backends: [oa]\n    upstream_model: sd-turbo\n",
        up.url,
        support::openai::KEY
    );
    let gw = spawn_gateway(&config).await;
    let calls = || up.state.calls.load(std::sync::atomic::Ordering::SeqCst);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "d3", "prompt": "p", "n": 3})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!((body["data"].as_array().unwrap().len(), calls()), (3, 3), "one image per call for dall-e-3");
    let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "two", "prompt": "p", "n": 3})).await;
    assert_eq!((s, calls()), (200, 5), "the model's 2 per call: 2 + 1");
    let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "free", "prompt": "p", "n": 3})).await;
    assert_eq!((s, calls()), (200, 6), "the backend's own 10 per call");
}
