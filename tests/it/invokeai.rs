//! The `invokeai` adapter against the fake InvokeAI: the example graphs rendered per image with their own
//! seeds, 6.x item ids and the 5.x queue list, both response formats, failed items (502), invalid graphs (400),
//! timeouts (504) and disconnects that cancel the queue items, edits through uploads, and `/health`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::support::invokeai::{self, FakeInvoke};
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway};

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");

/// One InvokeAI backend and one model `m` running `workflow` (a file under `examples/workflows`, or a path).
fn config(fake: &FakeInvoke, workflow: &str, timeout: &str) -> String {
    let path = if workflow.starts_with('/') { workflow.to_owned() } else { format!("{WORKFLOWS}/{workflow}") };
    format!(
        "backends:\n  invoke:\n    kind: invokeai\n    url: {}\n    timeout: {timeout}\n    poll_interval: 20ms\n\
         models:\n  - id: m\n    backends: [invoke]\n    workflow: {path}\n    default_size: 64x48\n",
        fake.url
    )
}

fn decode(b64: &Value) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("b64_json")).unwrap();
    image::load_from_memory(&bytes).unwrap()
}

fn dims(img: &image::DynamicImage) -> (u32, u32) {
    (img.width(), img.height())
}

fn png(w: u32, h: u32, pixel: image::Rgba<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(w, h, pixel))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

async fn health_detail(gw: &Gateway) -> Value {
    let (status, _, body) = gw.get("/health").await;
    assert_eq!(status, 200);
    serde_json::from_slice::<Value>(&body).unwrap()["backends"]["invoke"].clone()
}

#[tokio::test]
async fn txt2img_graph_carries_prompt_seed_size_and_answers_in_both_formats() {
    let inv = invokeai::start().await;
    let gw = spawn_gateway(&config(&inv, "invokeai-sd15.json", "10s")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "m", "prompt": "a \"red\" fox", "negative_prompt": "blurry", "n": 2, "seed": 42,
                   "size": "96x64", "steps": 3, "guidance_scale": 5.5, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let images: Vec<_> = body["data"].as_array().unwrap().iter().map(|d| decode(&d["b64_json"])).collect();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].width(), images[0].height()), (96, 64));
    assert_ne!(images[0].to_rgb8().get_pixel(0, 0), images[1].to_rgb8().get_pixel(0, 0), "each image its own seed");

    let batches = inv.batches();
    assert_eq!(batches.len(), 2, "one batch per image");
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(b["prepend"], false);
        assert_eq!(b["batch"]["runs"], 1);
        assert_eq!(b["batch"]["origin"], "easel");
        let nodes = &b["batch"]["graph"]["nodes"];
        assert_eq!(nodes["pos"]["prompt"], "a \"red\" fox");
        assert_eq!(nodes["neg"]["prompt"], "blurry");
        assert_eq!(nodes["noise"]["seed"], 42 + i);
        assert_eq!((nodes["noise"]["width"].as_u64(), nodes["noise"]["height"].as_u64()), (Some(96), Some(64)));
        assert_eq!(nodes["denoise"]["steps"], 3);
        assert_eq!(nodes["denoise"]["cfg_scale"], 5.5);
    }
    let destination = batches[0]["batch"]["destination"].as_str().unwrap();
    assert!(destination.starts_with("easel:"), "{destination}");
    assert_eq!(batches[1]["batch"]["destination"], destination, "one destination per call");

    // The same call again answers with URLs to stored PNGs.
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "seed": 42})).await;
    assert_eq!(s, 200, "{body}");
    let (status, headers, bytes) = gw.get(body["data"][0]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(dims(&image::load_from_memory(&bytes).unwrap()), (64, 48));
    // Progress came over the socket, whose pings were answered.
    let inner = inv.state.inner.lock().unwrap();
    assert!(inner.subscribed >= 2 && inner.pongs >= 1, "subscribed {} pongs {}", inner.subscribed, inner.pongs);
}

