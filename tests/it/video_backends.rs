//! The video job operations of the fal, Replicate and OpenAI adapters against their fakes: submit → poll (queue
//! positions, progress, logs) → fetch (a real MP4, a thumbnail) → cancel; upstream failure, a lost job (404), a
//! 5xx or slow poll (an error, the job not ended), no secret in the stored handle, and the outbound policy on
//! output URLs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use easel::backends::jobs::{JobErrorCode, OutputKind};
use easel::backends::{AnyBackend, BackendError, JobHandle, JobPoll, JobState, VideoCall};
use easel::config::{self, MapEnv, ModelConfig};
use easel::request::video::{GenerateVideo, ReferenceImage};
use easel::request::{ImageFormat, Size};
use serde_json::{Map, Value, json};

use crate::support::{self, TEST_TIMEOUT};

/// The adapter of the one backend in `yaml` and its one model.
fn build(yaml: &str) -> (AnyBackend, Arc<ModelConfig>) {
    let env = MapEnv::new([("EASEL_LOG", "warn")]);
    let cfg = config::from_str(yaml, "test.yaml", Path::new("."), &env).unwrap_or_else(|e| panic!("{e}"));
    let backend = AnyBackend::build(Arc::clone(&cfg.backends[0])).unwrap();
    (backend, Arc::clone(&cfg.models[0]))
}

fn yaml(kind: &str, url: &str, key: &str, model: &str, timeout: &str) -> String {
    format!(
        "backends:\n  up:\n    kind: {kind}\n    url: {url}\n    api_key: {key}\n    timeout: {timeout}\nmodels:\n  - id: clip\n    backends: [up]\n    upstream_model: {model}\n"
    )
}

fn fal_backend(url: &str) -> (AnyBackend, Arc<ModelConfig>) {
    build(&yaml("fal", url, support::fal::KEY, "fal-ai/kling-video/v2/master/text-to-video", "5s"))
}

fn replicate_backend(url: &str) -> (AnyBackend, Arc<ModelConfig>) {
    build(&yaml("replicate", url, support::replicate::TOKEN, "minimax/video-01", "5s"))
}

fn openai_backend(url: &str, timeout: &str) -> (AnyBackend, Arc<ModelConfig>) {
    build(&yaml("openai", url, support::openai::KEY, "sora-2", timeout))
}

fn request(extra: Value) -> GenerateVideo {
    GenerateVideo {
        model: None,
        prompt: "a fox running through snow".into(),
        seconds: 8,
        size: Some(Size::new(1280, 720)),
        reference: None,
        negative_prompt: Some("blur".into()),
        seed: Some(42),
        extra: extra.as_object().cloned().filter(|m: &Map<String, Value>| !m.is_empty()),
    }
}

async fn submit(b: &AnyBackend, model: &ModelConfig, req: &GenerateVideo) -> JobHandle {
    assert!(b.supports_videos());
    let call = VideoCall { request: req, model, client_ref: "job_test", webhook: None };
    tokio::time::timeout(TEST_TIMEOUT, b.submit_video(call)).await.unwrap().unwrap()
}

async fn poll(b: &AnyBackend, h: &JobHandle) -> Result<JobPoll, BackendError> {
    tokio::time::timeout(TEST_TIMEOUT, b.poll_job(h)).await.unwrap()
}

/// Polls until the job leaves Queued/Running; every poll, the last one included.
async fn poll_to_end(b: &AnyBackend, h: &JobHandle) -> Vec<JobPoll> {
    let mut polls = Vec::new();
    for _ in 0..50 {
        let p = poll(b, h).await.unwrap();
        let ended = !matches!(p.state, JobState::Queued { .. } | JobState::Running { .. });
        polls.push(p);
        if ended {
            return polls;
        }
    }
    panic!("the job never ended: {polls:?}");
}

fn last_state(polls: &[JobPoll]) -> &JobState {
    &polls.last().unwrap().state
}

/// The handle as the database stores it: no key in it.
fn assert_no_secret(h: &JobHandle, key: &str) {
    let stored = serde_json::to_string(h).unwrap();
    assert!(!stored.contains(key), "the stored handle holds the API key: {stored}");
    let back: JobHandle = serde_json::from_str(&stored).unwrap();
    assert_eq!(&back, h, "the handle survives the database");
}

async fn assert_mp4(b: &AnyBackend, h: &JobHandle) -> Vec<easel::backends::JobOutput> {
    let outputs = tokio::time::timeout(TEST_TIMEOUT, b.fetch_outputs(h)).await.unwrap().unwrap();
    assert_eq!(outputs[0].kind, OutputKind::Video);
    assert_eq!(outputs[0].mime, "video/mp4");
    assert_eq!(outputs[0].bytes.as_ref(), support::fal::mp4().as_slice(), "the fake's MP4, byte for byte");
    outputs
}

