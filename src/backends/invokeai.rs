//! `invokeai`: an InvokeAI server (5.x and 6.x) running a graph template per model. Each image of a call renders
//! the graph with its own seed and is enqueued with `POST /api/v1/queue/{queue_id}/enqueue_batch`; easel follows
//! each queue item (`GET …/i/{item_id}` every `poll_interval`) to a terminal state, reads the output image names
//! from the session results of the graph's final nodes (those no edge leaves), and downloads them from
//! `/api/v1/images/i/{name}/full`. 6.x answers the enqueue with `item_ids`; for 5.x the items are found through
//! `GET …/list` by batch id. A failed item is a 502 with InvokeAI's error type and message; an invalid graph (422)
//! is the request's fault. When the client goes away the items are cancelled (`PUT …/i/{id}/cancel`). Edits
//! upload their inputs through `POST /api/v1/images/upload` and pass the `image_name`s to the template.
//!
//! Health: `GET /api/v1/app/version` (public); ready when `GET …/status` says the processor is started.

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::Http;
use super::workflow::{WorkflowVars, fresh_seed};
use super::{
    Backend, BackendError, Failure, ImageCall, ImageOutput, InputImage, ProbeReport, image_from_bytes,
    upload_edit_inputs,
};
use crate::config::BackendConfig;
use crate::telemetry::metrics as m;

pub const KIND: &str = "invokeai";

#[derive(Debug)]
pub struct InvokeAiBackend {
    http: Http,
}

impl InvokeAiBackend {
    pub fn new(cfg: Arc<BackendConfig>) -> Result<Self, String> {
        Ok(Self { http: Http::new(cfg)? })
    }

    fn queue_path(&self, rest: &str) -> String {
        format!("/api/v1/queue/{}{rest}", self.http.cfg.queue_id)
    }

