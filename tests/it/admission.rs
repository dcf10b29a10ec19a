//! Admission control, routing, failover, the circuit breaker and health-driven routing, end to end, against a
//! controllable OpenAI-compatible upstream that counts how many calls it is serving at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway};

/// A counting upstream: `active`/`max_active` observe concurrency; `hold` parks calls until the test releases them.
struct Counting {
    active: AtomicU32,
    max_active: AtomicU32,
    calls: AtomicU32,
    latency: Duration,
    /// 200 = answer with an image; anything else = answer with that error status.
    status: AtomicU16,
    probe_ok: AtomicBool,
    hold: Option<Arc<Semaphore>>,
    png_b64: String,
}

struct Up {
    url: String,
    s: Arc<Counting>,
}

struct ActiveGuard(Arc<Counting>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn generate(State(s): State<Arc<Counting>>) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_active.fetch_max(now, Ordering::SeqCst);
    let _guard = ActiveGuard(Arc::clone(&s));
    if let Some(hold) = &s.hold {
        hold.acquire().await.expect("hold semaphore").forget();
    }
    if !s.latency.is_zero() {
        tokio::time::sleep(s.latency).await;
    }
    let status = s.status.load(Ordering::SeqCst);
    if status != 200 {
        let code = StatusCode::from_u16(status).expect("status");
        return (code, Json(json!({"error": {"message": format!("upstream said {status}"), "type": "server_error", "param": null, "code": null}}))).into_response();
    }
    Json(json!({"created": 1, "data": [{"b64_json": s.png_b64}]})).into_response()
}

async fn models(State(s): State<Arc<Counting>>) -> Response {
    if s.probe_ok.load(Ordering::SeqCst) {
        Json(json!({"object": "list", "data": []})).into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "probe says no").into_response()
    }
}

async fn upstream(latency: Duration, status: u16, hold: Option<Arc<Semaphore>>) -> Up {
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let s = Arc::new(Counting {
        active: AtomicU32::new(0),
        max_active: AtomicU32::new(0),
        calls: AtomicU32::new(0),
        latency,
        status: AtomicU16::new(status),
        probe_ok: AtomicBool::new(true),
        hold,
        png_b64: base64::engine::general_purpose::STANDARD.encode(png),
    });
    let app = axum::Router::new()
        .route("/v1/images/generations", post(generate))
        .route("/v1/models", get(models))
        .with_state(Arc::clone(&s));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Up { url, s }
}

/// Polls `cond` on the gateway status until it holds (bounded; no fixed sleeps).
async fn wait_status(gw: &Gateway, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let (_, _, body) = gw.get("/v1/gateway/status").await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn one_backend(url: &str, limit: u32, depth: u32, wait: &str) -> String {
    format!(
        "backends:\n  up:\n    kind: openai\n    url: {url}\n    timeout: 20s\n    concurrency: {{images: {limit}}}\n    queue: {{depth: {depth}, wait: {wait}}}\nmodels:\n  - id: m\n    backends: [up]\n    upstream_model: tiny\n"
    )
}

fn generate_call(
    gw: &Gateway,
) -> impl std::future::Future<Output = (u16, reqwest::header::HeaderMap, serde_json::Value)> + '_ {
    gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
}

#[tokio::test]
async fn a_burst_never_exceeds_the_limit() {
    let up = upstream(Duration::from_millis(30), 200, None).await;
    let gw = spawn_gateway(&one_backend(&up.url, 2, 64, "20s")).await;
    let results = futures_util::future::join_all((0..20).map(|_| generate_call(&gw))).await;
    for (s, _, body) in &results {
        assert_eq!(*s, 200, "{body}");
    }
    assert_eq!(up.s.calls.load(Ordering::SeqCst), 20);
    assert_eq!(up.s.max_active.load(Ordering::SeqCst), 2, "in flight must reach but never exceed the limit");
    let v = wait_status(&gw, "idle", |v| v["backends"]["up"]["admission"]["images"]["inflight"] == 0).await;
    assert_eq!(v["backends"]["up"]["admission"]["images"]["limit"], 2);
    assert!(v["backends"]["up"]["admission"]["images"]["p50_ms"].as_u64().is_some(), "{v}");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let hold = Arc::new(Semaphore::new(0));
    let up = upstream(Duration::ZERO, 200, Some(Arc::clone(&hold))).await;
    let gw = spawn_gateway(&one_backend(&up.url, 1, 1, "20s")).await;
    let first = tokio::spawn({
        let (url, client) = (gw.endpoint("/v1/images/generations"), gw.client.clone());
        async move { client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16()) }
    });
    wait_until("the first call to reach the upstream", || up.s.active.load(Ordering::SeqCst) == 1).await;
    let second = tokio::spawn({
        let (url, client) = (gw.endpoint("/v1/images/generations"), gw.client.clone());
        async move { client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16()) }
    });
    wait_status(&gw, "one queued", |v| v["backends"]["up"]["admission"]["images"]["queued"] == 1).await;
    let (s, headers, body) = generate_call(&gw).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error"]["code"], "backend_busy");
    assert!(body["error"]["message"].as_str().unwrap().contains("queue of 1 is full"), "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After is never 0");
    hold.add_permits(2);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, first).await.unwrap().unwrap().unwrap(), 200);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, second).await.unwrap().unwrap().unwrap(), 200);
}

