//! The web page: `/ui/` served from the binary with its media types and cache rule, `/` redirecting there, every
//! asset the page names loading, no key needed for the page itself with keys on, and `server.ui: false` removing it.

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
