//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// Sets a flag when dropped.
#[derive(Debug)]
pub struct DropFlag(pub Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A future that never completes and flags when it is dropped.
#[derive(Debug)]
pub struct NeverFuture<T> {
    _flag: DropFlag,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> NeverFuture<T> {
    pub fn new(flag: Arc<AtomicBool>) -> Self {
        Self {
            _flag: DropFlag(flag),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T> Future for NeverFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<T> {
        Poll::Pending
    }
}

/// Counts calls.
#[derive(Debug, Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn inc(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The sample of `name` whose labels include all of `labels`, from a Prometheus render.
pub fn sample(render: &str, name: &str, labels: &[&str]) -> Option<f64> {
    render
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A loopback port nothing listens on, held for the test's length: bound, so no other
/// test can take it (a port bound and dropped can be handed to the next `bind`), but
/// not listening, so a connection to it is refused.
#[derive(Debug)]
pub struct DeadPort {
    socket: tokio::net::TcpSocket,
    addr: std::net::SocketAddr,
}

impl DeadPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        Self { socket, addr }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Starts listening on the port: the dependency comes up.
    pub fn listen(self) -> tokio::net::TcpListener {
        self.socket.listen(128).unwrap()
    }
}
