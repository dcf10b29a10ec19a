//! Images as jobs (`Prefer: respond-async`): 202 + `Location`, the job object whose `result` is the normal images
//! response, live progress and previews on the event stream, edits, cancel, a full admission queue that makes a
//! job wait instead of failing, Idempotency-Key, owners, bad inputs, and a real binary killed mid-job — with the
//! books exact after each.

use base64::Engine;
use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, key, key_at, ledger_clean};
use crate::support::{Gateway, TEST_TIMEOUT, job_events, spawn_gateway_env, start_binary};

fn config(latency: &str, admission: &str) -> String {
    format!(
        "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    latency: {latency}\n{admission}models:\n  - id: pic\n    backends: [sim]\n    default_size: 64x48\n    credits: 2\n"
    )
}

/// POSTs with `Prefer: respond-async`; returns status, `Location` and body.
async fn submit(gw: &Gateway, secret: &str, path: &str, body: Value, idem: Option<&str>) -> (u16, String, Value) {
    let mut req = gw.client.post(gw.endpoint(path)).bearer_auth(secret).header("Prefer", "respond-async").json(&body);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, location, resp.json().await.unwrap_or(Value::Null))
}

async fn get(gw: &Gateway, secret: &str, path: &str) -> (u16, Value) {
    let resp = tokio::time::timeout(TEST_TIMEOUT, gw.client.get(gw.endpoint(path)).bearer_auth(secret).send())
        .await
        .unwrap()
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

/// Every event of a job's stream until it ends: (id, name, data).
async fn events(gw: &Gateway, secret: &str, id: &str) -> Vec<(u32, String, Value)> {
    job_events(gw, secret, &format!("/v1/jobs/{id}/events"), None).await
}

fn png(b64: &str) -> image::DynamicImage {
    image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

#[tokio::test]
async fn an_async_generation_is_a_job_with_live_progress_previews_and_the_images_response() {
    let gw = spawn_gateway_env(&config("600ms", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;
    let body = json!({"model": "pic", "prompt": "a lighthouse", "n": 2, "size": "64x48"});
    let (status, location, job) = submit(&gw, &secret, "/v1/images/generations", body, None).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("job_"), "{job}");
    assert_eq!(location, format!("/v1/jobs/{id}"));
    // The runner may have started it before the answer was written: queued or already in progress.
    assert_eq!(job["object"], "job", "{job}");
    assert!(matches!(job["status"].as_str(), Some("queued" | "in_progress")), "{job}");
    assert!(job["result"].is_null(), "{job}");
    assert_eq!(credits(&gw, &secret).await, (6_000, 4_000), "two images held while the job runs");

    let seen = events(&gw, &secret, &id).await;
    let names: Vec<&str> = seen.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    assert!(names.contains(&"progress"), "{names:?}");
    let previews: Vec<&Value> = seen.iter().filter(|e| e.1 == "preview").map(|e| &e.2).collect();
    assert!(!previews.is_empty(), "the simulated backend's previews reach the stream: {names:?}");
    let url = previews[0]["image"].as_str().unwrap();
    let preview = png(url.strip_prefix("data:image/png;base64,").expect("a PNG data URL"));
    assert!(preview.width() <= 64, "a preview, at most the final size");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{:?}", seen.iter().map(|e| e.0).collect::<Vec<_>>());

    let done = &seen.last().unwrap().2;
    assert_eq!((done["status"].as_str(), done["progress"].as_i64()), (Some("completed"), Some(100)), "{done}");
    let result = &done["result"];
    assert_eq!(result["data"].as_array().unwrap().len(), 2, "{result}");
    assert_eq!((result["size"].as_str(), result["output_format"].as_str()), (Some("64x48"), Some("png")));
    // The images response's default here is `url`: signed, fetchable without the key.
    let url = result["data"][0]["url"].as_str().unwrap();
    let img = reqwest::get(url).await.unwrap();
    assert_eq!(img.status(), 200);
    assert_eq!(image::load_from_memory(&img.bytes().await.unwrap()).unwrap().width(), 64);
    let (status, again) = get(&gw, &secret, &location).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("completed")));
    assert_eq!(credits(&gw, &secret).await, (6_000, 0), "captured once, for the two images made");
    ledger_clean(&gw).await;

    // Another key is told it does not exist; /v1/videos does not show image jobs.
    let other = key(&gw, 1.0).await;
    assert_eq!(get(&gw, &other, &location).await.0, 404);
    assert_eq!(get(&gw, &secret, &format!("/v1/videos/{id}")).await.0, 404);
    assert_eq!(get(&gw, &secret, &format!("/v1/videos/{id}/content")).await.0, 404);
    let cancel = gw.client.post(gw.endpoint(&format!("/v1/videos/{id}/cancel"))).bearer_auth(&secret).send().await;
    assert_eq!(cancel.unwrap().status(), 404, "an image job is not a video");
}

#[tokio::test]
async fn b64_results_edits_and_idempotent_resubmits() {
    let gw = spawn_gateway_env(&config("20ms", ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;
    let body = json!({"model": "pic", "prompt": "p", "response_format": "b64_json"});
    let (status, _, first) = submit(&gw, &secret, "/v1/images/generations", body.clone(), Some("k-1")).await;
    assert_eq!(status, 202, "{first}");
    let (status, _, second) = submit(&gw, &secret, "/v1/images/generations", body, Some("k-1")).await;
    assert_eq!((status, &second["id"]), (202, &first["id"]), "the same key names the same job: {second}");
    let id = first["id"].as_str().unwrap();
    let done = events(&gw, &secret, id).await.pop().unwrap().2;
    let b64 = done["result"]["data"][0]["b64_json"].as_str().expect("b64_json as asked");
    assert_eq!(png(b64).width(), 64);
    assert_eq!(credits(&gw, &secret).await, (8_000, 0), "one job, charged once");

    // An edit as a job: the multipart inputs are kept until it ends.
    let input = {
        let img = image::RgbaImage::from_pixel(40, 30, image::Rgba([10, 200, 30, 255]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "pic")
        .text("prompt", "make it blue")
        .part("image", reqwest::multipart::Part::bytes(input).file_name("in.png").mime_str("image/png").unwrap());
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/edits"))
        .bearer_auth(&secret)
        .header("Prefer", "respond-async")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    let done = events(&gw, &secret, job["id"].as_str().unwrap()).await.pop().unwrap().2;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["size"], "40x30", "an edit keeps its input's size: {done}");
    assert_eq!(credits(&gw, &secret).await, (6_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn failures_cancels_and_bad_requests_settle_exactly() {
    let backends = "  broken:\n    kind: simulated\n    failure: {status: 500, message: \"CUDA out of memory\"}\n";
    let yaml = config("20s", backends) + "  - id: broken\n    backends: [broken]\n    credits: 2\n";
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;

    // A backend failure ends the job failed, with the backend's message, and releases the hold.
    let (status, _, job) =
        submit(&gw, &secret, "/v1/images/generations", json!({"model": "broken", "prompt": "p"}), None).await;
    assert_eq!(status, 202, "{job}");
    let done = events(&gw, &secret, job["id"].as_str().unwrap()).await.pop().unwrap().2;
    assert_eq!((done["status"].as_str(), done["error"]["code"].as_str()), (Some("failed"), Some("upstream_failed")));
    assert!(done["error"]["message"].as_str().unwrap().contains("CUDA out of memory"), "{done}");
    assert_eq!(credits(&gw, &secret).await, (10_000, 0), "nothing charged for a failed job");

    // Cancel while the backend works (20 s): the job ends at once, canceled, nothing charged.
    let (_, location, job) =
        submit(&gw, &secret, "/v1/images/generations", json!({"model": "pic", "prompt": "p"}), None).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let stream = gw.client.get(gw.endpoint(&format!("/v1/jobs/{id}/events"))).bearer_auth(&secret).send();
    let resp = tokio::time::timeout(TEST_TIMEOUT, stream).await.unwrap().unwrap();
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    // Wait until it runs (the `started` event), then cancel.
    let mut text = String::new();
    while !text.contains("event: started") && !text.contains("event: progress") {
        let chunk = tokio::time::timeout(TEST_TIMEOUT, body.next()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // While it runs, the job gauges count it and the oldest job has an age.
    let metrics = gw.client.get(gw.endpoint("/metrics")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("easel_jobs{object=\"job\",state=\"running\"} 1"), "{metrics}");
    assert!(metrics.contains("easel_jobs{object=\"video\",state=\"running\"} 0"), "{metrics}");
    assert!(metrics.contains("easel_job_oldest_age_seconds{object=\"job\"}"), "{metrics}");
    let cancel = gw.client.post(gw.endpoint(&format!("{location}/cancel"))).bearer_auth(&secret).send();
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, cancel).await.unwrap().unwrap().status(), 200);
    while !text.contains("event: failed") {
        let chunk = tokio::time::timeout(TEST_TIMEOUT, body.next()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (_, ended) = get(&gw, &secret, &location).await;
    assert_eq!((ended["status"].as_str(), ended["error"]["code"].as_str()), (Some("failed"), Some("canceled")));
    assert_eq!(credits(&gw, &secret).await, (10_000, 0));
    // A finished job can be deleted; then it is gone.
    let del = gw.client.delete(gw.endpoint(&location)).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(del.status(), 200);
    assert_eq!(get(&gw, &secret, &location).await.0, 404);

    // Bad inputs: each refused before any hold, in OpenAI's error shape.
    let bad = [
        (json!({"model": "pic", "prompt": "p", "stream": true}), 400, "stream"),
        (json!({"model": "pic"}), 400, "prompt"),
        (json!({"model": "nope", "prompt": "p"}), 404, "model"),
        (json!({"model": "pic", "prompt": "p", "n": 50}), 400, "n"),
    ];
    for (body, want, param) in bad {
        let (status, _, err) = submit(&gw, &secret, "/v1/images/generations", body.clone(), None).await;
        assert_eq!(status, want, "{body} → {err}");
        assert_eq!(err["error"]["param"], param, "{body} → {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    }
    assert_eq!(credits(&gw, &secret).await, (10_000, 0));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn a_job_waits_for_a_slot_where_a_request_would_get_429() {
    let admission = "    concurrency: {images: 1}\n    queue: {depth: 0, wait: 1s}\n";
    let gw = spawn_gateway_env(&config("700ms", admission), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;
    // One synchronous request takes the only slot; meanwhile a second synchronous one is refused at once…
    let busy = {
        let (gw_client, url, secret) = (gw.client.clone(), gw.endpoint("/v1/images/generations"), secret.clone());
        tokio::spawn(async move {
            gw_client.post(url).bearer_auth(secret).json(&json!({"model": "pic", "prompt": "p"})).send().await
        })
    };
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let v: Value = gw
            .client
            .get(gw.endpoint("/v1/gateway/status"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["backends"]["sim"]["admission"]["images"]["inflight"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the first request never took the slot: {v}");
        tokio::task::yield_now().await;
    }
    let refused = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .bearer_auth(&secret)
        .json(&json!({"model": "pic", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    // …but a job is accepted, waits in easel, and completes once the slot is free.
    let (code, _, job) =
        submit(&gw, &secret, "/v1/images/generations", json!({"model": "pic", "prompt": "p"}), None).await;
    assert_eq!(code, 202, "{job}");
    let done = events(&gw, &secret, job["id"].as_str().unwrap()).await.pop().unwrap().2;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    assert_eq!(credits(&gw, &secret).await, (6_000, 0), "the request and the job, one image each");
    ledger_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_job_survives_a_sigkill_and_is_charged_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), config("1500ms", "")).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (mut child, url) = start_binary(dir.path(), &env);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 10.0).await;
    let resp = client
        .post(format!("{url}/v1/images/generations"))
        .bearer_auth(&secret)
        .header("Prefer", "respond-async")
        .json(&json!({"model": "pic", "prompt": "p", "n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // Kill it while the backend works (the job shows `in_progress` first).
    let events = client.get(format!("{url}/v1/jobs/{id}/events")).bearer_auth(&secret).send().await.unwrap();
    let mut body = events.bytes_stream();
    use futures_util::StreamExt;
    let mut text = String::new();
    while !text.contains("event: started") && !text.contains("event: progress") {
        let chunk = tokio::time::timeout(TEST_TIMEOUT, body.next()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url) = start_binary(dir.path(), &env);
    let text = tokio::time::timeout(TEST_TIMEOUT, async {
        let r = client.get(format!("{url}/v1/jobs/{id}/events")).bearer_auth(&secret).send().await.unwrap();
        r.text().await.unwrap()
    })
    .await
    .unwrap();
    let last = text.split("\n\n").filter(|f| !f.trim().is_empty()).last().expect("no event after the restart");
    let data = last.lines().find_map(|l| l.strip_prefix("data:")).expect("an event without data");
    let done: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["data"].as_array().unwrap().len(), 2, "{done}");
    let me: Value = client.get(format!("{url}/v1/me")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (me["credits"]["available_mc"].as_i64(), me["credits"]["held_mc"].as_i64()),
        (Some(6_000), Some(0)),
        "charged once, after the restart: {me}"
    );
    let check = client.get(format!("{url}/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(check.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}
