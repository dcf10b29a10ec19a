//! `easel verify`: checks a running gateway from the outside, as a client would — liveness, readiness, the model
//! list, the error shape, and (when asked) one real image, video and text request each, the output URL fetch and
//! the 429 behaviour under a burst. Prints a pass/fail table; exit 0 when every row passed, 1 otherwise.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

/// What to check, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub base_url: String,
    pub token: Option<String>,
    pub insecure: bool,
    pub images: bool,
    pub videos: bool,
    pub text: bool,
    /// Send this many concurrent image (or text) requests and check every refusal is a proper 429.
    pub burst: Option<u32>,
    pub image_model: Option<String>,
    pub video_model: Option<String>,
    pub text_model: Option<String>,
    /// The limit for one generation (and for a video job to finish).
    pub timeout: Duration,
}

/// Quick checks (health, lists, errors) never wait longer than this.
const QUICK: Duration = Duration::from_secs(10);
/// The largest body verify reads from any answer.
const MAX_BODY: usize = 64 * 1024 * 1024;

pub fn run(opts: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let rows = match runtime.block_on(verify(&opts)) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    super::write_stdout(&table(&opts.base_url, &rows));
    if rows.iter().all(|r| r.ok) { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// One line of the report.
#[derive(Debug)]
struct Row {
    check: &'static str,
    ok: bool,
    detail: String,
}

fn pass(check: &'static str, detail: impl Into<String>) -> Row {
    Row { check, ok: true, detail: detail.into() }
}

fn fail(check: &'static str, detail: impl Into<String>) -> Row {
    Row { check, ok: false, detail: detail.into() }
}

fn table(base: &str, rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
    let mut out = format!("easel verify {base}\n{:width$}  result  detail\n", "check");
    for r in rows {
        let result = if r.ok { "PASS" } else { "FAIL" };
        out.push_str(&format!("{:width$}  {result:6}  {}\n", r.check, r.detail));
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        out.push_str(&format!("all {} checks passed\n", rows.len()));
    } else {
        out.push_str(&format!("{failed} of {} checks FAILED\n", rows.len()));
    }
    out
}

/// An answer, read whole (up to [`MAX_BODY`]).
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
    took: Duration,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The status and, for an error, OpenAI's `error.message` (or the start of the body).
    fn describe(&self) -> String {
        let v = self.json();
        let reasons =
            v["reasons"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "));
        match v["error"]["message"].as_str().map(str::to_owned).or(reasons) {
            Some(m) => format!("{} — {m}", self.status),
            None => format!("{} — {}", self.status, String::from_utf8_lossy(&self.body[..self.body.len().min(200)])),
        }
    }
}

struct Gateway {
    client: Client,
    base: String,
    token: Option<String>,
}

impl Gateway {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        limit: Duration,
        authed: bool,
    ) -> Result<Answer, String> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut rb = self.client.request(method, &url).timeout(limit);
        if authed && let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let started = Instant::now();
        let mut resp = rb.send().await.map_err(|e| format!("{url}: {}", describe_reqwest(&e)))?;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: reading the body: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("{url}: the answer is larger than {} MiB", MAX_BODY >> 20));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body: body.into(), took: started.elapsed() })
    }

    async fn get(&self, path: &str) -> Result<Answer, String> {
        self.call(Method::GET, path, None, QUICK, true).await
    }
}

/// reqwest's summary and the innermost cause ("Connection refused (os error 111)").
fn describe_reqwest(e: &reqwest::Error) -> String {
    let root = crate::backends::client::root_cause(e);
    if root == e.to_string() { root } else { format!("{e}: {root}") }
}

fn ms(d: Duration) -> String {
    if d < Duration::from_secs(2) { format!("{} ms", d.as_millis()) } else { format!("{:.1} s", d.as_secs_f64()) }
}

