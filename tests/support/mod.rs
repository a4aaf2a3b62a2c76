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
