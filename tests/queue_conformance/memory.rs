use postbox::queue::MemoryQueue;

crate::conformance!(
    || async { (MemoryQueue::new(), ()) },
    capacity = |capacity| async move { (MemoryQueue::with_capacity(capacity), ()) }
);
