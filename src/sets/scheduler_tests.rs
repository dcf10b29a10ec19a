//! The host state machine without processes: scripted scenarios, and property tests (proptest) of its invariants
//! over random sequences of requests, admin calls, starts, stops, crashes and work.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn settings(mode: HostMode) -> Settings {
    let mut sets = BTreeMap::new();
    sets.insert("creative".to_owned(), names(&["comfy", "llm"]));
    sets.insert("coding".to_owned(), names(&["coder", "comfy"]));
    sets.insert("solo".to_owned(), names(&["big"]));
    Settings {
        mode,
        patience: Duration::from_secs(60),
        max_wait: Duration::from_secs(300),
        queue_depth: 4,
        drain_timeout: Duration::from_secs(1800),
        failure_cooldown: Duration::from_secs(15),
        idle_ttl: Duration::ZERO,
        sets,
    }
}

const fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn req(id: u64, set: &str, needs: &[&str], now: u64) -> Event {
    Event::Request { id, set: set.into(), needs: names(needs), now: s(now) }
}

fn tick(now: u64, busy: &[&str]) -> Event {
    Event::Tick { now: s(now), busy: names(busy), down: BTreeMap::new() }
}

fn ok(now: u64) -> Event {
    Event::Started { ok: true, error: None, now: s(now) }
}

/// Brings a host to `creative` active.
fn active_creative() -> Host {
    let mut h = Host::new(settings(HostMode::Auto));
    assert_eq!(h.step(req(1, "creative", &["comfy"], 0)), vec![Action::Start(names(&["comfy", "llm"]))]);
    assert_eq!(h.step(ok(1)), vec![Action::Reply(1, Outcome::Ready)]);
    assert_eq!(h.phase, Phase::Active { set: "creative".into() });
    h
}

#[test]
fn many_cold_requests_start_the_set_once() {
    let mut h = Host::new(settings(HostMode::Auto));
    let mut starts = 0;
    for id in 0..4 {
        starts += h.step(req(id, "creative", &["comfy"], 0)).iter().filter(|a| matches!(a, Action::Start(_))).count();
    }
    assert_eq!(starts, 1);
    let replies = h.step(ok(2));
    assert_eq!(replies.len(), 4);
    assert!(replies.iter().all(|a| matches!(a, Action::Reply(_, Outcome::Ready))));
}

#[test]
fn a_swap_is_a_diff_and_waits_for_the_leaving_members_work() {
    let mut h = active_creative();
    h.step(tick(2, &["llm"]));
    // The active set has work: the coding request waits (patience), nothing stops.
    assert_eq!(h.step(req(2, "coding", &["coder"], 3)), vec![]);
    assert_eq!(h.step(tick(30, &["llm"])), vec![]);
    // Patience is over: commit, but llm is still busy, so the drain waits.
    assert_eq!(h.step(tick(63, &["llm"])), vec![]);
    assert!(matches!(&h.phase, Phase::Draining { leaving, .. } if *leaving == names(&["llm"])));
    // A request on the shared member is still served during the drain.
    assert_eq!(h.step(req(3, "creative", &["comfy"], 64)), vec![Action::Reply(3, Outcome::Ready)]);
    // A request for a leaving member now waits for the next swap.
    assert_eq!(h.step(req(4, "creative", &["llm"], 64)), vec![]);
    // Work done: only llm stops; comfy (shared) keeps running; only coder starts.
    assert_eq!(h.step(tick(70, &["comfy"])), vec![Action::Stop(names(&["llm"]))]);
    assert_eq!(h.step(Event::Stopped { now: s(71) }), vec![Action::Start(names(&["coder"]))]);
    assert_eq!(h.step(ok(75)), vec![Action::Reply(2, Outcome::Ready)]);
    assert_eq!(h.running, names(&["coder", "comfy"]));
    assert_eq!(h.demand().get("creative").map(|d| d.count), Some(1));
}

#[test]
fn commit_is_immediate_when_the_active_set_is_idle() {
    let mut h = active_creative();
    h.step(tick(2, &[]));
    assert_eq!(h.step(req(2, "solo", &["big"], 3)), vec![]);
    assert_eq!(h.step(tick(3, &[])), vec![Action::Stop(names(&["comfy", "llm"]))]);
}

