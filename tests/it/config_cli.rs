//! The real binary: `config check` on good and bad files, `--version`, usage errors, and `serve` on port 0 with
//! a graceful SIGTERM that lets the in-flight request finish.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::TEST_TIMEOUT;

const BIN: &str = env!("CARGO_BIN_EXE_easel");

fn easel(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(dir).env_remove("EASEL_CONFIG").output().expect("run easel")
}

#[test]
fn config_check_reports_every_problem_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "server:\n  listen: 127.0.0.1:8080\nbackends:\n  gpu:\n    kind: a1111\n    url: http://127.0.0.1:7860\n    timeout: forever\n    queue: {depth: 4, wait: 10s}\nmodels:\n  - id: sdxl\n    backends: [gpu, nowhere]\n",
    )
    .unwrap();
    let out = easel(&["config", "check", "--config", "bad.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:7:5: backends.gpu.timeout: `forever` is not a duration"), "{err}");
    assert!(
        err.contains("bad.yaml:11:5: models[0].backends[1]: no backend named `nowhere`")
            || err.contains("models[0].backends[1]"),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");

    std::fs::write(
        dir.path().join("typo.yaml"),
        "backends:\n  sim:\n    kind: simulated\n    concurency: {images: 1}\nmodels: [{id: m, backends: [sim]}]\n",
    )
    .unwrap();
    let out = easel(&["config", "check", "--config", "typo.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("typo.yaml:4:5: backends.sim.concurency: unknown key `concurency` (did you mean `concurrency`?)"),
        "{err}"
    );
}

#[test]
fn config_check_summarises_a_good_file_and_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel(&["config", "check"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("built-in default: ok"), "{text}");
    assert!(text.contains("easel-sim"), "{text}");

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/easel.yaml");
    let out = Command::new(BIN)
        .args(["config", "check", "--config", example])
        .env("OPENAI_API_KEY", "sk-test")
        .env("HF_TOKEN", "hf_test")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "examples/easel.yaml must stay valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn version_help_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = easel(&["--version"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = easel(&["--help"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
    let out = easel(&["frobnicate"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = easel(&["serve", "--listen", "not-an-address"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn serve_finishes_in_flight_requests_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("easel.yaml"), "backends:\n  slow:\n    kind: simulated\n    latency: 700ms\nmodels:\n  - id: m\n    backends: [slow]\n    default_size: 16x16\n").unwrap();
    let (mut child, url) = crate::support::start_binary(dir.path(), &[]);
    let client = reqwest::Client::new();
    let request = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/v1/images/generations"))
                .json(&json!({"prompt": "p", "response_format": "b64_json"}))
                .send()
                .await
        }
    });
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let v: serde_json::Value =
            client.get(format!("{url}/v1/gateway/status")).send().await.unwrap().json().await.unwrap();
        if v["backends"]["slow"]["admission"]["images"]["inflight"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let resp =
        tokio::time::timeout(TEST_TIMEOUT, request).await.unwrap().unwrap().expect("the in-flight request completes");
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + TEST_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "easel did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(client.get(format!("{url}/healthz")).send().await.is_err(), "no longer listening");
}

#[tokio::test]
async fn doctor_tells_what_a_server_really_is() {
    let sd = crate::support::a1111::start().await;
    let oa = crate::support::openai::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("easel.yaml"),
        format!(
            "backends:\n  wrong: {{kind: openai, url: \"{}\"}}\n  right: {{kind: openai, url: \"{}/v1\", api_key: {}}}\nmodels:\n  - {{id: m, backends: [wrong, right]}}\n",
            sd.url,
            oa.url,
            crate::support::openai::KEY
        ),
    )
    .unwrap();
    let path = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || easel(&["doctor"], &path)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("backend wrong [openai]"), "{text}");
    // A 404 on /v1/models alone only says "no model list"; identification still names the real kind.
    assert!(text.contains("reachable (no model list at /v1/models)"), "{text}");
    assert!(text.contains("identified: AUTOMATIC1111") && text.contains("set `kind: a1111`"), "{text}");
    assert!(
        text.contains("identified: an OpenAI-compatible server") && text.contains("matches kind `openai`"),
        "{text}"
    );
    assert!(text.contains("database sqlite://data/easel.db: ok"), "{text}");
}

