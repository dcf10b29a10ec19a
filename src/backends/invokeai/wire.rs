//! InvokeAI's wire shapes as easel uses them: the `enqueue_batch` body (borrowing the rendered graph), the
//! enqueue answer (6.x `item_ids`, 5.x only the batch), queue items with their session, the 5.x queue list, and
//! reading output image names out of a session (results are keyed by *prepared* node ids, reached through
//! `source_prepared_mapping`). Pure data and functions: no I/O here.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /api/v1/queue/{queue_id}/enqueue_batch`: two top-level keys, because FastAPI embeds several body
/// parameters.
#[derive(Debug, Serialize)]
pub struct EnqueueBody<'a> {
    pub prepend: bool,
    pub batch: Batch<'a>,
}

/// One graph, run once. `data` is left out: each image of a call is its own batch with its own rendered graph,
/// so templates may put the seed anywhere (batch data can only replace a node's top-level field).
#[derive(Debug, Serialize)]
pub struct Batch<'a> {
    pub graph: &'a Value,
    pub runs: u32,
    /// Echoed on queue items and events: tells an operator where the item came from.
    pub origin: &'a str,
    /// Unique per call, so an operator (or `cancel_by_destination`) can find the call's items.
    pub destination: &'a str,
}

/// The enqueue answer. `item_ids` exists from 6.0 on; 5.x only says which batch was created.
#[derive(Debug, Deserialize)]
pub struct Enqueued {
    #[serde(default)]
    pub enqueued: Option<u32>,
    #[serde(default)]
    pub item_ids: Option<Vec<i64>>,
    pub batch: EnqueuedBatch,
}

#[derive(Debug, Deserialize)]
pub struct EnqueuedBatch {
    pub batch_id: String,
}

/// `QUEUE_ITEM_STATUS`; `waiting` (6.14+) is an item blocked on a called sub-workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    InProgress,
    Waiting,
    Completed,
    Failed,
    Canceled,
    /// A status a newer InvokeAI added: treated as "not finished yet".
    #[serde(other)]
    Other,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

/// `GET /api/v1/queue/{queue_id}/i/{item_id}`: a `SessionQueueItem`, only the fields easel reads.
#[derive(Debug, Deserialize)]
pub struct QueueItem {
    pub item_id: i64,
    pub status: Status,
    #[serde(default)]
    pub error_type: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub session: Option<Session>,
}

/// The item's `GraphExecutionState`, as far as outputs go.
#[derive(Debug, Default, Deserialize)]
pub struct Session {
    /// Prepared node id → invocation output (`{"type": "image_output", "image": {"image_name"}, …}`).
    #[serde(default)]
    pub results: HashMap<String, Value>,
    /// Graph (source) node id → the prepared ids it expanded to.
    #[serde(default)]
    pub source_prepared_mapping: HashMap<String, Vec<String>>,
}

/// `GET /api/v1/queue/{queue_id}/list` (5.x – 6.6): a cursor page of items without their sessions.
#[derive(Debug, Deserialize)]
pub struct ListPage {
    pub items: Vec<ListedItem>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Deserialize)]
pub struct ListedItem {
    pub item_id: i64,
    pub batch_id: String,
    #[serde(default)]
    pub priority: i64,
}

/// `GET /api/v1/queue/{queue_id}/status`, the part easel reads.
#[derive(Debug, Deserialize)]
pub struct QueueStatus {
    pub queue: QueueCounts,
    pub processor: Processor,
}

#[derive(Debug, Deserialize)]
pub struct QueueCounts {
    /// The item being processed, if any: every item enqueued later has a larger id.
    #[serde(default)]
    pub item_id: Option<i64>,
    #[serde(default)]
    pub pending: u64,
    #[serde(default)]
    pub in_progress: u64,
}

#[derive(Debug, Deserialize)]
pub struct Processor {
    pub is_started: bool,
    /// The processor still holds an item: after a cancel, until the running node has really stopped.
    #[serde(default)]
    pub is_processing: bool,
}

/// Upload answer (an `ImageDTO`), only the name.
#[derive(Debug, Deserialize)]
pub struct Uploaded {
    pub image_name: String,
}