async fn verify(opts: &Options) -> Result<Vec<Row>, String> {
    let base = opts.base_url.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(format!("--base-url `{base}` is not an http(s) URL"));
    }
    let client = Client::builder()
        .danger_accept_invalid_certs(opts.insecure)
        .connect_timeout(QUICK)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let gw = Gateway { client, base, token: opts.token.clone() };
    let mut rows = Vec::new();

    // Liveness and readiness.
    rows.push(match gw.get("/healthz").await {
        Ok(a) if a.status.is_success() => pass("health", format!("/healthz {} in {}", a.status, ms(a.took))),
        Ok(a) => fail("health", format!("/healthz {}", a.describe())),
        Err(e) => fail("health", e),
    });
    rows.push(match gw.get("/readyz").await {
        Ok(a) if a.status.is_success() => pass("readiness", format!("/readyz {}", a.status)),
        Ok(a) => fail("readiness", format!("/readyz {}", a.describe())),
        Err(e) => fail("readiness", e),
    });

    // The model list picks what the generation checks use.
    let mut models: Vec<(String, String, String)> = Vec::new();
    rows.push(match gw.get("/v1/models").await {
        Ok(a) if a.status.is_success() => {
            let v = a.json();
            match v["data"].as_array() {
                Some(list) if v["object"] == "list" => {
                    for m in list {
                        let id = m["id"].as_str().unwrap_or_default().to_owned();
                        let kind = m["meta"]["type"].as_str().unwrap_or("image").to_owned();
                        let status = m["meta"]["status"].as_str().unwrap_or("ready").to_owned();
                        models.push((id, kind, status));
                    }
                    let count = |k: &str| models.iter().filter(|m| m.1 == k).count();
                    pass(
                        "models",
                        format!(
                            "{} models: {} image, {} video, {} text",
                            models.len(),
                            count("image"),
                            count("video"),
                            count("text")
                        ),
                    )
                }
                _ => fail("models", "/v1/models is not an OpenAI model list"),
            }
        }
        Ok(a) => fail("models", format!("/v1/models {}", a.describe())),
        Err(e) => fail("models", e),
    });
    let pick = |asked: &Option<String>, kind: &str| -> Option<String> {
        asked.clone().or_else(|| {
            let of_kind = || models.iter().filter(|m| m.1 == kind);
            of_kind().find(|m| m.2 == "ready").or_else(|| of_kind().next()).map(|m| m.0.clone())
        })
    };
    let image_model = pick(&opts.image_model, "image");
    let video_model = pick(&opts.video_model, "video");
    let text_model = pick(&opts.text_model, "text");

    if opts.token.is_some() {
        rows.push(auth_row(&gw).await);
    }
    rows.push(error_shape_row(&gw, image_model.as_deref(), text_model.as_deref()).await);

    if opts.images {
        rows.push(match &image_model {
            Some(m) => image_row(&gw, m, opts.timeout).await,
            None => fail("images", "the gateway lists no image model (pass --image-model)"),
        });
    }
    if opts.videos {
        rows.push(match &video_model {
            Some(m) => video_row(&gw, m, opts.timeout).await,
            None => fail("videos", "the gateway lists no video model (pass --video-model)"),
        });
    }
    if opts.text {
        match &text_model {
            Some(m) => {
                rows.push(chat_row(&gw, m, opts.timeout).await);
                rows.push(stream_row(&gw, m, opts.timeout).await);
            }
            None => rows.push(fail("text", "the gateway lists no text model (pass --text-model)")),
        }
    }
    if let Some(n) = opts.burst {
        rows.push(burst_row(&gw, n, image_model.as_deref(), text_model.as_deref(), opts.timeout).await);
    }
    Ok(rows)
}

/// An OpenAI error body: `{"error": {"message": "...", "type": "..."}}`.
fn openai_error(v: &Value) -> bool {
    v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string()
}

async fn auth_row(gw: &Gateway) -> Row {
    let wrong = Gateway { client: gw.client.clone(), base: gw.base.clone(), token: Some("easel-verify-wrong".into()) };
    match wrong.get("/v1/models").await {
        Ok(a) if a.status == StatusCode::UNAUTHORIZED && openai_error(&a.json()) => {
            pass("auth", "a wrong key gets 401 in OpenAI's error shape; the given token is accepted")
        }
        Ok(a) if a.status == StatusCode::UNAUTHORIZED => fail("auth", "401 without OpenAI's error shape"),
        Ok(a) if a.status.is_success() => pass("auth", "authentication is off: any token is accepted"),
        Ok(a) => fail("auth", format!("a wrong key got {}", a.describe())),
        Err(e) => fail("auth", e),
    }
}

