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
    /// Where the backend should report the job's end (fal's `fal_webhook`, Replicate's `webhook`): easel's signed
    /// `/v1/hooks/{backend}/{job}` URL, when `server.public_url` says how the backend can reach easel.
    pub webhook: Option<&'a str>,
}

/// Whether `id` can be an upstream job id taken from an inbound webhook (which anyone could send): short, and
/// only letters, digits, `-` and `_`, so it is safe inside a URL path easel builds itself.
pub fn plausible_upstream_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

/// What a backend could tell about a job whose submit was never confirmed (easel stopped while submitting), looked
/// up by the `client_ref` the submit carried.
#[derive(Debug, Clone, PartialEq)]
pub enum JobLookup {
    /// The protocol has no way to find a job by easel's own id.
    CannotTell,
    /// The backend has no job of that id: the submit never arrived, nothing ran.
    Absent,
    /// The backend has it: poll it by this handle from now on.
    Found(JobHandle),
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

/// The fields most hosted video models take (fal's and Replicate's alike): `prompt`, `duration` (as given),
/// `aspect_ratio` from the size, the reference image as a data URL under `reference_field`, `negative_prompt`,
/// `seed`; then `extra` through the one merge rule (it can never change the duration or the size).
pub fn video_input(
    req: &GenerateVideo,
    duration: serde_json::Value,
    reference_field: &str,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let mut input = serde_json::Map::new();
    input.insert("prompt".into(), json!(req.prompt));
    input.insert("duration".into(), duration);
    if let Some(size) = req.size {
        input.insert("aspect_ratio".into(), json!(aspect_ratio(size.width, size.height)));
    }
    if let Some(r) = &req.reference {
        input.insert(reference_field.into(), json!(crate::media::data_url(&r.bytes, r.format)));
    }
    if let Some(n) = &req.negative_prompt {
        input.insert("negative_prompt".into(), json!(n));
    }
    if let Some(seed) = req.seed {
        input.insert("seed".into(), json!(seed));
    }
    crate::request::extra::merge(&mut input, req.extra.as_ref());
    input
}

/// The aspect ratio hosted video models take (fal, Replicate), nearest to `width`x`height`.
pub fn aspect_ratio(width: u32, height: u32) -> &'static str {
    const RATIOS: &[(&str, f64)] =
        &[("16:9", 16.0 / 9.0), ("4:3", 4.0 / 3.0), ("1:1", 1.0), ("3:4", 0.75), ("9:16", 9.0 / 16.0)];
    let r = f64::from(width.max(1)) / f64::from(height.max(1));
    let mut best: (&str, f64) = ("1:1", 1.0);
    for &(name, value) in RATIOS {
        if (r.ln() - value.ln()).abs() < (r.ln() - best.1.ln()).abs() {
            best = (name, value);
        }
    }
    best.0
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
    fn aspect_ratios_are_the_nearest_offered() {
        assert_eq!(aspect_ratio(1280, 720), "16:9");
        assert_eq!(aspect_ratio(720, 1280), "9:16");
        assert_eq!(aspect_ratio(1024, 1024), "1:1");
        assert_eq!(aspect_ratio(1024, 768), "4:3");
    }

    #[test]
    fn sniffs_containers() {
        assert_eq!(sniff_video(b"\0\0\0\x18ftypisom\0\0\x02\0"), Some("video/mp4"));
        assert_eq!(sniff_video(b"\0\0\0\x14ftypqt  \0\0\0\0"), Some("video/quicktime"));
        assert_eq!(sniff_video(&[0x1a, 0x45, 0xdf, 0xa3, 1, 2]), Some("video/webm"));
        assert_eq!(sniff_video(b"GIF89a...."), Some("image/gif"));
        assert_eq!(sniff_video(b"<html>"), None);
    }
}
