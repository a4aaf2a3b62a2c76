//! The cascade scenario: five axum services MS1 → MS2 → MS3 → MS4 → MS5 on loopback,
//! each calling the next over HTTP with reqwest; a load generator that drives
//! `POST /orders` at MS1; an outage schedule for MS5 (down, then slow); and the
//! measurements. Shared by the `cascade` example and its end-to-end test.
//!
//! Everything measured comes from the run: MS5 counts the orders its handler applied
//! per idempotency key, and the load generator records every response.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::config::{ClientConfig, Format};
use postbox::enqueue::{
    BufferedBody, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER, Replayer, ReplayerHandle,
};
use postbox::http::ErrorResponseLayer;
use postbox::http::reqwest::ReqwestService;
use postbox::idempotency::{IdempotencyLayer, REPLAYED_HEADER};
use postbox::queue::{EmbeddedOptions, EmbeddedQueue, Queue};
use postbox::timeout::{CallDeadline, DeadlineLayer, HttpPropagation};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until};
use tower::util::{BoxCloneSyncService, MapResponseLayer};
use tower::{Layer, ServiceBuilder, ServiceExt};

/// Which stack the services run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    /// No layers: reqwest only.
    Plain,
    /// Deadline, retry (+budget), circuit breaker, bulkhead, attempt timeout; no enqueue.
    Guarded,
    /// The guarded stack with the enqueue fallback outermost, a replayer per hop, and
    /// the idempotency layer on MS5.
    Postbox,
}

impl Mode {
    /// Every mode, in the order they run.
    pub(crate) const ALL: [Mode; 3] = [Mode::Plain, Mode::Guarded, Mode::Postbox];

    /// The mode's name on the command line and in the JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Guarded => "guarded",
            Mode::Postbox => "postbox",
        }
    }

    /// Parses a mode name.
    pub(crate) fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The load and the outage schedule (times from the start of the load).
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    /// How long the load generator sends.
    pub(crate) duration: Duration,
    /// Requests per second sent to MS1.
    pub(crate) rate: u32,
    /// MS5 is down (connections refused) from `.0` to `.1`.
    pub(crate) down: (Duration, Duration),
    /// MS5 answers every request after `slow_delay` from `.0` to `.1`.
    pub(crate) slow: (Duration, Duration),
    /// How long MS5 takes per request while slow.
    pub(crate) slow_delay: Duration,
    /// After the load, how long to wait at most for the queues to drain.
    pub(crate) drain_timeout: Duration,
    /// The load generator gives up on a request after this long (counted as failed).
    pub(crate) request_timeout: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(12),
            rate: 100,
            down: (Duration::from_secs(3), Duration::from_secs(7)),
            slow: (Duration::from_secs(7), Duration::from_secs(9)),
            slow_delay: Duration::from_millis(1500),
            drain_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Answers seen by the load generator in one second (by the second the request was
/// sent in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Second {
    /// Answered 2xx synchronously.
    pub(crate) ok: u64,
    /// Answered `202 Accepted` (deferred).
    pub(crate) accepted: u64,
    /// Failed: any other status, a transport error or the load generator's timeout.
    pub(crate) failed: u64,
    /// The highest latency of the requests sent in this second.
    pub(crate) max_ms: f64,
}