#[tokio::test]
async fn fal_video_queue_round_trip() {
    let fal = support::fal::start().await;
    let v = &fal.state.video;
    v.queued_polls.store(2, Ordering::SeqCst);
    v.running_polls.store(2, Ordering::SeqCst);
    let (b, model) = fal_backend(&fal.url);
    let mut req = request(json!({"cfg_scale": 0.5, "duration": 60, "aspect_ratio": "21:9"}));
    req.reference = Some(ReferenceImage { bytes: support::openai::png(9).into(), format: ImageFormat::Png });
    let h = submit(&b, &model, &req).await;

    assert_eq!(v.submit_paths.lock().unwrap().as_slice(), ["/fal-ai/kling-video/v2/master/text-to-video"]);
    let sent = v.submitted.lock().unwrap()[0].clone();
    assert_eq!(sent["prompt"], "a fox running through snow");
    assert_eq!(sent["duration"], "8", "seconds as the video models take them; `extra` cannot change them");
    assert_eq!(sent["aspect_ratio"], "16:9", "from the size; `extra` cannot change it");
    assert_eq!((sent["negative_prompt"].as_str(), sent["seed"].as_u64()), (Some("blur"), Some(42)));
    assert_eq!(sent["cfg_scale"], 0.5, "tuning fields of `extra` are merged");
    assert!(sent["image_url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert_eq!(h.upstream_id, "vid-1");
    for field in ["status_url", "response_url", "cancel_url", "request_id"] {
        assert!(h.meta[field].is_string(), "the handle keeps `{field}`: {}", h.meta);
    }
    assert_no_secret(&h, support::fal::KEY);

    let polls = poll_to_end(&b, &h).await;
    let states: Vec<&JobState> = polls.iter().map(|p| &p.state).collect();
    assert_eq!(
        states,
        [
            &JobState::Queued { position: Some(1) },
            &JobState::Queued { position: Some(0) },
            &JobState::Running { progress: None },
            &JobState::Running { progress: None },
            &JobState::Succeeded,
        ]
    );
    let logs: Vec<Vec<String>> = polls.iter().map(|p| p.logs.clone()).collect();
    assert_eq!(logs[2], ["frame batch 1"]);
    assert_eq!(logs[3], ["frame batch 2"], "only the lines not reported before");
    assert!(logs[4].is_empty());
    assert!(v.poll_queries.lock().unwrap().iter().all(|q| q.contains("logs=1")), "polled with logs");
    let outputs = assert_mp4(&b, &h).await;
    assert_eq!(outputs.len(), 1);
    assert!(v.auth.lock().unwrap().iter().all(|a| a == &format!("Key {}", support::fal::KEY)), "the key on every call");
}

#[tokio::test]
async fn fal_video_failure_cancel_and_lost() {
    let fal = support::fal::start().await;
    let v = &fal.state.video;
    let (b, model) = fal_backend(&fal.url);

    *v.fail_with.lock().unwrap() = Some("CUDA out of memory".into());
    let failed = submit(&b, &model, &request(json!({}))).await;
    match last_state(&poll_to_end(&b, &failed).await) {
        JobState::Failed { code: JobErrorCode::UpstreamFailed, message } => {
            assert!(message.contains("CUDA out of memory"))
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    *v.fail_with.lock().unwrap() = None;

    v.queued_polls.store(100, Ordering::SeqCst);
    let queued = submit(&b, &model, &request(json!({}))).await;
    assert!(matches!(poll(&b, &queued).await.unwrap().state, JobState::Queued { .. }));
    b.cancel_job(&queued).await.unwrap();
    assert_eq!(v.cancelled.lock().unwrap().as_slice(), ["vid-2"], "PUT cancel_url of that request");
    assert!(matches!(poll(&b, &queued).await.unwrap().state, JobState::Failed { .. }), "a cancelled request ends");

    *v.odd_status.lock().unwrap() = Some("IN_PREPARATION".into());
    assert_eq!(poll(&b, &queued).await.unwrap().state, JobState::Running { progress: None }, "unknown = running");
    *v.odd_status.lock().unwrap() = None;

    v.lose.store(true, Ordering::SeqCst);
    assert_eq!(poll(&b, &queued).await.unwrap().state, JobState::Lost, "404 for the request = lost");
}

#[tokio::test]
async fn fal_video_5xx_poll_is_an_error_and_the_job_goes_on() {
    let fal = support::fal::start().await;
    let v = &fal.state.video;
    v.running_polls.store(1, Ordering::SeqCst);
    let (b, model) = fal_backend(&fal.url);
    let h = submit(&b, &model, &request(json!({}))).await;
    v.errors_5xx.store(1, Ordering::SeqCst);
    let e = poll(&b, &h).await.unwrap_err();
    assert!(e.is_backend_fault(), "{e}");
    assert_eq!(last_state(&poll_to_end(&b, &h).await), &JobState::Succeeded, "polled again later, it finished");
}

#[tokio::test]
async fn fal_video_output_outside_the_outbound_policy_is_refused() {
    let fal = support::fal::start().await;
    *fal.state.video.video_url.lock().unwrap() = Some("http://files.example.invalid/clip.mp4".into());
    let (b, model) = fal_backend(&fal.url);
    let h = submit(&b, &model, &request(json!({}))).await;
    assert_eq!(last_state(&poll_to_end(&b, &h).await), &JobState::Succeeded);
    let e = b.fetch_outputs(&h).await.unwrap_err();
    assert!(e.to_string().contains("allow_output_hosts"), "{e}");
}

#[tokio::test]
async fn replicate_video_prediction_round_trip() {
    let rep = support::replicate::start().await;
    let v = &rep.state.video;
    v.queued_polls.store(1, Ordering::SeqCst);
    v.running_polls.store(2, Ordering::SeqCst);
    let (b, model) = replicate_backend(&rep.url);
    let h = submit(&b, &model, &request(json!({"prompt_optimizer": false, "num_frames": 999}))).await;
    assert_eq!(v.submit_paths.lock().unwrap().as_slice(), ["/v1/models/minimax/video-01/predictions"]);
    let sent = v.submitted.lock().unwrap()[0]["input"].clone();
    assert_eq!((sent["duration"].as_u64(), sent["aspect_ratio"].as_str()), (Some(8), Some("16:9")));
    assert_eq!((sent["seed"].as_u64(), sent["prompt_optimizer"].as_bool()), (Some(42), Some(false)));
    assert!(sent.get("num_frames").is_none(), "`extra` cannot set the length");
    assert_eq!(h.upstream_id, "vp-1");
    assert!(h.meta["get"].as_str().unwrap().ends_with("/v1/predictions/vp-1"));
    assert!(h.meta["cancel"].as_str().unwrap().ends_with("/v1/predictions/vp-1/cancel"));
    assert_no_secret(&h, support::replicate::TOKEN);

    let polls = poll_to_end(&b, &h).await;
    let states: Vec<&JobState> = polls.iter().map(|p| &p.state).collect();
    assert_eq!(
        states,
        [
            &JobState::Queued { position: None },
            &JobState::Running { progress: Some(0.33) },
            &JobState::Running { progress: Some(0.66) },
            &JobState::Succeeded,
        ],
        "progress from the logs' progress bar"
    );
    assert!(polls[1].logs.iter().any(|l| l.contains("33%")));
    assert_mp4(&b, &h).await;
    assert!(v.auth.lock().unwrap().iter().all(|a| a == &format!("Bearer {}", support::replicate::TOKEN)));
}

#[tokio::test]
async fn replicate_video_failure_cancel_lost_5xx_and_policy() {
    let rep = support::replicate::start().await;
    let v = &rep.state.video;
    let (b, model) = replicate_backend(&rep.url);

    *v.fail_with.lock().unwrap() = Some("NSFW content detected".into());
    let h = submit(&b, &model, &request(json!({}))).await;
    match last_state(&poll_to_end(&b, &h).await) {
        JobState::Failed { code: JobErrorCode::UpstreamRejected, message } => assert!(message.contains("NSFW")),
        other => panic!("expected a rejection, got {other:?}"),
    }
    *v.fail_with.lock().unwrap() = None;

    v.queued_polls.store(100, Ordering::SeqCst);
    let h = submit(&b, &model, &request(json!({}))).await;
    v.errors_5xx.store(1, Ordering::SeqCst);
    assert!(poll(&b, &h).await.is_err(), "a 503 poll is an error");
    assert!(matches!(poll(&b, &h).await.unwrap().state, JobState::Queued { .. }), "the job did not end");
    b.cancel_job(&h).await.unwrap();
    assert_eq!(v.cancelled.lock().unwrap().as_slice(), ["vp-2"]);
    assert!(matches!(poll(&b, &h).await.unwrap().state, JobState::Failed { code: JobErrorCode::Canceled, .. }));

    v.lose.store(true, Ordering::SeqCst);
    assert_eq!(poll(&b, &h).await.unwrap().state, JobState::Lost);
    v.lose.store(false, Ordering::SeqCst);

    v.queued_polls.store(0, Ordering::SeqCst);
    *v.video_url.lock().unwrap() = Some("https://evil.example.invalid/clip.mp4".into());
    let h = submit(&b, &model, &request(json!({}))).await;
    v.cancelled.lock().unwrap().clear();
    assert_eq!(last_state(&poll_to_end(&b, &h).await), &JobState::Succeeded);
    let e = b.fetch_outputs(&h).await.unwrap_err();
    assert!(e.to_string().contains("allow_output_hosts"), "{e}");
}

#[tokio::test]
async fn openai_video_round_trip_with_thumbnail() {
    let oa = support::openai::start().await;
    let v = &oa.state.video;
    v.queued_polls.store(1, Ordering::SeqCst);
    v.running_polls.store(1, Ordering::SeqCst);
    let (b, model) = openai_backend(&oa.url, "5s");
    let mut req = request(json!({}));
    req.reference = Some(ReferenceImage { bytes: support::openai::png(3).into(), format: ImageFormat::Png });
    let h = submit(&b, &model, &req).await;
    let sent = v.submitted.lock().unwrap()[0].clone();
    assert_eq!((sent["model"].as_str(), sent["seconds"].as_str()), (Some("sora-2"), Some("8")), "seconds as a string");
    assert_eq!(sent["size"], "1280x720");
    assert!(sent["input_reference"]["image_url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert_eq!(h.upstream_id, "video_1");
    assert_no_secret(&h, support::openai::KEY);

    let states: Vec<JobState> = poll_to_end(&b, &h).await.into_iter().map(|p| p.state).collect();
    assert_eq!(
        states,
        [JobState::Queued { position: None }, JobState::Running { progress: Some(0.5) }, JobState::Succeeded]
    );
    let outputs = assert_mp4(&b, &h).await;
    assert_eq!(outputs.len(), 2);
    assert_eq!((outputs[1].kind, outputs[1].mime), (OutputKind::Thumbnail, "image/webp"));
    assert!(v.auth.lock().unwrap().iter().all(|a| a == &format!("Bearer {}", support::openai::KEY)));

    // A finished video can be deleted; then it is gone.
    b.cancel_job(&h).await.unwrap();
    assert_eq!(v.cancelled.lock().unwrap().as_slice(), ["video_1"]);
    assert_eq!(poll(&b, &h).await.unwrap().state, JobState::Lost);
}

#[tokio::test]
async fn openai_video_failure_running_cancel_lost_and_errors() {
    let oa = support::openai::start().await;
    let v = &oa.state.video;
    let (b, model) = openai_backend(&oa.url, "300ms");

    *v.fail_with.lock().unwrap() = Some("The video could not be generated.".into());
    let h = submit(&b, &model, &request(json!({}))).await;
    match last_state(&poll_to_end(&b, &h).await) {
        JobState::Failed { code: JobErrorCode::UpstreamFailed, message } => {
            assert!(message.contains("could not be generated"))
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    *v.fail_with.lock().unwrap() = None;

    v.running_polls.store(100, Ordering::SeqCst);
    let h = submit(&b, &model, &request(json!({}))).await;
    assert!(matches!(poll(&b, &h).await.unwrap().state, JobState::Running { .. }));
    let e = b.cancel_job(&h).await.unwrap_err();
    assert!(e.to_string().contains("Only completed or failed videos can be deleted"), "the refusal is shown: {e}");

    v.errors_5xx.store(1, Ordering::SeqCst);
    assert!(poll(&b, &h).await.unwrap_err().is_backend_fault());
    v.latency_ms.store(2000, Ordering::SeqCst);
    let e = poll(&b, &h).await.unwrap_err();
    assert_eq!(e.outcome(), "timeout", "a poll slower than the backend's timeout: {e}");
    v.latency_ms.store(0, Ordering::SeqCst);
    assert!(matches!(poll(&b, &h).await.unwrap().state, JobState::Running { .. }), "the job did not end");

    *v.odd_status.lock().unwrap() = Some("preprocessing".into());
    assert!(matches!(poll(&b, &h).await.unwrap().state, JobState::Running { .. }), "an unknown status = running");
    *v.odd_status.lock().unwrap() = None;

    v.lose.store(true, Ordering::SeqCst);
    assert_eq!(poll(&b, &h).await.unwrap().state, JobState::Lost);
}
