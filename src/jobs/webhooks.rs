//! Client webhooks: checking a job's `webhook_url`, the event a job's end writes into the outbox (in the ledger's
//! terminal transaction), and the deliverer that leases due outbox rows, POSTs them signed the Standard Webhooks
//! way (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`), and retries with backoff.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use metrics::counter;
use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use crate::config::WebhooksConfig;
use crate::ledger::{JobRecord, OutboxRow, Store, WebhookOutcome};
use crate::request::RequestError;
use crate::state::AppState;

/// Deliveries by outcome: `delivered`, `retry`, `gave_up`.
pub const WEBHOOKS: &str = "easel_webhooks_total";
/// The longest `webhook_url` accepted.
pub const MAX_URL_LEN: usize = 2048;
/// How long a leased delivery is this instance's (longer than any attempt may take).
const LEASE: Duration = Duration::from_secs(120);
/// Deliveries leased per round.
const BATCH: u32 = 16;
/// Wait between rounds.
const IDLE: Duration = Duration::from_millis(250);
/// The most of a receiver's answer that is read (and then dropped).
const MAX_ANSWER: usize = 4096;
/// Where a generated signing secret is kept, inside the files directory.
const SECRET_FILE: &str = ".webhook-secret";

/// Checks a client's webhook target: an absolute http(s) URL of at most 2048 characters, without userinfo, and
/// (unless `allow_private`) not naming a loopback, link-local, private or otherwise internal address.
pub fn parse_target(raw: &str, allow_private: bool) -> Result<Url, RequestError> {
    let bad = |why: String| RequestError::param("webhook_url", why);
    if raw.len() > MAX_URL_LEN {
        return Err(bad(format!("`webhook_url` is {} characters long; at most {MAX_URL_LEN} are allowed", raw.len())));
    }
    let url = Url::parse(raw.trim())
        .map_err(|e| bad(format!("`webhook_url` must be an absolute http(s) URL, and `{raw}` is not one: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("`webhook_url` must use http or https, not `{}`", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("`webhook_url` must not carry a user name or password".into()));
    }
    let internal = match url.host() {
        None => return Err(bad("`webhook_url` names no host".into())),
        Some(Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(Host::Ipv4(ip)) => internal_ip(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => internal_ip(IpAddr::V6(ip)),
    };
    if internal && !allow_private {
        return Err(bad(format!(
            "`webhook_url` points at a loopback, link-local or private address (`{}`); these are refused unless \
             `jobs.webhooks.allow_private` is set",
            url.host_str().unwrap_or_default()
        )));
    }
    Ok(url)
}

/// Whether an address is not on the public internet (loopback, private, link-local, CGNAT, unspecified, …).
fn internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::LOCALHOST
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

/// The event a terminal job sends: its id (`evt_…`) and the exact JSON body, `{"type", "id", "created_at",
/// "data"}` with `data` the public job object. `now` is Unix milliseconds.
pub fn event(job: &JobRecord, now: i64) -> (String, String) {
    let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let outcome = if job.state == "succeeded" { "completed" } else { "failed" };
    let (kind, data) = if job.object == "video" {
        (format!("video.{outcome}"), serde_json::to_value(crate::api::videos::video(job)).unwrap_or_default())
    } else {
        (format!("job.{outcome}"), crate::api::jobs::job_object(job, serde_json::Value::Null))
    };
    let body = serde_json::json!({"type": kind, "id": id, "created_at": now / 1000, "data": data});
    (id, body.to_string())
}

/// Signs deliveries with the configured or generated secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    /// A secret of the form `whsec_<base64>` (as Standard Webhooks libraries take it) signs with the decoded bytes;
    /// any other secret signs with its bytes as written.
    pub fn new(secret: &str) -> Self {
        let key: Vec<u8> =
            secret.strip_prefix("whsec_").and_then(|b| B64.decode(b).ok()).unwrap_or_else(|| secret.into());
        Self { key: crate::storage::signing::hmac_key(&key) }
    }

    /// The configured secret, or the one generated into `dir` on first use (`whsec_` + 32 random bytes, 0600).
    pub async fn load(secret: Option<&str>, dir: &Path) -> std::io::Result<Self> {
        if let Some(s) = secret {
            return Ok(Self::new(s));
        }
        let fresh = || format!("whsec_{}", B64.encode(rand::random::<[u8; 32]>()));
        let path = dir.join(SECRET_FILE);
        let secret = crate::storage::signing::stored_secret(&path, |s| s.starts_with("whsec_"), fresh).await?;
        Ok(Self::new(&secret))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &str) -> String {
        let ts = timestamp.to_string();
        let mac =
            crate::storage::signing::hmac(&self.key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body.as_bytes()]);
        format!("v1,{}", B64.encode(mac))
    }
}

/// The delay before the attempt after `failed` failed ones: 1, 6, 24, 120, then 720 times the base.
pub fn backoff(base: Duration, failed: i64) -> Duration {
    let factor = match failed {
        ..=1 => 1,
        2 => 6,
        3 => 24,
        4 => 120,
        _ => 720,
    };
    base.saturating_mul(factor)
}

/// Runs until `stop`: lease due deliveries, attempt each, record the outcome.
pub async fn run(state: AppState, stop: CancellationToken) {
    let cfg = state.config.jobs.webhooks.clone();
    let secret = cfg.secret.as_ref().map(|s| s.expose());
    let signer = match Signer::load(secret, state.files.root()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot load or create the webhook signing secret; webhooks stay queued.");
            return;
        }
    };
    let owner = format!("easel-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let client = match client(&cfg, None) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot build the webhook HTTP client; webhooks stay queued.");
            return;
        }
    };
    loop {
        match state.ledger.claim_webhooks(&owner, LEASE, BATCH).await {
            Ok(rows) => {
                let rounds = rows.into_iter().map(|row| attempt(&state, &cfg, &client, &signer, &owner, row));
                // Shutdown does not wait for slow receivers: an abandoned attempt is due again after a restart.
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = futures_util::future::join_all(rounds) => {}
                }
            }
            Err(e) => tracing::error!(error = %e, "Claiming due webhooks failed."),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// An HTTP client for deliveries: no redirects, the attempt timeout, and (when given) its host's addresses pinned
/// to the ones that were checked.
fn client(cfg: &WebhooksConfig, pin: Option<(&str, &[SocketAddr])>) -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .user_agent(concat!("easel-webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some((host, addrs)) = pin {
        b = b.resolve_to_addrs(host, addrs);
    }
    b.build()
}

/// One delivery attempt and its bookkeeping.
async fn attempt(
    state: &AppState,
    cfg: &WebhooksConfig,
    shared: &reqwest::Client,
    signer: &Signer,
    owner: &str,
    row: OutboxRow,
) {
    let result = send(cfg, shared, signer, &row).await;
    let failed = row.attempts + 1;
    let outcome = match result {
        Ok(()) => WebhookOutcome::Delivered,
        Err(error) if failed >= i64::from(cfg.max_attempts) => WebhookOutcome::GaveUp { error },
        Err(error) => {
            let at = crate::ledger::now_ms() + backoff(cfg.backoff, failed).as_millis() as i64;
            WebhookOutcome::Retry { at, error }
        }
    };
    let label = match &outcome {
        WebhookOutcome::Delivered => {
            tracing::info!(job = %row.job_id, event = %row.id, attempt = failed, "Webhook delivered.");
            "delivered"
        }
        WebhookOutcome::Retry { error, .. } => {
            tracing::warn!(job = %row.job_id, event = %row.id, attempt = failed, error = %error,
                "Webhook delivery failed; retrying later.");
            "retry"
        }
        WebhookOutcome::GaveUp { error } => {
            tracing::error!(job = %row.job_id, event = %row.id, attempt = failed, error = %error,
                "Webhook delivery failed for the last time; giving up.");
            "gave_up"
        }
    };
    counter!(WEBHOOKS, "outcome" => label).increment(1);
    match state.ledger.settle_webhook(&row.id, owner, &outcome).await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(event = %row.id, "Another deliverer holds this webhook now."),
        Err(e) => tracing::error!(event = %row.id, error = %e, "Recording a webhook attempt failed."),
    }
}

