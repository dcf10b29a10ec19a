//! `invokeai`: an InvokeAI server (5.x and 6.x, `/api/v1` queue API; see `shared/protocols/invokeai.md`) running
//! the model's graph template. Each image of a call renders the graph with its own seed (the call's seed plus the
//! image's index, modulo 2³², since InvokeAI's seed fields are 32-bit; a fresh random one when the request fixed
//! none) and is enqueued as its own batch with `POST /api/v1/queue/{queue_id}/enqueue_batch` (origin `easel`, a
//! destination unique to the call). 6.x answers with the `item_ids`; 5.x does not, so its items are found in the
//! `GET …/list` pages by batch id. Each item is polled (`GET …/i/{item_id}` every `poll_interval`) to a terminal
//! status; meanwhile the progress socket (`/ws/socket.io`, see [`events`]) reports denoising steps through
//! `job_progress` and wakes the poller as soon as the item's status changes (without the socket, polling alone
//! decides). The output image names are read from the item's session results of the graph's final nodes (those
//! no edge leaves) and downloaded from `/api/v1/images/i/{name}/full`.
//!
//! Failures: an invalid graph (422 from the enqueue) is the request's to fix (400 with pydantic's message); a
//! failed item is a 502 naming InvokeAI's `error_type` and `error_message`. When the client goes away, or the
//! backend `timeout` runs out, every item of the call that has not finished is cancelled
//! (`PUT …/i/{item_id}/cancel`) before the call returns, and the call then waits until the processor has let go
//! of a cancelled running item (`processor.is_processing` in `…/status`): the GPU is free only then. An enqueue is never abandoned because the client left
//! (the real server can take a second to answer one while it starts another item, and the answer names the items
//! to cancel); one cut short by the timeout is covered by `PUT …/cancel_by_destination`.
//!
//! Edits upload their inputs with `POST /api/v1/images/upload?image_category=user&is_intermediate=true` and pass
//! the returned `image_name`s (fresh uuids, so requests never share an input) to the template as `image` and
//! `mask`, and delete them (`DELETE /api/v1/images/i/{name}`) when the call ends. An edit the template has no
//! `image` (or `mask`) variable for is refused before anything is uploaded. With `api_key` set, every request carries it
//! as a bearer token (6.12+ multi-user mode).
//!
//! Health: `GET /api/v1/app/version` (ready when it names a version, which the probe detail shows), plus the
//! queue counts from `GET …/status`; a stopped queue processor is reported as not ready.

mod events;
mod wire;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::time::Instant;

use self::events::{Events, ItemUpdate};
use self::wire::{Batch, EnqueueBody, Enqueued, ListPage, QueueItem, QueueStatus, Status, Uploaded};
use super::client::Http;
use super::progress::Progress;
use super::workflow::{Workflow, WorkflowVars, fresh_seed};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, InputImage, ProbeReport, image_from_bytes,
    upload_edit_inputs,
};
use crate::config::BackendConfig;
use crate::request::ImageFormat;

pub const KIND: &str = "invokeai";

/// The `origin` of every batch easel enqueues, shown in InvokeAI's queue list and events.
const ORIGIN: &str = "easel";
/// Items per page when looking for a 5.x batch's items in the queue list.
const LIST_PAGE: u32 = 100;
/// The 5.x item search reads at most this many pages (the list also holds finished items until pruned).
const MAX_LIST_PAGES: u32 = 50;
/// Cancelling runs after the call already failed, timed out or lost its client; after a timeout the pipeline
/// allows one more second before it drops the call, and the cancels (sent together) must fit in it.
const CANCEL_TIMEOUT: Duration = Duration::from_millis(900);

#[derive(Debug)]
pub struct InvokeAiBackend {
    http: Http,
}

/// The items a call enqueued and has not yet seen finish: what must be cancelled if the call ends early. Shared
/// between the call's work and the branches that end it, behind a lock never held across an await.
#[derive(Debug, Default)]
struct OpenItems(Mutex<Open>);