/// The result of one mode's run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    /// Requests sent to MS1.
    pub(crate) sent: u64,
    /// Answered 2xx (other than 202) synchronously.
    pub(crate) ok: u64,
    /// Answered `202 Accepted`: deferred somewhere down the chain.
    pub(crate) accepted: u64,
    /// Answered anything else, or not at all within the load generator's timeout.
    pub(crate) failed: u64,
    /// Median latency seen by the load generator.
    pub(crate) p50_ms: f64,
    /// 99th percentile latency seen by the load generator.
    pub(crate) p99_ms: f64,
    /// Highest latency seen by the load generator.
    pub(crate) max_ms: f64,
    /// Most requests in MS1's handler at once.
    pub(crate) peak_in_flight: u64,
    /// Deferred messages delivered by the replayers (all hops).
    pub(crate) replayed: u64,
    /// Distinct orders (idempotency keys) MS5's handler applied.
    pub(crate) applied: u64,
    /// Orders MS5's handler applied more than once.
    pub(crate) duplicates: u64,
    /// Orders answered 2xx/202 to the load generator but never applied.
    pub(crate) lost: u64,
    /// Repeated deliveries MS5's idempotency layer answered without the handler.
    pub(crate) deduplicated: u64,
    /// Messages the replayers dead-lettered (all hops).
    pub(crate) dead_lettered: u64,
    /// Whether every queue was empty at the end (false: the drain timed out).
    pub(crate) drained: bool,
    /// How long the drain after the load took (`drain_s` in the JSON, in seconds).
    #[serde(rename = "drain_s", serialize_with = "seconds")]
    pub(crate) drain: Duration,
    /// Answers per second of the load, by send time.
    #[serde(skip)]
    pub(crate) per_second: Vec<Second>,
}