#[test]
fn a_drain_that_outlasts_drain_timeout_aborts_without_stopping_anything() {
    let mut h = active_creative();
    h.settings.drain_timeout = s(100);
    h.step(tick(2, &["comfy"]));
    h.step(req(2, "solo", &["big"], 3));
    h.step(tick(70, &["comfy"]));
    assert!(matches!(h.phase, Phase::Draining { .. }));
    let out = h.step(tick(171, &["comfy"]));
    assert_eq!(out, vec![Action::Reply(2, Outcome::Busy { retry_after: s(15) })]);
    assert_eq!(h.phase, Phase::Active { set: "creative".into() });
    // The aborted target is held off for the cooldown: another request waits, no new commit.
    assert_eq!(h.step(req(3, "solo", &["big"], 172)), vec![]);
    assert!(matches!(h.phase, Phase::Active { .. }));
}

#[test]
fn a_failed_start_cools_down_doubling_and_stops_what_came_up() {
    let mut h = Host::new(settings(HostMode::Auto));
    h.step(req(1, "creative", &["comfy"], 0));
    let out = h.step(Event::Started { ok: false, error: Some("exited with 1".into()), now: s(1) });
    assert_eq!(
        out,
        vec![
            Action::Reply(1, Outcome::Failed { retry_after: s(15), error: "exited with 1".into() }),
            Action::Stop(names(&["comfy", "llm"])),
        ]
    );
    assert_eq!(h.step(Event::Stopped { now: s(2) }), vec![]);
    // During the cooldown: answered at once, nothing starts.
    let out = h.step(req(2, "creative", &["comfy"], 10));
    assert_eq!(out, vec![Action::Reply(2, Outcome::Failed { retry_after: s(6), error: "exited with 1".into() })]);
    // After it: starts again; a second failure doubles the cooldown.
    assert_eq!(h.step(req(3, "creative", &["comfy"], 17)), vec![Action::Start(names(&["comfy", "llm"]))]);
    let out = h.step(Event::Started { ok: false, error: None, now: s(18) });
    assert!(matches!(&out[0], Action::Reply(3, Outcome::Failed { retry_after, .. }) if *retry_after == s(30)));
}

#[test]
fn manual_mode_refuses_inactive_sets_and_admin_activates() {
    let mut h = Host::new(settings(HostMode::Manual));
    assert_eq!(h.step(req(1, "coding", &["coder"], 0)), vec![Action::Reply(1, Outcome::Inactive { active: None })]);
    let out = h.step(Event::Activate { id: 2, set: "coding".into(), now: s(1), force: false });
    assert_eq!(out, vec![Action::Start(names(&["coder", "comfy"]))]);
    // While it starts, a request for the target waits; admin to another set conflicts.
    assert_eq!(h.step(req(3, "coding", &["coder"], 2)), vec![]);
    let out = h.step(Event::Activate { id: 4, set: "solo".into(), now: s(2), force: false });
    assert_eq!(out, vec![Action::Reply(4, Outcome::Conflict { target: "coding".into() })]);
    let out = h.step(ok(3));
    assert!(out.contains(&Action::Reply(2, Outcome::Ready)) && out.contains(&Action::Reply(3, Outcome::Ready)));
    // Idempotent.
    assert_eq!(
        h.step(Event::Activate { id: 5, set: "coding".into(), now: s(4), force: false }),
        vec![Action::Reply(5, Outcome::Ready)]
    );
}

#[test]
fn full_queue_and_max_wait() {
    let mut h = active_creative();
    h.step(tick(1, &["comfy"]));
    for id in 10..14 {
        assert_eq!(h.step(req(id, "solo", &["big"], 2)), vec![]);
    }
    assert_eq!(h.step(req(14, "solo", &["big"], 2)), vec![Action::Reply(14, Outcome::Full { retry_after: s(1) })]);
    h.settings.patience = s(1000);
    let out = h.step(tick(302, &["comfy"]));
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|a| matches!(a, Action::Reply(_, Outcome::Switching { .. }))));
}

