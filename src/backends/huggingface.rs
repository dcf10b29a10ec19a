//! `huggingface` adapter (being written).

use std::sync::Arc;

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport};
use crate::config::BackendConfig;

pub const KIND: &str = "huggingface";

#[derive(Debug)]
pub struct HuggingFaceBackend {
    http: Http,
}

impl HuggingFaceBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }
}

impl Backend for HuggingFaceBackend {
    async fn generate_images(&self, _call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        Err(self.http.error("", Failure::Unsupported("generate images yet")))
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Err(self.http.error("", Failure::Unsupported("probe yet")))
    }
}
