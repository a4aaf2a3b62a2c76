use postbox::queue::{EmbeddedOptions, EmbeddedQueue};
use tempfile::TempDir;

fn open(options: EmbeddedOptions) -> (EmbeddedQueue, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("queue.redb"), options).unwrap();
    (q, dir)
}

crate::conformance!(
    || async { open(EmbeddedOptions::new()) },
    capacity = |capacity| async move { open(EmbeddedOptions::new().with_capacity(capacity)) }
);
