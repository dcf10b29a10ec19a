//! ComfyUI video jobs through the whole gateway against the fake ComfyUI: a video made and charged once, a node
//! error and a run-time error, cancels while queued and while running, the deadline, a prompt forgotten by a
//! restarted ComfyUI, and a real easel binary killed while its submit was unanswered (adopted when ComfyUI has
//! the prompt, ended `upstream_lost` when it does not).

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, key, key_at, ledger_clean};
use crate::support::{Gateway, TEST_TIMEOUT, comfyui, spawn_gateway_env, start_binary};

const WORKFLOW: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows/comfyui-video.json");
const MP4: &[u8] = include_bytes!("support/comfyui-video.mp4");

fn config(url: &str, workflow: &str, extra_model: &str) -> String {
    format!(
        "auth:\n  mode: keys\nbackends:\n  comfy:\n    kind: comfyui\n    url: {url}\n    timeout: 10s\n    poll_interval: 20ms\nmodels:\n  - id: clip\n    type: video\n    backends: [comfy]\n    workflow: {workflow}\n    credits: 10\n    default_size: 32x16\n{extra_model}"
    )
}

async fn gateway(comfy: &comfyui::FakeComfy, extra_model: &str) -> (Gateway, String) {
    let gw = spawn_gateway_env(&config(&comfy.url, WORKFLOW, extra_model), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 100.0).await;
    (gw, secret)
}

