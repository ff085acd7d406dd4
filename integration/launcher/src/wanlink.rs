//! A userspace WAN link (this kernel has no netem), switched at run time through
//! a [`LinkControl`] (one-way delay, jitter, cut = partition, heal):
//!
//! * [`Link`], a TCP forwarder (PostgreSQL, etcd): every chunk is delayed by the
//!   one-way delay in each direction, byte order is kept; a cut drops open
//!   connections and closes new ones at once.
//! * [`UdpLink`], a UDP relay (the agents' QUIC to the coordinators): each client
//!   source address gets its own upstream socket to the target, and datagrams are
//!   forwarded both ways, each held back by the delay (order kept per direction);
//!   while cut every datagram is dropped. A client mapping with no traffic either
//!   way for [`UDP_IDLE`] is forgotten, as a NAT would.
//!
//! Delay is applied per chunk or datagram as it is read, so throughput is not
//! limited by the delay (a real long fat pipe behaves the same way); jitter is
//! added without reordering (nothing is delivered before what was read before
//! it). A zero delay adds no timer wait at all. Limits: no loss, bandwidth or
//! MTU model; a cut is total (both directions).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
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

    /// Partition: a [`Link`] drops open connections and refuses new ones, a
    /// [`UdpLink`] drops every datagram (including those already in flight).
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
                    let at = due(&mut last, *state.borrow());
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            hold_until(at).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// When something read now is to be delivered: now + delay + jitter, never
/// before what was read before it (`last`, updated).
fn due(last: &mut Instant, s: LinkState) -> Instant {
    let jitter = if s.jitter.is_zero() {
        Duration::ZERO
    } else {
        s.jitter.mul_f64(pseudo_random())
    };
    let at = (Instant::now() + s.delay + jitter).max(*last);
    *last = at;
    at
}

/// Waits until `at`, without touching the timer when it has already passed:
/// tokio's timer has millisecond granularity, so even a zero-length
/// `sleep_until` costs about a millisecond per hop.
async fn hold_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

/// How long a [`UdpLink`] keeps a client mapping without traffic either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// Largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 64 * 1024;

/// Counters of a [`UdpLink`].
#[derive(Default)]
struct UdpStats {
    /// Datagrams delivered, both directions.
    delivered: AtomicU64,
    /// Client mappings alive.
    clients: AtomicUsize,
}

/// A running UDP relay; stops (and forgets its mappings) when dropped.
pub struct UdpLink {
    local: SocketAddr,
    control: LinkControl,
    stats: Arc<UdpStats>,
    _tasks: JoinSet<()>,
}

impl UdpLink {
    /// Listens on `listen` (port 0 = any) and relays to `target` (`host:port`,
    /// resolved for each new client mapping, so a target that is not up yet or
    /// comes back under another address is found again, as a TCP [`Link`] does).
    pub async fn start(
        listen: SocketAddr,
        target: String,
        control: LinkControl,
    ) -> std::io::Result<UdpLink> {
        UdpLink::start_with_idle(listen, target, control, UDP_IDLE).await
    }

    /// [`start`](Self::start) with another idle expiry of client mappings.
    pub async fn start_with_idle(
        listen: SocketAddr,
        target: String,
        control: LinkControl,
        idle: Duration,
    ) -> std::io::Result<UdpLink> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let local = socket.local_addr()?;
        let stats = Arc::new(UdpStats::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(relay_udp(
            socket,
            target,
            control.clone(),
            stats.clone(),
            idle,
        ));
        Ok(UdpLink {
            local,
            control,
            stats,
            _tasks: tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn control(&self) -> &LinkControl {
        &self.control
    }

    /// Datagrams delivered so far, both directions (for tests: is anything
    /// going through this relay?).
    pub fn delivered(&self) -> u64 {
        self.stats.delivered.load(Ordering::Relaxed)
    }

    /// Client source addresses with a live mapping.
    pub fn clients(&self) -> usize {
        self.stats.clients.load(Ordering::Relaxed)
    }
}

/// One client source address of a [`UdpLink`].
struct Mapping {
    /// Datagrams toward the target, with their due time.
    to_target: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    /// Due time of the last datagram queued toward the target.
    last: Instant,
    /// Last traffic either way.
    seen: Arc<Mutex<Instant>>,
}

fn touch(seen: &Mutex<Instant>) {
    if let Ok(mut t) = seen.lock() {
        *t = Instant::now();
    }
}

/// The listening side: sorts datagrams by client, opens mappings, expires idle ones.
async fn relay_udp(
    socket: Arc<UdpSocket>,
    target: String,
    ctl: LinkControl,
    stats: Arc<UdpStats>,
    idle: Duration,
) {
    let mut clients: HashMap<SocketAddr, Mapping> = HashMap::new();
    let mut mappings = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                // An error here is an ICMP report about an earlier send_to.
                let Ok((n, from)) = got else { continue };
                let state = ctl.state();
                if !state.up {
                    continue;
                }
                let m = match clients.entry(from) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        match open_mapping(from, &socket, &target, &ctl, &stats).await {
                            Ok((m, task)) => {
                                mappings.spawn(task);
                                e.insert(m)
                            }
                            Err(e) => {
                                tracing::warn!(%target, error = %e, "udp link: cannot reach the target; datagram dropped");
                                continue;
                            }
                        }
                    }
                };
                touch(&m.seen);
                let at = due(&mut m.last, state);
                let _ = m.to_target.send((at, buf[..n].to_vec()));
                stats.clients.store(clients.len(), Ordering::Relaxed);
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                // Dropping a mapping's sender ends its task.
                clients.retain(|_, m| {
                    m.seen.lock().map(|t| now.duration_since(*t) < idle).unwrap_or(false)
                });
                stats.clients.store(clients.len(), Ordering::Relaxed);
            }
            Some(_) = mappings.join_next(), if !mappings.is_empty() => {}
        }
    }
}

