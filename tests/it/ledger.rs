//! API keys and credits end to end (SQLite, nothing mocked below the store): concurrency against a balance,
//! partial capture, a refund on every failure path, Idempotency-Key replay and mismatch, 401/403/402, and a real
//! binary killed with SIGKILL while holding credits.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway_env, start_binary};

const ADMIN: &str = "admin-secret";

fn config(extra_backends: &str, extra_models: &str) -> String {
    format!(
        "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    latency: 50ms\n    concurrency: {{images: 256}}\n    queue: {{depth: 512, wait: 30s}}\n{extra_backends}models:\n  - id: m\n    backends: [sim]\n    credits: 1\n    default_size: 16x16\n  - id: pricey\n    backends: [sim]\n    credits: 2.5\n    default_size: 16x16\n{extra_models}"
    )
}

async fn gateway(yaml: &str) -> Gateway {
    spawn_gateway_env(yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await
}

/// Creates a key through the admin API and returns its secret.
async fn key(gw: &Gateway, name: &str, credits: f64, models: Option<&[&str]>) -> String {
    let resp = gw
        .client
        .post(gw.endpoint("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "credits": credits, "models": models}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<serde_json::Value>().await.unwrap()["secret"].as_str().unwrap().to_owned()
}

async fn generate(
    gw: &Gateway,
    secret: &str,
    body: serde_json::Value,
    idem: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let mut req = gw.client.post(gw.endpoint("/v1/images/generations")).bearer_auth(secret).json(&body);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap())
}

async fn me(gw: &Gateway, secret: &str) -> serde_json::Value {
    gw.client.get(gw.endpoint("/v1/me")).bearer_auth(secret).send().await.unwrap().json().await.unwrap()
}

async fn assert_clean(gw: &Gateway) {
    let resp = gw.client.get(gw.endpoint("/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "ledger drift: {body}");
}

fn available(me: &serde_json::Value) -> i64 {
    me["credits"]["available_mc"].as_i64().unwrap()
}

#[tokio::test]
async fn two_hundred_concurrent_requests_against_a_hundred_credits() {
    let gw = gateway(&config("", "")).await;
    let secret = key(&gw, "burst", 100.0, None).await;
    let results =
        futures_util::future::join_all((0..200).map(|_| {
            generate(&gw, &secret, json!({"model": "m", "prompt": "p", "response_format": "b64_json"}), None)
        }))
        .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let poor = results.iter().filter(|r| r.0 == 402).count();
    assert_eq!((ok, poor), (100, 100), "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    let denied = results.iter().find(|r| r.0 == 402).unwrap();
    assert_eq!(denied.2["error"]["code"], "insufficient_credits");
    let m = me(&gw, &secret).await;
    assert_eq!((available(&m), m["credits"]["held_mc"].as_i64().unwrap()), (0, 0));
    assert_clean(&gw).await;
    let usage: serde_json::Value =
        gw.client.get(gw.endpoint("/v1/usage")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["data"][0]["images"], 100);
    assert_eq!(usage["data"][0]["credits"], "100");
}

#[tokio::test]
async fn a_partial_result_is_charged_partially() {
    let backends = "  half:\n    kind: simulated\n    max_images_per_call: 1\n    failure: {status: 500, every: 2}\n";
    let models = "  - id: flaky\n    backends: [half]\n    credits: 10\n    default_size: 16x16\n";
    let gw = gateway(&config(backends, models)).await;
    let secret = key(&gw, "partial", 100.0, None).await;
    let (s, _, body) =
        generate(&gw, &secret, json!({"model": "flaky", "prompt": "p", "n": 4, "response_format": "b64_json"}), None)
            .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "every second call fails: 2 of 4 made");
    assert_eq!(available(&me(&gw, &secret).await), 80_000, "4 asked, 2 produced → 2 charged");
    assert_clean(&gw).await;
}

#[tokio::test]
async fn every_failure_path_refunds() {
    let backends = "  broken:\n    kind: simulated\n    failure: {status: 500}\n  hung:\n    kind: simulated\n    timeout: 200ms\n    failure: {mode: timeout}\n  slow:\n    kind: simulated\n    latency: 3s\n    concurrency: {images: 1}\n    queue: {depth: 0, wait: 1s}\n";
    let models = "  - {id: broken, backends: [broken], credits: 5}\n  - {id: hung, backends: [hung], credits: 5}\n  - {id: slow, backends: [slow], credits: 5, default_size: 16x16}\n";
    let gw = gateway(&config(backends, models)).await;
    let secret = key(&gw, "refunds", 100.0, None).await;
    let (s, _, _) = generate(&gw, &secret, json!({"model": "broken", "prompt": "p"}), None).await;
    assert_eq!(s, 502);
    let (s, _, _) = generate(&gw, &secret, json!({"model": "hung", "prompt": "p"}), None).await;
    assert_eq!(s, 504);
    assert_eq!(available(&me(&gw, &secret).await), 100_000, "backend error and timeout refunded");

    // Occupy the slow backend, then a second request is turned away by admission after its hold: refunded.
    let occupy = tokio::spawn({
        let (url, client, secret) = (gw.endpoint("/v1/images/generations"), gw.client.clone(), secret.clone());
        async move {
            client
                .post(url)
                .bearer_auth(secret)
                .json(&json!({"model": "slow", "prompt": "p"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let deadline = Instant::now() + TEST_TIMEOUT;
    while me(&gw, &secret).await["credits"]["held_mc"] != 5000 {
        assert!(Instant::now() < deadline, "the first request never held credits");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, _, body) = generate(&gw, &secret, json!({"model": "slow", "prompt": "p"}), None).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(me(&gw, &secret).await["credits"]["held_mc"], 5000, "the 429 released its own hold");
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, occupy).await.unwrap().unwrap().unwrap(), 200);
    assert_eq!(available(&me(&gw, &secret).await), 95_000);

    // A client that goes away mid-generation is not charged.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let r = impatient
        .post(gw.endpoint("/v1/images/generations"))
        .bearer_auth(&secret)
        .json(&json!({"model": "slow", "prompt": "p"}))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let m = me(&gw, &secret).await;
        if m["credits"]["held_mc"] == 0 {
            assert_eq!(available(&m), 95_000, "client gone → released");
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned hold was never settled: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_clean(&gw).await;
}

#[tokio::test]
async fn idempotency_keys_replay_once_and_refuse_a_different_body() {
    let gw = gateway(&config("", "")).await;
    let secret = key(&gw, "idem", 10.0, None).await;
    let body = json!({"model": "pricey", "prompt": "p", "response_format": "b64_json", "seed": 1});
    let (s, h, first) = generate(&gw, &secret, body.clone(), Some("order-1")).await;
    assert_eq!(s, 200, "{first}");
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, again) = generate(&gw, &secret, body.clone(), Some("order-1")).await;
    assert_eq!(s, 200);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(first, again, "the same body is replayed");
    assert_eq!(available(&me(&gw, &secret).await), 7_500, "charged once");

    // The same fields as multipart: the same fingerprint, so a replay.
    let form = reqwest::multipart::Form::new()
        .text("model", "pricey")
        .text("prompt", "p")
        .text("response_format", "b64_json")
        .text("seed", "1");
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .bearer_auth(&secret)
        .header("Idempotency-Key", "order-1")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["idempotent-replayed"], "true");

    let (s, _, err) = generate(&gw, &secret, json!({"model": "pricey", "prompt": "other"}), Some("order-1")).await;
    assert_eq!(s, 422, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_mismatch");
    let (s, _, err) = generate(&gw, &secret, body.clone(), Some(&"k".repeat(256))).await;
    assert_eq!(s, 400, "{err}");
    assert_eq!(err["error"]["code"], "invalid_idempotency_key");

    // A refused request (402) leaves no record: after a top-up the same key runs.
    let (s, _, err) = generate(&gw, &secret, json!({"model": "pricey", "prompt": "p", "n": 4}), Some("order-2")).await;
    assert_eq!(s, 402, "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("balance is 7.5 credits") && msg.contains("costs 10 (4 × 2.5 credits)"), "{msg}");
    let topped = gw
        .client
        .post(gw.endpoint("/v1/admin/keys/idem/credits"))
        .bearer_auth(ADMIN)
        .json(&json!({"credits": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(topped.status(), 200);
    let (s, _, _) = generate(&gw, &secret, json!({"model": "pricey", "prompt": "p", "n": 4}), Some("order-2")).await;
    assert_eq!(s, 200);
    assert_eq!(available(&me(&gw, &secret).await), 7_500);
    assert_clean(&gw).await;
}

#[tokio::test]
async fn concurrent_duplicates_run_once() {
    let slow = "  slowish:\n    kind: simulated\n    latency: 400ms\n";
    let gw = gateway(&config(slow, "  - {id: s, backends: [slowish], credits: 1, default_size: 16x16}\n")).await;
    let secret = key(&gw, "dup", 100.0, None).await;
    let body = json!({"model": "s", "prompt": "p", "response_format": "b64_json"});
    let results =
        futures_util::future::join_all((0..10).map(|_| generate(&gw, &secret, body.clone(), Some("same")))).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 409).collect();
    assert_eq!(ok + busy.len(), 10, "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(ok >= 1);
    for b in &busy {
        assert_eq!(b.2["error"]["code"], "idempotency_in_progress");
        assert_eq!(b.1["retry-after"], "1");
    }
    assert_eq!(available(&me(&gw, &secret).await), 99_000, "executed and charged once");
}

#[tokio::test]
async fn keys_are_required_and_scoped() {
    let gw = gateway(&config("", "")).await;
    let (s, h, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(body["error"]["message"].as_str().unwrap().contains("Authorization: Bearer"));
    let (s, _, body) = generate(&gw, "sk-easel-not-a-key", json!({"model": "m", "prompt": "p"}), None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (401, Some("invalid_api_key")));

    let limited = key(&gw, "limited", 5.0, Some(&["m"])).await;
    let (s, _, body) = generate(&gw, &limited, json!({"model": "pricey", "prompt": "p"}), None).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert!(body["error"]["message"].as_str().unwrap().contains("`limited` may not use model `pricey`"));
    let m = me(&gw, &limited).await;
    assert_eq!(m["name"], "limited");
    assert_eq!(m["allowed_models"], json!(["m"]));
    assert_eq!(m["credits"]["available"], "5");

    // Health stays public; the status page and admin API need the admin token.
    assert_eq!(gw.get("/healthz").await.0, 200);
    assert_eq!(gw.get("/metrics").await.0, 200);
    assert_eq!(gw.get("/v1/gateway/status").await.0, 401);
    assert_eq!(gw.client.get(gw.endpoint("/v1/admin/keys")).bearer_auth(&limited).send().await.unwrap().status(), 401);

    // A revoked key stops working at once.
    let r = gw.client.delete(gw.endpoint("/v1/admin/keys/limited")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (s, _, _) = generate(&gw, &limited, json!({"model": "m", "prompt": "p"}), None).await;
    assert_eq!(s, 401);
    let (_, _, models) = gw.get("/v1/models").await;
    let _ = models;
}

const BIN: &str = env!("CARGO_BIN_EXE_easel");

#[tokio::test]
async fn sigkill_while_holding_credits_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("easel.yaml"),
        "auth: {mode: keys}\nbackends:\n  slow: {kind: simulated, latency: 60s}\nmodels:\n  - {id: m, backends: [slow], credits: 3, default_size: 16x16}\n",
    )
    .unwrap();
    // The key is made with the CLI while nothing runs, then the server starts on the same database.
    let out = Command::new(BIN)
        .args(["keys", "create", "--name", "crash", "--credits", "10"])
        .current_dir(dir.path())
        .env_remove("EASEL_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().to_owned();
    assert!(secret.starts_with("sk-easel-"));

    let (mut child, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let client = reqwest::Client::new();
    let pending = tokio::spawn({
        let (client, url, secret) = (client.clone(), url.clone(), secret.clone());
        async move {
            client
                .post(format!("{url}/v1/images/generations"))
                .bearer_auth(secret)
                .json(&json!({"model": "m", "prompt": "p", "n": 2}))
                .send()
                .await
        }
    });
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let m: serde_json::Value =
            client.get(format!("{url}/v1/me")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
        if m["credits"]["held_mc"] == 6000 {
            break;
        }
        assert!(Instant::now() < deadline, "no hold appeared: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // CLI beside the running server: grant works on the same database.
    let out = Command::new(BIN)
        .args(["credits", "grant", "crash", "1"])
        .current_dir(dir.path())
        .env_remove("EASEL_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    assert!(
        tokio::time::timeout(TEST_TIMEOUT, pending).await.unwrap().unwrap().is_err(),
        "the connection died with the server"
    );

    let (mut child, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let m: serde_json::Value =
        client.get(format!("{url}/v1/me")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["credits"]["held_mc"], 0, "{m}");
    assert_eq!(m["credits"]["available_mc"], 11_000, "10 + 1 granted, nothing lost: {m}");
    let out = Command::new(BIN)
        .args(["ledger", "check"])
        .current_dir(dir.path())
        .env_remove("EASEL_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out =
        Command::new(BIN).args(["keys", "list"]).current_dir(dir.path()).env_remove("EASEL_CONFIG").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("crash"));
    child.kill().unwrap();
    let _ = child.wait();
}
