//! `processes.json` in the data directory: the pid, group, argv and start time of every child easel runs, so the
//! next start can kill groups a killed easel left behind (and never a process that merely reuses a pid).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::os::{self, Signal};

/// One running child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    pub pgid: u32,
    pub cmd: Vec<String>,
    /// `/proc/<pid>/stat` start time (clock ticks since boot).
    pub start_ticks: u64,
    /// RFC 3339, for people reading the file.
    pub started_at: String,
}

/// The file and the entries it holds, by backend name.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path, entries: Mutex::new(BTreeMap::new()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the entries a previous easel left (empty when there is no file or it is unreadable).
    pub fn read(path: &Path) -> BTreeMap<String, Entry> {
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Kills every recorded group whose leader still runs the recorded command since the recorded start time,
    /// then empties the file. Returns one line per group killed.
    pub async fn reap_leftovers(&self) -> Vec<String> {
        let mut reports = Vec::new();
        for (backend, e) in Self::read(&self.path) {
            if os::start_time(e.pid) != Some(e.start_ticks) || !os::runs(e.pid, &e.cmd) {
                continue;
            }
            let _ = os::signal_group(e.pgid, Signal::Kill);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while os::group_alive(e.pgid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            tracing::warn!(backend = %backend, pid = e.pid, "Killed the process group a previous easel left running.");
            reports.push(format!("{backend}: killed leftover pid {} ({})", e.pid, os::display_cmd(&e.cmd)));
        }
        self.save(&BTreeMap::new());
        reports
    }

    pub fn record(&self, backend: &str, entry: Entry) {
        let snapshot = self.with(|m| {
            m.insert(backend.to_owned(), entry);
            m.clone()
        });
        self.save(&snapshot);
    }

    pub fn remove(&self, backend: &str) {
        let snapshot = self.with(|m| m.remove(backend).map(|_| m.clone()));
        if let Some(s) = snapshot {
            self.save(&s);
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>) -> T) -> T {
        match self.entries.lock() {
            Ok(mut m) => f(&mut m),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Writes atomically (temporary file, then rename); a failure is logged, supervision goes on.
    fn save(&self, entries: &BTreeMap<String, Entry>) {
        let result = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "Cannot write the process state file.");
        }
    }
}
