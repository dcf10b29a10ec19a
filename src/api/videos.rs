//! Wire types of OpenAI's Videos API: the create request (JSON or multipart fields; `input_reference` is taken
//! apart by the extractor) and the `video` object, list and deletion answers, with the one mapping from a stored
//! job to the `video` object (internal states → `queued`, `in_progress`, `completed`, `failed`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ledger::JobRecord;

/// `POST /v1/videos` fields. `seconds` is a string in OpenAI's API (`"8"`); a number is accepted too.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VideosRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub seconds: Option<Value>,
    pub size: Option<String>,
    /// easel's extensions.
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub extra: Option<Map<String, Value>>,
    /// Where to POST the job's terminal event (`video.completed` / `video.failed`), signed.
    pub webhook_url: Option<String>,
}

/// OpenAI's `video` object.
#[derive(Debug, Serialize)]
pub struct Video {
    pub id: String,
    pub object: &'static str,
    pub model: String,
    /// `queued`, `in_progress`, `completed` or `failed`.
    pub status: &'static str,
    pub progress: i64,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub prompt: Option<String>,
    pub size: Option<String>,
    pub seconds: Option<String>,
    pub remixed_from_video_id: Option<String>,
    pub error: Option<VideoError>,
    /// easel's extension: the upstream queue position while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct VideoError {
    pub code: String,
    pub message: String,
}

/// `GET /v1/videos`.
#[derive(Debug, Serialize)]
pub struct VideoList {
    pub object: &'static str,
    pub data: Vec<Video>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// `DELETE /v1/videos/{id}`.
#[derive(Debug, Serialize)]
pub struct VideoDeleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// The public status of an internal job state.
pub fn status(state: &str) -> &'static str {
    match state {
        "pending" | "submitting" | "queued" => "queued",
        "running" | "finalizing" | "unknown" => "in_progress",
        "succeeded" => "completed",
        _ => "failed",
    }
}

/// A stored job as OpenAI's `video` object.
pub fn video(job: &JobRecord) -> Video {
    let text = |k: &str| job.request[k].as_str().map(str::to_owned);
    let status = status(&job.state);
    Video {
        id: job.id.clone(),
        object: "video",
        model: super::jobs::model_as_sent(job),
        status,
        progress: if status == "completed" { 100 } else { job.progress.min(99) },
        created_at: job.created_at / 1000,
        completed_at: job.completed_at.map(|t| t / 1000),
        expires_at: None,
        prompt: text("prompt"),
        size: text("size"),
        seconds: text("seconds"),
        remixed_from_video_id: None,
        error: (status == "failed").then(|| VideoError {
            code: job.error_code.clone().unwrap_or_else(|| "upstream_failed".into()),
            message: job.error_message.clone().unwrap_or_default(),
        }),
        queue_position: if status == "queued" { job.queue_position } else { None },
    }
}
