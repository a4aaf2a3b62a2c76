use postbox::queue::MemoryQueue;

crate::conformance!(|| (MemoryQueue::new(), ()), |capacity| (
    MemoryQueue::with_capacity(capacity),
    ()
));

#[tokio::test]
async fn endless_lease_does_not_expire() {
    crate::suite::endless_lease_does_not_expire(MemoryQueue::new()).await;
}