#[test]
fn config_is_global_storage_sits_beside_the_file_and_keys_refuse_unknown_models() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("easel.yaml"),
        "auth: {mode: keys}\nbackends:\n  sim: {kind: simulated}\nmodels:\n  - {id: sdxl, backends: [sim]}\n",
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // `-c` before or after the subcommand; relative storage paths resolve beside the file, not in the cwd.
    let out = easel(&["-c", conf.join("easel.yaml").to_str().unwrap(), "migrate"], elsewhere.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(conf.join("data/easel.db").is_file(), "the database is created beside the config file");
    assert!(!elsewhere.path().join("data").exists());
    let path = conf.join("easel.yaml");
    let out = easel(
        &["keys", "create", "--name", "a", "--models", "sdx1,flux", "-c", path.to_str().unwrap()],
        elsewhere.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`sdx1` (did you mean `sdxl`?)") && err.contains("`flux`"), "{err}");
    let out = easel(&["keys", "list", "-c", path.to_str().unwrap()], elsewhere.path());
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.starts_with("no keys"), "no key was made: {listed}");
    for (args, needle) in [
        (vec!["keys", "create", "--name", " "], "--name must not be empty"),
        (vec!["keys", "create", "--name", "b", "--credits", "-1"], "must not be negative"),
        (vec!["keys", "create", "--name", "b", "--credits", "0.0001"], "more than 3 decimals"),
        (vec!["credits", "grant", "b", "0"], "changes nothing"),
    ] {
        let mut all = args.clone();
        all.extend(["-c", path.to_str().unwrap()]);
        let out = easel(&all, elsewhere.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out =
        easel(&["keys", "create", "--name", "ok", "--credits", "1.5", "-c", path.to_str().unwrap()], elsewhere.path());
    assert!(out.status.success());
    let out = easel(&["keys", "list", "-c", path.to_str().unwrap()], elsewhere.path());
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.starts_with("  id  name") && listed.contains(" ok "), "{listed}");
    let out = easel(&["keys", "revoke", "ok", "-c", path.to_str().unwrap()], elsewhere.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = easel(&["keys", "revoke", "ok", "-c", path.to_str().unwrap()], elsewhere.path());
    assert_eq!(out.status.code(), Some(1), "revoking twice fails");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("already revoked"), "{said}");

    let out = easel(&["completions", "bash"], elsewhere.path());
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("complete") && script.contains("easel") && script.contains("--check-images"), "{script}");
}

