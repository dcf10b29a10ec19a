//! The host state machine as a pure function: `(state, event) → actions`. No I/O and no clock; time comes in
//! with the events. The host actor feeds it and carries out what it returns.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::config::HostMode;

/// The longest a failed set is held off, however often it failed.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// What the scheduler needs from a host's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: HostMode,
    pub patience: Duration,
    pub max_wait: Duration,
    pub queue_depth: u32,
    pub drain_timeout: Duration,
    pub failure_cooldown: Duration,
    /// Zero = never; else an active set with no work and no waiters for this long is stopped (the host goes idle).
    pub idle_ttl: Duration,
    /// Set name → members (sorted).
    pub sets: BTreeMap<String, BTreeSet<String>>,
}

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// No set is active (members left over from a failed start may still be stopping).
    Idle,
    Active {
        set: String,
    },
    /// Committed to leave `from` for `to` (`None` = go idle); waiting for the leaving members to finish work.
    Draining {
        from: Option<String>,
        to: Option<String>,
        leaving: BTreeSet<String>,
        #[serde(skip)]
        since: Duration,
    },
    /// Stopping `leaving`; then `to` starts.
    Stopping {
        to: Option<String>,
        leaving: BTreeSet<String>,
    },
    /// Starting the members of `set` that are not running yet (`fresh`).
    Starting {
        set: String,
        #[serde(skip)]
        since: Duration,
        #[serde(skip)]
        fresh: BTreeSet<String>,
    },
}

/// Why a set is held off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Its start failed.
    Failed,
    /// A swap to it was aborted because the active set's work outlasted `drain_timeout`.
    Busy,
}

/// The one answer every waiter gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its backends are running; go on to admission.
    Ready,
    /// Manual mode and its set is not active (409).
    Inactive { active: Option<String> },
    /// The swap queue is full (429).
    Full { retry_after: Duration },
    /// Waited `max_wait` (503).
    Switching { retry_after: Duration },
    /// The set failed to start and is cooling down (503).
    Failed { retry_after: Duration, error: String },
    /// The swap was aborted by `drain_timeout` (503).
    Busy { retry_after: Duration },
    /// Admin only: another swap is running (409).
    Conflict { target: String },
    /// The waiter left.
    Gone,
}

/// What happens to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request needs `needs` (managed backends of `set`) running.
    Request { id: u64, set: String, needs: BTreeSet<String>, now: Duration },
    /// Admin: make `set` active now (ignores patience and a failure cooldown). `id` gets the outcome. With
    /// `force`, the active set's running work is interrupted instead of drained, and a drain toward another set is
    /// aborted in favour of `set`.
    Activate { id: u64, set: String, now: Duration, force: bool },
    /// Admin: drain and go idle.
    Unload { now: Duration },
    /// The waiter `id` left.
    Cancel { id: u64 },
    /// Time passed; `busy` are the running members that have work (easel's or their own), `down` the running
    /// members whose process is not up: `None` while it restarts after a crash, `Some(why)` once it gave up.
    Tick { now: Duration, busy: BTreeSet<String>, down: BTreeMap<String, Option<String>> },
    /// The last `Start` finished.
    Started { ok: bool, error: Option<String>, now: Duration },
    /// The last `Stop` finished.
    Stopped { now: Duration },
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start these backends (each one at most once until `Started`), then send `Started`.
    Start(BTreeSet<String>),
    /// Stop these backends, then send `Stopped`.
    Stop(BTreeSet<String>),
    /// Cancel the queued and interrupt the running work of these backends (a forced activation); always followed by
    /// a `Stop` of the same backends.
    Interrupt(BTreeSet<String>),
    /// Give waiter `id` its outcome.
    Reply(u64, Outcome),
}

#[derive(Debug, Clone)]
struct Waiter {
    id: u64,
    set: String,
    needs: BTreeSet<String>,
    since: Duration,
    /// An admin activation: never times out, not counted against `queue_depth`.
    admin: bool,
}

