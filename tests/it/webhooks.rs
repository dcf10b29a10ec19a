//! Client webhooks for video jobs: one signed delivery per terminal job (Standard Webhooks headers, verified here
//! with the configured secret), retries with backoff after failures, `video.failed` for failed and canceled jobs,
//! bad targets refused before any hold, and a delivery that survives a SIGKILL of the gateway.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::support::books::{ADMIN, credits, key, key_at, ledger_clean};
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway_env, start_binary};

const SECRET: &str = "a-test-webhook-secret-of-some-length";

fn config(allow_private: bool, extra: &str) -> String {
    format!(
        "auth:\n  mode: keys\njobs:\n  webhooks:\n    secret: {SECRET}\n    allow_private: {allow_private}\n    backoff: 50ms\n{extra}backends:\n  sim:\n    kind: simulated\n    latency: 100ms\n    poll_interval: 20ms\n  bad:\n    kind: simulated\n    latency: 50ms\n    poll_interval: 20ms\n    failure: {{status: 500, message: \"render node crashed\", every: 1}}\nmodels:\n  - id: clip\n    type: video\n    backends: [sim]\n    credits: 30\n    default_size: 32x32\n  - id: broken\n    type: video\n    backends: [bad]\n    credits: 10\n"
    )
}

/// What a receiver answers to one request.
#[derive(Clone, Copy)]
enum Reply {
    Status(u16),
    /// Never answers (the sender's attempt stays in flight).
    Hang,
}

/// One request the receiver got.
#[derive(Debug)]
struct Hit {
    headers: HeaderMap,
    body: String,
}

/// A webhook receiver on 127.0.0.1:0: answers from its script, then 200; every request goes to `hits`.
struct Receiver {
    url: String,
    hits: mpsc::UnboundedReceiver<Hit>,
}

async fn receiver(script: &[Reply]) -> Receiver {
    let (tx, hits) = mpsc::unbounded_channel();
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script.to_vec())));
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
        let (tx, script) = (tx.clone(), Arc::clone(&script));
        async move {
            let reply = script.lock().unwrap().pop_front().unwrap_or(Reply::Status(200));
            tx.send(Hit { headers, body }).unwrap();
            match reply {
                Reply::Status(s) => (StatusCode::from_u16(s).unwrap(), "ok"),
                Reply::Hang => std::future::pending().await,
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/easel", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, hits }
}

impl Receiver {
    async fn next(&mut self) -> Hit {
        tokio::time::timeout(TEST_TIMEOUT, self.hits.recv()).await.expect("no webhook arrived").unwrap()
    }
}

/// HMAC-SHA256, written out here so the check does not reuse easel's code.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// Checks the Standard Webhooks headers and signature; returns the parsed event.
fn verified(hit: &Hit) -> Value {
    let h = |n: &str| hit.headers.get(n).unwrap_or_else(|| panic!("no {n} header")).to_str().unwrap().to_owned();
    assert_eq!(h("content-type"), "application/json");
    let (id, ts) = (h("webhook-id"), h("webhook-timestamp"));
    let ts_n: i64 = ts.parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - ts_n).abs() < 300, "timestamp {ts} is not now");
    let mac = hmac_sha256(SECRET.as_bytes(), format!("{id}.{ts}.{}", hit.body).as_bytes());
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac));
    assert_eq!(h("webhook-signature"), expected, "the signature verifies with the configured secret");
    assert!(hit.headers.get("authorization").is_none(), "no credentials are sent");
    let event: Value = serde_json::from_str(&hit.body).unwrap();
    assert_eq!(event["id"], id.as_str(), "the body's id is the webhook-id");
    event
}

