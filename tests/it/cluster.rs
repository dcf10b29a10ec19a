//! Several instances sharing one real Redis (`cluster.redis`): the backend's `concurrency` holds across the
//! fleet, the per-instance queue still overflows into 429, a killed instance's slots come back within the lease,
//! Redis down fails closed (503) or falls back to per-instance limits, and per-key limits hold in-process and
//! across instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::support::redis::Redis;
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway, spawn_gateway_env, start_binary};

const ADMIN: &str = "admin-token-for-cluster-tests";

/// An upstream that counts the calls it serves at once; with `hold`, calls wait until the test adds permits.
struct Counting {
    active: AtomicU32,
    max_active: AtomicU32,
    calls: AtomicU32,
    latency: Duration,
    hold: Option<Arc<Semaphore>>,
    png_b64: String,
}

struct Active(Arc<Counting>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn generate(State(s): State<Arc<Counting>>) -> Json<serde_json::Value> {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_active.fetch_max(now, Ordering::SeqCst);
    let _active = Active(Arc::clone(&s));
    if let Some(hold) = &s.hold {
        hold.acquire().await.expect("hold").forget();
    }
    tokio::time::sleep(s.latency).await;
    Json(json!({"created": 1, "data": [{"b64_json": s.png_b64}]}))
}

async fn upstream(latency: Duration, hold: Option<Arc<Semaphore>>) -> (String, Arc<Counting>) {
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let s = Arc::new(Counting {
        active: AtomicU32::new(0),
        max_active: AtomicU32::new(0),
        calls: AtomicU32::new(0),
        latency,
        hold,
        png_b64: base64::engine::general_purpose::STANDARD.encode(png),
    });
    let app = axum::Router::new()
        .route("/v1/images/generations", post(generate))
        .route("/v1/models", get(|| async { Json(json!({"object": "list", "data": []})) }))
        .with_state(Arc::clone(&s));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, s)
}

fn config(up: &str, limit: u32, depth: u32, wait: &str, cluster: &str) -> String {
    format!(
        "{cluster}\nbackends:\n  up:\n    kind: openai\n    url: {up}\n    timeout: 20s\n    concurrency: {{images: {limit}}}\n    queue: {{depth: {depth}, wait: {wait}}}\nmodels:\n  - id: m\n    backends: [up]\n    upstream_model: tiny\n"
    )
}

