//! A closed-loop HTTP load generator for the benchmarks: C workers each send the same POST back to back for a
//! fixed time and record latencies. Usage: `loadgen URL BODY CONCURRENCY SECONDS [WARMUP_SECONDS]`, where BODY is
//! JSON, `@FILE` (sent as is, with the content type in `LOADGEN_CONTENT_TYPE`), or `GET` (a GET, no body).
//! Prints one JSON line: requests, errors, req/s, p50/p99 in ms, response bytes per second (the bytes that arrived
//! inside the measured window, over its length).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).context("URL")?.clone();
    let body_arg = args.get(2).context("BODY")?.clone();
    let get = body_arg == "GET";
    let body = match body_arg.strip_prefix('@') {
        Some(path) => bytes::Bytes::from(std::fs::read(path).with_context(|| format!("reading {path}"))?),
        None => bytes::Bytes::from(body_arg.into_bytes()),
    };
    let content_type = std::env::var("LOADGEN_CONTENT_TYPE").unwrap_or_else(|_| "application/json".into());
    let concurrency: usize = args.get(3).context("CONCURRENCY")?.parse()?;
    let seconds: f64 = args.get(4).context("SECONDS")?.parse()?;
    let warmup: f64 = args.get(5).map_or(Ok(1.0), |s| s.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (lat, errors, elapsed, bytes) = rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
        let warm_end = Instant::now() + Duration::from_secs_f64(warmup);
        let end = warm_end + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, body, ct) = (client.clone(), url.clone(), body.clone(), content_type.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut bytes = 0u64;
                while Instant::now() < end {
                    let started = Instant::now();
                    let request = if get {
                        client.get(&url)
                    } else {
                        client.post(&url).header("content-type", ct.as_str()).body(body.clone())
                    };
                    let ok = match request.send().await {
                        Ok(mut r) if r.status().is_success() => loop {
                            // Bytes count when they arrive inside the measured window, so a long download
                            // that straddles its edges counts only its share.
                            match r.chunk().await {
                                Ok(Some(b)) => {
                                    let now = Instant::now();
                                    if now >= warm_end && now < end {
                                        bytes += b.len() as u64;
                                    }
                                }
                                Ok(None) => break true,
                                Err(_) => break false,
                            }
                        },
                        _ => false,
                    };
                    if started >= warm_end {
                        if ok {
                            lat.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
                (lat, errors, bytes)
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        let mut bytes = 0;
        for t in tasks {
            let (l, e, b) = t.await?;
            all.extend(l);
            errors += e;
            bytes += b;
        }
        anyhow::Ok((all, errors, seconds, bytes))
    })?;
    let mut lat = lat;
    lat.sort_unstable();
    let line = format!(
        "{{\"requests\":{},\"errors\":{},\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"bytes_per_s\":{:.0}}}",
        lat.len(),
        errors,
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        bytes as f64 / elapsed
    );
    writeln!(std::io::stdout(), "{line}")?;
    Ok(())
}
