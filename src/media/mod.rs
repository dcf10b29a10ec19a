//! Image bytes: format sniffing from magic numbers, base64 and data-URL decoding, and transcoding between PNG,
//! JPEG and WebP (only when the format differs). Every decode of untrusted bytes goes through [`run_decoding`]:
//! dimensions are checked from the header against `server.max_image_pixels`, the decode waits for its share of
//! the process-wide `server.decode_memory` budget, and it runs on the blocking pool with allocation limits.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::{Simd, general_purpose};
use bytes::Bytes;
use image::{ImageReader, Limits};

use crate::request::ImageFormat;

/// Bytes one decoded pixel may take, counting the copy a conversion or resize makes (RGBA8 twice, or RGBA16).
const BYTES_PER_PIXEL: u64 = 8;
/// How long a decode waits for room in the memory budget before giving up.
const BUDGET_WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(48_000_000);
/// The decode memory budget, in MiB permits, with its size.
static BUDGET: LazyLock<RwLock<(u32, Arc<tokio::sync::Semaphore>)>> =
    LazyLock::new(|| RwLock::new((1024, Arc::new(tokio::sync::Semaphore::new(1024)))));

/// Why an image was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Over `server.max_image_pixels` or `server.decode_memory`; the message names the limit.
    #[error("{0}")]
    TooLarge(String),
    /// Not a decodable image, or the decode budget stayed full.
    #[error("{0}")]
    Invalid(String),
}

/// Sets the process-wide limits (from `server.max_image_pixels` and `server.decode_memory`). A budget of a new
/// size replaces the old one; decodes already holding a share of the old one finish under it.
pub fn configure(max_pixels: u64, memory_bytes: usize) {
    MAX_PIXELS.store(max_pixels.max(1), Ordering::Relaxed);
    let mib = u32::try_from((memory_bytes as u64 / MIB).max(1)).unwrap_or(u32::MAX >> 3);
    let mut budget = match BUDGET.write() {
        Ok(b) => b,
        Err(poisoned) => poisoned.into_inner(),
    };
    if budget.0 != mib {
        *budget = (mib, Arc::new(tokio::sync::Semaphore::new(mib as usize)));
    }
}

fn budget() -> (u32, Arc<tokio::sync::Semaphore>) {
    match BUDGET.read() {
        Ok(b) => (b.0, Arc::clone(&b.1)),
        Err(poisoned) => {
            let b = poisoned.into_inner();
            (b.0, Arc::clone(&b.1))
        }
    }
}

/// Checks an image's header against `server.max_image_pixels`; returns its dimensions. Bytes whose header
/// cannot be read are `Invalid`.
pub fn check(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let (w, h) = dimensions(bytes).ok_or_else(|| DecodeError::Invalid("cannot read the image header".into()))?;
    let max = MAX_PIXELS.load(Ordering::Relaxed);
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max {
        return Err(DecodeError::TooLarge(format!(
            "the image is {w}x{h} ({pixels} pixels), over the {max}-pixel limit (`server.max_image_pixels`)"
        )));
    }
    Ok((w, h))
}

/// Runs `work` (which decodes `images` with [`decode_blocking`]) on the blocking pool, after checking every
/// image's header and waiting (bounded) for the memory its decodes need.
pub async fn run_decoding<R: Send + 'static>(
    images: &[&[u8]],
    work: impl FnOnce() -> Result<R, DecodeError> + Send + 'static,
) -> Result<R, DecodeError> {
    let mut need = 0u64;
    for bytes in images {
        let (w, h) = check(bytes)?;
        need += u64::from(w) * u64::from(h) * BYTES_PER_PIXEL;
    }
    let need_mib = need.div_ceil(MIB).max(1);
    let (total, semaphore) = budget();
    if need_mib > u64::from(total) {
        return Err(DecodeError::TooLarge(format!(
            "decoding the image needs {need_mib} MiB, over the {total} MiB limit (`server.decode_memory`)"
        )));
    }
    let permits = u32::try_from(need_mib).unwrap_or(total);
    let _share = match tokio::time::timeout(BUDGET_WAIT, semaphore.acquire_many_owned(permits)).await {
        Ok(Ok(share)) => share,
        Ok(Err(_)) | Err(_) => {
            return Err(DecodeError::Invalid(format!(
                "no room to decode the image within {}s (`server.decode_memory` is in use by other requests)",
                BUDGET_WAIT.as_secs()
            )));
        }
    };
    tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(DecodeError::Invalid("the image decoder failed on this input".into())))
    })
    .await
    .map_err(|e| DecodeError::Invalid(format!("decoding task failed: {e}")))?
}

/// Decodes image bytes with the header check and an allocation cap; call inside [`run_decoding`].
pub fn decode_blocking(bytes: &[u8]) -> Result<image::DynamicImage, DecodeError> {
    let (w, h) = check(bytes)?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Invalid(format!("cannot read the image: {e}")))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * BYTES_PER_PIXEL + MIB);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DecodeError::TooLarge(format!("the image exceeds a decoder limit: {l}")),
        e => DecodeError::Invalid(format!("cannot decode the image: {e}")),
    })
}

/// The format of image bytes, from their magic number.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::Webp)
    } else {
        None
    }
}

