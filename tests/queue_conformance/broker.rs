//! Helpers shared by the broker modules of the suite.

use postbox::queue::{Queue, QueueError};
use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Connects with `connect`, allowing a slow moment before calling the server
/// unreachable (tests run in parallel against shared servers on a small machine), then
/// fails loudly: `what` is not reachable at `url`, and `hint` says how to start it.
pub async fn connect_patiently<Q, F, Fut>(what: &str, url: &str, hint: &str, connect: F) -> Q
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Q, QueueError>>,
{
    for _ in 0..2 {
        if let Ok(q) = connect().await {
            return q;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    connect()
        .await
        .unwrap_or_else(|e| panic!("{what} is not reachable at {url}: {e}. {hint}"))
}

/// Runs `f` to completion from synchronous code inside a multi-thread runtime (the
/// `conformance!` constructors are synchronous).
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A private broker process on a free loopback port with its own data directory, killed
/// with the test; the shared servers are never touched. `command(port, dir)` builds
/// its command line. Each broker module waits for it to answer in its own way.
pub struct PrivateServer {
    port: u16,
    dir: tempfile::TempDir,
    command: fn(u16, &Path) -> Command,
    child: Option<Child>,
}

impl PrivateServer {
    /// Picks a port and a directory and starts the process.
    pub fn start(command: fn(u16, &Path) -> Command) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            command,
            child: None,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process' data directory (its `HOME` too, for RabbitMQ's Erlang cookie).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process again, on the same port and directory, in a process group of
    /// its own (a broker started by a script, such as RabbitMQ's, is more than one
    /// process).
    pub fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let mut command = (self.command)(self.port, self.dir.path());
        let child = command
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{:?} could not be started ({e}): install it to run this test",
                    command.get_program()
                )
            });
        self.child = Some(child);
    }

    /// SIGKILL to the whole process group: no shutdown, no final flush or fsync. Returns
    /// once every process of the group is gone (so the port and the node name are free).
    #[expect(
        clippy::disallowed_methods,
        reason = "also runs from Drop, outside any runtime; waits at most 10 s for teardown"
    )]
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        signal("-KILL");
        let _ = child.wait();
        // A large process takes a moment to be torn down after SIGKILL.
        for _ in 0..200 {
            if !signal("-0") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the private server's processes outlived SIGKILL for 10 s");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (up to `within`) until `what`, a private server on `port`, accepts connections.
#[cfg(any(feature = "nats", feature = "amqp"))]
pub async fn accepting(what: &str, port: u16, within: Duration) {
    let step = Duration::from_millis(50);
    for _ in 0..within.as_millis() / step.as_millis() {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(step).await;
    }
    panic!("the private {what} on port {port} did not accept within {within:?}");
}

/// Whether a backend's de-duplication survives a failed call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// The server de-duplicates by key: a retried enqueue is stored once.
    ExactlyOnce,
    /// De-duplication is in-process: an enqueue whose acknowledgement was lost with the
    /// connection, then retried, may be stored twice (at least once, never lost).
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))] // only RabbitMQ's
    AtLeastOnce,
}

