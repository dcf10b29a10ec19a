//! Outputs in S3-compatible storage, against a real S3 server (moto's server mode, started here on a free port):
//! a URL issued by one instance is served by another, ranged reads, presigned redirects, bad S3 settings
//! refused by `config check`, and an unreachable S3 answered with a clear storage error instead of a hang.
//!
//! `EASEL_MOTO` must name a Python that has `moto[server]` (scripts/test.sh installs one and sets it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{Value, json};

use crate::support::{Gateway, TEST_TIMEOUT, job_events, spawn_gateway_env};

pub(crate) const BUCKET: &str = "easel-outputs";
const SIGNING_SECRET: &str = "0123456789abcdef0123456789abcdef-shared";

/// A moto S3 server on 127.0.0.1; killed on drop.
pub(crate) struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto on a free port (it picks one for `-p 0` and prints it) and creates [`BUCKET`].
pub(crate) async fn start_moto() -> Moto {
    let python = std::env::var("EASEL_MOTO").unwrap_or_else(|_| {
        panic!(
            "EASEL_MOTO is not set: the S3 tests need a Python with `moto[server]` installed; run scripts/test.sh \
             (it installs one into ~/.cache/easel-moto) or set EASEL_MOTO=/path/to/bin/python"
        )
    });
    let mut child = Command::new(&python)
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start moto with EASEL_MOTO={python}: {e}"));
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(i) = line.find("Running on http://") {
                    let url: String = line[i + "Running on ".len()..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                        .collect();
                    let _ = tx.send(url);
                }
            }
        });
    }
    let endpoint = rx.recv_timeout(TEST_TIMEOUT).expect("moto did not start (no `Running on` line)");
    let moto = Moto { child, endpoint };
    // The server is listening once it printed its address; the bucket is made through the S3 API itself.
    let resp =
        tokio::time::timeout(TEST_TIMEOUT, reqwest::Client::new().put(format!("{}/{BUCKET}", moto.endpoint)).send())
            .await
            .expect("moto did not answer")
            .expect("create bucket");
    assert!(resp.status().is_success(), "create bucket: {}", resp.status());
    moto
}

/// The backends and models every test here uses (a simulated image and video model).
const MODELS: &str = "backends:\n  sim:\n    kind: simulated\n    poll_interval: 20ms\nmodels:\n  - id: pic\n    \
                      backends: [sim]\n    default_size: 32x32\n  - id: clip\n    type: video\n    backends: [sim]\n    \
                      default_size: 16x16\n";

fn yaml(endpoint: &str, extra_s3: &str) -> String {
    format!(
        "storage:\n  signing_secret: {SIGNING_SECRET}\n  s3:\n    endpoint: {endpoint}\n    region: us-east-1\n    \
         access_key_id: testing\n    secret_access_key: testing\n    path_style: true\n    allow_http: true\n{extra_s3}\
         {MODELS}"
    )
}

async fn gateway(endpoint: &str, extra_s3: &str) -> Gateway {
    let files = format!("s3://{BUCKET}/outputs");
    spawn_gateway_env(&yaml(endpoint, extra_s3), &[("EASEL_STORAGE__FILES", &files)]).await
}

/// Generates one image in URL mode; returns the URL's path and query (without the instance's address).
async fn generate(gw: &Gateway) -> String {
    let (s, _, body) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "pic", "prompt": "a lighthouse", "response_format": "url"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap_or_else(|| panic!("a url answer: {body}"));
    url.strip_prefix(&gw.url).unwrap_or_else(|| panic!("{url} is not on {}", gw.url)).to_owned()
}

fn file_id(path: &str) -> &str {
    path.strip_prefix("/v1/files/").and_then(|r| r.split('?').next()).unwrap()
}

/// An S3 client of the test's own (not easel's) on the bucket.
fn bucket(moto: &Moto) -> object_store::aws::AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(&moto.endpoint)
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_allow_http(true)
        .build()
        .unwrap()
}

/// An object straight from the bucket through the S3 API.
pub(crate) async fn object(moto: &Moto, key: &str) -> bytes::Bytes {
    let s3 = bucket(moto);
    let got = tokio::time::timeout(TEST_TIMEOUT, s3.get(&object_store::path::Path::from(key))).await.unwrap();
    got.unwrap_or_else(|e| panic!("{key} is not in the bucket: {e}")).bytes().await.unwrap()
}

