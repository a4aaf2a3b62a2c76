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

#[tokio::test]
async fn endless_lease_does_not_expire() {
    let (q, _dir) = open(EmbeddedOptions::new());
    crate::suite::endless_lease_does_not_expire(q).await;
}
