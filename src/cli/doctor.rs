//! `easel doctor`: validates the configuration, opens storage and the database, then probes every backend twice:
//! with its configured kind's own probe, and with a fixed identification sequence that tells what the server
//! really is (ComfyUI, InvokeAI, SD.Next, Forge, AUTOMATIC1111, an OpenAI-compatible server, a Hugging Face
//! endpoint). A mismatch between the two is the usual cause of "404 on the wrong path". Then it checks what the
//! models ask of each server: every ComfyUI workflow's node classes and their required inputs against the
//! server's `/object_info`, every InvokeAI graph's node types against the server's `/openapi.json`, and every
//! A1111 model's checkpoint against `/sdapi/v1/sd-models`. Exit 1 when anything is wrong.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::backends::AnyBackend;
use crate::backends::client::Http;
use crate::backends::workflow::{DEFAULT_CFG, DEFAULT_FPS, DEFAULT_STEPS, Workflow, WorkflowVars};
use crate::config::{self, BackendConfig, BackendKind, ModelConfig, ModelType, ProcessEnv};
use crate::ledger::AnyStore;

/// Each identification probe's time limit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time limit of one catalogue read (`/object_info` is built on demand and is slow with many custom nodes).
const CATALOGUE_TIMEOUT: Duration = Duration::from_secs(30);

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
        let (text, good) = contracts(cfg, b).await;
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

/// What the models served by `b` need from its server, checked against the server's own catalogue: ComfyUI
/// workflows against `/object_info`, InvokeAI graphs against `/openapi.json`, A1111 checkpoints against
/// `/sdapi/v1/sd-models`. Other kinds: nothing.
async fn contracts(cfg: &config::Config, b: &std::sync::Arc<BackendConfig>) -> (String, bool) {
    if b.url.is_none() {
        return (String::new(), true);
    }
    let served: Vec<&ModelConfig> =
        cfg.models.iter().filter(|m| m.backends.iter().any(|mb| mb.name == b.name)).map(AsRef::as_ref).collect();
    let (what, path, problems): (&str, &str, Result<Vec<String>, String>) = match b.kind {
        BackendKind::ComfyUi => {
            let models: Vec<&ModelConfig> = served.into_iter().filter(|m| m.workflow.is_some()).collect();
            if models.is_empty() {
                return (String::new(), true);
            }
            let checked = match catalogue(b, "/object_info").await {
                Ok(info) if info.as_object().is_none_or(serde_json::Map::is_empty) => {
                    return (unchecked("workflows", "/object_info", "it lists no node classes"), true);
                }
                Ok(info) => Ok(models.iter().flat_map(|m| comfy_problems(m, &info)).collect()),
                Err(e) => Err(e),
            };
            ("workflows", "/object_info", checked)
        }
        BackendKind::InvokeAi => {
            let models: Vec<&ModelConfig> = served.into_iter().filter(|m| m.workflow.is_some()).collect();
            if models.is_empty() {
                return (String::new(), true);
            }
            let checked = match catalogue(b, "/openapi.json").await {
                Ok(doc) => {
                    let types = invocation_types(&doc);
                    if types.is_empty() {
                        return (unchecked("graphs", "/openapi.json", "it declares no invocation schemas"), true);
                    }
                    Ok(models.iter().flat_map(|m| invoke_problems(m, &types)).collect())
                }
                Err(e) => Err(e),
            };
            ("graphs", "/openapi.json", checked)
        }
        BackendKind::A1111 => {
            let models: Vec<(&ModelConfig, &str)> =
                served.into_iter().filter_map(|m| a1111_checkpoint(&m.upstream_model).map(|c| (m, c))).collect();
            if models.is_empty() {
                return (String::new(), true);
            }
            let checked = match catalogue(b, "/sdapi/v1/sd-models").await {
                Ok(list) => Ok(models.iter().filter_map(|(m, c)| a1111_problem(m, c, &list)).collect()),
                Err(e) => Err(e),
            };
            ("checkpoints", "/sdapi/v1/sd-models", checked)
        }
        _ => return (String::new(), true),
    };
    match problems {
        Ok(list) if list.is_empty() => (format!("  {what}: ok (checked against {path})\n"), true),
        Ok(list) => {
            let mut out = format!("  {what}: {} mismatch(es) with {path}:\n", list.len());
            for p in list {
                out.push_str(&format!("    {p}\n"));
            }
            (out, false)
        }
        Err(e) => (format!("  {what}: FAILED: cannot read {path}: {e}\n"), false),
    }
}

