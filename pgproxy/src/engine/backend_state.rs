//! What the proxy knows about one backend connection and must keep as long as the
//! connection lives, across the sessions that use it: the statements prepared on it
//! (by server-side name), the hash of the session parameters applied to it, its last
//! transaction status, the `ParameterStatus` values it last reported, its process id,
//! and what must happen to it before another client may use it. Plain data: the pool's
//! connection owns it, the engine reads and updates it.

use std::collections::HashSet;

use bytes::Bytes;

use crate::protocol::backend::TxStatus;

/// Parameters of unknown state (a replay failed half-way): replay from scratch next time.
pub const PARAMS_UNKNOWN: u64 = u64::MAX;

/// What must happen to a connection before another client may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Reset {
    /// Nothing beyond the parameter replay every session does.
    #[default]
    None,
    /// Session state (temp objects, locks, listeners, cursors, statements, role) may
    /// remain: `DISCARD ALL` and `SET SESSION AUTHORIZATION DEFAULT`.
    Discard,
}

#[derive(Debug, Clone)]
pub struct BackendState {
    /// The backend's process id.
    pub pid: i32,
    /// Server-side names of the statements prepared on this connection.
    pub prepared: HashSet<Bytes>,
    /// Prepared statements whose cached plan the server refused ("cached plan must not
    /// change result type"): closed and prepared again before their next use.
    pub stale: HashSet<Bytes>,
    /// Hash of the statement held as the unnamed statement.
    pub unnamed: Option<u64>,
    /// Hash of the session parameters applied here (0: server defaults).
    pub params_hash: u64,
    /// From the last `ReadyForQuery`.
    pub tx_status: TxStatus,
    /// `ParameterStatus` values as last reported, in first-report order.
    pub server_params: Vec<(String, String)>,
    pub reset: Reset,
}

impl BackendState {
    pub fn new(pid: i32, server_params: Vec<(String, String)>) -> BackendState {
        BackendState {
            pid,
            prepared: HashSet::new(),
            stale: HashSet::new(),
            unnamed: None,
            params_hash: 0,
            tx_status: TxStatus::Idle,
            server_params,
            reset: Reset::None,
        }
    }

    /// Records a `ParameterStatus` the server sent.
    pub fn observe_parameter(&mut self, name: &[u8], value: &[u8]) {
        let name = String::from_utf8_lossy(name);
        let value = String::from_utf8_lossy(value).into_owned();
        match self.server_params.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 = value,
            None => self.server_params.push((name.into_owned(), value)),
        }
    }

    /// The server dropped every prepared statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn forget_statements(&mut self) {
        self.prepared.clear();
        self.stale.clear();
        self.unnamed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_updated_in_place() {
        let mut s = BackendState::new(1, vec![("client_encoding".into(), "UTF8".into())]);
        s.observe_parameter(b"client_encoding", b"LATIN9");
        s.observe_parameter(b"application_name", b"x");
        assert_eq!(
            s.server_params,
            vec![
                ("client_encoding".to_owned(), "LATIN9".to_owned()),
                ("application_name".to_owned(), "x".to_owned())
            ]
        );
    }
}
