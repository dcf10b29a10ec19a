//! Streamed image answers (`stream: true`, `partial_images`): Server-Sent Events read one by one, partial images
//! from the backends' real previews (the simulated backend's, ComfyUI's binary preview frames), edit event names,
//! validation, and billing (a client that leaves mid-stream is not charged).

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, key};
use crate::support::{self, Gateway, TEST_TIMEOUT, spawn_gateway, spawn_gateway_env};

fn simulated(latency: &str) -> String {
    format!(
        "backends:\n  sim:\n    kind: simulated\n    latency: {latency}\nmodels:\n  - id: sim\n    backends: [sim]\n    default_size: 64x48\n    credits: 1\n"
    )
}

/// An open event stream, read event by event.
struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Events {
    async fn open(gw: &Gateway, path: &str, secret: Option<&str>, body: Value) -> Self {
        let mut req = gw.client.post(gw.endpoint(path)).json(&body);
        if let Some(s) = secret {
            req = req.bearer_auth(s);
        }
        let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Self { resp, buf: Vec::new() }
    }

    /// The next event's name and data; `None` at the end of the stream.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw = String::from_utf8(self.buf.drain(..end + 2).collect()).unwrap();
                let (mut name, mut data) = (None, None);
                for line in raw.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_owned());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(d).unwrap());
                    }
                }
                return Some((name.expect("an event: line"), data.expect("a data: line")));
            }
            match tokio::time::timeout(TEST_TIMEOUT, self.resp.chunk()).await.unwrap().unwrap() {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => {
                    assert!(self.buf.is_empty(), "the stream ended inside an event");
                    return None;
                }
            }
        }
    }

    async fn all(mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}

fn image(data: &Value) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(data["b64_json"].as_str().unwrap()).unwrap();
    image::load_from_memory(&bytes).unwrap()
}

/// Checks the fields every event has, and that the `event:` name is the data's `type`.
fn check_shape(name: &str, data: &Value) {
    assert_eq!(data["type"], name);
    for field in ["b64_json", "created_at", "size", "quality", "background", "output_format"] {
        assert!(!data[field].is_null(), "`{field}` missing in {name}");
    }
}

#[tokio::test]
async fn the_simulated_backend_streams_its_previews_then_the_final_image() {
    let gw = spawn_gateway(&simulated("200ms")).await;
    let body = json!({"model": "sim", "prompt": "a red apple", "stream": true, "partial_images": 2});
    let events = Events::open(&gw, "/v1/images/generations", None, body).await.all().await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        check_shape(name, data);
        if i < 2 {
            assert_eq!(data["partial_image_index"], i);
            // A real preview: smaller than the final image.
            assert_eq!((image(data).width(), image(data).height()), (16, 12));
        }
    }
    let (_, done) = &events[2];
    assert_eq!((image(done).width(), image(done).height()), (64, 48));
    assert_eq!(done["size"], "64x48");
    assert_eq!(done["output_format"], "png");
    assert!(done.get("usage").is_none(), "no token usage is invented for a backend that reports none");
    assert!(done.get("partial_image_index").is_none());
    // The previews are blurred, so they differ from each other.
    assert_ne!(events[0].1["b64_json"], events[1].1["b64_json"]);
}

#[tokio::test]
async fn partial_images_zero_sends_only_the_completed_event() {
    let gw = spawn_gateway(&simulated("0ms")).await;
    for body in [
        json!({"model": "sim", "prompt": "p", "stream": true, "partial_images": 0}),
        json!({"model": "sim", "prompt": "p", "stream": true}),
    ] {
        let events = Events::open(&gw, "/v1/images/generations", None, body).await.all().await;
        assert_eq!(events.len(), 1, "{events:?}");
        check_shape("image_generation.completed", &events[0].1);
        assert_eq!(image(&events[0].1).width(), 64);
    }
}

#[tokio::test]
async fn comfyui_partials_are_its_binary_preview_frames() {
    let comfy = support::comfyui::start().await;
    comfy.state.knobs.run_ms.store(100, std::sync::atomic::Ordering::SeqCst);
    let workflows = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");
    let yaml = format!(
        "backends:\n  comfy:\n    kind: comfyui\n    url: {}\n    timeout: 10s\n    poll_interval: 20ms\nmodels:\n  - id: free\n    backends: [comfy]\n    workflow: {workflows}/comfyui-model-free.json\n    default_size: 32x24\n",
        comfy.url
    );
    let gw = spawn_gateway(&yaml).await;
    let body = json!({"model": "free", "prompt": "p", "seed": 7, "stream": true, "partial_images": 2});
    let events = Events::open(&gw, "/v1/images/generations", None, body).await.all().await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    // Five steps, two previews wanted: the frames after steps 2 and 4, as ComfyUI sent them (JPEG, green = 40 × step).
    for (i, step) in [(0usize, 2u8), (1, 4)] {
        let data = &events[i].1;
        check_shape(&events[i].0, data);
        assert_eq!(data["output_format"], "jpeg");
        assert_eq!(data["partial_image_index"], i);
        let preview = image(data).to_rgb8();
        assert_eq!(preview.dimensions(), (8, 6));
        let green = preview.get_pixel(4, 3).0[1];
        assert!(green.abs_diff(step * 40) <= 4, "preview {i} has green {green}, not that of step {step}");
    }
    let done = &events[2].1;
    assert_eq!(done["output_format"], "png");
    assert_eq!((image(done).width(), image(done).height()), (32, 24));
}