/// A duration as seconds, for the JSON.
fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Runs `scenario` once with every service stacked as `mode` says.
///
/// # Errors
/// A service could not start (bind, queue file, configuration).
pub(crate) async fn run(mode: Mode, scenario: &Scenario) -> Result<Report, BoxError> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store {
        applied: Mutex::default(),
        deduplicated: AtomicU64::new(0),
        slow: AtomicBool::new(false),
        slow_delay: scenario.slow_delay,
    });

    // MS5 first, then each caller from the back, so every hop knows the next address.
    let ms5_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ms5_addr = ms5_listener.local_addr()?;
    let ms5_router = ms5_router(mode, store.clone())?;
    let mut ms5 = Server::spawn(ms5_listener, ms5_router.clone())?;

    let mut next = ms5_addr;
    let mut servers = Vec::new();
    let mut replayers = Vec::new();
    let mut queues = Vec::new();
    let ms1_in_flight = Arc::new(Gauge::default());
    for depth in (1..=4).rev() {
        let hop = client_stack(mode, depth, dir.path())?;
        if let Some((queue, replayer)) = hop.deferral {
            queues.push(queue);
            replayers.push(replayer);
        }
        let gauge = if depth == 1 {
            ms1_in_flight.clone()
        } else {
            Arc::new(Gauge::default())
        };
        let relay = Arc::new(Relay {
            next: format!("http://{next}/orders"),
            client: hop.client,
            in_flight: gauge,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        next = listener.local_addr()?;
        // Only MS5 is ever hard-stopped; the relays are plain axum servers.
        let router = relay_router(mode, relay)?;
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
    }
    let ms1 = next;

    // The outage schedule, on its own task.
    let start = Instant::now();
    let schedule = {
        let scenario = scenario.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let mut events = [
                (scenario.down.0, Event::Down),
                (scenario.down.1, Event::Up),
                (scenario.slow.0, Event::Slow),
                (scenario.slow.1, Event::Fast),
            ];
            events.sort_by_key(|(at, _)| *at);
            for (at, event) in events {
                sleep_until(start + at).await;
                match event {
                    Event::Down => ms5.stop().await,
                    Event::Up => ms5.restart(ms5_router.clone()).await?,
                    Event::Slow => store.slow.store(true, Ordering::Relaxed),
                    Event::Fast => store.slow.store(false, Ordering::Relaxed),
                }
            }
            Ok::<_, BoxError>(ms5)
        })
    };

    let records = load(ms1, scenario, start).await?;
    let mut ms5 = schedule.await??;

    // Bounded wait for the replayers to deliver everything deferred.
    let drain_start = Instant::now();
    let mut drained = false;
    while drain_start.elapsed() < scenario.drain_timeout {
        if empty(&queues).await? {
            drained = true;
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    let drain = drain_start.elapsed();
    let mut replayed = 0;
    let mut dead_lettered = 0;
    for replayer in replayers {
        let stats = replayer.shutdown().await;
        replayed += stats.replayed;
        dead_lettered += stats.dead_lettered;
    }
    for server in servers {
        server.abort();
        let _ = server.await;
    }
    ms5.stop().await;

    let applied = store.applied.lock().expect("store lock").clone();
    Ok(summarize(
        scenario,
        &records,
        &applied,
        Totals {
            peak_in_flight: ms1_in_flight.peak(),
            deduplicated: store.deduplicated.load(Ordering::Relaxed),
            replayed,
            dead_lettered,
            drained,
            drain,
        },
    ))
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Down,
    Up,
    Slow,
    Fast,
}

/// Whether every queue is empty. `queues` is downstream first (MS4's first): read
/// upstream first, in the direction messages flow. A replay is acked only after the
/// next hop answered, so after it stored the message it deferred again: once an
/// upstream queue reads empty, nothing more can enter the queues after it, and a
/// queue read empty stays so. (Read downstream first, a message could move down
/// behind the reads: MS4's queue read empty, then MS3's replay deferred there.)
async fn empty(queues: &[Arc<EmbeddedQueue>]) -> Result<bool, BoxError> {
    for q in queues.iter().rev() {
        let d = q.depth().await?;
        if d.pending + d.in_flight > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

// === the stacks ===

/// The HTTP client every hop calls the next with, whatever its stack.
type HopClient =
    BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<reqwest::Body>, BoxError>;

/// What the stack inside the enqueue fallback receives (and the replayer sends).
type Inner = http::Request<BufferedBody<Full<Bytes>>>;

struct Hop {
    client: HopClient,
    deferral: Option<(Arc<EmbeddedQueue>, ReplayerHandle)>,
}

/// Time budgets of the call from MS`depth` to MS`depth+1`: (attempt timeout, deadline).
///
/// They shrink down the chain, so the deepest caller gives up (and, with postbox,
/// defers and answers 202) before the callers above it time out.
fn budgets(depth: usize) -> (Duration, Duration) {
    let above = (4 - depth) as u64;
    let attempt = Duration::from_millis(250 + 500 * above);
    (attempt, attempt + Duration::from_millis(350))
}

fn reqwest_client() -> Result<reqwest::Client, BoxError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?)
}

/// The client of MS`depth` (calling MS`depth+1`) as one config: the
/// `standard_http_client` preset with this demo's times, validated across layers.
///
/// The stack it builds is the crate docs' layer order: (enqueue fallback →) deadline → body buffer →
/// retry + budget → bulkhead (per authority) → circuit breaker (per authority) → attempt timeout.
pub(crate) fn client_config(depth: usize, enqueue: bool) -> Result<ClientConfig, BoxError> {
    let (attempt, deadline) = budgets(depth);
    let (attempt, deadline) = (attempt.as_millis(), deadline.as_millis());
    let toml = format!(
        r#"
preset = "standard_http_client"
deadline = "{deadline}ms"
attempt_timeout = "{attempt}ms"

[retry]
max_retries = 2
# A downstream breaker's Retry-After above this ends the retries at once.
max_retry_after = "200ms"
backoff = {{ kind = "exponential", base = "20ms", max_delay = "100ms", jitter = "full" }}

[circuit_breaker]
name = "ms{next}"
window = {{ type = "count", size = 20 }}
minimum_calls = 10
break_duration = "250ms"
break_multiplier = 2.0
max_break_duration = "1s"

[bulkhead]
max_concurrent = 64

[enqueue]
enabled = {enqueue}
"#,
        next = depth + 1
    );
    Ok(ClientConfig::from_str(&toml, Format::Toml)?)
}

fn client_stack(mode: Mode, depth: usize, dir: &std::path::Path) -> Result<Hop, BoxError> {
    let client = ReqwestService::new(reqwest_client()?);
    match mode {
        Mode::Plain => Ok(Hop {
            client: BoxCloneSyncService::new(client),
            deferral: None,
        }),
        Mode::Guarded => {
            let stack = client_config(depth, false)?.layer()?;
            Ok(Hop {
                client: BoxCloneSyncService::new(stack.layer(client)),
                deferral: None,
            })
        }
        Mode::Postbox => {
            let queue = Arc::new(EmbeddedQueue::open(
                dir.join(format!("ms{depth}.redb")),
                EmbeddedOptions::new(),
            )?);
            let stack = client_config(depth, true)?.deferring_layer(queue.clone())?;
            // Replays go through the stack inside the fallback, never the fallback; it
            // shares the breaker, bulkhead and retry budget with the live calls.
            let replayer = Replayer::http(queue.clone(), stack.client().layer(client.clone()))
                .name(format!("ms{depth}"))
                .concurrency(16)
                .poll_interval(Duration::from_millis(100))
                .backoff(Duration::from_millis(200), Duration::from_secs(2))
                .max_attempts(100)
                .lease_for(Duration::from_secs(10))
                .ack_batch(64, Duration::from_millis(20))
                .grace(Duration::from_secs(2))
                .spawn::<Inner>()?;
            Ok(Hop {
                client: BoxCloneSyncService::new(stack.layer(client)),
                deferral: Some((queue, replayer)),
            })
        }
    }
}

// === the services ===

/// MS5's database: how many times its handler applied each order.
#[derive(Debug)]
struct Store {
    applied: Mutex<HashMap<String, u32>>,
    /// Deliveries answered by the idempotency layer without running the handler.
    deduplicated: AtomicU64,
    slow: AtomicBool,
    slow_delay: Duration,
}

async fn apply(State(store): State<Arc<Store>>, headers: HeaderMap) -> StatusCode {
    if store.slow.load(Ordering::Relaxed) {
        sleep(store.slow_delay).await;
    }
    let Some(key) = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return StatusCode::BAD_REQUEST;
    };
    *store
        .applied
        .lock()
        .expect("store lock")
        .entry(key.to_owned())
        .or_default() += 1;
    StatusCode::OK
}