#[test]
fn idle_ttl_stops_an_unused_set_and_a_request_starts_it_again() {
    let mut cfg = settings(HostMode::Auto);
    cfg.idle_ttl = s(30);
    let mut h = Host::new(cfg);
    assert_eq!(h.step(req(1, "creative", &["comfy"], 0)), vec![Action::Start(names(&["comfy", "llm"]))]);
    assert_eq!(h.step(ok(1)), vec![Action::Reply(1, Outcome::Ready)]);
    // Work keeps it alive past the ttl counted from activation.
    assert!(h.step(tick(20, &["comfy"])).is_empty());
    assert!(h.step(tick(40, &[])).is_empty(), "only 20 s since the last work");
    assert!(h.step(tick(49, &[])).is_empty());
    assert!(h.step(tick(50, &[])).is_empty(), "drain begins: nothing to wait for");
    assert!(matches!(h.phase, Phase::Draining { to: None, .. }), "{:?}", h.phase);
    assert_eq!(h.step(tick(51, &[])), vec![Action::Stop(names(&["comfy", "llm"]))]);
    assert!(h.step(Event::Stopped { now: s(52) }).is_empty());
    assert_eq!(h.phase, Phase::Idle);
    assert!(h.running.is_empty());
    assert_eq!(h.step(req(2, "creative", &["llm"], 60)), vec![Action::Start(names(&["comfy", "llm"]))]);
    assert_eq!(h.step(ok(61)), vec![Action::Reply(2, Outcome::Ready)]);
}

#[test]
fn idle_ttl_zero_never_goes_idle() {
    let mut h = active_creative();
    assert!(h.step(tick(100_000, &[])).is_empty());
    assert_eq!(h.phase, Phase::Active { set: "creative".into() });
}

#[test]
fn a_forced_activation_interrupts_the_active_sets_work_and_stops_it_at_once() {
    let mut h = active_creative();
    h.step(tick(2, &["llm", "comfy"]));
    let out = h.step(Event::Activate { id: 7, set: "coding".into(), now: s(3), force: true });
    // No drain: llm (leaving) is interrupted and stopped with its work running; comfy (shared) keeps serving.
    assert_eq!(out, vec![Action::Interrupt(names(&["llm"])), Action::Stop(names(&["llm"]))]);
    assert!(matches!(&h.phase, Phase::Stopping { to: Some(t), .. } if t == "coding"));
    assert_eq!(h.step(Event::Stopped { now: s(4) }), vec![Action::Start(names(&["coder"]))]);
    assert_eq!(h.step(ok(5)), vec![Action::Reply(7, Outcome::Ready)]);
    assert_eq!(h.running, names(&["coder", "comfy"]));
}

#[test]
fn a_forced_activation_aborts_a_running_drain_for_another_set() {
    for mode in [HostMode::Auto, HostMode::Manual] {
        let mut h = Host::new(settings(mode));
        h.step(Event::Activate { id: 1, set: "creative".into(), now: s(0), force: false });
        h.step(ok(1));
        h.step(tick(2, &["llm"]));
        // A swap to solo commits (admin), but llm's work holds the drain; a request waits for solo.
        assert!(h.step(Event::Activate { id: 2, set: "solo".into(), now: s(3), force: false }).is_empty());
        assert!(h.step(req(3, "solo", &["big"], 4)).is_empty());
        assert!(matches!(&h.phase, Phase::Draining { to: Some(t), .. } if t == "solo"));
        // Without force, another set conflicts; with force, the drain is aborted in favour of coding.
        let out = h.step(Event::Activate { id: 4, set: "coding".into(), now: s(5), force: false });
        assert_eq!(out, vec![Action::Reply(4, Outcome::Conflict { target: "solo".into() })]);
        let out = h.step(Event::Activate { id: 5, set: "coding".into(), now: s(6), force: true });
        let mut want = vec![Action::Reply(2, Outcome::Conflict { target: "coding".into() })];
        if mode == HostMode::Manual {
            want.push(Action::Reply(3, Outcome::Inactive { active: Some("creative".into()) }));
        }
        want.extend([Action::Interrupt(names(&["llm"])), Action::Stop(names(&["llm"]))]);
        assert_eq!(out, want, "{mode:?}");
        h.step(Event::Stopped { now: s(7) });
        let out = h.step(ok(8));
        assert_eq!(out, vec![Action::Reply(5, Outcome::Ready)], "{mode:?}");
        // In auto mode the solo request is still demand, served by a later swap.
        assert_eq!(h.demand().get("solo").map(|d| d.count), (mode == HostMode::Auto).then_some(1));
    }
}

