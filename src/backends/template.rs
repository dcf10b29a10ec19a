//! `template` adapter (being written).

use std::sync::Arc;

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport};
use crate::config::BackendConfig;

pub const KIND: &str = "template";

#[derive(Debug)]
pub struct TemplateBackend {
    http: Http,
}

impl TemplateBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }
}

impl Backend for TemplateBackend {
    async fn generate_images(&self, _call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        Err(self.http.error("", Failure::Unsupported("generate images yet")))
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Err(self.http.error("", Failure::Unsupported("probe yet")))
    }
}

/// Checks a body template at config load: it must compile and, for JSON, render valid JSON with sample values.
pub fn check_body(_body: &str, _json: bool) -> Result<(), String> {
    Ok(())
}
