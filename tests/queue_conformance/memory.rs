use postbox::queue::MemoryQueue;

crate::conformance!(|| (MemoryQueue::new(), ()), |capacity| (
    MemoryQueue::with_capacity(capacity),
    ()
));