#[tokio::test]
async fn version_5_items_are_found_in_the_queue_list_and_polling_works_without_the_socket() {
    let inv = invokeai::start().await;
    inv.set_version("5.15.0");
    inv.state.knobs.no_socket.store(true, Ordering::SeqCst);
    // A used server: the batch's items come after several pages of finished ones.
    inv.add_history(250);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "10s")).await;
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "m", "prompt": "p", "n": 2, "seed": 7, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let first = decode(&body["data"][0]["b64_json"]);
    assert_eq!(dims(&first), (64, 48));
    assert_ne!(first.to_rgb8().get_pixel(0, 0), decode(&body["data"][1]["b64_json"]).to_rgb8().get_pixel(0, 0));
    assert_eq!(inv.item(251)["status"], "completed");
    assert_eq!(inv.item(252)["status"], "completed");
    let graphs: Vec<Value> = inv.batches().iter().map(|b| b["batch"]["graph"].clone()).collect();
    assert_eq!(graphs[0]["nodes"]["blank"]["color"]["r"], 7, "the model-free graph takes the seed into its colour");
    assert_eq!(graphs[1]["nodes"]["blank"]["color"]["r"], 8);
    let h = health_detail(&gw).await;
    assert!(h["detail"].as_str().unwrap().starts_with("InvokeAI 5.15.0, queue `default`"), "{h}");
}

#[tokio::test]
async fn a_failed_item_is_a_502_naming_invokeais_error() {
    let inv = invokeai::start().await;
    inv.fail_items("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB");
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"), "{msg}");

    // A graph that validates but misses an input fails at run time, as on the real server.
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("missing.json");
    std::fs::write(
        &graph,
        r#"{"nodes": {"blur": {"id": "blur", "type": "img_blur", "radius": {{ seed % 3 }}}}, "edges": []}"#,
    )
    .unwrap();
    let inv = invokeai::start().await;
    let gw = spawn_gateway(&config(&inv, graph.to_str().unwrap(), "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 502, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("MissingInputException: Node img_blur missing value or connection for field image"), "{msg}");
}

#[tokio::test]
async fn an_invalid_graph_is_a_400_with_invokeais_message() {
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("bad.json");
    std::fs::write(
        &graph,
        r#"{"nodes": {"x": {"id": "x", "type": "no_such_node", "width": {{ width }}}}, "edges": []}"#,
    )
    .unwrap();
    let inv = invokeai::start().await;
    let gw = spawn_gateway(&config(&inv, graph.to_str().unwrap(), "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "backend_rejected_request");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("body.batch.graph.nodes.x: Input tag 'no_such_node'"), "{msg}");
    assert!(msg.contains("bad.json"), "the hint names the template: {msg}");

    let inv = invokeai::start().await;
    inv.reject_enqueue("Edge destination field no_such_field does not exist in node blur");
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "10s")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "n": 2})).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("no_such_field does not exist in node blur"), "{body}");
    assert!(inv.batches().is_empty());
}

#[tokio::test]
async fn a_timeout_is_a_504_and_cancels_the_item() {
    let inv = invokeai::start().await;
    inv.set_step_ms(3000);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "300ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "backend_timeout");
    inv.wait_for("the timed-out item cancelled", |i| i.cancels == [1]).await;
    assert_eq!(inv.item(1)["status"], "canceled");
}

#[tokio::test]
async fn a_client_that_goes_away_gets_its_items_cancelled() {
    let inv = invokeai::start().await;
    inv.set_step_ms(2000);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "30s")).await;
    let request =
        gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "p", "n": 2}));
    let call = tokio::spawn(request.send());
    inv.wait_for("both items enqueued", |i| i.items.len() == 2).await;
    call.abort();
    inv.wait_for("both items cancelled", |i| i.cancels.len() == 2).await;
    let mut cancels = inv.cancels();
    cancels.sort_unstable();
    assert_eq!(cancels, [1, 2]);
    inv.wait_for("both items canceled", |i| i.items.values().all(|item| item["status"] == "canceled")).await;
}

