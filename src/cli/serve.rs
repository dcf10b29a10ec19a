//! `easel serve`: load the config, build the gateway, serve until SIGTERM/SIGINT (SIGHUP reloads the config).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{self, ProcessEnv};
use crate::server::Server;

pub fn run(config_path: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    if let Err(e) = crate::telemetry::init_logging() {
        eprintln!("{e}");
        return ExitCode::from(1);
    }
    let path = config::resolve_path(config_path.as_deref());
    let listen = match listen {
        None => None,
        Some(addr) => match std::net::ToSocketAddrs::to_socket_addrs(addr.as_str()).ok().and_then(|mut a| a.next()) {
            Some(a) => Some(a),
            None => {
                eprintln!("--listen: `{addr}` is not a host:port address");
                return ExitCode::from(2);
            }
        },
    };
    // A reload reads the same file, with the same environment and flags.
    let source: crate::reload::ConfigSource = Arc::new(move || {
        let mut cfg = config::load(path.as_deref(), &ProcessEnv).map_err(|e| e.to_string())?;
        if let Some(a) = listen {
            cfg.server.listen = a;
        }
        Ok(cfg)
    });
    let cfg = match source() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(cfg, source)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(cfg: config::Config, source: crate::reload::ConfigSource) -> Result<(), String> {
    let addr = cfg.server.listen;
    let origin = cfg.origin.clone();
    let scheme = if cfg.server.tls.is_some() { "https" } else { "http" };
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let server = Server::build(cfg).await?.with_config_source(source);
    let models: Vec<String> = server.state().registry.all().iter().map(|m| m.id.clone()).collect();
    if origin.starts_with("seed-") {
        tracing::info!(config = %origin, "Compatibility mode: no configuration file; the configuration comes from environment variables (`easel config check` prints it).");
    }
    tracing::info!(config = %origin, models = %models.join(","), "easel listening on {scheme}://{local}");
    server.run(listener, shutdown_signal()).await.map_err(|e| format!("server error: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