async fn create(gw: &Gateway, secret: &str, body: Value) -> (u16, Value) {
    let req = gw.client.post(gw.endpoint("/v1/videos")).bearer_auth(secret).json(&body);
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Reads the job's event stream until `stop` accepts an event (or the stream ends); returns that event.
async fn watch(base: &str, secret: &str, id: &str, stop: impl Fn(&Value) -> bool) -> Value {
    let client = reqwest::Client::new();
    let mut resp = client.get(format!("{base}/v1/jobs/{id}/events")).bearer_auth(secret).send().await.unwrap();
    let (mut buf, mut last) = (String::new(), Value::Null);
    let read = async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                    last = serde_json::from_str(data.trim()).unwrap();
                    if stop(&last) {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(TEST_TIMEOUT, read).await.expect("the job did not get there in time");
    last
}

/// Reads `GET /v1/videos/{id}` until `cond` holds (the event stream tells state changes, not queue moves).
async fn until(gw: &Gateway, secret: &str, id: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let v: Value = gw
            .client
            .get(gw.endpoint(&format!("/v1/videos/{id}")))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if cond(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out; last seen {v}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn ended(v: &Value) -> bool {
    matches!(v["status"].as_str(), Some("completed" | "failed"))
}

/// The prompt id the fake received for the `n`th submit.
fn sent_prompt_id(comfy: &comfyui::FakeComfy, n: usize) -> String {
    comfy.state.inner.lock().unwrap().submitted_ids[n].0.clone().expect("no prompt_id was sent")
}

#[tokio::test]
async fn a_comfyui_video_is_rendered_polled_downloaded_and_charged_once() {
    let comfy = comfyui::start().await;
    comfy.state.knobs.run_ms.store(300, Ordering::SeqCst);
    let (gw, secret) = gateway(&comfy, "").await;
    let (status, v) =
        create(&gw, &secret, json!({"model": "clip", "prompt": "a fox", "seconds": "2", "seed": 7})).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(credits(&gw, &secret).await, (90_000, 10_000), "held while it runs");

    let done = watch(&gw.url, &secret, &id, ended).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(credits(&gw, &secret).await, (90_000, 0), "captured once");

    // The template got 2 s × 16 fps frames at the default size, and a canonical prompt id easel chose.
    let wf = comfy.state.inner.lock().unwrap().prompts[0].clone();
    assert_eq!(wf["1"]["inputs"]["batch_size"], 32, "{wf}");
    assert_eq!((wf["1"]["inputs"]["width"].as_u64(), wf["1"]["inputs"]["height"].as_u64()), (Some(32), Some(16)));
    assert_eq!(wf["3"]["inputs"]["fps"], 16);
    let (prompt_id, client_id) = comfy.state.inner.lock().unwrap().submitted_ids[0].clone();
    let prompt_id = prompt_id.expect("a prompt_id");
    assert_eq!(uuid::Uuid::parse_str(&prompt_id).unwrap().to_string(), prompt_id);
    assert!(client_id.is_some_and(|c| !c.is_empty()));

    let resp =
        gw.client.get(gw.endpoint(&format!("/v1/videos/{id}/content"))).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    assert_eq!(&resp.bytes().await.unwrap()[..], MP4, "the MP4 ComfyUI saved, byte for byte");

    // `extra.fps` sets the rate.
    let (_, v) =
        create(&gw, &secret, json!({"model": "clip", "prompt": "p", "seconds": "1", "extra": {"fps": 24}})).await;
    assert_eq!(watch(&gw.url, &secret, v["id"].as_str().unwrap(), ended).await["status"], "completed");
    let wf = comfy.state.inner.lock().unwrap().prompts[1].clone();
    assert_eq!((wf["1"]["inputs"]["batch_size"].as_u64(), wf["3"]["inputs"]["fps"].as_u64()), (Some(24), Some(24)));
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn node_errors_are_the_clients_and_execution_errors_fail_the_job_refunded() {
    let comfy = comfyui::start().await;
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        r#"{"1": {"class_type": "NoSuchNode", "inputs": {"text": {{ prompt | tojson }}, "frames": {{ frames }}}}, "2": {"class_type": "SaveVideo", "inputs": {"video": ["1", 0]}}}"#,
    )
    .unwrap();
    let extra = format!(
        "  - id: broken\n    type: video\n    backends: [comfy]\n    workflow: {}\n    credits: 10\n",
        broken.display()
    );
    let (gw, secret) = gateway(&comfy, &extra).await;

    let (status, v) = create(&gw, &secret, json!({"model": "broken", "prompt": "p", "seconds": "1"})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("NoSuchNode does not exist"), "{v}");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "nothing charged, nothing held");

    comfy.state.knobs.fail_exec.store(true, Ordering::SeqCst);
    let (status, v) = create(&gw, &secret, json!({"model": "clip", "prompt": "p", "seconds": "1"})).await;
    assert_eq!(status, 200, "{v}");
    let done = watch(&gw.url, &secret, v["id"].as_str().unwrap(), ended).await;
    assert_eq!((done["status"].as_str(), done["error"]["code"].as_str()), (Some("failed"), Some("upstream_failed")));
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("node 3 (KSampler)") && message.contains("OutOfMemoryError"), "{done}");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "refunded");
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn cancels_delete_a_queued_prompt_and_interrupt_a_running_one() {
    let comfy = comfyui::start().await;
    comfy.state.knobs.paused.store(true, Ordering::SeqCst);
    comfy.state.knobs.run_ms.store(60_000, Ordering::SeqCst);
    let (gw, secret) = gateway(&comfy, "").await;
    let (_, first) = create(&gw, &secret, json!({"model": "clip", "prompt": "a", "seconds": "1"})).await;
    let (_, second) = create(&gw, &secret, json!({"model": "clip", "prompt": "b", "seconds": "1"})).await;
    let (first, second) = (first["id"].as_str().unwrap().to_owned(), second["id"].as_str().unwrap().to_owned());

    // Queued behind the first: the position ComfyUI's queue gives.
    let queued = until(&gw, &secret, &second, |v| v["queue_position"] == 2).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    let resp = gw.client.post(gw.endpoint(&format!("/v1/videos/{second}/cancel"))).bearer_auth(&secret).send().await;
    assert_eq!(resp.unwrap().status(), 200);
    let done = watch(&gw.url, &secret, &second, ended).await;
    assert_eq!(done["error"]["code"], "canceled", "{done}");
    let second_prompt = sent_prompt_id(&comfy, 1);
    assert_eq!(comfy.state.inner.lock().unwrap().deleted, vec![second_prompt], "deleted from the queue");

    // Running: interrupted, by its own prompt id.
    comfy.state.resume();
    let running = watch(&gw.url, &secret, &first, |v| v["status"] == "in_progress").await;
    assert_eq!(running["status"], "in_progress", "{running}");
    let resp = gw.client.post(gw.endpoint(&format!("/v1/videos/{first}/cancel"))).bearer_auth(&secret).send().await;
    assert_eq!(resp.unwrap().status(), 200);
    let done = watch(&gw.url, &secret, &first, ended).await;
    assert_eq!(done["error"]["code"], "canceled", "{done}");
    let first_prompt = sent_prompt_id(&comfy, 0);
    assert_eq!(comfy.state.inner.lock().unwrap().interrupted_ids, vec![first_prompt]);
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "both refunded");
    ledger_clean(&gw).await;
}

#[tokio::test]
async fn a_deadline_interrupts_the_prompt_and_a_forgotten_prompt_is_lost() {
    let comfy = comfyui::start().await;
    comfy.state.knobs.run_ms.store(60_000, Ordering::SeqCst);
    let slow = format!(
        "  - id: slow\n    type: video\n    backends: [comfy]\n    workflow: {WORKFLOW}\n    credits: 10\n    job_timeout: 300ms\n"
    );
    let (gw, secret) = gateway(&comfy, &slow).await;
    let (_, v) = create(&gw, &secret, json!({"model": "slow", "prompt": "p", "seconds": "1"})).await;
    let done = watch(&gw.url, &secret, v["id"].as_str().unwrap(), ended).await;
    assert_eq!(done["error"]["code"], "timeout", "{done}");
    let first_prompt = sent_prompt_id(&comfy, 0);
    assert_eq!(comfy.state.inner.lock().unwrap().interrupted_ids, vec![first_prompt]);

    // ComfyUI restarts while a prompt waits: its queue and history are gone.
    comfy.state.knobs.paused.store(true, Ordering::SeqCst);
    let (_, v) = create(&gw, &secret, json!({"model": "clip", "prompt": "p", "seconds": "1"})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    until(&gw, &secret, &id, |v| v["queue_position"] == 1).await;
    comfy.state.restart();
    let done = watch(&gw.url, &secret, &id, ended).await;
    assert_eq!(done["error"]["code"], "upstream_lost", "{done}");
    assert_eq!(credits(&gw, &secret).await, (100_000, 0), "refunded");
    ledger_clean(&gw).await;
}

/// Starts the binary on `comfy`, makes a key, and posts a video whose submit the fake never answers; kills the
/// binary once the fake has the prompt and returns the restarted binary, its URL, the key and the job id.
async fn killed_while_submitting(
    comfy: &comfyui::FakeComfy,
    dir: &std::path::Path,
) -> (std::process::Child, String, String, String) {
    std::fs::write(dir.join("easel.yaml"), config(&comfy.url, WORKFLOW, "")).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let (mut child, url) = start_binary(dir, &env);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 100.0).await;
    let post = client
        .post(format!("{url}/v1/videos"))
        .bearer_auth(&secret)
        .json(&json!({"model": "clip", "prompt": "p", "seconds": "1"}));
    let mut pending = tokio::spawn(post.send());
    tokio::select! {
        () = comfy.state.received.notified() => {}
        r = &mut pending => panic!("easel answered before the submit reached ComfyUI: {:?}", r.unwrap().unwrap().text().await),
        () = tokio::time::sleep(TEST_TIMEOUT) => panic!("the submit never arrived"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = pending.await;
    comfy.state.knobs.accept_then_stall.store(false, Ordering::SeqCst);
    comfy.state.knobs.stall_prompt_body.store(false, Ordering::SeqCst);

    let (child, url) = start_binary(dir, &env);
    let list: Value =
        client.get(format!("{url}/v1/videos")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    let id = list["data"][0]["id"].as_str().expect("the job was recorded before the submit").to_owned();
    (child, url, secret, id)
}

async fn books(url: &str, secret: &str) -> (Option<i64>, Option<i64>) {
    let client = reqwest::Client::new();
    let me: Value = client.get(format!("{url}/v1/me")).bearer_auth(secret).send().await.unwrap().json().await.unwrap();
    let check = client.get(format!("{url}/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(check.status(), 200, "ledger check");
    (me["credits"]["available_mc"].as_i64(), me["credits"]["held_mc"].as_i64())
}

// The fake ComfyUI must answer the binary's probes while `start_binary` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_easel_adopts_the_prompt_its_unanswered_submit_queued() {
    let comfy = comfyui::start().await;
    comfy.state.knobs.run_ms.store(200, Ordering::SeqCst);
    comfy.state.knobs.accept_then_stall.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, secret, id) = killed_while_submitting(&comfy, dir.path()).await;

    let done = watch(&url, &secret, &id, ended).await;
    assert_eq!(done["status"], "completed", "adopted and finished: {done}");
    let content =
        reqwest::Client::new().get(format!("{url}/v1/videos/{id}/content")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(&content.bytes().await.unwrap()[..], MP4);
    assert_eq!(comfy.state.inner.lock().unwrap().prompts.len(), 1, "never submitted twice");
    assert_eq!(books(&url, &secret).await, (Some(90_000), Some(0)), "charged once");
    child.kill().unwrap();
    child.wait().unwrap();
}

// The fake ComfyUI must answer the binary's probes while `start_binary` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_easel_ends_a_submit_comfyui_never_took_as_lost_and_refunds_it() {
    let comfy = comfyui::start().await;
    comfy.state.knobs.stall_prompt_body.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, secret, id) = killed_while_submitting(&comfy, dir.path()).await;

    let done = watch(&url, &secret, &id, ended).await;
    assert_eq!((done["status"].as_str(), done["error"]["code"].as_str()), (Some("failed"), Some("upstream_lost")));
    assert!(done["error"]["message"].as_str().unwrap().contains("never received it"), "{done}");
    assert_eq!(books(&url, &secret).await, (Some(100_000), Some(0)), "released");
    child.kill().unwrap();
    child.wait().unwrap();
}
