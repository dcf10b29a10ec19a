//! Who holds a TCP port: the listening socket's inode from `/proc/net/tcp{,6}`, then the process with that socket
//! among `/proc/*/fd`.

use super::os;

/// A listener found on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// `None` when the socket's owner is not visible (another user's process).
    pub pid: Option<u32>,
    pub cmd: Option<Vec<String>>,
}

impl Holder {
    /// "port 8188 is held by pid 1234 (python main.py …)".
    pub fn describe(&self, port: u16) -> String {
        match (self.pid, &self.cmd) {
            (Some(pid), Some(cmd)) => format!("port {port} is held by pid {pid} ({})", os::display_cmd(cmd)),
            (Some(pid), None) => format!("port {port} is held by pid {pid}"),
            _ => format!("port {port} is held by a process easel cannot see (another user's?)"),
        }
    }
}

/// The process listening on `port` (any address, IPv4 or IPv6), if one is.
pub fn holder(port: u16) -> Option<Holder> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"].iter().flat_map(|f| listening_inodes(f, port)).collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for pid in os::pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && wanted.iter().any(|w| target.as_os_str() == w.as_str())
            {
                return Some(Holder { pid: Some(pid), cmd: os::cmdline(pid) });
            }
        }
    }
    Some(Holder { pid: None, cmd: None })
}

/// Inodes of sockets in LISTEN state on `port` in one `/proc/net/tcp`-style table.
fn listening_inodes(file: &str, port: u16) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
    parse_listening(&text, port)
}

fn parse_listening(text: &str, port: u16) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            // State 0A is LISTEN.
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listeners_only_on_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1FFC 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1FFC 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0 20 4 30 10 -1\n\
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0\n";
        assert_eq!(parse_listening(table, 8188), vec![4242]);
        assert_eq!(parse_listening(table, 80), vec![99]);
        assert!(parse_listening(table, 8080).is_empty());
    }
}
