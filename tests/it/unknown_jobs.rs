//! Video submits that got no usable answer (the backend may have the job): the job waits as `unknown`, held and
//! uncharged, with no fallback to another backend; the backend's signed webhook binds it to the upstream job,
//! which is then polled and charged once; without a report it is released at its deadline; forged or late
//! deliveries change nothing. Also a real binary killed while a fal submit is in flight.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, credits_at, key, key_at, ledger_clean, ledger_clean_at};
use crate::support::{TEST_TIMEOUT, spawn_gateway_env, start_binary};
use crate::videos::{call, until_done};

fn fal_config(fal: &str, fal2: &str, public_url: &str, job_timeout: &str) -> String {
    format!(
        "auth:\n  mode: keys\nserver:\n  public_url: {public_url}\nbackends:\n  fal:\n    kind: fal\n    url: {fal}\n    api_key: {key}\n    timeout: 500ms\n    poll_interval: 20ms\n  fal2:\n    kind: fal\n    url: {fal2}\n    api_key: {key}\n    poll_interval: 20ms\nmodels:\n  - id: kling\n    type: video\n    backends: [fal, fal2]\n    upstream_model: fal-ai/kling-video/v2/master/text-to-video\n    credits_per_second: 10\n    job_timeout: {job_timeout}\n",
        key = crate::support::fal::KEY
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_fal_submit_waits_unknown_until_its_signed_webhook_binds_it_and_is_charged_once() {
    let (fal, fal2) = (crate::support::fal::start().await, crate::support::fal::start().await);
    // fal records the job, then answers after easel's 500 ms timeout; the job runs until the test finishes it.
    fal.state.video.submit_stall_ms.store(3_000, Ordering::SeqCst);
    fal.state.video.queued_polls.store(1_000_000, Ordering::SeqCst);
    let gw =
        spawn_gateway_env(&fal_config(&fal.url, &fal2.url, "@GATEWAY@", "10m"), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let body = json!({"model": "kling", "prompt": "a fox", "seconds": "5"});
    let (status, v) = call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(body)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "in_progress", "an unknown job is still in progress to its owner: {v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(credits(&gw, &secret).await, (50_000, 50_000), "held, not charged");
    assert!(fal2.state.video.submitted.lock().unwrap().is_empty(), "no fallback after a submit that may have landed");

    // The submit carried easel's signed hook URL for this backend and job.
    let hook = fal.state.video.webhooks.lock().unwrap()[0].1.clone();
    let prefix = format!("{}/v1/hooks/fal/{id}?sig=", gw.url);
    assert!(hook.starts_with(&prefix), "{hook}");

    // Forged deliveries: no key is needed, but the signature must be easel's for this backend and job.
    let fal_body = |rid: &str| json!({"request_id": rid, "status": "OK", "payload": {}});
    for url in [
        format!("{}/v1/hooks/fal/{id}?sig=00", gw.url),
        format!("{}/v1/hooks/fal/{id}", gw.url),
        hook.replace("/hooks/fal/", "/hooks/fal2/"),
    ] {
        let resp = gw.client.post(&url).json(&fal_body("vid-1")).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{url}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(
            (e["error"]["type"].as_str(), e["error"]["code"].as_str()),
            (Some("permission_error"), Some("invalid_signature")),
            "{e}"
        );
    }
    // A signed delivery whose body names no usable id changes nothing either.
    for bad in [json!({"request_id": "../../admin"}), json!({"status": "OK"}), json!("nonsense")] {
        let resp = gw.client.post(&hook).json(&bad).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let (_, now) = call(&gw, reqwest::Method::GET, &format!("/v1/videos/{id}"), &secret, None).await;
    assert_eq!(now["status"], "in_progress", "{now}");

    // fal finishes the job and reports it: easel binds the job and polls fal for the truth.
    let answers = fal.state.video.finish_and_notify(fal_body).await;
    assert_eq!(answers.len(), 1);
    assert_eq!((answers[0].0, answers[0].1["outcome"].as_str()), (200, Some("adopted")), "{answers:?}");
    let (done, _) = until_done(&gw, &secret, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(credits(&gw, &secret).await, (50_000, 0), "captured once");
    // fal retries deliveries: a repeat is answered and changes nothing.
    let again = fal.state.video.finish_and_notify(fal_body).await;
    assert_eq!((again[0].0, again[0].1["outcome"].as_str()), (200, Some("ended")), "{again:?}");
    assert_eq!(credits(&gw, &secret).await, (50_000, 0));
    assert_eq!(fal.state.video.submitted.lock().unwrap().len(), 1, "submitted once");
    ledger_clean(&gw).await;
    let metrics = gw.client.get(gw.endpoint("/metrics")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("easel_jobs_unknown_total{model=\"kling\"} 1"), "{metrics}");
    assert!(metrics.contains("easel_job_webhooks_received_total{backend=\"fal\",outcome=\"adopted\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_replicate_job_nobody_reports_is_released_at_its_deadline_and_a_late_report_changes_nothing() {
    let rep = crate::support::replicate::start().await;
    rep.state.video.submit_stall_ms.store(3_000, Ordering::SeqCst);
    rep.state.video.queued_polls.store(1_000_000, Ordering::SeqCst);
    let yaml = format!(
        "auth:\n  mode: keys\nserver:\n  public_url: @GATEWAY@\nbackends:\n  rep:\n    kind: replicate\n    url: {}\n    api_key: {}\n    timeout: 500ms\n    poll_interval: 20ms\nmodels:\n  - id: hailuo\n    type: video\n    backends: [rep]\n    upstream_model: minimax/video-01\n    credits: 40\n    job_timeout: 1500ms\n",
        rep.url,
        crate::support::replicate::TOKEN
    );
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let body = json!({"model": "hailuo", "prompt": "waves"});
    let (status, v) = call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(body)).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("in_progress")), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(credits(&gw, &secret).await, (60_000, 40_000));
    // Replicate's prediction carried the signed webhook, for its end only.
    let sent = rep.state.video.submitted.lock().unwrap()[0].clone();
    assert!(sent["webhook"].as_str().unwrap().starts_with(&format!("{}/v1/hooks/rep/{id}?sig=", gw.url)), "{sent}");
    assert_eq!(sent["webhook_events_filter"], json!(["completed"]));

    // Nobody reports it: at the deadline the job fails as lost and the hold is released.
    let (done, _) = until_done(&gw, &secret, &id).await;
    assert_eq!(
        (done["status"].as_str(), done["error"]["code"].as_str()),
        (Some("failed"), Some("upstream_lost")),
        "{done}"
    );
    assert!(done["error"]["message"].as_str().unwrap().contains("nothing was charged"), "{done}");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "released");

    // Replicate reports it after all: the job has ended, so nothing changes.
    let s = rep.state.clone();
    let answers = rep
        .state
        .video
        .finish_and_notify(|pid| {
            crate::support::replicate::video_prediction(&s, pid, &crate::support::fal::VideoPhase::Done)
        })
        .await;
    assert_eq!((answers[0].0, answers[0].1["outcome"].as_str()), (200, Some("ended")), "{answers:?}");
    let (_, after) = call(&gw, reqwest::Method::GET, &format!("/v1/videos/{id}"), &secret, None).await;
    assert_eq!(after["status"], "failed", "{after}");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_fal_submit_leaves_the_job_unknown_and_its_webhook_binds_it_after_the_restart() {
    let fal = crate::support::fal::start().await;
    fal.state.video.submit_stall_ms.store(60_000, Ordering::SeqCst);
    fal.state.video.queued_polls.store(1_000_000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // The address fal is given; the test delivers to wherever the restarted easel listens.
    let yaml = fal_config(&fal.url, "http://127.0.0.1:9", "http://gateway.invalid", "10m")
        .replace("    timeout: 500ms\n", "    timeout: 2m\n");
    std::fs::write(dir.path().join("easel.yaml"), yaml).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (mut child, url) = start_binary(dir.path(), &env);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 100.0).await;
    let create = client
        .post(format!("{url}/v1/videos"))
        .bearer_auth(&secret)
        .json(&json!({"model": "kling", "prompt": "p", "seconds": "5"}))
        .send();
    let pending = tokio::spawn(create);
    // Killed once fal holds the submit (and before it answers).
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    while fal.state.video.webhooks.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the submit never reached fal");
        tokio::task::yield_now().await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(pending.await.unwrap().is_err(), "the client lost its connection with the process");

    let (mut child, url) = start_binary(dir.path(), &env);
    let hook = fal.state.video.webhooks.lock().unwrap()[0].1.replace("http://gateway.invalid", &url);
    let id = hook.split("/v1/hooks/fal/").nth(1).and_then(|r| r.split('?').next()).unwrap().to_owned();
    // After the restart the job is unknown (fal cannot be asked by easel's id), held, in progress to its owner.
    let job = loop {
        // The metric first: once it counts the job, the job's state says unknown.
        let m = client.get(format!("{url}/metrics")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
        let j: Value = client
            .get(format!("{url}/v1/videos/{id}"))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if m.contains("easel_jobs_unknown_total{model=\"kling\"} 1") {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "the job never became unknown: {j}");
        tokio::task::yield_now().await;
    };
    assert_eq!(job["status"], "in_progress", "{job}");
    assert_eq!(credits_at(&url, &secret).await, (50_000, 50_000), "held, not charged");

    // fal finishes the job and reports it to the address easel now listens on.
    fal.state.video.queued_polls.store(0, Ordering::SeqCst);
    let resp = client.post(&hook).json(&json!({"request_id": "vid-1", "status": "OK"})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let stream = client.get(format!("{url}/v1/jobs/{id}/events")).bearer_auth(&secret).send();
    let text = tokio::time::timeout(TEST_TIMEOUT, async { stream.await.unwrap().text().await.unwrap() }).await.unwrap();
    assert!(text.contains("\"status\":\"completed\""), "{text}");
    assert_eq!(credits_at(&url, &secret).await, (50_000, 0), "captured once");
    ledger_clean_at(&url).await;
    child.kill().unwrap();
    child.wait().unwrap();
}
