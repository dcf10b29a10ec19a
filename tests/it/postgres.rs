//! The ledger on a real PostgreSQL (`storage.database: postgres://…`), started by the test: paid generation
//! captured once, a failure released, idempotent replay, 200 concurrent requests against 100 credits, a video job
//! charged once, and two easel instances sharing one database (no overselling across them, and a starting
//! instance releases only the holds of dead instances, never a live one's).
//! The gallery's listing pages the same way on it.

use std::time::{Duration, Instant};

use easel::ledger::postgres::PgStore;
use easel::ledger::{HoldOutcome, Store};
use serde_json::{Value, json};

use crate::support::books::{ADMIN, credits, key, ledger_clean};
use crate::support::postgres::Postgres;
use crate::support::{Gateway, TEST_TIMEOUT, spawn_gateway_env};
use crate::videos::{call, until_done};

const CONFIG: &str = "auth:\n  mode: keys\nbackends:\n  sim:\n    kind: simulated\n    latency: 50ms\n    poll_interval: 20ms\n    concurrency: {images: 256, videos: 8}\n    queue: {depth: 512, wait: 30s}\n  broken:\n    kind: simulated\n    failure: {status: 500}\n  slow:\n    kind: simulated\n    latency: 1500ms\nmodels:\n  - {id: m, backends: [sim], credits: 1, default_size: 16x16}\n  - {id: broken, backends: [broken], credits: 5, default_size: 16x16}\n  - {id: slow, backends: [slow], credits: 1, default_size: 16x16}\n  - {id: clip, type: video, backends: [sim], credits: 30, default_size: 64x36}\n";

async fn gateway(database: &str) -> Gateway {
    spawn_gateway_env(CONFIG, &[("EASEL_ADMIN_TOKEN", ADMIN), ("EASEL_STORAGE__DATABASE", database)]).await
}