async fn create(gw: &Gateway, secret: &str, body: Value) -> (u16, Value) {
    let resp = gw.client.post(gw.endpoint("/v1/videos")).bearer_auth(secret).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn a_finished_video_is_delivered_once_signed() {
    let mut hook = receiver(&[]).await;
    let gw = spawn_gateway_env(&config(true, ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let (status, v) =
        create(&gw, &secret, json!({"model": "clip", "prompt": "a fox", "seconds": "1", "webhook_url": hook.url}))
            .await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();

    let event = verified(&hook.next().await);
    assert_eq!(event["type"], "video.completed", "{event}");
    assert!(event["id"].as_str().unwrap().starts_with("evt_"), "{event}");
    assert!(event["created_at"].as_i64().unwrap() > 0);
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(
        (event["data"]["object"].as_str(), event["data"]["status"].as_str()),
        (Some("video"), Some("completed"))
    );
    assert_eq!(event["data"]["progress"], 100);
    let job: Value = gw
        .client
        .get(gw.endpoint(&format!("/v1/videos/{id}")))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(event["data"], job, "the event carries the video object the API shows");

    // A second job's event comes next: the first was not sent again meanwhile.
    let (_, second) =
        create(&gw, &secret, json!({"model": "clip", "prompt": "b", "seconds": "1", "webhook_url": hook.url})).await;
    let next = verified(&hook.next().await);
    assert_eq!(next["data"]["id"], second["id"], "{next}");
    assert_ne!(next["id"], event["id"]);
    assert!(hook.hits.try_recv().is_err(), "one delivery per job");
    assert_eq!(credits(&gw, &secret).await, (40_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn a_failing_receiver_gets_the_event_on_the_third_attempt() {
    let mut hook = receiver(&[Reply::Status(500), Reply::Status(503)]).await;
    let gw = spawn_gateway_env(&config(true, ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let (status, v) = create(&gw, &secret, json!({"model": "clip", "prompt": "p", "webhook_url": hook.url})).await;
    assert_eq!(status, 200, "{v}");
    let attempts = [verified(&hook.next().await), verified(&hook.next().await), verified(&hook.next().await)];
    for a in &attempts {
        assert_eq!(a["id"], attempts[0]["id"], "every attempt is the same event");
        assert_eq!(a["type"], "video.completed");
    }
    // The failures and the delivery are counted (the receiver answers before easel records the outcome, so
    // this follows the metrics until they agree, within the test timeout; other tests share the counters).
    let count = |text: &str, outcome: &str| -> u64 {
        let line = format!("easel_webhooks_total{{outcome=\"{outcome}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).map_or(0, |v| v.trim().parse().unwrap())
    };
    let settled = async {
        loop {
            let text = gw.client.get(gw.endpoint("/metrics")).send().await.unwrap().text().await.unwrap();
            if count(&text, "retry") >= 2 && count(&text, "delivered") >= 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(TEST_TIMEOUT, settled).await.expect("the attempts were never counted");
}

#[tokio::test]
async fn failed_and_canceled_jobs_send_failed_events() {
    let mut hook = receiver(&[]).await;
    let slow = "  - id: slow\n    type: video\n    backends: [slow]\n    credits: 10\n";
    let yaml = config(true, "").replace("models:\n", &format!("models:\n{slow}")).replace(
        "backends:\n  sim:",
        "backends:\n  slow:\n    kind: simulated\n    latency: 30s\n    poll_interval: 20ms\n  sim:",
    );
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;

    let (_, v) = create(&gw, &secret, json!({"model": "broken", "prompt": "p", "webhook_url": hook.url})).await;
    let event = verified(&hook.next().await);
    assert_eq!(event["type"], "video.failed", "{event}");
    assert_eq!(event["data"]["id"], v["id"]);
    assert_eq!(event["data"]["status"], "failed");
    assert_eq!(event["data"]["error"]["code"], "upstream_failed");
    assert!(event["data"]["error"]["message"].as_str().unwrap().contains("render node crashed"), "{event}");

    let (_, v) = create(&gw, &secret, json!({"model": "slow", "prompt": "p", "webhook_url": hook.url})).await;
    let id = v["id"].as_str().unwrap();
    let resp = gw.client.post(gw.endpoint(&format!("/v1/videos/{id}/cancel"))).bearer_auth(&secret).send().await;
    assert_eq!(resp.unwrap().status(), 200);
    let event = verified(&hook.next().await);
    assert_eq!(event["type"], "video.failed", "{event}");
    assert_eq!(event["data"]["id"], id);
    assert_eq!(event["data"]["error"]["code"], "canceled");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "nothing made, nothing charged");
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn bad_webhook_urls_are_refused_before_any_hold() {
    let gw = spawn_gateway_env(&config(false, ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let long = format!("https://hooks.example.com/{}", "a".repeat(2048));
    for (url, says) in [
        ("not a url", "absolute http(s) URL"),
        ("/relative/path", "absolute http(s) URL"),
        ("ftp://hooks.example.com/x", "http or https"),
        ("https://user:pw@hooks.example.com/x", "user name or password"),
        ("http://127.0.0.1:9/x", "allow_private"),
        ("http://localhost/x", "allow_private"),
        ("http://10.0.0.7/x", "allow_private"),
        ("http://169.254.169.254/latest/meta-data", "allow_private"),
        ("http://[::1]/x", "allow_private"),
        (long.as_str(), "at most 2048"),
    ] {
        let (status, body) = create(&gw, &secret, json!({"model": "clip", "prompt": "p", "webhook_url": url})).await;
        assert_eq!(status, 400, "{url}: {body}");
        let e = &body["error"];
        assert_eq!((e["type"].as_str(), e["param"].as_str()), (Some("invalid_request_error"), Some("webhook_url")));
        assert!(e["message"].as_str().unwrap().contains(says), "{url}: {body}");
        assert!(e.as_object().unwrap().contains_key("code"), "{body}");
    }
    let (status, body) = create(&gw, &secret, json!({"model": "clip", "prompt": "p", "webhook_url": 5})).await;
    assert_eq!(status, 400, "{body}");

    // Multipart, as the SDKs send `extra_body` fields with a file.
    let form = reqwest::multipart::Form::new()
        .text("model", "clip")
        .text("prompt", "p")
        .text("webhook_url", "http://192.168.1.1/hook");
    let resp = gw.client.post(gw.endpoint("/v1/videos")).bearer_auth(&secret).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "webhook_url", "{body}");

    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "nothing was held");
    let list: Value =
        gw.client.get(gw.endpoint("/v1/videos")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "no job was made: {list}");
    ledger_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_the_terminal_commit_and_the_delivery_still_delivers() {
    // The first attempt never gets an answer: easel is killed while it is in flight, after the job ended.
    let mut hook = receiver(&[Reply::Hang]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), config(true, "")).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (mut child, url) = start_binary(dir.path(), &env);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 100.0).await;
    let job: Value = client
        .post(format!("{url}/v1/videos"))
        .bearer_auth(&secret)
        .json(&json!({"model": "clip", "prompt": "p", "seconds": "1", "webhook_url": hook.url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = verified(&hook.next().await);
    assert_eq!(first["data"]["id"], job["id"]);
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, _url) = start_binary(dir.path(), &env);
    let again = verified(&hook.next().await);
    assert_eq!(again["id"], first["id"], "the same event, from the outbox");
    assert_eq!(again["type"], "video.completed");
    assert_eq!(again, first);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn an_image_job_sends_job_completed_and_a_synchronous_request_cannot_ask_for_a_webhook() {
    let mut hook = receiver(&[]).await;
    let yaml = config(true, "") + "  - id: pic\n    backends: [sim]\n    credits: 1\n";
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;
    let body = json!({"model": "pic", "prompt": "p", "webhook_url": hook.url});
    // Without `Prefer: respond-async` there is no job to report on: 400, nothing held.
    let resp = gw.client.post(gw.endpoint("/v1/images/generations")).bearer_auth(&secret).json(&body).send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["param"], "webhook_url");
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .bearer_auth(&secret)
        .header("Prefer", "respond-async")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let event = verified(&hook.next().await);
    assert_eq!(event["type"], "job.completed", "{event}");
    assert_eq!((event["data"]["id"].as_str(), event["data"]["object"].as_str()), (Some(id.as_str()), Some("job")));
    assert_eq!(credits(&gw, &secret).await, (9_000, 0));
    ledger_clean(&gw).await;
}