/// A check doctor could not make because the catalogue answered in a shape it does not know (a warning: that
/// server may still run the workflows).
fn unchecked(what: &str, path: &str, why: &str) -> String {
    format!("  warning: {what} not checked: {path} answered, but {why}\n")
}

/// One JSON catalogue from the backend, through its own HTTP client (headers, key, `max_response` cap) and
/// bounded by [`CATALOGUE_TIMEOUT`].
async fn catalogue(b: &std::sync::Arc<BackendConfig>, path: &str) -> Result<Value, String> {
    let http = Http::new(std::sync::Arc::clone(b))?;
    let read = async {
        let (rb, url) = http.request(reqwest::Method::GET, path);
        let resp = http.send(http.bearer(rb), &url).await?;
        http.json::<Value>(resp, &url).await
    };
    match tokio::time::timeout(CATALOGUE_TIMEOUT, read).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", CATALOGUE_TIMEOUT.as_secs())),
    }
}

/// The graphs a request could render from the model's workflow, with neutral values: a generation, an edit
/// without a mask and an edit with one (those the template can render; an edit-only workflow cannot render a
/// generation). Video models get a clip length, rate and frame count.
fn sample_graphs(model: &ModelConfig, workflow: &Workflow) -> Result<Vec<Value>, String> {
    let extra = serde_json::Map::new();
    let video = model.kind == ModelType::Video;
    let vars = |image: Option<&'static str>, mask: Option<&'static str>| WorkflowVars {
        prompt: "a lighthouse at dawn",
        negative_prompt: "",
        seed: 1,
        width: model.default_size.width,
        height: model.default_size.height,
        steps: model.steps.unwrap_or(DEFAULT_STEPS),
        cfg: model.guidance_scale.unwrap_or(DEFAULT_CFG),
        batch_size: 1,
        background: "auto",
        image,
        mask,
        seconds: video.then_some(4),
        fps: video.then_some(DEFAULT_FPS),
        frames: video.then_some(4 * DEFAULT_FPS),
        model: &model.upstream_model,
        extra: &extra,
    };
    let mut graphs = Vec::new();
    let mut first_error = None;
    let edits = if video {
        vec![(None, None), (Some("easel/input.png"), None)]
    } else {
        vec![(None, None), (Some("easel/input.png"), Some("")), (Some("easel/input.png"), Some("easel/mask.png"))]
    };
    for (image, mask) in edits {
        match workflow.render(&vars(image, mask)) {
            Ok(g) if !graphs.contains(&g) => graphs.push(g),
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (graphs.is_empty(), first_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(graphs),
    }
}

/// Each node of the model's rendered workflow whose class the server lacks, or that leaves out one of its
/// class's required inputs (a link or a value, either counts).
fn comfy_problems(model: &ModelConfig, info: &Value) -> Vec<String> {
    let Some(workflow) = model.workflow.as_deref() else { return Vec::new() };
    let at = format!("model `{}`: workflow {}", model.id, workflow.path.display());
    let graphs = match sample_graphs(model, workflow) {
        Ok(g) => g,
        Err(e) => return vec![format!("{at} does not render: {e}")],
    };
    let mut problems: Vec<String> = Vec::new();
    for graph in &graphs {
        let Some(nodes) = graph.as_object() else { continue };
        let mut ids: Vec<&String> = nodes.keys().collect();
        ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.as_str()));
        for id in ids {
            let node = &nodes[id.as_str()];
            let found = match node.get("class_type").and_then(Value::as_str) {
                None => vec![format!("{at} node {id} has no `class_type`")],
                Some(class) => match info.get(class) {
                    None => vec![format!(
                        "{at} node {id} uses `{class}`, which this ComfyUI does not have (a custom node that is not installed?)"
                    )],
                    Some(def) => def["input"]["required"]
                        .as_object()
                        .into_iter()
                        .flat_map(|req| req.keys())
                        .filter(|input| node["inputs"].get(input.as_str()).is_none())
                        .map(|input| format!("{at} node {id} (`{class}`) does not set its required input `{input}`"))
                        .collect(),
                },
            };
            for p in found {
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
        }
    }
    problems
}

/// The node types an InvokeAI server runs: the `type` constant of every invocation schema in its OpenAPI
/// document (`class: invocation`, or named `…Invocation`; output schemas have `type` constants too).
fn invocation_types(doc: &Value) -> std::collections::BTreeSet<String> {
    let Some(schemas) = doc["components"]["schemas"].as_object() else { return Default::default() };
    schemas
        .iter()
        .filter(|(name, s)| s["class"] == "invocation" || (s.get("class").is_none() && name.ends_with("Invocation")))
        .filter_map(|(_, s)| {
            let t = &s["properties"]["type"];
            let single = t["enum"].as_array().filter(|e| e.len() == 1).and_then(|e| e[0].as_str());
            t["const"].as_str().or(single).or_else(|| t["default"].as_str()).map(str::to_owned)
        })
        .collect()
}

/// Each node of the model's rendered graph whose `type` the server does not know.
fn invoke_problems(model: &ModelConfig, types: &std::collections::BTreeSet<String>) -> Vec<String> {
    let Some(workflow) = model.workflow.as_deref() else { return Vec::new() };
    let at = format!("model `{}`: graph {}", model.id, workflow.path.display());
    let graphs = match sample_graphs(model, workflow) {
        Ok(g) => g,
        Err(e) => return vec![format!("{at} does not render: {e}")],
    };
    let mut problems: Vec<String> = Vec::new();
    for graph in &graphs {
        let Some(nodes) = graph["nodes"].as_object() else {
            problems.push(format!("{at} has no `nodes` object"));
            continue;
        };
        for (id, node) in nodes {
            let p = match node["type"].as_str() {
                None => format!("{at} node `{id}` has no `type`"),
                Some(t) if types.contains(t) => continue,
                Some(t) => format!(
                    "{at} node `{id}` has type `{t}`, which this InvokeAI does not have (a node pack that is not installed, or another version's name?)"
                ),
            };
            if !problems.contains(&p) {
                problems.push(p);
            }
        }
    }
    problems
}

/// The checkpoint an A1111 model asks for, or `None` when it runs whatever is loaded (`upstream_model: current`).
fn a1111_checkpoint(upstream_model: &str) -> Option<&str> {
    let name = upstream_model.trim();
    (!name.is_empty() && name != "current").then_some(name)
}

/// The model's checkpoint when none of `/sdapi/v1/sd-models` answers to it by title, model name, file name
/// (whole or last component), short hash or sha256 (the names A1111 accepts in `sd_model_checkpoint`).
fn a1111_problem(model: &ModelConfig, wanted: &str, list: &Value) -> Option<String> {
    let entries = list.as_array().map(Vec::as_slice).unwrap_or_default();
    let known = entries.iter().any(|e| {
        let s = |k: &str| e[k].as_str().unwrap_or_default();
        let file = s("filename");
        [s("title"), s("model_name"), file, file.rsplit(['/', '\\']).next().unwrap_or(file), s("hash"), s("sha256")]
            .iter()
            .any(|name| !name.is_empty() && *name == wanted)
    });
    if known {
        return None;
    }
    let titles: Vec<&str> = entries.iter().filter_map(|e| e["title"].as_str()).collect();
    Some(format!(
        "model `{}`: checkpoint `{wanted}` (its `upstream_model`) is not among this server's {} checkpoint(s){}",
        model.id,
        titles.len(),
        if titles.is_empty() { String::new() } else { format!(": {}", titles.join(", ")) }
    ))
}
