//! `fal` adapter (being written).

use std::sync::Arc;

use super::client::Http;
use super::{Backend, BackendError, Failure, ImageCall, ImageOutput, ProbeReport};
use crate::config::BackendConfig;

pub const KIND: &str = "fal";

#[derive(Debug)]
pub struct FalBackend {
    http: Http,
}

impl FalBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }
}

impl Backend for FalBackend {
    async fn generate_images(&self, _call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        Err(self.http.error("", Failure::Unsupported("generate images yet")))
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Err(self.http.error("", Failure::Unsupported("probe yet")))
    }
}
