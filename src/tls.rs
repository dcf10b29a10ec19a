//! TLS termination: a listener that hands the HTTP server finished TLS streams (HTTP/2 or HTTP/1.1, chosen by
//! ALPN), with each handshake in its own task under a time limit; a certificate that SIGHUP reloads from its PEM
//! files (a bad new pair is refused and the old one kept); and the plain-HTTP listener that redirects to HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// The longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 512;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The served certificate and the files it came from.
#[derive(Debug)]
pub struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    /// Reads and checks the pair (the key must match the certificate).
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Self>, String> {
        let current = read_pair(&cfg.cert, &cfg.key)?;
        Ok(Arc::new(Self { cert: cfg.cert.clone(), key: cfg.key.clone(), current: RwLock::new(Arc::new(current)) }))
    }

    /// Reads the files again; on any problem the served certificate stays as it was.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = Arc::new(read_pair(&self.cert, &self.key)?);
        let mut slot = self.current.write().map_err(|_| "the certificate lock is poisoned".to_owned())?;
        *slot = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls.cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("server.tls.cert {}: no PEM certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("server.tls.key {}: {e}", key.display()))?;
    let signing =
        provider().key_provider.load_private_key(der).map_err(|e| format!("server.tls.key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| {
        format!("server.tls.key {} does not belong to server.tls.cert {}: {e}", key.display(), cert.display())
    })?;
    Ok(pair)
}

/// A listener of finished TLS connections, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts on `tcp` until `stop`, handshaking each connection in its own task.
pub fn listen(tcp: TcpListener, certs: Arc<Certs>, stop: CancellationToken) -> Result<TlsListener, String> {
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                p = Arc::clone(&permits).acquire_owned() => p,
            };
            let Ok(permit) = permit else { return };
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = tcp.accept() => match r {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment rather than spin.
                        tracing::warn!(error = %e, "Accepting a TLS connection failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Small writes (stream events, progress) leave at once instead of waiting for the peer's ACK.
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed."),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
                }
            });
        }
    });
    Ok(TlsListener { rx, local })
}

/// The plain-HTTP listener of `server.tls.redirect_http`: every request gets 308 to the same path over HTTPS on
/// `https_port` (or under `server.public_url` when that is https).
pub fn redirect_router(https_port: u16, public: Option<url::Url>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let handler = move |req: axum::extract::Request| {
        let public = public.clone();
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let target = match public.filter(|u| u.scheme() == "https") {
                Some(u) => format!("{}{path}", u.as_str().trim_end_matches('/')),
                None => {
                    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
                    // Drop the plain port (an IPv6 literal keeps its brackets).
                    let name = match host.rsplit_once(':') {
                        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => name,
                        _ => host,
                    };
                    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
                    format!("https://{name}{port}{path}")
                }
            };
            (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, target)]).into_response()
        }
    };
    axum::Router::new().fallback(handler)
}