#[derive(Debug, Default)]
struct Open {
    ids: Vec<i64>,
    /// Items may exist that easel has no id for (an enqueue cut short, or one that failed after creating items):
    /// only the destination can find them.
    unknown_items: bool,
    /// The edit inputs this call uploaded, deleted when it ends.
    uploads: Vec<String>,
}

impl OpenItems {
    fn with<T>(&self, f: impl FnOnce(&mut Open) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What the submit phase hands to the finish phase.
struct Submitted {
    ids: Vec<i64>,
    /// The graph's final nodes, whose images are the call's.
    outputs: BTreeSet<String>,
    events: Option<Events>,
}

/// Why a call ended without images.
enum Stopped {
    Failed(BackendError),
    TimedOut,
    ClientGone,
}

impl From<BackendError> for Stopped {
    fn from(e: BackendError) -> Self {
        Self::Failed(e)
    }
}

impl InvokeAiBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    fn queue_path(&self, rest: &str) -> String {
        format!("/api/v1/queue/{}{rest}", self.http.cfg.queue_id)
    }

    /// A request to `path` with the backend's bearer token, if any.
    fn request(&self, method: Method, path: &str) -> (RequestBuilder, String) {
        let (rb, url) = self.http.request(method, path);
        (self.http.bearer(rb), url)
    }

    /// Uploads the edit inputs, renders one graph per image and enqueues each. The client going away is checked
    /// between requests but never interrupts an enqueue: its answer holds the item ids that must be cancelled.
    async fn submit(
        &self,
        call: &ImageCall<'_>,
        workflow: &Workflow,
        destination: &str,
        open: &OpenItems,
    ) -> Result<Submitted, Stopped> {
        let (image, mask) = tokio::select! {
            r = upload_edit_inputs(call.edit, |img| self.upload(img, open)) => r?,
            () = call.cancel.cancelled() => return Err(Stopped::ClientGone),
        };
        let base_seed = call.seed.unwrap_or_else(fresh_seed);
        let mut graphs = Vec::with_capacity(call.count as usize);
        for i in 0..call.count {
            let seed = base_seed.wrapping_add(u64::from(i)) & u64::from(u32::MAX);
            let vars = WorkflowVars::for_call(call, seed, 1, image.as_deref(), mask.as_deref());
            let graph = workflow
                .render(&vars)
                .map_err(|e| self.http.error("", Failure::Config(format!("rendering the graph template: {e}"))))?;
            graphs.push(graph);
        }
        let outputs = graphs.first().map(wire::output_nodes).unwrap_or_default();
        // Listen before enqueueing, so no status change of the call's items is missed.
        let events = tokio::select! {
            ev = Events::connect(&self.http, destination) => ev,
            () = call.cancel.cancelled() => return Err(Stopped::ClientGone),
        };
        let mut ids = Vec::with_capacity(graphs.len());
        for graph in &graphs {
            if call.cancel.is_cancelled() {
                return Err(Stopped::ClientGone);
            }
            open.with(|o| o.unknown_items = true);
            let new = self.enqueue(graph, destination, workflow).await;
            open.with(|o| {
                // A 4xx created nothing; a 5xx, or a 5.x batch missing from the list, may have.
                o.unknown_items =
                    new.as_ref().is_err_and(|e| !matches!(e.failure, Failure::Status { status: 400..=499, .. }));
                o.ids.extend(new.iter().flatten());
            });
            ids.extend(new?);
        }
        // The lowest id runs first; the seeds were enqueued in order.
        ids.sort_unstable();
        Ok(Submitted { ids, outputs, events })
    }

    /// Follows the items to their end and downloads their output images.
    async fn finish(
        &self,
        job: Submitted,
        open: &OpenItems,
        progress: &Progress,
    ) -> Result<Vec<ImageOutput>, BackendError> {
        let names = self.follow(&job.ids, &job.outputs, open, job.events, progress).await?;
        let mut images = Vec::with_capacity(names.len());
        for name in &names {
            images.push(self.download(name).await?);
        }
        Ok(images)
    }

    /// Uploads one edit input; InvokeAI names it (a fresh uuid), so no two requests ever share an input.
    async fn upload(&self, img: &InputImage, open: &OpenItems) -> Result<String, BackendError> {
        let (rb, url) = self.request(Method::POST, "/api/v1/images/upload?image_category=user&is_intermediate=true");
        // InvokeAI answers 415 unless the part's content type starts with `image`.
        let part = reqwest::multipart::Part::stream(reqwest::Body::from(img.bytes.clone()))
            .file_name(img.name.clone())
            .mime_str(img.format.mime())
            .map_err(|e| self.http.error(&url, Failure::InvalidResponse(e.to_string())))?;
        let resp = self.http.send(rb.multipart(reqwest::multipart::Form::new().part("file", part)), &url).await?;
        let uploaded: Uploaded = self.http.json(resp, &url).await?;
        open.with(|o| o.uploads.push(uploaded.image_name.clone()));
        Ok(uploaded.image_name)
    }

    /// Deletes the inputs the call uploaded (`DELETE /api/v1/images/i/{name}`); a failure is only logged.
    async fn delete_uploads(&self, names: &[String]) {
        for name in names {
            let (rb, url) = self.request(Method::DELETE, &format!("/api/v1/images/i/{}", wire::path_segment(name)));
            if let Err(e) = self.http.send(rb, &url).await {
                tracing::warn!(backend = %self.http.cfg.name, image = %name, error = %e, "Deleting an uploaded InvokeAI input failed.");
            }
        }
    }

    /// Enqueues one graph as a batch of one run; returns its item ids.
    async fn enqueue(&self, graph: &Value, destination: &str, workflow: &Workflow) -> Result<Vec<i64>, BackendError> {
        let (rb, url) = self.request(Method::POST, &self.queue_path("/enqueue_batch"));
        let body = EnqueueBody { prepend: false, batch: Batch { graph, runs: 1, origin: ORIGIN, destination } };
        let resp = self.http.send(rb.json(&body), &url).await.map_err(|mut e| {
            if let Failure::Status { status: 422, hint, .. } = &mut e.failure {
                *hint = Some(format!(
                    "InvokeAI did not accept the graph rendered from {}: its node types and field names must match this InvokeAI version",
                    workflow.path.display()
                ));
            }
            e
        })?;
        let answer: Enqueued = self.http.json(resp, &url).await?;
        if answer.enqueued == Some(0) {
            return Err(self.http.error(
                &url,
                Failure::JobFailed("InvokeAI enqueued none of the batch's items (is its queue full?)".into()),
            ));
        }
        match answer.item_ids {
            Some(ids) if !ids.is_empty() => Ok(ids),
            _ => self.find_batch_items(&answer.batch.batch_id, answer.enqueued.unwrap_or(1)).await,
        }
    }

    /// 5.x: the enqueue answer has no item ids, so read the queue list (ordered by priority, then id) and keep
    /// the batch's items. The list starts at the item in progress (the batch's items are usually at or after
    /// it); if they are not there (a prepended item runs, or the batch already finished), the whole list is read.
    async fn find_batch_items(&self, batch_id: &str, expected: u32) -> Result<Vec<i64>, BackendError> {
        let current = self.queue_status().await.ok().and_then(|s| s.queue.item_id);
        let mut found = Vec::new();
        if let Some(current) = current {
            found = self.list_batch_items(batch_id, expected, Some((current - 1, 0))).await?;
        }
        if found.is_empty() {
            found = self.list_batch_items(batch_id, expected, None).await?;
        }
        if found.is_empty() {
            let url = self.http.cfg.endpoint(&self.queue_path("/list"));
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse(format!(
                    "batch {batch_id} was enqueued, but none of its items is in the queue list"
                )),
            ));
        }
        Ok(found)
    }

    /// Reads list pages after `cursor` (item id, priority) until `expected` items of the batch are found.
    async fn list_batch_items(
        &self,
        batch_id: &str,
        expected: u32,
        mut cursor: Option<(i64, i64)>,
    ) -> Result<Vec<i64>, BackendError> {
        let list = self.queue_path("/list");
        let mut found = Vec::new();
        for _ in 0..MAX_LIST_PAGES {
            let (rb, url) = self.request(Method::GET, &list);
            let mut query = vec![("limit", LIST_PAGE.to_string())];
            if let Some((item_id, priority)) = cursor {
                query.push(("cursor", item_id.to_string()));
                query.push(("priority", priority.to_string()));
            }
            let resp = self.http.send(rb.query(&query), &url).await?;
            let page: ListPage = self.http.json(resp, &url).await?;
            found.extend(page.items.iter().filter(|i| i.batch_id == batch_id).map(|i| i.item_id));
            let last = page.items.last().map(|i| (i.item_id, i.priority));
            if found.len() >= expected as usize || !page.has_more || last.is_none() {
                break;
            }
            cursor = last;
        }
        Ok(found)
    }

    async fn queue_status(&self) -> Result<QueueStatus, BackendError> {
        let (rb, url) = self.request(Method::GET, &self.queue_path("/status"));
        let resp = self.http.send(rb, &url).await?;
        self.http.json(resp, &url).await
    }

    async fn item(&self, id: i64) -> Result<QueueItem, BackendError> {
        let (rb, url) = self.request(Method::GET, &self.queue_path(&format!("/i/{id}")));
        let resp = self.http.send(rb, &url).await.map_err(|mut e| {
            if let Failure::Status { status: 404, hint, .. } = &mut e.failure {
                *hint = Some("the item left InvokeAI's queue (cleared, pruned or deleted) while easel waited".into());
            }
            e
        })?;
        self.http.json(resp, &url).await
    }

    /// Waits for every item in turn and returns the output image names, in item order.
    async fn follow(
        &self,
        ids: &[i64],
        outputs: &BTreeSet<String>,
        open: &OpenItems,
        mut events: Option<Events>,
        progress: &Progress,
    ) -> Result<Vec<String>, BackendError> {
        let name = &self.http.cfg.name;
        let total = ids.len() as f64;
        let mut names = Vec::new();
        for (done, &id) in ids.iter().enumerate() {
            let url = self.http.cfg.endpoint(&self.queue_path(&format!("/i/{id}")));
            let item = loop {
                let item = self.item(id).await?;
                if item.status.is_terminal() {
                    break item;
                }
                // Sleep until the next poll, or until the socket says this item's status changed.
                let next_poll = tokio::time::sleep(self.http.cfg.poll_interval);
                tokio::pin!(next_poll);
                loop {
                    let update = match events.as_mut() {
                        Some(ev) => tokio::select! {
                            () = &mut next_poll => break,
                            u = ev.next(id) => u,
                        },
                        None => {
                            next_poll.as_mut().await;
                            break;
                        }
                    };
                    match update {
                        Some(ItemUpdate::Progress(fraction, image)) => {
                            progress.step(name, done as f64 + fraction, total);
                            if let Some(url) = image
                                && progress.wants_preview()
                                && let Some((bytes, format)) = preview_image(&url)
                            {
                                progress.preview(bytes, format);
                            }
                        }
                        Some(ItemUpdate::StatusChanged) => break,
                        None => {
                            tracing::debug!(backend = %name, item = id, "InvokeAI progress socket closed; polling only.");
                            events = None;
                        }
                    }
                }
            };
            open.with(|o| o.ids.retain(|open| *open != id));
            match item.status {
                Status::Completed => {
                    let session = item.session.unwrap_or_default();
                    let found = wire::output_images(&session, outputs);
                    if found.is_empty() {
                        let nodes: Vec<&str> = outputs.iter().map(String::as_str).collect();
                        return Err(self.http.error(
                            &url,
                            Failure::InvalidResponse(format!(
                                "item {id} completed, but the graph's final node(s) `{}` produced no image; the template's last node must output an image",
                                nodes.join("`, `")
                            )),
                        ));
                    }
                    names.extend(found);
                    progress.step(name, (done + 1) as f64, total);
                }
                Status::Failed => {
                    let kind = item.error_type.as_deref().unwrap_or("error");
                    let message = item.error_message.as_deref().unwrap_or("no message");
                    return Err(self.http.error(
                        &url,
                        Failure::JobFailed(format!("InvokeAI queue item {} failed: {kind}: {message}", item.item_id)),
                    ));
                }
                _ => {
                    return Err(self.http.error(
                        &url,
                        Failure::JobFailed(format!("InvokeAI queue item {id} was canceled on the server")),
                    ));
                }
            }
        }
        Ok(names)
    }

    /// Cancels the items, all at once and each within [`CANCEL_TIMEOUT`]; failures are logged.
    async fn cancel(&self, ids: &[i64]) {
        let cancels = ids.iter().map(|&id| async move {
            let (rb, url) = self.request(Method::PUT, &self.queue_path(&format!("/i/{id}/cancel")));
            if let Err(e) = self.http.send(rb.timeout(CANCEL_TIMEOUT), &url).await {
                tracing::warn!(backend = %self.http.cfg.name, item = id, error = %e, "Cancelling an InvokeAI queue item failed.");
            }
        });
        join_all(cancels).await;
    }

    /// Waits (within the backend timeout) until InvokeAI's processor has let go of the cancelled items. A cancel
    /// marks an item `canceled` at once, but its running node stops only when it next checks, and the admission
    /// slot must stay held until the GPU is free. Done when the processor is idle or has moved on to an item that
    /// is not one of these; a status that cannot be read ends the wait.
    async fn wait_stopped(&self, ids: &[i64]) {
        let stopped = async {
            loop {
                match self.queue_status().await {
                    Ok(s) if !s.processor.is_processing => return,
                    Ok(s) if s.queue.item_id.is_some_and(|id| !ids.contains(&id)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(backend = %self.http.cfg.name, error = %e, "Reading InvokeAI's queue status after a cancel failed; the slot frees now.");
                        return;
                    }
                }
                tokio::time::sleep(self.http.cfg.poll_interval).await;
            }
        };
        if tokio::time::timeout(self.http.cfg.timeout, stopped).await.is_err() {
            tracing::warn!(backend = %self.http.cfg.name, items = ?ids, "InvokeAI still processes a cancelled item after the backend timeout; the slot frees now.");
        }
    }

    /// Cancels every item of the call, found by its destination: for items easel has no id for.
    async fn cancel_destination(&self, destination: &str) {
        let (rb, url) = self.request(Method::PUT, &self.queue_path("/cancel_by_destination"));
        let rb = rb.query(&[("destination", destination)]).timeout(CANCEL_TIMEOUT);
        if let Err(e) = self.http.send(rb, &url).await {
            tracing::warn!(backend = %self.http.cfg.name, destination, error = %e, "Cancelling InvokeAI queue items by destination failed.");
        }
    }

    async fn download(&self, name: &str) -> Result<ImageOutput, BackendError> {
        let path = format!("/api/v1/images/i/{}/full", wire::path_segment(name));
        let (rb, url) = self.request(Method::GET, &path);
        let bytes = self.http.body(self.http.send(rb, &url).await?, &url).await?;
        image_from_bytes(bytes).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))
    }
}

