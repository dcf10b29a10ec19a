//! Compatibility modes and legacy routes through the real binary: seed 003's environment (`TEXT2IMAGE_SERVER_URL`
//! …) serves its frontend's `POST /generate` unchanged in front of a fake of its server; seed 004's
//! (`IMAGES_BACKEND=http_openai_images` …, `GATEWAY_BEARER_TOKEN`) serves OpenAI images behind one static token;
//! `routes:` in a file maps a nested legacy body and answers raw image bytes; bad routes are refused at load.

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{shim, spawn_gateway, start_binary, template_server};

const BIN: &str = env!("CARGO_BIN_EXE_easel");

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_003_environment_serves_its_generate_contract_unchanged() {
    let up = template_server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("TEXT2IMAGE_SERVER_URL", up.url.as_str()), ("REQUEST_TIMEOUT", "30"), ("MAX_CONCURRENT_REQUESTS", "3")];
    let (child, url) = start_binary(dir.path(), &env);
    let _child = Killed(child);
    let client = reqwest::Client::new();
    // The frontend's own request, byte for byte.
    let resp = client
        .post(format!("{url}/generate"))
        .header("content-type", "application/json")
        .body(r#"{"prompt": "A beautiful landscape", "height": 48, "width": 64}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let b64 = body["images"][0].as_str().unwrap_or_else(|| panic!("{body}"));
    let img = image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (64, 48));
    let sent: Value = serde_json::from_str(&up.received_at("/generate")[0].body).unwrap();
    assert_eq!(sent, json!({"prompt": "A beautiful landscape", "width": 64, "height": 48}));
    // Bad input gets OpenAI's 400 naming the field; the upstream is not called.
    let resp = client.post(format!("{url}/generate")).json(&json!({"height": 48, "width": 64})).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "prompt", "{err}");
    assert_eq!(up.received_at("/generate").len(), 1);
    // The OpenAI API serves the same backend; the limits came from the environment.
    let resp = client
        .post(format!("{url}/v1/images/generations"))
        .json(&json!({"prompt": "p", "size": "16x16"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let out = tokio::process::Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .envs(env)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("seed-003 environment"), "{text}");
    assert!(text.contains("timeout: 30s") && text.contains("concurrency: {images: 3}"), "{text}");
    assert!(text.contains("POST /generate -> text2image"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_environment_is_an_openai_images_gateway_behind_one_token() {
    let up = shim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "a-long-static-gateway-token";
    let env = [
        ("IMAGES_BACKEND", "http_openai_images"),
        ("IMAGES_BACKEND_CLASS", "gpu_heavy"),
        ("IMAGES_HTTP_BASE_URL", up.url.as_str()),
        ("GATEWAY_BEARER_TOKEN", token),
    ];
    let (child, url) = start_binary(dir.path(), &env);
    let _child = Killed(child);
    let client = reqwest::Client::new();
    let body = json!({"prompt": "a red apple on a table", "size": "1024x1024", "n": 1});
    let resp = client.post(format!("{url}/v1/images/generations")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401, "no token");
    let resp = client
        .post(format!("{url}/v1/images/generations"))
        .bearer_auth("wrong-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a wrong token");
    let resp = client.post(format!("{url}/v1/images/generations")).bearer_auth(token).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["data"][0]["url"].is_string(), "{v}");
    // The status page takes the same token (seed 004's curl), and shows the backend by its class name.
    let resp = client.get(format!("{url}/v1/gateway/status")).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let status = resp.text().await.unwrap();
    assert!(status.contains("gpu_heavy"), "{status}");
    // Readiness is the shim's /readyz.
    assert!(up.state.readyz_hits.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let (code, out) = {
        let o = tokio::process::Command::new(BIN)
            .args(["verify", "--base-url", &url, "--token", token, "--check-images"])
            .output()
            .await
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(code, Some(0), "{out}");

    // A mistake in the environment is named, and nothing starts.
    let out = tokio::process::Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .env("IMAGES_BACKEND", "local_mlx")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IMAGES_BACKEND") && err.contains("http_openai_images"), "{err}");
}

#[tokio::test]
async fn a_configured_route_maps_a_nested_body_and_answers_image_bytes() {
    let yaml = "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: pic, backends: [sim], default_size: 32x32}\nroutes:\n  - path: /api/render\n    model: pic\n    request: {prompt: $.input.text, width: $.input.w, height: $.input.h}\n    response: image\n  - path: /api/json\n    model: pic\n    response: '{\"ok\": true, \"pics\": {{ data_urls | tojson }}, \"size\": {{ size | tojson }}}'\n";
    let gw = spawn_gateway(yaml).await;
    let resp = gw
        .client
        .post(gw.endpoint("/api/render"))
        .json(&json!({"input": {"text": "a kite", "w": 40, "h": 20}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let img = image::load_from_memory(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (40, 20));
    let (s, _, body) = gw.post_json("/api/json", json!({"prompt": "x", "n": 2})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["ok"], true);
    assert_eq!(body["size"], "32x32");
    assert_eq!(body["pics"].as_array().unwrap().len(), 2);
    assert!(body["pics"][0].as_str().unwrap().starts_with("data:image/png;base64,"), "{body}");
    // Not JSON: OpenAI's 400.
    let resp = gw
        .client
        .post(gw.endpoint("/api/json"))
        .header("content-type", "application/json")
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[test]
fn bad_routes_are_refused_at_load_all_at_once() {
    let yaml = "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: pic, backends: [sim]}\n  - {id: chat, type: text, backends: [sim]}\nroutes:\n  - {path: /v1/images/generations, model: pic}\n  - {path: /x, model: nope}\n  - {path: /y, model: pic, request: {colour: $.c, prompt: '$.[bad'}}\n  - {path: /z, model: pic, response: '{\"a\": {{ imagez }}}'}\n";
    let e = easel::config::from_str(yaml, "t.yaml", std::path::Path::new("."), &easel::config::MapEnv::new([]))
        .unwrap_err()
        .to_string();
    for needle in [
        "routes[0].path",
        "easel's own routes",
        "routes[1].model",
        "no model `nope`",
        "routes[2].request.colour",
        "routes[2].request.prompt",
        "routes[3].response",
    ] {
        assert!(e.contains(needle), "{needle} missing in:\n{e}");
    }
}
