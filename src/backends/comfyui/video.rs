//! ComfyUI video jobs: a `type: video` model's workflow submitted once with a `prompt_id` easel derives from the
//! job's `client_ref` (so a restarted easel can find a prompt whose submit it never saw answered), polled through
//! `/queue` (pending with its position, or running) and `/history/{id}` (success, `execution_error`,
//! `execution_interrupted`), its video downloaded from `/view` under the outbound policy, and cancelled with a
//! queue delete (pending) or an interrupt of that prompt (running). Progress is not reported: the socket only
//! carries a prompt's events to the client that is connected while it runs, and a job is polled, not followed.

use reqwest::Method;
use serde_json::{Value, json};

use super::{ComfyUiBackend, HistoryEntry, OutputImage, execution_error};
use crate::backends::jobs::{JobErrorCode, JobHandle, JobLookup, JobOutput, JobPoll, JobState, OutputKind};
use crate::backends::jobs::{VideoCall, sniff_video};
use crate::backends::workflow::{WorkflowVars, fresh_seed};
use crate::backends::{BackendError, Failure, InputImage};

/// The `prompt_id` of a job: a canonical lowercase UUID made from the SHA-256 of easel's `client_ref`. Equal refs
/// give equal ids, so the prompt of an unconfirmed submit can be looked up after a restart.
pub fn prompt_id_for(client_ref: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(client_ref.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

/// Where a prompt stands in `/queue`.
enum InQueue {
    Pending(u32),
    Running,
    Neither,
}

impl ComfyUiBackend {
    pub(super) async fn submit_video_job(&self, call: VideoCall<'_>) -> Result<JobHandle, BackendError> {
        let (req, model) = (call.request, call.model);
        let Some(workflow) = model.workflow.as_ref() else {
            return Err(self.http.error("", Failure::Unsupported("run a video model without a `workflow`")));
        };
        let uses_image = workflow.uses("image");
        match (&req.reference, uses_image) {
            (Some(_), false) => {
                return Err(self.http.error(
                    "",
                    Failure::UnusableField {
                        param: "input_reference",
                        message: format!(
                            "model `{}` takes no reference image: its workflow {} has no `image` input; send the request without `input_reference`",
                            model.id,
                            workflow.path.display()
                        ),
                    },
                ));
            }
            (None, true) => {
                return Err(self.http.error(
                    "",
                    Failure::UnusableField {
                        param: "input_reference",
                        message: format!(
                            "model `{}` needs a reference image: its workflow {} loads {{{{ image }}}}; send `input_reference`",
                            model.id,
                            workflow.path.display()
                        ),
                    },
                ));
            }
            _ => {}
        }
        let image = match &req.reference {
            Some(r) => {
                let input = InputImage { bytes: r.bytes.clone(), format: r.format, name: "reference".into() };
                Some(self.upload(&input).await?)
            }
            None => None,
        };
        let seed = req.seed.unwrap_or_else(fresh_seed);
        let vars = WorkflowVars::for_video(req, model, seed, image.as_deref());
        let graph = workflow
            .render(&vars)
            .map_err(|e| self.http.error("", Failure::InvalidResponse(format!("rendering the workflow: {e}"))))?;
        let prompt_id = prompt_id_for(call.client_ref);
        let client_id = uuid::Uuid::now_v7().to_string();
        let accepted = self.submit(&graph, &client_id, Some(&prompt_id)).await?;
        tracing::debug!(backend = %self.http.cfg.name, prompt_id = %accepted, "Submitted a video prompt to ComfyUI.");
        Ok(handle(&accepted, Some(&client_id)))
    }

    async fn in_queue(&self, prompt_id: &str) -> Result<InQueue, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/queue");
        let q: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
        let is = |item: &Value| item.get(1).and_then(Value::as_str) == Some(prompt_id);
        if q["queue_running"].as_array().is_some_and(|items| items.iter().any(is)) {
            return Ok(InQueue::Running);
        }
        // Pending is heap-ordered: its place is its rank by `number`.
        let mut pending: Vec<(f64, bool)> = q["queue_pending"]
            .as_array()
            .map(|items| items.iter().map(|i| (i.get(0).and_then(Value::as_f64).unwrap_or(f64::MAX), is(i))).collect())
            .unwrap_or_default();
        pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(match pending.iter().position(|(_, mine)| *mine) {
            Some(at) => InQueue::Pending(u32::try_from(at + 1).unwrap_or(u32::MAX)),
            None => InQueue::Neither,
        })
    }

    pub(super) async fn poll_video_job(&self, handle: &JobHandle) -> Result<JobPoll, BackendError> {
        let id = handle.upstream_id.as_str();
        let state = match self.in_queue(id).await? {
            InQueue::Pending(position) => JobState::Queued { position: Some(position) },
            InQueue::Running => JobState::Running { progress: None },
            // A prompt leaves the queue only after its history is written, so asking now cannot miss it.
            InQueue::Neither => match self.history(id).await? {
                Some(entry) => ended(&entry),
                None => JobState::Lost,
            },
        };
        Ok(JobPoll { state, logs: Vec::new() })
    }

    pub(super) async fn fetch_video_outputs(&self, handle: &JobHandle) -> Result<Vec<JobOutput>, BackendError> {
        let id = handle.upstream_id.as_str();
        let history_url = self.http.cfg.endpoint(&format!("/history/{id}"));
        let Some(entry) = self.history(id).await? else {
            return Err(self
                .http
                .error(&history_url, Failure::JobFailed(format!("ComfyUI has no history for prompt {id}"))));
        };
        let Some(file) = video_file(&entry) else {
            return Err(self.http.error(
                &history_url,
                Failure::InvalidResponse(
                    "the workflow produced no video (does it end in SaveVideo or SaveWEBM?)".into(),
                ),
            ));
        };
        let view = self.http.cfg.endpoint("/view");
        let url = reqwest::Url::parse_with_params(
            &view,
            [
                ("filename", file.filename.as_str()),
                ("subfolder", file.subfolder.as_str()),
                ("type", file.kind.as_str()),
            ],
        )
        .map_err(|e| self.http.error(&view, Failure::InvalidResponse(format!("building the /view URL: {e}"))))?;
        let (bytes, mime) = self.http.download_as(url.as_str(), sniff_video, "an MP4, WebM or GIF video").await?;
        Ok(vec![JobOutput { kind: OutputKind::Video, bytes, mime }])
    }

    pub(super) async fn cancel_video_job(&self, handle: &JobHandle) -> Result<(), BackendError> {
        let id = handle.upstream_id.as_str();
        let (path, body) = match self.in_queue(id).await? {
            InQueue::Pending(_) => ("/queue", json!({"delete": [id]})),
            // Servers that honour `prompt_id` interrupt only this prompt; older ones whatever runs, which is it.
            InQueue::Running => ("/interrupt", json!({"prompt_id": id})),
            InQueue::Neither => return Ok(()),
        };
        let (rb, url) = self.http.request(Method::POST, path);
        self.http.send(rb.json(&body), &url).await.map(|_| ())
    }

    pub(super) async fn find_video_job(&self, client_ref: &str) -> Result<JobLookup, BackendError> {
        let id = prompt_id_for(client_ref);
        let known = match self.in_queue(&id).await? {
            InQueue::Pending(_) | InQueue::Running => true,
            InQueue::Neither => self.history(&id).await?.is_some(),
        };
        Ok(if known { JobLookup::Found(handle(&id, None)) } else { JobLookup::Absent })
    }
}

fn handle(prompt_id: &str, client_id: Option<&str>) -> JobHandle {
    let mut meta = json!({"prompt_id": prompt_id});
    if let Some(c) = client_id {
        meta["client_id"] = json!(c);
    }
    JobHandle { upstream_id: prompt_id.to_owned(), meta }
}

/// The state a history entry records: failed with the node's message, interrupted, or succeeded.
fn ended(entry: &HistoryEntry) -> JobState {
    let messages = entry.status.as_ref().map(|s| s.messages.as_slice()).unwrap_or_default();
    if let Some((_, d)) = messages.iter().find(|(k, _)| k == "execution_error") {
        let message = match execution_error(d) {
            Failure::JobFailed(m) => m,
            _ => "ComfyUI reported an execution error".to_owned(),
        };
        return JobState::Failed { code: JobErrorCode::UpstreamFailed, message };
    }
    if let Some((_, d)) = messages.iter().find(|(k, _)| k == "execution_interrupted") {
        let node = d.get("node_id").and_then(Value::as_str).unwrap_or("?");
        return JobState::Failed {
            code: JobErrorCode::UpstreamFailed,
            message: format!("ComfyUI interrupted the prompt at node {node}"),
        };
    }
    if entry.status.as_ref().is_some_and(|s| s.status_str == "error") {
        return JobState::Failed { code: JobErrorCode::UpstreamFailed, message: "the prompt ended in error".into() };
    }
    JobState::Succeeded
}

/// The first video among the outputs, by node id: `images` marked `animated` (SaveVideo, SaveWEBM), else the
/// `gifs` or `videos` lists older custom nodes write.
fn video_file(entry: &HistoryEntry) -> Option<&OutputImage> {
    let mut nodes: Vec<_> = entry.outputs.iter().collect();
    nodes.sort_by_key(|(id, _)| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
    let animated =
        nodes.iter().filter(|(_, out)| out.animated.iter().any(|a| *a)).find_map(|(_, out)| out.images.first());
    animated.or_else(|| nodes.iter().find_map(|(_, out)| out.gifs.first().or_else(|| out.videos.first())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_are_canonical_and_stable() {
        let a = prompt_id_for("video_0193");
        assert_eq!(a, prompt_id_for("video_0193"));
        assert_ne!(a, prompt_id_for("video_0194"));
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().hyphenated().to_string(), a);
        assert_eq!(a, a.to_lowercase());
    }

    #[test]
    fn finds_the_video_in_a_history_entry() {
        let e: HistoryEntry = serde_json::from_value(json!({"outputs": {
            "2": {"images": [{"filename": "still.png", "subfolder": "", "type": "output"}]},
            "9": {"images": [{"filename": "clip_00001_.mp4", "subfolder": "video", "type": "output"}], "animated": [true]}},
            "status": {"status_str": "success", "completed": true, "messages": []}}))
        .unwrap();
        assert_eq!(video_file(&e).map(|f| f.filename.as_str()), Some("clip_00001_.mp4"));
        assert_eq!(ended(&e), JobState::Succeeded);
        let e: HistoryEntry = serde_json::from_value(
            json!({"outputs": {"5": {"gifs": [{"filename": "a.webm", "subfolder": "", "type": "output", "format": "video/webm"}]}}}),
        )
        .unwrap();
        assert_eq!(video_file(&e).map(|f| f.filename.as_str()), Some("a.webm"));
    }
}