async fn error_shape_row(gw: &Gateway, image: Option<&str>, text: Option<&str>) -> Row {
    // A request with no prompt: the gateway must refuse it with 400 in OpenAI's shape, before any backend call.
    let (path, body) = match (image, text) {
        (Some(m), _) => ("/v1/images/generations", json!({"model": m})),
        (None, Some(m)) => ("/v1/chat/completions", json!({"model": m})),
        (None, None) => ("/v1/images/generations", json!({})),
    };
    match gw.call(Method::POST, path, Some(&body), QUICK, true).await {
        Ok(a) if a.status == StatusCode::BAD_REQUEST && openai_error(&a.json()) => {
            let v = a.json();
            let param = v["error"]["param"].as_str().map(|p| format!(" (param `{p}`)")).unwrap_or_default();
            let kind = v["error"]["type"].as_str().unwrap_or_default();
            pass("error shape", format!("a request without a prompt gets 400 `{kind}`{param}"))
        }
        Ok(a) => fail("error shape", format!("a request without a prompt got {}", a.describe())),
        Err(e) => fail("error shape", e),
    }
}

async fn image_row(gw: &Gateway, model: &str, limit: Duration) -> Row {
    let body = json!({"model": model, "prompt": "easel verify: a lighthouse at dusk", "n": 1});
    let a = match gw.call(Method::POST, "/v1/images/generations", Some(&body), limit, true).await {
        Ok(a) if a.status.is_success() => a,
        Ok(a) => return fail("images", format!("`{model}`: {}", a.describe())),
        Err(e) => return fail("images", format!("`{model}`: {e}")),
    };
    let v = a.json();
    let first = &v["data"][0];
    let (bytes, via) = if let Some(url) = first["url"].as_str() {
        match gw.call(Method::GET, url, None, QUICK, false).await {
            Ok(img) if img.status.is_success() => (img.body, "url fetched"),
            Ok(img) => return fail("images", format!("`{model}`: the output URL answered {}", img.describe())),
            Err(e) => return fail("images", format!("`{model}`: fetching the output URL: {e}")),
        }
    } else if let Some(b64) = first["b64_json"].as_str() {
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(b) => (b.into(), "b64_json"),
            Err(e) => return fail("images", format!("`{model}`: b64_json is not base64: {e}")),
        }
    } else {
        return fail("images", format!("`{model}`: the answer has no data[0].url or b64_json"));
    };
    let Some(format) = crate::media::sniff(&bytes) else {
        return fail("images", format!("`{model}`: the output is not a PNG, JPEG or WebP image"));
    };
    match image::load_from_memory(&bytes) {
        Ok(img) => pass(
            "images",
            format!(
                "`{model}`: {}x{} {} in {}, {via} ({} KB)",
                img.width(),
                img.height(),
                format.as_str(),
                ms(a.took),
                bytes.len() / 1024
            ),
        ),
        Err(e) => fail("images", format!("`{model}`: the image does not decode: {e}")),
    }
}

