//! Several instances: an async job on an instance killed with SIGKILL is adopted by another and charged once
//! (PostgreSQL), and SIGTERM drains (readyz 503, new requests 503 `draining`, the in-flight request and image job
//! finish, exit 0).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, credits_at, key_at, ledger_clean};
use crate::support::postgres::Postgres;
use crate::support::{TEST_TIMEOUT, spawn_gateway_env, start_binary};
use crate::videos::until_done;

const CONFIG: &str = "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    latency: 3s\n    poll_interval: 50ms\n  slow:\n    kind: simulated\n    latency: 3s\nmodels:\n  - {id: slow, backends: [slow], credits: 1, default_size: 16x16}\n  - {id: clip, type: video, backends: [sim], credits: 30, default_size: 64x36}\n";

async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// Waits (with a deadline) until `cond` holds for a fresh reading of `path` on `url`.
async fn until(url: &str, path: &str, what: &str, cond: impl Fn(u16, &Value) -> bool) -> Value {
    until_as(url, path, ADMIN, what, cond).await
}

/// [`until`] with `bearer` (a key's secret for its own jobs).
async fn until_as(url: &str, path: &str, bearer: &str, what: &str, cond: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let (s, _, v) = send(reqwest::Client::new().get(format!("{url}{path}")).bearer_auth(bearer)).await;
        if cond(s, &v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(ok.success(), "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_killed_instance_is_adopted_by_another_and_charged_once() {
    let pg = Postgres::start().await;
    let database = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), CONFIG).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN), ("EASEL_STORAGE__DATABASE", database.as_str())];
    let (mut a, a_url) = start_binary(dir.path(), &env);
    let secret = key_at(&a_url, 100.0).await;
    let body = json!({"model": "clip", "prompt": "a fox", "seconds": "2", "size": "64x36"});
    let (s, _, job) =
        send(reqwest::Client::new().post(format!("{a_url}/v1/videos")).bearer_auth(&secret).json(&body)).await;
    assert_eq!(s, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    // A polls it (it runs upstream), then dies without a word.
    until_as(&a_url, &format!("/v1/videos/{id}"), &secret, "A polling the job", |s, v| {
        s == 200 && v["status"] == "in_progress"
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();

    let b = spawn_gateway_env(CONFIG, &[("EASEL_ADMIN_TOKEN", ADMIN), ("EASEL_STORAGE__DATABASE", &database)]).await;
    let (done, _) = until_done(&b, &secret, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(credits(&b, &secret).await, (70_000, 0), "charged once, nothing left held");
    ledger_clean(&b).await;
    // B sees A gone and itself alive.
    let status = until(&b.url, "/v1/gateway/status", "the fleet view", |s, _| s == 200).await;
    let instances = status["fleet"]["instances"].as_array().cloned().unwrap_or_default();
    assert!(instances.iter().any(|i| i["alive"] == true && i["id"] == status["instance"]["id"]), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_refuses_new_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), format!("{CONFIG}server:\n  drain_timeout: 20s\n")).unwrap();
    let (mut child, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let secret = key_at(&url, 10.0).await;
    let image = json!({"model": "slow", "prompt": "p", "response_format": "b64_json"});
    let slow = tokio::spawn(send(
        reqwest::Client::new().post(format!("{url}/v1/images/generations")).bearer_auth(&secret).json(&image),
    ));
    until(&url, "/v1/gateway/status", "the slow request in flight", |_, v| v["instance"]["in_flight"] == 1).await;
    // An image job running in this process counts as work in flight too: the drain lets it finish.
    let (s, _, job) = send(
        reqwest::Client::new()
            .post(format!("{url}/v1/images/generations"))
            .bearer_auth(&secret)
            .header("Prefer", "respond-async")
            .json(&json!({"model": "slow", "prompt": "a job"})),
    )
    .await;
    assert_eq!(s, 202, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    until(&url, "/v1/gateway/status", "the job running here", |_, v| v["instance"]["in_flight"] == 2).await;

    signal(&child, "-TERM");
    let ready = until(&url, "/readyz", "readyz to turn 503", |s, _| s == 503).await;
    assert_eq!(ready["status"], "draining", "{ready}");
    let (s, h, err) =
        send(reqwest::Client::new().post(format!("{url}/v1/images/generations")).bearer_auth(&secret).json(&image))
            .await;
    assert_eq!((s, err["error"]["code"].as_str()), (503, Some("draining")), "{err}");
    assert!(h.get("retry-after").is_some(), "a load balancer is told to retry elsewhere");
    let (_, _, status) = send(reqwest::Client::new().get(format!("{url}/v1/gateway/status")).bearer_auth(ADMIN)).await;
    assert_eq!(status["instance"]["draining"], true, "{status}");

    let (s, _, body) = slow.await.unwrap();
    assert_eq!(s, 200, "the in-flight request finished: {body}");
    let deadline = Instant::now() + TEST_TIMEOUT;
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "easel did not exit after its drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code.code(), Some(0), "a drained stop exits 0");

    // The job ended before the exit (it was not abandoned to run again): the next instance on the same data
    // finds it completed at its first look, charged once.
    let (mut again, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let (s, _, done) = send(reqwest::Client::new().get(format!("{url}/v1/jobs/{job_id}")).bearer_auth(&secret)).await;
    assert_eq!((s, done["status"].as_str()), (200, Some("completed")), "{done}");
    assert_eq!(credits_at(&url, &secret).await, (8_000, 0), "the request and the job, each charged once");
    again.kill().unwrap();
    again.wait().unwrap();
}
