//! `restart` of one managed backend: refused while it has work (unless forced) or while its host is between sets,
//! then stop (signal, grace, SIGKILL to the group), start and the readiness probe.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::scheduler::Phase;
use super::{SetError, Sets};
use crate::process::{Processes, State};
use crate::routing::BackendHandle;

impl Sets {
    /// Restarts the managed backend `name` and waits until it is ready again. Easel's work on it (admission
    /// permits held and queued, requests past the working-set check) makes it `InUse` unless `force`; a member of
    /// a working set restarts only while its host has that set active.
    pub async fn restart(
        &self,
        processes: &Processes,
        backends: &HashMap<String, Arc<BackendHandle>>,
        name: &str,
        force: bool,
    ) -> Result<State, SetError> {
        let Some(handle) = backends.get(name).filter(|_| processes.manages(name)) else {
            return Err(SetError::NotManaged(name.to_owned()));
        };
        if let Some(host) = self.host_of(name) {
            let snap = host.snapshot.lock().map(|s| (s.0.clone(), s.1.contains(name))).ok();
            match snap {
                Some((Phase::Active { .. }, true)) => {}
                Some((phase, _)) => {
                    let why = match phase {
                        Phase::Active { set } => format!("host `{}` has `{set}` active, which lacks it", host.cfg.name),
                        Phase::Idle => format!("host `{}` is idle; activate one of its sets", host.cfg.name),
                        _ => format!("host `{}` is switching working sets; try again after the swap", host.cfg.name),
                    };
                    return Err(SetError::NotRunning { backend: name.to_owned(), why });
                }
                None => return Err(SetError::NotRunning { backend: name.to_owned(), why: "state unknown".into() }),
            }
        }
        let in_flight = handle.gates.values().map(|g| g.inflight() + g.queued()).sum::<u32>()
            + self.passes.get(name).map_or(0, |c| c.load(Ordering::Acquire));
        if in_flight > 0 && !force {
            return Err(SetError::InUse { backend: name.to_owned(), in_flight });
        }
        tracing::info!(backend = %name, in_flight, force, "Restarting the managed backend.");
        // Counted as work on the member while it restarts, so its host neither drains it away nor idles it meanwhile.
        let _busy = self.passes.get(name).map(|c| {
            c.fetch_add(1, Ordering::AcqRel);
            super::Pass { counters: vec![Arc::clone(c)], interrupts: Vec::new() }
        });
        match processes.restart(name).await {
            Some(State::Ready) => Ok(State::Ready),
            Some(state) => {
                let error = processes
                    .snapshots(1)
                    .into_iter()
                    .find(|s| s.backend == name)
                    .and_then(|s| s.error.or(s.last_exit))
                    .unwrap_or_else(|| format!("it is {}", state.as_str()));
                Err(SetError::RestartFailed { backend: name.to_owned(), error })
            }
            None => Err(SetError::NotManaged(name.to_owned())),
        }
    }

    /// The host whose working sets hold `backend`.
    fn host_of(&self, backend: &str) -> Option<&Arc<super::HostShared>> {
        let (host, _) = self.sets.values().find(|(_, members)| members.contains(backend))?;
        self.hosts.get(host)
    }
}