/// Width and height from the image header, without decoding pixels.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// The base64 engines: SIMD (AVX2/NEON picked at run time, scalar fallback), built once.
static ENCODE: LazyLock<Simd> = LazyLock::new(|| Simd::standard(general_purpose::PAD));
static DECODE_STANDARD: LazyLock<Simd> = LazyLock::new(|| Simd::standard(general_purpose::PAD_INDIFFERENT));
static DECODE_URL_SAFE: LazyLock<Simd> = LazyLock::new(|| Simd::url_safe(general_purpose::PAD_INDIFFERENT));

/// The engine that writes base64 for responses (standard alphabet, padded).
pub fn base64_encoder() -> &'static Simd {
    &ENCODE
}

/// `data:<mime>;base64,<data>` for image bytes (how fal and Replicate take inputs).
pub fn data_url(bytes: &[u8], format: ImageFormat) -> String {
    format!("data:{};base64,{}", format.mime(), ENCODE.encode(bytes))
}

/// Decodes base64 (standard or URL-safe, padded or not, line-wrapped or not), accepting a
/// `data:<mime>;base64,` prefix. The common case (standard alphabet, no whitespace) is one SIMD pass.
pub fn decode_base64(data: &str) -> Result<Bytes, String> {
    let data = data.trim();
    let payload = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, p)| p)
            .ok_or("a data URL must be base64 (`data:image/png;base64,...`)")?,
        None => data,
    };
    if let Ok(v) = DECODE_STANDARD.decode(payload) {
        return Ok(Bytes::from(v));
    }
    let clean: std::borrow::Cow<'_, str> = if payload.contains(['\n', '\r', ' ']) {
        payload.split_whitespace().collect::<String>().into()
    } else {
        payload.into()
    };
    DECODE_STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| DECODE_URL_SAFE.decode(clean.as_bytes()))
        .map(Bytes::from)
        .map_err(|e| format!("invalid base64: {e}"))
}

/// Re-encodes `bytes` as `to` under the decode limits. Returns the input untouched when it already is `to`.
pub async fn transcode(bytes: Bytes, to: ImageFormat, quality: Option<u8>) -> Result<Bytes, DecodeError> {
    if sniff(&bytes) == Some(to) {
        return Ok(bytes);
    }
    let input = bytes.clone();
    run_decoding(&[&bytes], move || {
        let img = decode_blocking(&input)?;
        encode(&img, to, quality).map_err(DecodeError::Invalid)
    })
    .await
}

/// Encodes a decoded image. JPEG drops alpha; WebP is lossless (the pure-Rust encoder has no lossy mode).
pub fn encode(img: &image::DynamicImage, to: ImageFormat, quality: Option<u8>) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(img.width() as usize * img.height() as usize);
    match to {
        ImageFormat::Png => img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png),
        ImageFormat::Webp => img.to_rgba8().write_to(&mut Cursor::new(&mut out), image::ImageFormat::WebP),
        ImageFormat::Jpeg => {
            let rgb = img.to_rgb8();
            let q = quality.unwrap_or(90).clamp(1, 100);
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q).encode_image(&rgb)
        }
    }
    .map_err(|e| format!("cannot encode {}: {e}", to.as_str()))?;
    Ok(Bytes::from(out))
}

/// OpenAI masks mark the area to edit with transparency; A1111 and diffusers pipelines want white = repaint on
/// black. Blocking: run it under [`run_decoding`].
pub fn mask_to_white_repaint(mask: &[u8]) -> Result<Vec<u8>, String> {
    let img = decode_blocking(mask).map_err(|e| format!("cannot decode the mask: {e}"))?.to_rgba8();
    let out = image::GrayImage::from_fn(img.width(), img.height(), |x, y| {
        image::Luma([if img.get_pixel(x, y).0[3] == 0 { 255 } else { 0 }])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(out)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the mask: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_png() -> Bytes {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(4, 3, image::Rgb([200, 10, 10])));
        encode(&img, ImageFormat::Png, None).unwrap()
    }

    #[test]
    fn sniffs_and_decodes_data_urls() {
        let png = tiny_png();
        assert_eq!(sniff(&png), Some(ImageFormat::Png));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        assert_eq!(decode_base64(&format!("data:image/png;base64,{b64}")).unwrap(), png);
        assert_eq!(decode_base64(b64.trim_end_matches('=')).unwrap(), png);
        assert!(decode_base64("data:image/png,abc").is_err());
        assert!(decode_base64("!!!").is_err());
    }

    #[tokio::test]
    async fn transcodes_only_when_needed() {
        let png = tiny_png();
        let same = transcode(png.clone(), ImageFormat::Png, None).await.unwrap();
        assert_eq!(same.as_ptr(), png.as_ptr(), "no copy when the format matches");
        let jpeg = transcode(png.clone(), ImageFormat::Jpeg, Some(80)).await.unwrap();
        assert_eq!(sniff(&jpeg), Some(ImageFormat::Jpeg));
        let webp = transcode(png, ImageFormat::Webp, None).await.unwrap();
        assert_eq!(sniff(&webp), Some(ImageFormat::Webp));
        assert!(transcode(Bytes::from_static(b"not an image"), ImageFormat::Png, None).await.is_err());
    }
}