async fn get_with(gw: &Gateway, path: &str, range: &str) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
    let resp = tokio::time::timeout(TEST_TIMEOUT, gw.client.get(gw.endpoint(path)).header("range", range).send())
        .await
        .unwrap()
        .unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_issued_by_one_instance_is_served_by_another_with_ranges() {
    let moto = start_moto().await;
    let a = gateway(&moto.endpoint, "").await;
    let b = gateway(&moto.endpoint, "").await;
    let path = generate(&a).await;
    let id = file_id(&path);

    // The object is in the bucket under the prefix, and nothing was written to A's local folder.
    let stored = object(&moto, &format!("outputs/{id}")).await;
    assert!(stored.starts_with(b"\x89PNG"), "a PNG in the bucket");
    assert!(!a.dir.path().join("files").join(id).exists());

    // B serves A's signed URL, byte for byte.
    let (s, h, body) = b.get(&path).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(body, stored);

    // Ranges: a prefix, a suffix, and one past the end.
    let len = stored.len();
    let (s, h, part) = get_with(&b, &path, "bytes=0-7").await;
    assert_eq!(s, 206);
    assert_eq!(h["content-range"], format!("bytes 0-7/{len}").as_str());
    assert_eq!(&part[..], &stored[..8]);
    let (s, h, part) = get_with(&b, &path, "bytes=-5").await;
    assert_eq!((s, &part[..]), (206, &stored[len - 5..]));
    assert_eq!(h["content-range"], format!("bytes {}-{}/{len}", len - 5, len - 1).as_str());
    let (s, h, _) = get_with(&b, &path, &format!("bytes={len}-")).await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], format!("bytes */{len}").as_str());

    // A video (its job lives in A's database): its content is in the bucket, served from there ranged.
    let (s, _, v) = a.post_json("/v1/videos", json!({"model": "clip", "prompt": "waves", "seconds": "1"})).await;
    assert_eq!(s, 200, "{v}");
    let vid = v["id"].as_str().unwrap();
    let events = job_events(&a, "", &format!("/v1/jobs/{vid}/events"), None).await;
    assert_eq!(events.last().map(|e| e.2["status"].clone()), Some(json!("completed")), "{events:?}");
    let content = format!("/v1/videos/{vid}/content");
    let (s, h, whole) = a.get(&content).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&whole));
    assert!(h["content-type"].to_str().unwrap().starts_with("video/") || h["content-type"] == "image/gif");
    let prefix = object_store::path::Path::from("outputs");
    let keys: Vec<String> = bucket(&moto).list(Some(&prefix)).map(|m| m.unwrap().location.to_string()).collect().await;
    let video_key =
        keys.iter().find(|k| k.starts_with("outputs/vid_")).unwrap_or_else(|| panic!("no video in {keys:?}"));
    assert_eq!(object(&moto, video_key).await, whole);
    let (s, h, part) = get_with(&a, &content, "bytes=1-3").await;
    assert_eq!((s, &part[..]), (206, &whole[1..4]));
    assert_eq!(h["content-range"], format!("bytes 1-3/{}", whole.len()).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presign_redirects_to_a_url_that_works_without_easel() {
    let moto = start_moto().await;
    let gw = gateway(&moto.endpoint, "    presign: true\n    presign_ttl: 5m\n").await;
    let path = generate(&gw).await;
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = no_redirects.get(gw.endpoint(&path)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 307);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("{}/{BUCKET}/outputs/img_", moto.endpoint)), "{location}");
    assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=300"), "{location}");
    let fetched = reqwest::get(&location).await.unwrap();
    assert_eq!(fetched.status().as_u16(), 200);
    let stored = object(&moto, &format!("outputs/{}", file_id(&path))).await;
    assert_eq!(fetched.bytes().await.unwrap(), stored);
    // The easel signature is still checked before any redirect.
    let tampered = path.replace("sig=", "sig=00");
    assert_eq!(no_redirects.get(gw.endpoint(&tampered)).send().await.unwrap().status().as_u16(), 403);
}

