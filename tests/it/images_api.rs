//! `/v1/images/generations` end to end against the simulated backend: the three body encodings mean the same,
//! outputs as URL or base64, and what each bad input gets (status, `code`, `param`, a message naming the cause).

use base64::Engine;
use serde_json::json;

use crate::support::{TEST_TIMEOUT, spawn_gateway};

const SIM: &str = r#"
backends:
  sim:
    kind: simulated
  broken:
    kind: simulated
    failure: {status: 500, message: "CUDA out of memory"}
  hung:
    kind: simulated
    timeout: 300ms
    failure: {mode: timeout}
models:
  - id: sim-model
    backends: [sim]
    default_size: 64x64
    max_n: 4
  - id: fixed-sizes
    backends: [sim]
    sizes: [32x32, 64x32]
  - id: broken-model
    backends: [broken]
  - id: hung-model
    backends: [hung]
server:
  max_body: 4KiB
"#;

fn b64(v: &serde_json::Value) -> Vec<u8> {
    let s = v.as_str().expect("b64_json string");
    base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64")
}

fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, code: &str, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "error.{key} missing: {body}");
    }
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message {msg:?} should mention {needle:?}");
}

#[tokio::test]
async fn json_multipart_and_form_mean_the_same() {
    let gw = spawn_gateway(SIM).await;
    let fields = [
        ("model", "sim-model"),
        ("prompt", "a red apple"),
        ("n", "2"),
        ("size", "48x32"),
        ("seed", "42"),
        ("response_format", "b64_json"),
    ];
    let (s, _, from_json) = gw
        .post_json("/v1/images/generations", json!({"model": "sim-model", "prompt": "a red apple", "n": 2, "size": "48x32", "seed": 42, "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200, "{from_json}");

    let mut form = reqwest::multipart::Form::new();
    for (k, v) in fields {
        form = form.text(k, v);
    }
    let multipart: serde_json::Value = tokio::time::timeout(
        TEST_TIMEOUT,
        gw.client.post(gw.endpoint("/v1/images/generations")).multipart(form).send(),
    )
    .await
    .unwrap()
    .unwrap()
    .json()
    .await
    .unwrap();
    let urlencoded: serde_json::Value =
        tokio::time::timeout(TEST_TIMEOUT, gw.client.post(gw.endpoint("/v1/images/generations")).form(&fields).send())
            .await
            .unwrap()
            .unwrap()
            .json()
            .await
            .unwrap();
    for other in [&multipart, &urlencoded] {
        assert_eq!(other["data"].as_array().map(Vec::len), Some(2), "{other}");
        for i in 0..2 {
            assert_eq!(b64(&from_json["data"][i]["b64_json"]), b64(&other["data"][i]["b64_json"]), "image {i} differs");
        }
        assert_eq!(other["size"], "48x32");
    }
    assert_ne!(b64(&from_json["data"][0]["b64_json"]), b64(&from_json["data"][1]["b64_json"]), "n images differ");
    let img = image::load_from_memory(&b64(&from_json["data"][0]["b64_json"])).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
}

#[tokio::test]
async fn url_outputs_are_served_with_their_content_type() {
    let gw = spawn_gateway(SIM).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"prompt": "a red apple"})).await;
    assert_eq!(s, 200, "{body}");
    assert!(body["created"].as_u64().is_some());
    let url = body["data"][0]["url"].as_str().expect("url by default");
    assert!(url.starts_with(&gw.url), "{url} should be served by the gateway");
    let (s, headers, bytes) = gw.get(url).await;
    assert_eq!(s, 200);
    assert_eq!(headers["content-type"], "image/png");
    assert!(bytes.starts_with(b"\x89PNG"));
    // The first model is the default; its default size applies.
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

#[tokio::test]
async fn output_format_transcodes() {
    let gw = spawn_gateway(SIM).await;
    for (fmt, magic, mime) in [("jpeg", &b"\xFF\xD8\xFF"[..], "image/jpeg"), ("webp", &b"RIFF"[..], "image/webp")] {
        let (s, _, body) = gw
            .post_json("/v1/images/generations", json!({"prompt": "p", "output_format": fmt, "output_compression": 70}))
            .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["output_format"], fmt);
        let (_, headers, bytes) = gw.get(body["data"][0]["url"].as_str().unwrap()).await;
        assert!(bytes.starts_with(magic), "{fmt}");
        assert_eq!(headers["content-type"], mime);
    }
}

