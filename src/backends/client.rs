//! The HTTP plumbing every adapter shares: per backend, an API client (its headers and key, redirects only within
//! its origin) and a download client (no default headers, the outbound policy on every hop and every DNS answer);
//! sending with failure classification, size-capped body reads and output downloads. Adapters build requests; this
//! sends them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response};
use url::Url;

use super::error::{BackendError, Failure, estimated_time, upstream_message};
use super::outbound::{GuardedResolver, Policy, refusal};
use crate::config::BackendConfig;

/// Largest error body read to find the upstream's message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A backend's HTTP client and the config it was built from.
#[derive(Debug, Clone)]
pub struct Http {
    /// For the backend's own API: default headers, redirects only within its origin.
    client: reqwest::Client,
    /// For URLs the backend handed back: no default headers, every hop and DNS answer checked.
    download: reqwest::Client,
    policy: Arc<Policy>,
    pub cfg: Arc<BackendConfig>,
}

impl Http {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            headers.insert(k.clone(), v.clone());
        }
        let policy = Arc::new(Policy::new(&cfg));
        let builder = || {
            reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.connect_timeout)
                .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(Duration::from_secs(60))
        };
        let built = |r: reqwest::Result<reqwest::Client>| {
            r.map_err(|e| format!("cannot build the HTTP client for backend `{}`: {e}", cfg.name))
        };
        let client = built(builder().default_headers(headers).redirect(policy.api_redirects()).build())?;
        let download = built(builder().redirect(policy.redirects()).dns_resolver(GuardedResolver).build())?;
        Ok(Self { client, download, policy, cfg })
    }

    /// A request to `path` under the backend's root.
    pub fn request(&self, method: Method, path: &str) -> (RequestBuilder, String) {
        let url = self.cfg.endpoint(path);
        let rb = match self.cfg.endpoint_url(path) {
            Some(parsed) => self.client.request(method, parsed),
            None => self.client.request(method, &url),
        };
        (rb, url)
    }

    /// A request to an absolute URL the backend handed back (a job's status URL). On the backend's own origin it
    /// goes like any API call; elsewhere it carries none of the backend's headers or key (see `send`) and is held
    /// to the outbound policy.
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        match Url::parse(url) {
            Ok(u) if self.policy.is_own_origin(&u) => self.client.request(method, u),
            _ => self.download.request(method, url),
        }
    }

    /// Adds `Authorization: Bearer <api_key>` when the backend has a key.
    pub fn bearer(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.cfg.api_key {
            Some(k) => rb.bearer_auth(k.expose()),
            None => rb,
        }
    }

    /// An error for this backend.
    pub fn error(&self, url: &str, failure: Failure) -> BackendError {
        BackendError::new(&self.cfg.name, self.cfg.kind, url, failure)
    }

    /// Sends and returns a success response; connection failures, timeouts and error statuses become
    /// `BackendError`s carrying the upstream's own message.
    pub async fn send(&self, rb: RequestBuilder, url: &str) -> Result<Response, BackendError> {
        let (client, req) = rb.build_split();
        let mut req = req.map_err(|e| self.error(url, self.failure(&e)))?;
        if self.policy.is_own_origin(req.url()) {
            request_headers(req.headers_mut());
        } else {
            // A URL the backend handed back, on another host: the policy decides, and no secret goes along.
            self.policy.check(req.url()).map_err(|r| self.error(url, Failure::InvalidResponse(r.0)))?;
            let headers = req.headers_mut();
            headers.remove(AUTHORIZATION);
            for (k, _) in &self.cfg.headers {
                headers.remove(k);
            }
        }
        let resp = client.execute(req).await.map_err(|e| self.error(url, self.failure(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .or_else(|| if status == 429 { ratelimit_reset(resp.headers()) } else { None });
        let body = self.read_capped(resp, url, MAX_ERROR_BODY).await.unwrap_or_default();
        // Hugging Face says how long a cold model needs in the body instead of a header.
        let retry_after = retry_after.or_else(|| estimated_time(&body));
        Err(self.error(url, Failure::Status { status, message: upstream_message(&body), hint: None, retry_after }))
    }

    /// Reads a whole success body, at most the backend's `max_response`.
    pub async fn body(&self, resp: Response, url: &str) -> Result<Bytes, BackendError> {
        self.read_capped(resp, url, self.cfg.max_response_bytes).await
    }

    /// Reads a JSON success body.
    pub async fn json<T: serde::de::DeserializeOwned>(&self, resp: Response, url: &str) -> Result<T, BackendError> {
        let body = self.body(resp, url).await?;
        serde_json::from_slice(&body).map_err(|e| {
            self.error(url, Failure::InvalidResponse(format!("the JSON body does not match the protocol: {e}")))
        })
    }

    /// Downloads an output the backend pointed to, capped and within the backend's timeout, under the outbound
    /// policy: same origin as the backend or `allow_output_hosts` (plus the kind's own CDN), never link-local,
    /// every redirect hop re-checked. The backend's headers go only to its own origin. What comes back is never
    /// echoed: an error status or a body that is not an image is reported by content type and size.
    pub async fn download(&self, url: &str) -> Result<(Bytes, Option<String>), BackendError> {
        self.download_checked(url, |b| crate::media::sniff(b).map(|f| f.mime()), "a PNG, JPEG or WebP image")
            .await
            .map(|(bytes, _, content_type)| (bytes, content_type))
    }

    /// Like [`Http::download`], for outputs that are not images (a job's video): `sniff` names the media type
    /// from the bytes, and a body it does not recognize is refused as not being `what`.
    pub async fn download_as(
        &self,
        url: &str,
        sniff: fn(&[u8]) -> Option<&'static str>,
        what: &str,
    ) -> Result<(Bytes, &'static str), BackendError> {
        self.download_checked(url, sniff, what).await.map(|(bytes, mime, _)| (bytes, mime))
    }

    async fn download_checked(
        &self,
        url: &str,
        sniff: impl Fn(&[u8]) -> Option<&'static str>,
        what: &str,
    ) -> Result<(Bytes, &'static str, Option<String>), BackendError> {
        let refused = |detail: String| self.error(url, Failure::InvalidResponse(detail));
        let parsed = Url::parse(url).map_err(|e| refused(format!("the output URL is not a URL: {e}")))?;
        self.policy.check(&parsed).map_err(|r| refused(r.0))?;
        let mut rb = self.download.get(parsed.clone());
        if self.policy.is_own_origin(&parsed) {
            for (k, v) in &self.cfg.headers {
                rb = rb.header(k.clone(), v.clone());
            }
            let mut ids = HeaderMap::new();
            request_headers(&mut ids);
            rb = rb.headers(ids);
        }
        let resp = rb.send().await.map_err(|e| self.error(url, self.failure(&e)))?;
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let shown_type = content_type.clone().unwrap_or_else(|| "none".into());
        if !status.is_success() {
            let size = match self.read_capped(resp, url, MAX_ERROR_BODY).await {
                Ok(b) => format!("{} bytes", b.len()),
                Err(_) => format!("more than {MAX_ERROR_BODY} bytes"),
            };
            let message = format!("the download failed (body not shown: Content-Type {shown_type}, {size})");
            return Err(self.error(
                url,
                Failure::Status {
                    status: status.as_u16(),
                    message,
                    hint: Some("it is an output URL the backend returned; check that it is still valid".into()),
                    retry_after: None,
                },
            ));
        }
        let body = self.body(resp, url).await?;
        let Some(mime) = sniff(&body) else {
            return Err(refused(format!(
                "the output is not {what} (Content-Type {shown_type}, {} bytes; not shown)",
                body.len()
            )));
        };
        Ok((body, mime, content_type))
    }

    /// A reqwest error as a failure: a policy refusal (redirect hop, DNS answer) is the backend's bad answer, not
    /// a connection problem.
    fn failure(&self, e: &reqwest::Error) -> Failure {
        match refusal(e) {
            Some(r) => Failure::InvalidResponse(r.0),
            None => transport_failure(e, self.cfg.timeout),
        }
    }

    async fn read_capped(&self, mut resp: Response, url: &str, cap: usize) -> Result<Bytes, BackendError> {
        if let Some(len) = resp.content_length()
            && len as usize > cap
        {
            return Err(self.error(
                url,
                Failure::InvalidResponse(format!(
                    "the body is {len} bytes, more than the {cap}-byte limit (`max_response`)"
                )),
            ));
        }
        let mut buf = BytesMut::with_capacity(resp.content_length().map_or(8192, |l| l as usize));
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > cap {
                        return Err(self.error(
                            url,
                            Failure::InvalidResponse(format!(
                                "the body is more than the {cap}-byte limit (`max_response`)"
                            )),
                        ));
                    }
                    if buf.is_empty() && resp.content_length().is_some_and(|l| l as usize == chunk.len()) {
                        // The whole body in one chunk: keep it without copying.
                        return Ok(chunk);
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(buf.freeze()),
                Err(e) => return Err(self.error(url, self.failure(&e))),
            }
        }
    }
}

/// Adds the current request's `X-Request-Id` and (when the client sent a valid one) `traceparent`, so a
/// backend's logs can be matched with easel's. Called only for the backend's own origin: the ids are the
/// client's and stay between easel and its backends.
fn request_headers(headers: &mut HeaderMap) {
    let Some(ctx) = crate::telemetry::context::current() else { return };
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&ctx.id) {
        headers.insert("x-request-id", v);
    }
    if let Some(t) = ctx.traceparent.as_deref()
        && let Ok(v) = reqwest::header::HeaderValue::from_str(t)
    {
        headers.insert("traceparent", v);
    }
}

