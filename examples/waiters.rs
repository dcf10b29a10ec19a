//! The admission-queue benchmark: fills a slow backend's queue with N waiting clients, reads easel's RSS with them
//! waiting, then checks the `Retry-After` of the 429s a full queue answers against when the queue next takes a
//! request. Usage: `waiters URL BODY_JSON N EASEL_PID`. Prints one JSON line: rss_before_kb, rss_waiting_kb,
//! waiting (clients still waiting when RSS was read), retry_after_s (first 429's header), admitted_after_s (time from
//! that 429 until a request was queued instead of refused). The waiting clients are dropped at the end.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

fn rss_kb(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// One request: `Some(retry_after_seconds)` when refused with 429, `None` when it was still waiting at `patience`.
async fn probe(client: &reqwest::Client, url: &str, body: &str, patience: Duration) -> anyhow::Result<Option<f64>> {
    let send = client.post(url).header("content-type", "application/json").body(body.to_owned()).send();
    match tokio::time::timeout(patience, send).await {
        Err(_) => Ok(None),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(r)) if r.status() == 429 => {
            let ra = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            Ok(Some(ra.unwrap_or(-1.0)))
        }
        Ok(Ok(r)) => bail!("expected 429 or a wait, got {}", r.status()),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).context("URL")?.clone();
    let body = args.get(2).context("BODY")?.clone();
    let n: usize = args.get(3).context("N")?.parse()?;
    let pid = args.get(4).context("EASEL_PID")?.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let before = rss_kb(&pid)?;
        // One connection per waiter, as N separate clients would open.
        let client = reqwest::Client::builder().pool_max_idle_per_host(n + 8).timeout(Duration::from_secs(120)).build()?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut waiters = Vec::with_capacity(n);
        let spawn = |waiters: &mut Vec<tokio::task::JoinHandle<()>>| {
            let (client, url, body, done) = (client.clone(), url.clone(), body.clone(), done.clone());
            waiters.push(tokio::spawn(async move {
                let _ = client.post(&url).header("content-type", "application/json").body(body).send().await;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }));
        };
        for _ in 0..n {
            spawn(&mut waiters);
        }
        // The queue is full once a fresh request is refused; wait for that state with a deadline. The backend
        // keeps finishing requests while the waiters connect, so top the queue up until it refuses.
        let deadline = Instant::now() + Duration::from_secs(60);
        let fresh = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let (first_429, retry_after) = loop {
            if let Some(ra) = probe(&fresh, &url, &body, Duration::from_millis(500)).await? {
                break (Instant::now(), ra);
            }
            if Instant::now() > deadline {
                bail!("the queue never filled within 60 s");
            }
            for _ in 0..8 {
                spawn(&mut waiters);
            }
        };
        let waiting_kb = rss_kb(&pid)?;
        let waiting = waiters.len() - done.load(std::sync::atomic::Ordering::Relaxed);
        // Refused until a slot frees and a waiter leaves the queue; the first request that waits marks that moment.
        let admitted_after = loop {
            if probe(&fresh, &url, &body, Duration::from_millis(300)).await?.is_none() {
                break first_429.elapsed().as_secs_f64() - 0.3;
            }
            if Instant::now() > deadline + Duration::from_secs(60) {
                bail!("no slot freed within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for w in &waiters {
            w.abort();
        }
        writeln!(
            std::io::stdout(),
            "{{\"rss_before_kb\":{before},\"rss_waiting_kb\":{waiting_kb},\"waiting\":{waiting},\"retry_after_s\":{retry_after},\"admitted_after_s\":{admitted_after:.3}}}"
        )?;
        anyhow::Ok(())
    })
}
