//! Three `easel serve` processes behind a real nginx, sharing one PostgreSQL, one Redis and one S3 bucket (moto), as
//! a fleet is deployed: a burst through nginx never puts more than the backend's `concurrency` on the upstream at
//! once, 200 paid requests against 100 credits spread over the instances are exactly 100 served and 100 refused
//! with the books clean, and a URL one instance issued is served by another with the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::s3::{BUCKET, Moto, object, start_moto};
use crate::support::books::{ADMIN, credits_at, key_at, ledger_clean_at};
use crate::support::nginx::{Nginx, UPSTREAM};
use crate::support::openai::{self, FakeOpenAi};
use crate::support::postgres::Postgres;
use crate::support::redis::Redis;
use crate::support::{TEST_TIMEOUT, start_binary};

const SIGNING_SECRET: &str = "0123456789abcdef0123456789abcdef-fleet";

/// One `easel serve` process; killed when dropped.
struct Instance {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    url: String,
    _dir: tempfile::TempDir,
}

impl Instance {
    /// `127.0.0.1:PORT`, as nginx names it in `$upstream_addr`.
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole deployment. Fields drop in order: nginx, then the instances, then the engines they use.
struct Fleet {
    nginx: Nginx,
    instances: Vec<Instance>,
    gpu: FakeOpenAi,
    _pg: Postgres,
    _redis: Redis,
    moto: Moto,
}

/// `gpu`: the counting fake, two at a time for the whole fleet, a queue deep enough for the burst; `paid`: one
/// credit an image on a simulated backend that admits everything.
fn config(gpu: &str, redis: &str, s3: &str) -> String {
    format!(
        "auth:\n  mode: keys\ncluster:\n  redis: '{redis}'\n  lease: 5s\nstorage:\n  signing_secret: {SIGNING_SECRET}\n  \
         s3:\n    endpoint: {s3}\n    region: us-east-1\n    access_key_id: testing\n    secret_access_key: testing\n    \
         path_style: true\n    allow_http: true\nbackends:\n  gpu:\n    kind: openai\n    url: {gpu}/v1\n    \
         api_key: {key}\n    timeout: 20s\n    concurrency: {{images: 2}}\n    queue: {{depth: 32, wait: 30s}}\n  \
         sim:\n    kind: simulated\n    latency: 50ms\n    concurrency: {{images: 256}}\n    \
         queue: {{depth: 512, wait: 30s}}\nmodels:\n  - {{id: gpu, backends: [gpu], upstream_model: tiny}}\n  \
         - {{id: paid, backends: [sim], credits: 1, default_size: 16x16}}\n",
        key = openai::KEY
    )
}

async fn fleet() -> Fleet {
    let (pg, redis, moto) = (Postgres::start().await, Redis::start(), start_moto().await);
    let gpu = openai::start().await;
    gpu.state.latency_ms.store(300, Ordering::SeqCst);
    let database = pg.database().await;
    let files = format!("s3://{BUCKET}/fleet");
    let yaml = config(&gpu.url, &redis.url, &moto.endpoint);
    let env = [
        ("EASEL_ADMIN_TOKEN", ADMIN),
        ("EASEL_STORAGE__DATABASE", database.as_str()),
        ("EASEL_STORAGE__FILES", files.as_str()),
    ];
    let instances: Vec<Instance> = (0..3)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("easel.yaml"), &yaml).unwrap();
            let (child, url) = start_binary(dir.path(), &env);
            Instance { child, url, _dir: dir }
        })
        .collect();
    let nginx = Nginx::start(&instances.iter().map(Instance::addr).collect::<Vec<_>>()).await;
    Fleet { nginx, instances, gpu, _pg: pg, _redis: redis, moto }
}

/// (status, the instance nginx chose, body) of one request.
async fn send(req: reqwest::RequestBuilder) -> (u16, String, Value) {
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let upstream = resp.headers().get(UPSTREAM).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, upstream, resp.json().await.unwrap_or(Value::Null))
}

fn generate(client: &reqwest::Client, nginx: &Nginx, secret: &str, body: Value) -> reqwest::RequestBuilder {
    client.post(format!("{}/v1/images/generations", nginx.url)).bearer_auth(secret).json(&body)
}

/// How many answers each instance gave, by its address.
fn spread(answers: &[(u16, String, Value)]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for (_, upstream, _) in answers {
        *by.entry(upstream.clone()).or_insert(0) += 1;
    }
    by
}

