//! `simulated`: easel's built-in backend. No network and no model: it paints a PNG procedurally from the prompt
//! and seed (the same prompt, seed and size give the same bytes), with configurable latency and injected
//! failures (an error status or a hang, every Nth call). It is the model behind the built-in default
//! configuration, and it serves tests and benchmarks. Its latency passes in steps, with a blurred preview after each
//! but the last for a streaming client. `/v1/models` says it is a simulation.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use image::{ImageEncoder, Rgb, RgbImage};

use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport};
use crate::config::{BackendConfig, FailureMode};
use crate::request::ImageFormat;

pub const KIND: &str = "simulated";

/// The steps a simulated run reports (its latency is spread over them).
const STEPS: u32 = 4;

#[derive(Debug)]
pub struct SimulatedBackend {
    cfg: Arc<BackendConfig>,
    /// Calls so far, for "fail every Nth call".
    calls: AtomicU64,
}

impl SimulatedBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Self {
        Self { cfg, calls: AtomicU64::new(0) }
    }

    fn url(&self) -> String {
        format!("simulated://{}", self.cfg.name)
    }
}

impl Backend for SimulatedBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let sim = self.cfg.simulation.as_ref();
        let latency = sim.map_or(Duration::ZERO, |s| s.latency);
        if let Some(f) = sim.and_then(|s| s.failure.as_ref())
            && n.is_multiple_of(u64::from(f.every))
        {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let failure = match f.mode {
                FailureMode::Status(status) => {
                    Failure::Status { status, message: f.message.clone(), hint: None, retry_after: None }
                }
                FailureMode::Timeout => {
                    // Behave like a server that never answers: the caller's timeout decides.
                    tokio::time::sleep(self.cfg.timeout).await;
                    Failure::Timeout(self.cfg.timeout)
                }
            };
            return Err(BackendError::new(&self.cfg.name, self.cfg.kind, self.url(), failure));
        }
        let base_seed = call.seed.unwrap_or_else(rand::random);
        let prompt = call.request.prompt.clone();
        let (w, h) = (call.size.width, call.size.height);
        let count = call.count;
        let transparent = call.request.background.as_deref() == Some("transparent");
        let edit = call
            .edit
            .and_then(|e| e.images.first().map(|i| (i.bytes.clone(), e.mask.as_ref().map(|m| m.bytes.clone()))));
        let inputs: Vec<Bytes> = edit.iter().flat_map(|(i, m)| std::iter::once(i.clone()).chain(m.clone())).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|b| &b[..]).collect();
        let images = crate::media::run_decoding(&refs, move || {
            (0..u64::from(count))
                .map(|i| match &edit {
                    None => paint_with(&prompt, base_seed.wrapping_add(i), w, h, transparent),
                    Some((image, mask)) => {
                        let out = repaint(image, mask.as_deref(), &prompt, base_seed.wrapping_add(i), w, h)?;
                        if transparent { keep_alpha(&out, image) } else { Ok(out) }
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(crate::media::DecodeError::Invalid)
        })
        .await
        .map_err(|e| {
            let failure = match e {
                crate::media::DecodeError::TooLarge(m) => Failure::Rejected(m),
                crate::media::DecodeError::Invalid(m) => Failure::InvalidResponse(m),
            };
            BackendError::new(&self.cfg.name, self.cfg.kind, self.url(), failure)
        })?;
        // The latency passes in steps; after each but the last, a listening client gets a preview: the first
        // image, smaller and blurred, sharper at every step.
        for step in 1..=STEPS {
            if !latency.is_zero() {
                // Like a real backend that can stop work, a cancelled call ends now.
                tokio::select! {
                    () = tokio::time::sleep(latency / STEPS) => {}
                    () = call.cancel.cancelled() => {
                        let why = Failure::JobFailed("cancelled: the client went away".into());
                        return Err(BackendError::new(&self.cfg.name, self.cfg.kind, self.url(), why));
                    }
                }
            }
            call.progress.step(&self.cfg.name, f64::from(step), f64::from(STEPS));
            if step < STEPS
                && call.progress.wants_preview()
                && let Some(first) = images.first().cloned()
            {
                let sigma = 8.0 / (1u32 << step) as f32;
                let source = first.clone();
                let preview = crate::media::run_decoding(&[&first[..]], move || {
                    preview(&source, sigma).map_err(crate::media::DecodeError::Invalid)
                })
                .await;
                match preview {
                    Ok(bytes) => call.progress.preview(bytes, ImageFormat::Png),
                    Err(e) => tracing::debug!(error = %e, "No simulated preview."),
                }
            }
        }
        Ok(images
            .into_iter()
            .map(|bytes| ImageOutput {
                image: super::ImageBytes::Raw(bytes),
                format: ImageFormat::Png,
                revised_prompt: None,
                reported: None,
            })
            .collect())
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Ok(ProbeReport { ready: true, detail: "simulated backend: procedural images, no model runs".into() })
    }

    fn supports_edits(&self) -> bool {
        true
    }

    fn supports_transparency_for(&self, _model: &crate::config::ModelConfig) -> bool {
        true
    }

    fn supports_videos(&self) -> bool {
        true
    }

    async fn submit_video(&self, call: super::VideoCall<'_>) -> Result<super::JobHandle, BackendError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(super::simulated_video::submit(&self.cfg, call, super::simulated_video::fails(&self.cfg, n)))
    }

    async fn poll_job(&self, handle: &super::JobHandle) -> Result<super::JobPoll, BackendError> {
        Ok(super::simulated_video::poll(&self.cfg, handle))
    }

    async fn fetch_outputs(&self, handle: &super::JobHandle) -> Result<Vec<super::JobOutput>, BackendError> {
        let handle = handle.clone();
        tokio::task::spawn_blocking(move || super::simulated_video::render(&handle))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| BackendError::new(&self.cfg.name, self.cfg.kind, self.url(), Failure::InvalidResponse(e)))
    }

    async fn cancel_job(&self, _handle: &super::JobHandle) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A simulated edit: the input resized to the output size, with the procedural picture painted where the mask is
/// transparent (OpenAI's convention), or blended half-and-half over the whole image without a mask.
pub fn repaint(
    image: &[u8],
    mask: Option<&[u8]>,
    prompt: &str,
    seed: u64,
    width: u32,
    height: u32,
) -> Result<Bytes, String> {
    let input = crate::media::decode_blocking(image).map_err(|e| format!("the input image: {e}"))?;
    let input = input.resize_exact(width, height, image::imageops::FilterType::Triangle).to_rgb8();
    let mask = match mask {
        Some(m) => Some(
            crate::media::decode_blocking(m)
                .map_err(|e| format!("the mask: {e}"))?
                .resize_exact(width, height, image::imageops::FilterType::Nearest)
                .to_rgba8(),
        ),
        None => None,
    };
    let painted = image::load_from_memory(&paint(prompt, seed, width, height)?).map_err(|e| e.to_string())?.to_rgb8();
    let out = RgbImage::from_fn(width, height, |x, y| {
        let (a, b) = (input.get_pixel(x, y).0, painted.get_pixel(x, y).0);
        match &mask {
            Some(m) if m.get_pixel(x, y).0[3] == 0 => Rgb(b),
            Some(_) => Rgb(a),
            None => Rgb([
                ((a[0] as u16 + b[0] as u16) / 2) as u8,
                ((a[1] as u16 + b[1] as u16) / 2) as u8,
                ((a[2] as u16 + b[2] as u16) / 2) as u8,
            ]),
        }
    });
    encode_png(&out)
}

/// A preview of a finished picture: a quarter of its size, blurred by `sigma` pixels.
fn preview(image: &[u8], sigma: f32) -> Result<Bytes, String> {
    let img = crate::media::decode_blocking(image).map_err(|e| e.to_string())?;
    let (w, h) = ((img.width() / 4).max(1), (img.height() / 4).max(1));
    let small = img.resize_exact(w, h, image::imageops::FilterType::Triangle).to_rgb8();
    encode_png(&image::imageops::blur(&small, sigma))
}

/// Paints a deterministic picture: a diagonal gradient between two prompt-derived colours with seed-placed discs.
pub fn paint(prompt: &str, seed: u64, width: u32, height: u32) -> Result<Bytes, String> {
    paint_with(prompt, seed, width, height, false)
}

/// An edit with `background: transparent`: the edited picture keeps the input's alpha channel (what was
/// transparent in the input stays transparent).
fn keep_alpha(edited: &[u8], input: &[u8]) -> Result<Bytes, String> {
    let edited = crate::media::decode_blocking(edited).map_err(|e| e.to_string())?.to_rgb8();
    let (w, h) = edited.dimensions();
    let alpha = crate::media::decode_blocking(input)
        .map_err(|e| format!("the input image: {e}"))?
        .resize_exact(w, h, image::imageops::FilterType::Nearest)
        .to_rgba8();
    let out = image::RgbaImage::from_fn(w, h, |x, y| {
        let [r, g, b] = edited.get_pixel(x, y).0;
        image::Rgba([r, g, b, alpha.get_pixel(x, y).0[3]])
    });
    encode_rgba_png(&out)
}

/// [`paint`], with the gradient left fully transparent when `transparent` (only the discs are painted).
pub fn paint_with(prompt: &str, seed: u64, width: u32, height: u32, transparent: bool) -> Result<Bytes, String> {
    let mut h = DefaultHasher::new();
    prompt.hash(&mut h);
    let p = h.finish();
    let mut state = p ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        // xorshift64*: small, fast, deterministic.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let colour = |v: u64| Rgb([(v & 0xFF) as u8, ((v >> 8) & 0xFF) as u8, ((v >> 16) & 0xFF) as u8]);
    let (a, b) = (colour(p), colour(p >> 24));
    let discs: Vec<(f32, f32, f32, Rgb<u8>)> = (0..6)
        .map(|_| {
            let r = next();
            let cx = (r & 0xFFFF) as f32 / 65535.0 * width as f32;
            let cy = ((r >> 16) & 0xFFFF) as f32 / 65535.0 * height as f32;
            let rad = (0.05 + ((r >> 32) & 0xFF) as f32 / 255.0 * 0.2) * width.min(height) as f32;
            (cx, cy, rad * rad, colour(next()))
        })
        .collect();
    let span = (width + height).max(1) as f32;
    let in_disc = |x: u32, y: u32| {
        discs.iter().find(|(cx, cy, r2, _)| {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            dx * dx + dy * dy <= *r2
        })
    };
    let img = RgbImage::from_fn(width, height, |x, y| {
        if let Some((_, _, _, c)) = in_disc(x, y) {
            return *c;
        }
        let t = (x + y) as f32 / span;
        let mix = |i: usize| (a.0[i] as f32 * (1.0 - t) + b.0[i] as f32 * t) as u8;
        Rgb([mix(0), mix(1), mix(2)])
    });
    if !transparent {
        return encode_png(&img);
    }
    let rgba = image::RgbaImage::from_fn(width, height, |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0;
        image::Rgba([r, g, b, if in_disc(x, y).is_some() { 255 } else { 0 }])
    });
    encode_rgba_png(&rgba)
}

fn encode_rgba_png(img: &image::RgbaImage) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity((img.width() * img.height()) as usize / 2);
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgba8)
    .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(Bytes::from(out))
}

fn encode_png(img: &RgbImage) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity((img.width() * img.height()) as usize / 4);
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
    .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_picture_other_seed_other_picture() {
        let a = paint("a red apple", 42, 64, 48).unwrap();
        let b = paint("a red apple", 42, 64, 48).unwrap();
        let c = paint("a red apple", 43, 64, 48).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
    }
}

#[cfg(test)]
mod edit_tests {
    use super::*;

    fn png(img: image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn repaints_only_where_the_mask_is_transparent() {
        let input =
            png(image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(40, 20, image::Rgba([10, 200, 30, 255]))));
        let mask = png(image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(40, 20, |x, _| {
            image::Rgba([0, 0, 0, if x < 20 { 0 } else { 255 }])
        })));
        let out = image::load_from_memory(&repaint(&input, Some(&mask), "p", 3, 40, 20).unwrap()).unwrap().to_rgb8();
        assert_eq!(out.get_pixel(35, 10).0, [10, 200, 30]);
        assert_ne!(out.get_pixel(2, 10).0, [10, 200, 30]);
    }
}
