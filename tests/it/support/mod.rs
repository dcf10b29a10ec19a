//! Test harness: `spawn_gateway` runs easel in-process on 127.0.0.1:0 with a YAML config; one fake upstream
//! per protocol lives in its own file, each a real HTTP server on port 0 with knobs for latency and failures.

pub mod a1111;
pub mod books;
pub mod comfyui;
pub mod fal;
pub mod huggingface;
pub mod invokeai;
pub mod nginx;
pub mod openai;
pub mod postgres;
pub mod redis;
pub mod replicate;
pub mod shim;
pub mod template_server;
pub mod text_server;

use std::path::Path;
use std::time::Duration;

use easel::config::{self, MapEnv};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every await in a test is bounded by this.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway; dropping it shuts it down.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub client: reqwest::Client,
    /// Holds the temporary files directory alive.
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Gateway {
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POSTs JSON and returns (status, headers, parsed body).
    pub async fn post_json(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let resp = tokio::time::timeout(TEST_TIMEOUT, self.client.post(self.endpoint(path)).json(&body).send())
            .await
            .expect("request timed out")
            .expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, json)
    }

    /// GETs and returns (status, headers, body bytes).
    pub async fn get(&self, path_or_url: &str) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
        let url = if path_or_url.starts_with("http") { path_or_url.to_owned() } else { self.endpoint(path_or_url) };
        let resp = tokio::time::timeout(TEST_TIMEOUT, self.client.get(url).send())
            .await
            .expect("request timed out")
            .expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.bytes().await.expect("body"))
    }
}

/// Starts easel with `yaml` (a whole config file; `storage.files` is pointed at a temporary directory).
pub async fn spawn_gateway(yaml: &str) -> Gateway {
    spawn_gateway_env(yaml, &[]).await
}

/// Like [`spawn_gateway`], with extra environment (e.g. `EASEL_ADMIN_TOKEN`) as configuration sees it.
pub async fn spawn_gateway_env(yaml: &str, extra: &[(&str, &str)]) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path().join("files");
    let database = format!("sqlite://{}", dir.path().join("easel.db").display());
    let mut env = MapEnv::new([
        ("EASEL_STORAGE__FILES", files.to_str().expect("utf-8 path")),
        ("EASEL_STORAGE__DATABASE", database.as_str()),
    ]);
    for (k, v) in extra {
        env.0.insert((*k).to_owned(), (*v).to_owned());
    }
    // Bound first, so the config may name the gateway's own address as `@GATEWAY@` (e.g. `server.public_url`).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let yaml = yaml.replace("@GATEWAY@", &format!("http://{addr}"));
    let config = config::from_str(&yaml, "test.yaml", Path::new("."), &env).unwrap_or_else(|e| panic!("{e}"));
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = easel::server::Server::build(config).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { server.run(listener, token.cancelled_owned()).await });
    Gateway { url: format!("http://{addr}"), client: reqwest::Client::new(), dir, shutdown }
}

/// Starts the real `easel serve` binary on 127.0.0.1:0 in `dir` (where its `easel.yaml` is) and returns it with its
/// base URL, read from the "listening on" log line.
pub fn start_binary(dir: &Path, env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_easel"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("EASEL_CONFIG")
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn easel");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http").filter(|_| line.contains("://")) {
                let url: String = line[i + "listening on ".len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                    .collect();
                let _ = tx.send(url);
            }
        }
    });
    let url = rx.recv_timeout(TEST_TIMEOUT).expect("easel did not start");
    (child, url)
}

/// Reads a whole SSE body into (id, event, data) triples.
pub async fn job_events(
    gw: &Gateway,
    secret: &str,
    path: &str,
    last: Option<&str>,
) -> Vec<(u32, String, serde_json::Value)> {
    let mut req = gw.client.get(gw.endpoint(path)).bearer_auth(secret);
    if let Some(l) = last {
        req = req.header("Last-Event-ID", l);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(TEST_TIMEOUT, resp.text()).await.unwrap().unwrap();
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|frame| {
            let field = |name: &str| {
                frame.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
            };
            (field("id:").parse().unwrap(), field("event:"), serde_json::from_str(&field("data:")).unwrap())
        })
        .collect()
}

/// Waits up to `within` for a server process the test signalled to exit, then kills it (test teardown only).
pub fn wait_or_kill(child: &mut std::process::Child, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
