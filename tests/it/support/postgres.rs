//! A real PostgreSQL for the tests that need one, started by the test itself: `initdb` into a temporary folder
//! (trust authentication, superuser `postgres`), `postgres` on a free port of 127.0.0.1 with its socket in that
//! folder, one database per call of [`Postgres::database`], stopped when dropped. As root both run as the
//! `postgres` system user (initdb refuses root). No PostgreSQL on the machine fails the test: scripts/test.sh
//! installs Debian's `postgresql` when `initdb` is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// A running PostgreSQL server; dropping it stops the server and deletes its files.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

/// The folder of `initdb` and `postgres`: `EASEL_PG_BIN`, else the newest /usr/lib/postgresql/*/bin, else PATH.
fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("EASEL_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("sh").args(["-c", "command -v initdb"]).output().ok()?;
    let path = String::from_utf8(out.stdout).ok()?;
    Path::new(path.trim()).parent().map(Path::to_path_buf).filter(|p| p.join("postgres").exists())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A command that runs `program` as the `postgres` user when this process is root.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// Initializes and starts a server, waiting until it accepts connections. Panics when it cannot.
    pub async fn start() -> Postgres {
        let bin = bin_dir().expect(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): \
             run scripts/test.sh, which installs Debian's `postgresql`, or set EASEL_PG_BIN",
        );
        let root = is_root();
        let dir = tempfile::Builder::new().prefix("easel-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        if root {
            let owned = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(owned.success(), "chown of the PostgreSQL folder to `postgres` failed");
        }
        let init = as_server_user(&bin.join("initdb"), root)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(&data)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = as_server_user(&bin.join("postgres"), root)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut pg = Postgres { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!("postgres exited ({status}) while starting: {}", pg.log());
            }
            if let Ok(conn) = sqlx::PgConnection::connect(&pg.url("postgres")).await {
                let _ = conn.close().await;
                break;
            }
            assert!(Instant::now() < deadline, "postgres did not accept connections within 60s: {}", pg.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub async fn database(&self) -> String {
        let name = format!("easel_{:08x}", rand::random::<u32>());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        let _ = conn.close().await;
        self.url(&name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The postmaster's own pid (the child may be `runuser`): a fast shutdown, then wait for it.
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned));
        match pid {
            Some(pid) => {
                let _ = Command::new("kill").args(["-INT", &pid]).status();
            }
            None => {
                let _ = self.child.kill();
            }
        }
        super::wait_or_kill(&mut self.child, Duration::from_secs(20));
    }
}