#[test]
fn a_crashed_member_degrades_the_set_and_one_that_gave_up_fails_it_until_the_cooldown() {
    let mut h = active_creative();
    let down = |m: &str, why: Option<&str>| BTreeMap::from([(m.to_owned(), why.map(str::to_owned))]);
    // Restarting after a crash: degraded, still active, requests still go through (they wait for the backend).
    h.step(Event::Tick { now: s(2), busy: BTreeSet::new(), down: down("comfy", None) });
    assert_eq!(h.state(s(2)), "degraded");
    assert_eq!(h.step(req(2, "creative", &["comfy"], 2)), vec![Action::Reply(2, Outcome::Ready)]);
    // Back up: active again.
    h.step(tick(3, &[]));
    assert_eq!(h.state(s(3)), "active");
    // Restarts exhausted: the set fails for failure_cooldown (15 s); what still runs keeps serving.
    h.step(Event::Tick { now: s(4), busy: BTreeSet::new(), down: down("comfy", Some("exited with status 3")) });
    assert_eq!(h.state(s(4)), "failed");
    assert_eq!(h.phase, Phase::Idle);
    let (set, left, why) = h.failed_set(s(4)).unwrap();
    assert_eq!((set, left), ("creative", s(15)));
    assert!(why.contains("backend `comfy`: exited with status 3"), "{why}");
    let out = h.step(req(3, "creative", &["comfy"], 5));
    assert!(
        matches!(&out[..], [Action::Reply(3, Outcome::Failed { retry_after, .. })] if *retry_after == s(14)),
        "{out:?}"
    );
    assert_eq!(h.step(req(4, "creative", &["llm"], 5)), vec![Action::Reply(4, Outcome::Ready)]);
    // After the cooldown, demand starts only the member that is missing.
    assert_eq!(h.step(req(5, "creative", &["comfy"], 20)), vec![Action::Start(names(&["comfy"]))]);
    assert_eq!(h.step(ok(21)), vec![Action::Reply(5, Outcome::Ready)]);
    assert_eq!(h.state(s(21)), "active");
}

#[test]
fn a_member_that_gave_up_outside_the_active_set_only_leaves_running() {
    let mut h = active_creative();
    // `big` is not running: a report about it changes nothing.
    let down = BTreeMap::from([("big".to_owned(), Some("gone".to_owned()))]);
    h.step(Event::Tick { now: s(2), busy: BTreeSet::new(), down });
    assert_eq!(h.state(s(2)), "active");
    assert_eq!(h.running, names(&["comfy", "llm"]));
}

#[test]
fn an_unload_during_a_start_lets_it_finish_then_drains_and_stops() {
    let mut h = Host::new(settings(HostMode::Auto));
    assert_eq!(h.step(req(1, "creative", &["comfy"], 0)), vec![Action::Start(names(&["comfy", "llm"]))]);
    // No second start or a stop while the first start runs.
    assert_eq!(h.step(Event::Unload { now: s(1) }), vec![]);
    assert_eq!(h.step(ok(2)), vec![Action::Reply(1, Outcome::Ready)]);
    assert!(matches!(h.phase, Phase::Draining { to: None, .. }), "{:?}", h.phase);
    assert_eq!(h.step(tick(3, &["comfy"])), vec![]);
    assert_eq!(h.step(tick(4, &[])), vec![Action::Stop(names(&["comfy", "llm"]))]);
    h.step(Event::Stopped { now: s(5) });
    assert_eq!(h.state(s(5)), "idle");
}

/// What a property test does next.
#[derive(Debug, Clone)]
enum Op {
    /// A request for set `set` (index) needing the members picked by `mask`.
    Request {
        set: usize,
        mask: u8,
    },
    Activate {
        set: usize,
        force: bool,
    },
    Cancel {
        pick: u16,
    },
    /// The outstanding start finishes: all up (`ok`), or some (picked by `mask`) up and a failure.
    Start {
        ok: bool,
        mask: u8,
    },
    Stop,
    /// A running member crashes; `gives_up`: its restarts are exhausted (else it restarts and comes back).
    Crash {
        pick: u8,
        gives_up: bool,
    },
    /// Time passes; work finishes on the members picked by `mask`.
    Tick {
        mask: u8,
    },
    Unload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, any::<u8>()).prop_map(|(set, mask)| Op::Request { set, mask }),
        1 => (0..3usize, any::<bool>()).prop_map(|(set, force)| Op::Activate { set, force }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        2 => (prop::bool::weighted(0.8), any::<u8>()).prop_map(|(ok, mask)| Op::Start { ok, mask }),
        2 => Just(Op::Stop),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(pick, gives_up)| Op::Crash { pick, gives_up }),
        5 => any::<u8>().prop_map(|mask| Op::Tick { mask }),
        1 => Just(Op::Unload),
    ]
}

