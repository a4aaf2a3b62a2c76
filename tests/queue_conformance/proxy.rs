//! A loopback TCP proxy that can drop every connection through it, to test how a broker
//! client survives connection loss without stopping the (shared) broker.

// Each broker's tests use a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:<port>` to a target; [`Proxy::cut`] drops all open connections
/// (new ones are accepted again right away), [`Proxy::hold`] stops forwarding bytes
/// until [`Proxy::release`], [`Proxy::freeze`] stops forwarding on the open connections
/// for good, without closing them (new ones forward).
pub struct Proxy {
    addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts: watch::Sender<u64>,
    held: watch::Sender<bool>,
    frozen: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to`, waiting while the proxy holds (for ever once it froze the
/// connections open before `born`'s freeze count), and adds what it forwarded to
/// `count`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
    (mut frozen, born): (watch::Receiver<u64>, u64),
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if held.wait_for(|h| !*h).await.is_err()
                    || frozen.wait_for(|f| *f <= born).await.is_err()
                    || to.write_all(&buf[..n]).await.is_err()
                {
                    return;
                }
                count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cuts, _) = watch::channel(0u64);
        let (held, _) = watch::channel(false);
        let (frozen, _) = watch::channel(0u64);
        let tx = cuts.clone();
        let hold = held.clone();
        let freeze = frozen.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent_up = sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut rx = tx.subscribe();
                let (up, down) = (hold.subscribe(), hold.subscribe());
                let born = *freeze.borrow();
                let (up_frozen, down_frozen) = (freeze.subscribe(), freeze.subscribe());
                let target = target.clone();
                let sent_up = sent_up.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_r, client_w) = client.into_split();
                    let (upstream_r, upstream_w) = upstream.into_split();
                    // Biased: a cut wins over bytes a release lets through at once.
                    tokio::select! {
                        biased;
                        _ = rx.changed() => {} // cut: both sockets are dropped
                        _ = pump(client_r, upstream_w, up, (up_frozen, born), sent_up) => {}
                        _ = pump(upstream_r, client_w, down, (down_frozen, born), Default::default()) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            accepted,
            sent,
            cuts,
            held,
            frozen,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has accepted so far.
    #[allow(dead_code)] // only some brokers' tests count them
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many bytes the proxy has forwarded from clients to the target so far.
    #[allow(dead_code)] // only some brokers' tests count them
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every connection open through the proxy.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Stops forwarding: bytes sent either way wait in the proxy.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Forwards again, starting with what waited.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Stops forwarding on every open connection for good, and keeps them open: a
    /// server that stopped answering (a host gone, a partition). New connections
    /// forward as before.
    #[allow(dead_code)] // only some brokers' tests freeze
    pub fn freeze(&self) {
        self.frozen.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of a `scheme://[user@]host:port[/path]` URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}
