//! Trust under misuse: `extra` cannot buy more than was paid for, an answer is charged only once it is delivered,
//! a client that left starts no new attempt, partial results and produced sizes are reported, and an
//! Idempotency-Key means the same without keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::support::books::{ADMIN, credits, key, ledger_clean};
use crate::support::{Gateway, TEST_TIMEOUT, openai, spawn_gateway, spawn_gateway_env};

/// A small OpenAI-images server whose behaviour is set per test: latency, a status to fail with, the size of the
/// image it makes; it counts requests received and answered and wakes waiters on each.
#[derive(Default)]
pub struct Upstream {
    pub received: AtomicU32,
    pub answered: AtomicU32,
    pub latency_ms: AtomicU32,
    pub fail_status: AtomicU32,
    /// Side of the square image it makes (default 8).
    pub side: AtomicU32,
    pub changed: Notify,
}

pub struct Up {
    pub url: String,
    pub s: Arc<Upstream>,
}

pub async fn upstream() -> Up {
    let s = Arc::new(Upstream::default());
    let app = axum::Router::new().fallback(serve).with_state(Arc::clone(&s));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Up { url, s }
}

async fn serve(State(s): State<Arc<Upstream>>, req: Request) -> Response {
    if req.uri().path() == "/v1/models" {
        return Json(json!({"object": "list", "data": []})).into_response();
    }
    let body: Value = serde_json::from_slice(&axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap()).unwrap();
    s.received.fetch_add(1, Ordering::SeqCst);
    s.changed.notify_waiters();
    let latency = s.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(latency))).await;
    }
    let resp = match s.fail_status.load(Ordering::SeqCst) {
        0 => {
            let side = match s.side.load(Ordering::SeqCst) {
                0 => 8,
                n => n,
            };
            let n = body["n"].as_u64().unwrap_or(1);
            let img = image::RgbImage::from_pixel(side, side, image::Rgb([10, 200, 30]));
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(img)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
            let data: Vec<Value> = (0..n).map(|_| json!({"b64_json": b64})).collect();
            Json(json!({"created": 1, "data": data})).into_response()
        }
        status => (
            StatusCode::from_u16(status as u16).unwrap(),
            Json(
                json!({"error": {"message": "upstream says no", "type": "server_error", "param": null, "code": null}}),
            ),
        )
            .into_response(),
    };
    s.answered.fetch_add(1, Ordering::SeqCst);
    s.changed.notify_waiters();
    resp
}

impl Upstream {
    /// Waits until `cond` holds on the counters (woken by the server, bounded).
    pub async fn until(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            assert!(tokio::time::timeout_at(deadline, notified).await.is_ok(), "timed out waiting for {what}");
        }
    }
}

fn openai_backend(name: &str, url: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    kind: openai\n    url: {url}\n    timeout: 10s\n    concurrency: {{images: 64}}\n    queue: {{depth: 256, wait: 10s}}\n{extra}"
    )
}

async fn keys_gateway(backends: &str, models: &str) -> Gateway {
    let yaml = format!("auth:\n  mode: keys\nbackends:\n{backends}models:\n{models}");
    spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await
}

async fn post(
    gw: &Gateway,
    secret: Option<&str>,
    body: Value,
    idem: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = gw.client.post(gw.endpoint("/v1/images/generations")).json(&body);
    if let Some(s) = secret {
        req = req.bearer_auth(s);
    }
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap())
}

