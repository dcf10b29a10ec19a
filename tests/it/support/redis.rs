//! A real `redis-server` for the fleet tests: started on a free port with no persistence, ready once PING
//! answers, killed when dropped. A test that cannot start it fails (scripts/test.sh installs it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TEST_TIMEOUT;

pub struct Redis {
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    child: Child,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (install Debian's `redis-server`): {e}"));
        let redis = Self { url: format!("redis://127.0.0.1:{port}"), port, child };
        let deadline = Instant::now() + TEST_TIMEOUT;
        while !redis.pings() {
            assert!(Instant::now() < deadline, "redis-server on port {port} never answered PING");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    /// True when the server answers `PING` with `+PONG`.
    pub fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Stops the server (for the "Redis is down" cases).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
