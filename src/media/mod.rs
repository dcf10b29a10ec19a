//! Image bytes: format sniffing from magic numbers, base64 and data-URL decoding, and transcoding between PNG,
//! JPEG and WebP (only when the format differs, on the blocking pool, with decoder limits).

use std::io::Cursor;
use std::sync::LazyLock;

use base64::Engine;
use base64::engine::{Simd, general_purpose};
use bytes::Bytes;
use image::{ImageReader, Limits};

use crate::request::ImageFormat;

/// Largest image (in pixels per side) easel decodes for transcoding.
const MAX_SIDE: u32 = 16_384;
/// Largest decoder allocation for transcoding.
const MAX_ALLOC: u64 = 1 << 30;

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

/// Re-encodes `bytes` as `to`. Returns the input untouched when it already is `to`.
pub async fn transcode(bytes: Bytes, to: ImageFormat, quality: Option<u8>) -> Result<Bytes, String> {
    if sniff(&bytes) == Some(to) {
        return Ok(bytes);
    }
    tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| transcode_blocking(&bytes, to, quality))
            .unwrap_or_else(|_| Err("the image decoder failed on this input".into()))
    })
    .await
    .map_err(|e| format!("transcoding task failed: {e}"))?
}

fn transcode_blocking(bytes: &[u8], to: ImageFormat, quality: Option<u8>) -> Result<Bytes, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode the image: {e}"))?;
    encode(&img, to, quality)
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
