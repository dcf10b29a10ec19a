//! Video jobs end to end (OpenAI's Videos API) on the simulated backend: create → poll → download, the books
//! (held while running, captured once on success, released on failure, cancel and deadline), idempotent
//! creates, owners, pagination, bad inputs, and a real binary killed with SIGKILL mid-job.

use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, credits_at, key, key_at, ledger_clean, ledger_clean_at};
use crate::support::{Gateway, TEST_TIMEOUT, job_events, spawn_gateway, spawn_gateway_env, start_binary};

fn config(latency: &str, extra_backend: &str, extra_model: &str) -> String {
    format!(
        "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    latency: {latency}\n    poll_interval: 20ms\n{extra_backend}models:\n  - id: clip\n    type: video\n    backends: [sim]\n    credits: 30\n    default_size: 64x36\n  - id: per-second\n    type: video\n    backends: [sim]\n    credits_per_second: 2.5\n    default_size: 32x32\n{extra_model}"
    )
}

pub(crate) async fn call(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    secret: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = gw.client.request(method, gw.endpoint(path)).bearer_auth(secret);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Follows the job's event stream until it ends (no polling, no sleeps); returns the final job and every status
/// the events carried, in order, without repeats.
pub(crate) async fn until_done(gw: &Gateway, secret: &str, id: &str) -> (Value, Vec<String>) {
    let seen = job_events(gw, secret, &format!("/v1/jobs/{id}/events"), None).await;
    let mut statuses: Vec<String> = Vec::new();
    for (_, _, data) in &seen {
        let s = data["status"].as_str().unwrap().to_owned();
        if statuses.last() != Some(&s) {
            statuses.push(s);
        }
    }
    let last = seen.last().map(|e| e.2.clone()).expect("the stream sent no event");
    assert!(matches!(last["status"].as_str(), Some("completed" | "failed")), "the stream ended early: {last}");
    (last, statuses)
}

#[tokio::test]
async fn a_video_is_made_polled_downloaded_and_charged_once() {
    let gw = spawn_gateway_env(&config("300ms", "", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let (status, v) = call(
        &gw,
        reqwest::Method::POST,
        "/v1/videos",
        &secret,
        Some(json!({"model": "clip", "prompt": "a fox running", "seconds": "2", "size": "64x36"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("video_"), "{v}");
    assert_eq!((v["object"].as_str(), v["status"].as_str()), (Some("video"), Some("queued")), "{v}");
    assert_eq!(
        (v["seconds"].as_str(), v["size"].as_str(), v["prompt"].as_str()),
        (Some("2"), Some("64x36"), Some("a fox running"))
    );
    assert_eq!(credits(&gw, &secret).await, (70_000, 30_000), "held while it runs");

    let (done, seen) = until_done(&gw, &secret, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    assert!(seen.contains(&"in_progress".to_owned()), "progress was visible: {seen:?}");
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert_eq!(credits(&gw, &secret).await, (70_000, 0), "captured once");

    let resp =
        gw.client.get(gw.endpoint(&format!("/v1/videos/{id}/content"))).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/gif");
    let gif = resp.bytes().await.unwrap();
    let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&gif[..])).unwrap();
    let frames = image::AnimationDecoder::into_frames(frames).collect_frames().unwrap();
    assert_eq!(frames.len(), 8, "2 s at 4 frames per second");
    assert_eq!(frames[0].buffer().dimensions(), (64, 36));
    let thumb = gw
        .client
        .get(gw.endpoint(&format!("/v1/videos/{id}/content?variant=thumbnail")))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.headers()["content-type"], "image/png");
    assert!(thumb.bytes().await.unwrap().starts_with(b"\x89PNG"));

    // Listed for its owner only; another key sees nothing and gets 404 for it.
    let (_, list) = call(&gw, reqwest::Method::GET, "/v1/videos", &secret, None).await;
    assert_eq!(list["data"][0]["id"], id.as_str());
    let other = key(&gw, 1.0).await;
    let (_, theirs) = call(&gw, reqwest::Method::GET, "/v1/videos", &other, None).await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    let (status, body) = call(&gw, reqwest::Method::GET, &format!("/v1/videos/{id}"), &other, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = call(&gw, reqwest::Method::GET, &format!("/v1/jobs/{id}"), &secret, None).await;
    assert_eq!(status, 200, "jobs answer for video ids");

    let (_, _, metrics) = gw.get("/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("easel_jobs_ended_total{model=\"clip\",outcome=\"completed\"}"), "{metrics}");
    assert!(metrics.contains("easel_job_polls_total{backend=\"sim\",outcome=\"ok\"}"), "{metrics}");
    let status: Value =
        gw.client.get(gw.endpoint("/v1/gateway/status")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert!(status["jobs_running"].is_object(), "{status}");
    assert!(
        status["jobs_running"].get("sim").is_none_or(|n| n == 0),
        "the slot went back when the job ended: {status}"
    );

    // Deleted: gone, with its files.
    let (status, del) = call(&gw, reqwest::Method::DELETE, &format!("/v1/videos/{id}"), &secret, None).await;
    assert_eq!((status, del["deleted"].as_bool(), del["object"].as_str()), (200, Some(true), Some("video.deleted")));
    let (status, _) = call(&gw, reqwest::Method::GET, &format!("/v1/videos/{id}"), &secret, None).await;
    assert_eq!(status, 404);
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn per_second_prices_failures_cancels_and_deadlines_settle_exactly() {
    let failing = "  bad:\n    kind: simulated\n    latency: 50ms\n    poll_interval: 20ms\n    failure: {status: 500, message: \"render node crashed\", every: 1}\n";
    let models = "  - id: broken\n    type: video\n    backends: [bad]\n    credits: 10\n  - id: slow\n    type: video\n    backends: [sim]\n    credits: 10\n    job_timeout: 200ms\n";
    let gw = spawn_gateway_env(&config("2s", failing, models), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;

    // Per second: 4 s × 2.5 credits held.
    let (_, v) = call(
        &gw,
        reqwest::Method::POST,
        "/v1/videos",
        &secret,
        Some(json!({"model": "per-second", "prompt": "p", "seconds": 4})),
    )
    .await;
    assert_eq!(credits(&gw, &secret).await.1, 10_000, "{v}");
    let per_second = v["id"].as_str().unwrap().to_owned();

    // Upstream failure: failed with its code and message, released.
    let (_, v) =
        call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(json!({"model": "broken", "prompt": "p"}))).await;
    let (done, _) = until_done(&gw, &secret, v["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "upstream_failed");
    assert!(done["error"]["message"].as_str().unwrap().contains("render node crashed"), "{done}");

    // Past the model's job_timeout: failed `timeout`, released.
    let (_, v) =
        call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(json!({"model": "slow", "prompt": "p"}))).await;
    let (done, _) = until_done(&gw, &secret, v["id"].as_str().unwrap()).await;
    assert_eq!(done["error"]["code"], "timeout", "{done}");

    // Cancelled by its owner: failed `canceled`, released; the content is not there.
    let (status, v) = call(&gw, reqwest::Method::POST, &format!("/v1/videos/{per_second}/cancel"), &secret, None).await;
    assert_eq!(status, 200, "{v}");
    let (done, _) = until_done(&gw, &secret, &per_second).await;
    assert_eq!(done["error"]["code"], "canceled", "{done}");
    let (status, body) =
        call(&gw, reqwest::Method::GET, &format!("/v1/videos/{per_second}/content"), &secret, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("video_not_ready")));

    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "nothing made, nothing charged");
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn bad_video_requests_get_clear_errors_and_cost_nothing() {
    let gw =
        spawn_gateway_env(&config("10ms", "", "  - id: still\n    backends: [sim]\n"), &[("EASEL_ADMIN_TOKEN", ADMIN)])
            .await;
    let secret = key(&gw, 5.0).await;
    for (body, status, param) in [
        (json!({"model": "clip"}), 400, "prompt"),
        (json!({"model": "clip", "prompt": "p", "seconds": "forever"}), 400, "seconds"),
        (json!({"model": "clip", "prompt": "p", "seconds": 0}), 400, "seconds"),
        (json!({"model": "clip", "prompt": "p", "size": "big"}), 400, "size"),
        (json!({"model": "clip", "prompt": "p", "extra": {"duration": 60}}), 400, "extra.duration"),
        (json!({"model": "clip", "prompt": "p", "fps": 60}), 400, "fps"),
        (
            json!({"model": "clip", "prompt": "p", "input_reference": {"file_id": "img_00000000000000000000000000000000.png"}}),
            400,
            "input_reference",
        ),
        (json!({"model": "still", "prompt": "p"}), 400, "model"),
        (json!({"model": "nope", "prompt": "p"}), 404, "model"),
    ] {
        let (s, v) = call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(body.clone())).await;
        assert_eq!(s, status, "{body} → {v}");
        assert_eq!(v["error"]["param"], param, "{body} → {v}");
    }
    // 30 credits per clip against a balance of 5: 402 before anything runs.
    let (s, v) =
        call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(json!({"model": "clip", "prompt": "p"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (402, Some("insufficient_credits")), "{v}");
    let (s, _) = call(&gw, reqwest::Method::GET, "/v1/videos?limit=1000", &secret, None).await;
    assert_eq!(s, 400);
    assert_eq!(credits(&gw, &secret).await, (5_000, 0));
}

#[tokio::test]
async fn a_repeated_idempotency_key_makes_one_video() {
    let gw = spawn_gateway_env(&config("50ms", "", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let create = || {
        gw.client
            .post(gw.endpoint("/v1/videos"))
            .bearer_auth(&secret)
            .header("Idempotency-Key", "clip-1")
            .json(&json!({"model": "clip", "prompt": "p"}))
            .send()
    };
    let a: Value = create().await.unwrap().json().await.unwrap();
    let b: Value = create().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"], "{a} {b}");
    until_done(&gw, &secret, a["id"].as_str().unwrap()).await;
    assert_eq!(credits(&gw, &secret).await, (70_000, 0), "one clip charged");
    let (_, list) = call(&gw, reqwest::Method::GET, "/v1/videos", &secret, None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn pages_follow_the_cursor_and_no_keys_mode_works() {
    let yaml = "backends:\n  sim:\n    kind: simulated\n    poll_interval: 20ms\nmodels:\n  - id: clip\n    type: video\n    backends: [sim]\n    default_size: 16x16\n";
    let gw = spawn_gateway(yaml).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (s, _, v) = gw.post_json("/v1/videos", json!({"model": "clip", "prompt": "p", "seconds": "1"})).await;
        assert_eq!(s, 200, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let page = |q: String| {
        let gw = &gw;
        async move {
            let (_, _, b) = gw.get(&format!("/v1/videos?{q}")).await;
            serde_json::from_slice::<Value>(&b).unwrap()
        }
    };
    let first = page("limit=2&order=asc".into()).await;
    assert_eq!(first["has_more"], true);
    let got: Vec<&str> = first["data"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[0].as_str(), ids[1].as_str()]);
    let rest = page(format!("limit=10&order=asc&after={}", first["last_id"].as_str().unwrap())).await;
    let got: Vec<&str> = rest["data"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids[2..].iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(rest["has_more"], false);
    let newest = page("limit=1".into()).await;
    assert_eq!(newest["data"][0]["id"], ids[4].as_str(), "newest first by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_a_sigkill_and_is_charged_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), config("5s", "", "")).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (mut child, url) = start_binary(dir.path(), &env);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 100.0).await;
    let job: Value = client
        .post(format!("{url}/v1/videos"))
        .bearer_auth(&secret)
        .json(&json!({"model": "clip", "prompt": "p", "seconds": "1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["status"], "queued", "{job}");
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url) = start_binary(dir.path(), &env);
    // The resumed job takes its backend's video slot again (it runs upstream; new work must count it).
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
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
        if status["jobs_running"]["sim"] == 1 && status["backends"]["sim"]["admission"]["videos"]["inflight"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the resumed job never took a slot: {status}");
        tokio::task::yield_now().await;
    }
    // The restarted easel's event stream for the job ends with its terminal state.
    let stream = client.get(format!("{url}/v1/jobs/{id}/events")).bearer_auth(&secret).send();
    let text = tokio::time::timeout(TEST_TIMEOUT, async { stream.await.unwrap().text().await.unwrap() }).await.unwrap();
    let last = text.split("\n\n").filter(|f| !f.trim().is_empty()).last().expect("no event after the restart");
    let data = last.lines().find_map(|l| l.strip_prefix("data:")).expect("an event without data");
    let done: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(credits_at(&url, &secret).await, (70_000, 0), "captured once");
    ledger_clean_at(&url).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_fal_video_goes_through_the_whole_gateway() {
    let fal = crate::support::fal::start().await;
    fal.state.video.queued_polls.store(2, std::sync::atomic::Ordering::SeqCst);
    fal.state.video.running_polls.store(2, std::sync::atomic::Ordering::SeqCst);
    let yaml = format!(
        "auth:\n  mode: keys\nbackends:\n  fal:\n    kind: fal\n    url: {}\n    api_key: {}\n    poll_interval: 20ms\nmodels:\n  - id: kling\n    type: video\n    backends: [fal]\n    upstream_model: fal-ai/kling-video/v2/master/text-to-video\n    credits_per_second: 10\n",
        fal.url,
        crate::support::fal::KEY
    );
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let resp = gw
        .client
        .post(gw.endpoint("/v1/videos"))
        .bearer_auth(&secret)
        .header("x-request-id", "fox-trace-1")
        .json(&json!({"model": "kling", "prompt": "a fox", "seconds": "5", "size": "1280x720"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(credits(&gw, &secret).await, (50_000, 50_000), "5 s × 10 credits held");
    let (done, seen) = until_done(&gw, &secret, v["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(seen.iter().any(|s| s == "in_progress"), "{seen:?}");
    // The submit and every later poll and download carried the creating request's id.
    let ids = fal.state.video.request_ids.lock().unwrap().clone();
    assert!(ids.len() > 2 && ids.iter().all(|i| i == "fox-trace-1"), "{ids:?}");
    let sent = fal.state.video.submitted.lock().unwrap()[0].clone();
    assert_eq!((sent["duration"].as_str(), sent["aspect_ratio"].as_str()), (Some("5"), Some("16:9")), "{sent}");
    let resp = gw
        .client
        .get(gw.endpoint(&format!("/v1/videos/{}/content", v["id"].as_str().unwrap())))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    assert_eq!(&resp.bytes().await.unwrap()[4..8], b"ftyp");
    assert_eq!(credits(&gw, &secret).await, (50_000, 0), "captured once");
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn job_events_stream_live_and_resume_after_the_last_id() {
    let gw = spawn_gateway_env(&config("600ms", "", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let (_, v) = call(
        &gw,
        reqwest::Method::POST,
        "/v1/videos",
        &secret,
        Some(json!({"model": "clip", "prompt": "p", "seconds": "1"})),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_owned();
    let seen = job_events(&gw, &secret, &format!("/v1/jobs/{id}/events"), None).await;
    let names: Vec<&str> = seen.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    assert!(names.contains(&"progress"), "live progress while it ran: {names:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "ids only grow: {:?}",
        seen.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    let last = seen.last().unwrap();
    assert_eq!((last.2["status"].as_str(), last.2["id"].as_str()), (Some("completed"), Some(id.as_str())));
    // Resuming after the end sends nothing more; resuming from the start sends the end again.
    assert!(job_events(&gw, &secret, &format!("/v1/videos/{id}/events"), Some("1000")).await.is_empty());
    let again = job_events(&gw, &secret, &format!("/v1/videos/{id}/events"), Some("1")).await;
    assert_eq!(again.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), vec!["completed"]);
    // Another key cannot watch it.
    let other = key(&gw, 1.0).await;
    let (status, _) = call(&gw, reqwest::Method::GET, &format!("/v1/jobs/{id}/events"), &other, None).await;
    assert_eq!(status, 404);
    // A watcher that leaves changes nothing: the job finishes and is charged once either way.
    let (_, v) = call(
        &gw,
        reqwest::Method::POST,
        "/v1/videos",
        &secret,
        Some(json!({"model": "clip", "prompt": "p", "seconds": "1"})),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_owned();
    let watch = gw.client.get(gw.endpoint(&format!("/v1/jobs/{id}/events"))).bearer_auth(&secret).send().await.unwrap();
    drop(watch);
    let (done, _) = until_done(&gw, &secret, &id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(credits(&gw, &secret).await, (40_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn multipart_creates_take_a_reference_image_as_the_sdks_send_them() {
    let gw = spawn_gateway_env(&config("10ms", "", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    let png = crate::support::openai::png(40);
    let form = reqwest::multipart::Form::new()
        .text("model", "clip")
        .text("prompt", "from this frame")
        .text("seconds", "1")
        .text("seed", "7")
        .part(
            "input_reference",
            reqwest::multipart::Part::bytes(png).file_name("first.png").mime_str("image/png").unwrap(),
        );
    let resp = gw.client.post(gw.endpoint("/v1/videos")).bearer_auth(&secret).multipart(form).send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["seconds"], "1");
    let (done, _) = until_done(&gw, &secret, v["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed");
    // A field videos do not have is named.
    let form = reqwest::multipart::Form::new().text("model", "clip").text("prompt", "p").text("n", "2");
    let resp = gw.client.post(gw.endpoint("/v1/videos")).bearer_auth(&secret).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("`n`"));
}