fn call(gw: &Gateway) -> impl Future<Output = (u16, reqwest::header::HeaderMap, serde_json::Value)> + '_ {
    gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn queued(gw: &Gateway) -> u64 {
    let (_, _, body) = gw.get("/v1/gateway/status").await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["backends"]["up"]["admission"]["images"]["queued"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_exceed_the_fleet_limit() {
    let redis = Redis::start();
    let (up, s) = upstream(Duration::from_millis(100), None).await;
    let cluster = format!("cluster: {{redis: '{}', lease: 2s}}", redis.url);
    let yaml = config(&up, 2, 64, "20s", &cluster);
    let (a, b) = (spawn_gateway(&yaml).await, spawn_gateway(&yaml).await);
    let burst = (0..16).map(|i| if i % 2 == 0 { call(&a) } else { call(&b) });
    for (status, _, body) in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(s.calls.load(Ordering::SeqCst), 16);
    assert_eq!(s.max_active.load(Ordering::SeqCst), 2, "two instances together reach but never exceed concurrency 2");
    let (_, _, health) = a.get("/health").await;
    let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(health["redis"]["state"], "up", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounded_queue_overflows_into_429_fleet_wide() {
    let redis = Redis::start();
    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let cluster = format!("cluster: {{redis: '{}'}}", redis.url);
    let yaml = config(&up, 1, 1, "20s", &cluster);
    let (a, b) = (spawn_gateway(&yaml).await, spawn_gateway(&yaml).await);
    // A holds the fleet's one slot; B's first caller queues behind it, B's second finds B's queue full.
    let first = tokio::spawn({
        let (url, client) = (a.endpoint("/v1/images/generations"), a.client.clone());
        async move { client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16()) }
    });
    wait_until("A's call at the upstream", || s.active.load(Ordering::SeqCst) == 1).await;
    let second = tokio::spawn({
        let (url, client) = (b.endpoint("/v1/images/generations"), b.client.clone());
        async move { client.post(url).json(&json!({"model": "m", "prompt": "p"})).send().await.map(|r| r.status().as_u16()) }
    });
    let deadline = Instant::now() + TEST_TIMEOUT;
    while queued(&b).await != 1 {
        assert!(Instant::now() < deadline, "B's caller never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.active.load(Ordering::SeqCst), 1, "B must not reach the upstream while A holds the slot");
    let (status, headers, body) = call(&b).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "backend_busy");
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    hold.add_permits(2);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, first).await.unwrap().unwrap().unwrap(), 200);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, second).await.unwrap().unwrap().unwrap(), 200);
    assert_eq!(s.max_active.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_frees_its_permits_within_the_lease() {
    let redis = Redis::start();
    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let cluster = format!("cluster: {{redis: '{}', lease: 2s}}", redis.url);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), config(&up, 2, 8, "20s", &cluster)).unwrap();
    let (mut child, url) = start_binary(dir.path(), &[]);
    let client = reqwest::Client::new();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = client.post(format!("{url}/v1/images/generations")).json(&json!({"model": "m", "prompt": "p"}));
            tokio::spawn(req.send())
        })
        .collect();
    wait_until("both of A's calls at the upstream", || s.active.load(Ordering::SeqCst) == 2).await;

    let b = spawn_gateway(&config(&up, 2, 8, "300ms", &cluster)).await;
    let (status, _, body) = call(&b).await;
    assert_eq!(status, 429, "A holds both fleet slots: {body}");

    child.kill().unwrap(); // SIGKILL: no release, no drop; only the lease ends it.
    child.wait().unwrap();
    for h in held {
        let _ = h.await;
    }
    hold.add_permits(64);
    let killed = Instant::now();
    loop {
        let (status, _, body) = call(&b).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            killed.elapsed() < Duration::from_secs(2) + Duration::from_secs(3),
            "slots were not freed within the lease"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_falls_back_to_local_limits() {
    let redis = Redis::start();
    let url = redis.url.clone();
    redis.stop();
    let (up, s) = upstream(Duration::from_millis(50), None).await;

    let closed =
        spawn_gateway(&config(&up, 2, 8, "5s", &format!("cluster: {{redis: '{url}', fallback: closed}}"))).await;
    let (status, headers, body) = call(&closed).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "redis_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("Redis"), "{body}");
    assert!(headers.contains_key("retry-after"));
    let (_, _, health) = closed.get("/health").await;
    let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(health["redis"]["state"], "down", "{health}");
    assert_eq!(s.calls.load(Ordering::SeqCst), 0);

    // Four instances configured: each may run ceil(2 / 4) = 1 while Redis is away.
    let local = format!("cluster: {{redis: '{url}', fallback: local, fleet_size: 4}}");
    let local = spawn_gateway(&config(&up, 2, 16, "20s", &local)).await;
    for (status, _, body) in futures_util::future::join_all((0..6).map(|_| call(&local))).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(s.max_active.load(Ordering::SeqCst), 1, "the per-instance fallback limit is ceil(2 / 4)");
}

fn keyed(up: &str, limits: &str, cluster: &str) -> String {
    format!("auth: {{mode: keys, key_limits: {limits}}}\n{}", config(up, 8, 16, "20s", cluster))
}

async fn key(gw: &Gateway, name: &str) -> String {
    let resp = gw
        .client
        .post(gw.endpoint("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "credits": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<serde_json::Value>().await.unwrap()["secret"].as_str().unwrap().to_owned()
}

async fn keyed_call(gw: &Gateway, secret: &str) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let resp = tokio::time::timeout(
        TEST_TIMEOUT,
        gw.client
            .post(gw.endpoint("/v1/images/generations"))
            .bearer_auth(secret)
            .json(&json!({"model": "m", "prompt": "p"}))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap().to_owned()
}

async fn assert_rpm(gateways: &[&Gateway], secrets: &[String]) {
    // Three requests a minute, spread over the instances given; the fourth is refused.
    for i in 0..3 {
        let (status, headers, body) = keyed_call(gateways[i % gateways.len()], &secrets[i % secrets.len()]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), (2 - i).to_string());
    }
    let last = gateways.len() - 1;
    let (status, headers, body) = keyed_call(gateways[last], &secrets[last % secrets.len()]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert!(header(&headers, "x-ratelimit-reset-requests").ends_with('s'));
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
}

async fn assert_parallel(gateways: &[&Gateway], secrets: &[String], hold: &Semaphore, s: &Counting) {
    let task = {
        let (url, client, secret) =
            (gateways[0].endpoint("/v1/images/generations"), gateways[0].client.clone(), secrets[0].clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(secret)
                .json(&json!({"model": "m", "prompt": "p"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    wait_until("the first call at the upstream", || s.active.load(Ordering::SeqCst) == 1).await;
    let last = gateways.len() - 1;
    let (status, headers, body) = keyed_call(gateways[last], &secrets[last]).await;
    assert_eq!(status, 429, "max_parallel 1: {body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(headers.contains_key("retry-after"));
    hold.add_permits(1);
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, task).await.unwrap().unwrap().unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_hold_in_process() {
    let (up, _) = upstream(Duration::ZERO, None).await;
    let gw = spawn_gateway_env(&keyed(&up, "{requests_per_minute: 3}", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, "alice").await;
    assert_rpm(&[&gw], &[secret]).await;
    let other = key(&gw, "bob").await;
    assert_eq!(keyed_call(&gw, &other).await.0, 200, "limits are per key");

    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let gw = spawn_gateway_env(&keyed(&up, "{max_parallel: 1}", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, "alice").await;
    assert_parallel(&[&gw], &[secret], &hold, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_hold_across_instances_with_redis() {
    let redis = Redis::start();
    let cluster = format!("cluster: {{redis: '{}'}}", redis.url);
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (up, _) = upstream(Duration::ZERO, None).await;
    let yaml = keyed(&up, "{requests_per_minute: 3}", &cluster);
    let (a, b) = (spawn_gateway_env(&yaml, &env).await, spawn_gateway_env(&yaml, &env).await);
    // Each instance has its own key store here; the limits follow the key's name.
    let secrets = vec![key(&a, "alice").await, key(&b, "alice").await];
    assert_rpm(&[&a, &b], &secrets).await;

    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let yaml = keyed(&up, "{max_parallel: 1}", &cluster);
    let (a, b) = (spawn_gateway_env(&yaml, &env).await, spawn_gateway_env(&yaml, &env).await);
    let secrets = vec![key(&a, "carol").await, key(&b, "carol").await];
    assert_parallel(&[&a, &b], &secrets, &hold, &s).await;
}

async fn key_with(gw: &Gateway, body: serde_json::Value) -> (String, serde_json::Value) {
    let resp = gw.client.post(gw.endpoint("/v1/admin/keys")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let v: serde_json::Value = resp.json().await.unwrap();
    (v["secret"].as_str().unwrap().to_owned(), v["limits"].clone())
}

async fn set_limits(gw: &Gateway, key: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = gw
        .client
        .post(gw.endpoint(&format!("/v1/admin/keys/{key}/limits")))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_own_limits_override_the_default_in_process() {
    let (up, _) = upstream(Duration::ZERO, None).await;
    let gw = spawn_gateway_env(&keyed(&up, "{requests_per_minute: 1}", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (secret, limits) = key_with(&gw, json!({"name": "alice", "requests_per_minute": 3})).await;
    assert_eq!(limits, json!({"requests_per_minute": 3, "max_parallel": null}));
    assert_rpm(&[&gw], &[secret]).await;

    // A key on the default gets one; raised through the admin API, it gets three more this minute.
    let (plain, _) = key_with(&gw, json!({"name": "bob"})).await;
    assert_eq!(keyed_call(&gw, &plain).await.0, 200);
    let (status, _, body) = keyed_call(&gw, &plain).await;
    assert_eq!(status, 429);
    assert!(body["error"]["message"].as_str().unwrap().contains("auth.key_limits"), "{body}");
    for bad in [json!({"requests_per_minute": 0}), json!({"max_parallel": "lots"}), json!({}), json!({"rpm": 3})] {
        let (status, body) = set_limits(&gw, "bob", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let (status, body) = set_limits(&gw, "bob", json!({"requests_per_minute": "unlimited"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["limits"], json!({"requests_per_minute": "unlimited", "max_parallel": null}));
    let (status, headers, body) = keyed_call(&gw, &plain).await;
    assert_eq!(status, 200, "unlimited now: {body}");
    assert!(headers.get("x-ratelimit-limit-requests").is_none(), "no rate limit, no rate headers");
    let listed: serde_json::Value =
        gw.client.get(gw.endpoint("/v1/admin/keys")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let bob = listed["data"].as_array().unwrap().iter().find(|k| k["name"] == "bob").unwrap().clone();
    assert_eq!(bob["limits"]["requests_per_minute"], "unlimited");
    assert_eq!(set_limits(&gw, "nobody", json!({"max_parallel": 1})).await.0, 404);

    // No default at all: a key's own max_parallel still holds.
    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let gw = spawn_gateway_env(
        &format!("auth: {{mode: keys}}\n{}", config(&up, 8, 16, "20s", "")),
        &[("EASEL_ADMIN_TOKEN", ADMIN)],
    )
    .await;
    let (secret, _) = key_with(&gw, json!({"name": "carol", "max_parallel": 1})).await;
    assert_parallel(&[&gw], &[secret], &hold, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_own_limits_hold_across_instances_with_redis() {
    let redis = Redis::start();
    let cluster = format!("cluster: {{redis: '{}'}}", redis.url);
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (up, _) = upstream(Duration::ZERO, None).await;
    let yaml = keyed(&up, "{requests_per_minute: 1}", &cluster);
    let (a, b) = (spawn_gateway_env(&yaml, &env).await, spawn_gateway_env(&yaml, &env).await);
    let body = json!({"name": "alice", "requests_per_minute": 3});
    let secrets = vec![key_with(&a, body.clone()).await.0, key_with(&b, body).await.0];
    assert_rpm(&[&a, &b], &secrets).await;

    let hold = Arc::new(Semaphore::new(0));
    let (up, s) = upstream(Duration::ZERO, Some(Arc::clone(&hold))).await;
    let yaml = keyed(&up, "{max_parallel: 5}", &cluster);
    let (a, b) = (spawn_gateway_env(&yaml, &env).await, spawn_gateway_env(&yaml, &env).await);
    let secrets = vec![key(&a, "carol").await, key(&b, "carol").await];
    for gw in [&a, &b] {
        assert_eq!(set_limits(gw, "carol", json!({"max_parallel": 1})).await.0, 200);
    }
    assert_parallel(&[&a, &b], &secrets, &hold, &s).await;
}
