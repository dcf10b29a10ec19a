//! The host state machine without processes: scripted scenarios and a seeded random-sequence check of its
//! invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
    Event::Tick { now: s(now), busy: names(busy) }
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

/// A world around the scheduler: processes that start and stop later, work that runs on backends, requests that
/// come and leave. Every action is checked against the invariants.
struct World {
    host: Host,
    up: BTreeSet<String>,
    work: BTreeMap<String, u32>,
    outstanding_start: Option<BTreeSet<String>>,
    outstanding_stop: Option<BTreeSet<String>>,
    replies: BTreeMap<u64, u32>,
    asked: BTreeSet<u64>,
    waiting_ready: BTreeMap<u64, BTreeSet<String>>,
}

impl World {
    fn apply(&mut self, event: Event, rng: &mut StdRng) {
        let mut interrupted: Option<BTreeSet<String>> = None;
        for action in self.host.step(event) {
            match action {
                Action::Start(b) => {
                    assert!(self.outstanding_start.is_none(), "a second start while one runs");
                    assert!(self.outstanding_stop.is_none(), "start while stopping");
                    assert!(b.is_disjoint(&self.up), "start of a running backend: {b:?}");
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
                            *self.work.entry(b).or_default() += rng.random_range(0..2);
                        }
                    }
                }
            }
        }
        assert!(interrupted.is_none(), "an interrupt without a stop");
        if let Phase::Active { set } = &self.host.phase {
            let members = &self.host.settings.sets[set];
            assert!(self.up.is_subset(members), "up {:?} beyond active set {set}", self.up);
        }
    }
}

#[test]
fn random_sequences_keep_the_invariants() {
    let sets: Vec<(&str, &[&str])> =
        vec![("creative", &["comfy", "llm"]), ("coding", &["coder", "comfy"]), ("solo", &["big"])];
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = if seed % 5 == 0 { HostMode::Manual } else { HostMode::Auto };
        let mut cfg = settings(mode);
        cfg.patience = s(rng.random_range(0..20));
        cfg.drain_timeout = s(rng.random_range(5..60));
        cfg.max_wait = s(rng.random_range(10..120));
        cfg.idle_ttl = if seed % 3 == 0 { s(rng.random_range(1..30)) } else { Duration::ZERO };
        let mut w = World {
            host: Host::new(cfg),
            up: BTreeSet::new(),
            work: BTreeMap::new(),
            outstanding_start: None,
            outstanding_stop: None,
            replies: BTreeMap::new(),
            asked: BTreeSet::new(),
            waiting_ready: BTreeMap::new(),
        };
        let mut now = 0u64;
        let mut next_id = 0u64;
        for step in 0..400 {
            now += rng.random_range(0..3);
            let quiet = step > 300;
            let event = match rng.random_range(0..10) {
                0 | 1 if !quiet => {
                    next_id += 1;
                    let (set, members) = sets[rng.random_range(0..sets.len())];
                    let needs: Vec<&str> = members.iter().copied().filter(|_| rng.random_bool(0.6)).collect();
                    let needs = if needs.is_empty() { vec![members[0]] } else { needs };
                    w.asked.insert(next_id);
                    w.waiting_ready.insert(next_id, names(&needs));
                    req(next_id, set, &needs, now)
                }
                2 if !quiet && rng.random_bool(0.2) => {
                    next_id += 1;
                    w.asked.insert(next_id);
                    let set = sets[rng.random_range(0..sets.len())].0.into();
                    Event::Activate { id: next_id, set, now: s(now), force: rng.random_bool(0.4) }
                }
                3 if !quiet && next_id > 0 => Event::Cancel { id: rng.random_range(1..=next_id) },
                4 if w.outstanding_start.is_some() => {
                    let Some(b) = w.outstanding_start.take() else { continue };
                    let ok = rng.random_bool(0.8);
                    // A failed start may leave some members up; the scheduler stops them.
                    w.up.extend(b.into_iter().filter(|_| ok || rng.random_bool(0.5)));
                    Event::Started { ok, error: None, now: s(now) }
                }
                5 if w.outstanding_stop.is_some() => {
                    let Some(b) = w.outstanding_stop.take() else { continue };
                    for x in &b {
                        w.up.remove(x);
                    }
                    Event::Stopped { now: s(now) }
                }
                _ => {
                    // Work finishes now and then.
                    for v in w.work.values_mut() {
                        if *v > 0 && (quiet || rng.random_bool(0.3)) {
                            *v -= 1;
                        }
                    }
                    let busy = w.work.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k.as_str()).collect::<Vec<_>>();
                    tick(now, &busy)
                }
            };
            w.apply(event, &mut rng);
        }
        // Drain the world: let outstanding starts and stops finish, time run past every bound.
        for _ in 0..50 {
            now += 400;
            if let Some(b) = w.outstanding_start.take() {
                w.up.extend(b);
                w.apply(ok(now), &mut rng);
            }
            if let Some(b) = w.outstanding_stop.take() {
                for x in &b {
                    w.up.remove(x);
                }
                w.apply(Event::Stopped { now: s(now) }, &mut rng);
            }
            w.work.clear();
            w.apply(tick(now, &[]), &mut rng);
        }
        // Admin waiters may still wait for a set that keeps failing; everyone else got exactly one answer.
        for id in &w.asked {
            let n = w.replies.get(id).copied().unwrap_or(0);
            assert!(n <= 1, "seed {seed}: waiter {id} got {n} outcomes");
            assert_eq!(n, 1, "seed {seed}: waiter {id} got no outcome (phase {:?})", w.host.phase);
        }
    }
}