/// Classifies a reqwest error: timeout, connection failure, or something broken mid-response.
pub fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    // A connect failure first: a connect timeout is a timeout too, but it sent nothing.
    if e.is_connect() {
        Failure::Connect(root_cause(e))
    } else if e.is_timeout() {
        Failure::Timeout(timeout)
    } else if e.is_decode() || e.is_body() {
        Failure::InvalidResponse(root_cause(e))
    } else if e.is_builder() || e.is_redirect() {
        // Nothing was sent on this connection.
        Failure::Connect(root_cause(e))
    } else {
        // Connected, then the exchange broke (reset, closed before a complete answer).
        Failure::Disconnected(root_cause(e))
    }
}

/// The innermost error message (e.g. "Connection refused (os error 111)").
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// When a 429 without `Retry-After` may be retried, from the IETF `RateLimit` header (Hugging Face:
/// `"api";r=0;t=55`, `t=` being the seconds until the quota resets), else the window of `RateLimit-Policy`
/// (`"fixed window";"api";q=500;w=300`, `w=` seconds), which bounds it.
pub(crate) fn ratelimit_reset(headers: &HeaderMap) -> Option<Duration> {
    let param = |name: &str, key: &str| {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
            v.split([';', ',']).find_map(|p| {
                let (k, val) = p.trim().split_once('=')?;
                (k.trim() == key).then(|| val.trim().trim_matches('"').parse::<u64>().ok()).flatten()
            })
        })
    };
    param("ratelimit", "t").or_else(|| param("ratelimit-policy", "w")).map(Duration::from_secs)
}

#[cfg(test)]
mod ratelimit_tests {
    use super::*;

    #[test]
    fn reads_t_from_ratelimit_then_w_from_the_policy() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-policy", "\"fixed window\";\"api\";q=500;w=300".parse().unwrap());
        assert_eq!(ratelimit_reset(&h), Some(Duration::from_secs(300)));
        h.insert("ratelimit", "\"api\";r=0;t=55".parse().unwrap());
        assert_eq!(ratelimit_reset(&h), Some(Duration::from_secs(55)));
        assert_eq!(ratelimit_reset(&HeaderMap::new()), None);
    }
}