impl Backend for InvokeAiBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let Some(workflow) = call.model.workflow.as_deref() else {
            return Err(self.http.error("", Failure::Unsupported("run a model without a `workflow`")));
        };
        if let Some((param, message)) = call.edit.and_then(|e| workflow.edit_refusal(&call.model.id, e)) {
            return Err(self.http.error("", Failure::UnusableField { param, message }));
        }
        // The pipeline drops the call a little after `timeout`; end it first, so that its items get cancelled.
        let deadline = Instant::now() + self.http.cfg.timeout;
        let destination = format!("easel:{}", uuid::Uuid::now_v7());
        let open = OpenItems::default();
        let stopped = match tokio::time::timeout_at(deadline, self.submit(&call, workflow, &destination, &open)).await {
            Err(_) => Stopped::TimedOut,
            Ok(Err(stopped)) => stopped,
            Ok(Ok(job)) => tokio::select! {
                r = tokio::time::timeout_at(deadline, self.finish(job, &open, call.progress)) => match r {
                    Ok(Ok(images)) => {
                        let uploads = open.with(|o| std::mem::take(&mut o.uploads));
                        self.delete_uploads(&uploads).await;
                        return Ok(images);
                    }
                    Ok(Err(e)) => Stopped::Failed(e),
                    Err(_) => Stopped::TimedOut,
                },
                () = call.cancel.cancelled() => Stopped::ClientGone,
            },
        };
        let Open { ids, unknown_items, uploads } = open.with(std::mem::take);
        if !ids.is_empty() || unknown_items {
            tracing::info!(backend = %self.http.cfg.name, items = ?ids, unknown_items, "Cancelling unfinished InvokeAI queue items.");
            let by_destination = async {
                if unknown_items {
                    self.cancel_destination(&destination).await;
                }
            };
            tokio::join!(self.cancel(&ids), by_destination);
            self.wait_stopped(&ids).await;
        }
        self.delete_uploads(&uploads).await;
        let url = self.http.cfg.endpoint(&self.queue_path("/enqueue_batch"));
        Err(match stopped {
            Stopped::Failed(e) => e,
            Stopped::TimedOut => self.http.error(&url, Failure::Timeout(self.http.cfg.timeout)),
            Stopped::ClientGone => self.http.error(&url, Failure::JobFailed("cancelled: the client went away".into())),
        })
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.request(Method::GET, "/api/v1/app/version");
        let v: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
        let Some(version) = v.get("version").and_then(Value::as_str).map(str::to_owned) else {
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse("`/api/v1/app/version` names no `version`: is this InvokeAI?".into()),
            ));
        };
        let queue = &self.http.cfg.queue_id;
        Ok(match self.queue_status().await {
            Ok(s) if !s.processor.is_started => ProbeReport {
                ready: false,
                detail: format!("InvokeAI {version}, queue `{queue}`: the queue processor is not started"),
            },
            Ok(s) => ProbeReport {
                ready: true,
                detail: format!(
                    "InvokeAI {version}, queue `{queue}`: {} pending, {} in progress",
                    s.queue.pending, s.queue.in_progress
                ),
            },
            // The version answered, so the server serves; the queue status is a detail.
            Err(e) => ProbeReport { ready: true, detail: format!("InvokeAI {version} (queue status unknown: {e})") },
        })
    }

    fn supports_edits(&self) -> bool {
        true
    }

    /// Only a workflow that reads `{{ background }}` can paint a transparent background.
    fn supports_transparency_for(&self, model: &crate::config::ModelConfig) -> bool {
        model.workflow.as_ref().is_some_and(|w| w.uses("background"))
    }
}

/// An `invocation_progress` preview (`data:image/…;base64,…`) as image bytes; `None` when it is not an image.
fn preview_image(data_url: &str) -> Option<(bytes::Bytes, ImageFormat)> {
    let (_, b64) = data_url.strip_prefix("data:")?.split_once(";base64,")?;
    let bytes = crate::media::decode_base64(b64).ok()?;
    let format = crate::media::sniff(&bytes)?;
    Some((bytes, format))
}

#[cfg(test)]
mod preview_tests {
    use super::*;

    #[test]
    fn progress_images_are_read_from_their_data_url() {
        let png = b"\x89PNG\r\n\x1a\n rest";
        let url = crate::media::data_url(png, ImageFormat::Png);
        let (bytes, format) = preview_image(&url).unwrap();
        assert_eq!((&bytes[..], format), (&png[..], ImageFormat::Png));
        assert!(preview_image("data:image/png;base64,aGVsbG8=").is_none(), "not an image");
        assert!(preview_image("https://h/x.png").is_none());
    }
}