#[tokio::test]
async fn edits_stream_with_the_edit_event_names() {
    let gw = spawn_gateway(&simulated("40ms")).await;
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([10, 200, 30])))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let body =
        json!({"model": "sim", "prompt": "p", "images": [{"image_url": url}], "stream": true, "partial_images": 1});
    let events = Events::open(&gw, "/v1/images/edits", None, body).await.all().await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["image_edit.partial_image", "image_edit.completed"]);
    for (name, data) in &events {
        check_shape(name, data);
    }
    assert_eq!(events[1].1["size"], "32x32", "an edit keeps the input's size");
}

#[tokio::test]
async fn bad_stream_parameters_are_400_naming_them() {
    let gw = spawn_gateway(&simulated("0ms")).await;
    let cases = [
        (json!({"partial_images": 4}), "partial_images"),
        (json!({"partial_images": -1}), "partial_images"),
        (json!({"partial_images": "x"}), "partial_images"),
        (json!({"n": 2}), "n"),
        (json!({"response_format": "url"}), "response_format"),
    ];
    for (extra, param) in cases {
        let mut body = json!({"model": "sim", "prompt": "p", "stream": true});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, _, err) = gw.post_json("/v1/images/generations", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(err["error"]["message"].as_str().unwrap().contains(param), "{err}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_not_charged() {
    let yaml = format!("auth:\n  mode: keys\n{}", simulated("1500ms"));
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let secret = key(&gw, 10.0).await;
    let body = json!({"model": "sim", "prompt": "p", "stream": true, "partial_images": 3});
    let mut events = Events::open(&gw, "/v1/images/generations", Some(&secret), body.clone()).await;
    let (name, _) = events.next().await.unwrap();
    assert_eq!(name, "image_generation.partial_image");
    assert_eq!(credits(&gw, &secret).await, (9_000, 1_000), "the price is held while the stream runs");
    drop(events);
    let deadline = Instant::now() + TEST_TIMEOUT;
    let available = loop {
        let (available, held) = credits(&gw, &secret).await;
        if held == 0 {
            break available;
        }
        assert!(Instant::now() < deadline, "the hold never settled: {available} available, {held} held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(available, 10_000, "nothing completed, nothing charged");

    // A stream read to its `completed` event is charged once.
    let events = Events::open(&gw, "/v1/images/generations", Some(&secret), body).await.all().await;
    assert_eq!(events.last().unwrap().0, "image_generation.completed");
    assert_eq!(events.len(), 4);
    let deadline = Instant::now() + TEST_TIMEOUT;
    while credits(&gw, &secret).await != (9_000, 0) {
        assert!(Instant::now() < deadline, "the completed stream was not charged once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failure_after_the_first_partial_ends_the_stream_with_an_error_event() {
    let comfy = support::comfyui::start().await;
    comfy.state.knobs.run_ms.store(50, std::sync::atomic::Ordering::SeqCst);
    comfy.state.knobs.fail_exec.store(true, std::sync::atomic::Ordering::SeqCst);
    let workflows = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");
    let yaml = format!(
        "backends:\n  comfy:\n    kind: comfyui\n    url: {}\n    timeout: 10s\n    poll_interval: 20ms\nmodels:\n  - id: free\n    backends: [comfy]\n    workflow: {workflows}/comfyui-model-free.json\n    default_size: 32x24\n",
        comfy.url
    );
    let gw = spawn_gateway(&yaml).await;
    let body = json!({"model": "free", "prompt": "p", "stream": true, "partial_images": 1});
    let events = Events::open(&gw, "/v1/images/generations", None, body).await.all().await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["image_generation.partial_image", "error"]);
    // OpenAI's error object, which the SDK raises on.
    let err = &events[1].1["error"];
    assert!(err["message"].as_str().unwrap().contains("out of memory"), "{err}");
    for key in ["type", "param", "code"] {
        assert!(err.get(key).is_some(), "error.{key} missing: {err}");
    }
}
