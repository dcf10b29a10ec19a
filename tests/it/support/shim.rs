//! A seed-style image shim (an nginx in front of an OpenAI-images server) that serves only `/healthz`,
//! `/readyz` and `POST /v1/images/generations`; everything else is nginx's 404. It can answer generations with
//! a decompression bomb, built here by [`bomb_png`]: a real PNG that declares a huge size in a few MB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::json;

#[derive(Default)]
pub struct ShimState {
    /// The status `/readyz` answers (0 = 200).
    pub readyz_status: AtomicU16,
    /// Answer generations with [`bomb_png`] instead of a small image.
    pub bomb: AtomicBool,
    /// Requests to each path, for checks on what the probe used.
    pub readyz_hits: AtomicU32,
    pub models_hits: AtomicU32,
}

pub struct Shim {
    pub url: String,
    pub state: Arc<ShimState>,
}

pub async fn start() -> Shim {
    let state = Arc::new(ShimState::default());
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Shim { url, state }
}

async fn handle(State(s): State<Arc<ShimState>>, req: Request) -> Response {
    let nginx_404 = || (StatusCode::NOT_FOUND, "<html><body><h1>404 Not Found</h1></body></html>").into_response();
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/healthz") => "ok".into_response(),
        (Method::GET, "/readyz") => {
            s.readyz_hits.fetch_add(1, Ordering::Relaxed);
            let status = match s.readyz_status.load(Ordering::Relaxed) {
                0 => 200,
                n => n,
            };
            (StatusCode::from_u16(status).unwrap(), "ready").into_response()
        }
        (Method::POST, "/v1/images/generations") => {
            let png = if s.bomb.load(Ordering::Relaxed) { bomb_png(20_000, 20_000) } else { small_png() };
            let b64 = base64::engine::general_purpose::STANDARD.encode(png);
            axum::Json(json!({"created": 1, "data": [{"b64_json": b64}]})).into_response()
        }
        (_, path) => {
            if path == "/v1/models" {
                s.models_hits.fetch_add(1, Ordering::Relaxed);
            }
            nginx_404()
        }
    }
}

pub fn small_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([20, 40, 200]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// A valid 8-bit grayscale PNG of `width`×`height` black pixels. The pixel data (all zeros, with filter bytes) is
/// one fixed-Huffman deflate block of back-references, so it takes about 13 bits per 258 pixels.
pub fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    let raw_len = u64::from(height) * (u64::from(width) + 1);
    let mut bits = BitWriter::default();
    bits.put(1, 1); // BFINAL
    bits.put(0b01, 2); // fixed Huffman
    bits.code(0b0011_0000, 8); // literal 0
    let mut left = raw_len - 1;
    while left >= 258 {
        bits.code(0b1100_0101, 8); // length 258 (symbol 285)
        bits.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        bits.code(0b0011_0000, 8);
    }
    bits.code(0, 7); // end of block
    let mut zlib = vec![0x78, 0x01];
    zlib.extend(bits.finish());
    let adler = ((raw_len % 65_521) << 16 | 1) as u32;
    zlib.extend(adler.to_be_bytes());

    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    let mut crc = !0u32;
    for &b in kind.iter().chain(data) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    out.extend((!crc).to_be_bytes());
}

/// Deflate's bit order: values least significant bit first, Huffman codes most significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, value: u32, len: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn code(&mut self, code: u32, len: u32) {
        let reversed = code.reverse_bits() >> (32 - len);
        self.put(reversed, len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

#[test]
fn the_bomb_is_a_real_png() {
    let png = bomb_png(300, 200);
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (300, 200));
    assert!(bomb_png(20_000, 20_000).len() < 4 << 20);
}
