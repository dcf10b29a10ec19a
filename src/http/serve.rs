//! The HTTP connection loop: accepts connections, serves each with HTTP/1.1 or HTTP/2, and closes them
//! gracefully once shutdown begins.
//!
//! Each connection's protocol is known before hyper reads from it: ALPN says it on TLS, a peek at the first bytes
//! says it on plain TCP (an HTTP/2 client opens with `PRI `, no HTTP/1.1 method). Detecting it by reading instead
//! (what `axum::serve` does) hands hyper a 24-byte prefix first, and hyper then doubles its read buffer to 16 KB
//! for the life of the connection: a thousand clients queued for a slow backend paid 8 MB for it.

use std::convert::Infallible;
use std::future::Future;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The first bytes of the HTTP/2 client preface (RFC 9113 §3.4); `PRI` is reserved so HTTP/1.1 never sends it.
const PREFACE_START: &[u8] = b"PRI ";

/// Which protocol a connection speaks, as far as can be told without reading from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Too few bytes to tell: hyper-util reads the preface to decide.
    Unknown,
}

/// A connection whose protocol can be told before hyper reads it.
pub trait Sniff {
    fn protocol(&self) -> impl Future<Output = Protocol> + Send;
}

impl Sniff for TcpStream {
    async fn protocol(&self) -> Protocol {
        let mut head = [0u8; PREFACE_START.len()];
        match self.peek(&mut head).await {
            Ok(n) => sniffed(&head[..n]),
            // hyper meets the same error on its first read and ends the connection.
            Err(_) => Protocol::Http1,
        }
    }
}

impl Sniff for tokio_rustls::server::TlsStream<TcpStream> {
    async fn protocol(&self) -> Protocol {
        match self.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            Some(_) => Protocol::Http1,
            None => Protocol::Unknown,
        }
    }
}

/// The protocol of a connection whose first bytes are `head` (at most four; none: the client closed).
fn sniffed(head: &[u8]) -> Protocol {
    match head {
        [] => Protocol::Http1,
        PREFACE_START => Protocol::Http2,
        h if PREFACE_START.starts_with(h) => Protocol::Unknown,
        _ => Protocol::Http1,
    }
}

/// Serves `service` on every connection `listener` accepts until `shutdown` completes. Then it accepts no more,
/// asks each open connection to close once its exchange in flight is done (HTTP/1.1: after the response being
/// written; HTTP/2: GOAWAY), and returns when all have closed.
pub async fn serve<L, S>(mut listener: L, service: S, shutdown: impl Future<Output = ()>)
where
    L: Listener,
    L::Io: Sniff + Send + Unpin + 'static,
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let closing = CancellationToken::new();
    let open = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        open.spawn(connection(io, service.clone(), closing.clone()));
    }
    drop(listener);
    closing.cancel();
    open.close();
    open.wait().await;
}

/// One connection, from its first byte until it closes (or, once `closing`, until its exchange in flight ends).
async fn connection<I, S>(io: I, service: S, closing: CancellationToken)
where
    I: Sniff + AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let protocol = tokio::select! {
        p = io.protocol() => p,
        // Nothing was asked yet: nothing to finish.
        () = closing.cancelled() => return,
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let builder = match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_only(),
        Protocol::Unknown => builder,
    };
    let service = TowerToHyperService::new(
        service.map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(Body::new)),
    );
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return log_end(r),
        () = closing.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    log_end(conn.await);
}

fn log_end(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = r {
        tracing::trace!(error = %e, "A connection ended with an error.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http2_from_http1_and_a_prefix_of_the_preface_waits() {
        // What each opening gets: the HTTP/2 preface, any HTTP/1.1 method, a closed connection, and openings too
        // short to tell (`P` could be POST, PUT, PATCH or the preface).
        assert_eq!(sniffed(b"PRI "), Protocol::Http2);
        for http1 in [&b"POST"[..], b"GET ", b"PUT ", b"PATC", b"HEAD", b"OPTI", b"DELE", b"PRIX", b"\r\nGE"] {
            assert_eq!(sniffed(http1), Protocol::Http1, "{:?}", String::from_utf8_lossy(http1));
        }
        assert_eq!(sniffed(b""), Protocol::Http1);
        for short in [&b"P"[..], b"PR", b"PRI"] {
            assert_eq!(sniffed(short), Protocol::Unknown, "{:?}", String::from_utf8_lossy(short));
        }
        assert_eq!(sniffed(b"G"), Protocol::Http1);
    }
}