/// The graph's output nodes: those no edge leaves. Their image results are the call's images; images of
/// intermediate nodes (every image node saves one on InvokeAI) are ignored.
pub fn output_nodes(graph: &Value) -> BTreeSet<String> {
    let feeding: BTreeSet<&str> = graph
        .get("edges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.pointer("/source/node_id").and_then(Value::as_str))
        .collect();
    graph
        .get("nodes")
        .and_then(Value::as_object)
        .map(|nodes| nodes.keys().filter(|id| !feeding.contains(id.as_str())).cloned().collect())
        .unwrap_or_default()
}

/// The image names the output nodes produced, in node-id order (then prepared-id order within a node that
/// expanded to several, e.g. inside an iterate/collect).
pub fn output_images(session: &Session, nodes: &BTreeSet<String>) -> Vec<String> {
    let mut names = Vec::new();
    for node in nodes {
        let Some(prepared) = session.source_prepared_mapping.get(node) else { continue };
        let mut prepared: Vec<&String> = prepared.iter().collect();
        prepared.sort();
        for id in prepared {
            let Some(result) = session.results.get(id) else { continue };
            if result.get("type").and_then(Value::as_str) != Some("image_output") {
                continue;
            }
            if let Some(name) = result.pointer("/image/image_name").and_then(Value::as_str) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// An image name as one URL path segment (names are `<uuid>.png` on a real server; anything else is escaped).
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outputs_come_from_the_final_nodes_through_the_prepared_mapping() {
        let graph = json!({
            "nodes": {"blank": {"id": "blank"}, "blur": {"id": "blur"}, "resize": {"id": "resize"}},
            "edges": [
                {"source": {"node_id": "blank", "field": "image"}, "destination": {"node_id": "blur", "field": "image"}},
                {"source": {"node_id": "blur", "field": "image"}, "destination": {"node_id": "resize", "field": "image"}}
            ]
        });
        let nodes = output_nodes(&graph);
        assert_eq!(nodes.iter().map(String::as_str).collect::<Vec<_>>(), ["resize"]);
        // Shaped as InvokeAI 6.14.2 answered for this graph (ids shortened).
        let item: QueueItem = serde_json::from_value(json!({
            "item_id": 7, "status": "completed", "error_type": null, "error_message": null,
            "session": {
                "id": "s", "results": {
                    "b448d631": {"image": {"image_name": "c1.png"}, "width": 128, "height": 96, "type": "image_output"},
                    "0b9e": {"image": {"image_name": "a1.png"}, "width": 256, "height": 192, "type": "image_output"},
                    "77aa": {"image": {"image_name": "b1.png"}, "width": 256, "height": 192, "type": "image_output"}
                },
                "source_prepared_mapping": {"resize": ["b448d631"], "blank": ["0b9e"], "blur": ["77aa"]},
                "prepared_source_mapping": {"b448d631": "resize", "0b9e": "blank", "77aa": "blur"},
                "errors": {}
            }
        }))
        .unwrap();
        assert_eq!(item.status, Status::Completed);
        assert_eq!(output_images(&item.session.unwrap_or_default(), &nodes), ["c1.png"]);
    }

    #[test]
    fn unknown_statuses_are_not_terminal_and_5x_answers_parse() {
        let item: QueueItem =
            serde_json::from_value(json!({"item_id": 1, "status": "suspended_somehow", "session": null})).unwrap();
        assert_eq!(item.status, Status::Other);
        assert!(!item.status.is_terminal());
        let five: Enqueued = serde_json::from_value(json!({
            "queue_id": "default", "enqueued": 1, "requested": 1, "priority": 0,
            "batch": {"batch_id": "abc", "graph": {}, "runs": 1}
        }))
        .unwrap();
        assert!(five.item_ids.is_none());
        assert_eq!(five.batch.batch_id, "abc");
    }

    #[test]
    fn image_names_are_escaped_as_path_segments() {
        assert_eq!(path_segment("3f2a-b_c.png"), "3f2a-b_c.png");
        assert_eq!(path_segment("a b/../c?.png"), "a%20b%2F..%2Fc%3F.png");
    }
}
