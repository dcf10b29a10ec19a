//! Working sets on a host, with real child processes (tests/fake_backend.py): a cold set starts once for many
//! requests, a swap waits for running work and keeps shared members, manual mode refuses with 409, a set that
//! dies while loading fails with a cooldown, alternating demand is collated by patience, a drain that outlasts
//! `drain_timeout` aborts the swap, a crash degrades then fails the set, a new set starts only after the old one
//! let go of the GPU, and no process (not even a setsid grandchild) outlives the gateway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway_env};

const ADMIN: &str = "admin-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A managed fake backend: name, port, extra flags, record file.
struct Fake {
    name: &'static str,
    port: u16,
    flags: Vec<&'static str>,
    record: PathBuf,
    process_extra: &'static str,
    /// Image slots (the rest wait in admission).
    images: u32,
}

impl Fake {
    fn new(dir: &Path, name: &'static str, flags: &[&'static str]) -> Self {
        Self { name, port: free_port(), flags: flags.to_vec(), record: dir.join(name), process_extra: "", images: 4 }
    }

    fn yaml(&self) -> String {
        let script = format!("{}/tests/fake_backend.py", env!("CARGO_MANIFEST_DIR"));
        let mut cmd = vec!["python3".to_owned(), script, "--port".into(), self.port.to_string()];
        cmd.extend(["--record".to_owned(), self.record.display().to_string()]);
        cmd.extend(self.flags.iter().map(|f| (*f).to_owned()));
        let cmd = serde_json::to_string(&cmd).unwrap();
        format!(
            "  {}:\n    kind: openai\n    url: http://127.0.0.1:{}/v1\n    timeout: 20s\n    concurrency: {{ images: {}, text: 4 }}\n    process: {{ cmd: {cmd}, ready_timeout: 20s, stop: {{ grace: 2s }}{} }}\n",
            self.name, self.port, self.images, self.process_extra
        )
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn starts(&self) -> usize {
        self.lines().iter().filter(|l| l.starts_with("start ")).count()
    }

    fn pids(&self) -> Vec<u32> {
        self.lines().iter().filter_map(|l| l.strip_prefix("start ")).map(|p| p.parse().unwrap()).collect()
    }
}