#[tokio::test]
async fn a_queue_wait_that_runs_out_answers_429() {
    let hold = Arc::new(Semaphore::new(0));
    let up = upstream(Duration::ZERO, 200, Some(Arc::clone(&hold))).await;
    let gw = spawn_gateway(&one_backend(&up.url, 1, 4, "200ms")).await;
    let first = tokio::spawn({
        let (url, client) = (gw.endpoint("/v1/images/generations"), gw.client.clone());
        async move { client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16()) }
    });
    wait_until("the first call to reach the upstream", || up.s.active.load(Ordering::SeqCst) == 1).await;
    let (s, headers, body) = generate_call(&gw).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error"]["code"], "backend_busy");
    assert!(body["error"]["message"].as_str().unwrap().contains("waited"), "{body}");
    assert!(headers.contains_key("retry-after"));
    hold.add_permits(1);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, first).await.unwrap().unwrap().unwrap(), 200);
}

#[tokio::test]
async fn permits_survive_a_thousand_client_disconnects() {
    let up = upstream(Duration::from_millis(5), 200, None).await;
    let gw = spawn_gateway(&one_backend(&up.url, 4, 2000, "30s")).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(3)).build().unwrap();
    for _ in 0..20 {
        let batch = (0..50).map(|_| {
            impatient.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "p"})).send()
        });
        // Almost all time out client-side; a fast one may complete. Either way nothing may leak.
        for resp in futures_util::future::join_all(batch).await.into_iter().flatten() {
            assert!(resp.status().is_success() || resp.status() == 429);
        }
    }
    let v = wait_status(&gw, "all slots released", |v| {
        let a = &v["backends"]["up"]["admission"]["images"];
        a["inflight"] == 0 && a["queued"] == 0 && a["available"] == 4
    })
    .await;
    assert_eq!(v["backends"]["up"]["admission"]["images"]["limit"], 4);
    assert!(up.s.max_active.load(Ordering::SeqCst) <= 4);
    let (s, _, body) = generate_call(&gw).await;
    assert_eq!(s, 200, "the gateway still serves: {body}");
}

fn two_backends(a: &str, b: &str, extra: &str) -> String {
    format!(
        "health:\n  interval: 50ms\n  unhealthy_threshold: 1\n  circuit_failures: 3\n  circuit_cooldown: 300ms\n{extra}backends:\n  first:\n    kind: openai\n    url: {a}\n    timeout: 5s\n  second:\n    kind: openai\n    url: {b}\n    timeout: 5s\nmodels:\n  - id: m\n    backends: [first, second]\n"
    )
}

#[tokio::test]
async fn failover_skips_dead_and_failing_backends_but_not_bad_requests() {
    // A dead first backend: nothing listens on the port.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let good = upstream(Duration::ZERO, 200, None).await;
    let gw = spawn_gateway(&two_backends(&dead_url, &good.url, "")).await;
    let (s, _, body) = generate_call(&gw).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(good.s.calls.load(Ordering::SeqCst), 1);

    // A first backend answering 500 falls back; one answering 400 does not.
    let failing = upstream(Duration::ZERO, 500, None).await;
    let good = upstream(Duration::ZERO, 200, None).await;
    let gw = spawn_gateway(&two_backends(&failing.url, &good.url, "")).await;
    let (s, _, body) = generate_call(&gw).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!((failing.s.calls.load(Ordering::SeqCst), good.s.calls.load(Ordering::SeqCst)), (1, 1));

    failing.s.status.store(400, Ordering::SeqCst);
    let (s, _, body) = generate_call(&gw).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    assert_eq!(good.s.calls.load(Ordering::SeqCst), 1, "a request the client got wrong is not retried elsewhere");

    let metrics = String::from_utf8(gw.get("/metrics").await.2.to_vec()).unwrap();
    assert!(metrics.contains("easel_backend_fallbacks_total{backend=\"first\",reason=\"error\"}"), "{metrics}");
}