/// POSTs the event; `Ok` on a 2xx answer.
async fn send(cfg: &WebhooksConfig, shared: &reqwest::Client, signer: &Signer, row: &OutboxRow) -> Result<(), String> {
    // Checked again at send time: the configuration may have changed, and a name may resolve to an internal address.
    let url = parse_target(&row.url, cfg.allow_private).map_err(|e| e.to_string())?;
    let pinned;
    let client = if cfg.allow_private {
        shared
    } else {
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .collect();
        if let Some(bad) = addrs.iter().find(|a| internal_ip(a.ip())) {
            return Err(format!("`{host}` resolves to the internal address {}", bad.ip()));
        }
        pinned = client(cfg, Some((&host, &addrs))).map_err(|e| e.to_string())?;
        &pinned
    };
    let timestamp = crate::ledger::now_ms() / 1000;
    let answer = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &row.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signer.signature(&row.id, timestamp, &row.payload))
        .body(row.payload.clone())
        .send()
        .await
        .map_err(|e| format!("the request failed: {e}"))?;
    let status = answer.status();
    drain(answer).await;
    if status.is_success() { Ok(()) } else { Err(format!("the receiver answered HTTP {}", status.as_u16())) }
}

/// Reads at most a few KB of an answer, so the connection can be reused; the content is ignored.
async fn drain(mut answer: reqwest::Response) {
    let mut read = 0;
    while read < MAX_ANSWER {
        match answer.chunk().await {
            Ok(Some(c)) => read += c.len(),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked() {
        assert!(parse_target("https://hooks.example.com/easel?x=1", false).is_ok());
        assert!(parse_target("http://127.0.0.1:9/x", true).is_ok());
        for bad in [
            "ftp://example.com/",
            "/relative",
            "https://user:pw@example.com/",
            "http://127.0.0.1/",
            "http://localhost:8080/",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:192.168.0.1]/",
        ] {
            let e = parse_target(bad, false).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("webhook_url"), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(parse_target(&long, true).is_err());
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let s = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            s.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn backoff_grows() {
        let b = Duration::from_secs(5);
        let d: Vec<u64> = (1..=7).map(|n| backoff(b, n).as_secs()).collect();
        assert_eq!(d, [5, 30, 120, 600, 3600, 3600, 3600]);
    }
}