/// `hosts:` + backends + sets + one model per `(model, backend, set)`.
fn config(host: &str, fakes: &[&Fake], sets: &str, models: &[(&str, &str, &str)]) -> String {
    let mut y = format!("hosts:\n  gpu0: {host}\nbackends:\n");
    for f in fakes {
        y.push_str(&f.yaml());
    }
    y.push_str("working_sets:\n");
    y.push_str(sets);
    y.push_str("models:\n");
    for (id, backend, set) in models {
        y.push_str(&format!(
            "  - {{ id: {id}, backends: [{backend}], upstream_model: fake-model, working_set: {set} }}\n"
        ));
    }
    y
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Shuts the gateway down and checks that no fake it ever started still runs.
async fn shutdown_without_orphans(gw: Gateway, fakes: &[&Fake]) {
    drop(gw);
    for f in fakes {
        for pid in f.pids() {
            wait_until(&format!("{} (pid {pid}) to exit", f.name), || !alive(pid)).await;
        }
    }
}

async fn hosts(gw: &Gateway) -> Value {
    let resp = gw.client.get(gw.endpoint("/v1/admin/hosts")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn gen_image(gw: &Gateway, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    gw.post_json("/v1/images/generations", json!({"model": model, "prompt": "a cat"})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_set_starts_once_for_twenty_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--start-delay", "0.5"]);
    let cfg = config("{}", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let models: Value = gw.client.get(gw.endpoint("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["meta"]["status"], "inactive", "{models}");
    assert_eq!(models["data"][0]["meta"]["host"], "gpu0", "{models}");
    assert_eq!(a.starts(), 0, "nothing starts before it is needed");

    let all = futures_util::future::join_all((0..20).map(|_| gen_image(&gw, "ma"))).await;
    for (s, _, body) in &all {
        assert_eq!(*s, 200, "{body}");
    }
    assert_eq!(a.starts(), 1, "{:?}", a.lines());
    let h = hosts(&gw).await;
    assert_eq!(h["data"][0]["state"], "active", "{h}");
    assert_eq!(h["data"][0]["active_set"], "one", "{h}");
    let models: Value = gw.client.get(gw.endpoint("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["meta"]["status"], "ready", "{models}");
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_waits_for_the_running_job_and_keeps_the_shared_member() {
    let dir = tempfile::tempdir().unwrap();
    let shared = Fake::new(dir.path(), "shared", &[]);
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "1.5"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [shared, fa] }\n  later: { host: gpu0, backends: [shared, fb] }\n";
    let models = [("ma", "fa", "one"), ("mb", "fb", "later"), ("ms", "shared", "one")];
    let cfg = config("{ default_set: one, patience: 0s }", &[&shared, &a, &b], sets, &models);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1 && shared.starts() == 1).await;
    let (s, _, body) = gen_image(&gw, "ms").await;
    assert_eq!(s, 200, "{body}");
    let shared_pid = shared.pids()[0];

    // A long job on the leaving member, then a request for the other set.
    let slow = tokio::spawn({
        let (client, url) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
        async move { client.post(url).json(&json!({"model": "ma", "prompt": "slow"})).send().await.unwrap().status() }
    });
    wait_until("the slow job to begin", || a.lines().iter().any(|l| l == "gen begin")).await;
    let (s, _, body) = gen_image(&gw, "mb").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(slow.await.unwrap(), 200, "the running job was not killed by the swap");
    let lines = a.lines();
    let done = lines.iter().position(|l| l == "gen done").unwrap();
    let exit = lines.iter().position(|l| l == "exit").unwrap_or(usize::MAX);
    assert!(done < exit, "fa stopped before its job finished: {lines:?}");
    // The shared member kept its process.
    assert_eq!(shared.starts(), 1, "{:?}", shared.lines());
    assert!(alive(shared_pid));
    let (s, _, body) = gen_image(&gw, "ms").await;
    assert_eq!(s, 200, "{body}");
    let h = hosts(&gw).await;
    assert_eq!(h["data"][0]["active_set"], "later", "{h}");
    // Metrics are one registry for every gateway in this test binary: the set name is this test's own.
    let metrics = gw.client.get(gw.endpoint("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("easel_working_set_active{host=\"gpu0\",set=\"later\"} 1"), "{metrics}");
    shutdown_without_orphans(gw, &[&shared, &a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_answers_409_until_the_admin_activates_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &[]);
    let cfg = config("{ mode: manual }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (s, headers, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "working_set_inactive", "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("POST /v1/admin/working-sets/one/activate") && msg.contains("mode manual"), "{msg}");
    assert_eq!(a.starts(), 0);

    let url = gw.endpoint("/v1/admin/working-sets/one/activate?wait=true");
    let resp = gw.client.post(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let again = gw.client.post(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(again.status(), 200, "activating the active set is idempotent");
    let missing = gw.endpoint("/v1/admin/working-sets/nope/activate");
    let resp = gw.client.post(missing).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(a.starts(), 1);
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_dies_while_loading_fails_with_a_cooldown_and_no_respawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Fake::new(dir.path(), "fa", &["--fail-start"]);
    a.process_extra = ", restart: { max: 0 }";
    let cfg =
        config("{ failure_cooldown: 20s }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (s, headers, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "working_set_failed", "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((15..=20).contains(&retry), "Retry-After {retry}");
    // During the cooldown: answered at once, nothing is spawned again.
    let (s, headers, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(a.starts(), 1, "{:?}", a.lines());
    let models: Value = gw.client.get(gw.endpoint("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["meta"]["status"], "unavailable", "{models}");
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_answers_202_then_409_for_another_set_while_the_swap_runs() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--start-delay", "1"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg = config("{ mode: manual }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let activate =
        |set: &str| gw.client.post(gw.endpoint(&format!("/v1/admin/working-sets/{set}/activate"))).bearer_auth(ADMIN);
    let resp = activate("one").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    wait_until("fa to be spawned", || a.starts() == 1).await;
    let resp = activate("two").send().await.unwrap();
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("already switching to working set `one`"), "{body}");
    let anonymous = gw.client.post(gw.endpoint("/v1/admin/working-sets/one/activate")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    // The target set's own requests wait for it in manual mode too.
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(b.starts(), 0);
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ttl_stops_an_unused_set_and_the_next_request_starts_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &[]);
    let cfg = config("{ idle_ttl: 1s }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(a.starts(), 1, "{:?}", a.lines());
    let first = a.pids()[0];
    // With no work for a second, the host goes idle and the process exits.
    wait_until("the idle set's process to exit", || !alive(first)).await;
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let h = hosts(&gw).await;
        if h["data"][0]["state"] == "idle" {
            assert!(h["data"][0]["active_set"].is_null(), "{h}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "host never went idle: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(a.starts(), 2, "a request after idling starts the set again: {:?}", a.lines());
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_drains_the_running_job_then_stops_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "1.0"]);
    let cfg = config("{}", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let unload =
        |host: &str| gw.client.post(gw.endpoint(&format!("/v1/admin/hosts/{host}/unload"))).bearer_auth(ADMIN).send();
    let job = gen_image(&gw, "ma");
    let admin = async {
        wait_until("the job to start", || a.lines().iter().any(|l| l.starts_with("gen"))).await;
        let resp = unload("gpu0").await.unwrap();
        assert_eq!(resp.status(), 202);
        let unknown = unload("nope").await.unwrap();
        assert_eq!(unknown.status(), 404);
        let v: Value = unknown.json().await.unwrap();
        assert_eq!(v["error"]["code"], "host_not_found", "{v}");
    };
    let ((s, _, body), ()) = tokio::join!(job, admin);
    assert_eq!(s, 200, "the running job finishes before the set stops: {body}");
    let first = a.pids()[0];
    wait_until("the unloaded set's process to exit", || !alive(first)).await;
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while hosts(&gw).await["data"][0]["state"] != "idle" {
        assert!(tokio::time::Instant::now() < deadline, "host never went idle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = gw.client.post(gw.endpoint("/v1/admin/hosts/gpu0/unload")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "unload needs the admin key");
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_activation_interrupts_the_running_job_instead_of_draining() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "30"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg = config("{ default_set: one }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let slow = tokio::spawn({
        let (client, url) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
        async move { client.post(url).json(&json!({"model": "ma", "prompt": "slow"})).send().await.unwrap().status() }
    });
    wait_until("the slow job to begin", || a.lines().iter().any(|l| l == "gen begin")).await;
    let url = gw.endpoint("/v1/admin/working-sets/two/activate?wait=true");
    let bad = gw.client.post(&url).bearer_auth(ADMIN).body("{\"forse\": true}").send().await.unwrap();
    assert_eq!(bad.status(), 400, "an unknown body key is refused");
    let began = std::time::Instant::now();
    let resp = gw.client.post(&url).bearer_auth(ADMIN).body("{\"force\": true}").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["force"], true, "{body}");
    assert!(began.elapsed() < Duration::from_secs(15), "the swap waited for the job: {:?}", began.elapsed());
    let status = slow.await.unwrap();
    assert!(status.is_server_error(), "the interrupted job fails: {status}");
    let lines = a.lines();
    assert!(lines.iter().any(|l| l == "exit") && !lines.iter().any(|l| l == "gen done"), "{lines:?}");
    assert_eq!(hosts(&gw).await["data"][0]["active_set"], "two");
    let (s, _, body) = gen_image(&gw, "mb").await;
    assert_eq!(s, 200, "{body}");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

/// A forced swap away from `one` while a job runs on `fa` (one slot) and a second waits for that slot.
async fn force_with_a_queued_request(mode: &str) -> (Gateway, Fake, Fake, tokio::task::JoinHandle<(u16, Value)>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut a = Fake::new(&dir, "fa", &["--gen-secs", "8"]);
    a.images = 1;
    let b = Fake::new(&dir, "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let host = format!("{{ default_set: one, mode: {mode}, patience: 1s }}");
    let cfg = config(&host, &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let post = |prompt: &'static str| {
        let (client, url) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
        tokio::spawn(async move {
            let resp = client.post(url).json(&json!({"model": "ma", "prompt": prompt})).send().await.unwrap();
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let mut body: Value = resp.json().await.unwrap();
            body["retry_after"] = json!(retry);
            (status, body)
        })
    };
    let running = post("running");
    wait_until("the running job to begin", || a.lines().iter().any(|l| l == "gen begin")).await;
    let queued = post("queued");
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while !metrics(&gw).await.lines().any(|l| l.starts_with("easel_admission_queue_depth") && l.ends_with(" 1")) {
        assert!(tokio::time::Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = gw.endpoint("/v1/admin/working-sets/two/activate?wait=true");
    let resp = gw.client.post(&url).bearer_auth(ADMIN).body("{\"force\": true}").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = running.await.unwrap();
    assert_eq!(status, 503, "interrupted running work: {body}");
    assert_eq!(body["error"]["code"], "working_set_switching", "{body}");
    let after: u64 = body["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{body}");
    (gw, a, b, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_swap_sends_queued_work_back_to_wait_for_its_set_in_auto_mode() {
    let (gw, a, b, queued) = force_with_a_queued_request("auto").await;
    // The queued request is demand for `one` again: a later swap brings `fa` back and it runs there.
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.starts(), 2, "{:?}", a.lines());
    assert_eq!(a.lines().iter().filter(|l| *l == "gen begin").count(), 2, "{:?}", a.lines());
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_swap_refuses_queued_work_with_409_in_manual_mode() {
    let (gw, a, b, queued) = force_with_a_queued_request("manual").await;
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "working_set_inactive", "{body}");
    assert_eq!(a.lines().iter().filter(|l| *l == "gen begin").count(), 1, "it never reached the backend");
    assert_eq!(hosts(&gw).await["data"][0]["active_set"], "two");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_refuses_a_busy_or_unmanaged_backend_and_force_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "4"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg = config("{ default_set: one }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let restart = |name: &str, query: &str| {
        gw.client.post(gw.endpoint(&format!("/v1/admin/backends/{name}/restart{query}"))).bearer_auth(ADMIN).send()
    };
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_owned();
    let resp = restart("nope", "").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(code(&resp.json().await.unwrap()), "backend_not_found");
    let resp = restart("fb", "").await.unwrap();
    assert_eq!(resp.status(), 409, "a member of an inactive set is not started by a restart");
    assert_eq!(code(&resp.json().await.unwrap()), "backend_not_running");
    assert_eq!(b.starts(), 0);

    let slow = tokio::spawn({
        let (client, url) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
        async move { client.post(url).json(&json!({"model": "ma", "prompt": "slow"})).send().await.unwrap().status() }
    });
    wait_until("the slow job to begin", || a.lines().iter().any(|l| l == "gen begin")).await;
    let resp = restart("fa", "").await.unwrap();
    assert_eq!(resp.status(), 409);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(code(&v), "backend_in_use", "{v}");
    assert_eq!(a.starts(), 1);

    let first = a.pids()[0];
    let resp = restart("fa", "?force=true").await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["state"], "ready", "{v}");
    assert!(slow.await.unwrap().is_server_error(), "the cut-off request fails");
    assert_eq!(a.starts(), 2, "{:?}", a.lines());
    assert!(!alive(first), "the old process is gone");
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    let anonymous = gw.client.post(gw.endpoint("/v1/admin/backends/fa/restart")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

/// A streamed chat request's status, content type and whole body.
async fn stream_chat(gw: &Gateway, model: &str) -> (u16, String, String) {
    let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut resp = gw.client.post(gw.endpoint("/v1/chat/completions")).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (status, ct, text)
}

fn text_model(cfg: &str, id: &str, backend: &str, set: &str) -> String {
    format!(
        "{cfg}  - {{ id: {id}, type: text, backends: [{backend}], upstream_model: fake-model, working_set: {set} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_waiting_for_its_set_gets_keepalives_then_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--start-delay", "1.5"]);
    let cfg = config("{ keepalive: 200ms }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[]);
    let cfg = text_model(&cfg, "mt", "fa", "one");
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (status, ct, text) = stream_chat(&gw, "mt").await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let first_data = text.find("data:").unwrap_or_else(|| panic!("no data: {text}"));
    let keepalives = text[..first_data].matches(": keepalive\n\n").count();
    assert!(keepalives >= 2, "comments while the set started: {text:?}");
    assert!(text.contains("\"content\": \"hi\"") && text.trim_end().ends_with("data: [DONE]"), "{text:?}");
    assert_eq!(a.starts(), 1);
    // Once the set is ready, a stream is relayed at once, without comments.
    let (status, _, text) = stream_chat(&gw, "mt").await;
    assert_eq!(status, 200);
    assert!(text.starts_with("data:"), "{text:?}");
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_set_fails_to_start_gets_an_error_event_after_the_200() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Fake::new(dir.path(), "fa", &["--fail-start"]);
    a.process_extra = ", restart: { max: 0 }";
    let cfg = config("{ keepalive: 100ms }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[]);
    let cfg = text_model(&cfg, "mt", "fa", "one");
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (status, _, text) = stream_chat(&gw, "mt").await;
    assert_eq!(status, 200, "{text}");
    let event = text.split("\n\n").find(|e| e.starts_with("event: error\n")).unwrap_or_else(|| panic!("{text:?}"));
    let data: Value = serde_json::from_str(event.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(data["error"]["code"], "working_set_failed", "{data}");
    assert!(!text.contains("[DONE]"), "{text:?}");
    shutdown_without_orphans(gw, &[&a]).await;
}

async fn metrics(gw: &Gateway) -> String {
    gw.client.get(gw.endpoint("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Polls `/metrics` until it has `line`.
async fn wait_for_metric(gw: &Gateway, line: &str) {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let text = metrics(gw).await;
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no `{line}` in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_phases_and_the_swap_queue_are_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &[]);
    let b = Fake::new(dir.path(), "fb", &["--start-delay", "1"]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg =
        config("{ default_set: one, patience: 0s }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    // A host name of its own: the metrics recorder is shared by every gateway in this test process.
    let cfg = cfg.replace("gpu0", "gpu-metrics");
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let swap = gen_image(&gw, "mb");
    let scrape = wait_for_metric(&gw, "easel_swap_queue_depth{host=\"gpu-metrics\"} 1");
    let ((s, _, body), ()) = tokio::join!(swap, scrape);
    assert_eq!(s, 200, "{body}");
    wait_for_metric(&gw, "easel_swap_queue_depth{host=\"gpu-metrics\"} 0").await;
    let text = metrics(&gw).await;
    assert!(text.contains("# TYPE easel_swap_phase_seconds histogram"), "{text}");
    assert!(text.contains("# HELP easel_swap_phase_seconds "), "{text}");
    assert!(text.contains("# TYPE easel_swap_queue_depth gauge"), "{text}");
    let count = |phase: &str| {
        let key = format!("easel_swap_phase_seconds_count{{host=\"gpu-metrics\",phase=\"{phase}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    // The default set's start, then the swap: one drain, one stop, a second start (which took the 1 s load).
    assert_eq!((count("draining"), count("stopping"), count("starting")), (1, 1, 2), "{text}");
    let sum = text
        .lines()
        .find_map(|l| l.strip_prefix("easel_swap_phase_seconds_sum{host=\"gpu-metrics\",phase=\"starting\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sum >= 1.0, "starting took at least the fake's load time: {sum}");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_swap_queue_answers_429_and_max_wait_503_with_retry_after_in_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--start-delay", "4"]);
    let cfg = config(
        "{ queue_depth: 1, max_wait: 1s }",
        &[&a],
        "  one: { host: gpu0, backends: [fa] }\n",
        &[("ma", "fa", "one")],
    );
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let retry_after = |h: &reqwest::header::HeaderMap| -> u64 { h["retry-after"].to_str().unwrap().parse().unwrap() };
    let first = gen_image(&gw, "ma");
    let second = async {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        while hosts(&gw).await["data"][0]["swap_queue_depth"] != 1 {
            assert!(tokio::time::Instant::now() < deadline, "the first request never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gen_image(&gw, "ma").await
    };
    let began = std::time::Instant::now();
    let ((s1, h1, b1), (s2, h2, b2)) = tokio::join!(first, second);
    assert_eq!(s2, 429, "{b2}");
    assert_eq!(b2["error"]["code"], "backend_busy", "{b2}");
    assert!((1..=60).contains(&retry_after(&h2)), "{h2:?}");
    assert_eq!(s1, 503, "{b1}");
    assert_eq!(b1["error"]["code"], "working_set_switching", "{b1}");
    assert!((1..=60).contains(&retry_after(&h1)), "{h1:?}");
    assert!(began.elapsed() < Duration::from_secs(4), "max_wait ended the wait before the set was ready");
    // The swap goes on without its waiters and the set serves once it is up.
    wait_until("the set to start", || a.starts() == 1).await;
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while hosts(&gw).await["data"][0]["state"] != "active" {
        assert!(tokio::time::Instant::now() < deadline, "the set never became active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_work_the_backend_reports_itself() {
    let dir = tempfile::tempdir().unwrap();
    // llama.cpp's `/slots` says a slot is processing (work easel did not submit) for 1.5 s after start.
    let a = Fake::new(dir.path(), "fa", &["--external-busy", "1.5"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg =
        config("{ default_set: one, patience: 0s }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let (s, _, body) = gen_image(&gw, "mb").await;
    assert_eq!(s, 200, "{body}");
    let lines = a.lines();
    let pos = |what: &str| lines.iter().position(|l| l == what);
    assert!(pos("slots busy").is_some(), "the drain asked /slots: {lines:?}");
    let (idle, exit) = (pos("slots idle"), pos("exit"));
    assert!(idle.is_some() && exit.is_some() && idle < exit, "fa stopped while its slot was busy: {lines:?}");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_job_waits_out_a_set_switch_that_outlasts_max_wait_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--start-delay", "3"]);
    let cfg = config("{ max_wait: 1s }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    // A synchronous request gives up after `max_wait`; the same request as a job waits for the set.
    let job: Value = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .header("Prefer", "respond-async")
        .json(&json!({"model": "ma", "prompt": "a cat"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let events = crate::support::job_events(&gw, "", &format!("/v1/jobs/{id}/events"), None).await;
    let last = &events.last().unwrap().2;
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(a.starts(), 1, "the set started once");
    shutdown_without_orphans(gw, &[&a]).await;
}

/// Polls `/v1/admin/hosts` until the host's state is `state` (and `also` holds), then returns that view.
async fn wait_for_state(gw: &Gateway, state: &str, also: impl Fn() -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let h = hosts(gw).await;
        if h["data"][0]["state"] == state && also() {
            return h;
        }
        assert!(tokio::time::Instant::now() < deadline, "the host never became {state}: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_arrivals_for_two_sets_cause_at_most_two_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "0.5"]);
    let b = Fake::new(dir.path(), "fb", &["--gen-secs", "0.5"]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg =
        config("{ default_set: one, patience: 5s }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    // A, B, A, B, …: without patience every arrival for the other set would swap.
    let models = ["ma", "mb"].repeat(6);
    let all = futures_util::future::join_all(models.iter().map(|m| gen_image(&gw, m))).await;
    for (m, (s, _, body)) in models.iter().zip(&all) {
        assert_eq!(*s, 200, "{m}: {body}");
    }
    let gens = |f: &Fake| f.lines().iter().filter(|l| *l == "gen done").count();
    assert_eq!((gens(&a), gens(&b)), (6, 6), "{:?} {:?}", a.lines(), b.lines());
    // The default set's start is not a swap; every later start of either set is one.
    let swaps = a.starts() - 1 + b.starts();
    assert!((1..=2).contains(&swaps), "{swaps} swaps: {:?} {:?}", a.lines(), b.lines());
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_drain_timeout_aborts_the_swap_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let a = Fake::new(dir.path(), "fa", &["--gen-secs", "4"]);
    let b = Fake::new(dir.path(), "fb", &[]);
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let host = "{ default_set: one, patience: 0s, drain_timeout: 1s, failure_cooldown: 10s }";
    let cfg = config(host, &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    let pid = a.pids()[0];
    let slow = tokio::spawn({
        let (client, url) = (gw.client.clone(), gw.endpoint("/v1/images/generations"));
        async move { client.post(url).json(&json!({"model": "ma", "prompt": "slow"})).send().await.unwrap().status() }
    });
    wait_until("the slow job to begin", || a.lines().iter().any(|l| l == "gen begin")).await;
    let (s, headers, body) = gen_image(&gw, "mb").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "working_set_busy", "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(alive(pid), "the busy backend was stopped: {:?}", a.lines());
    assert!(!a.lines().iter().any(|l| l == "stopping" || l == "exit"), "{:?}", a.lines());
    assert_eq!(b.starts(), 0, "nothing of the target set started");
    assert_eq!(hosts(&gw).await["data"][0]["active_set"], "one");
    assert_eq!(slow.await.unwrap(), 200, "the long job completes");
    assert!(alive(pid) && a.starts() == 1, "{:?}", a.lines());
    assert!(!a.lines().iter().any(|l| l == "exit"), "SIGTERM never reached fa: {:?}", a.lines());
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "the active set serves after the abort: {body}");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_a_request_gives_502_degraded_then_failed_without_respawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Fake::new(dir.path(), "fa", &["--crash-on-request", "1"]);
    a.process_extra = ", restart: { max: 1, backoff: 1s }";
    let cfg =
        config("{ failure_cooldown: 20s }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 502, "{body}");
    // Restarting after the crash (1 s backoff): the host is degraded, then active again with a new process.
    let h = wait_for_state(&gw, "degraded", || true).await;
    assert_eq!(h["data"][0]["degraded"], json!(["fa"]), "{h}");
    wait_for_state(&gw, "active", || a.starts() == 2).await;
    // The restarted process crashes too: the one restart is used up and the set fails.
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 502, "{body}");
    wait_for_state(&gw, "failed", || true).await;
    let (s, headers, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "working_set_failed", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("fake backend crashing on a request"), "the log tail is in the message: {msg}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    // During the cooldown nothing is spawned again.
    let (s, _, _) = gen_image(&gw, "ma").await;
    assert_eq!(s, 503);
    assert_eq!(a.starts(), 2, "{:?}", a.lines());
    shutdown_without_orphans(gw, &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_starts_the_new_set_only_after_the_old_one_let_go_of_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = dir.path().join("vram").display().to_string();
    let gpu: &'static str = Box::leak(gpu.into_boxed_str());
    // fa keeps the "VRAM" for 1 s after SIGTERM; fb cannot load while anyone else holds it.
    let a = Fake::new(dir.path(), "fa", &["--hold-file", gpu, "--release-delay", "1"]);
    let mut b = Fake::new(dir.path(), "fb", &["--hold-file", gpu]);
    // No restart: a start that came too early would fail the request instead of being retried.
    b.process_extra = ", restart: { max: 0 }";
    let sets = "  one: { host: gpu0, backends: [fa] }\n  two: { host: gpu0, backends: [fb] }\n";
    let cfg =
        config("{ default_set: one, patience: 0s }", &[&a, &b], sets, &[("ma", "fa", "one"), ("mb", "fb", "two")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    wait_until("the default set to start", || a.starts() == 1).await;
    wait_until("fa to hold the GPU", || std::fs::read_to_string(gpu).is_ok_and(|p| p == a.pids()[0].to_string())).await;
    let (s, _, body) = gen_image(&gw, "mb").await;
    assert_eq!(s, 200, "{body}");
    let (al, bl) = (a.lines(), b.lines());
    assert!(al.iter().any(|l| l == "stopping") && al.iter().any(|l| l == "exit"), "{al:?}");
    assert!(!bl.iter().any(|l| l.starts_with("oom")), "fb started while fa held the GPU: {bl:?}");
    assert_eq!(b.starts(), 1, "{bl:?}");
    assert_eq!(std::fs::read_to_string(gpu).unwrap(), b.pids()[0].to_string(), "fb holds the GPU now");
    shutdown_without_orphans(gw, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setsid_grandchild_is_gone_after_unload_and_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("grandchild").display().to_string();
    let first: &'static str = Box::leak(first.into_boxed_str());
    let a = Fake::new(dir.path(), "fa", &["--setsid-grandchild", first]);
    let cfg = config("{ default_set: one }", &[&a], "  one: { host: gpu0, backends: [fa] }\n", &[("ma", "fa", "one")]);
    let gw = spawn_gateway_env(&cfg, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let grandchild = |path: &str| std::fs::read_to_string(path).ok().and_then(|p| p.trim().parse::<u32>().ok());
    wait_until("the grandchild to be spawned", || grandchild(first).is_some()).await;
    let escaped = grandchild(first).unwrap();
    assert!(alive(escaped));
    wait_for_state(&gw, "active", || true).await;
    let resp = gw.client.post(gw.endpoint("/v1/admin/hosts/gpu0/unload")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    wait_for_state(&gw, "idle", || true).await;
    wait_until("the unloaded set's setsid grandchild to exit", || !alive(escaped)).await;
    assert!(!alive(a.pids()[0]));

    // Started again by a request, then stopped by the gateway's shutdown.
    std::fs::remove_file(first).unwrap();
    let (s, _, body) = gen_image(&gw, "ma").await;
    assert_eq!(s, 200, "{body}");
    wait_until("the second grandchild to be spawned", || grandchild(first).is_some()).await;
    let escaped = grandchild(first).unwrap();
    assert!(alive(escaped));
    shutdown_without_orphans(gw, &[&a]).await;
    wait_until("the setsid grandchild to exit with the gateway", || !alive(escaped)).await;
}
