//! Managed backend processes (`process:` on a backend): spawn each in its own process group, keep its output in a
//! ring buffer, wait for the kind's native probe, restart it after crashes with exponential backoff, and stop it
//! with the stop signal, `grace`, then SIGKILL to the whole group. A state file lets the next start kill groups a
//! killed easel left behind. One supervising task per backend owns its process; [`Processes::start`],
//! [`Processes::stop`] and [`Processes::state`] are how others drive it.

pub mod os;
pub mod port;
pub mod ring;
pub mod statefile;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{oneshot, watch};

use self::os::Signal;
use self::ring::Ring;
use self::statefile::{Entry, StateFile};
use crate::backends::{BackendError, Failure, ProbeReport};
use crate::config::ProcessConfig;
use crate::routing::BackendHandle;

/// How often readiness is probed while a process starts, and group exit is checked while it stops.
const PROBE_EVERY: Duration = Duration::from_millis(200);
const GROUP_POLL: Duration = Duration::from_millis(25);
/// Longest wait for a group to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// The longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Where a managed backend's process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Stopped,
    Starting,
    Ready,
    Stopping,
    /// Gave up (start failed, not ready in time, or restarts exhausted); `start` tries again.
    Failed,
    /// Crashed; waiting before the next restart.
    Backoff,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Failed => "failed",
            State::Backoff => "backoff",
        }
    }
}

#[derive(Debug, Clone)]
struct Status {
    state: State,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
    error: Option<String>,
    started_at: Option<SystemTime>,
    /// The `start` generation the supervisor is serving.
    epoch: u64,
}

/// What `GET /v1/admin/processes` and `easel doctor` show for one managed backend.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub backend: String,
    pub state: State,
    pub pid: Option<u32>,
    /// The process group (the same number as `pid`: each child leads its own group).
    pub pgid: Option<u32>,
    pub port: u16,
    pub cmd: Vec<String>,
    /// Restarts after unexpected exits since easel started.
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<String>,
    /// The last output lines (stdout and stderr), oldest first.
    pub lines: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desired {
    up: bool,
    /// Bumped by every `start`, so a failed backend tries again.
    epoch: u64,
}

#[derive(Debug)]
struct Member {
    backend: Arc<BackendHandle>,
    cfg: ProcessConfig,
    probe_timeout: Duration,
    status: watch::Sender<Status>,
    desired: watch::Sender<Desired>,
    /// True while an admin restart runs (its stop phase looks like any stop otherwise).
    restarting: watch::Sender<bool>,
    log: Arc<Mutex<Ring>>,
    files: Arc<StateFile>,
}

/// Every managed backend's supervisor. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Processes {
    members: Arc<BTreeMap<String, Arc<Member>>>,
}

/// Why a run of the process ended.
enum End {
    /// Asked to stop; the group is gone.
    Stopped,
    /// Gave up; the group is gone.
    Failed,
}

