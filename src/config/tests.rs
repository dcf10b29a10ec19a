//! Configuration loading: defaults, interpolation, overrides, and that every problem points at its place.

use std::path::Path;

use super::*;

fn load(text: &str, env: &MapEnv) -> Result<Config, ConfigError> {
    from_str(text, "easel.yaml", Path::new("."), env)
}

const MINIMAL: &str = "backends:\n  sim:\n    kind: simulated\nmodels:\n  - id: m\n    backends: [sim]\n";

#[test]
fn builtin_default_is_valid() {
    let cfg = super::load(None, &MapEnv::default()).unwrap();
    assert_eq!(cfg.models.len(), 1);
    assert_eq!(cfg.backends[0].kind, BackendKind::Simulated);
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn unknown_keys_are_rejected_with_line_column_and_path() {
    let text = "backends:\n  sim:\n    kind: simulated\n    latncy: 5ms\nmodels:\n  - id: m\n    backends: [sim]\n";
    let err = load(text, &MapEnv::default()).unwrap_err();
    let p = &err.problems[0];
    assert_eq!(p.at, "easel.yaml:4:5", "{p}");
    assert_eq!(p.path, "backends.sim.latncy");
    assert!(p.message.contains("unknown key `latncy` (did you mean `latency`?)"), "{p}");
}

#[test]
fn invalid_values_are_all_reported_with_positions() {
    let text = "server:\n  listen: nowhere\nbackends:\n  a:\n    kind: a1111\n    url: not a url\n    timeout: soon\nmodels:\n  - id: m\n    backends: [a, ghost]\n";
    let err = load(text, &MapEnv::default()).unwrap_err();
    let text_of = |path: &str| {
        err.problems.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no problem at {path}: {err}")).clone()
    };
    assert_eq!(text_of("server.listen").at, "easel.yaml:2:3");
    assert_eq!(text_of("backends.a.url").at, "easel.yaml:6:5");
    assert_eq!(text_of("backends.a.timeout").at, "easel.yaml:7:5");
    assert!(text_of("models[0].backends[1]").message.contains("no backend named `ghost`"));
}

#[test]
fn fields_of_other_kinds_are_mistakes() {
    let text = "backends:\n  a:\n    kind: openai\n    url: http://h\n    latency: 1s\nmodels:\n  - id: m\n    backends: [a]\n";
    let err = load(text, &MapEnv::default()).unwrap_err();
    assert_eq!(err.problems[0].path, "backends.a.latency");
    assert!(err.problems[0].message.contains("does not apply to kind `openai`"), "{err}");
}

#[test]
fn interpolation_replaces_and_reports_unset_variables() {
    let text = "backends:\n  a:\n    kind: openai\n    url: ${BASE}\n    api_key: ${KEY:-none}\nmodels:\n  - id: m\n    backends: [a]\n";
    let cfg = load(text, &MapEnv::new([("BASE", "http://h:1/v1")])).unwrap();
    assert_eq!(cfg.backends[0].url.as_ref().unwrap().as_str(), "http://h:1/", "a trailing /v1 is not doubled");
    assert_eq!(cfg.backends[0].api_key.as_ref().unwrap().expose(), "none");
    let err = load(text, &MapEnv::default()).unwrap_err();
    assert_eq!(err.problems[0].at, "easel.yaml:4:10");
    assert!(err.problems[0].message.contains("`BASE` is not set"));
}

#[test]
fn environment_overrides_win_and_are_named_in_errors() {
    let env =
        MapEnv::new([("EASEL_SERVER__LISTEN", "0.0.0.0:9999"), ("EASEL_BACKENDS__SIM__CONCURRENCY__IMAGES", "3")]);
    let cfg = load(MINIMAL, &env).unwrap();
    assert_eq!(cfg.server.listen.port(), 9999);
    assert_eq!(cfg.backends[0].limit(Capability::Images), 3);
    let env = MapEnv::new([("EASEL_BACKENDS__SIM__TIMEOUT", "whenever")]);
    let err = load(MINIMAL, &env).unwrap_err();
    assert_eq!(err.problems[0].at, "environment EASEL_BACKENDS__SIM__TIMEOUT");
}

#[test]
fn secrets_do_not_print() {
    let s = Secret::new("sk-live-123".into());
    assert!(!format!("{s:?}").contains("sk-live"));
}

#[test]
fn comments_are_not_interpolated() {
    let text = "# set ${NOTHING} here\nbackends:\n  sim: {kind: simulated}  # ${ALSO_NOTHING\nmodels:\n  - id: m\n    backends: [sim]\n";
    load(text, &MapEnv::default()).unwrap();
}

#[test]
fn webhook_settings_default_interpolate_and_are_checked() {
    let cfg = load(MINIMAL, &MapEnv::default()).unwrap();
    let w = &cfg.jobs.webhooks;
    assert!(w.secret.is_none() && !w.allow_private);
    assert_eq!((w.backoff, w.max_attempts, w.timeout), (Duration::from_secs(5), 8, Duration::from_secs(10)));

    let text = format!(
        "{MINIMAL}jobs:\n  webhooks:\n    secret: ${{HOOK_SECRET}}\n    allow_private: true\n    backoff: 50ms\n"
    );
    let env = MapEnv::new([("HOOK_SECRET", "0123456789abcdef0123456789abcdef")]);
    let cfg = load(&text, &env).unwrap();
    let w = &cfg.jobs.webhooks;
    assert_eq!(w.secret.as_ref().map(Secret::expose), Some("0123456789abcdef0123456789abcdef"));
    assert!(w.allow_private);
    assert_eq!(w.backoff, Duration::from_millis(50));

    let text = format!("{MINIMAL}jobs:\n  webhooks:\n    secret: short\n    backoff: soon\n    max_attempts: 0\n");
    let err = load(&text, &MapEnv::default()).unwrap_err();
    for path in ["jobs.webhooks.secret", "jobs.webhooks.backoff", "jobs.webhooks.max_attempts"] {
        assert!(err.problems.iter().any(|p| p.path == path), "no problem at {path}: {err}");
    }
}

fn with_process(backend: &str) -> String {
    format!("backends:\n  gpu:\n{backend}models:\n  - id: m\n    backends: [gpu]\n")
}

#[test]
fn a_process_block_gets_its_defaults_and_the_port_from_the_url() {
    let text = with_process(
        "    kind: a1111\n    url: http://127.0.0.1:8188\n    process:\n      cmd: [python, main.py, --port, \"8188\"]\n      cwd: /opt/ComfyUI\n      env: { CUDA_VISIBLE_DEVICES: \"0\" }\n",
    );
    let cfg = load(&text, &MapEnv::default()).unwrap();
    let p = cfg.backends[0].process.clone().unwrap();
    assert_eq!(p.cmd, ["python", "main.py", "--port", "8188"]);
    assert_eq!(p.cwd.as_deref(), Some(Path::new("/opt/ComfyUI")));
    assert_eq!(p.env["CUDA_VISIBLE_DEVICES"], "0");
    assert_eq!(p.port, 8188);
    assert_eq!(p.ready_timeout, Duration::from_secs(120));
    assert_eq!((p.stop_signal, p.stop_cmd.clone(), p.grace), (StopSignal::Term, None, Duration::from_secs(10)));
    assert_eq!((p.restart_max, p.restart_backoff), (3, Duration::from_secs(5)));
    assert!(load(MINIMAL, &MapEnv::default()).unwrap().backends[0].process.is_none());
}

#[test]
fn a_bad_process_block_names_every_problem() {
    let text = with_process(
        "    kind: openai\n    url: http://127.0.0.1/v1\n    process:\n      cmd: []\n      ready_timeout: soon\n      stop: { signal: KILLALL, cmd: [docker, stop, x] }\n",
    );
    let err = load(&text, &MapEnv::default()).unwrap_err();
    let msg = |path: &str| {
        err.problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {err}"))
            .message
            .clone()
    };
    assert!(msg("backends.gpu.process.cmd").contains("must list the program"), "{err}");
    assert!(msg("backends.gpu.process").contains("must name the port"), "{err}");
    assert!(msg("backends.gpu.process.ready_timeout").contains("not a duration"), "{err}");
    assert!(msg("backends.gpu.process.stop.signal").contains("TERM, INT, HUP, QUIT"), "{err}");
    assert!(msg("backends.gpu.process.stop").contains("not both"), "{err}");

    let missing = with_process("    kind: simulated\n    process: { cwd: /tmp }\n");
    let err = load(&missing, &MapEnv::default()).unwrap_err();
    assert!(err.to_string().contains("has no local server"), "{err}");
    let no_cmd = with_process("    kind: a1111\n    url: http://127.0.0.1:7860\n    process: { cwd: /tmp }\n");
    let err = load(&no_cmd, &MapEnv::default()).unwrap_err();
    assert!(err.to_string().contains("`cmd` is required"), "{err}");
}

#[test]
fn two_managed_backends_cannot_share_a_port() {
    let text = "backends:\n  a:\n    kind: a1111\n    url: http://127.0.0.1:7860\n    process: { cmd: [a] }\n  b:\n    kind: a1111\n    url: http://localhost:7860\n    process: { cmd: [b] }\nmodels:\n  - id: m\n    backends: [a, b]\n";
    let err = load(text, &MapEnv::default()).unwrap_err();
    assert!(err.to_string().contains("both run a process on port 7860"), "{err}");
}

const SETS: &str = "\
hosts:
  gpu0: { default_set: creative }
  gpu1: { mode: manual, patience: 5s }
backends:
  comfy: { kind: openai, url: 'http://127.0.0.1:18188/v1', process: { cmd: [comfy] } }
  llm: { kind: openai, url: 'http://127.0.0.1:18083/v1', process: { cmd: [llm] } }
  coder: { kind: openai, url: 'http://127.0.0.1:18084/v1', process: { cmd: [coder] } }
  ext: { kind: simulated }
working_sets:
  creative: { host: gpu0, backends: [comfy, llm] }
  coding: { host: gpu0, backends: [coder, comfy] }
models:
  - { id: sdxl, backends: [comfy], working_set: creative }
  - { id: sim, backends: [ext] }
";

#[test]
fn hosts_and_working_sets_load_with_defaults() {
    let cfg = load(SETS, &MapEnv::default()).unwrap();
    let gpu0 = &cfg.hosts[0];
    assert_eq!((gpu0.name.as_str(), gpu0.mode), ("gpu0", HostMode::Auto));
    assert_eq!(gpu0.default_set.as_deref(), Some("creative"));
    assert_eq!(gpu0.patience, Duration::from_secs(60));
    assert_eq!(gpu0.max_wait, Duration::from_secs(300));
    assert_eq!(gpu0.queue_depth, 32);
    assert_eq!(gpu0.drain_timeout, Duration::from_secs(1800));
    assert_eq!(gpu0.idle_ttl, Duration::ZERO);
    assert_eq!(gpu0.failure_cooldown, Duration::from_secs(15));
    assert_eq!(cfg.hosts[1].mode, HostMode::Manual);
    assert_eq!(cfg.hosts[1].patience, Duration::from_secs(5));
    let coding = &cfg.working_sets[0];
    assert_eq!(coding.name, "coding");
    assert_eq!(coding.backends, ["coder", "comfy"]);
}

#[test]
fn working_set_mistakes_are_reported_where_they_are() {
    let bad = SETS
        .replace("gpu0: { default_set: creative }", "gpu0: { default_set: painting, mode: sometimes }")
        .replace(
            "coding: { host: gpu0, backends: [coder, comfy] }",
            "coding: { host: gpu1, backends: [coder, comfy, ghost, ext] }",
        )
        .replace(
            "working_set: creative }",
            "working_set: nope }\n  - { id: llm, type: text, backends: [llm, coder], working_set: creative }",
        );
    let err = load(&bad, &MapEnv::default()).unwrap_err();
    let text = err.to_string();
    for needle in [
        "working set `painting` is not defined",
        "`sometimes` is not one of: auto, manual",
        "backend `ghost` is not defined",
        "backend `ext` has no `process:` block",
        "belongs to sets of one host only",
        "working set `nope` is not defined",
        "uses managed backend `coder`, which is not in its working set `creative`",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    let host = err.problems.iter().find(|p| p.path == "working_sets.creative.host");
    assert!(host.is_none(), "{text}");
    let unknown = SETS.replace("host: gpu0, backends: [comfy, llm]", "host: gpu9, backends: [comfy, llm]");
    let err = load(&unknown, &MapEnv::default()).unwrap_err();
    let p = err.problems.iter().find(|p| p.path == "working_sets.creative.host").unwrap();
    assert!(p.message.contains("host `gpu9` is not declared under `hosts:` (declared: gpu0, gpu1)"), "{p}");
    assert!(p.at.starts_with("easel.yaml:"), "{p}");
}

#[test]
fn one_check_lists_every_unknown_key_and_type_error_in_words() {
    let yaml = "server:\n  lisen: 1\nbackends:\n  sim:\n    kind: simulated\n    concurency: {images: 1}\n    timeout: [1]\nmodels:\n  - id: m\n    backends: [sim]\n    max_n: many\n";
    let e = from_str(yaml, "easel.yaml", Path::new("."), &MapEnv::new([])).unwrap_err();
    let got: Vec<(String, String, String)> =
        e.problems.iter().map(|p| (p.at.clone(), p.path.clone(), p.message.clone())).collect();
    assert_eq!(got.len(), 4, "{e}");
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), ("easel.yaml:2:3", "server.lisen"));
    assert!(got[0].2.starts_with("unknown key `lisen` (did you mean `listen`?)"), "{e}");
    assert_eq!((got[1].0.as_str(), got[1].1.as_str()), ("easel.yaml:6:5", "backends.sim.concurency"));
    assert_eq!((got[2].1.as_str(), got[2].2.as_str()), ("backends.sim.timeout", "expected text, got a list"));
    assert_eq!((got[3].0.as_str(), got[3].1.as_str()), ("easel.yaml:11:5", "models[0].max_n"));
    assert_eq!(got[3].2, "expected a whole number, got the text \"many\"");
}

