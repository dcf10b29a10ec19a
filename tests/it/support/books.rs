//! Keys-mode helpers shared by the suites that check the books: the admin token, a fresh key with credits, a
//! key's balance, and the ledger's invariant check.

use serde_json::{Value, json};

use super::Gateway;

/// The admin token the keys-mode gateways of these suites start with (`EASEL_ADMIN_TOKEN`).
pub const ADMIN: &str = "admin-secret";

/// Creates a key with `credits` through the admin API and returns its secret.
pub async fn key(gw: &Gateway, credits: f64) -> String {
    key_at_for(&gw.url, credits, None).await
}

/// (available, held) millicredits of a key, as `/v1/me` reports them.
pub async fn credits(gw: &Gateway, secret: &str) -> (i64, i64) {
    credits_at(&gw.url, secret).await
}

/// [`credits`] on the easel at `url` (a binary started with `start_binary`).
pub async fn credits_at(url: &str, secret: &str) -> (i64, i64) {
    let me: Value = reqwest::Client::new()
        .get(format!("{url}/v1/me"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let field = |f: &str| me["credits"][f].as_i64().unwrap_or_else(|| panic!("no credits.{f} in {me}"));
    (field("available_mc"), field("held_mc"))
}

/// Fails the test if the ledger's invariants do not hold.
pub async fn ledger_clean(gw: &Gateway) {
    ledger_clean_at(&gw.url).await;
}

/// [`ledger_clean`] on the easel at `url`.
pub async fn ledger_clean_at(url: &str) {
    let resp =
        reqwest::Client::new().get(format!("{url}/v1/admin/ledger/check")).bearer_auth(ADMIN).send().await.unwrap();
    let status = resp.status();
    assert_eq!(status, 200, "ledger drift: {}", resp.text().await.unwrap());
}

/// Creates a key with `credits` on an easel started as a binary at `url` (see `start_binary`); returns its secret.
pub async fn key_at(url: &str, credits: f64) -> String {
    key_at_for(url, credits, None).await
}

/// Creates a key with `credits`, limited to `models` when given, on the easel at `url`; returns its secret.
pub async fn key_at_for(url: &str, credits: f64, models: Option<&[&str]>) -> String {
    let mut body = json!({"name": format!("k{}", rand::random::<u32>()), "credits": credits});
    if let Some(m) = models {
        body["models"] = json!(m);
    }
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_owned()
}