/// A host's whole scheduling state.
#[derive(Debug, Clone)]
pub struct Host {
    pub settings: Settings,
    pub phase: Phase,
    /// Members that are up (started and ready).
    pub running: BTreeSet<String>,
    /// Busy members as of the last tick.
    pub busy: BTreeSet<String>,
    /// Running members restarting after a crash, as of the last tick: the active set is degraded.
    pub degraded: BTreeSet<String>,
    waiters: VecDeque<Waiter>,
    /// Set → (until, why, consecutive failures, last error).
    holds: BTreeMap<String, (Duration, Hold, u32, String)>,
    /// A tick came after the last commit, so `busy` includes every request admitted before it.
    fresh: bool,
    /// An admin asked for this set: commit without waiting for patience.
    forced: Option<String>,
    /// An admin asked to unload while a start or stop ran: done once it has.
    unload: bool,
    /// How long the last successful swap took (for Retry-After).
    pub last_swap: Option<Duration>,
    swap_began: Option<Duration>,
    /// When a member last had work, a request was answered `Ready`, or a set became active (for `idle_ttl`).
    last_work: Duration,
}

/// Demand for one set: waiter count and the oldest waiter's arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub count: usize,
    pub oldest: Duration,
}

impl Host {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            phase: Phase::Idle,
            running: BTreeSet::new(),
            busy: BTreeSet::new(),
            degraded: BTreeSet::new(),
            waiters: VecDeque::new(),
            holds: BTreeMap::new(),
            fresh: false,
            forced: None,
            unload: false,
            last_swap: None,
            swap_began: None,
            last_work: Duration::ZERO,
        }
    }

    /// The set whose members serve right now.
    pub fn active(&self) -> Option<&str> {
        match &self.phase {
            Phase::Active { set } => Some(set),
            Phase::Draining { from, .. } => from.as_deref(),
            _ => None,
        }
    }

    /// The set a running swap goes to.
    pub fn target(&self) -> Option<&str> {
        match &self.phase {
            Phase::Draining { to, .. } | Phase::Stopping { to, .. } => to.as_deref(),
            Phase::Starting { set, .. } => Some(set),
            _ => None,
        }
    }

    /// Waiters per set.
    pub fn demand(&self) -> BTreeMap<String, Demand> {
        let mut out: BTreeMap<String, Demand> = BTreeMap::new();
        for w in &self.waiters {
            let d = out.entry(w.set.clone()).or_insert(Demand { count: 0, oldest: w.since });
            d.count += 1;
            d.oldest = d.oldest.min(w.since);
        }
        out
    }

    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// A failed set's cooldown left and its error, if it is held off for failing.
    pub fn failed(&self, set: &str, now: Duration) -> Option<(Duration, &str)> {
        match self.holds.get(set) {
            Some((until, Hold::Failed, _, error)) if *until > now => Some((*until - now, error)),
            _ => None,
        }
    }

    /// Members that must not take new work (leaving in a committed swap).
    fn leaving(&self) -> Option<&BTreeSet<String>> {
        match &self.phase {
            Phase::Draining { leaving, .. } | Phase::Stopping { leaving, .. } => Some(leaving),
            _ => None,
        }
    }

    /// True when every backend in `needs` is up and not leaving.
    pub fn serves(&self, needs: &BTreeSet<String>) -> bool {
        let leaving = self.leaving();
        !needs.is_empty() && needs.iter().all(|b| self.running.contains(b) && !leaving.is_some_and(|l| l.contains(b)))
    }

    fn estimate(&self) -> Duration {
        self.last_swap.unwrap_or(Duration::from_secs(10))
    }

    /// Applies one event; returns what the actor must do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let now = match event {
            Event::Request { id, set, needs, now } => {
                self.request(id, set, needs, now, &mut out);
                now
            }
            Event::Activate { id, set, now, force } => {
                self.activate(id, set, now, force, &mut out);
                now
            }
            Event::Unload { now } => {
                self.forced = None;
                match &self.phase {
                    // A start or stop in progress finishes first (one start or stop at a time); then the host drains.
                    Phase::Starting { .. } | Phase::Stopping { .. } => self.unload = true,
                    // A drain toward another set now drains everything and goes idle.
                    Phase::Draining { from, since, .. } => {
                        let (from, since) = (from.clone(), *since);
                        self.phase = Phase::Draining { from, to: None, leaving: self.running.clone(), since };
                    }
                    Phase::Idle | Phase::Active { .. } => self.unload_now(now, &mut out),
                }
                now
            }
            Event::Cancel { id } => {
                if let Some(i) = self.waiters.iter().position(|w| w.id == id) {
                    self.waiters.remove(i);
                    out.push(Action::Reply(id, Outcome::Gone));
                }
                return out;
            }
            Event::Tick { now, busy, down } => {
                if !busy.is_empty() {
                    self.last_work = now;
                }
                self.busy = busy;
                self.fresh = true;
                self.degraded.clear();
                for (member, gave_up) in down {
                    if !self.running.contains(&member) {
                        continue;
                    }
                    match gave_up {
                        None => {
                            self.degraded.insert(member);
                        }
                        Some(why) => self.member_failed(&member, why, now),
                    }
                }
                now
            }
            Event::Started { ok, error, now } => {
                self.started(ok, error, now, &mut out);
                now
            }
            Event::Stopped { now } => {
                if let Phase::Stopping { to, leaving } = &self.phase {
                    let to = to.clone();
                    for b in leaving.clone() {
                        self.running.remove(&b);
                    }
                    self.begin_start(to, now, &mut out);
                }
                now
            }
        };
        self.decide(now, &mut out);
        out
    }

    fn request(&mut self, id: u64, set: String, needs: BTreeSet<String>, now: Duration, out: &mut Vec<Action>) {
        if self.serves(&needs) {
            self.last_work = now;
            out.push(Action::Reply(id, Outcome::Ready));
            return;
        }
        if let Some((left, error)) = self.failed(&set, now) {
            out.push(Action::Reply(id, Outcome::Failed { retry_after: left, error: error.to_owned() }));
            return;
        }
        if self.settings.mode == HostMode::Manual
            && self.target() != Some(set.as_str())
            && self.active() != Some(set.as_str())
        {
            out.push(Action::Reply(id, Outcome::Inactive { active: self.active().map(str::to_owned) }));
            return;
        }
        let queued = self.waiters.iter().filter(|w| !w.admin).count();
        if queued >= self.settings.queue_depth as usize {
            out.push(Action::Reply(id, Outcome::Full { retry_after: self.estimate() }));
            return;
        }
        self.waiters.push_back(Waiter { id, set, needs, since: now, admin: false });
    }

    fn activate(&mut self, id: u64, set: String, now: Duration, force: bool, out: &mut Vec<Action>) {
        self.unload = false;
        if matches!(&self.phase, Phase::Active { set: s } if *s == set) {
            out.push(Action::Reply(id, Outcome::Ready));
            return;
        }
        // A drain only waits for work, so a forced activation may cut it short; a stop or start in progress may not.
        let draining = matches!(self.phase, Phase::Draining { .. });
        if let Some(target) = self.target()
            && target != set
            && !(force && draining)
        {
            out.push(Action::Reply(id, Outcome::Conflict { target: target.to_owned() }));
            return;
        }
        if let Some(h) = self.holds.get_mut(&set) {
            // The admin asks again: a failure cooldown is waived (the failure count kept); a forced activation
            // also lifts the hold an aborted swap left.
            if h.1 == Hold::Failed || force {
                h.0 = now;
            }
        }
        let needs = self.settings.sets.get(&set).cloned().unwrap_or_default();
        self.waiters.push_back(Waiter { id, set: set.clone(), needs, since: now, admin: true });
        if force && matches!(self.phase, Phase::Idle | Phase::Active { .. } | Phase::Draining { .. }) {
            self.force(set, now, out);
        } else if self.target().is_none() {
            self.forced = Some(set);
        }
    }

    /// A forced activation: abort a running drain, then interrupt and stop whatever leaves at once. Waiters for a
    /// set the abandoned drain was going to start stay as demand (auto) or learn it is inactive (manual).
    fn force(&mut self, set: String, now: Duration, out: &mut Vec<Action>) {
        if let Phase::Draining { from, to, .. } = self.phase.clone() {
            self.phase = match from {
                Some(from) => Phase::Active { set: from },
                None => Phase::Idle,
            };
            if let Some(old) = to.filter(|t| *t != set) {
                let manual = self.settings.mode == HostMode::Manual;
                let active = self.active().map(str::to_owned);
                let mut i = 0;
                while i < self.waiters.len() {
                    let w = &self.waiters[i];
                    let outcome = if w.set != old {
                        None
                    } else if w.admin {
                        Some(Outcome::Conflict { target: set.clone() })
                    } else {
                        manual.then(|| Outcome::Inactive { active: active.clone() })
                    };
                    match outcome.and_then(|o| self.waiters.remove(i).map(|w| (w.id, o))) {
                        Some((id, o)) => out.push(Action::Reply(id, o)),
                        None => i += 1,
                    }
                }
            }
        }
        self.forced = None;
        let keep = self.settings.sets.get(&set).cloned().unwrap_or_default();
        let leaving: BTreeSet<String> = self.running.difference(&keep).cloned().collect();
        self.swap_began = Some(now);
        self.fresh = false;
        if leaving.is_empty() {
            self.begin_start(Some(set), now, out);
        } else {
            out.push(Action::Interrupt(leaving.clone()));
            out.push(Action::Stop(leaving.clone()));
            self.phase = Phase::Stopping { to: Some(set), leaving };
        }
    }

    /// A running member's process gave up (restarts exhausted). It is no longer running; an active set it belongs to
    /// fails as a failed start does: held off for a doubling cooldown, its waiters and new requests answered 503,
    /// then started again (only the missing member) on demand. Its other members keep serving what they can.
    fn member_failed(&mut self, member: &str, why: String, now: Duration) {
        self.running.remove(member);
        self.busy.remove(member);
        let Phase::Active { set } = &self.phase else { return };
        if !self.settings.sets.get(set).is_some_and(|m| m.contains(member)) {
            return;
        }
        let set = set.clone();
        let failures = self.holds.get(&set).map_or(0, |h| h.2) + 1;
        let cooldown = self.cooldown(failures);
        self.holds.insert(set, (now + cooldown, Hold::Failed, failures, format!("backend `{member}`: {why}")));
        self.phase = Phase::Idle;
    }

    /// The hold after `failures` consecutive failures: `failure_cooldown`, doubling, capped.
    fn cooldown(&self, failures: u32) -> Duration {
        self.settings.failure_cooldown.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_COOLDOWN)
    }

    /// The set that failed last and is still held off, with the time left and why (for the host's state).
    pub fn failed_set(&self, now: Duration) -> Option<(&str, Duration, &str)> {
        self.holds
            .iter()
            .filter(|(_, (until, why, _, _))| *why == Hold::Failed && *until > now)
            .max_by_key(|(_, (until, _, _, _))| *until)
            .map(|(set, (until, _, _, error))| (set.as_str(), *until - now, error.as_str()))
    }

    /// What the host is doing, in the design's words: `active` becomes `degraded` while a member restarts after a
    /// crash, and an idle host whose last set failed and is held off is `failed`.
    pub fn state(&self, now: Duration) -> &'static str {
        match &self.phase {
            Phase::Active { .. } if !self.degraded.is_empty() => "degraded",
            Phase::Active { .. } => "active",
            Phase::Idle if self.failed_set(now).is_some() => "failed",
            Phase::Idle => "idle",
            Phase::Draining { .. } => "draining",
            Phase::Stopping { .. } => "stopping",
            Phase::Starting { .. } => "starting",
        }
    }

    fn started(&mut self, ok: bool, error: Option<String>, now: Duration, out: &mut Vec<Action>) {
        let Phase::Starting { set, fresh, .. } = &self.phase else { return };
        let (set, started) = (set.clone(), fresh.clone());
        let members = self.settings.sets.get(&set).cloned().unwrap_or_default();
        // A member the set kept from before may have gone down (restarts exhausted) while the others started.
        let lost: Vec<&String> =
            members.iter().filter(|m| !started.contains(*m) && !self.running.contains(*m)).collect();
        let (ok, error) = match lost.first() {
            Some(m) if ok => (false, Some(format!("backend `{m}` went down while the set started"))),
            _ => (ok, error),
        };
        if ok {
            self.running.extend(started);
            self.holds.remove(&set);
            if let Some(began) = self.swap_began.take() {
                self.last_swap = Some(now.saturating_sub(began));
            }
            self.phase = Phase::Active { set };
            self.last_work = now;
            return;
        }
        let error = error.unwrap_or_else(|| "a member did not become ready".into());
        let failures = self.holds.get(&set).map_or(0, |h| h.2) + 1;
        let cooldown = self.cooldown(failures);
        self.holds.insert(set.clone(), (now + cooldown, Hold::Failed, failures, error.clone()));
        self.swap_began = None;
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].set == set {
                if let Some(w) = self.waiters.remove(i) {
                    let outcome = Outcome::Failed { retry_after: cooldown, error: error.clone() };
                    out.push(Action::Reply(w.id, outcome));
                }
            } else {
                i += 1;
            }
        }
        // Whatever of the set came up is stopped again; members it kept from before stay.
        let fresh = started;
        if fresh.is_empty() {
            self.phase = Phase::Idle;
        } else {
            out.push(Action::Stop(fresh.clone()));
            self.phase = Phase::Stopping { to: None, leaving: fresh };
        }
    }

    /// Leaves the settled state for `to`: drain what is leaving, or start at once when nothing leaves.
    fn commit(&mut self, to: Option<String>, now: Duration, out: &mut Vec<Action>) {
        let keep = to.as_ref().and_then(|t| self.settings.sets.get(t)).cloned().unwrap_or_default();
        let leaving: BTreeSet<String> = self.running.difference(&keep).cloned().collect();
        let from = match &self.phase {
            Phase::Active { set } => Some(set.clone()),
            _ => None,
        };
        self.swap_began = Some(now);
        self.fresh = false;
        if leaving.is_empty() {
            self.begin_start(to, now, out);
        } else {
            self.phase = Phase::Draining { from, to, leaving, since: now };
        }
    }

    fn begin_start(&mut self, to: Option<String>, now: Duration, out: &mut Vec<Action>) {
        let Some(set) = to else {
            self.phase = Phase::Idle;
            return;
        };
        let members = self.settings.sets.get(&set).cloned().unwrap_or_default();
        let fresh: BTreeSet<String> = members.difference(&self.running).cloned().collect();
        let none = fresh.is_empty();
        if !none {
            out.push(Action::Start(fresh.clone()));
        }
        self.phase = Phase::Starting { set, since: now, fresh };
        if none {
            self.started(true, None, now, out);
        }
    }

    /// Timeouts, replies to waiters that can go, and the commit rule.
    fn decide(&mut self, now: Duration, out: &mut Vec<Action>) {
        // Waiters that can go now, and waiters past max_wait.
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            let outcome = if w.admin {
                matches!(&self.phase, Phase::Active { set } if *set == w.set).then_some(Outcome::Ready)
            } else if self.serves(&w.needs) {
                self.last_work = now;
                Some(Outcome::Ready)
            } else if now.saturating_sub(w.since) >= self.settings.max_wait {
                Some(Outcome::Switching { retry_after: self.estimate() })
            } else if let Some((left, error)) = self.failed(&w.set, now) {
                Some(Outcome::Failed { retry_after: left, error: error.to_owned() })
            } else {
                None
            };
            match outcome {
                Some(o) => {
                    if let Some(w) = self.waiters.remove(i) {
                        out.push(Action::Reply(w.id, o));
                    }
                }
                None => i += 1,
            }
        }
        match self.phase.clone() {
            Phase::Draining { from, to, leaving, since } => {
                if self.fresh && leaving.is_disjoint(&self.busy) {
                    out.push(Action::Stop(leaving.clone()));
                    self.phase = Phase::Stopping { to, leaving };
                } else if now.saturating_sub(since) >= self.settings.drain_timeout {
                    self.abort(from, to, now, out);
                }
            }
            Phase::Idle | Phase::Active { .. } if self.unload => {
                self.unload = false;
                self.unload_now(now, out);
            }
            Phase::Idle | Phase::Active { .. } => {
                self.maybe_commit(now, out);
                self.maybe_idle(now, out);
            }
            Phase::Stopping { .. } | Phase::Starting { .. } => {}
        }
    }

    fn abort(&mut self, from: Option<String>, to: Option<String>, now: Duration, out: &mut Vec<Action>) {
        self.phase = match from {
            Some(set) => Phase::Active { set },
            None => Phase::Idle,
        };
        self.swap_began = None;
        self.forced = None;
        let Some(to) = to else { return };
        let retry_after = self.settings.failure_cooldown;
        let failures = self.holds.get(&to).map_or(0, |h| h.2);
        self.holds.insert(to.clone(), (now + retry_after, Hold::Busy, failures, String::new()));
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].set == to {
                if let Some(w) = self.waiters.remove(i) {
                    out.push(Action::Reply(w.id, Outcome::Busy { retry_after }));
                }
            } else {
                i += 1;
            }
        }
    }

    /// Drains whatever runs and goes idle.
    fn unload_now(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Idle) || !self.running.is_empty() {
            self.commit(None, now, out);
        }
    }

    /// `idle_ttl`: an active set that had no work and no waiters for that long drains (nothing to wait for) and
    /// stops; the next request starts it again. Only after a tick, so `busy` covers everything admitted so far.
    fn maybe_idle(&mut self, now: Duration, out: &mut Vec<Action>) {
        let ttl = self.settings.idle_ttl;
        if ttl.is_zero() || !matches!(self.phase, Phase::Active { .. }) || !self.fresh {
            return;
        }
        if self.waiters.is_empty() && self.busy.is_empty() && now.saturating_sub(self.last_work) >= ttl {
            self.commit(None, now, out);
        }
    }

    /// The commit rule: the set with the oldest waiter goes next, once the active set has no work or that waiter
    /// has waited `patience`; an admin's set goes at once.
    fn maybe_commit(&mut self, now: Duration, out: &mut Vec<Action>) {
        if let Some(set) = self.forced.take() {
            self.commit(Some(set), now, out);
            return;
        }
        let held = |h: &Self, s: &str| h.holds.get(s).is_some_and(|(until, _, _, _)| *until > now);
        let Some(next) = self.waiters.iter().find(|w| !held(self, &w.set)).map(|w| (w.set.clone(), w.since)) else {
            return;
        };
        let (set, since) = next;
        let active_busy = match &self.phase {
            Phase::Active { set: s } => self.settings.sets.get(s).is_some_and(|m| !m.is_disjoint(&self.busy)),
            _ => !self.running.is_disjoint(&self.busy),
        };
        let idle_host = matches!(self.phase, Phase::Idle);
        if idle_host || !active_busy || now.saturating_sub(since) >= self.settings.patience {
            self.commit(Some(set), now, out);
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
