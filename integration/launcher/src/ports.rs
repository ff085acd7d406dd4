//! Free loopback ports for the processes a test or a local cluster starts.
//!
//! A port handed out here is bound later by another process (a postmaster,
//! etcd, a proxy), so it must stay free in between. Ports that the kernel
//! assigns by itself — to a `bind` on port 0 (the WAN links' listeners) or as
//! the local port of an outgoing connection (every client, every pooled
//! backend connection) — come from its ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 by default), and one
//! of those can take a chosen port before its process binds it: a postmaster
//! then fails with "Address already in use" on every restart. So ports are
//! chosen below that range, where the kernel never assigns any by itself: at a
//! random place in [`LOWEST`, range start), checked free by binding
//! `127.0.0.1`, and never handed out twice by this process. Two test processes
//! can still pick the same port at the same moment (unlikely among thousands;
//! the PgCluster harness retries a start that failed with "address in use").

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

/// The lowest port handed out (below are well-known and registered services
/// that a developer machine is more likely to run).
pub const LOWEST: u16 = 10_000;

/// Start of the kernel's ephemeral port range when it cannot be read.
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .filter(|start| *start > LOWEST + 1_000)
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// One free TCP port on 127.0.0.1, outside the kernel's ephemeral range.
pub fn free_port() -> std::io::Result<u16> {
    pick("TCP", |port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// One free UDP port on 127.0.0.1 (a QUIC endpoint), outside the kernel's
/// ephemeral range.
pub fn free_udp_port() -> std::io::Result<u16> {
    pick("UDP", |port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// A port in [`LOWEST`, ephemeral start) not handed out before and for which
/// `is_free` holds, starting at a random place.
fn pick(what: &str, is_free: impl Fn(u16) -> bool) -> std::io::Result<u16> {
    let (low, high) = (LOWEST, ephemeral_start());
    let span = u64::from(high - low);
    let start = random_u64() % span;
    let mut handed = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let handed = handed.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = low + u16::try_from((start + i) % span).unwrap_or(0);
        if handed.contains(&port) {
            continue;
        }
        if is_free(port) {
            handed.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free {what} port in {low}..{high} on 127.0.0.1"),
    ))
}

/// `n` distinct free TCP ports on 127.0.0.1 (see [`free_port`]).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    (0..n).map(|_| free_port()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports = free_ports(64).unwrap();
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 64);
        let start = ephemeral_start();
        assert!(
            ports.iter().all(|p| (LOWEST..start).contains(p)),
            "{ports:?} not in {LOWEST}..{start}"
        );
        let p = free_port().unwrap();
        assert!(!ports.contains(&p), "{p} handed out twice");
        let l = TcpListener::bind(("127.0.0.1", p)).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), p);
        let u = free_udp_port().unwrap();
        assert!((LOWEST..start).contains(&u) && !ports.contains(&u) && u != p);
        UdpSocket::bind(("127.0.0.1", u)).unwrap();
    }

    #[test]
    fn a_port_the_kernel_assigns_is_never_chosen() {
        // What a WAN link's listener or an outgoing connection gets.
        let kernel = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = kernel.local_addr().unwrap().port();
        assert!(taken >= ephemeral_start(), "kernel gave {taken}");
        let ours = free_ports(32).unwrap();
        assert!(!ours.contains(&taken));
    }
}