async fn video_row(gw: &Gateway, model: &str, limit: Duration) -> Row {
    let started = Instant::now();
    let body = json!({"model": model, "prompt": "easel verify: waves on a beach"});
    let v = match gw.call(Method::POST, "/v1/videos", Some(&body), QUICK.max(Duration::from_secs(30)), true).await {
        Ok(a) if a.status.is_success() => a.json(),
        Ok(a) => return fail("videos", format!("`{model}`: {}", a.describe())),
        Err(e) => return fail("videos", format!("`{model}`: {e}")),
    };
    let Some(id) = v["id"].as_str().map(str::to_owned) else {
        return fail("videos", format!("`{model}`: the answer has no video id"));
    };
    let mut job = v;
    loop {
        match job["status"].as_str() {
            Some("completed") => break,
            Some("failed") => {
                let why = job["error"]["message"].as_str().unwrap_or("no reason given");
                return fail("videos", format!("`{model}`: video {id} failed: {why}"));
            }
            _ if started.elapsed() > limit => {
                return fail("videos", format!("`{model}`: video {id} did not finish within {}", ms(limit)));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        job = match gw.get(&format!("/v1/videos/{id}")).await {
            Ok(a) if a.status.is_success() => a.json(),
            Ok(a) => return fail("videos", format!("`{model}`: GET /v1/videos/{id}: {}", a.describe())),
            Err(e) => return fail("videos", format!("`{model}`: {e}")),
        };
    }
    match gw.call(Method::GET, &format!("/v1/videos/{id}/content"), None, limit, true).await {
        Ok(a) if a.status.is_success() => match crate::backends::jobs::sniff_video(&a.body) {
            Some(mime) => pass(
                "videos",
                format!("`{model}`: {id} completed in {}, {mime} ({} KB)", ms(started.elapsed()), a.body.len() / 1024),
            ),
            None => fail("videos", format!("`{model}`: the content of {id} is not a video (MP4, WebM or GIF)")),
        },
        Ok(a) => fail("videos", format!("`{model}`: downloading {id}: {}", a.describe())),
        Err(e) => fail("videos", format!("`{model}`: {e}")),
    }
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Reply with the word OK."}], "max_tokens": 16, "stream": stream})
}

async fn chat_row(gw: &Gateway, model: &str, limit: Duration) -> Row {
    match gw.call(Method::POST, "/v1/chat/completions", Some(&chat_body(model, false)), limit, true).await {
        Ok(a) if a.status.is_success() => {
            let v = a.json();
            match v["choices"][0]["message"].as_object() {
                Some(_) => {
                    let tokens =
                        v["usage"]["total_tokens"].as_u64().map(|t| format!(", {t} tokens")).unwrap_or_default();
                    pass("text", format!("`{model}`: a chat completion in {}{tokens}", ms(a.took)))
                }
                None => fail("text", format!("`{model}`: the answer has no choices[0].message")),
            }
        }
        Ok(a) => fail("text", format!("`{model}`: {}", a.describe())),
        Err(e) => fail("text", format!("`{model}`: {e}")),
    }
}

async fn stream_row(gw: &Gateway, model: &str, limit: Duration) -> Row {
    match gw.call(Method::POST, "/v1/chat/completions", Some(&chat_body(model, true)), limit, true).await {
        Ok(a) if a.status.is_success() => {
            let text = String::from_utf8_lossy(&a.body);
            let chunks = text.lines().filter(|l| l.starts_with("data: {")).count();
            let is_sse = a
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("text/event-stream"));
            if is_sse && chunks > 0 && text.contains("data: [DONE]") {
                pass("text stream", format!("`{model}`: {chunks} chunks, then [DONE]"))
            } else {
                fail("text stream", format!("`{model}`: not an SSE stream of chunks ending in [DONE]"))
            }
        }
        Ok(a) => fail("text stream", format!("`{model}`: {}", a.describe())),
        Err(e) => fail("text stream", format!("`{model}`: {e}")),
    }
}

async fn burst_row(gw: &Gateway, n: u32, image: Option<&str>, text: Option<&str>, limit: Duration) -> Row {
    let (path, body) = match (image, text) {
        (Some(m), _) => ("/v1/images/generations", json!({"model": m, "prompt": "easel verify burst", "n": 1})),
        (None, Some(m)) => ("/v1/chat/completions", chat_body(m, false)),
        (None, None) => return fail("429", "no image or text model to send a burst to"),
    };
    let calls = (0..n).map(|_| gw.call(Method::POST, path, Some(&body), limit, true));
    let answers = futures_util::future::join_all(calls).await;
    let (mut ok, mut limited, mut problems) = (0, 0, Vec::new());
    for a in answers {
        match a {
            Ok(a) if a.status.is_success() => ok += 1,
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                let retry =
                    a.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                match retry {
                    Some(_) if openai_error(&a.json()) => limited += 1,
                    Some(_) => problems.push("a 429 without OpenAI's error shape".to_owned()),
                    None => problems.push("a 429 without Retry-After".to_owned()),
                }
            }
            Ok(a) => problems.push(a.describe()),
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        pass("429", format!("{n} at once: {ok} served, {limited} × 429 with Retry-After"))
    } else {
        problems.dedup();
        fail("429", format!("{n} at once: {ok} served, {limited} × 429; also {}", problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_each_check_and_counts_failures() {
        let rows = vec![pass("health", "ok"), fail("images", "`m`: 502 — the backend is down")];
        let t = table("http://x", &rows);
        assert!(t.contains("health  PASS    ok"), "{t}");
        assert!(t.contains("images  FAIL    `m`: 502"), "{t}");
        assert!(t.ends_with("1 of 2 checks FAILED\n"), "{t}");
        assert!(table("http://x", &rows[..1]).ends_with("all 1 checks passed\n"));
    }
}
