//! InvokeAI's progress socket, read just enough to report progress and wake the poller early: Socket.IO over
//! Engine.IO v4 on a plain WebSocket at `{url}/ws/socket.io/?EIO=4&transport=websocket`. The handshake is the
//! server's open packet (`0{…}`), the client's namespace connect (`40`, with `{"token"}` when the backend has an
//! `api_key`), the server's `40{…}`, then `42["subscribe_queue",{"queue_id"}]`; the server's pings (`2`) are
//! answered with `3`. Events are `42["<name>",{…}]`; only those whose `destination` is the call's are read.
//!
//! The socket is an accelerator, never the source of truth: item status always comes from polling. If it cannot
//! be opened (an `https` backend, a proxy without WebSocket support), or drops, the call goes on polling every
//! `poll_interval`, without step progress.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backends::client::Http;

/// How long opening the socket (connect and handshake) may take before the call polls without it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The call's subscription to its items' events.
pub struct Events {
    socket: Socket,
    /// The call's `destination`: events of other clients' items are skipped.
    destination: String,
}

/// What the socket said about the item being waited for.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemUpdate {
    /// A node reported how far it is (denoising steps): 0.0–1.0, with the preview's `data:` URL when it sent one.
    Progress(f64, Option<String>),
    /// The item's status changed: poll it now.
    StatusChanged,
}

/// One Socket.IO event payload as InvokeAI sends it (only the fields read here).
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    item_id: Option<i64>,
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    percentage: Option<f64>,
    /// `invocation_progress`'s preview: `{width, height, dataURL}` or null.
    #[serde(default)]
    image: Option<ProgressImage>,
}

#[derive(Debug, Deserialize)]
struct ProgressImage {
    #[serde(rename = "dataURL")]
    data_url: String,
}

impl Events {
    /// Opens the socket and subscribes to the backend's queue; `None` (logged) when that is not possible.
    pub async fn connect(http: &Http, destination: &str) -> Option<Self> {
        let base = http.cfg.endpoint("/ws/socket.io/?EIO=4&transport=websocket");
        // `wss` would need a TLS stack for the socket alone: such backends are polled.
        let url = format!("ws://{}", base.strip_prefix("http://")?);
        let token = http.cfg.api_key.as_ref().map(|k| k.expose().to_owned());
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake(&url, token, &http.cfg.queue_id)).await {
            Ok(Ok(socket)) => {
                tracing::debug!(backend = %http.cfg.name, destination, "InvokeAI progress socket subscribed.");
                Some(Self { socket, destination: destination.to_owned() })
            }
            Ok(Err(why)) => {
                tracing::info!(backend = %http.cfg.name, error = %why, "InvokeAI progress socket unavailable; polling only.");
                None
            }
            Err(_) => {
                tracing::info!(backend = %http.cfg.name, "InvokeAI progress socket did not open in time; polling only.");
                None
            }
        }
    }

    /// The next update about item `item_id` of this call; `None` once the socket is gone. Cancel-safe between
    /// messages, so it can race a poll timer.
    pub async fn next(&mut self, item_id: i64) -> Option<ItemUpdate> {
        loop {
            let text = match self.socket.next().await? {
                Ok(Message::Text(text)) => text,
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            };
            match text.as_str() {
                // Engine.IO ping: answer, or the server closes the socket.
                "2" => {
                    self.socket.send(Message::text("3")).await.ok()?;
                    continue;
                }
                // Engine.IO close, or Socket.IO disconnect.
                "1" | "41" => return None,
                _ => {}
            }
            let Some((name, payload)) = parse_event(text.as_str()) else { continue };
            if payload.destination.as_deref() != Some(self.destination.as_str()) || payload.item_id != Some(item_id) {
                continue;
            }
            match name.as_str() {
                "queue_item_status_changed" => return Some(ItemUpdate::StatusChanged),
                "invocation_progress" => {
                    if let Some(p) = payload.percentage.filter(|p| p.is_finite()) {
                        return Some(ItemUpdate::Progress(p.clamp(0.0, 1.0), payload.image.map(|i| i.data_url)));
                    }
                }
                _ => {}
            }
        }
    }
}

/// Connects, opens the default namespace and subscribes to the queue.
async fn handshake(url: &str, token: Option<String>, queue_id: &str) -> Result<Socket, String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| e.to_string())?;
    let open = next_text(&mut socket).await?;
    if !open.starts_with('0') {
        return Err(format!("expected an Engine.IO open packet, got {open:?}"));
    }
    let connect = match token {
        Some(token) => format!("40{}", json!({ "token": token })),
        None => "40".to_owned(),
    };
    socket.send(Message::text(connect)).await.map_err(|e| e.to_string())?;
    loop {
        let reply = next_text(&mut socket).await?;
        if reply.starts_with("40") {
            break;
        }
        if reply.starts_with("44") {
            return Err(format!("the server refused the Socket.IO connection: {reply}"));
        }
        if reply == "2" {
            socket.send(Message::text("3")).await.map_err(|e| e.to_string())?;
        }
    }
    let subscribe = format!("42{}", json!(["subscribe_queue", { "queue_id": queue_id }]));
    socket.send(Message::text(subscribe)).await.map_err(|e| e.to_string())?;
    Ok(socket)
}

async fn next_text(socket: &mut Socket) -> Result<String, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(_))) | None => return Err("the socket closed during the handshake".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

/// `42["name",{…}]` (optionally with a namespace or ack id before the array) → the event's name and payload.
fn parse_event(text: &str) -> Option<(String, Payload)> {
    let rest = text.strip_prefix("42")?;
    let array = &rest[rest.find('[')?..];
    let Value::Array(mut parts) = serde_json::from_str::<Value>(array).ok()? else { return None };
    if parts.len() < 2 {
        return None;
    }
    let payload = serde_json::from_value(parts.swap_remove(1)).ok()?;
    let Value::String(name) = parts.swap_remove(0) else { return None };
    Some((name, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_socket_io_events() {
        // As InvokeAI 6.14.2 sends it (fields trimmed).
        let (name, p) = parse_event(
            r#"42["invocation_progress",{"timestamp":1,"queue_id":"default","item_id":5,"batch_id":"b","origin":"easel","destination":"easel:x","session_id":"s","invocation_source_id":"denoise","message":"Step 3/10","percentage":0.3,"image":null}]"#,
        )
        .unwrap();
        assert_eq!(name, "invocation_progress");
        assert_eq!((p.item_id, p.destination.as_deref(), p.percentage), (Some(5), Some("easel:x"), Some(0.3)));
        let (name, p) =
            parse_event(r#"42/ns,["queue_item_status_changed",{"item_id":6,"status":"completed"}]"#).unwrap();
        assert_eq!((name.as_str(), p.item_id), ("queue_item_status_changed", Some(6)));
        let (_, p) = parse_event(
            r#"42["invocation_progress",{"item_id":5,"destination":"easel:x","percentage":0.5,"image":{"width":8,"height":8,"dataURL":"data:image/jpeg;base64,/9j/"}}]"#,
        )
        .unwrap();
        assert_eq!(p.image.map(|i| i.data_url).as_deref(), Some("data:image/jpeg;base64,/9j/"));
        assert!(parse_event("40{\"sid\":\"x\"}").is_none());
        assert!(parse_event("42[\"only_a_name\"]").is_none());
    }
}
