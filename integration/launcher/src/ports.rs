//! Free loopback ports for the processes a test starts.
//!
//! A port is found by binding `127.0.0.1:0` and reading what the kernel chose;
//! the socket is closed before the port is used, so another process can take
//! it in between. The cluster harness therefore retries a start that failed
//! with "address in use" on a fresh port.

use std::net::TcpListener;

/// One free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports = free_ports(16).unwrap();
        assert_eq!(ports.len(), 16);
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 16);
        assert!(ports.iter().all(|p| *p != 0));
        let p = free_port().unwrap();
        let l = TcpListener::bind(("127.0.0.1", p)).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), p);
    }
}
