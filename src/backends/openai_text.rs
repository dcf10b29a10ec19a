//! `openai` text passthrough: `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` bodies sent as they
//! are to an OpenAI-compatible server (llama.cpp, vLLM, Ollama, OpenAI), the success response handed back unread
//! so that a stream can be relayed as it arrives.

use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use std::time::Duration;

use super::openai::OpenAiBackend;
use super::{AnyBackend, BackendError};

/// Longest a streamed answer may run in all.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(6 * 3600);

impl AnyBackend {
    /// The adapter when it speaks the OpenAI text API (only `openai`-kind backends do).
    pub fn openai_text(&self) -> Option<&OpenAiBackend> {
        match self {
            AnyBackend::OpenAi(b) => Some(b),
            _ => None,
        }
    }
}

impl OpenAiBackend {
    /// Posts `body` (JSON) to `path` under the backend's root and returns the success response with its body
    /// unread; an error status comes back as a [`BackendError`] carrying the upstream's message.
    pub async fn send_text(
        &self,
        path: &str,
        body: Vec<u8>,
        stream: bool,
    ) -> Result<(reqwest::Response, String), BackendError> {
        let http = self.http();
        let (rb, url) = http.request(Method::POST, path);
        let accept = if stream { "text/event-stream" } else { "application/json" };
        let mut rb = http.bearer(rb).header(CONTENT_TYPE, "application/json").header(ACCEPT, accept).body(body);
        if stream {
            // A stream may run past the backend's whole-call timeout: the wait for its headers is bounded by the
            // dispatch, each silence between chunks by the relay.
            rb = rb.timeout(STREAM_LIFETIME);
        }
        let resp = http.send(rb, &url).await?;
        Ok((resp, url))
    }

    /// Reads a whole non-streaming success body, capped at the backend's `max_response`.
    pub async fn read_text(&self, resp: reqwest::Response, url: &str) -> Result<bytes::Bytes, BackendError> {
        self.http().body(resp, url).await
    }

    /// An error for this backend.
    pub fn text_error(&self, url: &str, failure: super::Failure) -> BackendError {
        self.http().error(url, failure)
    }
}
