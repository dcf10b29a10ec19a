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
use crate::ledger::AnyStore;

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
    match AnyStore::open(&cfg.storage.database, false).await {
        Ok(_) => out.push_str(&format!("database {}: ok\n", crate::ledger::postgres::redact(&cfg.storage.database))),
        Err(e) => {
            ok = false;
            out.push_str(&format!(
                "database {}: FAILED: {e}\n",
                crate::ledger::postgres::redact(&cfg.storage.database)
            ));
        }
    }
    let live = if cfg.backends.iter().any(|b| b.process.is_some()) { live_processes(cfg).await } else { None };
    for b in &cfg.backends {
        let (text, good) = backend(b).await;
        ok &= good;
        out.push_str(&text);
        if let Some(p) = &b.process {
            out.push_str(&managed(cfg, b, p, live.as_ref()));
        }
    }
    (out, ok)
}

/// The running easel's `GET /v1/admin/processes?lines=10` (needs `EASEL_ADMIN_TOKEN`), when it answers.
async fn live_processes(cfg: &config::Config) -> Option<Value> {
    let token = cfg.auth.admin_token.as_ref()?;
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build().ok()?;
    let url = format!("http://{}/v1/admin/processes?lines=10", cfg.server.listen);
    let resp = client.get(url).bearer_auth(token.expose()).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// What doctor knows about a managed backend: its command, whether the program is found, the state file's record,
/// who holds its port, and (from a running easel) its state and last output lines.
fn managed(cfg: &config::Config, b: &BackendConfig, p: &config::ProcessConfig, live: Option<&Value>) -> String {
    use crate::process::{os, port, state_file_path, statefile::StateFile};
    let mut out = format!("  process: {} (port {})\n", os::display_cmd(&p.cmd), p.port);
    if let Some(program) = p.cmd.first()
        && !program.contains('/')
        && !std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
    {
        out.push_str(&format!("  warning: `{program}` is not on PATH; starting it will fail\n"));
    }
    let recorded = StateFile::read(&state_file_path(&cfg.storage.files)).remove(&b.name);
    let ours = recorded.as_ref().filter(|e| os::start_time(e.pid) == Some(e.start_ticks) && os::runs(e.pid, &e.cmd));
    match ours {
        Some(e) => out.push_str(&format!("  running: pid {} since {}\n", e.pid, e.started_at)),
        None => match port::holder(p.port) {
            Some(h) => out.push_str(&format!("  warning: {} (not started by easel)\n", h.describe(p.port))),
            None => out.push_str("  running: no\n"),
        },
    }
    let entry =
        live.and_then(|v| v["data"].as_array()).and_then(|list| list.iter().find(|e| e["backend"] == b.name.as_str()));
    match entry {
        Some(e) => {
            out.push_str(&format!(
                "  state: {} (restarts {}{})\n",
                e["state"].as_str().unwrap_or("unknown"),
                e["restarts"],
                e["error"].as_str().map(|m| format!("; {m}")).unwrap_or_default()
            ));
            for line in e["lines"].as_array().into_iter().flatten() {
                out.push_str(&format!("    | {}\n", line.as_str().unwrap_or_default()));
            }
        }
        None => {
            out.push_str("  state: unknown (no running easel answered /v1/admin/processes; set EASEL_ADMIN_TOKEN)\n")
        }
    }
    out
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
