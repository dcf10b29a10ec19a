//! Linux process facts easel needs to supervise groups: signalling a group, whether it still has live members,
//! descendants that left the group, and a pid's start time and argv from `/proc` (so a recycled pid is never
//! mistaken for a child).

use std::io;

use crate::config::StopSignal;

/// Sends `signal` to every process in group `pgid`.
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{pgid} is not a process group id")))?;
    rustix::process::kill_process_group(pid, rustix_signal(signal)).map_err(io::Error::from)
}

fn rustix_signal(signal: Signal) -> rustix::process::Signal {
    match signal {
        Signal::Stop(StopSignal::Term) => rustix::process::Signal::TERM,
        Signal::Stop(StopSignal::Int) => rustix::process::Signal::INT,
        Signal::Stop(StopSignal::Hup) => rustix::process::Signal::HUP,
        Signal::Stop(StopSignal::Quit) => rustix::process::Signal::QUIT,
        Signal::Kill => rustix::process::Signal::KILL,
    }
}

/// A signal easel sends to a group.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Stop(StopSignal),
    Kill,
}

/// The fields of `/proc/<pid>/stat` after the command name: (state, pgrp, start time in clock ticks).
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    stat_with_parent(pid).map(|(state, _, pgrp, start)| (state, pgrp, start))
}

/// [`stat`] with the parent's pid: (state, ppid, pgrp, start time).
fn stat_with_parent(pid: u32) -> Option<(char, u32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, ppid, pgrp, start))
}

/// Live descendants of `pid` that left its process group (`setsid`, `setpgid`), which a signal to the group misses:
/// (pid, start time), so a recycled pid is never signalled later.
pub fn escapees(pid: u32) -> Vec<(u32, u64)> {
    let table: Vec<(u32, (char, u32, u32, u64))> =
        pids().into_iter().filter_map(|p| stat_with_parent(p).map(|s| (p, s))).collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, (state, ppid, pgrp, start)) in &table {
            if *ppid != parent || *p == pid || found.iter().any(|(f, _)| f == p) {
                continue;
            }
            frontier.push(*p);
            if *pgrp != pid && *state != 'Z' {
                found.push((*p, *start));
            }
        }
    }
    found
}

/// Sends `signal` to `pid` if it is still the process that started at `start`; true if it was.
pub fn signal_pid(pid: u32, start: u64, signal: Signal) -> bool {
    if start_time(pid) != Some(start) {
        return false;
    }
    let Some(target) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    rustix::process::kill_process(target, rustix_signal(signal)).is_ok()
}

/// When `pid` started (clock ticks since boot), if it runs and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).filter(|(state, ..)| *state != 'Z').map(|(.., start)| start)
}

/// The argv of `pid`.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> =
        raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    (!args.is_empty()).then_some(args)
}

/// Every pid under `/proc`.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether any live (non-zombie) process is still in group `pgid`.
pub fn group_alive(pgid: u32) -> bool {
    pids().into_iter().any(|pid| stat(pid).is_some_and(|(state, pgrp, _)| pgrp == pgid && state != 'Z'))
}

/// Whether `pid` still runs `cmd`: the same argv, or (for a script started through its interpreter line) an
/// argv that ends with the same arguments and mentions the same program.
pub fn runs(pid: u32, cmd: &[String]) -> bool {
    let Some(actual) = cmdline(pid) else { return false };
    if actual == cmd {
        return true;
    }
    let Some((program, args)) = cmd.split_first() else { return false };
    let base = program.rsplit('/').next().unwrap_or(program);
    actual.ends_with(args) && actual.iter().any(|a| a.rsplit('/').next() == Some(base))
}

/// Shown in messages: argv joined by spaces, cut to a readable length.
pub fn display_cmd(cmd: &[String]) -> String {
    let s = cmd.join(" ");
    if s.chars().count() > 80 { format!("{}…", s.chars().take(80).collect::<String>()) } else { s }
}