    async fn upload(&self, img: &InputImage) -> Result<String, BackendError> {
        let (rb, url) =
            self.http.request(Method::POST, "/api/v1/images/upload?image_category=user&is_intermediate=true");
        let part = reqwest::multipart::Part::stream(reqwest::Body::from(img.bytes.clone()))
            .file_name(img.name.clone())
            .mime_str(img.format.mime())
            .map_err(|e| self.http.error(&url, Failure::InvalidResponse(e.to_string())))?;
        let resp = self.http.send(rb.multipart(reqwest::multipart::Form::new().part("file", part)), &url).await?;
        let dto: Value = self.http.json(resp, &url).await?;
        dto.get("image_name").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
            self.http.error(&url, Failure::InvalidResponse("the upload answer has no `image_name`".into()))
        })
    }

    /// Enqueues one graph; returns the batch id and the item ids (found by listing on 5.x).
    async fn enqueue(&self, graph: Value, destination: &str) -> Result<Vec<i64>, BackendError> {
        let (rb, url) = self.http.request(Method::POST, &self.queue_path("/enqueue_batch"));
        let body = json!({"prepend": false, "batch": {"graph": graph, "runs": 1, "origin": "easel", "destination": destination}});
        let resp = self.http.send(rb.json(&body), &url).await?;
        let result: Enqueued = self.http.json(resp, &url).await?;
        if let Some(ids) = result.item_ids.filter(|ids| !ids.is_empty()) {
            return Ok(ids);
        }
        // 5.x: no item_ids in the answer; find the batch's items in the queue list.
        let batch_id = result.batch.get("batch_id").and_then(Value::as_str).unwrap_or_default().to_owned();
        let (rb, url) = self.http.request(Method::GET, &self.queue_path("/list?limit=500"));
        let list: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
        let ids: Vec<i64> = list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|i| i["batch_id"] == batch_id.as_str())
                    .filter_map(|i| i["item_id"].as_i64())
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse(format!("batch {batch_id} was enqueued but none of its items is listed")),
            ));
        }
        Ok(ids)
    }

    async fn item(&self, id: i64) -> Result<Value, BackendError> {
        let (rb, url) = self.http.request(Method::GET, &self.queue_path(&format!("/i/{id}")));
        self.http.json(self.http.send(rb, &url).await?, &url).await
    }

    async fn cancel(&self, ids: &[i64]) {
        for id in ids {
            let (rb, url) = self.http.request(Method::PUT, &self.queue_path(&format!("/i/{id}/cancel")));
            if let Err(e) = self.http.send(rb, &url).await {
                tracing::warn!(backend = %self.http.cfg.name, item = id, error = %e, "Cancelling an InvokeAI item failed.");
            }
        }
    }

    /// Waits for one item to end; returns its output image names.
    async fn wait(&self, id: i64, sinks: &HashSet<String>) -> Result<Vec<String>, BackendError> {
        let url = self.http.cfg.endpoint(&self.queue_path(&format!("/i/{id}")));
        let mut last_status = String::new();
        loop {
            let item = self.item(id).await?;
            let status = item["status"].as_str().unwrap_or("").to_owned();
            if status != last_status {
                tracing::debug!(backend = %self.http.cfg.name, item = id, status = %status, "InvokeAI item status.");
                m::job_progress(&self.http.cfg.name, if status == "completed" { 1.0 } else { 0.0 }, 1.0);
                last_status.clone_from(&status);
            }
            match status.as_str() {
                "completed" => return Ok(outputs(&item, sinks)),
                "failed" => {
                    let kind = item["error_type"].as_str().unwrap_or("error");
                    let msg = item["error_message"].as_str().unwrap_or("no message");
                    return Err(self
                        .http
                        .error(&url, Failure::JobFailed(format!("InvokeAI item {id} failed: {kind}: {msg}"))));
                }
                "canceled" => {
                    return Err(self.http.error(&url, Failure::JobFailed(format!("InvokeAI item {id} was canceled"))));
                }
                _ => tokio::time::sleep(self.http.cfg.poll_interval).await,
            }
        }
    }

    async fn download(&self, name: &str) -> Result<ImageOutput, BackendError> {
        let (rb, url) = self.http.request(Method::GET, &format!("/api/v1/images/i/{name}/full"));
        let bytes = self.http.body(self.http.send(rb, &url).await?, &url).await?;
        image_from_bytes(bytes).map_err(|e| self.http.error(&url, Failure::InvalidResponse(e)))
    }
}

