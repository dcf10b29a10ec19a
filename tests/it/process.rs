//! Managed backend processes (`process:`): a real fake server (tests/fake_backend.py) spawned, probed, restarted,
//! stopped with its whole group, reported on `/v1/admin/processes`, and cleaned up after a SIGKILL of easel.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TEST_TIMEOUT, spawn_gateway_env, start_binary};

const ADMIN: &str = "admin-secret";

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn script() -> String {
    format!("{}/tests/fake_backend.py", env!("CARGO_MANIFEST_DIR"))
}

/// A config with one managed `openai` backend `fake` on `port` running the fake server with `flags`.
fn config(port: u16, flags: &[&str], process_extra: &str) -> String {
    let mut cmd = vec!["python3".to_owned(), script(), "--port".into(), port.to_string()];
    cmd.extend(flags.iter().map(|f| (*f).to_owned()));
    let cmd = serde_json::to_string(&cmd).unwrap();
    format!(
        "backends:\n  fake:\n    kind: openai\n    url: http://127.0.0.1:{port}/v1\n    timeout: 5s\n    process:\n      cmd: {cmd}\n      ready_timeout: 20s\n{process_extra}models:\n  - id: m\n    backends: [fake]\n    upstream_model: fake-model\n"
    )
}

/// Whether `pid` runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn processes(client: &reqwest::Client, base: &str, query: &str) -> Value {
    let resp = client.get(format!("{base}/v1/admin/processes{query}")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Polls the admin listing until `done` holds for backend `fake`, or fails after the test timeout.
async fn wait_for(client: &reqwest::Client, base: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let list = processes(client, base, "?lines=500").await;
        let fake = list["data"][0].clone();
        if done(&fake) {
            return fake;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {fake}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `pid` no longer runs, or fails after the test timeout.
async fn wait_gone(pid: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "{what} (pid {pid}) is still running");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn read_pid_file(path: &std::path::Path) -> u32 {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s.trim().parse().unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "no pid file {}", path.display());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_backend_starts_becomes_ready_serves_and_shows_its_output() {
    let port = free_port();
    let gw = spawn_gateway_env(
        &config(port, &["--start-delay", "0.5", "--lines", "30"], ""),
        &[("EASEL_ADMIN_TOKEN", ADMIN)],
    )
    .await;
    let fake = wait_for(&gw.client, &gw.url, "ready", |f| f["state"] == "ready").await;
    assert_eq!(fake["backend"], "fake");
    assert_eq!(fake["port"], port);
    assert_eq!(fake["restarts"], 0);
    let pid = fake["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    assert_eq!(fake["pgid"], pid, "the child leads its own process group");

    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    assert_eq!(s, 200, "{body}");

    let lines = processes(&gw.client, &gw.url, "?lines=500").await["data"][0]["lines"].clone();
    let lines: Vec<&str> = lines.as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for want in ["fake line 0", "fake line 29", "fake stderr line", "fake backend ready"] {
        assert!(lines.contains(&want), "`{want}` missing from {lines:?}");
    }
    let two = processes(&gw.client, &gw.url, "?lines=2").await;
    assert_eq!(two["data"][0]["lines"].as_array().unwrap().len(), 2, "{two}");

    let bad = gw.client.get(gw.endpoint("/v1/admin/processes?lines=lots")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["error"]["param"], "lines", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("from 0 to 500"), "{err}");
    let anonymous = gw.client.get(gw.endpoint("/v1/admin/processes")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    drop(gw);
    wait_gone(pid, "the managed backend after shutdown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_backend_is_restarted_with_backoff_then_marked_failed() {
    let port = free_port();
    let restart = "      restart: { max: 2, backoff: 100ms }\n";
    let gw =
        spawn_gateway_env(&config(port, &["--crash-after", "0.4"], restart), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let fake = wait_for(&gw.client, &gw.url, "failed", |f| f["state"] == "failed").await;
    assert_eq!(fake["restarts"], 2, "{fake}");
    assert_eq!(fake["last_exit"], "exited with status 3", "{fake}");
    let error = fake["error"].as_str().unwrap();
    assert!(error.contains("gave up after 2 restarts"), "{error}");
    let starts =
        fake["lines"].as_array().unwrap().iter().filter(|l| l.as_str().unwrap().starts_with("[easel] started")).count();
    assert_eq!(starts, 3, "the first start and two restarts: {fake}");
    assert!(fake["pid"].is_null(), "{fake}");
    // Requests no longer go to the failed backend.
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    assert_eq!(s, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ignoring_sigterm_is_killed_after_grace_with_its_grandchild() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let flags = ["--ignore-sigterm", "--grandchild", pid_file.to_str().unwrap()];
    let stop = "      stop: { signal: TERM, grace: 300ms }\n";
    let gw = spawn_gateway_env(&config(port, &flags, stop), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let fake = wait_for(&gw.client, &gw.url, "ready", |f| f["state"] == "ready").await;
    let pid = fake["pid"].as_u64().unwrap() as u32;
    let grandchild = read_pid_file(&pid_file).await;
    assert!(alive(pid) && alive(grandchild));
    let files_dir = gw.dir.path().to_path_buf();
    let state: Value = serde_json::from_slice(&std::fs::read(files_dir.join("processes.json")).unwrap()).unwrap();
    assert_eq!(state["fake"]["pid"], pid, "{state}");

    drop(gw);
    wait_gone(pid, "the process ignoring SIGTERM").await;
    wait_gone(grandchild, "the grandchild in its group").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_another_process_is_reported_with_its_pid() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let gw = spawn_gateway_env(&config(port, &[], ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let fake = wait_for(&gw.client, &gw.url, "failed", |f| f["state"] == "failed").await;
    let error = fake["error"].as_str().unwrap();
    let want = format!("port {port} is held by pid {} (", std::process::id());
    assert!(error.contains(&want), "{error}");
    assert!(!fake["lines"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().starts_with("[easel] started")));
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_of_easel_the_next_start_kills_the_leftover_group() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let flags = ["--grandchild", pid_file.to_str().unwrap()];
    std::fs::write(dir.path().join("easel.yaml"), config(port, &flags, "")).unwrap();
    let env = [("EASEL_ADMIN_TOKEN", ADMIN)];
    let client = reqwest::Client::new();

    let (mut easel, url) = start_binary(dir.path(), &env);
    let first = wait_for(&client, &url, "ready", |f| f["state"] == "ready").await;
    let old = first["pid"].as_u64().unwrap() as u32;
    let old_grandchild = read_pid_file(&pid_file).await;
    let state: Value = serde_json::from_slice(&std::fs::read(dir.path().join("data/processes.json")).unwrap()).unwrap();
    assert_eq!((state["fake"]["pid"].as_u64(), state["fake"]["pgid"].as_u64()), (Some(old.into()), Some(old.into())));
    easel.kill().unwrap();
    easel.wait().unwrap();
    assert!(alive(old) && alive(old_grandchild), "SIGKILL leaves the group running");
    std::fs::remove_file(&pid_file).unwrap();

    let (mut easel, url) = start_binary(dir.path(), &env);
    let second = wait_for(&client, &url, "ready again", |f| f["state"] == "ready").await;
    let new = second["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old);
    assert!(!alive(old), "the leftover leader was killed");
    assert!(!alive(old_grandchild), "the leftover grandchild was killed");
    assert!(alive(new));
    let new_grandchild = read_pid_file(&pid_file).await;

    // A clean stop (SIGTERM to easel) takes the whole group down.
    std::process::Command::new("kill").args(["-TERM", &easel.id().to_string()]).status().unwrap();
    easel.wait().unwrap();
    assert!(!alive(new) && !alive(new_grandchild), "easel stopped its group on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_not_ready_in_time_is_killed_and_marked_failed() {
    let port = free_port();
    let yaml = config(port, &["--start-delay", "60"], "").replace("ready_timeout: 20s", "ready_timeout: 1s");
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let starting = wait_for(&gw.client, &gw.url, "starting", |f| f["pid"].is_u64()).await;
    let pid = starting["pid"].as_u64().unwrap() as u32;
    let fake = wait_for(&gw.client, &gw.url, "failed", |f| f["state"] == "failed").await;
    let error = fake["error"].as_str().unwrap();
    assert!(error.contains("was not ready 1s after starting"), "{error}");
    assert_eq!(fake["restarts"], 0, "a start that never became ready is not retried: {fake}");
    wait_gone(pid, "the process that never became ready").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_restart_replaces_the_whole_group_and_waits_for_readiness() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let flags = ["--ignore-sigterm", "--grandchild", pid_file.to_str().unwrap(), "--start-delay", "0.3"];
    let stop = "      stop: { signal: TERM, grace: 300ms }\n";
    let gw = spawn_gateway_env(&config(port, &flags, stop), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let fake = wait_for(&gw.client, &gw.url, "ready", |f| f["state"] == "ready").await;
    let pid = fake["pid"].as_u64().unwrap() as u32;
    let grandchild = read_pid_file(&pid_file).await;

    let restart =
        |name: &str| gw.client.post(gw.endpoint(&format!("/v1/admin/backends/{name}/restart"))).bearer_auth(ADMIN);
    let resp = restart("nope").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = restart("fake").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "ready", "{body}");
    // Answered once ready: the new process serves at once; the old group (grandchild included) is gone.
    assert!(!alive(pid) && !alive(grandchild), "the old group survived the restart");
    let listed = processes(&gw.client, &gw.url, "").await["data"][0].clone();
    assert_eq!(listed["state"], "ready", "{listed}");
    let new_pid = listed["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, pid);
    let (s, _, body) = gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"})).await;
    assert_eq!(s, 200, "{body}");
    let new_grandchild = read_pid_file(&pid_file).await;

    drop(gw);
    wait_gone(new_pid, "the restarted backend after shutdown").await;
    wait_gone(new_grandchild, "the restarted backend's grandchild").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_leaves_a_managed_backend_alone_keeps_its_process_and_one_that_changes_it_is_refused() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("easel.yaml");
    std::fs::write(&file, config(port, &[], "")).unwrap();
    let (mut easel, url) = start_binary(dir.path(), &[("EASEL_ADMIN_TOKEN", ADMIN)]);
    let client = reqwest::Client::new();
    let pid = wait_for(&client, &url, "ready", |f| f["state"] == "ready").await["pid"].as_u64().unwrap();
    let reload = || async {
        let resp = client.post(format!("{url}/v1/admin/reload")).bearer_auth(ADMIN).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };

    // Another model on the same backend: the process is not touched.
    let more = format!("{}  - id: m2\n    backends: [fake]\n    upstream_model: fake-model\n", config(port, &[], ""));
    std::fs::write(&file, more).unwrap();
    let (code, report) = reload().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["report"]["unchanged_backends"], json!(["fake"]), "{report}");
    let after = processes(&client, &url, "").await["data"][0].clone();
    assert_eq!((after["pid"].as_u64(), after["state"].as_str()), (Some(pid), Some("ready")), "{after}");
    assert!(alive(pid as u32));
    let resp = client
        .post(format!("{url}/v1/images/generations"))
        .json(&json!({"model": "m2", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the new model serves through the same process");

    // Changing the process itself needs a restart: refused, and the process keeps running.
    std::fs::write(&file, config(port, &["--crash-after", "99"], "")).unwrap();
    let (code, e) = reload().await;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("managed backend `fake`"), "{e}");
    assert_eq!(processes(&client, &url, "").await["data"][0]["pid"].as_u64(), Some(pid));
    easel.kill().unwrap();
    easel.wait().unwrap();
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_arrive_during_a_restart_are_held_until_the_backend_is_back() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway_env(&config(port, &["--start-delay", "1"], ""), &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let first = wait_for(&gw.client, &gw.url, "ready", |f| f["state"] == "ready").await;
    let restart = gw.client.post(gw.endpoint("/v1/admin/backends/fake/restart")).bearer_auth(ADMIN).send();
    let restart = tokio::spawn(restart);
    // While the old process stops and the new one loads (1 s before its port opens), requests keep coming.
    wait_for(&gw.client, &gw.url, "the restart to begin", |f| f["pid"] != first["pid"] || f["state"] != "ready").await;
    let during = futures_util::future::join_all(
        (0..3).map(|_| gw.post_json("/v1/images/generations", json!({"model": "m", "prompt": "a cat"}))),
    )
    .await;
    for (s, _, body) in &during {
        assert_eq!(*s, 200, "held until the backend was back: {body}");
    }
    let resp = restart.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let now = processes(&gw.client, &gw.url, "").await["data"][0].clone();
    assert_ne!(now["pid"], first["pid"], "{now}");
    let _ = dir;
}