#[tokio::test]
async fn a_cancelled_running_item_holds_the_slot_until_invokeai_has_stopped_it() {
    let inv = invokeai::start().await;
    inv.state.knobs.hold_nodes.store(true, Ordering::SeqCst);
    let yaml = config(&inv, "invokeai-model-free.json", "30s")
        .replace("    poll_interval: 20ms\n", "    poll_interval: 20ms\n    concurrency: {images: 1}\n");
    assert!(yaml.contains("concurrency: {images: 1}"));
    let gw = spawn_gateway(&yaml).await;
    let first = gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "a"}));
    let first = tokio::spawn(first.send());
    inv.wait_for("the first item running", |i| i.running == Some(1)).await;
    first.abort();
    inv.wait_for("the first item cancelled", |i| i.cancels == [1] && i.items[&1]["status"] == "canceled").await;

    // The item is marked canceled, but its node still runs: easel keeps the one slot and watches the processor.
    let second = gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "b"}));
    let second = tokio::spawn(second.send());
    let reads = inv.state.inner.lock().unwrap().status_reads;
    inv.wait_for("easel watching the processor", |i| i.status_reads >= reads + 3).await;
    assert_eq!(inv.state.inner.lock().unwrap().items.len(), 1, "the next request waits while the GPU is busy");

    inv.release_nodes();
    let resp = tokio::time::timeout(TEST_TIMEOUT, second).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(inv.state.inner.lock().unwrap().items.len(), 2, "sent once the processor let go");
}

#[tokio::test]
async fn an_enqueue_in_flight_when_the_client_goes_away_is_finished_then_cancelled() {
    // The real server answered an enqueue late while its processor started another item.
    let inv = invokeai::start().await;
    inv.set_step_ms(2000);
    inv.state.knobs.enqueue_ms.store(300, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "30s")).await;
    let request =
        gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "m", "prompt": "p", "n": 2}));
    let call = tokio::spawn(request.send());
    inv.wait_for("the first item created", |i| i.items.len() == 1).await;
    call.abort();
    // The item whose answer was late is cancelled by id (and no more are enqueued once the gateway noticed).
    inv.wait_for("every item cancelled", |i| {
        i.cancels.contains(&1) && i.items.values().all(|item| item["status"] == "canceled")
    })
    .await;
    assert!(inv.state.inner.lock().unwrap().cancelled_destinations.is_empty());
}

#[tokio::test]
async fn a_timeout_during_an_enqueue_cancels_by_destination() {
    let inv = invokeai::start().await;
    inv.set_step_ms(2000);
    inv.state.knobs.enqueue_ms.store(3000, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "300ms")).await;
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "p"})).await;
    assert_eq!(s, 504, "{body}");
    let destination = inv.batches()[0]["batch"]["destination"].as_str().unwrap().to_owned();
    inv.wait_for("the destination cancelled", |i| i.cancelled_destinations == [destination.clone()]).await;
    assert_eq!(inv.item(1)["status"], "canceled");
}