fn assert_all_answered(fleet: &Fleet, answers: &[(u16, String, Value)], what: &str) {
    let by = spread(answers);
    let expected: BTreeSet<String> = fleet.instances.iter().map(Instance::addr).collect();
    assert_eq!(by.keys().cloned().collect::<BTreeSet<_>>(), expected, "{what}: nginx spread them as {by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_nginx_share_limits_credits_and_outputs() {
    let fleet = fleet().await;
    let client = reqwest::Client::new();

    // All three registered in the shared database and alive.
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        let (s, _, status) =
            send(client.get(format!("{}/v1/gateway/status", fleet.nginx.url)).bearer_auth(ADMIN)).await;
        let alive =
            status["fleet"]["instances"].as_array().map_or(0, |i| i.iter().filter(|i| i["alive"] == true).count());
        if s == 200 && alive == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet view never showed 3 instances alive: {s} {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. A burst of 24 on the model whose backend takes two at a time: all queue and are served (the queue holds
    // them all, its wait outlasts 12 rounds of 300 ms), and the upstream never serves more than two at once.
    let secret = key_at(&fleet.nginx.url, 1000.0).await;
    let body = json!({"model": "gpu", "prompt": "a lighthouse", "response_format": "b64_json"});
    let burst = (0..24).map(|_| send(generate(&client, &fleet.nginx, &secret, body.clone())));
    let answers = futures_util::future::join_all(burst).await;
    for (s, upstream, body) in &answers {
        assert_eq!(*s, 200, "via {upstream}: {body}");
    }
    assert_all_answered(&fleet, &answers, "the burst");
    assert_eq!(fleet.gpu.state.calls.load(Ordering::SeqCst), 24, "every request reached the upstream once");
    assert_eq!(
        fleet.gpu.state.max_active.load(Ordering::SeqCst),
        2,
        "three instances together reach but never exceed the backend's concurrency of 2"
    );

    // 2. 200 paid requests at once against 100 credits, over all three instances: exactly 100 served.
    let poor = key_at(&fleet.nginx.url, 100.0).await;
    let body = json!({"model": "paid", "prompt": "p", "response_format": "b64_json"});
    let paid = (0..200).map(|_| send(generate(&client, &fleet.nginx, &poor, body.clone())));
    let answers = tokio::time::timeout(TEST_TIMEOUT, futures_util::future::join_all(paid)).await.unwrap();
    let served = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 402).collect();
    assert_eq!(
        (served, refused.len()),
        (100, 100),
        "{:?}",
        answers.iter().map(|a| (a.0, a.2["error"]["code"].clone())).collect::<Vec<_>>()
    );
    for (_, upstream, body) in &refused {
        assert_eq!(body["error"]["code"], "insufficient_credits", "via {upstream}: {body}");
    }
    assert_all_answered(&fleet, &answers, "the paid requests");
    // An instance's own read waits for its own settlements; after all three, every answer is settled.
    for instance in &fleet.instances {
        credits_at(&instance.url, &poor).await;
    }
    assert_eq!(credits_at(&fleet.nginx.url, &poor).await, (0, 0), "all spent, nothing left held");
    ledger_clean_at(&fleet.nginx.url).await;
    for instance in &fleet.instances {
        ledger_clean_at(&instance.url).await;
    }

    // 3. A URL issued by one instance is served by another, byte for byte what is in the bucket.
    let body = json!({"model": "gpu", "prompt": "a harbour", "response_format": "url"});
    let (s, issuer, answer) = send(generate(&client, &fleet.nginx, &secret, body)).await;
    assert_eq!(s, 200, "{answer}");
    let url = answer["data"][0]["url"].as_str().unwrap_or_else(|| panic!("a url answer: {answer}"));
    let path = url.strip_prefix(&fleet.nginx.url).unwrap_or_else(|| panic!("{url} is not on nginx's address"));
    let other = fleet.instances.iter().find(|i| i.addr() != issuer).unwrap();
    assert!(fleet.instances.iter().any(|i| i.addr() == issuer), "{issuer} is one of the instances");
    let resp =
        tokio::time::timeout(TEST_TIMEOUT, client.get(format!("{}{path}", other.url)).send()).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "{} did not serve the URL {issuer} issued", other.addr());
    assert_eq!(resp.headers()["content-type"], "image/png");
    let served = resp.bytes().await.unwrap();
    let id = path.strip_prefix("/v1/files/").and_then(|r| r.split('?').next()).unwrap();
    assert_eq!(served, object(&fleet.moto, &format!("fleet/{id}")).await, "the bucket's bytes");
    assert!(served.starts_with(b"\x89PNG"), "a PNG");
}