impl Processes {
    /// One supervisor per backend with a `process:` block; nothing runs until [`Processes::launch`].
    pub fn new(backends: &[Arc<BackendHandle>], state_file: PathBuf, probe_timeout: Duration) -> Self {
        let files = Arc::new(StateFile::new(state_file));
        let members = backends
            .iter()
            .filter_map(|b| {
                let cfg = b.cfg.process.clone()?;
                let status = Status {
                    state: State::Stopped,
                    pid: None,
                    restarts: 0,
                    last_exit: None,
                    error: None,
                    started_at: None,
                    epoch: 0,
                };
                let member = Member {
                    backend: Arc::clone(b),
                    cfg,
                    probe_timeout,
                    status: watch::Sender::new(status),
                    desired: watch::Sender::new(Desired { up: false, epoch: 0 }),
                    restarting: watch::Sender::new(false),
                    log: Arc::default(),
                    files: Arc::clone(&files),
                };
                Some((b.cfg.name.clone(), Arc::new(member)))
            })
            .collect();
        Self { members: Arc::new(members) }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kills groups a previous easel left (see [`StateFile::reap_leftovers`]), starts one supervising task per
    /// managed backend, and asks each to start (lifecycle `always`).
    pub async fn launch(&self) {
        self.launch_except(&std::collections::BTreeSet::new()).await;
    }

    /// [`Processes::launch`], but the backends in `held` only get their supervisor: they start when asked (a
    /// working set's host starts them).
    pub async fn launch_except(&self, held: &std::collections::BTreeSet<String>) {
        let Some(first) = self.members.values().next() else { return };
        for line in first.files.reap_leftovers().await {
            tracing::warn!("{line}");
        }
        for (name, m) in self.members.iter() {
            warn_if_not_on_path(name, &m.cfg);
            tokio::spawn(supervise(Arc::clone(m)));
            if held.contains(name) {
                continue;
            }
            m.desired.send_modify(|d| {
                d.up = true;
                d.epoch += 1;
            });
        }
    }

    /// Asks `name` to run and waits until it is ready or has failed; `None` for a backend easel does not manage.
    pub async fn start(&self, name: &str) -> Option<State> {
        let m = self.members.get(name)?;
        let mut rx = m.status.subscribe();
        let running = matches!(rx.borrow().state, State::Starting | State::Ready | State::Backoff);
        let mut epoch = 0;
        m.desired.send_modify(|d| {
            // A running process is left alone; a stopped or failed one starts afresh.
            if !(running && d.up) {
                d.epoch += 1;
            }
            d.up = true;
            epoch = d.epoch;
        });
        let end =
            rx.wait_for(|s| s.epoch >= epoch && matches!(s.state, State::Ready | State::Failed | State::Stopped)).await;
        Some(end.map_or(State::Stopped, |s| s.state))
    }

    /// Asks `name` to stop and waits until its group is gone.
    pub async fn stop(&self, name: &str) -> Option<State> {
        let m = self.members.get(name)?;
        let mut rx = m.status.subscribe();
        m.desired.send_modify(|d| d.up = false);
        let end = rx.wait_for(|s| matches!(s.state, State::Stopped | State::Failed)).await;
        Some(end.map_or(State::Stopped, |s| s.state))
    }

    /// Stops `name` (stop signal, `grace`, then SIGKILL to the group), starts it again and waits until it is ready
    /// or has failed; `None` for a backend easel does not manage.
    pub async fn restart(&self, name: &str) -> Option<State> {
        let m = self.members.get(name)?;
        m.restarting.send_replace(true);
        // Cleared however the restart ends (even when its caller goes away).
        struct Done<'a>(&'a watch::Sender<bool>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.send_replace(false);
            }
        }
        let _done = Done(&m.restarting);
        self.stop(name).await?;
        self.start(name).await
    }

    /// Whether `name` is on its way back: being restarted, or starting (or waiting to restart after a crash)
    /// while it is meant to run. Work for it is better held than sent to a closed port.
    pub fn coming_back(&self, name: &str) -> bool {
        self.members.get(name).is_some_and(|m| {
            *m.restarting.borrow()
                || (m.desired.borrow().up && matches!(m.status.borrow().state, State::Starting | State::Backoff))
        })
    }

    /// Waits, at most `within`, until `name` is no longer [`Self::coming_back`] (ready, failed or stopped).
    pub async fn until_back(&self, name: &str, within: Duration) {
        let Some(m) = self.members.get(name) else { return };
        let (mut status, mut restarting, mut desired) =
            (m.status.subscribe(), m.restarting.subscribe(), m.desired.subscribe());
        let _ = tokio::time::timeout(within, async {
            while self.coming_back(name) {
                tokio::select! {
                    r = status.changed() => if r.is_err() { return },
                    r = restarting.changed() => if r.is_err() { return },
                    r = desired.changed() => if r.is_err() { return },
                }
            }
        })
        .await;
    }

    /// Whether easel manages `name`'s process.
    pub fn manages(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// The current state of `name`.
    pub fn state(&self, name: &str) -> Option<State> {
        self.members.get(name).map(|m| m.status.borrow().state)
    }

    /// Why `name` gave up, with its last `lines` output lines; `None` unless it is [`State::Failed`].
    pub fn failure(&self, name: &str, lines: usize) -> Option<String> {
        let m = self.members.get(name)?;
        let snap = m.snapshot(name, lines);
        if snap.state != State::Failed {
            return None;
        }
        let why = snap.error.or(snap.last_exit).unwrap_or_else(|| "it gave up".into());
        if snap.lines.is_empty() {
            return Some(why);
        }
        Some(format!("{why}; its last output: {}", snap.lines.join(" | ")))
    }

    /// Every managed backend with its last `lines` output lines.
    pub fn snapshots(&self, lines: usize) -> Vec<Snapshot> {
        self.members.iter().map(|(name, m)| m.snapshot(name, lines)).collect()
    }

    /// Stops every managed process (stop signal, `grace`, then SIGKILL to the group), all at once.
    pub async fn shutdown(&self) {
        let names: Vec<&String> = self.members.keys().collect();
        futures_util::future::join_all(names.into_iter().map(|n| self.stop(n))).await;
    }
}