/// MS5. Its router (and so its idempotency store) outlives a restart, as a database
/// would.
fn ms5_router(mode: Mode, store: Arc<Store>) -> Result<Router, BoxError> {
    let counts = store.clone();
    let router = Router::new()
        .route("/orders", post(apply))
        .with_state(store);
    Ok(match mode {
        Mode::Plain => router,
        Mode::Guarded => server_stack(router)?,
        // The idempotency layer outside the bulkhead, as the `server` preset has it: a
        // handler that goes on after its caller's deadline (its claim runs it to the
        // end) still holds its permit, and a duplicate waiting for it holds none.
        Mode::Postbox => router
            .layer(
                ServiceBuilder::new()
                    .layer(ErrorResponseLayer::new())
                    .layer(caller_deadline()?)
                    .layer(IdempotencyLayer::new(1_000_000))
                    .layer(BulkheadLayer::new(SERVER_PERMITS)?),
            )
            // Count the deliveries the idempotency layer answered from its store.
            .layer(MapResponseLayer::new(move |res: Response| {
                if res.headers().contains_key(REPLAYED_HEADER) {
                    counts.deduplicated.fetch_add(1, Ordering::Relaxed);
                }
                res
            })),
    })
}

/// The requests a server of the `guarded` and `postbox` modes runs at once.
const SERVER_PERMITS: usize = 512;

/// A server's deadline: the caller's, up to 10 s.
fn caller_deadline() -> Result<DeadlineLayer<HttpPropagation>, BoxError> {
    Ok(DeadlineLayer::with_propagation(
        Duration::from_secs(10),
        HttpPropagation::new().with_inbound_headers(),
    )?)
}

/// The server stack of the `guarded` and `postbox` modes: answer our own errors as
/// 503/504, honour the caller's deadline, shed load fast.
fn server_stack(router: Router) -> Result<Router, BoxError> {
    Ok(router.layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(caller_deadline()?)
            .layer(BulkheadLayer::new(SERVER_PERMITS)?),
    ))
}

/// MS1 to MS4: pass the order on to the next service.
struct Relay {
    next: String,
    client: HopClient,
    in_flight: Arc<Gauge>,
}

