//! Listing stored outputs (the gallery): a key sees only what it made; without keys every output is listed.

use crate::api::files::{FileList, OutputFile};
use crate::error::Error;
use crate::ledger::{OutputEntry, Principal, SETTLE_WAIT, Store};
use crate::state::AppState;

/// One page of outputs, newest first, after the cursor `after`; URLs are built on `base_url`.
pub async fn list(
    state: &AppState,
    who: Option<&Principal>,
    after: Option<&str>,
    limit: u32,
    base_url: &str,
) -> Result<FileList, Error> {
    if let Some(who) = who {
        // What this key's answers just stored is recorded as they settle.
        state.settling.wait(Some(who.account_id), SETTLE_WAIT).await;
    }
    let mut rows = state.ledger.list_outputs(who.map(|w| w.key_id), limit + 1, after).await?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let base = base_url.trim_end_matches('/');
    let signed = |id: &str| format!("{base}/v1/files/{id}?{}", state.signer.query(id));
    let data: Vec<OutputFile> = rows.into_iter().map(|r| file(r, &signed)).collect();
    Ok(FileList {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more,
    })
}

fn file(r: OutputEntry, signed: &impl Fn(&str) -> String) -> OutputFile {
    let request = r.request.as_deref().and_then(|t| serde_json::from_str(t).ok()).unwrap_or(serde_json::Value::Null);
    let mime_type = r
        .mime
        .or_else(|| crate::storage::mime_of(&r.id).map(str::to_owned))
        .unwrap_or_else(|| "application/octet-stream".into());
    OutputFile {
        url: signed(&r.id),
        poster_url: r.poster.as_deref().map(signed),
        object: "file",
        bytes: r.bytes.unwrap_or(0),
        created_at: r.created_at / 1000,
        filename: r.id.clone(),
        purpose: "output",
        status: "processed",
        kind: r.kind.unwrap_or_else(|| "image".into()),
        mime_type,
        model: r.model,
        request,
        id: r.id,
    }
}
