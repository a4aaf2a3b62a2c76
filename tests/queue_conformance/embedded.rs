use postbox::queue::{EmbeddedOptions, EmbeddedQueue};
use tempfile::TempDir;

fn open(options: EmbeddedOptions) -> (EmbeddedQueue, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("queue.redb"), options).unwrap();
    (q, dir)
}

crate::conformance!(|| open(EmbeddedOptions::new()), |capacity| open(
    EmbeddedOptions::new().with_capacity(capacity)
));
