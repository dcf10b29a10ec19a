//! The job half of the backend contract, for work that outlives one HTTP exchange (video; long image graphs):
//! submit once and keep the handle the backend returned, poll by that handle, fetch the outputs when it is done,
//! cancel it. Handles are stored with the job, so they hold no secrets: the adapter that made one adds its own
//! credentials on every later call, and only that backend is ever asked about it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::request::video::GenerateVideo;

/// One video to make.
#[derive(Debug, Clone, Copy)]
pub struct VideoCall<'a> {
    pub request: &'a GenerateVideo,
    pub model: &'a ModelConfig,
    /// easel's own id for this submission, chosen before the submit (ComfyUI's `prompt_id`, a webhook tag), so
    /// an ambiguous submit can be looked up later.
    pub client_ref: &'a str,
}

/// What a backend returned at submit: enough to poll, fetch and cancel (fal's status/response/cancel URLs,
/// Replicate's prediction id and URLs, ComfyUI's prompt id). Stored as JSON with the job; never a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobHandle {
    /// The upstream's id for the job.
    pub upstream_id: String,
    /// Adapter-specific fields (URLs, the endpoint id); opaque to everything but the adapter.
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// Why a job failed, as OpenAI's video `error.code` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// The backend ran the job and it failed.
    UpstreamFailed,
    /// The backend refused the job's content (validation, safety).
    UpstreamRejected,
    /// easel's deadline for the job passed.
    Timeout,
    /// The backend no longer knows the job.
    UpstreamLost,
    /// The backend that took the job is gone from the configuration.
    BackendRemoved,
    /// Cancelled by its owner.
    Canceled,
}

impl JobErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamRejected => "upstream_rejected",
            Self::Timeout => "timeout",
            Self::UpstreamLost => "upstream_lost",
            Self::BackendRemoved => "backend_removed",
            Self::Canceled => "canceled",
        }
    }
}

/// Where a job stands upstream, as one poll saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting upstream; `position` when the backend says (fal `queue_position`, ComfyUI's queue).
    Queued { position: Option<u32> },
    /// Running; `progress` in 0.0–1.0 when the backend says.
    Running { progress: Option<f64> },
    /// Done: [`crate::backends::Backend::fetch_outputs`] may be called.
    Succeeded,
    /// Ended without outputs.
    Failed { code: JobErrorCode, message: String },
    /// The backend answered that it does not know this job (after a restart of the backend, for example).
    Lost,
}

/// One poll's result: the state and any new log lines (fal and Replicate send logs).
#[derive(Debug, Clone, PartialEq)]
pub struct JobPoll {
    pub state: JobState,
    pub logs: Vec<String>,
}

/// What a finished job made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Video,
    Thumbnail,
    Image,
}

/// One output of a finished job, already downloaded (under the outbound policy and the size cap).
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub kind: OutputKind,
    pub bytes: Bytes,
    /// Sniffed from the bytes (`video/mp4`, `video/webm`, `image/png`, ...), never trusted from a header.
    pub mime: &'static str,
}

/// Sniffs a video container: MP4/MOV (`ftyp` box), WebM/Matroska (EBML header), GIF.
pub fn sniff_video(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return Some(if &bytes[8..10] == b"qt" { "video/quicktime" } else { "video/mp4" });
    }
    if bytes.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some("video/webm");
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Some("image/gif");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_containers() {
        assert_eq!(sniff_video(b"\0\0\0\x18ftypisom\0\0\x02\0"), Some("video/mp4"));
        assert_eq!(sniff_video(b"\0\0\0\x14ftypqt  \0\0\0\0"), Some("video/quicktime"));
        assert_eq!(sniff_video(&[0x1a, 0x45, 0xdf, 0xa3, 1, 2]), Some("video/webm"));
        assert_eq!(sniff_video(b"GIF89a...."), Some("image/gif"));
        assert_eq!(sniff_video(b"<html>"), None);
    }
}