#[tokio::test]
async fn bad_inputs_get_clear_errors() {
    let gw = spawn_gateway(SIM).await;
    let cases = [
        (json!({"prompt": "p", "colour": "red"}), 400, "unknown_parameter", "colour", Some("colour")),
        (
            json!({"model": "sim-modle", "prompt": "p"}),
            404,
            "model_not_found",
            "did you mean `sim-model`",
            Some("model"),
        ),
        (
            json!({"model": "nope", "prompt": "p"}),
            404,
            "model_not_found",
            "Available models: sim-model, fixed-sizes",
            Some("model"),
        ),
        (json!({"model": "sim-model"}), 400, "invalid_request_error", "`prompt` is required", Some("prompt")),
        (json!({"prompt": "  "}), 400, "invalid_request_error", "must not be empty", Some("prompt")),
        (json!({"prompt": "p", "n": 5}), 400, "invalid_request_error", "at most 4", Some("n")),
        (json!({"prompt": "p", "n": "two"}), 400, "invalid_request_error", "invalid `n`", Some("n")),
        (json!({"prompt": "p", "size": "huge"}), 400, "invalid_request_error", "WIDTHxHEIGHT", Some("size")),
        (
            json!({"model": "fixed-sizes", "prompt": "p", "size": "64x64"}),
            400,
            "invalid_request_error",
            "32x32, 64x32",
            Some("size"),
        ),
        (json!({"prompt": "p", "size": "9000x9000"}), 400, "invalid_request_error", "larger than", Some("size")),
        (
            json!({"prompt": "p", "response_format": "png"}),
            400,
            "invalid_request_error",
            "`url` or `b64_json`",
            Some("response_format"),
        ),
        (
            json!({"prompt": "p", "output_format": "gif"}),
            400,
            "invalid_request_error",
            "png, jpeg or webp",
            Some("output_format"),
        ),
        (
            json!({"prompt": "p", "output_format": "jpeg", "background": "transparent"}),
            400,
            "invalid_request_error",
            "transparent",
            Some("background"),
        ),
        (
            json!({"prompt": "p", "stream": true, "partial_images": 4}),
            400,
            "invalid_request_error",
            "partial_images",
            Some("partial_images"),
        ),
        (json!({"prompt": "p", "extra": "x"}), 400, "invalid_request_error", "invalid `extra`", Some("extra")),
    ];
    for (body, status, code, needle, param) in cases {
        let (s, _, resp) = gw.post_json("/v1/images/generations", body.clone()).await;
        assert_error(s, &resp, status, code, needle);
        assert_eq!(resp["error"]["param"].as_str(), param, "param for {body}");
    }
}

#[tokio::test]
async fn malformed_oversized_and_mistyped_bodies() {
    let gw = spawn_gateway(SIM).await;
    let send = |body: reqwest::Body, ct: &'static str| {
        let req = gw.client.post(gw.endpoint("/v1/images/generations")).header("content-type", ct).body(body);
        async move {
            let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (s, body) = send("{\"prompt\": \"p\",}".into(), "application/json").await;
    assert_error(s, &body, 400, "invalid_request_error", "line 1 column 16");
    let (s, body) = send("".into(), "application/json").await;
    assert_error(s, &body, 400, "invalid_request_error", "empty");
    let (s, body) = send(format!("{{\"prompt\": \"{}\"}}", "x".repeat(8000)).into(), "application/json").await;
    assert_error(s, &body, 413, "request_too_large", "4096-byte limit");
    let (s, body) = send("prompt".into(), "text/plain").await;
    assert_error(s, &body, 415, "unsupported_media_type", "text/plain");
    let (s, body) = send("prompt=p&prompt=q".into(), "application/x-www-form-urlencoded").await;
    assert_error(s, &body, 400, "invalid_request_error", "more than once");
}

#[tokio::test]
async fn backend_failures_are_named() {
    let gw = spawn_gateway(SIM).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "broken-model", "prompt": "p"})).await;
    assert_error(s, &body, 502, "backend_error", "CUDA out of memory");
    assert!(body["error"]["message"].as_str().unwrap().contains("`broken`"), "{body}");
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "hung-model", "prompt": "p"})).await;
    assert_error(s, &body, 504, "backend_timeout", "did not answer within 300ms");
}

