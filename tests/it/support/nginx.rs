//! A real nginx load balancer in front of several easel instances, started by the test: `nginx -c <dir>/nginx.conf
//! -p <dir>` in the foreground (`daemon off`, master and one worker) with its pid, logs and temp files in a
//! temporary folder, `listen 127.0.0.1:<free port>`, an `upstream easel` block naming the instances, and every
//! answer tagged by nginx with the instance it chose ([`UPSTREAM`]). Stopped (then killed) when dropped. The binary
//! is `nginx` on PATH, else /usr/sbin/nginx (Debian's `nginx` package).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TEST_TIMEOUT;

/// The response header nginx adds: the `127.0.0.1:PORT` of the instance that answered.
pub const UPSTREAM: &str = "x-upstream";

/// A running nginx.
pub struct Nginx {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    dir: tempfile::TempDir,
    child: Child,
}

fn binary() -> PathBuf {
    let on_path = Command::new("sh").args(["-c", "command -v nginx"]).output().ok().and_then(|o| {
        let path = String::from_utf8(o.stdout).ok()?;
        Some(PathBuf::from(path.trim())).filter(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// The whole config: the README's upstream and location blocks, on loopback, with everything nginx writes in `dir`.
const CONFIG: &str = r#"daemon off;
master_process on;
worker_processes 1;
error_log @DIR@/error.log warn;
pid @DIR@/nginx.pid;
events {
    worker_connections 2048;
}
http {
    access_log off;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    upstream easel {
@SERVERS@        keepalive 32;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://easel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 60s;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
            add_header X-Upstream $upstream_addr always;
        }
    }
}
"#;

fn config(dir: &Path, port: u16, upstreams: &[String]) -> String {
    let servers: String =
        upstreams.iter().map(|u| format!("        server {u} max_fails=1 fail_timeout=5s;\n")).collect();
    CONFIG
        .replace("@DIR@", &dir.display().to_string())
        .replace("@SERVERS@", &servers)
        .replace("@PORT@", &port.to_string())
}

impl Nginx {
    /// Starts nginx in front of `upstreams` (each `127.0.0.1:PORT`) and waits until it proxies `GET /health` to
    /// one of them with a 200. Panics (with nginx's error log) when it cannot.
    pub async fn start(upstreams: &[String]) -> Nginx {
        let dir = tempfile::Builder::new().prefix("easel-nginx").tempdir().unwrap();
        // Run as root, nginx's worker is `nobody`: it must reach the temp folders nginx creates in here.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), port, upstreams)).unwrap();
        let bin = binary();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (install Debian's `nginx`): {e}", bin.display()));
        let mut nginx = Nginx { url: format!("http://127.0.0.1:{port}"), dir, child };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + TEST_TIMEOUT;
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}) while starting: {}", nginx.log());
            }
            let answer = client.get(format!("{}/health", nginx.url)).timeout(Duration::from_secs(2)).send().await;
            if answer.is_ok_and(|r| r.status() == 200 && r.headers().contains_key(UPSTREAM)) {
                return nginx;
            }
            assert!(Instant::now() < deadline, "nginx on port {port} never proxied /health: {}", nginx.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master is nginx's fast shutdown, which also stops its worker; a SIGKILL would orphan it.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        super::wait_or_kill(&mut self.child, Duration::from_secs(10));
    }
}