/// `processes.json` beside the files directory (in the data directory: `data/` for the default `data/files`).
pub fn state_file_path(files: &std::path::Path) -> PathBuf {
    match files.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("processes.json"),
        _ => files.join("processes.json"),
    }
}

fn warn_if_not_on_path(name: &str, cfg: &ProcessConfig) {
    let Some(program) = cfg.cmd.first() else { return };
    if program.contains('/') {
        return;
    }
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        tracing::warn!(backend = %name, program = %program, "The managed backend's program is not on PATH; starting it will fail.");
    }
}

impl Member {
    fn name(&self) -> &str {
        &self.backend.cfg.name
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    fn snapshot(&self, name: &str, lines: usize) -> Snapshot {
        let s = self.status.borrow().clone();
        let lines = match self.log.lock() {
            Ok(r) => r.tail(lines),
            Err(poisoned) => poisoned.into_inner().tail(lines),
        };
        Snapshot {
            backend: name.to_owned(),
            state: s.state,
            pid: s.pid,
            pgid: s.pid,
            port: self.cfg.port,
            cmd: self.cfg.cmd.clone(),
            restarts: s.restarts,
            last_exit: s.last_exit,
            error: s.error,
            started_at: s.started_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            lines,
        }
    }

    fn log_line(&self, line: &str) {
        match self.log.lock() {
            Ok(mut r) => r.push(line),
            Err(poisoned) => poisoned.into_inner().push(line),
        }
    }

    fn fail(&self, message: String) {
        tracing::error!(backend = %self.name(), "{message}");
        self.mark_unhealthy(&message);
        self.set(|s| {
            s.state = State::Failed;
            s.pid = None;
            s.error = Some(message);
        });
    }

    fn mark_unhealthy(&self, message: &str) {
        let cfg = &self.backend.cfg;
        let err = BackendError::new(&cfg.name, cfg.kind, cfg.endpoint(""), Failure::Connect(message.to_owned()));
        self.backend.health.record_probe(&Err(err), Duration::ZERO);
    }

    /// Runs the process until asked to stop or until it gives up, restarting it after crashes.
    async fn run(&self, desired: &mut watch::Receiver<Desired>) -> End {
        let mut streak = 0u32;
        loop {
            if let Some(holder) = port::holder(self.cfg.port) {
                self.fail(format!(
                    "cannot start backend `{}`: {}; stop it or change the backend's url and process port",
                    self.name(),
                    holder.describe(self.cfg.port)
                ));
                return End::Failed;
            }
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    self.fail(format!("cannot start `{}`: {e}", os::display_cmd(&self.cfg.cmd)));
                    return End::Failed;
                }
            };
            let ready = tokio::select! {
                r = self.wait_ready() => Some(r),
                () = child.exited() => None,
                () = wanted_down(desired) => {
                    self.stop_child(&mut child).await;
                    return End::Stopped;
                }
            };
            match ready {
                Some(Ok(report)) => {
                    tracing::info!(backend = %self.name(), pid = child.pid, "Managed backend is ready.");
                    self.backend.health.record_probe(&Ok(report), Duration::ZERO);
                    self.set(|s| {
                        s.state = State::Ready;
                        s.error = None;
                    });
                    let ready_at = Instant::now();
                    tokio::select! {
                        () = child.exited() => {}
                        () = wanted_down(desired) => {
                            self.stop_child(&mut child).await;
                            return End::Stopped;
                        }
                    }
                    if ready_at.elapsed() >= self.cfg.restart_reset_after {
                        streak = 0;
                    }
                }
                Some(Err(message)) => {
                    self.stop_child(&mut child).await;
                    self.fail(message);
                    return End::Failed;
                }
                None => {}
            }
            // The process exited on its own.
            let exit = child.exit.clone().unwrap_or_else(|| "exited".into());
            self.reap_group(&mut child).await;
            self.log_line(&format!("[easel] the process {exit}"));
            self.mark_unhealthy(&format!("the managed process {exit}"));
            streak += 1;
            if streak > self.cfg.restart_max {
                self.fail(format!(
                    "backend `{}`: the process {exit}; gave up after {} restart{}",
                    self.name(),
                    self.cfg.restart_max,
                    if self.cfg.restart_max == 1 { "" } else { "s" }
                ));
                return End::Failed;
            }
            let delay = self.cfg.restart_backoff.saturating_mul(1 << (streak - 1).min(16)).min(MAX_BACKOFF);
            tracing::warn!(backend = %self.name(), delay_ms = delay.as_millis() as u64, "Managed process {exit}; restarting.");
            self.set(|s| {
                s.state = State::Backoff;
                s.restarts += 1;
                s.pid = None;
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wanted_down(desired) => {
                    self.set(|s| s.state = State::Stopped);
                    return End::Stopped;
                }
            }
        }
    }