async fn relay(
    State(relay): State<Arc<Relay>>,
    deadline: Option<Extension<CallDeadline>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = relay.in_flight.enter();
    let mut req =
        http::Request::post(&relay.next).header(http::header::CONTENT_TYPE, "application/json");
    // The order's key travels with it, hop by hop.
    if let Some(key) = headers.get(IDEMPOTENCY_KEY_HEADER) {
        req = req.header(IDEMPOTENCY_KEY_HEADER, key);
    }
    // So does the caller's deadline (read from its header by the server stack): the
    // client stack's deadline is the earlier of its own budget and this one.
    if let Some(Extension(deadline)) = deadline {
        req = req.extension(deadline);
    }
    let req = match req.body(Full::new(body)) {
        Ok(req) => req,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    match relay.client.clone().oneshot(req).await {
        Ok(res) => {
            let status = res.status();
            let id = res.headers().get(MESSAGE_ID_HEADER).cloned();
            // Read the (small) body to the end so the connection goes back to the pool.
            let _ = res.into_body().collect().await;
            let mut out = status.into_response();
            if let Some(id) = id {
                out.headers_mut().insert(MESSAGE_ID_HEADER, id);
            }
            out
        }
        // A postbox error answers with its mapping (503 + Retry-After, 504); anything
        // else (a refused connection, a reset) is a bad gateway.
        Err(e) => postbox::error::to_response(&*e)
            .unwrap_or_else(|| (StatusCode::BAD_GATEWAY, e.to_string()).into_response()),
    }
}

fn relay_router(mode: Mode, relay_state: Arc<Relay>) -> Result<Router, BoxError> {
    let router = Router::new()
        .route("/orders", post(relay))
        .with_state(relay_state);
    match mode {
        Mode::Plain => Ok(router),
        Mode::Guarded | Mode::Postbox => server_stack(router),
    }
}

/// Requests in a handler now, and the most at once.
#[derive(Debug, Default)]
struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    fn enter(&self) -> GaugeGuard<'_> {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        GaugeGuard(self)
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

// === servers that can be hard-stopped ===

/// Open connections of one server, so a hard stop can cut them: a second handle on
/// each socket, and a token that dies with the connection's own stream.
type Conns = Arc<Mutex<Vec<(Weak<()>, std::net::TcpStream)>>>;

/// A listener that keeps a handle on every accepted socket.
struct TrackedListener {
    inner: TcpListener,
    conns: Conns,
}

impl TrackedListener {
    fn track(&self, stream: TcpStream) -> io::Result<Tracked> {
        let std = stream.into_std()?;
        let handle = std.try_clone()?;
        let alive = Arc::new(());
        let mut conns = self.conns.lock().expect("conns lock");
        // Forget the connections hyper has closed, so their handles close too.
        conns.retain(|(alive, _)| alive.strong_count() > 0);
        conns.push((Arc::downgrade(&alive), handle));
        drop(conns);
        Ok(Tracked {
            stream: TcpStream::from_std(std)?,
            _alive: alive,
        })
    }
}

impl axum::serve::Listener for TrackedListener {
    type Io = Tracked;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.track(stream) {
                    Ok(stream) => return (stream, addr),
                    Err(_) => continue,
                },
                // E.g. too many open files: back off a little, as axum does.
                Err(_) => sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; dropping it tells [`TrackedListener`] the socket is gone.
struct Tracked {
    stream: TcpStream,
    _alive: Arc<()>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An axum server on loopback that can be hard-stopped and started again on the same
/// port (MS5).
struct Server {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Server {
    fn spawn(listener: TcpListener, router: Router) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let conns = Conns::default();
        let listener = TrackedListener {
            inner: listener,
            conns: conns.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self {
            addr,
            task: Some(task),
            conns,
        })
    }

    /// A hard stop: close the listener (new connections are refused) and cut every
    /// open connection.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let conns = std::mem::take(&mut *self.conns.lock().expect("conns lock"));
        for (_, conn) in conns {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Binds the same port again and serves `router` on it.
    async fn restart(&mut self, router: Router) -> Result<(), BoxError> {
        self.stop().await;
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries >= 100 => return Err(e.into()),
                Err(_) => {
                    tries += 1;
                    sleep(Duration::from_millis(20)).await;
                }
            }
        };
        *self = Server::spawn(listener, router)?;
        Ok(())
    }
}

// === the load generator ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Accepted,
    Failed,
}

#[derive(Debug)]
struct Record {
    key: String,
    sent_at: Duration,
    latency: Duration,
    outcome: Outcome,
}

/// Sends `rate` orders per second to MS1 for `duration`, each with its own
/// idempotency key, and records every answer.
async fn load(
    ms1: SocketAddr,
    scenario: &Scenario,
    start: Instant,
) -> Result<Vec<Record>, BoxError> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(scenario.request_timeout)
        .build()?;
    let url = format!("http://{ms1}/orders");
    let total = (scenario.duration.as_secs_f64() * f64::from(scenario.rate)).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(scenario.rate.max(1)));
    let run = std::process::id();
    let mut tasks = JoinSet::new();
    for i in 0..total {
        // Timed from when the order was due, not from when its task first ran: a
        // request held up by a busy machine (the pacing loop woken late, the task
        // waiting for a worker) counts that wait (no coordinated omission).
        let due = start + interval.mul_f64(i as f64);
        sleep_until(due).await;
        let client = client.clone();
        let url = url.clone();
        let key = format!("order-{run}-{i:06}");
        tasks.spawn(async move {
            let res = client
                .post(&url)
                .header(
                    IDEMPOTENCY_KEY_HEADER,
                    HeaderValue::from_str(&key).expect("ascii key"),
                )
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(format!("{{\"order\":{i}}}"))
                .send()
                .await;
            let outcome = match res {
                Ok(res) => {
                    let status = res.status();
                    let _ = res.bytes().await;
                    if status == StatusCode::ACCEPTED {
                        Outcome::Accepted
                    } else if status.is_success() {
                        Outcome::Ok
                    } else {
                        Outcome::Failed
                    }
                }
                Err(_) => Outcome::Failed,
            };
            Record {
                key,
                sent_at: due - start,
                latency: due.elapsed(),
                outcome,
            }
        });
    }
    let mut records = Vec::with_capacity(total as usize);
    while let Some(r) = tasks.join_next().await {
        records.push(r?);
    }
    Ok(records)
}

