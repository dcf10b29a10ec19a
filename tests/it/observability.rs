//! Observability through HTTP and the real binary: `X-Request-Id` kept or made, on every answer and in error
//! bodies, forwarded (with `traceparent`) to the backend; `/metrics` passes `promtool check metrics` and counts
//! response bytes; one access-log line per request with its fields and no secret; a bad `EASEL_LOG` stops the start.

use std::io::Read;
use std::time::Instant;

use serde_json::{Value, json};

use crate::support::{TEST_TIMEOUT, spawn_gateway, template_server};

const BIN: &str = env!("CARGO_BIN_EXE_easel");
const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(url: &str) -> String {
    format!(
        "backends:\n  mine:\n    kind: template\n    url: {url}\n    path: /generate\n    body: '{{\"prompt\": {{{{ prompt | tojson }}}}, \"width\": {{{{ width }}}}, \"height\": {{{{ height }}}}}}'\n    response: {{images: \"$.images[*]\"}}\nmodels:\n  - {{id: pic, backends: [mine], default_size: 16x16}}\n"
    )
}

#[tokio::test]
async fn request_ids_are_on_every_answer_in_errors_and_at_the_backend() {
    let up = template_server::start().await;
    let gw = spawn_gateway(&config(&up.url)).await;
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("X-Request-Id", "client-chosen-42")
        .header("traceparent", TRACE)
        .json(&json!({"model": "pic", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-42");
    let got = &up.received_at("/generate")[0];
    assert_eq!(got.request_id.as_deref(), Some("client-chosen-42"), "forwarded to the backend");
    assert_eq!(got.traceparent.as_deref(), Some(TRACE));

    // Errors of every kind carry it, in the header and the body; an unusable client id is replaced.
    let cases = [
        gw.client.get(gw.endpoint("/v1/nothing")).header("X-Request-Id", "bad id\twith tab"),
        gw.client.get(gw.endpoint("/v1/images/generations")),
        gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({"model": "nope", "prompt": "p"})),
    ];
    let mut seen = Vec::new();
    for (want, req) in [404u16, 405, 404].into_iter().zip(cases) {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(id.starts_with("req_") && id.len() > 10, "{id}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");
        seen.push(id);
    }
    seen.dedup();
    assert_eq!(seen.len(), 3, "each request its own id");
    // An invalid traceparent is not passed on.
    let _ = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("traceparent", "00-zz-not-a-trace")
        .json(&json!({"model": "pic", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(up.received_at("/generate")[1].traceparent, None);
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_response_bytes() {
    let gw = spawn_gateway(
        "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: m, backends: [sim], default_size: 16x16}\n",
    )
    .await;
    let (s, _, body) = gw
        .post_json("/v1/images/generations", json!({"model": "m", "prompt": "p", "response_format": "b64_json"}))
        .await;
    assert_eq!(s, 200);
    let sent = serde_json::to_vec(&body).unwrap().len() as f64;
    let deadline = Instant::now() + TEST_TIMEOUT;
    let text = loop {
        let text = gw.client.get(gw.endpoint("/metrics")).send().await.unwrap().text().await.unwrap();
        let bytes: f64 = text
            .lines()
            .filter(|l| l.starts_with("easel_http_response_bytes_total{") && l.contains("/v1/images/generations"))
            .filter_map(|l| l.rsplit(" ").next()?.parse::<f64>().ok())
            .sum();
        if bytes >= sent * 0.9 {
            break text;
        }
        assert!(Instant::now() < deadline, "response bytes never counted ({bytes} of ~{sent}):\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(text.contains("easel_build_info{"), "{text}");
    assert!(text.contains("process_resident_memory_bytes "), "{text}");
    let promtool = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|f| f.is_file()));
    let Some(promtool) = promtool else {
        assert!(
            std::env::var_os("EASEL_SKIP_PROMTOOL").is_some(),
            "promtool is missing (apt-get install prometheus), or set EASEL_SKIP_PROMTOOL=1"
        );
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}\n---\n{text}");
}

#[test]
fn one_access_log_line_per_request_without_secrets_and_bad_log_settings_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("easel.yaml"),
        "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: m, backends: [sim], default_size: 16x16}\n",
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("EASEL_CONFIG")
        .env("EASEL_LOG", "info")
        .env("EASEL_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read = || {
        let mut s = String::new();
        std::fs::File::open(&log).unwrap().read_to_string(&mut s).unwrap();
        s
    };
    let wait_for = |what: &str| {
        let deadline = Instant::now() + TEST_TIMEOUT;
        loop {
            let s = read();
            if s.contains(what) {
                return s;
            }
            assert!(Instant::now() < deadline, "never logged {what}:\n{s}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let text = wait_for("listening on http://");
    let url: String = text[text.find("http://127.0.0.1:").unwrap()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || ":/.".contains(*c))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{url}/v1/images/generations"))
            .bearer_auth("sk-never-logged")
            .header("X-Request-Id", "access-1")
            .json(&json!({"model": "m", "prompt": "p"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    });
    let text = wait_for("access-1");
    let _ = child.kill();
    let _ = child.wait();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "access" && v["fields"]["request_id"] == "access-1")
        .collect();
    assert_eq!(lines.len(), 1, "one access line per request:\n{text}");
    let line = lines[0].to_string();
    for field in ["\"method\"", "\"route\"", "\"status\"", "\"bytes\"", "\"duration_ms\"", "\"model\"", "\"backend\""] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(line.contains("/v1/images/generations") && line.contains("200") && line.contains("\"sim\""), "{line}");
    assert!(!text.contains("sk-never-logged"), "a secret reached the log");
    assert!(!text.contains('\u{1b}'), "no ANSI colour when stderr is a file");

    for (var, value, needle) in
        [("EASEL_LOG", "info,[[[", "EASEL_LOG"), ("EASEL_LOG_FORMAT", "yaml", "EASEL_LOG_FORMAT")]
    {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env_remove("EASEL_CONFIG")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{var}={value}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
