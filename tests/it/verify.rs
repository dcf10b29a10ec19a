//! `easel verify` (the real binary) against a gateway: every row passes against a healthy one (images with the
//! output URL fetched, a video job downloaded, text whole and streamed, a burst answered with proper 429s), and
//! against a broken one it exits 1 naming the failing rows.

use crate::support::{spawn_gateway, text_server};

const BIN: &str = env!("CARGO_BIN_EXE_easel");

async fn verify(args: &[&str]) -> (i32, String) {
    let out = tokio::time::timeout(
        crate::support::TEST_TIMEOUT,
        tokio::process::Command::new(BIN).arg("verify").args(args).env_remove("EASEL_TOKEN").output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The row of `check` in the table: (`PASS`/`FAIL`, detail).
fn row<'a>(table: &'a str, check: &str) -> (&'a str, &'a str) {
    table
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(check)?.trim_start();
            let (result, detail) = rest.split_once(' ')?;
            Some((result, detail.trim()))
        })
        .unwrap_or_else(|| panic!("no `{check}` row in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_against_a_healthy_gateway_with_every_check() {
    let llm = text_server::start().await;
    let yaml = format!(
        "backends:\n  sim:\n    kind: simulated\n    latency: 300ms\n    poll_interval: 20ms\n    concurrency: {{images: 1}}\n    queue: {{depth: 0}}\n  vid: {{kind: simulated, poll_interval: 20ms}}\n  llm: {{kind: openai, url: '{}/v1', timeout: 20s}}\nmodels:\n  - {{id: pic, backends: [sim], default_size: 32x24}}\n  - {{id: clip, type: video, backends: [vid], default_size: 32x32}}\n  - {{id: chat, type: text, backends: [llm]}}\n",
        llm.url
    );
    let gw = spawn_gateway(&yaml).await;
    let (code, out) =
        verify(&["--base-url", &gw.url, "--check-images", "--check-videos", "--check-text", "--check-429", "6"]).await;
    assert_eq!(code, 0, "{out}");
    for check in ["health", "readiness", "models", "error shape", "images", "videos", "text", "text stream", "429"] {
        assert_eq!(row(&out, check).0, "PASS", "{out}");
    }
    assert!(row(&out, "models").1.contains("3 models: 1 image, 1 video, 1 text"), "{out}");
    assert!(row(&out, "images").1.contains("32x24 png"), "{out}");
    assert!(row(&out, "images").1.contains("url fetched"), "{out}");
    assert!(row(&out, "videos").1.contains("completed in"), "{out}");
    // One slot and no queue: of six at once, at least one is served and some are refused with Retry-After.
    let burst = row(&out, "429").1;
    assert!(burst.starts_with("6 at once: "), "{out}");
    assert!(!burst.contains("0 served") && !burst.contains(" 0 × 429"), "{burst}");
    assert!(out.ends_with("all 9 checks passed\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_with_exit_1_naming_the_rows_that_failed() {
    // The only image backend is down (nothing listens on port 9); the gateway itself answers.
    let yaml = "backends:\n  dead: {kind: a1111, url: 'http://127.0.0.1:9', timeout: 2s}\nmodels:\n  - {id: pic, backends: [dead]}\n";
    let gw = spawn_gateway(yaml).await;
    let (code, out) = verify(&["--base-url", &gw.url, "--check-images", "--check-text"]).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&out, "health").0, "PASS", "{out}");
    assert_eq!(row(&out, "error shape").0, "PASS", "bad input is refused before any backend call: {out}");
    let (result, detail) = row(&out, "images");
    assert_eq!(result, "FAIL", "{out}");
    assert!(detail.contains("`pic`") && detail.contains("unreachable"), "{out}");
    assert_eq!(row(&out, "text").0, "FAIL", "no text model: {out}");
    assert!(out.contains("checks FAILED"), "{out}");

    // Nothing listening at all: every row fails, still a table and exit 1.
    let (code, out) = verify(&["--base-url", "http://127.0.0.1:9"]).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&out, "health").0, "FAIL", "{out}");
    // And a malformed URL is a usage error.
    let (code, out) = verify(&["--base-url", "ftp://x"]).await;
    assert_eq!(code, 2, "{out}");
}
