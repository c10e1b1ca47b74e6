//! The operator service's accept loops, for the TCP listener (optionally HTTPS) and the
//! Unix socket alike: a cap on open connections, a TLS handshake and header deadline, an
//! idle deadline, and the caller's address on every request. `axum::serve` has none of
//! these, and without them a handful of half-sent requests from the plant LAN held the
//! listener (and, through the process's file descriptors, the CLI's socket) for as long
//! as they liked.
//!
//! Each connection runs on its own task with hyper's HTTP/1.1 server:
//! - the TLS handshake and each request's headers must complete within
//!   `header_timeout` (hyper's header-read timer also bounds the wait for the next
//!   request on a kept-alive connection);
//! - a connection on which no byte moved for `idle_timeout`, with no request in
//!   flight, is closed;
//! - beyond `max_connections` a new connection is closed at once, counted, and logged
//!   at most once per [`REFUSAL_LOG_EVERY`];
//! - the body's own deadline and size are the routes' (see [`read_body`]): a route
//!   that checks credentials first reads no byte of a stranger's body.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::config::Limits;
use super::tls::TlsSlot;

/// How often a flood of refused connections is logged (each is counted).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who is calling: the TCP peer's address, or the Unix socket (whose file permissions
/// are its authentication). Every request carries it as an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Socket,
}

impl Peer {
    /// A caller on this machine: the socket, or a TCP peer on loopback.
    pub fn is_local(self) -> bool {
        match self {
            Peer::Tcp(addr) => addr.ip().is_loopback(),
            Peer::Socket => true,
        }
    }
}

/// What a listener counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed at once: the cap was reached.
    pub refused: AtomicU64,
    /// Closed by the server: headers, handshake or idle deadline passed.
    pub timed_out: AtomicU64,
    /// TLS handshakes that failed (not a deadline).
    pub tls_failures: AtomicU64,
}

/// The counters of both doors.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub http: ConnectionStats,
    pub socket: ConnectionStats,
}

/// A listener of either kind: the next connection and who made it.
trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Peer)>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        // Small request/response exchanges: do not wait to fill a segment.
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer::Tcp(addr)))
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, Peer::Socket))
    }
}

/// Serves `router` on the TCP listener until `cancel`, with TLS when `tls` holds a
/// configuration (read again for every connection, so a reload takes effect at once).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: TlsSlot,
    limits: Limits,
    stats: Arc<ListenerStats>,
    cancel: CancellationToken,
) {
    accept_loop(listener, router, Some(tls), limits, stats, false, cancel).await;
}

/// Serves `router` on the Unix socket until `cancel`.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    router: Router,
    limits: Limits,
    stats: Arc<ListenerStats>,
    cancel: CancellationToken,
) {
    accept_loop(listener, router, None, limits, stats, true, cancel).await;
}

async fn accept_loop<A: Acceptor>(
    listener: A,
    router: Router,
    tls: Option<TlsSlot>,
    limits: Limits,
    all_stats: Arc<ListenerStats>,
    socket: bool,
    cancel: CancellationToken,
) {
    let door = if socket { "socket" } else { "HTTP" };
    let pick = move |all: &Arc<ListenerStats>| -> ConnectionStatsRef {
        ConnectionStatsRef {
            all: all.clone(),
            socket,
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut refusals = RateLog::default();
    let mut accept_errors = RateLog::default();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (io, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (EMFILE) or a connection reset before accept:
                // pause briefly rather than spin on an error that repeats at once.
                if let Some(suppressed) = accept_errors.due() {
                    tracing::warn!(door, error = %e, suppressed, "Operator listener cannot accept a connection.");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let counts = pick(&all_stats);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counts.get().refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = refusals.due() {
                tracing::warn!(door, peer = ?peer, max_connections = limits.max_connections, suppressed,
                    "Operator listener at its connection cap (api.max_connections): new connections are closed at once.");
            }
            drop(io);
            continue;
        };
        counts.get().accepted.fetch_add(1, Ordering::Relaxed);
        counts.get().open.fetch_add(1, Ordering::Relaxed);
        let router = router.clone();
        let cancel = cancel.clone();
        let tls = tls.as_ref().and_then(TlsSlot::current);
        tracker.spawn(async move {
            connection(io, peer, tls, router, limits, &counts, cancel).await;
            counts.get().open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One door's counters, shared with the connection tasks.
#[derive(Clone)]
struct ConnectionStatsRef {
    all: Arc<ListenerStats>,
    socket: bool,
}

impl ConnectionStatsRef {
    fn get(&self) -> &ConnectionStats {
        if self.socket {
            &self.all.socket
        } else {
            &self.all.http
        }
    }
}

/// "Log this now" at most once per [`REFUSAL_LOG_EVERY`], with how many were not logged.
#[derive(Debug, Default)]
struct RateLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLog {
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < REFUSAL_LOG_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

async fn connection<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    peer: Peer,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    limits: Limits,
    counts: &ConnectionStatsRef,
    cancel: CancellationToken,
) {
    match tls {
        None => http(io, peer, router, limits, counts, cancel).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await {
                Ok(Ok(stream)) => http(stream, peer, router, limits, counts, cancel).await,
                Ok(Err(e)) => {
                    counts.get().tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = ?peer, error = %e, "TLS handshake failed.");
                }
                Err(_) => {
                    counts.get().timed_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// When bytes last moved on a connection and whether a request is being answered.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Returns once nothing moved for `idle` while no request was in flight.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            tokio::time::sleep_until(deadline).await;
            if self.in_flight.load(Ordering::Relaxed) == 0 && self.last() + idle <= Instant::now() {
                return;
            }
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // A handler may wait (the webhook waits for its event to be durable);
                // count that as activity.
                self.touch();
            }
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn http<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    peer: Peer,
    router: Router,
    limits: Limits,
    counts: &ConnectionStatsRef,
    cancel: CancellationToken,
) {
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let service_activity = activity.clone();
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(peer);
            service_activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(service_activity.clone());
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(Body::new)).await;
                drop(guard);
                response
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        counts.get().timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(peer = ?peer, error = %e, "Operator connection ended with an error.");
                }
                return;
            }
            _ = cancel.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.idle_for(limits.idle_timeout) => {
                counts.get().timed_out.fetch_add(1, Ordering::Relaxed);
                // Dropping the connection closes it.
                return;
            }
        }
    }
}

/// An I/O stream that records when bytes last moved.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body of a request, read whole within `timeout` and `limit` bytes: 413 for a
/// larger one, 408 for one too slow. Routes call it after their credentials check, so
/// a stranger's body is never read.
pub async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, Response> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_big {
                Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {limit} bytes"),
                )
                    .into_response())
            } else {
                Err((
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                )
                    .into_response())
            }
        }
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {}",
                crate::config::format_duration(timeout)
            ),
        )
            .into_response()),
    }
}
