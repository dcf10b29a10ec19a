//! `GET /v1/files`: the stored outputs, as OpenAI's file list (`object: "list"`, cursor paging) with what easel
//! knows of each (model, kind, the request that made it, a signed URL to fetch it without a key).

use serde::Serialize;

/// `GET /v1/files`.
#[derive(Debug, Serialize)]
pub struct FileList {
    pub object: &'static str,
    pub data: Vec<OutputFile>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// One stored output. `id` through `status` are OpenAI's file object; the rest are easel's.
#[derive(Debug, Serialize)]
pub struct OutputFile {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    pub purpose: &'static str,
    pub status: &'static str,
    /// `image` or `video`.
    pub kind: String,
    pub mime_type: String,
    pub model: Option<String>,
    /// Fetches the file without a key until it expires (`storage.url_ttl`).
    pub url: String,
    /// A video's thumbnail, signed likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poster_url: Option<String>,
    /// The request that made it (its parameters; input images are not repeated).
    pub request: serde_json::Value,
}
