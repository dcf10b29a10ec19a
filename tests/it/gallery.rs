//! The gallery's listing, `GET /v1/files`: each key sees only the outputs it made, newest first, with the request
//! that made them and signed URLs that work without a key; pages follow the cursor exactly; a video is listed once
//! (its thumbnail as its poster); without keys everything made is listed; bad queries get clear 400s.

use serde_json::{Value, json};

use crate::support::books::{ADMIN, key};
use crate::support::{Gateway, TEST_TIMEOUT, job_events, spawn_gateway, spawn_gateway_env};
use crate::videos::{call, until_done};

const KEYS: &str = "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    poll_interval: 20ms\nmodels:\n  - id: pic\n    type: image\n    backends: [sim]\n    credits: 1\n    default_size: 16x16\n  - id: clip\n    type: video\n    backends: [sim]\n    credits: 3\n    default_size: 32x16\n";

async fn list(gw: &Gateway, secret: Option<&str>, query: &str) -> (u16, Value) {
    let mut req = gw.client.get(gw.endpoint(&format!("/v1/files{query}")));
    if let Some(s) = secret {
        req = req.bearer_auth(s);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn generate(gw: &Gateway, secret: Option<&str>, prompt: &str) -> String {
    let mut req = gw.client.post(gw.endpoint("/v1/images/generations")).json(&json!({
        "model": "pic", "prompt": prompt, "size": "16x16", "seed": 7, "response_format": "url",
    }));
    if let Some(s) = secret {
        req = req.bearer_auth(s);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    url.split("/v1/files/").nth(1).unwrap().split('?').next().unwrap().to_owned()
}

fn ids(page: &Value) -> Vec<String> {
    page["data"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn each_key_lists_its_own_outputs_newest_first_with_their_requests() {
    let gw = spawn_gateway_env(KEYS, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let (alice, bob) = (key(&gw, 10.0).await, key(&gw, 10.0).await);
    let a1 = generate(&gw, Some(&alice), "first of alice").await;
    let b1 = generate(&gw, Some(&bob), "bob's").await;
    let a2 = generate(&gw, Some(&alice), "second of alice").await;

    let (status, page) = list(&gw, Some(&alice), "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["object"], "list");
    assert_eq!(ids(&page), [a2.clone(), a1.clone()], "alice sees hers, newest first, not bob's");
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], a2.as_str());
    assert_eq!(page["last_id"], a1.as_str());
    let newest = &page["data"][0];
    assert_eq!(newest["object"], "file");
    assert_eq!(newest["purpose"], "output");
    assert_eq!(newest["kind"], "image");
    assert_eq!(newest["model"], "pic");
    assert_eq!(newest["mime_type"], "image/png");
    assert_eq!(newest["request"]["prompt"], "second of alice");
    assert_eq!(newest["request"]["seed"], 7);
    assert_eq!(newest["request"]["size"], "16x16");
    assert_eq!(newest["request"]["operation"], "generations");

    // The signed URL works without a key and serves the very bytes that were counted.
    let (status, headers, body) = gw.get(newest["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(body.len() as u64, newest["bytes"].as_u64().unwrap());

    let (_, page) = list(&gw, Some(&bob), "").await;
    assert_eq!(ids(&page), [b1]);
    // No key, or the admin token, is not a key: the listing needs one.
    assert_eq!(list(&gw, None, "").await.0, 401);
    assert_eq!(list(&gw, Some(ADMIN), "").await.0, 401);
}

#[tokio::test]
async fn pages_follow_the_cursor_without_gaps_or_repeats() {
    let gw = spawn_gateway_env(KEYS, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let k = key(&gw, 20.0).await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(generate(&gw, Some(&k), &format!("picture {i}")).await);
    }
    made.reverse();
    let (_, p1) = list(&gw, Some(&k), "?limit=2").await;
    assert_eq!(ids(&p1), made[0..2]);
    assert_eq!(p1["has_more"], true);
    let (_, p2) = list(&gw, Some(&k), &format!("?limit=2&after={}", p1["last_id"].as_str().unwrap())).await;
    assert_eq!(ids(&p2), made[2..4]);
    assert_eq!(p2["has_more"], true);
    let (_, p3) = list(&gw, Some(&k), &format!("?limit=2&after={}&order=desc&purpose=output", made[3])).await;
    assert_eq!(ids(&p3), made[4..5]);
    assert_eq!(p3["has_more"], false);
    // Another key's cursor reveals nothing of this key's outputs.
    let other = key(&gw, 1.0).await;
    let (status, p) = list(&gw, Some(&other), &format!("?after={}", made[0])).await;
    assert_eq!((status, ids(&p).len()), (200, 0));
}

#[tokio::test]
async fn bad_queries_get_clear_errors() {
    let gw = spawn_gateway_env(KEYS, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let k = key(&gw, 1.0).await;
    for (query, param, says) in [
        ("?limit=0", "limit", "from 1 to 100"),
        ("?limit=101", "limit", "from 1 to 100"),
        ("?limit=ten", "limit", "`ten`"),
        ("?purpose=fine-tune", "purpose", "purpose=output"),
        ("?order=asc", "order", "newest first"),
        ("?colour=red", "colour", "unknown query parameter"),
    ] {
        let (status, body) = list(&gw, Some(&k), query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{query}: {body}");
    }
}

#[tokio::test]
async fn a_video_is_listed_once_with_its_thumbnail_as_poster() {
    let gw = spawn_gateway_env(KEYS, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let k = key(&gw, 10.0).await;
    let (status, job) =
        call(&gw, reqwest::Method::POST, "/v1/videos", &k, Some(json!({"model": "clip", "prompt": "waves"}))).await;
    assert_eq!(status, 200, "{job}");
    let (done, _) = until_done(&gw, &k, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, page) = list(&gw, Some(&k), "").await;
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "the clip alone, not its thumbnail: {page}");
    let clip = &data[0];
    assert_eq!(clip["kind"], "video");
    assert_eq!(clip["model"], "clip");
    assert_eq!(clip["request"]["prompt"], "waves");
    // The simulated backend's clips are animated GIFs; a real one's are video/mp4 or video/webm.
    assert_eq!(clip["mime_type"], "image/gif", "{clip}");
    assert!(clip["request"].get("request_id").is_none(), "internal fields are not shown: {clip}");
    let (status, headers, body) = gw.get(clip["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], clip["mime_type"].as_str().unwrap());
    assert_eq!(body.len() as u64, clip["bytes"].as_u64().unwrap());
    let (status, headers, _) = gw.get(clip["poster_url"].as_str().unwrap()).await;
    assert_eq!(status, 200, "the poster is served by its signed URL");
    assert!(headers["content-type"].to_str().unwrap().starts_with("image/"));
    // Unsigned, the clip is the owner's alone; another key gets the same 404 as a missing file.
    let other = key(&gw, 1.0).await;
    let path = format!("/v1/files/{}", clip["id"].as_str().unwrap());
    assert_eq!(call(&gw, reqwest::Method::GET, &path, &other, None).await.0, 404);
    let owner = gw.client.get(gw.endpoint(&path)).bearer_auth(&k).send().await.unwrap();
    assert_eq!(owner.status(), 200);
}

#[tokio::test]
async fn without_keys_every_output_is_listed_and_b64_answers_are_not_stored() {
    let gw = spawn_gateway(
        "backends:\n  sim:\n    kind: simulated\nmodels:\n  - id: pic\n    type: image\n    backends: [sim]\n    default_size: 16x16\n",
    )
    .await;
    let first = generate(&gw, None, "one").await;
    let (status, _, _) = gw
        .post_json(
            "/v1/images/generations",
            json!({"model": "pic", "prompt": "inline", "size": "16x16", "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(status, 200);
    let second = generate(&gw, None, "two").await;
    let (status, page) = list(&gw, None, "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), [second, first], "a base64 answer is not stored, so not listed");
    assert_eq!(page["data"][0]["request"]["prompt"], "two");
}

#[tokio::test]
async fn an_image_job_lists_its_outputs_with_the_request() {
    let gw = spawn_gateway_env(KEYS, &[("EASEL_ADMIN_TOKEN", ADMIN)]).await;
    let k = key(&gw, 10.0).await;
    let resp = gw
        .client
        .post(gw.endpoint("/v1/images/generations"))
        .bearer_auth(&k)
        .header("Prefer", "respond-async")
        .json(&json!({"model": "pic", "prompt": "as a job", "n": 2, "size": "16x16"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    // The event stream ends when the job does.
    job_events(&gw, &k, &format!("/v1/jobs/{id}/events"), None).await;
    let (_, done) = call(&gw, reqwest::Method::GET, &format!("/v1/jobs/{id}"), &k, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, page) = list(&gw, Some(&k), "").await;
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{page}");
    for f in data {
        assert_eq!(f["kind"], "image");
        assert_eq!(f["request"]["prompt"], "as a job");
        assert_eq!(f["request"]["operation"], "generations");
        assert_eq!(f["mime_type"], "image/png");
        let (status, _, body) = gw.get(f["url"].as_str().unwrap()).await;
        assert_eq!((status, body.len() as u64), (200, f["bytes"].as_u64().unwrap()));
    }
}
