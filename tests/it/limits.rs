//! Limits that protect the gateway itself: decompression bombs (client inputs, masks and upstream outputs) are
//! refused from their header without stalling other requests; refused uploads are read to the end so the client
//! sees the real answer; and framework rejections (odd paths) leave in OpenAI's error shape.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::a1111::CHECKPOINT;
use crate::support::shim::{self, bomb_png};
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway};

const SIM: &str = "backends:\n  sim:\n    kind: simulated\n    concurrency: {images: 8}\nmodels:\n  - id: sim\n    backends: [sim]\n    default_size: 64x64\n";

fn part(bytes: Vec<u8>, name: &str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()).mime_str("image/png").unwrap()
}

fn small_png() -> Vec<u8> {
    shim::small_png()
}

async fn edit(gw: &Gateway, model: &str, image: Vec<u8>, mask: Option<Vec<u8>>) -> (u16, Value) {
    let mut form = reqwest::multipart::Form::new()
        .text("model", model.to_owned())
        .text("prompt", "p")
        .text("output_format", "jpeg")
        .part("image", part(image, "i.png"));
    if let Some(m) = mask {
        form = form.part("mask", part(m, "m.png"));
    }
    let resp =
        tokio::time::timeout(TEST_TIMEOUT, gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send())
            .await
            .unwrap()
            .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn an_edit_input_that_declares_a_huge_size_is_refused_and_healthz_keeps_answering() {
    let gw = spawn_gateway(SIM).await;
    let bomb = bomb_png(20_000, 20_000);
    assert!(bomb.len() < 4 << 20, "a few MB on the wire");
    let (a, b, healthz) =
        tokio::join!(edit(&gw, "sim", bomb.clone(), None), edit(&gw, "sim", bomb.clone(), None), async {
            tokio::time::timeout(Duration::from_secs(5), gw.client.get(gw.endpoint("/healthz")).send()).await
        },);
    let healthz = healthz.expect("/healthz answered while bombs were in flight").unwrap();
    assert_eq!(healthz.status(), 200);
    for (status, body) in [a, b] {
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "image_too_large", "{body}");
        assert_eq!(body["error"]["param"], "image", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("max_image_pixels") && message.contains("20000x20000"), "{body}");
    }
    // An ordinary edit still works.
    let (status, body) = edit(&gw, "sim", small_png(), None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_a1111_mask_that_declares_a_huge_size_is_refused() {
    let sd = crate::support::a1111::start().await;
    let yaml = format!(
        "backends:\n  sd:\n    kind: a1111\n    url: {}\nmodels:\n  - id: sd15\n    backends: [sd]\n    upstream_model: \"{CHECKPOINT}\"\n    default_size: 64x64\n",
        sd.url
    );
    let gw = spawn_gateway(&yaml).await;
    let (status, body) = edit(&gw, "sd15", small_png(), Some(bomb_png(20_000, 20_000))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "image_too_large", "{body}");
    assert_eq!(body["error"]["param"], "mask", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_image_pixels"), "{body}");
}

#[tokio::test]
async fn an_upstream_output_that_declares_a_huge_size_is_not_transcoded() {
    let s = shim::start().await;
    s.state.bomb.store(true, std::sync::atomic::Ordering::Relaxed);
    let yaml = format!(
        "backends:\n  shim:\n    kind: openai\n    url: {}\n    health: {{path: /healthz, expect_status: 200}}\nmodels:\n  - id: img\n    backends: [shim]\n",
        s.url
    );
    let gw = spawn_gateway(&yaml).await;
    let (status, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "img", "prompt": "p", "output_format": "jpeg"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_image_pixels"), "{body}");
}

/// Sends `head` and then `body` on one connection, and reads the whole answer: (status, JSON body).
async fn raw_exchange(gw: &Gateway, head: &str, body: &[u8], chunked: bool) -> (u16, Value) {
    let addr = gw.url.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = conn.split();
    let send = async {
        wr.write_all(head.as_bytes()).await?;
        if chunked {
            for piece in body.chunks(64 << 10) {
                wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
                wr.write_all(piece).await?;
                wr.write_all(b"\r\n").await?;
            }
            wr.write_all(b"0\r\n\r\n").await?;
        } else {
            wr.write_all(body).await?;
        }
        wr.flush().await
    };
    let mut answer = Vec::new();
    let (sent, read) = tokio::time::timeout(TEST_TIMEOUT, async {
        // Written before the answer is read, as an upload client does.
        let sent = send.await;
        (sent, rd.read_to_end(&mut answer).await)
    })
    .await
    .expect("the exchange timed out");
    sent.expect("the whole body could be written");
    read.expect("the answer could be read");
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn request_head(path: &str, auth: &str, length: Option<usize>) -> String {
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_owned(),
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: easel\r\nContent-Type: application/json\r\n{auth}{framing}\r\nConnection: close\r\n\r\n"
    )
}

const UPLOAD: usize = 24 << 20;

#[tokio::test]
async fn a_refused_upload_is_read_to_the_end_before_the_answer() {
    let gw = spawn_gateway(&format!("server:\n  max_body: 1MiB\n{SIM}")).await;
    let body = vec![b' '; UPLOAD];
    let route = "/v1/images/generations";
    let (status, json) = raw_exchange(&gw, &request_head(route, "", Some(UPLOAD)), &body, false).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "request_too_large", "{json}");
    let (status, json) = raw_exchange(&gw, &request_head(route, "", None), &body, true).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "request_too_large", "{json}");
    let (status, json) = raw_exchange(&gw, &request_head("/v1/no/such/route", "", Some(UPLOAD)), &body, false).await;
    assert_eq!(status, 404, "{json}");
    assert_eq!(json["error"]["code"], "unsupported_endpoint", "{json}");
}

#[tokio::test]
async fn an_upload_with_a_bad_key_is_read_to_the_end_before_the_401() {
    let gw = spawn_gateway(&format!("auth: {{mode: keys}}\n{SIM}")).await;
    let body = vec![b' '; UPLOAD];
    let head = request_head("/v1/images/generations", "Authorization: Bearer sk-wrong\r\n", Some(UPLOAD));
    let (status, json) = raw_exchange(&gw, &head, &body, false).await;
    assert_eq!(status, 401, "{json}");
    assert_eq!(json["error"]["code"], "invalid_api_key", "{json}");
    let head = request_head("/v1/images/generations", "Authorization: Bearer sk-wrong\r\n", None);
    let (status, json) = raw_exchange(&gw, &head, &body, true).await;
    assert_eq!(status, 401, "{json}");
}

#[tokio::test]
async fn odd_paths_get_openai_shaped_errors() {
    let gw = spawn_gateway(SIM).await;
    for path in ["/v1/files/%00", "/v1/files/%FF%FE", "/v1/models/%00", "/%00"] {
        let resp = tokio::time::timeout(TEST_TIMEOUT, gw.client.get(gw.endpoint(path)).send()).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{path}: {status}");
        let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{path}: {status} not JSON ({ct:?}): {e}"));
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {body}");
        assert!(body["error"]["type"].is_string() && body["error"]["code"].is_string(), "{path}: {body}");
    }
    let resp = gw.client.delete(gw.endpoint("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}
