//! Config reload through the real binary: `POST /v1/admin/reload` and SIGHUP. A request running during a reload
//! finishes on the configuration it started with (its backend, its slot, its price); new requests see the new
//! models and prices; an unchanged backend keeps its admission counts; a bad file or a restart-only change is
//! refused with the reason and changes nothing.

use serde_json::{Value, json};

use crate::support::TEST_TIMEOUT;
use crate::support::books::{ADMIN, credits_at, key_at, ledger_clean_at};
use crate::support::start_binary;

fn config(price_a: u32, extra_backend: &str, extra_model: &str, extra_top: &str) -> String {
    format!(
        "auth:\n  mode: keys\n{extra_top}backends:\n  slow:\n    kind: simulated\n    latency: 1500ms\n    concurrency: {{images: 1}}\n{extra_backend}models:\n  - id: a\n    backends: [slow]\n    credits: {price_a}\n{extra_model}"
    )
}

const FAST_BACKEND: &str = "  fast:\n    kind: simulated\n    latency: 0ms\n";
const MODEL_B: &str = "  - id: b\n    backends: [fast]\n    credits: 1\n";

async fn status(client: &reqwest::Client, url: &str) -> Value {
    client.get(format!("{url}/v1/gateway/status")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap()
}

async fn models(client: &reqwest::Client, url: &str, secret: &str) -> Vec<String> {
    let v: Value =
        client.get(format!("{url}/v1/models")).bearer_auth(secret).send().await.unwrap().json().await.unwrap();
    v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
}

async fn reload(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let resp = client.post(format!("{url}/v1/admin/reload")).bearer_auth(ADMIN).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn generate(client: &reqwest::Client, url: &str, secret: &str, model: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("{url}/v1/images/generations"))
        .bearer_auth(secret)
        .json(&json!({"model": model, "prompt": "p"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_new_models_and_prices_while_a_running_request_finishes_on_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("easel.yaml");
    std::fs::write(&file, config(5, "", "", "")).unwrap();
    let (mut child, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let client = reqwest::Client::new();
    let secret = key_at(&url, 100.0).await;
    assert_eq!(models(&client, &url, &secret).await, ["a"]);

    // A request on `slow` is running (it holds slow's only slot) when the file changes and easel reloads.
    let running = tokio::spawn(generate(&client, &url, &secret, "a").send());
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    while status(&client, &url).await["backends"]["slow"]["admission"]["images"]["inflight"] != 1 {
        assert!(std::time::Instant::now() < deadline, "the first request never started");
        tokio::task::yield_now().await;
    }
    std::fs::write(&file, config(7, FAST_BACKEND, MODEL_B, "")).unwrap();
    let (code, report) = reload(&client, &url).await;
    assert_eq!(code, 200, "{report}");
    let r = &report["report"];
    assert_eq!((r["generation"].as_u64(), r["models"].clone()), (Some(1), json!(["a", "b"])), "{report}");
    assert_eq!((r["unchanged_backends"].clone(), r["changed_backends"].clone()), (json!(["slow"]), json!(["fast"])));
    // The unchanged backend kept its handle: the running request still counts against its limit.
    assert_eq!(status(&client, &url).await["backends"]["slow"]["admission"]["images"]["inflight"], 1);

    // New requests see the new model at once, while the first one is still running.
    let b = generate(&client, &url, &secret, "b").send().await.unwrap();
    assert_eq!(b.status(), 200);
    assert!(!running.is_finished(), "the first request should still be running");
    let first = tokio::time::timeout(TEST_TIMEOUT, running).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), 200, "the running request finished across the reload");
    // It was held and captured at the price it started with (5); `b` cost 1.
    assert_eq!(credits_at(&url, &secret).await, (94_000, 0));
    let again = generate(&client, &url, &secret, "a").send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(credits_at(&url, &secret).await, (87_000, 0), "the new price (7) applies to new requests");

    // A broken file changes nothing and says why.
    std::fs::write(&file, "models: [\n").unwrap();
    let (code, e) = reload(&client, &url).await;
    assert_eq!((code, e["error"]["code"].as_str()), (400, Some("config_rejected")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("easel.yaml"), "{e}");
    std::fs::write(&file, config(7, FAST_BACKEND, MODEL_B, "").replace("backends: [fast]", "backends: [nowhere]"))
        .unwrap();
    let (code, e) = reload(&client, &url).await;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("nowhere"), "{e}");
    // A restart-only change is refused, naming it.
    std::fs::write(&file, config(7, FAST_BACKEND, MODEL_B, "storage:\n  url_ttl: 2h\n")).unwrap();
    let (code, e) = reload(&client, &url).await;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`storage`"), "{e}");
    assert_eq!(models(&client, &url, &secret).await, ["a", "b"], "still the last good configuration");

    // SIGHUP reloads too: `b` and its backend go away.
    std::fs::write(&file, config(7, "", "", "")).unwrap();
    std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    while models(&client, &url, &secret).await != ["a"] {
        assert!(std::time::Instant::now() < deadline + TEST_TIMEOUT, "SIGHUP did not reload");
        tokio::task::yield_now().await;
    }
    let gone = generate(&client, &url, &secret, "b").send().await.unwrap();
    assert_eq!(gone.status(), 404);
    ledger_clean_at(&url).await;
    child.kill().unwrap();
    child.wait().unwrap();
}