#[tokio::test]
async fn edits_upload_image_and_mask_and_the_graph_names_them() {
    let inv = invokeai::start().await;
    let gw = spawn_gateway(&config(&inv, "invokeai-edit.json", "10s")).await;
    let b64 =
        |bytes: Vec<u8>| format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes));
    let image = png(40, 30, image::Rgba([200, 10, 10, 255]));
    let mask = png(40, 30, image::Rgba([0, 0, 0, 0]));
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "m", "prompt": "blur it", "images": [{"image_url": b64(image.clone())}],
                   "mask": {"image_url": b64(mask)}, "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(dims(&decode(&body["data"][0]["b64_json"])), (40, 30));
    let uploads = inv.uploads();
    assert_eq!(uploads.len(), 2, "image and mask");
    assert_eq!(uploads[0].bytes, image);
    assert_eq!(uploads[0].content_type, "image/png");
    assert_eq!(uploads[0].query.get("image_category").map(String::as_str), Some("user"));
    assert_eq!(uploads[0].query.get("is_intermediate").map(String::as_str), Some("true"));
    let nodes = inv.batches()[0]["batch"]["graph"]["nodes"].clone();
    assert_eq!(nodes["input"]["image"]["image_name"], uploads[0].name.as_str());
    assert_eq!(nodes["mask"]["image"]["image_name"], uploads[1].name.as_str());
    assert!(nodes.get("paste").is_some(), "with a mask the edit pastes the blur through it");
    let deleted = inv.state.inner.lock().unwrap().deleted_images.clone();
    assert_eq!(deleted, [uploads[0].name.clone(), uploads[1].name.clone()], "the call deletes what it uploaded");

    // Without a mask, the same template blurs the whole image.
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "m", "prompt": "blur it", "images": [{"image_url": b64(image)}]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let nodes = inv.batches()[1]["batch"]["graph"]["nodes"].clone();
    assert!(nodes.get("mask").is_none() && nodes.get("paste").is_none(), "{nodes}");
}

#[tokio::test]
async fn edits_the_graph_cannot_use_are_refused() {
    let inv = invokeai::start().await;
    let dir = tempfile::tempdir().unwrap();
    // An edit graph that loads `image` only.
    let unmasked = r#"{"id": "g", "nodes": {
        "input": {"id": "input", "type": "image", "image": {"image_name": {{ image | tojson }}}, "is_intermediate": true},
        "blur": {"id": "blur", "type": "img_blur", "radius": 4.0, "blur_type": "gaussian", "is_intermediate": false}},
      "edges": [{"source": {"node_id": "input", "field": "image"}, "destination": {"node_id": "blur", "field": "image"}}]}"#;
    std::fs::write(dir.path().join("unmasked.json"), unmasked).unwrap();
    let yaml = format!(
        "{}  - id: nomask\n    backends: [invoke]\n    workflow: {}\n",
        config(&inv, "invokeai-model-free.json", "10s"),
        dir.path().join("unmasked.json").display()
    );
    let gw = spawn_gateway(&yaml).await;
    let b64 =
        |bytes: Vec<u8>| format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes));
    let image = b64(png(40, 30, image::Rgba([200, 10, 10, 255])));
    let (s, _, body) =
        gw.post_json("/v1/images/edits", json!({"model": "m", "prompt": "p", "images": [{"image_url": image}]})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    assert_eq!(body["error"]["param"], "image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("model `m`") && msg.contains("no `image` input"), "{msg}");

    let mask = b64(png(40, 30, image::Rgba([0, 0, 0, 0])));
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "nomask", "prompt": "p", "images": [{"image_url": image}], "mask": {"image_url": mask}}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_operation");
    assert_eq!(body["error"]["param"], "mask");
    assert!(body["error"]["message"].as_str().unwrap().contains("model `nomask`"), "{body}");
    assert!(inv.uploads().is_empty() && inv.batches().is_empty(), "refused before anything reached InvokeAI");
}

#[tokio::test]
async fn health_shows_the_version_and_a_stopped_processor() {
    let inv = invokeai::start().await;
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "10s")).await;
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let h = health_detail(&gw).await;
        if h["ready"] == true {
            assert_eq!(h["kind"], "invokeai");
            assert!(h["detail"].as_str().unwrap().starts_with("InvokeAI 6.14.2, queue `default`"), "{h}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let inv = invokeai::start().await;
    inv.state.knobs.processor_started.store(false, Ordering::SeqCst);
    let gw = spawn_gateway(&config(&inv, "invokeai-model-free.json", "10s")).await;
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let h = health_detail(&gw).await;
        if h["detail"].as_str().is_some_and(|d| d.contains("not started")) {
            assert_eq!(h["ready"], false, "{h}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stopped processor never showed: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