#[tokio::test]
async fn files_only_serves_issued_ids_and_routes_are_shaped() {
    let gw = spawn_gateway(SIM).await;
    std::fs::create_dir_all(gw.dir.path().join("files")).unwrap();
    std::fs::write(gw.dir.path().join("files").join("secret.png"), b"\x89PNG secret").unwrap();
    for path in
        ["/v1/files/secret.png", "/v1/files/img_00000000000000000000000000000000.png", "/v1/files/..%2Fsecret.png"]
    {
        let (s, _, body) = gw.get(path).await;
        assert_eq!(s, 404, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"]["code"] == "file_not_found" || v["error"]["code"] == "not_found", "{v}");
    }
    let (s, _, body) = gw.get("/v1/nothing").await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_error(s, &v, 404, "unsupported_endpoint", "easel does not serve GET /v1/nothing");
    let (s, _, body) = gw.get("/nothing").await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_error(s, &v, 404, "not_found", "the API lives under /v1");
    let (s, _, body) = gw.get("/v1/images/generations").await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_error(s, &v, 405, "method_not_allowed", "GET");
}

#[tokio::test]
async fn models_health_and_readiness() {
    let gw = spawn_gateway(SIM).await;
    let (s, _, body) = gw.get("/v1/models").await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sim-model", "fixed-sizes", "broken-model", "hung-model"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "easel");
    assert_eq!(v["data"][0]["meta"]["type"], "image");
    assert_eq!(v["data"][0]["meta"]["simulated"], true);
    assert_eq!(v["data"][0]["meta"]["status"], "ready");
    let (s, _, body) = gw.get("/v1/models/fixed-sizes").await;
    assert_eq!(s, 200);
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["meta"]["sizes"], json!(["32x32", "64x32"]));
    let (s, _, _) = gw.get("/v1/models/fixed-size").await;
    assert_eq!(s, 404);

    let (s, _, body) = gw.get("/healthz").await;
    assert_eq!((s, &body[..]), (200, &b"ok"[..]));
    let (s, _, body) = gw.get("/readyz").await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let (s, _, body) = gw.get("/health").await;
    assert_eq!(s, 200);
    let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["backends"]["sim"]["healthy"], true);
    assert_eq!(h["backends"]["sim"]["kind"], "simulated");
    assert!(h["backends"]["sim"]["last_check"].is_string());
    assert!(h["version"].is_string());
}

#[tokio::test]
async fn aliases_name_a_model_everywhere_and_near_miss_fields_get_the_right_name() {
    let yaml = "auth: {mode: keys}\nbackends:\n  sim: {kind: simulated}\nmodels:\n  - {id: house, aliases: [gpt-image-1, dall-e-3], backends: [sim], default_size: 16x16}\n  - {id: other, backends: [sim], default_size: 16x16}\n";
    let gw = crate::support::spawn_gateway_env(yaml, &[("EASEL_ADMIN_TOKEN", crate::support::books::ADMIN)]).await;
    // A key limited to `house` may use it by an alias.
    let secret = crate::support::books::key_at_for(&gw.url, 5.0, Some(&["house"])).await;
    let post = |body: serde_json::Value| {
        gw.client.post(gw.endpoint("/v1/images/generations")).bearer_auth(&secret).json(&body).send()
    };
    let resp = post(json!({"model": "gpt-image-1", "prompt": "p"})).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let resp = post(json!({"model": "other", "prompt": "p"})).await.unwrap();
    assert_eq!(resp.status(), 403, "the alias grants nothing beyond its model");
    let models: serde_json::Value =
        gw.client.get(gw.endpoint("/v1/models")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["meta"]["aliases"], json!(["gpt-image-1", "dall-e-3"]), "{models}");
    let one = gw.client.get(gw.endpoint("/v1/models/dall-e-3")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(one.json::<serde_json::Value>().await.unwrap()["id"], "house");

    for (field, hint) in
        [("num_images", "`n`"), ("image_size", "`size`"), ("cfg_scale", "`guidance_scale`"), ("model_id", "`model`")]
    {
        let resp = post(json!({"model": "house", "prompt": "p", field: 2})).await.unwrap();
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_error(status, &v, 400, "unknown_parameter", &format!("this API calls it {hint}"));
        assert_eq!(v["error"]["param"], field);
    }
    // Aliases are unique across ids and aliases, checked at load.
    let clash = "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: a, aliases: [b], backends: [sim]}\n  - {id: b, backends: [sim]}\n  - {id: c, aliases: [c], backends: [sim]}\n";
    let e = easel::config::from_str(clash, "t.yaml", std::path::Path::new("."), &easel::config::MapEnv::new([]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("models[0].aliases[0]: `b` already names models[1]"), "{e}");
    assert!(e.contains("models[2].aliases[0]: `c` is the model's own id"), "{e}");
}
