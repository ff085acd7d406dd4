//! A userspace WAN link (this kernel has no netem): a TCP forwarder that delays
//! every chunk by a one-way delay in each direction, keeps byte order, and can
//! be cut (partition: open connections are dropped, new ones are closed at once)
//! and healed at run time through a [`LinkControl`].
//!
//! Delay is applied per chunk as it is read, so throughput is not limited by the
//! delay (a real long fat pipe behaves the same way); jitter is added without
//! reordering (a chunk is never delivered before the previous one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What a link does right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// One-way delay added in each direction.
    pub delay: Duration,
    /// Up to this much extra delay, chosen per chunk.
    pub jitter: Duration,
    /// `false` = partitioned.
    pub up: bool,
}

/// Shared switch for one or more links.
#[derive(Clone)]
pub struct LinkControl {
    tx: Arc<watch::Sender<LinkState>>,
}

impl LinkControl {
    pub fn new(delay: Duration, jitter: Duration) -> LinkControl {
        let (tx, _) = watch::channel(LinkState {
            delay,
            jitter,
            up: true,
        });
        LinkControl { tx: Arc::new(tx) }
    }

    pub fn state(&self) -> LinkState {
        *self.tx.borrow()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.tx.send_modify(|s| s.delay = delay);
    }

    /// Partition: drop open connections, refuse new ones.
    pub fn cut(&self) {
        self.tx.send_modify(|s| s.up = false);
    }

    pub fn heal(&self) {
        self.tx.send_modify(|s| s.up = true);
    }

    fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.tx.subscribe()
    }
}

/// A running link; stops (and drops its connections) when dropped.
pub struct Link {
    local: SocketAddr,
    control: LinkControl,
    _tasks: JoinSet<()>,
}

impl Link {
    /// Listens on `listen` (port 0 = any) and forwards to `target` (`host:port`).
    pub async fn start(
        listen: SocketAddr,
        target: String,
        control: LinkControl,
    ) -> std::io::Result<Link> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        let ctl = control.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { continue };
                        if !ctl.state().up {
                            drop(conn);
                            continue;
                        }
                        conns.spawn(forward(conn, target.clone(), ctl.subscribe()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Link {
            local,
            control,
            _tasks: tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn control(&self) -> &LinkControl {
        &self.control
    }
}

async fn forward(client: TcpStream, target: String, state: watch::Receiver<LinkState>) {
    let upstream =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%target, error = %e, "wan link: upstream connect failed");
                return;
            }
            Err(_) => return,
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let mut down = state.clone();
    tokio::select! {
        _ = pump(cr, uw, state.clone()) => {}
        _ = pump(ur, cw, state.clone()) => {}
        _ = down.wait_for(|s| !s.up) => {}
    }
}

/// Copies `r` to `w`, each chunk held back by the link's current delay.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    state: watch::Receiver<LinkState>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = Instant::now();
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let s = *state.borrow();
                    let jitter = if s.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        s.jitter.mul_f64(pseudo_random())
                    };
                    let at = (Instant::now() + s.delay + jitter).max(last);
                    last = at;
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A number in [0, 1) good enough for jitter (not for anything else).
fn pseudo_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn round_trip_takes_twice_the_one_way_delay() {
        let echo = echo_server().await;
        let ctl = LinkControl::new(Duration::from_millis(40), Duration::ZERO);
        let link = Link::start("127.0.0.1:0".parse().unwrap(), echo.to_string(), ctl)
            .await
            .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        let started = std::time::Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        let rtt = started.elapsed();
        assert_eq!(&buf, b"ping");
        assert!(rtt >= Duration::from_millis(80), "rtt {rtt:?}");
        assert!(rtt < Duration::from_millis(400), "rtt {rtt:?}");
    }

    #[tokio::test]
    async fn a_cut_link_drops_connections_and_refuses_new_ones_until_healed() {
        let echo = echo_server().await;
        let ctl = LinkControl::new(Duration::ZERO, Duration::ZERO);
        let link = Link::start(
            "127.0.0.1:0".parse().unwrap(),
            echo.to_string(),
            ctl.clone(),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();

        ctl.cut();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("open connection not dropped by the cut");
        assert!(n.is_err() || rest.is_empty());

        let mut t = TcpStream::connect(link.local_addr()).await.unwrap();
        let _ = t.write_all(b"b").await;
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut got))
            .await
            .expect("new connection not closed while cut");
        assert!(r.is_err() || got.is_empty(), "data crossed a cut link");

        ctl.heal();
        let mut u = TcpStream::connect(link.local_addr()).await.unwrap();
        u.write_all(b"c").await.unwrap();
        u.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"c");
    }
}
