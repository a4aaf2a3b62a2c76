//! One breaker behind several reference counts, so callers on different threads do not
//! fight over one cache line.
//!
//! Every admitted call moves an owned reference to its breaker into its response
//! future (futures are `'static`), which costs an increment and a decrement of a
//! reference count. With one `Arc`, callers on two workers bounce that count's cache
//! line between cores on every call. Each [`Shared`] therefore holds a few [`Ref`]s,
//! each an `Arc` of its own on a cache line of its own, and a call takes the one of
//! its thread.

use super::state::Breaker;
use std::cell::Cell;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Reference counts per breaker (a power of two).
const REFS: usize = 8;

/// An owned reference to a breaker, with a reference count on a cache line of its own.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Ref(Arc<Breaker>);

impl Ref {
    /// A reference of its own to `breaker` (for a single-caller breaker, e.g. per key).
    pub(crate) fn new(breaker: Arc<Breaker>) -> Arc<Ref> {
        Arc::new(Ref(breaker))
    }

    /// The breaker's `Arc` (for handles).
    pub(crate) fn breaker(&self) -> &Arc<Breaker> {
        &self.0
    }
}

impl Deref for Ref {
    type Target = Breaker;

    #[inline]
    fn deref(&self) -> &Breaker {
        &self.0
    }
}

/// One breaker and its per-thread references.
#[derive(Debug)]
pub(crate) struct Shared {
    refs: [Arc<Ref>; REFS],
}

impl Shared {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        Self {
            refs: std::array::from_fn(|_| Ref::new(breaker.clone())),
        }
    }

    /// The breaker.
    #[inline]
    pub(crate) fn breaker(&self) -> &Arc<Breaker> {
        &self.refs[0].0
    }

    /// The reference this thread's calls take.
    #[inline]
    pub(crate) fn local(&self) -> &Arc<Ref> {
        &self.refs[thread_index() & (REFS - 1)]
    }
}

/// A small number per thread, handed out in turn.
#[inline]
fn thread_index() -> usize {
    thread_local!(static INDEX: Cell<usize> = const { Cell::new(usize::MAX) });
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    INDEX.with(|i| {
        let v = i.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Relaxed);
        i.set(v);
        v
    })
}