// === the numbers ===

struct Totals {
    peak_in_flight: u64,
    deduplicated: u64,
    replayed: u64,
    dead_lettered: u64,
    drained: bool,
    drain: Duration,
}

fn summarize(
    scenario: &Scenario,
    records: &[Record],
    applied: &HashMap<String, u32>,
    totals: Totals,
) -> Report {
    let seconds = scenario.duration.as_secs_f64().ceil() as usize;
    let mut per_second = vec![Second::default(); seconds.max(1)];
    let mut report = Report {
        sent: records.len() as u64,
        peak_in_flight: totals.peak_in_flight,
        deduplicated: totals.deduplicated,
        replayed: totals.replayed,
        dead_lettered: totals.dead_lettered,
        drained: totals.drained,
        drain: totals.drain,
        applied: applied.len() as u64,
        duplicates: applied.values().filter(|n| **n > 1).count() as u64,
        ..Report::default()
    };
    for r in records {
        let s = (r.sent_at.as_secs() as usize).min(per_second.len() - 1);
        per_second[s].max_ms = per_second[s].max_ms.max(ms(r.latency));
        match r.outcome {
            Outcome::Ok => {
                report.ok += 1;
                per_second[s].ok += 1;
            }
            Outcome::Accepted => {
                report.accepted += 1;
                per_second[s].accepted += 1;
            }
            Outcome::Failed => {
                report.failed += 1;
                per_second[s].failed += 1;
            }
        }
        if r.outcome != Outcome::Failed && !applied.contains_key(&r.key) {
            report.lost += 1;
        }
    }
    let mut latencies: Vec<Duration> = records.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    report.p50_ms = ms(percentile(&latencies, 0.50));
    report.p99_ms = ms(percentile(&latencies, 0.99));
    report.max_ms = ms(latencies.last().copied().unwrap_or_default());
    report.per_second = per_second;
    report
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
