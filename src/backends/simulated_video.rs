//! The `simulated` backend's video jobs: a real animated GIF painted procedurally (a frame per quarter second of
//! the requested length, the prompt's colours shifting), ready after the backend's `latency`, with progress in
//! between and the backend's injected failures applied. It keeps no state: the handle carries when the job was
//! submitted, so a job survives an easel restart like a real upstream's would.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use serde_json::json;

use super::jobs::{JobErrorCode, JobHandle, JobOutput, JobPoll, JobState, OutputKind, VideoCall};
use crate::config::{BackendConfig, FailureMode};

/// Frames per second of a simulated clip.
const FPS: u32 = 4;
/// Largest side of a simulated clip (the real size is scaled down to it; this is a simulation).
const MAX_SIDE: u32 = 96;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Accepts the job; `fails` marks one the backend's `failure` knob will fail.
pub fn submit(cfg: &BackendConfig, call: VideoCall<'_>, fails: bool) -> JobHandle {
    let size = call.request.size.unwrap_or(call.model.default_size);
    JobHandle {
        upstream_id: format!("sim_{:016x}", rand::random::<u64>()),
        meta: json!({
            "submitted_ms": now_ms(),
            "latency_ms": cfg.simulation.as_ref().map_or(0, |s| s.latency.as_millis() as i64),
            "seconds": call.request.seconds,
            "width": size.width,
            "height": size.height,
            "prompt": call.request.prompt,
            "fails": fails,
        }),
    }
}

/// Where the job stands: running until `latency` has passed since submit, then done (or failed).
pub fn poll(cfg: &BackendConfig, handle: &JobHandle) -> JobPoll {
    let m = &handle.meta;
    let started = m["submitted_ms"].as_i64().unwrap_or(0);
    let latency = m["latency_ms"].as_i64().unwrap_or(0).max(1);
    let elapsed = now_ms() - started;
    let state = if elapsed < latency {
        JobState::Running { progress: Some(elapsed as f64 / latency as f64) }
    } else if m["fails"].as_bool().unwrap_or(false) {
        let message = cfg
            .simulation
            .as_ref()
            .and_then(|s| s.failure.as_ref())
            .map_or_else(|| "simulated failure".to_owned(), |f| f.message.clone());
        JobState::Failed { code: JobErrorCode::UpstreamFailed, message }
    } else {
        JobState::Succeeded
    };
    JobPoll { state, logs: Vec::new() }
}

/// Whether the `failure` knob fails the `n`th submit (status failures fail the job; a timeout one never ends).
pub fn fails(cfg: &BackendConfig, n: u64) -> bool {
    cfg.simulation
        .as_ref()
        .and_then(|s| s.failure.as_ref())
        .is_some_and(|f| matches!(f.mode, FailureMode::Status(_)) && n.is_multiple_of(u64::from(f.every)))
}

/// Paints the clip: an animated GIF and a PNG thumbnail of its first frame.
pub fn render(handle: &JobHandle) -> Result<Vec<JobOutput>, String> {
    let m = &handle.meta;
    let seconds = m["seconds"].as_u64().unwrap_or(4).clamp(1, 60) as u32;
    let (w, h) = (m["width"].as_u64().unwrap_or(64) as u32, m["height"].as_u64().unwrap_or(64) as u32);
    let scale = f64::from(MAX_SIDE) / f64::from(w.max(h).max(1));
    let (w, h) = if scale < 1.0 {
        (((f64::from(w) * scale) as u32).max(1), ((f64::from(h) * scale) as u32).max(1))
    } else {
        (w.max(1), h.max(1))
    };
    let prompt = m["prompt"].as_str().unwrap_or("");
    let hue = prompt.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let frames = (seconds * FPS) as usize;
    let mut gif = Vec::new();
    let mut first = None;
    {
        let mut enc = GifEncoder::new(&mut gif);
        enc.set_repeat(Repeat::Infinite).map_err(|e| e.to_string())?;
        for i in 0..frames {
            let t = i as u32;
            let img = RgbaImage::from_fn(w, h, |x, y| {
                let r = ((x * 255 / w.max(1)) + t * 8 + hue) % 256;
                let g = ((y * 255 / h.max(1)) + t * 4 + (hue >> 8)) % 256;
                let b = (t * 16 + (hue >> 16)) % 256;
                image::Rgba([r as u8, g as u8, b as u8, 255])
            });
            if first.is_none() {
                first = Some(img.clone());
            }
            enc.encode_frame(Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(1000 / FPS, 1)))
                .map_err(|e| e.to_string())?;
        }
    }
    let mut thumb = Vec::new();
    if let Some(f) = first {
        f.write_to(&mut std::io::Cursor::new(&mut thumb), image::ImageFormat::Png).map_err(|e| e.to_string())?;
    }
    Ok(vec![
        JobOutput { kind: OutputKind::Video, bytes: Bytes::from(gif), mime: "image/gif" },
        JobOutput { kind: OutputKind::Thumbnail, bytes: Bytes::from(thumb), mime: "image/png" },
    ])
}