#[tokio::test]
async fn the_circuit_opens_and_recovers() {
    let flaky = upstream(Duration::ZERO, 500, None).await;
    let good = upstream(Duration::ZERO, 200, None).await;
    let gw = spawn_gateway(&two_backends(&flaky.url, &good.url, "")).await;
    for _ in 0..3 {
        let (s, _, body) = generate_call(&gw).await;
        assert_eq!(s, 200, "{body}");
    }
    assert_eq!(flaky.s.calls.load(Ordering::SeqCst), 3);
    let v = wait_status(&gw, "open circuit", |v| v["backends"]["first"]["circuit"] == "open").await;
    assert!(v["backends"]["first"]["cooldown_until"].is_string(), "{v}");
    let (s, _, _) = generate_call(&gw).await;
    assert_eq!(s, 200);
    assert_eq!(flaky.s.calls.load(Ordering::SeqCst), 3, "an open circuit keeps traffic away");

    flaky.s.status.store(200, Ordering::SeqCst);
    wait_status(&gw, "half-open circuit", |v| v["backends"]["first"]["circuit"] == "half_open").await;
    let (s, _, _) = generate_call(&gw).await;
    assert_eq!(s, 200);
    assert_eq!(flaky.s.calls.load(Ordering::SeqCst), 4, "one trial request goes through");
    wait_status(&gw, "closed circuit", |v| v["backends"]["first"]["circuit"] == "closed").await;
    let (s, _, _) = generate_call(&gw).await;
    assert_eq!(s, 200);
    assert_eq!(flaky.s.calls.load(Ordering::SeqCst), 5, "preference order is back");
}

#[tokio::test]
async fn health_state_drives_routing() {
    let first = upstream(Duration::ZERO, 200, None).await;
    first.s.probe_ok.store(false, Ordering::SeqCst);
    let second = upstream(Duration::ZERO, 200, None).await;
    let gw = spawn_gateway(&two_backends(&first.url, &second.url, "")).await;
    let (_, _, body) = gw.get("/health").await;
    let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["backends"]["first"]["healthy"], false, "{h}");
    assert_eq!(h["status"], "degraded");
    let (s, _, _) = generate_call(&gw).await;
    assert_eq!(s, 200);
    assert_eq!(
        (first.s.calls.load(Ordering::SeqCst), second.s.calls.load(Ordering::SeqCst)),
        (0, 1),
        "unhealthy backends are skipped"
    );

    first.s.probe_ok.store(true, Ordering::SeqCst);
    wait_status(&gw, "first healthy again", |v| v["backends"]["first"]["healthy"] == true).await;
    let (s, _, _) = generate_call(&gw).await;
    assert_eq!(s, 200);
    assert_eq!(first.s.calls.load(Ordering::SeqCst), 1, "a recovered backend gets traffic again");

    // With every candidate unhealthy: 503 naming each backend and why.
    first.s.probe_ok.store(false, Ordering::SeqCst);
    second.s.probe_ok.store(false, Ordering::SeqCst);
    wait_status(&gw, "both unhealthy", |v| {
        v["backends"]["first"]["healthy"] == false && v["backends"]["second"]["healthy"] == false
    })
    .await;
    let (s, headers, body) = generate_call(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`first`") && msg.contains("`second`") && msg.contains("HTTP 500"), "{msg}");
    assert!(headers.contains_key("retry-after"));
    let (s, _, _) = gw.get("/readyz").await;
    assert_eq!(s, 503);
}

#[tokio::test]
async fn status_and_metrics_show_a_running_load() {
    let hold = Arc::new(Semaphore::new(0));
    let up = upstream(Duration::ZERO, 200, Some(Arc::clone(&hold))).await;
    let yaml = one_backend(&up.url, 2, 16, "20s").replace("up:", "loadtest:").replace("[up]", "[loadtest]");
    let gw = spawn_gateway(&yaml).await;
    let load: Vec<_> = (0..6)
        .map(|_| {
            let (url, client) = (gw.endpoint("/v1/images/generations"), gw.client.clone());
            tokio::spawn(async move {
                client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    let v = wait_status(&gw, "2 in flight and 4 queued", |v| {
        let a = &v["backends"]["loadtest"]["admission"]["images"];
        a["inflight"] == 2 && a["queued"] == 4
    })
    .await;
    assert_eq!(v["backends"]["loadtest"]["admission"]["images"]["available"], 0);
    let metrics = String::from_utf8(gw.get("/metrics").await.2.to_vec()).unwrap();
    for needle in [
        "easel_admission_inflight{backend=\"loadtest\",capability=\"images\"} 2",
        "easel_admission_queue_depth{backend=\"loadtest\",capability=\"images\"} 4",
        "easel_backend_healthy{backend=\"loadtest\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    hold.add_permits(6);
    for t in load {
        assert_eq!(tokio::time::timeout(TEST_TIMEOUT, t).await.unwrap().unwrap().unwrap(), 200);
    }
    let metrics = String::from_utf8(gw.get("/metrics").await.2.to_vec()).unwrap();
    for needle in [
        "easel_backend_requests_total{backend=\"loadtest\",kind=\"openai\",outcome=\"ok\"} 6",
        "easel_admission_queue_wait_seconds_bucket{backend=\"loadtest\",capability=\"images\"",
        "easel_http_requests_total{route=\"/v1/images/generations\",method=\"POST\",status=\"200\"}",
        "easel_http_request_duration_seconds_bucket{route=\"/v1/images/generations\"",
        "easel_admission_inflight{backend=\"loadtest\",capability=\"images\"} 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}