#[tokio::test]
async fn extra_cannot_raise_the_count_model_or_size_and_nothing_is_charged() {
    let fake = openai::start().await;
    let backends = format!(
        "  oa:\n    kind: openai\n    url: {}\n    api_key: {}\n  sd:\n    kind: a1111\n    url: {}\n",
        fake.url,
        openai::KEY,
        fake.url
    );
    let models = "  - id: cheap\n    backends: [oa]\n    upstream_model: dall-e-2\n    credits: 1\n  - id: sd\n    backends: [sd]\n    credits: 1\n";
    let gw = keys_gateway(&backends, models).await;
    let secret = key(&gw, 5.0).await;
    // Each bad `extra` gets 400 naming the field; the upstream never hears of it and the balance is untouched.
    for (model, extra, param) in [
        ("cheap", json!({"n": 8, "model": "premium", "size": "4096x4096"}), "extra.model"),
        ("cheap", json!({"model": "dall-e-3"}), "extra.model"),
        ("cheap", json!({"size": "4096x4096"}), "extra.size"),
        ("cheap", json!({"quality": "hd"}), "extra.quality"),
        ("cheap", json!({"num_images": 4}), "extra.num_images"),
        ("sd", json!({"batch_size": 8}), "extra.batch_size"),
        ("sd", json!({"n_iter": 8}), "extra.n_iter"),
        ("sd", json!({"width": 4096}), "extra.width"),
        (
            "sd",
            json!({"override_settings": {"sd_model_checkpoint": "premium.safetensors"}}),
            "extra.override_settings.sd_model_checkpoint",
        ),
    ] {
        let (status, _, body) =
            post(&gw, Some(&secret), json!({"model": model, "prompt": "p", "n": 1, "extra": extra}), None).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["code"], "protected_field", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("cost"), "{body}");
    }
    assert_eq!(fake.state.calls.load(Ordering::SeqCst), 0, "no upstream call for a refused request");
    assert_eq!(credits(&gw, &secret).await, (5_000, 0));
    // Tuning fields still pass through.
    let (status, _, body) = post(
        &gw,
        Some(&secret),
        json!({"model": "cheap", "prompt": "p", "extra": {"style": "natural", "user_tag": "x"}, "response_format": "b64_json"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent = fake.state.bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (sent["n"].as_u64(), sent["model"].as_str(), sent["style"].as_str()),
        (Some(1), Some("dall-e-2"), Some("natural"))
    );
    assert_eq!(credits(&gw, &secret).await, (4_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn a_client_that_leaves_after_the_backend_answered_is_not_charged() {
    // A 1536² answer takes easel a while to re-encode as JPEG: the client leaves as soon as the upstream has
    // answered, so easel finishes an answer nobody will read. It must release, not capture.
    let up = upstream().await;
    up.s.side.store(1536, Ordering::SeqCst);
    let backends = openai_backend("up", &up.url, "");
    let gw = keys_gateway(&backends, "  - id: m\n    backends: [up]\n    credits: 1\n").await;
    let secret = key(&gw, 10.0).await;
    for i in 0..5u32 {
        let req = gw
            .client
            .post(gw.endpoint("/v1/images/generations"))
            .bearer_auth(&secret)
            .json(&json!({"model": "m", "prompt": "p", "output_format": "jpeg", "response_format": "b64_json"}))
            .send();
        tokio::select! {
            r = req => panic!("the answer came before the client left: {:?}", r.map(|r| r.status())),
            () = up.s.until("the upstream to answer", |s| s.answered.load(Ordering::SeqCst) > i) => {}
        }
    }
    // Those answers are still being made; once their holds are settled, none was charged.
    let deadline = Instant::now() + TEST_TIMEOUT;
    let available = loop {
        let (available, held) = credits(&gw, &secret).await;
        if held == 0 {
            break available;
        }
        assert!(Instant::now() < deadline, "holds never settled: {available} available, {held} held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(available, 10_000, "nothing delivered, nothing charged");
    // One that stays is charged once.
    let (status, _, body) =
        post(&gw, Some(&secret), json!({"model": "m", "prompt": "p", "response_format": "b64_json"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(credits(&gw, &secret).await, (9_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn no_new_attempt_once_the_client_left() {
    // The first backend fails (a retryable 500) only after the client has gone: easel must not try the second.
    let (a, b) = (upstream().await, upstream().await);
    a.s.latency_ms.store(300, Ordering::SeqCst);
    a.s.fail_status.store(500, Ordering::SeqCst);
    let backends = format!("{}{}", openai_backend("a", &a.url, ""), openai_backend("b", &b.url, ""));
    let yaml = format!("backends:\n{backends}models:\n  - id: m\n    backends: [a, b]\n");
    let gw = spawn_gateway(&yaml).await;
    // With the client staying, the 500 falls back to b: the setup can fail over at all.
    let (status, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(b.s.received.load(Ordering::SeqCst), 1);
    for i in 1..=4u32 {
        let req =
            gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "p"})).send();
        tokio::select! {
            r = req => panic!("answered before the client left: {:?}", r.map(|r| r.status())),
            () = a.s.until("a to receive", |s| s.received.load(Ordering::SeqCst) > i) => {}
        }
        a.s.until("a to fail", |s| s.answered.load(Ordering::SeqCst) > i).await;
    }
    // Any fallback would reach b within milliseconds of a's answer; give it far longer.
    let late =
        tokio::time::timeout(Duration::from_millis(500), b.s.until("b", |s| s.received.load(Ordering::SeqCst) > 1))
            .await;
    assert!(late.is_err(), "a client that left caused {} new attempt(s)", b.s.received.load(Ordering::SeqCst) - 1);
}

#[tokio::test]
async fn a_partial_result_says_so_and_the_size_is_what_was_made() {
    // The backend makes 24x24 though the model's default is 32x32: the answer says 24x24.
    let ok = upstream().await;
    ok.s.side.store(24, Ordering::SeqCst);
    let backends = openai_backend("ok", &ok.url, "");
    let yaml = format!("backends:\n{backends}models:\n  - id: m\n    backends: [ok]\n    default_size: 32x32\n");
    let gw = spawn_gateway(&yaml).await;
    let (status, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["size"], "24x24", "the backend made 24x24 though 32x32 was asked: {}", body["size"]);
    assert!(body.get("partial").is_none(), "{body}");

    // One image per call, every second call fails and there is nowhere to fall back to: 2 of 4.
    let yaml = "backends:\n  half:\n    kind: simulated\n    max_images_per_call: 1\n    failure: {status: 500, every: 2}\nmodels:\n  - id: halfway\n    backends: [half]\n    default_size: 16x16\n";
    let gw = spawn_gateway(yaml).await;
    let (status, headers, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "halfway", "prompt": "p", "n": 4, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["partial"]["requested"], 4, "{body}");
    assert_eq!(body["partial"]["produced"], 2, "{body}");
    assert!(body["partial"]["error"].as_str().unwrap().contains("half"), "names the backend: {body}");
    assert_eq!(headers["easel-partial-result"], "produced=2, requested=4");
    let (_, _, metrics) = gw.get("/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("easel_images_missing_total{model=\"halfway\"} 2"), "{metrics}");
}

#[tokio::test]
async fn idempotency_keys_work_without_auth() {
    let up = upstream().await;
    let backends = openai_backend("up", &up.url, "");
    let gw = spawn_gateway(&format!("backends:\n{backends}models:\n  - id: m\n    backends: [up]\n")).await;
    let body = json!({"model": "m", "prompt": "p", "response_format": "b64_json"});
    let (s1, h1, b1) = post(&gw, None, body.clone(), Some("retry-1")).await;
    let (s2, h2, b2) = post(&gw, None, body.clone(), Some("retry-1")).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2, "the replay is the same answer");
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(up.s.received.load(Ordering::SeqCst), 1, "generated once");
    let (s3, _, b3) = post(&gw, None, json!({"model": "m", "prompt": "other"}), Some("retry-1")).await;
    assert_eq!(s3, 422, "another body under the same key: {b3}");
    let (s4, _, _) = post(&gw, None, body, None).await;
    assert_eq!(s4, 200);
    assert_eq!(up.s.received.load(Ordering::SeqCst), 2, "no key, no replay");
}

/// Random upstream faults and client disconnects against a keys-mode binary; the books must match what the
/// clients received, to the image.
// Several threads: the fake upstream must keep answering while the test blocks on the binary's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_and_disconnects_keeps_the_books_exact() {
    use rand::{Rng, SeedableRng};

    const REQUESTS: usize = 2000;
    const CONCURRENCY: usize = 32;
    let up = Arc::new(upstream_with_faults().await);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "auth:\n  mode: keys\nbackends:\n  a:\n    kind: openai\n    url: {0}\n    timeout: 1s\n    concurrency: {{images: 16}}\n    queue: {{depth: 512, wait: 20s}}\n    max_images_per_call: 1\n  b:\n    kind: openai\n    url: {0}\n    timeout: 1s\n    concurrency: {{images: 16}}\n    queue: {{depth: 512, wait: 20s}}\n    max_images_per_call: 1\nmodels:\n  - id: m\n    backends: [a, b]\n    credits: 1\n",
        up.url
    );
    std::fs::write(dir.path().join("easel.yaml"), yaml).unwrap();
    let (mut child, url) = crate::support::start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{url}/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "soak", "credits": 1_000_000}))
        .send()
        .await
        .unwrap();
    let secret = resp.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_owned();

    let run = |count: usize, seed: u64| {
        let (client, url, secret) = (client.clone(), url.clone(), secret.clone());
        async move {
            let received = Arc::new(AtomicU32::new(0));
            let next = Arc::new(AtomicU32::new(0));
            let workers = (0..CONCURRENCY).map(|w| {
                let (client, url, secret, received, next) =
                    (client.clone(), url.clone(), secret.clone(), Arc::clone(&received), Arc::clone(&next));
                async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + w as u64);
                    while (next.fetch_add(1, Ordering::SeqCst) as usize) < count {
                        let n = rng.random_range(1..=3u32);
                        let req = client
                            .post(format!("{url}/v1/images/generations"))
                            .bearer_auth(&secret)
                            .json(&json!({"model": "m", "prompt": "p", "n": n, "response_format": "b64_json"}))
                            .send();
                        // One in four leaves before the upstream can have answered: its floor is 30 ms, the latest
                        // leave is at 8 ms, so even a timer that fires 20 ms late on a loaded machine leaves
                        // before any answer exists.
                        let leave = rng.random_bool(0.25).then(|| Duration::from_millis(rng.random_range(0..8)));
                        let resp = match leave {
                            Some(after) => match tokio::time::timeout(after, req).await {
                                Ok(r) => r,
                                Err(_) => continue,
                            },
                            None => req.await,
                        };
                        let resp = resp.unwrap();
                        if resp.status() == 200 {
                            let body: Value = resp.json().await.unwrap();
                            received.fetch_add(body["data"].as_array().unwrap().len() as u32, Ordering::SeqCst);
                        } else {
                            let status = resp.status().as_u16();
                            let body = resp.text().await.unwrap();
                            assert!(matches!(status, 400 | 502 | 503 | 504), "unexpected {status}: {body}");
                            assert!(status != 503 || body.contains("backend"), "{body}");
                        }
                    }
                }
            });
            futures_util::future::join_all(workers).await;
            received.load(Ordering::SeqCst)
        }
    };
    let warm = run(300, 1).await;
    let rss_before = rss_kib(child.id());
    let soaked = run(REQUESTS, 1000).await;
    let rss_after = rss_kib(child.id());

    // Every upstream call has ended and every settlement has run before the books are read.
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let status: Value = client
            .get(format!("{url}/v1/gateway/status"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let busy: u64 =
            ["a", "b"].iter().map(|b| status["backends"][b]["admission"]["images"]["inflight"].as_u64().unwrap()).sum();
        if busy == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "inflight never drained: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let me: Value = client.get(format!("{url}/v1/me")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    let images = i64::from(warm + soaked);
    assert!(images > 500, "the soak produced too little to mean anything: {images}");
    assert_eq!(me["credits"]["held_mc"], 0, "{me}");
    assert_eq!(me["credits"]["available_mc"].as_i64().unwrap(), 1_000_000_000 - images * 1000, "{me}");
    let check = client.get(format!("{url}/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(check.status(), 200, "{}", check.text().await.unwrap());
    let growth = rss_after as f64 / rss_before as f64;
    assert!(growth < 1.10, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// An upstream for the soak: 30–50 ms per call; by call number, some answer 500 (retried elsewhere), some 400
/// (the client's fault, not retried), some never in time (1 s timeout), some with a body that is no image.
async fn upstream_with_faults() -> Up {
    let s = Arc::new(Upstream::default());
    let app = axum::Router::new().fallback(faulty).with_state(Arc::clone(&s));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Up { url, s }
}

async fn faulty(State(s): State<Arc<Upstream>>, req: Request) -> Response {
    if req.uri().path() == "/v1/models" {
        return Json(json!({"object": "list", "data": []})).into_response();
    }
    let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
    let call = s.received.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30 + u64::from(call % 21))).await;
    match call % 50 {
        0..=4 => (StatusCode::INTERNAL_SERVER_ERROR, "overloaded").into_response(),
        5 => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "bad prompt", "type": "invalid_request_error"}})),
        )
            .into_response(),
        6 => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            (StatusCode::GATEWAY_TIMEOUT, "late").into_response()
        }
        7 => Json(json!({"created": 1, "data": [{"b64_json": "bm90IGFuIGltYWdl"}]})).into_response(),
        _ => {
            let png = openai::png(9);
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
            Json(json!({"created": 1, "data": [{"b64_json": b64}]})).into_response()
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

const SIGNING_SECRET: &str = "a-test-signing-secret-of-32-chars-or-more";

/// HMAC-SHA256, written out here so the test checks easel's links against the definition, not against itself.
fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let (mut ipad, mut opad) = ([0x36u8; 64], [0x5cu8; 64]);
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(data).finalize();
    let mac = Sha256::new().chain_update(opad).chain_update(inner).finalize();
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn outputs_are_served_by_signed_expiring_links_and_otherwise_only_to_their_owner() {
    let yaml = format!(
        "auth:\n  mode: keys\nstorage:\n  signing_secret: {SIGNING_SECRET}\n  url_ttl: 1h\nbackends:\n  sim:\n    kind: simulated\nmodels:\n  - id: m\n    backends: [sim]\n    default_size: 16x16\n"
    );
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (alice, bob) = (key(&gw, 10.0).await, key(&gw, 10.0).await);
    let (status, _, body) =
        post(&gw, Some(&alice), json!({"model": "m", "prompt": "p", "response_format": "url"}), None).await;
    assert_eq!(status, 200, "{body}");
    let link = body["data"][0]["url"].as_str().unwrap().to_owned();
    let (path, query) = link.split_once('?').unwrap();
    let id = path.rsplit('/').next().unwrap().to_owned();
    let (exp, sig) = query.strip_prefix("exp=").and_then(|q| q.split_once("&sig=")).unwrap();
    let exp: u64 = exp.parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now + 3500..=now + 3700).contains(&exp), "an hour from now: {exp} vs {now}");
    assert_eq!(sig, hmac_hex(SIGNING_SECRET.as_bytes(), format!("{id}\n{exp}").as_bytes()));

    // The link works with no key at all, as in <img src>.
    let (status, headers, bytes) = gw.get(&link).await;
    assert_eq!(
        (status, &headers["content-type"]),
        (200, &"image/png".parse::<reqwest::header::HeaderValue>().unwrap())
    );
    assert!(bytes.starts_with(b"\x89PNG"));

    let error_of = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).unwrap()["error"].clone();
    // What each tampered or stale link gets.
    let forged = format!("{path}?exp={}&sig={sig}", exp + 1);
    let (status, _, bytes) = gw.get(&forged).await;
    assert_eq!((status, error_of(&bytes)["code"].as_str()), (403, Some("invalid_signature")), "a longer life");
    let past = now - 10;
    let stale =
        format!("{path}?exp={past}&sig={}", hmac_hex(SIGNING_SECRET.as_bytes(), format!("{id}\n{past}").as_bytes()));
    let (status, _, bytes) = gw.get(&stale).await;
    let err = error_of(&bytes);
    assert_eq!((status, err["code"].as_str()), (403, Some("link_expired")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("expired"), "{err}");
    let (status, _, bytes) = gw.get(&format!("{path}?sig={sig}")).await;
    assert_eq!((status, error_of(&bytes)["code"].as_str()), (400, Some("invalid_signature")), "half a signature");

    // Unsigned: no key → 401; the owner → 200; another key → 404, as if it did not exist.
    let (status, _, _) = gw.get(path).await;
    assert_eq!(status, 401);
    let owner = gw.client.get(path).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(owner.status(), 200);
    let other = gw.client.get(path).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(other.status(), 404);
    assert_eq!(other.json::<Value>().await.unwrap()["error"]["code"], "file_not_found");

    // Only the owner may edit it by `file_id`.
    let edit = |secret: String| {
        let id = id.clone();
        let gw = &gw;
        async move {
            let resp = gw
                .client
                .post(gw.endpoint("/v1/images/edits"))
                .bearer_auth(secret)
                .json(&json!({"model": "m", "prompt": "again", "images": [{"file_id": id}], "response_format": "b64_json"}))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = edit(bob.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not issued"), "{body}");
    let (status, body) = edit(alice.clone()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn without_a_configured_secret_one_is_generated_once_and_kept() {
    let yaml =
        "backends:\n  sim:\n    kind: simulated\nmodels:\n  - id: m\n    backends: [sim]\n    default_size: 16x16\n";
    let gw = spawn_gateway(yaml).await;
    let (status, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(status, 200, "{body}");
    let link = body["data"][0]["url"].as_str().unwrap();
    assert!(link.contains("?exp=") && link.contains("&sig="), "{link}");
    let key_file = gw.dir.path().join("files").join(".url-signing-key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64, "32 random bytes in hex");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let (_, query) = link.split_once('?').unwrap();
    let (exp, sig) = query.strip_prefix("exp=").and_then(|q| q.split_once("&sig=")).unwrap();
    let id = link.split_once('?').unwrap().0.rsplit('/').next().unwrap();
    assert_eq!(sig, hmac_hex(key.trim().as_bytes(), format!("{id}\n{exp}").as_bytes()));
    // The key file is not a file easel serves.
    let (status, _, _) = gw.get("/v1/files/.url-signing-key").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins_and_preflights_need_no_key() {
    let yaml = "server:\n  cors: {allow_origins: ['https://app.example.com']}\nauth: {mode: keys}\nbackends:\n  sim: {kind: simulated}\nmodels:\n  - {id: m, backends: [sim]}\n";
    let gw = crate::support::spawn_gateway(yaml).await;
    let preflight = |origin: &'static str| {
        gw.client
            .request(reqwest::Method::OPTIONS, gw.endpoint("/v1/images/generations"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type, idempotency-key")
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(ok.status(), 200, "a preflight carries no key and is still answered");
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://app.example.com");
    assert!(ok.headers()["access-control-allow-headers"].to_str().unwrap().contains("idempotency-key"));
    let other = preflight("https://evil.example.net").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none(), "another origin gets no grant");
    // A real request from the allowed origin still needs its key, and the browser may read Retry-After etc.
    let resp =
        gw.client.get(gw.endpoint("/v1/models")).header("Origin", "https://app.example.com").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example.com");
    assert!(resp.headers()["access-control-expose-headers"].to_str().unwrap().contains("retry-after"));

    // Without `server.cors`: no CORS headers at all.
    let plain =
        crate::support::spawn_gateway("backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: m, backends: [sim]}\n")
            .await;
    let resp = plain
        .client
        .get(plain.endpoint("/v1/models"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // A path or a trailing slash is not an origin.
    let e = easel::config::from_str(
        "server:\n  cors: {allow_origins: ['https://a.example/x', '*']}\nbackends:\n  sim: {kind: simulated}\nmodels:\n  - {id: m, backends: [sim]}\n",
        "t.yaml",
        std::path::Path::new("."),
        &easel::config::MapEnv::new([]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.cors.allow_origins"), "{e}");
}
