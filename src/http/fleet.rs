//! The fleet's view for `/v1/gateway/status`: this instance, the instances sharing the store (PostgreSQL; with
//! SQLite only this one), and with Redis the permits held across the fleet per backend and capability.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::ledger::{InstanceRow, Store};
use crate::state::AppState;

pub struct View {
    pub this: Value,
    pub fleet: Value,
}

pub async fn view(state: &AppState) -> View {
    let id = state.ledger.instance_id().unwrap_or_else(|| state.jobs.owner()).to_owned();
    let started_ms = state.started_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let this = json!({
        "id": id,
        "started_at": started_ms,
        "draining": state.drain.is_draining(),
        "draining_since": state.drain.since(),
        "in_flight": state.drain.in_flight(),
    });
    let (instances, error) = match state.ledger.instances().await {
        Ok(rows) if rows.is_empty() => (vec![self_row(state, &id, started_ms)], None),
        Ok(rows) => (rows, None),
        Err(e) => (vec![self_row(state, &id, started_ms)], Some(e.to_string())),
    };
    let mut fleet = json!({ "instances": instances });
    if let Some(e) = error {
        fleet["error"] = json!(format!("reading the instances failed: {e}"));
    }
    if state.cluster.fleet.is_some() {
        let mut inflight: BTreeMap<&str, BTreeMap<&'static str, Option<u64>>> = BTreeMap::new();
        for b in &state.backend_list {
            for (capability, gate) in &b.gates {
                inflight
                    .entry(b.cfg.name.as_str())
                    .or_default()
                    .insert(capability.as_str(), gate.fleet_inflight().await);
            }
        }
        // `null` for a gate whose count Redis did not give (Redis down).
        fleet["inflight"] = json!(inflight);
    }
    View { this, fleet }
}

/// This instance as the only one (SQLite: one server per database file).
fn self_row(state: &AppState, id: &str, started_ms: i64) -> InstanceRow {
    InstanceRow {
        id: id.to_owned(),
        started_at: started_ms,
        last_heartbeat: crate::ledger::now_ms(),
        draining_since: state.drain.since(),
        alive: true,
    }
}
