//! The accept loop: HTTP/1.1 connections served by hyper with a deadline for each request's
//! headers, and a graceful stop. `axum::serve` has no header deadline, so a client that
//! sends half a request line held its connection and task for ever (slowloris); the body
//! has its own deadline where it is read (`ApiJson`).
//!
//! The stop: no new connections; requests in flight finish; idle keep-alive connections
//! close. A connection accepted before the stop whose first request hyper has not read yet
//! is given `FIRST_REQUEST_GRACE` for it (its client has usually sent it already): hyper's
//! own graceful shutdown closes such a connection at once, unread, and its client sees a
//! reset after sending, which is ambiguous (was it scored?) where a refused connection is
//! plainly safe to retry. For the same reason, connections the kernel had completed but
//! the loop had not yet accepted are taken from the backlog and served before the listener
//! closes. Only a connection completed in the instant between that last accept and the
//! close is still reset.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// How long a connection accepted before the stop may take to deliver its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `stop` completes, then waits for the connections'
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    // Each connection's task holds a receiver: the stop is sent on it, and the sender's
    // `closed()` is when every connection has ended.
    let (stopping, connections) = watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        match accepted {
            Ok((stream, _)) => spawn_connection(stream, &app, header_timeout, &connections),
            Err(e) => {
                // Out of file descriptors and the like: the listener itself is fine, so
                // wait a little rather than spin or stop serving.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let backlog = accept_backlog(listener);
    if !backlog.is_empty() {
        tracing::info!(
            connections = backlog.len(),
            "serving connections queued before the stop"
        );
    }
    for stream in backlog {
        spawn_connection(stream, &app, header_timeout, &connections);
    }
    drop(connections);
    stopping.send_replace(true);
    stopping.closed().await;
}

/// Serves one connection on its own task until it ends, or until the stop (`stopping`
/// turns true) and its first request has been read (or `FIRST_REQUEST_GRACE` passed):
/// then hyper finishes the request in flight, if any, and closes it.
fn spawn_connection(
    stream: TcpStream,
    app: &Router,
    header_timeout: Duration,
    stopping: &watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let first_request = Arc::new(Notify::new());
    let service = {
        let (first_request, app) = (
            Arc::clone(&first_request),
            TowerToHyperService::new(app.clone()),
        );
        hyper::service::service_fn(move |request| {
            // A stored permit: the stop may come before or after.
            first_request.notify_one();
            app.call(request)
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut stopping = stopping.clone();
    tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        let stop_this_connection = async {
            // An error: the server is gone, which is a stop too.
            let _ = stopping.wait_for(|stop| *stop).await;
            let grace = FIRST_REQUEST_GRACE.min(header_timeout);
            let _ = tokio::time::timeout(grace, first_request.notified()).await;
        };
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = stop_this_connection => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        // `stopping` drops here: one connection fewer to wait for.
    });
}

/// Accepts, without waiting, every connection already queued on `listener`, then closes
/// it. The accepts are the socket's own (non-blocking) calls: tokio's would answer
/// "not ready" for connections whose readiness event the reactor has not seen yet.
fn accept_backlog(listener: TcpListener) -> Vec<TcpStream> {
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "could not take the queued connections");
            return Vec::new();
        }
    };
    let mut streams = Vec::new();
    loop {
        match listener.accept() {
            // An accepted socket does not inherit the listener's non-blocking mode on Linux,
            // and tokio needs it.
            Ok((stream, _)) => match stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            {
                Ok(stream) => streams.push(stream),
                Err(e) => tracing::warn!(error = %e, "a queued connection could not be served"),
            },
            // WouldBlock: the queue is empty. Anything else (out of descriptors) ends the
            // draining too: what is left is reset when the listener closes.
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::warn!(error = %e, "accepting a queued connection failed");
                }
                return streams;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Connections the kernel completed before the stop (the clients have sent their
    /// requests) are answered, not reset with the listener.
    #[test]
    fn connections_queued_before_the_stop_are_answered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("address");
        let mut clients: Vec<std::net::TcpStream> = (0..4)
            .map(|_| std::net::TcpStream::connect(address).expect("connect"))
            .collect();
        for client in &mut clients {
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: warm\r\n\r\n")
                .expect("send");
        }
        let app = Router::new().route("/", axum::routing::get(|| async { "scored" }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            // The stop is already there when the loop starts.
            let served = serve(listener, app, Duration::from_secs(5), async {});
            tokio::time::timeout(Duration::from_secs(10), served)
                .await
                .expect("the stop waited for ever");
        });
        for (i, client) in clients.iter_mut().enumerate() {
            let mut response = String::new();
            client.read_to_string(&mut response).unwrap_or_else(|e| {
                panic!("client {i}: {e} (its queued connection was not served)")
            });
            assert!(
                response.starts_with("HTTP/1.1 200") && response.ends_with("scored"),
                "client {i}: {response:?}"
            );
        }
    }

    /// A connection that sends nothing does not hold the stop for longer than the grace.
    #[test]
    fn a_silent_connection_is_closed_after_the_grace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let mut silent =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let took = runtime.block_on(async {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let started = tokio::time::Instant::now();
            let served = serve(listener, Router::new(), Duration::from_secs(60), async {});
            tokio::time::timeout(Duration::from_secs(30), served)
                .await
                .expect("the stop waited for the silent connection");
            started.elapsed()
        });
        assert!(took >= FIRST_REQUEST_GRACE, "closed after {took:?}");
        let mut rest = Vec::new();
        let read = silent.read_to_end(&mut rest).expect("an orderly close");
        assert_eq!(read, 0, "{rest:?}");
    }
}
