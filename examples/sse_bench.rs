//! The streaming benchmark's client: posts streamed chat completions and reads their SSE bodies.
//! Usage: `sse_bench URL MODEL ttft REQUESTS` — REQUESTS one after another, each 4 chunks long; prints the time
//! from sending to the first `data:` event (p50, p99, ms). `sse_bench URL MODEL throughput REQUESTS CHUNKS
//! CONCURRENCY` — REQUESTS streams of CHUNKS chunks, CONCURRENCY at a time; prints the `data:` events received per
//! second. Every request has a 60 s limit; one that fails counts as an error, one that carries fewer chunks than
//! asked as `short`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

const LIMIT: Duration = Duration::from_secs(60);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn body(model: &str, chunks: u64) -> String {
    format!(
        "{{\"model\":\"{model}\",\"stream\":true,\"max_tokens\":{chunks},\"messages\":[{{\"role\":\"user\",\"content\":\"bench\"}}]}}"
    )
}

/// One streamed request: the time to its first `data:` event and the `data:` events it carried.
async fn one(client: &reqwest::Client, url: &str, body: String) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let resp = client.post(url).header("content-type", "application/json").body(body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut stream = resp.bytes_stream();
    let (mut first, mut events) = (None, 0u64);
    // `data:` may be split across reads: keep the last 4 bytes of each read.
    let mut tail: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        tail.extend_from_slice(&chunk);
        let found = tail.windows(5).filter(|w| w == b"data:").count() as u64;
        if found > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        events += found;
        let keep = tail.len().min(4);
        tail.drain(..tail.len() - keep);
    }
    Ok((first.context("no event")?, events))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).context("URL")?.clone();
    let model = args.get(2).context("MODEL")?.clone();
    let mode = args.get(3).context("MODE")?.clone();
    let requests: u64 = args.get(4).context("REQUESTS")?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let line = rt.block_on(async move {
        let client = reqwest::Client::builder().timeout(LIMIT).build()?;
        if mode == "ttft" {
            // A few unmeasured requests first: connections open, caches warm.
            for _ in 0..5 {
                let _ = one(&client, &url, body(&model, 4)).await;
            }
            let (mut ttft, mut errors) = (Vec::new(), 0u64);
            for _ in 0..requests {
                match one(&client, &url, body(&model, 4)).await {
                    Ok((t, n)) if n >= 4 => ttft.push(t.as_secs_f64() * 1000.0),
                    _ => errors += 1,
                }
            }
            ttft.sort_by(f64::total_cmp);
            return anyhow::Ok(format!(
                "{{\"requests\":{},\"errors\":{errors},\"ttft_p50_ms\":{:.3},\"ttft_p99_ms\":{:.3}}}",
                ttft.len(),
                percentile(&ttft, 0.5),
                percentile(&ttft, 0.99)
            ));
        }
        let chunks: u64 = args.get(5).context("CHUNKS")?.parse()?;
        let concurrency: u64 = args.get(6).context("CONCURRENCY")?.parse()?;
        let _ = one(&client, &url, body(&model, chunks)).await;
        let started = Instant::now();
        let results = futures_util::stream::iter(0..requests)
            .map(|_| one(&client, &url, body(&model, chunks)))
            .buffer_unordered(concurrency as usize)
            .collect::<Vec<_>>()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        // Every relayed event counts; a stream that carried fewer than asked (a relay that merges or drops chunks)
        // is reported as `short`, one that failed as an error.
        let (mut events, mut errors, mut short) = (0u64, 0u64, 0u64);
        for r in results {
            match r {
                Ok((_, n)) => {
                    events += n;
                    short += u64::from(n < chunks);
                }
                Err(_) => errors += 1,
            }
        }
        anyhow::Ok(format!(
            "{{\"requests\":{requests},\"errors\":{errors},\"short\":{short},\"events\":{events},\"seconds\":{elapsed:.3},\"chunks_per_s\":{:.0}}}",
            events as f64 / elapsed
        ))
    })?;
    writeln!(std::io::stdout(), "{line}")?;
    Ok(())
}