#[test]
fn config_check_refuses_bad_s3_settings_without_echoing_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "storage:\n  files: s3://Bad_Bucket/out//put\n  retention: 10s\n  s3:\n    endpoint: http://minio.local:9000\n    \
         access_key_id: AKIAEXAMPLE\n    presign_ttl: 30d\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("nosecret.yaml"),
        "storage:\n  files: s3://good-bucket\n  s3:\n    access_key_id: AKIAEXAMPLE\n    \
         secret_access_key: TOP-SECRET-VALUE-123\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("stray.yaml"), "storage:\n  s3:\n    region: eu-west-1\n").unwrap();
    let check = |file: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["config", "check", "--config", file])
            .current_dir(dir.path())
            .env_remove("EASEL_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{file} must be refused");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let err = check("bad.yaml");
    for needle in [
        "storage.files: `Bad_Bucket` is not an S3 bucket name",
        "storage.files: the key prefix `out//put` has an empty",
        "storage.retention: must be at least 1m",
        "storage.s3.endpoint: `http://minio.local:9000` is plain HTTP; set `storage.s3.allow_http: true`",
        "storage.s3.secret_access_key: is needed with `access_key_id`",
        "storage.s3.presign_ttl: must be between 1s and 7d",
        "storage.signing_secret: is required with `storage.files: s3://…`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let err = check("nosecret.yaml");
    assert!(err.contains("storage.signing_secret: is required"), "{err}");
    assert!(!err.contains("TOP-SECRET-VALUE-123"), "a secret was echoed:\n{err}");
    let err = check("stray.yaml");
    assert!(err.contains("storage.s3: is only used with `storage.files: s3://bucket/prefix`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_s3_is_a_prompt_storage_error() {
    // A port nothing listens on: taken, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gw = gateway(&format!("http://127.0.0.1:{port}"), "").await;
    let started = Instant::now();
    let (s, _, body) =
        gw.post_json("/v1/images/generations", json!({"model": "pic", "prompt": "p", "response_format": "url"})).await;
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(s, 500, "{body}");
    let e: &Value = &body["error"];
    assert_eq!(e["code"], "storage_error", "{body}");
    assert_eq!(e["type"], "server_error", "{body}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("storage") && message.contains(&format!("s3://{BUCKET}/outputs/")), "{message}");
    // Readiness names it too.
    let (s, _, body) = gw.get("/readyz").await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(s, 503, "{body}");
    assert!(body.contains(&format!("storage at s3://{BUCKET}/outputs/.readyz")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_outputs_in_the_bucket_and_nothing_else() {
    let moto = start_moto().await;
    let gw = gateway(&moto.endpoint, "").await;
    let path = generate(&gw).await;
    let id = file_id(&path).to_owned();
    let s3 = bucket(&moto);
    let foreign = object_store::path::Path::from("outputs/notes.txt");
    s3.put(&foreign, bytes::Bytes::from_static(b"not easel's").into()).await.unwrap();

    // The store the gateway runs on, as the retention task uses it.
    let env = easel::config::MapEnv::new([("EASEL_STORAGE__FILES", format!("s3://{BUCKET}/outputs").as_str())]);
    let config = easel::config::from_str(&yaml(&moto.endpoint, ""), "test.yaml", gw.dir.path(), &env).unwrap();
    let store = easel::storage::FileStore::from_config(&config.storage).await.unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    assert_eq!(store.delete_older_than(hour_ago).await.unwrap(), 0, "a fresh output is kept");
    assert_eq!(gw.get(&path).await.0, 200);
    let later = SystemTime::now() + Duration::from_secs(5);
    assert_eq!(store.delete_older_than(later).await.unwrap(), 1);
    assert_eq!(gw.get(&path).await.0, 404, "{id} is gone");
    assert!(s3.head(&foreign).await.is_ok(), "keys easel did not issue are left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_folder_answers_ranges_the_same_way() {
    let gw = crate::support::spawn_gateway(MODELS).await;
    let path = generate(&gw).await;
    let stored = std::fs::read(gw.dir.path().join("files").join(file_id(&path))).unwrap();
    let (s, h, part) = get_with(&gw, &path, "bytes=4-").await;
    assert_eq!((s, &part[..]), (206, &stored[4..]));
    assert_eq!(h["content-range"], format!("bytes 4-{}/{}", stored.len() - 1, stored.len()).as_str());
    let (s, h, _) = get_with(&gw, &path, "bytes=-0").await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], format!("bytes */{}", stored.len()).as_str());
    let (s, _, whole) = get_with(&gw, &path, "lines=1-2").await;
    assert_eq!((s, &whole[..]), (200, &stored[..]), "an unknown unit gets the whole file");
}
