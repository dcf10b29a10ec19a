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
    check_pixels(w, h)
}

/// [`check`]'s limit for dimensions already read.
fn check_pixels(w: u32, h: u32) -> Result<(u32, u32), DecodeError> {
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
    if let Some(size) = png_ihdr(bytes) {
        return Some(size);
    }
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// A PNG's size from its first chunk, the 13-byte IHDR at a fixed place, without building a decoder (whose
/// inflate state alone is tens of KB to allocate and clear per image). `None` when the bytes do not start that
/// way, or the size is outside PNG's 1 ..= 2^31-1 each way: the full reader then decides (and refuses it).
fn png_ihdr(bytes: &[u8]) -> Option<(u32, u32)> {
    if sniff(bytes) != Some(ImageFormat::Png) || bytes.get(8..16)? != b"\0\0\0\x0dIHDR" {
        return None;
    }
    let be = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let (w, h) = (be(16)?, be(20)?);
    let valid = 1..=i32::MAX as u32;
    (valid.contains(&w) && valid.contains(&h)).then_some((w, h))
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

/// The base64 part of `data`: trimmed, after a `data:<mime>;base64,` prefix when there is one.
pub fn base64_payload(data: &str) -> Result<&str, String> {
    let data = data.trim();
    match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, p)| p)
            .ok_or_else(|| "a data URL must be base64 (`data:image/png;base64,...`)".to_owned()),
        None => Ok(data),
    }
}

/// Decodes base64 (standard or URL-safe, padded or not, line-wrapped or not), accepting a
/// `data:<mime>;base64,` prefix. The common case (standard alphabet, no whitespace) is one SIMD pass.
pub fn decode_base64(data: &str) -> Result<Bytes, String> {
    let payload = base64_payload(data)?;
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

/// Decoded bytes per step of [`Base64Image::validate`]: a multiple of 3, so every step but the last is whole
/// 4-character quads; also how much of the image's start is sniffed for its format and dimensions.
const SCRATCH: usize = 48 * 1024;

/// Base64 image text kept as it came (a slice of the upstream's body), after one streaming pass proved it is
/// standard, padded, whitespace-free base64 of a PNG, JPEG or WebP whose header passes [`check`] when it can be
/// read. It can be written to a client's `b64_json` unchanged; [`Base64Image::decode`] makes the bytes when a
/// path needs them (URL mode, transcoding, a stream's event).
#[derive(Debug, Clone)]
pub struct Base64Image {
    text: Bytes,
    format: ImageFormat,
    dimensions: Option<(u32, u32)>,
}

/// Why base64 text is not a [`Base64Image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base64Refusal {
    /// Not canonical base64 (another alphabet, whitespace, no padding, or invalid): decode it the lenient way.
    NotCanonical,
    /// Canonical base64 whose bytes are not an acceptable image; the message says why.
    Image(DecodeError),
}

impl Base64Image {
    /// Validates `text` in one pass, decoding [`SCRATCH`]-sized steps into one fixed buffer (never the whole
    /// image): the alphabet, the padding (only at the very end) and the trailing bits are checked; the first
    /// step is sniffed for the format and the header's dimensions.
    pub fn validate(text: Bytes) -> Result<Self, Base64Refusal> {
        if text.is_empty() || !text.len().is_multiple_of(4) {
            return Err(Base64Refusal::NotCanonical);
        }
        let step = SCRATCH / 3 * 4;
        // Never more than the decoded text needs (a small image clears a few bytes, not the whole step).
        let mut scratch = vec![0u8; SCRATCH.min(text.len() / 4 * 3)];
        let mut head: Option<(ImageFormat, Option<(u32, u32)>)> = None;
        let mut chunks = text.chunks(step).peekable();
        while let Some(chunk) = chunks.next() {
            // Padding may only end the whole text, not a step inside it.
            if chunks.peek().is_some() && chunk.last() == Some(&b'=') {
                return Err(Base64Refusal::NotCanonical);
            }
            let n = ENCODE.decode_slice(chunk, &mut scratch).map_err(|_| Base64Refusal::NotCanonical)?;
            if head.is_none() {
                let decoded = &scratch[..n];
                let format = sniff(decoded).ok_or_else(|| {
                    Base64Refusal::Image(DecodeError::Invalid(
                        "the decoded data is not a PNG, JPEG or WebP image".into(),
                    ))
                })?;
                let dimensions = match dimensions(decoded) {
                    Some((w, h)) => Some(check_pixels(w, h).map_err(Base64Refusal::Image)?),
                    None => None,
                };
                head = Some((format, dimensions));
            }
        }
        let (format, dimensions) = head.ok_or(Base64Refusal::NotCanonical)?;
        Ok(Self { text, format, dimensions })
    }

    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Width and height from the header, when the first decoded step held it.
    pub fn dimensions(&self) -> Option<(u32, u32)> {
        self.dimensions
    }