async fn generate(
    gw: &Gateway,
    secret: &str,
    body: Value,
    idem: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = gw.client.post(gw.endpoint("/v1/images/generations")).bearer_auth(secret).json(&body);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let resp = tokio::time::timeout(TEST_TIMEOUT, req.send()).await.unwrap().unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn image(model: &str) -> Value {
    json!({"model": model, "prompt": "p", "response_format": "b64_json"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_generation_is_captured_once_failures_refunded_and_keys_replayed() {
    let pg = Postgres::start().await;
    let gw = gateway(&pg.database().await).await;
    let secret = key(&gw, 10.0).await;
    let (s, _, body) = generate(&gw, &secret, image("m"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(credits(&gw, &secret).await, (9_000, 0), "one image, one credit");
    let (s, _, _) = generate(&gw, &secret, image("broken"), None).await;
    assert_eq!(s, 502);
    assert_eq!(credits(&gw, &secret).await, (9_000, 0), "the failure was released");

    let (s, h, first) = generate(&gw, &secret, image("m"), Some("order-1")).await;
    assert_eq!(s, 200, "{first}");
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, again) = generate(&gw, &secret, image("m"), Some("order-1")).await;
    assert_eq!((s, h["idempotent-replayed"].to_str().unwrap()), (200, "true"));
    assert_eq!(first, again, "the stored answer is replayed");
    assert_eq!(credits(&gw, &secret).await, (8_000, 0), "charged once");
    let (s, _, err) = generate(&gw, &secret, json!({"model": "m", "prompt": "other"}), Some("order-1")).await;
    assert_eq!((s, err["error"]["code"].as_str()), (422, Some("idempotency_key_mismatch")));
    // A refunded failure forgets its key: the same key runs again.
    let (s, _, _) = generate(&gw, &secret, image("broken"), Some("order-2")).await;
    assert_eq!(s, 502);
    let (s, _, _) = generate(&gw, &secret, image("broken"), Some("order-2")).await;
    assert_eq!(s, 502, "ran again, not replayed");
    let (s, _, err) = generate(&gw, &secret, json!({"model": "m", "prompt": "p", "n": 9}), None).await;
    assert_eq!((s, err["error"]["code"].as_str()), (402, Some("insufficient_credits")), "{err}");
    assert_eq!(credits(&gw, &secret).await, (8_000, 0));
    ledger_clean(&gw).await;
    let usage: Value =
        gw.client.get(gw.endpoint("/v1/usage")).bearer_auth(&secret).send().await.unwrap().json().await.unwrap();
    let m = usage["data"].as_array().unwrap().iter().find(|r| r["model"] == "m").unwrap().clone();
    assert_eq!((m["images"].as_i64(), m["credits"].as_str()), (Some(2), Some("2")), "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_against_a_hundred_credits_on_postgres() {
    let pg = Postgres::start().await;
    let gw = gateway(&pg.database().await).await;
    let secret = key(&gw, 100.0).await;
    let results = futures_util::future::join_all((0..200).map(|_| generate(&gw, &secret, image("m"), None))).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let poor = results.iter().filter(|r| r.0 == 402).count();
    assert_eq!((ok, poor), (100, 100), "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(credits(&gw, &secret).await, (0, 0));
    ledger_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_job_completes_and_is_charged_once_on_postgres() {
    let pg = Postgres::start().await;
    let gw = gateway(&pg.database().await).await;
    let secret = key(&gw, 100.0).await;
    let body = json!({"model": "clip", "prompt": "a fox", "seconds": "2", "size": "64x36"});
    let (status, v) = call(&gw, reqwest::Method::POST, "/v1/videos", &secret, Some(body)).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(credits(&gw, &secret).await, (70_000, 30_000), "held while it runs");
    let (done, _) = until_done(&gw, &secret, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(credits(&gw, &secret).await, (70_000, 0), "captured once");
    let (s, got) = call(&gw, reqwest::Method::GET, &format!("/v1/videos/{id}"), &secret, None).await;
    assert_eq!((s, got["status"].as_str()), (200, Some("completed")));
    let (s, list) = call(&gw, reqwest::Method::GET, "/v1/videos", &secret, None).await;
    assert_eq!((s, list["data"].as_array().map(Vec::len)), (200, Some(1)), "{list}");
    ledger_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_never_oversell_nor_release_each_other() {
    let pg = Postgres::start().await;
    let database = pg.database().await;
    let a = gateway(&database).await;
    // A request in flight on A while B starts: B's startup recovery must leave A's live hold alone.
    let slow_secret = key(&a, 1.0).await;
    let in_flight = tokio::spawn({
        let (url, client, secret) = (a.endpoint("/v1/images/generations"), a.client.clone(), slow_secret.clone());
        async move { client.post(url).bearer_auth(secret).json(&image("slow")).send().await.map(|r| r.status().as_u16()) }
    });
    let deadline = Instant::now() + TEST_TIMEOUT;
    while credits(&a, &slow_secret).await.1 != 1_000 {
        assert!(Instant::now() < deadline, "the slow request never held its credit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = gateway(&database).await;
    assert_eq!(credits(&b, &slow_secret).await, (0, 1_000), "B's startup left A's hold held");
    assert_eq!(tokio::time::timeout(TEST_TIMEOUT, in_flight).await.unwrap().unwrap().unwrap(), 200);
    // A settles just after its answer is sent; reading through A waits for that, then B sees the same books.
    assert_eq!(credits(&a, &slow_secret).await, (0, 0), "captured by A");
    assert_eq!(credits(&b, &slow_secret).await, (0, 0), "and seen by B");

    let secret = key(&b, 50.0).await;
    let results = futures_util::future::join_all((0..100).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        generate(gw, &secret, image("m"), None)
    }))
    .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let poor = results.iter().filter(|r| r.0 == 402).count();
    assert_eq!((ok, poor), (50, 50), "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    // Each instance's read waits for its own settlements; after both, every answer is settled.
    credits(&a, &secret).await;
    credits(&b, &secret).await;
    assert_eq!(credits(&a, &secret).await, (0, 0));
    ledger_clean(&a).await;
    ledger_clean(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holds_of_a_dead_instance_are_released() {
    let pg = Postgres::start().await;
    let database = pg.database().await;
    let alive = PgStore::open(&database, true).await.unwrap();
    let dying = PgStore::open(&database, true).await.unwrap();
    let new = alive.create_key("shared", 10_000, None, Default::default()).await.unwrap();
    let who = alive.authenticate(&new.secret).await.unwrap().unwrap();
    let price = alive.upsert_price("m", "image", 1_000, 0).await.unwrap();
    assert_eq!(dying.upsert_price("m", "image", 1_000, 0).await.unwrap(), price, "one row for one price");
    let lease = Duration::from_secs(600);
    let HoldOutcome::Held { hold_id: kept } = alive.hold(&who, price, 2, 1_000, lease, None).await.unwrap() else {
        panic!("not held")
    };
    dying.hold(&who, price, 3, 1_000, lease, None).await.unwrap();
    assert_eq!(alive.reap_expired().await.unwrap(), 0, "both instances live: nothing released");
    assert_eq!(alive.balance(who.account_id).await.unwrap().held_mc, 5_000);

    // The dying instance stops heartbeating and its lease lapses (set directly rather than waited for).
    let dead = dying.instance().unwrap().to_owned();
    drop(dying);
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    sqlx::query("UPDATE instances SET lease_until = 0 WHERE id = $1").bind(&dead).execute(&pool).await.unwrap();
    let restarted = PgStore::open(&database, true).await.unwrap();
    assert_eq!(restarted.recover().await.unwrap(), 1, "only the dead instance's hold");
    let b = alive.balance(who.account_id).await.unwrap();
    assert_eq!((b.available_mc, b.held_mc), (8_000, 2_000), "the live instance's hold is still held");
    alive.capture(&kept, 2, None, &easel::ledger::Made::default()).await.unwrap();
    let b = alive.balance(who.account_id).await.unwrap();
    assert_eq!((b.available_mc, b.held_mc, b.captured_mc), (8_000, 0, 2_000));
    assert!(alive.check().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_own_limits_round_trip_through_postgres() {
    use easel::ledger::{KeyLimitsChange, KeyOverrides, Limit};
    let pg = Postgres::start().await;
    let store = PgStore::open(&pg.database().await, true).await.unwrap();
    let own = KeyOverrides { requests_per_minute: Limit::Max(7), max_parallel: Limit::Unlimited };
    let new = store.create_key("limited", 0, None, own).await.unwrap();
    assert_eq!(new.info.limits, own);
    assert_eq!(store.authenticate(&new.secret).await.unwrap().unwrap().limits, own, "carried on the principal");
    let change = KeyLimitsChange { requests_per_minute: None, max_parallel: Some(Limit::Max(2)) };
    let info = store.set_key_limits("limited", change).await.unwrap();
    let now = KeyOverrides { requests_per_minute: Limit::Max(7), max_parallel: Limit::Max(2) };
    assert_eq!(info.limits, now);
    let listed = store.list_keys().await.unwrap();
    assert_eq!(listed.iter().find(|k| k.name == "limited").unwrap().limits, now);
    let back = KeyLimitsChange { requests_per_minute: Some(Limit::Default), max_parallel: Some(Limit::Default) };
    store.set_key_limits(&new.info.id.to_string(), back).await.unwrap();
    assert_eq!(store.authenticate(&new.secret).await.unwrap().unwrap().limits, KeyOverrides::default());
    assert!(matches!(store.set_key_limits("nobody", back).await, Err(easel::ledger::LedgerError::UnknownKey(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gallery_lists_each_keys_outputs_and_pages_on_postgres() {
    let pg = Postgres::start().await;
    let gw = gateway(&pg.database().await).await;
    let (alice, bob) = (key(&gw, 10.0).await, key(&gw, 10.0).await);
    let mut made = Vec::new();
    for (who, prompt) in [(&alice, "a0"), (&bob, "b0"), (&alice, "a1"), (&alice, "a2")] {
        let body = json!({"model": "m", "prompt": prompt, "response_format": "url"});
        let (status, _, v) = generate(&gw, who, body, None).await;
        assert_eq!(status, 200, "{v}");
        made.push(
            v["data"][0]["url"]
                .as_str()
                .unwrap()
                .split("/v1/files/")
                .nth(1)
                .unwrap()
                .split('?')
                .next()
                .unwrap()
                .to_owned(),
        );
    }
    let page = |q: &'static str, who: String| {
        let gw = &gw;
        async move { call(gw, reqwest::Method::GET, &format!("/v1/files{q}"), &who, None).await }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["data"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect()
    };
    let (s, first) = page("?limit=2", alice.clone()).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(ids(&first), [made[3].clone(), made[2].clone()]);
    assert_eq!(first["has_more"], true);
    assert_eq!(first["data"][0]["request"]["prompt"], "a2");
    let after = format!("/v1/files?limit=2&after={}", made[2]);
    let (_, rest) = call(&gw, reqwest::Method::GET, &after, &alice, None).await;
    assert_eq!((ids(&rest), rest["has_more"].as_bool()), (vec![made[0].clone()], Some(false)));
    let (_, bobs) = page("", bob.clone()).await;
    assert_eq!(ids(&bobs), [made[1].clone()]);
}
