//! The job-events benchmark: submits N video jobs to a simulated backend, watches each through
//! `GET /v1/jobs/{id}/events` while a second client polls `GET /v1/videos/{id}` every 5 ms, and compares when the
//! stream says `completed` with when the job first reads as completed (the event's added latency). Usage:
//! `job_events BASE_URL MODEL N`. Prints one JSON line: jobs, events, events_per_s (events relayed per second of
//! stream time, all streams together), lag_p50_ms / lag_max_ms (completed event minus first completed poll).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;

async fn one(client: reqwest::Client, base: String, model: String) -> anyhow::Result<(u64, Duration, f64)> {
    let created: serde_json::Value = client
        .post(format!("{base}/v1/videos"))
        .json(&serde_json::json!({"model": model, "prompt": "bench", "seconds": "4"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_str().context("no job id")?.to_owned();
    let poller = {
        let (client, url) = (client.clone(), format!("{base}/v1/videos/{id}"));
        tokio::spawn(async move {
            loop {
                let v: serde_json::Value = client.get(&url).send().await?.json().await?;
                if v["status"] == "completed" || v["status"] == "failed" {
                    return anyhow::Ok(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let mut stream = client.get(format!("{base}/v1/jobs/{id}/events")).send().await?.error_for_status()?.bytes_stream();
    let (mut events, mut buf) = (0u64, Vec::new());
    let completed_at = 'read: loop {
        let Some(chunk) = stream.next().await else { bail!("events ended before completed") };
        buf.extend_from_slice(&chunk?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            events += 1;
            if event.windows(16).any(|w| w == b"event: completed") || event.windows(13).any(|w| w == b"event: failed") {
                break 'read Instant::now();
            }
        }
    };
    let polled = poller.await??;
    let lag_ms = if completed_at >= polled {
        (completed_at - polled).as_secs_f64() * 1000.0
    } else {
        -((polled - completed_at).as_secs_f64() * 1000.0)
    };
    Ok((events, completed_at - started, lag_ms))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = args.get(1).context("BASE_URL")?.clone();
    let model = args.get(2).context("MODEL")?.clone();
    let n: usize = args.get(3).context("N")?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(one(client.clone(), base.clone(), model.clone()))).collect();
        let (mut events, mut stream_time, mut lags) = (0u64, 0.0, Vec::new());
        for t in tasks {
            let (e, d, lag) = t.await??;
            events += e;
            stream_time += d.as_secs_f64();
            lags.push(lag);
        }
        lags.sort_by(f64::total_cmp);
        let p50 = lags.get(lags.len() / 2).copied().unwrap_or(0.0);
        let max = lags.last().copied().unwrap_or(0.0);
        writeln!(
            std::io::stdout(),
            "{{\"jobs\":{n},\"events\":{events},\"events_per_s\":{:.1},\"lag_p50_ms\":{p50:.2},\"lag_max_ms\":{max:.2}}}",
            events as f64 / (stream_time / n as f64)
        )?;
        anyhow::Ok(())
    })
}