#[test]
fn a_pre_parsed_endpoint_is_the_same_url_as_parsing_its_string() {
    let roots = [
        "http://127.0.0.1:8188",
        "http://127.0.0.1:8188/",
        "https://api.example.com/v1",
        "https://Bücher.example/prefix/",
        "http://[::1]:9000/a/b",
        "http://h/root?key=1",
    ];
    let paths = [
        "",
        "/",
        "/prompt",
        "/history/3f2a-1",
        "/sdapi/v1/progress?skip_current_image=true",
        "/api/v1/images/upload?image_category=user&is_intermediate=true",
        "/a b/ü?q=x y&z=ä",
        "/x/../y/./z",
        "/ws/socket.io/?EIO=4&transport=websocket",
        "/?",
        "relative",
        "/frag#part",
    ];
    let mut built = 0;
    for root in roots {
        let text = format!(
            "backends:\n  b:\n    kind: openai\n    url: {root}\nmodels:\n  - id: m\n    backends: [b]\n    upstream_model: x\n"
        );
        let cfg = load(&text, &MapEnv::default()).unwrap();
        let b = &cfg.backends[0];
        for path in paths {
            match b.endpoint_url(path) {
                Some(u) => {
                    built += 1;
                    let parsed = Url::parse(&b.endpoint(path)).unwrap();
                    assert_eq!(u.as_str(), parsed.as_str(), "root {root} path {path}");
                }
                // The fallback is for roots or paths the fast form does not cover.
                None => assert!(
                    root.contains('?') || path.contains('#') || path == "relative",
                    "no fast form for root {root} path {path}"
                ),
            }
        }
    }
    assert_eq!(built, 5 * 10);
}
