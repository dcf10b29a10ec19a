//! The HTTP plumbing every adapter shares: one pooled client per backend with its timeouts, sending with failure
//! classification, size-capped body reads and output downloads. Adapters build requests; this sends them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response};

use super::error::{BackendError, Failure, estimated_time, upstream_message};
use crate::config::BackendConfig;

/// Largest error body read to find the upstream's message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A backend's HTTP client and the config it was built from.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    pub cfg: Arc<BackendConfig>,
}

impl Http {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            headers.insert(k.clone(), v.clone());
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            .default_headers(headers)
            .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client for backend `{}`: {e}", cfg.name))?;
        Ok(Self { client, cfg })
    }

    /// A request to `path` under the backend's root.
    pub fn request(&self, method: Method, path: &str) -> (RequestBuilder, String) {
        let url = self.cfg.endpoint(path);
        (self.client.request(method, &url), url)
    }

    /// A request to an absolute URL (an output to download).
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, url)
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
        let resp = rb.send().await.map_err(|e| self.error(url, transport_failure(&e, self.cfg.timeout)))?;
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
            .map(Duration::from_secs_f64);
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

    /// Downloads an output the backend pointed to, capped and within the backend's timeout.
    pub async fn download(&self, url: &str) -> Result<(Bytes, Option<String>), BackendError> {
        let resp = self.send(self.request_url(Method::GET, url), url).await?;
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = self.body(resp, url).await?;
        Ok((body, content_type))
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
                Err(e) => return Err(self.error(url, transport_failure(&e, self.cfg.timeout))),
            }
        }
    }
}

/// Classifies a reqwest error: timeout, connection failure, or something broken mid-response.
pub fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    if e.is_timeout() {
        Failure::Timeout(timeout)
    } else if e.is_connect() {
        Failure::Connect(root_cause(e))
    } else if e.is_decode() || e.is_body() {
        Failure::InvalidResponse(root_cause(e))
    } else {
        Failure::Connect(root_cause(e))
    }
}

/// The innermost error message (e.g. "Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
