//! The web page: `/ui/` served from the binary with its media types and cache rule, `/` redirecting there, every
//! asset the page names loading, no key needed for the page itself with keys on, and `server.ui: false` removing it;
//! the recent errors the fleet page lists (`recent_errors` in `/v1/gateway/status`).

use serde_json::json;

use crate::support::a1111::{CHECKPOINT, FakeA1111};
use crate::support::{Gateway, spawn_gateway, spawn_gateway_env};

const SIM: &str = "backends:\n  sim: {kind: simulated}\nmodels:\n  - {id: easel-sim, backends: [sim]}\n";

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn get_raw(gw: &Gateway, path: &str) -> reqwest::Response {
    no_redirects().get(gw.endpoint(path)).send().await.unwrap()
}

/// The local files `index.html` loads (`src="…"`/`href="…"` not starting with `#` or a scheme).
fn referenced(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            if !target.starts_with('#') && !target.contains(':') && !out.iter().any(|t| t == target) {
                out.push(target.to_owned());
            }
        }
    }
    out
}

#[tokio::test]
async fn the_page_is_served_with_its_assets_and_the_root_redirects_to_it() {
    let gw = spawn_gateway(SIM).await;
    let root = get_raw(&gw, "/").await;
    assert_eq!(root.status(), 307);
    assert_eq!(root.headers()["location"], "/ui/");
    let bare = get_raw(&gw, "/ui").await;
    assert_eq!(bare.status(), 308);
    assert_eq!(bare.headers()["location"], "/ui/");

    let (status, headers, body) = gw.get("/ui/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert!(headers["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    let html = String::from_utf8(body.to_vec()).unwrap();
    assert!(html.contains("<title>easel</title>"), "{html}");
    let assets = referenced(&html);
    assert!(assets.len() >= 3, "the page names its stylesheet, script and icon: {assets:?}");
    let mut scripts = Vec::new();
    for a in &assets {
        let (status, headers, body) = gw.get(&format!("/ui/{a}")).await;
        assert_eq!(status, 200, "/ui/{a}");
        assert!(!body.is_empty(), "/ui/{a} is empty");
        let ct = headers["content-type"].to_str().unwrap().to_owned();
        let want = match a.rsplit('.').next().unwrap() {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "svg" => "image/svg+xml",
            other => panic!("unexpected asset type {other}"),
        };
        assert_eq!(ct, want, "/ui/{a}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        if a.ends_with(".js") {
            scripts.push(String::from_utf8(body.to_vec()).unwrap());
        }
    }
    // Modules the entry script imports load too.
    for script in &scripts {
        for part in script.split("from \"./").skip(1) {
            let name = part.split('"').next().unwrap();
            let (status, headers, _) = gw.get(&format!("/ui/{name}")).await;
            assert_eq!(status, 200, "/ui/{name}");
            assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
        }
    }
    // An unknown file is an OpenAI-shaped 404.
    let (status, _, body) = gw.get("/ui/missing.js").await;
    assert_eq!(status, 404);
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"]["code"], "not_found", "{err}");
}

#[tokio::test]
async fn with_keys_on_the_page_needs_no_key_but_the_api_still_does() {
    let yaml = format!("auth: {{mode: keys}}\n{SIM}");
    let gw = spawn_gateway_env(&yaml, &[("EASEL_ADMIN_TOKEN", "admin-token-for-ui-test")]).await;
    let (status, headers, _) = gw.get("/ui/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(gw.get("/ui/app.js").await.0, 200);
    assert_eq!(gw.get("/v1/models").await.0, 401, "the API behind the page still needs a key");
}

#[tokio::test]
async fn server_ui_false_turns_the_page_off() {
    let gw = spawn_gateway(&format!("server: {{ui: false}}\n{SIM}")).await;
    for path in ["/", "/ui/", "/ui/app.js"] {
        let resp = get_raw(&gw, path).await;
        assert_eq!(resp.status(), 404, "{path}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"), "{path}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{path}: {err}");
        assert_eq!(err["error"]["code"], "not_found", "{path}: {err}");
    }
    // The API is unaffected.
    assert_eq!(gw.get("/v1/models").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_listed_newest_first_with_their_full_messages() {
    let sd = FakeA1111::builder()
        .fail_with(500, json!({"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}))
        .start()
        .await;
    let yaml = format!(
        "backends:\n  sd: {{kind: a1111, url: \"{}\", timeout: 10s}}\nmodels:\n  - {{id: sd15, backends: [sd], upstream_model: \"{CHECKPOINT}\", default_size: 64x64}}\n",
        sd.url
    );
    let gw = spawn_gateway(&yaml).await;
    let status = |gw: &Gateway| {
        let url = gw.endpoint("/v1/gateway/status");
        async move { reqwest::get(url).await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    assert_eq!(status(&gw).await["recent_errors"], json!([]), "none before anything failed");

    // A client error is the client's: not listed.
    let (s, _, _) = gw.post_json("/v1/images/generations", json!({"model": "nope", "prompt": "p"})).await;
    assert_eq!(s, 404);
    assert_eq!(status(&gw).await["recent_errors"], json!([]));

    let mut ids = Vec::new();
    for prompt in ["first", "second"] {
        let (s, headers, body) =
            gw.post_json("/v1/images/generations", json!({"model": "sd15", "prompt": prompt})).await;
        assert_eq!(s, 502, "{body}");
        ids.push((
            headers["x-request-id"].to_str().unwrap().to_owned(),
            body["error"]["message"].as_str().unwrap().to_owned(),
        ));
    }
    let got = status(&gw).await;
    let list = got["recent_errors"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{got}");
    for (row, (id, message)) in list.iter().zip(ids.iter().rev()) {
        assert_eq!(row["request_id"], id.as_str(), "newest first: {got}");
        assert_eq!(row["message"], message.as_str(), "the message the client got: {got}");
        assert!(message.contains("CUDA out of memory. Tried to allocate 2.00 GiB"), "{message}");
        assert_eq!(row["status"], 502);
        assert_eq!(row["method"], "POST");
        assert_eq!(row["route"], "/v1/images/generations");
        assert_eq!(row["model"], "sd15");
        assert_eq!(row["backend"], "sd");
        assert!(row["at_ms"].as_u64().unwrap() > 1_700_000_000_000, "{row}");
    }
}
