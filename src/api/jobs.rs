//! easel's `job` object (`GET /v1/jobs/{id}` for jobs that are not videos): what a stored job shows its owner.

use serde_json::{Value, json};

use super::videos::status;
use crate::ledger::JobRecord;

/// A stored job as the `job` object; `result` is the images response once completed (`null` otherwise, and in
/// webhook events, which point at `GET /v1/jobs/{id}` instead of carrying images).
pub fn job_object(job: &JobRecord, result: Value) -> Value {
    let status = status(&job.state);
    let error = (status == "failed").then(|| {
        json!({
            "code": job.error_code.clone().unwrap_or_else(|| "upstream_failed".into()),
            "message": job.error_message.clone().unwrap_or_default(),
        })
    });
    json!({
        "id": job.id,
        "object": "job",
        "status": status,
        "progress": if status == "completed" { 100 } else { job.progress.min(99) },
        "model": model_as_sent(job),
        "created_at": job.created_at / 1000,
        "completed_at": job.completed_at.map(|t| t / 1000),
        "queue_position": if status == "queued" { job.queue_position } else { None },
        "error": error,
        "result": result,
    })
}

/// The model id as the client sent it (an alias stays the alias); the registry's id when it sent none. The
/// record's `model` is always the canonical id (recovery and metrics use it); the request keeps what was sent.
pub fn model_as_sent(job: &JobRecord) -> String {
    let sent = job.request.get("model_as_sent").or_else(|| job.request.get("wire").and_then(|w| w.get("model")));
    sent.and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(&job.model).to_owned()
}
