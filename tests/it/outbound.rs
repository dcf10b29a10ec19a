//! The outbound policy for output URLs an upstream returns: only the backend's origin (or `allow_output_hosts`),
//! never link-local addresses or other schemes, redirects re-checked, the backend's secrets only to its origin,
//! and nothing of a fetched body echoed to the client.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::support::{self, openai::FakeOpenAi, spawn_gateway};

/// Another loopback server, standing in for any host that is not the backend: it records every hit and its headers.
#[derive(Default)]
struct Recorder {
    hits: AtomicU32,
    headers: Mutex<Vec<axum::http::HeaderMap>>,
}

async fn recorder() -> (String, u16, Arc<Recorder>) {
    let state = Arc::new(Recorder::default());
    let app = axum::Router::new().fallback(record).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), port, state)
}

async fn record(State(s): State<Arc<Recorder>>, req: Request) -> axum::response::Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.headers.lock().unwrap().push(req.headers().clone());
    if req.uri().path() == "/img.png" {
        return ([("content-type", "image/png")], support::openai::png(7)).into_response();
    }
    ([("content-type", "text/plain")], "SECRET-RECORDER-BODY").into_response()
}

fn config(up: &str, extra: &str) -> String {
    format!(
        "backends:\n  oa:\n    kind: openai\n    url: {up}/v1\n    api_key: {}\n    timeout: 5s\n    headers: {{X-Team: team-secret}}\n{extra}models:\n  - id: m\n    backends: [oa]\n",
        support::openai::KEY
    )
}

async fn generate_with_urls(up: &FakeOpenAi, gw: &support::Gateway, urls: &[String]) -> (u16, Value) {
    *up.state.answer_urls.lock().unwrap() = Some(urls.to_vec());
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    (s, body)
}

fn assert_backend_error(s: u16, body: &Value) -> String {
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_output_on_another_host_is_refused_and_never_fetched() {
    let up = support::openai::start().await;
    let (other, port, rec) = recorder().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    let (s, body) = generate_with_urls(&up, &gw, &[format!("{other}/img.png")]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("allow_output_hosts"), "{message}");
    assert!(!message.contains("SECRET-RECORDER-BODY"), "{message}");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0, "the other host is never contacted");
}

#[tokio::test]
async fn easels_own_admin_api_is_refused() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    let (s, body) = generate_with_urls(&up, &gw, &[gw.endpoint("/v1/admin/ledger/check")]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains("allow_output_hosts"), "{message}");
}

#[tokio::test]
async fn the_metadata_address_is_refused_before_connecting() {
    let up = support::openai::start().await;
    // Link-local stays refused even when listed.
    let gw = spawn_gateway(&config(&up.url, "    allow_output_hosts: [\"169.254.169.254\"]\n")).await;
    let started = std::time::Instant::now();
    let (s, body) = generate_with_urls(&up, &gw, &["http://169.254.169.254/latest/meta-data/".into()]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains("169.254.169.254") && message.contains("link-local"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "no connection was attempted");
}

#[tokio::test]
async fn a_redirect_to_another_host_is_refused() {
    let up = support::openai::start().await;
    let (other, port, rec) = recorder().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    *up.state.redirect_to.lock().unwrap() = Some(format!("{other}/img.png"));
    let (s, body) = generate_with_urls(&up, &gw, &[format!("{}/redirect", up.url)]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains(&format!("127.0.0.1:{port}")) && message.contains("redirect"), "{message}");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0, "the redirect target is never contacted");
}

#[tokio::test]
async fn an_allowed_host_is_fetched_without_the_backends_secrets() {
    let up = support::openai::start().await;
    let (other, port, rec) = recorder().await;
    let allow = format!("    allow_output_hosts: [\"127.0.0.1:{port}\"]\n");
    let gw = spawn_gateway(&config(&up.url, &allow)).await;
    let (s, body) = generate_with_urls(&up, &gw, &[format!("{other}/img.png")]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 1);
    let headers = rec.headers.lock().unwrap()[0].clone();
    assert!(headers.get("authorization").is_none(), "{headers:?}");
    assert!(headers.get("x-team").is_none(), "configured headers stay with the backend: {headers:?}");
    let all = format!("{headers:?}");
    assert!(!all.contains(support::openai::KEY) && !all.contains("team-secret"), "{all}");
}

#[tokio::test]
async fn a_file_url_is_a_backend_error_naming_the_scheme() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    let (s, body) = generate_with_urls(&up, &gw, &["file:///etc/passwd".into()]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains("scheme `file`"), "{message}");
    assert!(!message.contains("root:"), "{message}");
}

#[tokio::test]
async fn a_non_image_body_is_reported_by_type_and_size_only() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    let (s, body) = generate_with_urls(&up, &gw, &[format!("{}/page", up.url)]).await;
    let message = assert_backend_error(s, &body);
    let len = "<html>private page SECRET-PAGE-BODY</html>".len();
    assert!(message.contains("text/html") && message.contains(&format!("{len} bytes")), "{message}");
    assert!(!message.contains("SECRET-PAGE-BODY"), "{message}");
}

#[tokio::test]
async fn an_error_status_of_a_download_is_not_echoed() {
    let up = support::openai::start().await;
    let gw = spawn_gateway(&config(&up.url, "")).await;
    // The fake answers 401 with OpenAI's error envelope: its text must not reach the client.
    let (s, body) = generate_with_urls(&up, &gw, &[format!("{}/v1/private.png", up.url)]).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains("401") && message.contains("application/json"), "{message}");
    assert!(!message.contains("Incorrect API key"), "{message}");
}

#[tokio::test]
async fn an_api_redirect_off_the_backends_origin_is_an_error_naming_it() {
    let (other, port, rec) = recorder().await;
    // A backend whose generation endpoint redirects to another host (its model list answers, so it is healthy).
    let target = format!("{other}/steal");
    let models = || async { axum::Json(json!({"object": "list", "data": [{"id": "m", "object": "model"}]})) };
    let app = axum::Router::new().route("/v1/models", axum::routing::get(models)).fallback(move || {
        let target = target.clone();
        async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [("location", target)]).into_response() }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = spawn_gateway(&config(&up, "")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    let message = assert_backend_error(s, &body);
    assert!(message.contains(&format!("127.0.0.1:{port}/steal")) && message.contains("origin"), "{message}");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0, "neither the key nor the headers went to the other host");
}
