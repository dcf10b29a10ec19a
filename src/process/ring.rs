//! The bounded ring buffer of a managed process's output lines (stdout and stderr together).

use std::collections::VecDeque;

/// Most lines kept.
pub const MAX_LINES: usize = 500;
/// Most bytes kept over all lines.
pub const MAX_BYTES: usize = 256 * 1024;
/// A longer line is cut to this many bytes.
const MAX_LINE: usize = 4096;

/// The last output lines, oldest first; old lines fall out when either bound is passed.
#[derive(Debug, Default)]
pub struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Ring {
    pub fn push(&mut self, line: &str) {
        let line = line.trim_end_matches(['\n', '\r']);
        let mut cut = line.len().min(MAX_LINE);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let line = line[..cut].to_owned();
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > MAX_LINES || self.bytes > MAX_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.lines.iter().skip(self.lines.len().saturating_sub(n)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_within_both_bounds() {
        let mut r = Ring::default();
        for i in 0..(MAX_LINES + 10) {
            r.push(&format!("line {i}\n"));
        }
        assert_eq!(r.tail(2), vec![format!("line {}", MAX_LINES + 8), format!("line {}", MAX_LINES + 9)]);
        assert_eq!(r.tail(10_000).len(), MAX_LINES);
        let big = "x".repeat(10_000);
        for _ in 0..100 {
            r.push(&big);
        }
        assert!(r.bytes <= MAX_BYTES);
        assert_eq!(r.tail(1)[0].len(), MAX_LINE);
    }
}