/// Runs `easel doctor` on `yaml` (written to `dir/easel.yaml`) and returns its exit code and stdout.
async fn doctor(dir: &std::path::Path, yaml: String) -> (Option<i32>, String) {
    std::fs::write(dir.join("easel.yaml"), yaml).unwrap();
    let path = dir.to_path_buf();
    let out = tokio::task::spawn_blocking(move || easel(&["doctor"], &path)).await.unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_workflows_and_checkpoints_the_servers_have() {
    let comfy = crate::support::comfyui::start().await;
    let sd = crate::support::a1111::start().await;
    let invoke = crate::support::invokeai::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = doctor(
        dir.path(),
        format!(
            "backends:\n  comfy: {{kind: comfyui, url: \"{}\"}}\n  sd: {{kind: a1111, url: \"{}\"}}\n  invoke: {{kind: invokeai, url: \"{}\"}}\nmodels:\n  - {{id: free, backends: [comfy], workflow: {WORKFLOWS}/comfyui-model-free.json}}\n  - {{id: edit, backends: [comfy], workflow: {WORKFLOWS}/comfyui-edit.json}}\n  - {{id: sdxl, backends: [comfy], workflow: {WORKFLOWS}/comfyui-sdxl.json}}\n  - {{id: clip, type: video, backends: [comfy], workflow: {WORKFLOWS}/comfyui-video.json}}\n  - {{id: sd15, backends: [sd], upstream_model: \"{}\"}}\n  - {{id: loaded, backends: [sd], upstream_model: current}}\n  - {{id: ifree, backends: [invoke], workflow: {WORKFLOWS}/invokeai-model-free.json}}\n  - {{id: iedit, backends: [invoke], workflow: {WORKFLOWS}/invokeai-edit.json}}\n  - {{id: isd15, backends: [invoke], workflow: {WORKFLOWS}/invokeai-sd15.json}}\n",
            comfy.url,
            sd.url,
            invoke.url,
            crate::support::a1111::CHECKPOINT
        ),
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("  graphs: ok (checked against /openapi.json)"), "{text}");
    assert!(text.contains("  workflows: ok (checked against /object_info)"), "{text}");
    assert!(text.contains("  checkpoints: ok (checked against /sdapi/v1/sd-models)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_missing_node_classes_inputs_and_checkpoints() {
    let comfy = crate::support::comfyui::start().await;
    comfy.state.knobs.missing_classes.lock().unwrap().push("ImageCompositeMasked".into());
    let sd = crate::support::a1111::start().await;
    let dir = tempfile::tempdir().unwrap();
    let custom = dir.path().join("custom.json");
    std::fs::write(
        &custom,
        r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": {{ width }}, "height": {{ height }}, "batch_size": 1, "color": 0}},
  "7": {"class_type": "KSamplerAdvancedX", "inputs": {"image": ["1", 0]}},
  "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}}}"#,
    )
    .unwrap();
    let (code, text) = doctor(
        dir.path(),
        format!(
            "backends:\n  comfy: {{kind: comfyui, url: \"{}\"}}\n  sd: {{kind: a1111, url: \"{}\"}}\nmodels:\n  - {{id: free, backends: [comfy], workflow: {WORKFLOWS}/comfyui-model-free.json}}\n  - {{id: custom, backends: [comfy], workflow: custom.json}}\n  - {{id: edit, backends: [comfy], workflow: {WORKFLOWS}/comfyui-edit.json}}\n  - {{id: sd15, backends: [sd], upstream_model: \"{}\"}}\n  - {{id: gone, backends: [sd], upstream_model: flux-dev.safetensors}}\n",
            comfy.url,
            sd.url,
            crate::support::a1111::SDXL
        ),
    )
    .await;
    assert_eq!(code, Some(1), "{text}");
    assert!(custom.is_file());
    // The workflow path as the config resolves it (beside `easel.yaml`, which doctor found in the cwd).
    let custom = "custom.json";
    assert!(text.contains("  workflows: 3 mismatch(es) with /object_info:"), "{text}");
    assert!(
        text.contains(&format!("model `custom`: workflow {custom} node 7 uses `KSamplerAdvancedX`, which this ComfyUI does not have (a custom node that is not installed?)")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "model `custom`: workflow {custom} node 9 (`SaveImage`) does not set its required input `filename_prefix`"
        )),
        "{text}"
    );
    // Only the masked branch of the edit workflow composites: doctor renders that branch too.
    assert!(
        text.contains(&format!(
            "model `edit`: workflow {WORKFLOWS}/comfyui-edit.json node 4 uses `ImageCompositeMasked`, which this ComfyUI does not have"
        )),
        "{text}"
    );
    assert!(!text.contains("model `free`"), "the model-free workflow only uses classes the server has: {text}");
    assert!(
        text.contains("checkpoints: 1 mismatch(es) with /sdapi/v1/sd-models:")
            && text.contains("model `gone`: checkpoint `flux-dev.safetensors` (its `upstream_model`) is not among this server's 2 checkpoint(s): v1-5-pruned-emaonly.safetensors [6ce0161689]"),
        "{text}"
    );
    assert!(!text.contains("model `sd15`"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_invokeai_node_types_the_server_lacks() {
    let invoke = crate::support::invokeai::start().await;
    invoke.state.knobs.missing_types.lock().unwrap().push("img_chan".into());
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = doctor(
        dir.path(),
        format!(
            "backends:\n  invoke: {{kind: invokeai, url: \"{}\"}}\nmodels:\n  - {{id: ifree, backends: [invoke], workflow: {WORKFLOWS}/invokeai-model-free.json}}\n  - {{id: iedit, backends: [invoke], workflow: {WORKFLOWS}/invokeai-edit.json}}\n",
            invoke.url
        ),
    )
    .await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("  graphs: 1 mismatch(es) with /openapi.json:"), "{text}");
    assert!(
        text.contains(&format!("model `iedit`: graph {WORKFLOWS}/invokeai-edit.json node `alpha` has type `img_chan`, which this InvokeAI does not have")),
        "{text}"
    );
}

#[test]
fn keys_carry_their_own_limits_from_create_to_list_and_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("easel.yaml");
    std::fs::write(
        &path,
        "auth: {mode: keys}\nbackends:\n  sim: {kind: simulated}\nmodels:\n  - {id: sdxl, backends: [sim]}\n",
    )
    .unwrap();
    let c = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-c", c]);
        easel(&all, dir.path())
    };
    let out = run(&["keys", "create", "--name", "lim", "--rpm", "5", "--max-parallel", "unlimited"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run(&["keys", "create", "--name", "plain"]);
    let listed = String::from_utf8_lossy(&run(&["keys", "list"]).stdout).into_owned();
    let line =
        |name: &str, text: &str| text.lines().find(|l| l.contains(&format!(" {name} "))).unwrap_or("").to_owned();
    assert!(line("lim", &listed).ends_with("rpm 5  parallel unlimited"), "{listed}");
    assert!(line("plain", &listed).ends_with("rpm default  parallel default"), "{listed}");

    let out = run(&["keys", "limits", "lim", "--rpm", "default", "--max-parallel", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rpm default  parallel 2"));
    let listed = String::from_utf8_lossy(&run(&["keys", "list"]).stdout).into_owned();
    assert!(line("lim", &listed).ends_with("rpm default  parallel 2"), "only what was given changed: {listed}");

    for (args, needle) in [
        (vec!["keys", "limits", "lim", "--rpm", "0"], "not a limit"),
        (vec!["keys", "limits", "lim", "--max-parallel", "-3"], "-3"),
        (vec!["keys", "create", "--name", "x", "--rpm", "lots"], "not a limit"),
        (vec!["keys", "limits", "lim"], "give --rpm and/or --max-parallel"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["keys", "limits", "nobody", "--rpm", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API key named"));
    let listed = String::from_utf8_lossy(&run(&["keys", "list"]).stdout).into_owned();
    assert!(!listed.contains(" x "), "a refused create made no key: {listed}");
}