const SETS: [(&str, &[&str]); 3] =
    [("creative", &["comfy", "llm"]), ("coding", &["coder", "comfy"]), ("solo", &["big"])];

fn pick<T: Clone>(items: &[T], mask: u8) -> Vec<T> {
    items.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, x)| x.clone()).collect()
}

/// A world around the scheduler: processes that start and stop later, work that runs on backends, requests that
/// come and leave, members that crash. Every action is checked against the invariants.
struct World {
    host: Host,
    up: BTreeSet<String>,
    work: BTreeMap<String, u32>,
    /// Members restarting after a crash (reported in the next ticks until they are back).
    restarting: BTreeSet<String>,
    /// Members whose restarts ran out (reported once each until the scheduler drops them).
    gave_up: BTreeSet<String>,
    outstanding_start: Option<BTreeSet<String>>,
    outstanding_stop: Option<BTreeSet<String>>,
    replies: BTreeMap<u64, u32>,
    asked: BTreeSet<u64>,
    waiting_ready: BTreeMap<u64, BTreeSet<String>>,
    now: u64,
    next_id: u64,
}

impl World {
    fn new(settings: Settings) -> Self {
        Self {
            host: Host::new(settings),
            up: BTreeSet::new(),
            work: BTreeMap::new(),
            restarting: BTreeSet::new(),
            gave_up: BTreeSet::new(),
            outstanding_start: None,
            outstanding_stop: None,
            replies: BTreeMap::new(),
            asked: BTreeSet::new(),
            waiting_ready: BTreeMap::new(),
            now: 0,
            next_id: 0,
        }
    }

