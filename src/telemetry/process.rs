//! The standard Prometheus process metrics (`process_*`), read from `/proc/self` at scrape time (Linux only;
//! elsewhere nothing is exported), rendered as exposition text appended to `/metrics`.

use std::fmt::Write as _;

/// Clock ticks per second in `/proc` times: the kernel's `USER_HZ`, 100 on every Linux architecture easel targets.
const USER_HZ: f64 = 100.0;

/// What `/proc` says about this process.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    cpu_seconds: f64,
    start_time_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// The process metrics as exposition text, or nothing when `/proc` is not readable.
pub fn render() -> String {
    read().map(|f| text(&f)).unwrap_or_default()
}

fn read() -> Option<Figures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let mut figures = parse_stat(&stat, &boot)?;
    figures.resident_bytes =
        std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(|s| kib_field(s, "VmRSS:"));
    figures.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    figures.max_fds = std::fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(max_open_files);
    Some(figures)
}

/// CPU time, start time and virtual size from `/proc/self/stat` (fields after the parenthesised command name,
/// which may itself hold spaces) and the boot time from `/proc/stat`.
fn parse_stat(stat: &str, boot: &str) -> Option<Figures> {
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3 (state); utime is field 14, stime 15, starttime 22, vsize 23.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let btime: u64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(Figures {
        cpu_seconds: (field(14)? + field(15)?) as f64 / USER_HZ,
        start_time_seconds: btime as f64 + field(22)? as f64 / USER_HZ,
        virtual_bytes: field(23)?,
        ..Figures::default()
    })
}

/// A `Name:   1234 kB` line of `/proc/self/status`, in bytes.
fn kib_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(name))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit on open files from `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

fn text(f: &Figures) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        fmt(f.cpu_seconds),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        fmt(f.start_time_seconds),
    );
    family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", f.virtual_bytes.to_string());
    if let Some(rss) = f.resident_bytes {
        family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss.to_string());
    }
    if let Some(n) = f.open_fds {
        family("process_open_fds", "gauge", "Number of open file descriptors.", n.to_string());
    }
    if let Some(n) = f.max_fds {
        family("process_max_fds", "gauge", "Maximum number of open file descriptors.", n.to_string());
    }
    out
}

fn fmt(v: f64) -> String {
    if v.is_finite() { format!("{v}") } else { "0".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (easel (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 12345 987654321 2000 \
                    18446744073709551615";
        let f = parse_stat(stat, "cpu  1 2 3\nbtime 1700000000\n").unwrap();
        assert_eq!(f.cpu_seconds, 3.0);
        assert_eq!(f.start_time_seconds, 1_700_000_123.45);
        assert_eq!(f.virtual_bytes, 987_654_321);
        assert_eq!(kib_field("Name:\teasel\nVmRSS:\t  2048 kB\n", "VmRSS:"), Some(2_097_152));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn live_figures_render_on_linux() {
        if cfg!(target_os = "linux") {
            let text = render();
            for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
                assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
            }
        }
    }
}