/// 8 producers enqueue 100 messages each into `q` (retrying `Unavailable` with the same
/// envelope: its key makes that safe) while `restart` kills (SIGKILL) and restarts the
/// server twice mid-stream; then every enqueue that returned `Ok` is leased back, once
/// (or, for [`Redelivery::AtLeastOnce`], at least once).
pub async fn nothing_acknowledged_is_lost_across_restarts<Q: Queue + 'static>(
    q: Arc<Q>,
    redelivery: Redelivery,
    mut restart: impl AsyncFnMut(),
) {
    let acked_count = Arc::new(AtomicUsize::new(0));
    // Kill `r` comes once `MARKS[r]` enqueues are acknowledged. Producers stop at
    // `GATES[r]` until it has happened: a fast broker (one back up at once) would
    // otherwise let them finish before a kill. The gap keeps them enqueueing while it
    // happens, which the end checks: a kill at or past its gate found them all parked
    // (allowed for one of the two).
    const MARKS: [usize; 2] = [200, 500];
    const GATES: [usize; 2] = [450, 750];
    let (allow, allowed) = tokio::sync::watch::channel(GATES[0]);
    let mut producers = Vec::new();
    for p in 0..8 {
        let (q, acked_count, mut allowed) = (q.clone(), acked_count.clone(), allowed.clone());
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100 {
                let below = |&a: &usize| acked_count.load(Ordering::Relaxed) < a;
                allowed.wait_for(below).await.unwrap();
                let e = crate::suite::envelope(&format!("p{p}-{i}"));
                let mut done = false;
                // Up to a minute: a broker may take several seconds to boot.
                for _ in 0..3000 {
                    match q.enqueue(e.clone()).await {
                        Ok(r) => {
                            acked.push(r.id());
                            acked_count.fetch_add(1, Ordering::Relaxed);
                            done = true;
                            break;
                        }
                        Err(QueueError::Unavailable(_)) => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                assert!(done, "enqueue did not succeed after the restart");
            }
            acked
        }));
    }
    let mut kills_at = Vec::new();
    for (round, mark) in MARKS.into_iter().enumerate() {
        // Kill while producers are mid-stream (bounded wait for some progress).
        for _ in 0..5000 {
            if acked_count.load(Ordering::Relaxed) >= mark {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        kills_at.push(acked_count.load(Ordering::Relaxed));
        restart().await;
        allow.send_replace(GATES.get(round + 1).copied().unwrap_or(usize::MAX));
    }
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    assert_eq!(acked.len(), 800, "every producer finished");
    let mut stored = Vec::new();
    let mut now = crate::suite::at(0);
    for _ in 0..200 {
        match q.lease(1000, Duration::from_secs(30), now).await {
            Ok(l) if l.is_empty() && stored.len() >= acked.len() => break,
            Ok(l) => stored.extend(l.into_iter().map(|l| l.envelope.id)),
            // A lease that timed out may have leased messages all the same: read again
            // from the start once every lease so far has ended.
            Err(QueueError::Unavailable(_)) => {
                now += Duration::from_secs(31);
                stored.clear();
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unique: HashSet<_> = stored.iter().collect();
    for id in &acked {
        assert!(unique.contains(id), "acknowledged message {id} lost");
    }
    if redelivery == Redelivery::ExactlyOnce {
        assert_eq!(unique.len(), stored.len(), "a message stored twice");
        assert_eq!(stored.len(), 800);
    }
    eprintln!("killed after {kills_at:?} acknowledged enqueues");
    // At least one kill found enqueues in flight (the test is not vacuous). Not both
    // required: a loaded machine may wake this task late for one of them, once the
    // producers already wait at its gate (250 enqueues take a fast broker ~25 ms).
    assert!(
        kills_at.iter().zip(GATES).any(|(&n, gate)| n < gate),
        "the producers were all parked at a gate (no enqueue in flight) both times the \
         server was killed: {kills_at:?} acknowledged, gates {GATES:?}"
    );
}

/// A connection cut for [`enqueue_while_cut`].
pub type Cut = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// 8 producers enqueue 50 messages each into `q` (`Unavailable` tried again with the
/// same envelope: its key makes that safe). The producer whose acknowledgement is the
/// 60th, 120th, … 360th runs `cut` at once, while the others are mid-enqueue: the cuts
/// are driven by progress, not by a clock a fast broker could outrun. Returns the ids
/// acknowledged, after checking that every producer finished and that at least one cut
/// found enqueues in flight (the test is not vacuous).
pub async fn enqueue_while_cut<Q: Queue + 'static>(
    q: Arc<Q>,
    cut: Cut,
) -> Vec<postbox::queue::MessageId> {
    const EVERY: usize = 60;
    let acked_count = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let in_flight_at_cuts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for p in 0..8 {
        let (q, cut) = (q.clone(), cut.clone());
        let (acked_count, in_flight) = (acked_count.clone(), in_flight.clone());
        let (in_flight_at_cuts, unavailable) = (in_flight_at_cuts.clone(), unavailable.clone());
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..50 {
                let e = crate::suite::envelope(&format!("p{p}-{i}"));
                let mut done = false;
                for _ in 0..100 {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let out = q.enqueue(e.clone()).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match out {
                        Ok(r) => {
                            acked.push(r.id());
                            done = true;
                            break;
                        }
                        Err(QueueError::Unavailable(_)) => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("expected Unavailable, got {e}"),
                    }
                }
                assert!(done, "did not reconnect");
                let n = acked_count.fetch_add(1, Ordering::SeqCst) + 1;
                if n % EVERY == 0 && n < 400 {
                    let busy = in_flight.load(Ordering::SeqCst);
                    cut().await;
                    in_flight_at_cuts.lock().unwrap().push(busy);
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    assert_eq!(acked.len(), 400, "every producer finished");
    let at_cuts = in_flight_at_cuts.lock().unwrap().clone();
    eprintln!(
        "enqueues in flight at each cut: {at_cuts:?}; {} enqueues failed with \
         Unavailable and were tried again",
        unavailable.load(Ordering::Relaxed)
    );
    assert_eq!(
        at_cuts.len(),
        399 / EVERY,
        "a cut after every {EVERY} acknowledged"
    );
    assert!(
        at_cuts.iter().any(|&n| n > 0),
        "no cut found an enqueue in flight: {at_cuts:?}"
    );
    acked
}

/// [`enqueue_while_cut`] through `proxy`, each cut dropping its connections; checks that
/// the client connected again. (The caller keeps the proxy: the client goes on
/// through it.)
#[cfg(any(feature = "nats", feature = "amqp"))]
pub async fn enqueue_while_the_proxy_cuts<Q: Queue + 'static>(
    q: Arc<Q>,
    proxy: &Arc<crate::proxy::Proxy>,
) -> Vec<postbox::queue::MessageId> {
    let accepted = proxy.accepted();
    let cutter = proxy.clone();
    let cut: Cut = Arc::new(move || {
        cutter.cut();
        Box::pin(async {})
    });
    let acked = enqueue_while_cut(q, cut).await;
    assert!(
        proxy.accepted() > accepted,
        "the client never connected again"
    );
    acked
}

/// Leases at `now` until `n` messages came (for 100 polls 50 ms apart), `Unavailable`
/// tried again (100 times): after a cut the broker puts a dead connection's deliveries
/// back on its own schedule, and a loaded machine may end a fetch early.
#[cfg(any(feature = "nats", feature = "amqp"))]
pub async fn lease_back<Q: Queue>(
    q: &Q,
    n: usize,
    lease_for: Duration,
    now: std::time::SystemTime,
) -> Vec<postbox::queue::Leased> {
    let mut got = Vec::new();
    let (mut polls, mut unavailable) = (0, 0);
    while got.len() < n && polls < 100 {
        match q.lease(n - got.len(), lease_for, now).await {
            Ok(l) => {
                got.extend(l);
                polls += 1;
            }
            Err(QueueError::Unavailable(e)) => {
                unavailable += 1;
                assert!(unavailable <= 100, "did not reconnect: {e}");
            }
            Err(e) => panic!("expected Unavailable, got {e}"),
        }
        if got.len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    got
}

/// An envelope enqueued again as it is after its dead letter (which the brokers store and
/// deliver again) can die a second time: two dead letters with one id. A redrive that
/// lists both deletes both, so a later redrive does not send the message again.
pub async fn two_dead_letters_with_one_id_are_both_redriven_once<Q: Queue + Clone>(q: Q) {
    use postbox::queue::Enqueued;
    let e = crate::suite::envelope("twice-dead");
    let die_twice = |reasons: [&'static str; 2]| {
        let (q, e) = (q.clone(), e.clone());
        async move {
            for reason in reasons {
                assert_eq!(q.enqueue(e.clone()).await.unwrap(), Enqueued::Stored(e.id));
                let leased = q
                    .lease(10, Duration::from_secs(30), crate::suite::at(0))
                    .await
                    .unwrap();
                assert_eq!(leased.len(), 1, "{leased:?}");
                assert_eq!(leased[0].envelope.id, e.id);
                q.dead_letter(leased[0].token, reason).await.unwrap();
            }
        }
    };
    die_twice(["x1", "x2"]).await;
    let dead = q.dead_letters(10).await.unwrap();
    let ids: Vec<_> = dead.iter().map(|d| d.envelope.id).collect();
    assert_eq!(ids, vec![e.id, e.id]);
    // Both listed, both deleted: the second copy is the first's duplicate.
    assert_eq!(q.redrive_dead_letters(10).await.unwrap(), 2);
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(q.redrive_dead_letters(10).await.unwrap(), 0);
    let leased = q
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(
        leased.len(),
        1,
        "the message was redriven twice: {leased:?}"
    );
    q.ack(&[leased[0].token]).await.unwrap();
    // An id listed once deletes one of them, the oldest (as they are listed).
    die_twice(["y1", "y2"]).await;
    assert_eq!(q.discard_dead_letters(&[e.id]).await.unwrap(), 1);
    let left = q.dead_letters(10).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].reason, "y2");
    assert_eq!(q.discard_dead_letters(&[e.id, e.id]).await.unwrap(), 1);
    assert!(q.dead_letters(10).await.unwrap().is_empty());
}
