//! Wire types of OpenAI's Videos API: the create request (JSON or multipart fields; `input_reference` is taken
//! apart by the extractor) and the `video` object, list and deletion answers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
