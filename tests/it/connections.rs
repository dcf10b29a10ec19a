//! The connection loop: plain TCP serves HTTP/1.1 and HTTP/2 (prior knowledge) on one port, a request whose first
//! bytes arrive alone is still answered, and body limits follow the route group (image and text routes take
//! `server.max_body`, every other route 2 MiB), for JSON and multipart alike.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::shim;
use crate::support::{TEST_TIMEOUT, spawn_gateway};

const SIM: &str = "backends:\n  sim:\n    kind: simulated\n    concurrency: {images: 4}\nmodels:\n  - id: sim\n    backends: [sim]\n    default_size: 64x64\n";

#[tokio::test]
async fn plain_tcp_serves_http1_and_http2_prior_knowledge_on_one_port() {
    let gw = spawn_gateway(SIM).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for (client, want) in [(&gw.client, reqwest::Version::HTTP_11), (&h2, reqwest::Version::HTTP_2)] {
        let body = json!({"model": "sim", "prompt": "a lighthouse", "response_format": "b64_json"});
        let resp =
            tokio::time::timeout(TEST_TIMEOUT, client.post(gw.endpoint("/v1/images/generations")).json(&body).send())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(resp.version(), want);
        assert_eq!(resp.status(), 200);
        let json: Value = resp.json().await.unwrap();
        assert!(json["data"][0]["b64_json"].as_str().is_some_and(|b| !b.is_empty()), "{json}");
    }
}

/// A request written in two pieces, the first shorter than HTTP/2's `PRI ` (so it could begin either protocol).
async fn split_request(addr: &str, first: &[u8], rest: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TEST_TIMEOUT, async {
        conn.write_all(first).await.unwrap();
        conn.flush().await.unwrap();
        conn.write_all(rest).await.unwrap();
        conn.read_to_end(&mut answer).await.unwrap();
    })
    .await
    .expect("the exchange timed out");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_whose_first_bytes_arrive_alone_is_answered() {
    let gw = spawn_gateway(SIM).await;
    let addr = gw.url.trim_start_matches("http://");
    let rest = b"ET /v1/models HTTP/1.1\r\nHost: easel\r\nConnection: close\r\n\r\n";
    let answer = split_request(addr, b"G", rest).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"id\":\"sim\""), "{answer}");
    // `P` could be POST or the HTTP/2 preface: the server has to read on to tell.
    let body = r#"{"model":"sim","prompt":"p","response_format":"b64_json"}"#;
    let rest = format!(
        "OST /v1/images/generations HTTP/1.1\r\nHost: easel\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = split_request(addr, b"P", rest.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"b64_json\""), "{}", &answer[..answer.len().min(400)]);
}

#[tokio::test]
async fn image_routes_take_bodies_up_to_max_body_and_other_routes_up_to_2_mib() {
    let gw = spawn_gateway(&format!("server:\n  max_body: 8MiB\n{SIM}")).await;
    let big = 3 << 20;
    // JSON: 3 MiB of whitespace around a valid request is read and answered.
    let mut body = vec![b' '; big];
    body.extend_from_slice(br#"{"model":"sim","prompt":"p","response_format":"b64_json"}"#);
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // Multipart: an edit whose form carries a 3 MiB field is read to its end (then refused for what it says).
    let form =
        reqwest::multipart::Form::new().text("model", "sim").text("prompt", "p").text("padding", " ".repeat(big)).part(
            "image",
            reqwest::multipart::Part::bytes(shim::small_png()).file_name("i.png").mime_str("image/png").unwrap(),
        );
    let resp = gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form).send().await.unwrap();
    let status = resp.status().as_u16();
    let json: Value = resp.json().await.unwrap();
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["param"], "padding", "{json}");
    // Over max_body on an image route: 413 in OpenAI's shape.
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("content-type", "application/json")
        .body(vec![b' '; 9 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "request_too_large", "{json}");
    // Another route with a body (a backend's webhook) keeps the small limit: 3 MiB is refused with 413.
    let resp = gw.client.post(gw.endpoint("/v1/hooks/sim/job-1")).body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let json: Value = resp.json().await.unwrap();
    assert_eq!(status, 413, "{json}");
    assert!(json["error"]["message"].is_string(), "{json}");
}