    /// The base64 text, exactly as it came.
    pub fn text(&self) -> &Bytes {
        &self.text
    }

    pub fn into_text(self) -> Bytes {
        self.text
    }

    /// The image bytes (one full decode).
    pub fn decode(&self) -> Result<Bytes, String> {
        ENCODE.decode(&self.text).map(Bytes::from).map_err(|e| format!("invalid base64: {e}"))
    }
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

    /// PNG's chunk checksum (so the edited header still reads).
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn b64(bytes: &[u8]) -> Bytes {
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[test]
    fn validates_base64_in_steps_without_copying() {
        // Big enough to take several steps: the noise makes the PNG hard to compress.
        let img = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([(x * 7 + y * 13) as u8, (x ^ y) as u8, 9]));
        let png = encode(&image::DynamicImage::ImageRgb8(img), ImageFormat::Png, None).unwrap();
        assert!(png.len() > SCRATCH, "the test image spans more than one step ({} bytes)", png.len());
        let text = b64(&png);
        let ok = Base64Image::validate(text.clone()).unwrap();
        assert_eq!(ok.text().as_ptr(), text.as_ptr(), "the text is kept, not copied");
        assert_eq!(ok.format(), ImageFormat::Png);
        assert_eq!(ok.dimensions(), Some((300, 200)));
        assert_eq!(ok.decode().unwrap(), png);
    }

    #[test]
    fn png_header_read_without_a_decoder_agrees_with_the_decoder() {
        let full = |b: &[u8]| ImageReader::new(Cursor::new(b)).with_guessed_format().unwrap().into_dimensions().ok();
        for (w, h) in [(1, 1), (300, 200), (4096, 3)] {
            let png = encode(&image::DynamicImage::new_rgb8(w, h), ImageFormat::Png, None).unwrap();
            assert_eq!(dimensions(&png), Some((w, h)));
            assert_eq!(dimensions(&png), full(&png));
        }
        // A zero width is not a PNG header: the full reader decides (and refuses it).
        let mut zero = tiny_png().to_vec();
        zero[16..20].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(dimensions(&zero), None);
        // Too short to hold the header.
        assert_eq!(dimensions(&tiny_png()[..20]), None);
    }

    #[test]
    fn refuses_bad_base64_and_huge_images() {
        let text = b64(&tiny_png());
        let refused = |t: &[u8]| Base64Image::validate(Bytes::copy_from_slice(t)).unwrap_err();
        // An invalid character.
        let mut bad = text.to_vec();
        bad[5] = b'*';
        assert_eq!(refused(&bad), Base64Refusal::NotCanonical);
        assert!(decode_base64(std::str::from_utf8(&bad).unwrap()).is_err(), "the lenient decode refuses it too");
        // Padding inside the text, and too much padding.
        let mut mid = text.to_vec();
        mid[4..8].copy_from_slice(b"AA==");
        assert_eq!(refused(&mid), Base64Refusal::NotCanonical);
        assert_eq!(refused(b"iVBORw0KGgo====="), Base64Refusal::NotCanonical);
        // Truncated mid-quad: invalid whichever way it is read.
        let cut = &text[..text.len() - 3];
        assert_eq!(refused(cut), Base64Refusal::NotCanonical);
        assert!(decode_base64(std::str::from_utf8(&text[..text.len() - 7]).unwrap()).is_err());
        // Padding only at a step boundary inside a long text.
        let step = SCRATCH / 3 * 4;
        let mut long = b64(&[0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n']).to_vec();
        long.resize(step, b'A');
        long[step - 2..].copy_from_slice(b"==");
        long.extend_from_slice(b"AAAA");
        assert_eq!(refused(&long), Base64Refusal::NotCanonical);
        // Not an image.
        assert!(matches!(refused(&b64(b"hello world!")), Base64Refusal::Image(DecodeError::Invalid(_))));
        // A header over the pixel limit (`server.max_image_pixels`), refused from the first step.
        let mut huge = tiny_png().to_vec();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(refused(&b64(&huge)), Base64Refusal::Image(DecodeError::TooLarge(_))));
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