/// A new client's mapping, and the task that relays for it.
async fn open_mapping(
    client: SocketAddr,
    listen: &Arc<UdpSocket>,
    target: &str,
    ctl: &LinkControl,
    stats: &Arc<UdpStats>,
) -> std::io::Result<(Mapping, impl std::future::Future<Output = ()>)> {
    let target = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{target} resolves to nothing"),
            )
        })?;
    let bind: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let upstream = UdpSocket::bind(bind).await?;
    upstream.connect(target).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(Instant::now()));
    let task = udp_mapping(
        client,
        listen.clone(),
        upstream,
        rx,
        ctl.subscribe(),
        seen.clone(),
        stats.clone(),
    );
    let mapping = Mapping {
        to_target: tx,
        last: Instant::now(),
        seen,
    };
    Ok((mapping, task))
}

/// One client's relay: delivers its queued datagrams to the target, and the
/// target's answers back to the client, each direction in order and delayed.
/// Ends when the mapping is forgotten (its queue's sender dropped).
async fn udp_mapping(
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    upstream: UdpSocket,
    mut to_target: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    state: watch::Receiver<LinkState>,
    seen: Arc<Mutex<Instant>>,
    stats: Arc<UdpStats>,
) {
    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let up = || state.borrow().up;
    let forward = async {
        while let Some((at, bytes)) = to_target.recv().await {
            hold_until(at).await;
            if up() && upstream.send(&bytes).await.is_ok() {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let read_back = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut last = Instant::now();
        loop {
            // An error is an ICMP report (e.g. nothing listens on the target
            // right now); the target may come back, so keep reading.
            let Ok(n) = upstream.recv(&mut buf).await else {
                continue;
            };
            let s = *state.borrow();
            if !s.up {
                continue;
            }
            touch(&seen);
            let at = due(&mut last, s);
            if back_tx.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let deliver_back = async {
        while let Some((at, bytes)) = back_rx.recv().await {
            hold_until(at).await;
            if up() && listen.send_to(&bytes, client).await.is_ok() {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    tokio::select! {
        _ = forward => {}
        _ = async { tokio::join!(read_back, deliver_back) } => {}
    }
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

    #[tokio::test]
    async fn a_zero_delay_link_adds_no_timer_wait() {
        let echo = echo_server().await;
        let ctl = LinkControl::new(Duration::ZERO, Duration::ZERO);
        let link = Link::start("127.0.0.1:0".parse().unwrap(), echo.to_string(), ctl)
            .await
            .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 1];
        // With a timer wait per chunk, each hop costs about a millisecond (the
        // timer's granularity), so 20 round trips took 40 ms or more. The fastest
        // of a few batches, against a loaded machine.
        let mut fastest = Duration::MAX;
        for _ in 0..5 {
            let started = std::time::Instant::now();
            for _ in 0..20 {
                s.write_all(b"x").await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
            }
            fastest = fastest.min(started.elapsed());
        }
        assert!(
            fastest < Duration::from_millis(20),
            "20 round trips over a zero-delay link took {fastest:?}"
        );
    }

    async fn udp_echo_server() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    async fn udp_client(link: &UdpLink) -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(link.local_addr()).await.unwrap();
        c
    }

    /// The next datagram, or `None` after `wait`.
    async fn recv_within(c: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match tokio::time::timeout(wait, c.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_udp_round_trip_takes_twice_the_one_way_delay_in_order() {
        let echo = udp_echo_server().await;
        let ctl = LinkControl::new(Duration::from_millis(40), Duration::ZERO);
        let link = UdpLink::start("127.0.0.1:0".parse().unwrap(), echo.to_string(), ctl)
            .await
            .unwrap();
        let c = udp_client(&link).await;
        let started = std::time::Instant::now();
        c.send(b"ping").await.unwrap();
        let got = recv_within(&c, Duration::from_secs(5)).await;
        let rtt = started.elapsed();
        assert_eq!(got.as_deref(), Some(&b"ping"[..]));
        assert!(rtt >= Duration::from_millis(80), "rtt {rtt:?}");
        assert!(rtt < Duration::from_millis(400), "rtt {rtt:?}");

        for i in 0..20u8 {
            c.send(&[i]).await.unwrap();
        }
        for i in 0..20u8 {
            let got = recv_within(&c, Duration::from_secs(5)).await;
            assert_eq!(got, Some(vec![i]), "datagram {i}");
        }
        assert_eq!(link.clients(), 1);
        // Counted just after each send, so possibly after the client got it.
        crate::wait::eventually(Duration::from_secs(5), "42 datagrams counted", || async {
            anyhow::ensure!(link.delivered() == 2 * 21, "{}", link.delivered());
            Ok(())
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_cut_udp_link_drops_datagrams_until_healed() {
        let echo = udp_echo_server().await;
        let ctl = LinkControl::new(Duration::ZERO, Duration::ZERO);
        let link = UdpLink::start(
            "127.0.0.1:0".parse().unwrap(),
            echo.to_string(),
            ctl.clone(),
        )
        .await
        .unwrap();
        let c = udp_client(&link).await;
        c.send(b"a").await.unwrap();
        assert_eq!(
            recv_within(&c, Duration::from_secs(5)).await.as_deref(),
            Some(&b"a"[..])
        );

        ctl.cut();
        c.send(b"b").await.unwrap();
        let got = recv_within(&c, Duration::from_millis(300)).await;
        assert_eq!(got, None, "a datagram crossed a cut link");

        ctl.heal();
        c.send(b"c").await.unwrap();
        // "b" was dropped, not held: the next answer is "c".
        assert_eq!(
            recv_within(&c, Duration::from_secs(5)).await.as_deref(),
            Some(&b"c"[..])
        );
    }

    #[tokio::test]
    async fn a_udp_link_starts_before_its_target_resolves_and_drops_until_it_does() {
        // The target is resolved per new client mapping (a compose service may
        // start after the relay): an unresolvable one fails no start.
        let ctl = LinkControl::new(Duration::ZERO, Duration::ZERO);
        let link = UdpLink::start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:not-a-port".to_owned(),
            ctl,
        )
        .await
        .unwrap();
        let c = udp_client(&link).await;
        c.send(b"lost").await.unwrap();
        assert_eq!(recv_within(&c, Duration::from_millis(300)).await, None);
        assert_eq!((link.clients(), link.delivered()), (0, 0));
    }

    #[tokio::test]
    async fn udp_clients_get_their_own_mappings_which_expire_when_idle() {
        let echo = udp_echo_server().await;
        let ctl = LinkControl::new(Duration::ZERO, Duration::ZERO);
        let link = UdpLink::start_with_idle(
            "127.0.0.1:0".parse().unwrap(),
            echo.to_string(),
            ctl,
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        let (a, b) = (udp_client(&link).await, udp_client(&link).await);
        a.send(b"from a").await.unwrap();
        b.send(b"from b").await.unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(recv_within(&a, wait).await.as_deref(), Some(&b"from a"[..]));
        assert_eq!(recv_within(&b, wait).await.as_deref(), Some(&b"from b"[..]));
        assert_eq!(link.clients(), 2);

        crate::wait::eventually(wait, "idle mappings to be forgotten", || async {
            anyhow::ensure!(link.clients() == 0, "{} mappings", link.clients());
            Ok(())
        })
        .await
        .unwrap();
        // A forgotten client that speaks again gets a new mapping.
        a.send(b"again").await.unwrap();
        assert_eq!(recv_within(&a, wait).await.as_deref(), Some(&b"again"[..]));
        assert_eq!(link.clients(), 1);
    }
}
