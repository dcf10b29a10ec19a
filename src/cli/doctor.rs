//! `easel doctor`: validates the configuration, opens storage and the database, then probes every backend twice:
//! with its configured kind's own probe, and with a fixed identification sequence that tells what the server
//! really is (ComfyUI, InvokeAI, SD.Next, Forge, AUTOMATIC1111, an OpenAI-compatible server, a Hugging Face
//! endpoint). A mismatch between the two is the usual cause of "404 on the wrong path". Exit 1 when anything is
//! wrong.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::backends::AnyBackend;
use crate::config::{self, BackendConfig, BackendKind, ProcessEnv};
use crate::ledger::sqlite::SqliteStore;

/// Each identification probe's time limit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(config_path: Option<PathBuf>) -> ExitCode {
    let path = config::resolve_path(config_path.as_deref());
    let cfg = match config::load(path.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (report, ok) = runtime.block_on(examine(&cfg));
    super::write_stdout(&report);
    if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

async fn examine(cfg: &config::Config) -> (String, bool) {
    let mut out = format!("configuration {}: ok\n", cfg.origin);
    let mut ok = true;
    match tokio::fs::create_dir_all(&cfg.storage.files).await {
        Ok(()) => out.push_str(&format!("storage {}: ok\n", cfg.storage.files.display())),
        Err(e) => {
            ok = false;
            out.push_str(&format!("storage {}: FAILED: {e}\n", cfg.storage.files.display()));
        }
    }
    match SqliteStore::open(&cfg.storage.database, false).await {
        Ok(_) => out.push_str(&format!("database {}: ok\n", cfg.storage.database)),
        Err(e) => {
            ok = false;
            out.push_str(&format!("database {}: FAILED: {e}\n", cfg.storage.database));
        }
    }
    for b in &cfg.backends {
        let (text, good) = backend(b).await;
        ok &= good;
        out.push_str(&text);
    }
    (out, ok)
}

async fn backend(b: &std::sync::Arc<BackendConfig>) -> (String, bool) {
    let url = b.url.as_ref().map_or_else(|| "(built in)".to_owned(), ToString::to_string);
    let mut out = format!("backend {} [{}] {url}\n", b.name, b.kind);
    let mut ok = true;
    let probe = match AnyBackend::build(std::sync::Arc::clone(b)) {
        Ok(adapter) => {
            tokio::time::timeout(PROBE_TIMEOUT * 2, adapter.probe()).await.map_err(|_| "the probe timed out".to_owned())
        }
        Err(e) => Err(e),
    };
    match probe {
        Ok(Ok(report)) => out.push_str(&format!(
            "  {} probe: ok, {}{}\n",
            b.kind,
            report.detail,
            if report.ready { "" } else { " (not ready)" }
        )),
        Ok(Err(e)) => {
            ok = false;
            out.push_str(&format!("  {} probe: FAILED: {e}\n", b.kind));
        }
        Err(e) => {
            ok = false;
            out.push_str(&format!("  {} probe: FAILED: {e}\n", b.kind));
        }
    }
    if let Some(root) = &b.url
        && matches!(
            b.kind,
            BackendKind::OpenAi
                | BackendKind::A1111
                | BackendKind::ComfyUi
                | BackendKind::InvokeAi
                | BackendKind::HuggingFace
        )
    {
        match identify(root.as_str(), b.api_key.as_ref().map(|k| k.expose())).await {
            Some((kind, what)) if kind == b.kind => out.push_str(&format!("  identified: {what} (matches kind `{}`)\n", b.kind)),
            Some((kind, what)) => {
                ok = false;
                out.push_str(&format!("  identified: {what} — but the config says kind `{}`; set `kind: {kind}`\n", b.kind));
            }
            None => out.push_str("  identified: unknown (no ComfyUI, InvokeAI, A1111/Forge/SD.Next, OpenAI-compatible or Hugging Face probe answered)\n"),
        }
    }
    (out, ok)
}

/// Probes a server root in a fixed order; the first that answers in its own shape names the server. The key, when
/// given, is sent as a bearer token (OpenAI-compatible servers usually want one).
pub async fn identify(root: &str, key: Option<&str>) -> Option<(BackendKind, String)> {
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build().ok()?;
    let base = root.trim_end_matches('/');
    let get = |path: &str| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let rb = client.get(&url);
            let rb = match key {
                Some(k) => rb.bearer_auth(k),
                None => rb,
            };
            let resp = rb.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.text().await.ok()
        }
    };
    let json = |text: Option<String>| text.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if let Some(v) = json(get("/system_stats").await)
        && let Some(version) = v["system"]["comfyui_version"].as_str()
    {
        return Some((BackendKind::ComfyUi, format!("ComfyUI {version}")));
    }
    if let Some(v) = json(get("/api/v1/app/version").await)
        && let Some(version) = v["version"].as_str()
    {
        return Some((BackendKind::InvokeAi, format!("InvokeAI {version}")));
    }
    if let Some(v) = json(get("/sdapi/v1/version").await)
        && (v["app"] == "sd.next" || v["version"]["app"] == "sd.next")
    {
        return Some((BackendKind::A1111, "SD.Next (speaks the a1111 protocol)".into()));
    }
    if let Some(v) = json(get("/sdapi/v1/options").await)
        && v.get("sd_model_checkpoint").is_some()
    {
        let name = if v.get("forge_preset").is_some() { "Forge" } else { "AUTOMATIC1111" };
        return Some((
            BackendKind::A1111,
            format!("{name}, checkpoint {}", v["sd_model_checkpoint"].as_str().unwrap_or("none")),
        ));
    }
    if let Some(v) = json(get("/v1/models").await)
        && v["object"] == "list"
    {
        return Some((BackendKind::OpenAi, "an OpenAI-compatible server (/v1/models lists models)".into()));
    }
    if get("/health").await.is_some_and(|t| t.trim() == "Ok") {
        return Some((BackendKind::HuggingFace, "a Hugging Face inference endpoint (/health says Ok)".into()));
    }
    None
}