/// Image names produced by the graph's final nodes, via `source_prepared_mapping`.
fn outputs(item: &Value, sinks: &HashSet<String>) -> Vec<String> {
    let session = &item["session"];
    let mut names = Vec::new();
    let Some(mapping) = session["source_prepared_mapping"].as_object() else { return names };
    let mut sources: Vec<&String> = mapping.keys().filter(|k| sinks.contains(*k)).collect();
    sources.sort();
    for source in sources {
        for pid in mapping[source].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let result = &session["results"][pid];
            if result["type"] == "image_output"
                && let Some(name) = result["image"]["image_name"].as_str()
            {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// Nodes no edge leaves: the graph's outputs.
fn sink_nodes(graph: &Value) -> HashSet<String> {
    let sources: HashSet<&str> =
        graph["edges"].as_array().into_iter().flatten().filter_map(|e| e["source"]["node_id"].as_str()).collect();
    graph["nodes"]
        .as_object()
        .map(|nodes| nodes.keys().filter(|k| !sources.contains(k.as_str())).cloned().collect())
        .unwrap_or_default()
}

impl Backend for InvokeAiBackend {
    async fn generate_images(&self, call: ImageCall<'_>) -> Result<Vec<ImageOutput>, BackendError> {
        let Some(workflow) = call.model.workflow.as_ref() else {
            return Err(self.http.error("", Failure::Unsupported("run a model without a `workflow`")));
        };
        let (image, mask) = upload_edit_inputs(call.edit, |img| self.upload(img)).await?;
        let base_seed = call.seed.unwrap_or_else(fresh_seed);
        let destination = format!("easel:{}", uuid::Uuid::now_v7());
        let mut graphs = Vec::with_capacity(call.count as usize);
        for i in 0..u64::from(call.count) {
            let seed = base_seed.wrapping_add(i) & u64::from(u32::MAX);
            let vars = WorkflowVars::for_call(&call, seed, 1, image.as_deref(), mask.as_deref());
            graphs.push(
                workflow
                    .render(&vars)
                    .map_err(|e| self.http.error("", Failure::InvalidResponse(format!("rendering the graph: {e}"))))?,
            );
        }
        let sinks = graphs.first().map(sink_nodes).unwrap_or_default();
        let mut ids = Vec::new();
        for graph in graphs {
            match self.enqueue(graph, &destination).await {
                Ok(mut new) => ids.append(&mut new),
                Err(e) => {
                    self.cancel(&ids).await;
                    return Err(e);
                }
            }
        }
        // Lowest ids run first.
        ids.sort_unstable();
        let waited = async {
            let mut names = Vec::new();
            for id in &ids {
                names.extend(self.wait(*id, &sinks).await?);
            }
            Ok::<_, BackendError>(names)
        };
        let names = tokio::select! {
            r = waited => r?,
            () = call.cancel.cancelled() => {
                self.cancel(&ids).await;
                let url = self.http.cfg.endpoint(&self.queue_path("/enqueue_batch"));
                return Err(self.http.error(&url, Failure::JobFailed(format!("cancelled: the client went away (items {ids:?} canceled)"))));
            }
        };
        if names.is_empty() {
            let url = self.http.cfg.endpoint(&self.queue_path("/enqueue_batch"));
            return Err(self
                .http
                .error(&url, Failure::InvalidResponse("the graph's final nodes produced no image".into())));
        }
        let mut images = Vec::with_capacity(names.len());
        for name in names {
            images.push(self.download(&name).await?);
        }
        Ok(images)
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let (rb, url) = self.http.request(Method::GET, "/api/v1/app/version");
        let v: Value = self.http.json(self.http.send(rb, &url).await?, &url).await?;
        let Some(version) = v.get("version").and_then(Value::as_str).map(str::to_owned) else {
            return Err(self.http.error(
                &url,
                Failure::InvalidResponse("`/api/v1/app/version` has no `version`: is this InvokeAI?".into()),
            ));
        };
        let (rb, url) = self.http.request(Method::GET, &self.queue_path("/status"));
        let started = match self.http.send(rb, &url).await {
            Ok(resp) => self
                .http
                .json::<Value>(resp, &url)
                .await
                .ok()
                .and_then(|s| s["processor"]["is_started"].as_bool())
                .unwrap_or(true),
            Err(_) => true,
        };
        Ok(ProbeReport {
            ready: started,
            detail: format!("InvokeAI {version}{}", if started { "" } else { ", queue processor stopped" }),
        })
    }

    fn supports_edits(&self) -> bool {
        true
    }
}

#[derive(Debug, Deserialize)]
struct Enqueued {
    #[serde(default)]
    item_ids: Option<Vec<i64>>,
    #[serde(default)]
    batch: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_outputs_of_final_nodes_through_the_prepared_mapping() {
        let graph = json!({"nodes": {"blank": {}, "blur": {}}, "edges": [{"source": {"node_id": "blank", "field": "image"}, "destination": {"node_id": "blur", "field": "image"}}]});
        let sinks = sink_nodes(&graph);
        assert_eq!(sinks, HashSet::from(["blur".to_owned()]));
        let item = json!({"session": {"results": {"p1": {"type": "image_output", "image": {"image_name": "a.png"}}, "p2": {"type": "image_output", "image": {"image_name": "b.png"}}},
            "source_prepared_mapping": {"blank": ["p1"], "blur": ["p2"]}}});
        assert_eq!(outputs(&item, &sinks), ["b.png"]);
    }
}
