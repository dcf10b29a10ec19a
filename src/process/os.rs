//! Linux process facts easel needs to supervise groups: signalling a group, whether it still has live members,
//! and a pid's start time and argv from `/proc` (so a recycled pid is never mistaken for a child).

use std::io;

use crate::config::StopSignal;

/// Sends `signal` to every process in group `pgid`.
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{pgid} is not a process group id")))?;
    let sig = match signal {
        Signal::Stop(StopSignal::Term) => rustix::process::Signal::TERM,
        Signal::Stop(StopSignal::Int) => rustix::process::Signal::INT,
        Signal::Stop(StopSignal::Hup) => rustix::process::Signal::HUP,
        Signal::Stop(StopSignal::Quit) => rustix::process::Signal::QUIT,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    rustix::process::kill_process_group(pid, sig).map_err(io::Error::from)
}

/// A signal easel sends to a group.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Stop(StopSignal),
    Kill,
}

/// The fields of `/proc/<pid>/stat` after the command name: (state, pgrp, start time in clock ticks).
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
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