    fn tick(&mut self) -> Event {
        let busy = self.work.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k.clone()).collect();
        let mut down: BTreeMap<String, Option<String>> = self.restarting.iter().map(|b| (b.clone(), None)).collect();
        down.extend(self.gave_up.iter().map(|b| (b.clone(), Some("gave up".to_owned()))));
        Event::Tick { now: s(self.now), busy, down }
    }

    fn event(&mut self, op: Op) -> Option<Event> {
        Some(match op {
            Op::Request { set, mask } => {
                self.next_id += 1;
                let (name, members) = SETS[set];
                let needs = pick(members, mask);
                let needs = if needs.is_empty() { vec![members[0]] } else { needs };
                self.asked.insert(self.next_id);
                self.waiting_ready.insert(self.next_id, names(&needs));
                req(self.next_id, name, &needs, self.now)
            }
            Op::Activate { set, force } => {
                self.next_id += 1;
                self.asked.insert(self.next_id);
                Event::Activate { id: self.next_id, set: SETS[set].0.into(), now: s(self.now), force }
            }
            Op::Cancel { pick } if self.next_id > 0 => Event::Cancel { id: 1 + u64::from(pick) % self.next_id },
            Op::Cancel { .. } => return None,
            Op::Start { ok, mask } => {
                let b = self.outstanding_start.take()?;
                // A failed start may leave some members up; the scheduler stops them.
                let list: Vec<String> = b.into_iter().collect();
                self.up.extend(if ok { list } else { pick(&list, mask) });
                Event::Started { ok, error: None, now: s(self.now) }
            }
            Op::Stop => {
                let b = self.outstanding_stop.take()?;
                for x in &b {
                    self.up.remove(x);
                    self.restarting.remove(x);
                    self.gave_up.remove(x);
                }
                Event::Stopped { now: s(self.now) }
            }
            Op::Crash { pick: which, gives_up } => {
                let candidates: Vec<String> = self.up.iter().filter(|b| !self.gave_up.contains(*b)).cloned().collect();
                let b = candidates.get(usize::from(which) % candidates.len().max(1))?.clone();
                if gives_up {
                    // Its process is gone and its work failed (the clients got 502).
                    self.up.remove(&b);
                    self.work.remove(&b);
                    self.restarting.remove(&b);
                    self.gave_up.insert(b);
                } else {
                    self.restarting.insert(b);
                }
                self.tick()
            }
            Op::Tick { mask } => {
                self.now += u64::from(mask % 4);
                let keys: Vec<String> = self.work.keys().cloned().collect();
                for k in pick(&keys, mask) {
                    if let Some(v) = self.work.get_mut(&k) {
                        *v = v.saturating_sub(1);
                    }
                }
                // A restarting member comes back now and then.
                if mask & 0x80 != 0 {
                    self.restarting.clear();
                }
                self.tick()
            }
            Op::Unload => Event::Unload { now: s(self.now) },
        })
    }

    fn apply(&mut self, event: Event) {
        let mut interrupted: Option<BTreeSet<String>> = None;
        for action in self.host.step(event) {
            match action {
                Action::Start(b) => {
                    assert!(self.outstanding_start.is_none(), "a second start while one runs");
                    assert!(self.outstanding_stop.is_none(), "start while stopping");
                    assert!(b.is_disjoint(&self.up), "start of a running backend: {b:?}");
                    for x in &b {
                        self.gave_up.remove(x);
                    }
                    self.outstanding_start = Some(b);
                }
                Action::Interrupt(b) => {
                    // Only a forced activation interrupts; its work is cancelled, so the stop that follows is allowed.
                    assert!(self.outstanding_stop.is_none(), "interrupt while stopping");
                    for x in &b {
                        self.work.remove(x);
                    }
                    interrupted = Some(b);
                }
                Action::Stop(b) => {
                    if let Some(i) = interrupted.take() {
                        assert_eq!(i, b, "an interrupt not followed by the stop of the same backends");
                    }
                    for x in &b {
                        assert_eq!(self.work.get(x).copied().unwrap_or(0), 0, "stopped {x} with work in flight");
                    }
                    assert!(self.outstanding_stop.is_none(), "a second stop while one runs");
                    self.outstanding_stop = Some(b);
                }
                Action::Reply(id, outcome) => {
                    *self.replies.entry(id).or_default() += 1;
                    if outcome == Outcome::Ready
                        && let Some(needs) = self.waiting_ready.remove(&id)
                    {
                        for b in needs {
                            assert!(self.up.contains(&b), "ready for {b}, which is not up");
                            *self.work.entry(b).or_default() += 1;
                        }
                    }
                }
            }
        }
        assert!(interrupted.is_none(), "an interrupt without a stop");
        // Never two sets on one host: what runs under an active set is that set's.
        if let Phase::Active { set } = &self.host.phase {
            let members = &self.host.settings.sets[set];
            assert!(self.up.is_subset(members), "up {:?} beyond active set {set}", self.up);
        }
        assert!(self.host.running.is_subset(&self.up), "running {:?} beyond up {:?}", self.host.running, self.up);
    }

    /// Lets outstanding starts and stops finish, work end, crashed members come back, and time run past every
    /// bound.
    fn settle(&mut self) {
        for _ in 0..50 {
            self.now += 400;
            if let Some(b) = self.outstanding_start.take() {
                self.up.extend(b);
                self.apply(ok(self.now));
            }
            if let Some(b) = self.outstanding_stop.take() {
                for x in &b {
                    self.up.remove(x);
                }
                self.apply(Event::Stopped { now: s(self.now) });
            }
            self.work.clear();
            self.restarting.clear();
            let t = self.tick();
            self.apply(t);
        }
    }
}

fn world_settings() -> impl Strategy<Value = Settings> {
    (prop::bool::weighted(0.2), 0..20u64, 5..60u64, 10..120u64, prop::option::weighted(0.3, 1..30u64)).prop_map(
        |(manual, patience, drain, max_wait, idle)| {
            let mut cfg = settings(if manual { HostMode::Manual } else { HostMode::Auto });
            cfg.patience = s(patience);
            cfg.drain_timeout = s(drain);
            cfg.max_wait = s(max_wait);
            cfg.idle_ttl = idle.map_or(Duration::ZERO, s);
            cfg
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Nothing is signalled while it has work (unless forced), at most one start or stop at a time and never of a
    /// running backend, never two sets on one host, and every waiter gets exactly one outcome.
    #[test]
    fn random_sequences_keep_the_invariants(settings in world_settings(), ops in prop::collection::vec(op(), 1..300)) {
        let mut w = World::new(settings);
        for op in ops {
            if let Some(event) = w.event(op) {
                w.apply(event);
            }
        }
        w.settle();
        for id in &w.asked {
            let n = w.replies.get(id).copied().unwrap_or(0);
            prop_assert_eq!(n, 1, "waiter {} got {} outcomes (phase {:?})", id, n, w.host.phase);
        }
    }
}
