//! `/v1/images/edits` end to end against the simulated backend (which really edits: it repaints where the mask is
//! transparent), and a huggingface model without `edit_task` (which cannot edit): multipart `image`/`image[]`/`mask`, JSON data URLs and `file_id`s, and what bad inputs get.

use base64::Engine;
use serde_json::json;

use crate::support::{TEST_TIMEOUT, spawn_gateway};

const CONFIG: &str = r#"
backends:
  sim:
    kind: simulated
  hf:
    kind: huggingface
    url: http://127.0.0.1:9
models:
  - id: sim
    backends: [sim]
  - id: text-only
    backends: [hf]
"#;

fn png(w: u32, h: u32, rgba: [u8; 4]) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(w, h, image::Rgba(rgba)));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// A mask whose left half is transparent (edit here) and right half opaque (keep).
fn half_mask(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, _| {
        if x < w / 2 { image::Rgba([0, 0, 0, 0]) } else { image::Rgba([0, 0, 0, 255]) }
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

async fn send(gw: &crate::support::Gateway, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let _ = gw;
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn decode(v: &serde_json::Value) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[tokio::test]
async fn multipart_edit_with_mask_keeps_the_opaque_area() {
    let gw = spawn_gateway(CONFIG).await;
    let form = reqwest::multipart::Form::new()
        .text("model", "sim")
        .text("prompt", "paint the left half")
        .text("response_format", "b64_json")
        .text("seed", "3")
        .part(
            "image[]",
            reqwest::multipart::Part::bytes(png(40, 20, [10, 200, 30, 255]))
                .file_name("a.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .part(
            "image[]",
            reqwest::multipart::Part::bytes(png(40, 20, [0, 0, 0, 255]))
                .file_name("b.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .part(
            "mask",
            reqwest::multipart::Part::bytes(half_mask(40, 20)).file_name("mask.png").mime_str("image/png").unwrap(),
        );
    let (s, body) = send(&gw, gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form)).await;
    assert_eq!(s, 200, "{body}");
    let out = decode(&body["data"][0]["b64_json"]);
    assert_eq!((out.width(), out.height()), (40, 20), "no size: the input's size");
    assert_eq!(out.get_pixel(35, 10).0, [10, 200, 30], "opaque mask: the input is kept");
    assert_ne!(out.get_pixel(2, 10).0, [10, 200, 30], "transparent mask: repainted");
    assert_eq!(body["size"], "40x20");
}

#[tokio::test]
async fn json_edit_with_data_url_and_file_id() {
    let gw = spawn_gateway(CONFIG).await;
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png(16, 16, [200, 0, 0, 255]))
    );
    let (s, _, body) = gw
        .post_json("/v1/images/edits", json!({"model": "sim", "prompt": "p", "images": [{"image_url": data_url}], "size": "32x32", "input_fidelity": "high"}))
        .await;
    assert_eq!(s, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    let id = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    // Edit the output of the first edit by its file id.
    let (s, _, body) = gw
        .post_json(
            "/v1/images/edits",
            json!({"model": "sim", "prompt": "again", "images": [{"file_id": id}], "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let out = decode(&body["data"][0]["b64_json"]);
    assert_eq!((out.width(), out.height()), (32, 32));
}

#[tokio::test]
async fn bad_edit_inputs_get_clear_errors() {
    let gw = spawn_gateway(CONFIG).await;
    let ok_image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png(8, 8, [1, 2, 3, 255]))
    );
    let cases = [
        (json!({"model": "sim", "prompt": "p"}), 400, "image", "at least one `image`"),
        (
            json!({"model": "sim", "prompt": "p", "images": [{"image_url": "https://example.com/a.png"}]}),
            400,
            "images",
            "does not fetch image URLs",
        ),
        (
            json!({"model": "sim", "prompt": "p", "images": [{"image_url": "data:image/png;base64,aGVsbG8="}]}),
            400,
            "images",
            "not a PNG, JPEG or WebP",
        ),
        (
            json!({"model": "sim", "prompt": "p", "images": [{"file_id": "img_00000000000000000000000000000000.png"}]}),
            400,
            "images",
            "was not issued",
        ),
        (json!({"model": "sim", "prompt": "p", "images": "x"}), 400, "images", "must be a list"),
        (
            json!({"model": "sim", "prompt": "p", "images": [{"image_url": ok_image}], "input_fidelity": "max"}),
            400,
            "input_fidelity",
            "high or low",
        ),
        (
            json!({"model": "text-only", "prompt": "p", "images": [{"image_url": ok_image}]}),
            400,
            "model",
            "cannot edit images",
        ),
    ];
    for (body, status, param, needle) in cases {
        let (s, _, resp) = gw.post_json("/v1/images/edits", body.clone()).await;
        assert_eq!(s, status, "{body} → {resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
        assert!(resp["error"]["message"].as_str().unwrap().contains(needle), "{resp}");
    }
    let form = reqwest::multipart::Form::new()
        .text("model", "sim")
        .text("prompt", "p")
        .part("image", reqwest::multipart::Part::bytes(b"plain text".to_vec()).file_name("a.txt"));
    let (s, body) = send(&gw, gw.client.post(gw.endpoint("/v1/images/edits")).multipart(form)).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["param"], "image");
}