    /// Spawns the command in its own process group with its output piped into the ring buffer.
    fn spawn(&self) -> std::io::Result<Child> {
        let cfg = &self.cfg;
        let (program, args) = cfg.cmd.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(&cfg.env)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = &cfg.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().ok_or_else(|| std::io::Error::other("the child exited at once"))?;
        let started = SystemTime::now();
        self.files.record(
            self.name(),
            Entry {
                pid,
                pgid: pid,
                cmd: cfg.cmd.clone(),
                start_ticks: os::start_time(pid).unwrap_or(0),
                started_at: humantime::format_rfc3339_seconds(started).to_string(),
            },
        );
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, Arc::clone(&self.log)));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, Arc::clone(&self.log)));
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(describe_exit(status));
        });
        tracing::info!(backend = %self.name(), pid, cmd = %os::display_cmd(&cfg.cmd), "Started the managed backend.");
        self.log_line(&format!("[easel] started pid {pid}: {}", os::display_cmd(&cfg.cmd)));
        self.set(|s| {
            s.state = State::Starting;
            s.pid = Some(pid);
            s.started_at = Some(started);
        });
        Ok(Child { pid, exit_rx: rx, exit: None })
    }

    /// Probes until the kind's native probe passes, or `ready_timeout` runs out (an error message).
    async fn wait_ready(&self) -> Result<ProbeReport, String> {
        let deadline = Instant::now() + self.cfg.ready_timeout;
        let mut last = String::from("no probe finished");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "backend `{}` was not ready {}s after starting (last probe: {last})",
                    self.name(),
                    self.cfg.ready_timeout.as_secs_f64()
                ));
            }
            match crate::health::probe_one(&self.backend, self.probe_timeout.min(left)).await {
                Ok(report) if report.ready => return Ok(report),
                Ok(report) => last = format!("not ready: {}", report.detail),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(PROBE_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// The stop signal (or `stop.cmd`), up to `grace` for the group to go, then SIGKILL to the group.
    async fn stop_child(&self, child: &mut Child) {
        self.set(|s| s.state = State::Stopping);
        let cfg = &self.cfg;
        // Descendants that left the group (setsid) are found before the signal, while their parent still runs:
        // once it exits they are re-parented and no longer traceable. They get the same signal; the group's end
        // does not wait for them, the kill after it does.
        let escaped = os::escapees(child.pid);
        match &cfg.stop_cmd {
            Some(stop) => {
                let run = tokio::process::Command::new(&stop[0])
                    .args(&stop[1..])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status();
                if let Ok(Err(e)) = tokio::time::timeout(cfg.grace, run).await {
                    tracing::warn!(backend = %self.name(), error = %e, "The stop command failed; killing the group.");
                }
            }
            None => {
                let _ = os::signal_group(child.pid, Signal::Stop(cfg.stop_signal));
            }
        }
        if cfg.stop_cmd.is_none() {
            for (pid, start) in &escaped {
                os::signal_pid(*pid, *start, Signal::Stop(cfg.stop_signal));
            }
        }
        let gone = tokio::time::timeout(cfg.grace, async {
            child.exited().await;
            wait_group_gone(child.pid).await;
        })
        .await;
        if gone.is_err() {
            tracing::warn!(backend = %self.name(), grace_s = cfg.grace.as_secs_f64(), "The managed process outlived its grace period; killing its group.");
        }
        self.reap_group(child).await;
        self.reap_escapees(&escaped).await;
        let exit = child.exit.clone();
        self.set(|s| {
            s.state = State::Stopped;
            s.pid = None;
            s.last_exit = exit;
        });
    }

    /// SIGKILL to the processes that left the group and still run, then waits for them to vanish.
    async fn reap_escapees(&self, escaped: &[(u32, u64)]) {
        let killed: Vec<(u32, u64)> =
            escaped.iter().copied().filter(|(pid, start)| os::signal_pid(*pid, *start, Signal::Kill)).collect();
        if killed.is_empty() {
            return;
        }
        let pids: Vec<String> = killed.iter().map(|(p, _)| p.to_string()).collect();
        self.log_line(&format!("[easel] killed {} that left the process group: pid {}", pids.len(), pids.join(", ")));
        tracing::warn!(backend = %self.name(), pids = %pids.join(","), "Killed processes that had left the managed group.");
        let _ = tokio::time::timeout(KILL_WAIT, async {
            while killed.iter().any(|(pid, start)| os::start_time(*pid) == Some(*start)) {
                tokio::time::sleep(GROUP_POLL).await;
            }
        })
        .await;
    }

    /// SIGKILL to whatever is left of the group, waits for it to vanish, and forgets it in the state file.
    async fn reap_group(&self, child: &mut Child) {
        if os::group_alive(child.pid) {
            let _ = os::signal_group(child.pid, Signal::Kill);
        }
        let _ = tokio::time::timeout(KILL_WAIT, async {
            child.exited().await;
            wait_group_gone(child.pid).await;
        })
        .await;
        let exit = child.exit.clone();
        self.set(|s| s.last_exit = exit);
        self.files.remove(self.name());
    }
}

/// A spawned process leading its own group.
struct Child {
    pid: u32,
    exit_rx: oneshot::Receiver<String>,
    /// How it ended, once it has.
    exit: Option<String>,
}

impl Child {
    /// Completes when the process has exited (at once if it already has).
    async fn exited(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let exit = (&mut self.exit_rx).await.unwrap_or_else(|_| "exited".into());
        self.exit = Some(exit);
    }
}

async fn wait_group_gone(pgid: u32) {
    while os::group_alive(pgid) {
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Completes when `desired` says down (or the supervisor is going away).
async fn wanted_down(desired: &mut watch::Receiver<Desired>) {
    let _ = desired.wait_for(|d| !d.up).await;
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "exited".into(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Copies output lines into the ring buffer until the pipe closes.
async fn pump(stream: impl AsyncRead + Unpin, log: Arc<Mutex<Ring>>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                match log.lock() {
                    Ok(mut r) => r.push(&line),
                    Err(poisoned) => poisoned.into_inner().push(&line),
                }
            }
        }
    }
}

/// The supervising task of one backend: waits to be wanted, runs, and after a failure waits for a new `start`.
async fn supervise(m: Arc<Member>) {
    let mut desired = m.desired.subscribe();
    loop {
        let epoch = match desired.wait_for(|d| d.up).await {
            Ok(d) => d.epoch,
            Err(_) => return,
        };
        // Starting in the same update as the new epoch, so `start` never mistakes the old `stopped` for its answer.
        m.set(|s| {
            s.epoch = epoch;
            s.state = State::Starting;
        });
        if let End::Failed = m.run(&mut desired).await {
            // Stay failed until a new `start` (a new epoch) or a `stop`.
            let next = desired.wait_for(|d| !d.up || d.epoch != epoch).await;
            match next {
                Ok(d) if !d.up => m.set(|s| s.state = State::Stopped),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}
